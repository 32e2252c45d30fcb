//! `loftq init`: a whole checkpoint, one tensor at a time, into a quantized backbone, a PEFT
//! adapter and a report; resumable after a kill, byte-identical for a given seed.
//!
//! # Work area
//! Each finished tensor becomes a small safetensors *piece* in `<out>/.loftq-partial/`,
//! written atomically: a piece that exists is done. `--resume` skips them; the plan
//! (`plan.json`) must match. The final files are assembled from the pieces by streaming,
//! each written under a temporary name and renamed, then the work area is removed.

mod assemble;
mod batch;
mod budget;
mod calibrate;
mod calibration;
mod distill;
mod pass;
mod piece;
pub mod plan;
mod report;
mod sensitivity;
mod space;
mod workers;

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use loftq_core::calib::BaseQuantizer;
use loftq_core::init::LoraInit;
use loftq_core::lowrank::SvdMethod;
use loftq_core::{LoftqConfig, LoraSpec, QuantConfig};
use serde::{Deserialize, Serialize};

pub use budget::Budget;
pub use calibration::{CalibInputs, Calibration, Sensitivity};
pub use distill::{Distill, DistillReport};
/// Re-exported: [`InitSpec::method`] is one.
pub use loftq_core::init::InitMethod;
pub use plan::{LayerRule, Target};
pub use report::{Event, Report, TensorReport, Totals, peak_rss_bytes};

use crate::LlamaConfig;
use crate::config::Architecture;
use crate::io::{TensorSource, is_non_empty_dir, open_source};
use crate::{ModelError, Result};

/// Which backbones to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Backbone {
    /// Our packed format in `<out>/model.safetensors`.
    Packed,
    /// Dense bf16 in `<out>/model.safetensors`.
    Bf16,
    /// Packed in `<out>/`, bf16 in `<out>/bf16/`.
    Both,
    /// Packed in `<out>/`, and for llama.cpp `<out>/model.gguf` (the source GGUF with the
    /// targets in their llama.cpp format) and `<out>/adapter.gguf` (a LoRA adapter GGUF).
    /// Needs a `.gguf` model and llama.cpp formats (`q4_0`, ...).
    Gguf,
}

/// Everything `loftq init` needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InitSpec {
    /// HF directory or `.gguf` file.
    pub model: PathBuf,
    /// Output directory.
    pub out: PathBuf,
    /// The start.
    pub method: InitMethod,
    /// Quantizer for tensors no layer rule covers.
    pub quant: QuantConfig,
    /// Per-layer quantizers (first match wins).
    pub layer_rules: Vec<LayerRule>,
    /// A quantizer per matrix chosen under an average-bits budget (replaces `quant` and
    /// `layer_rules`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// The adapter: rank, alpha, rsLoRA, scaling convention.
    #[serde(flatten)]
    pub lora: LoraSpec,
    /// LoftQ iterations.
    pub iters: usize,
    /// Truncated SVD.
    pub svd: SvdMethod,
    /// Targeted modules.
    pub target: Target,
    /// Modules excluded from `target` (same matching rule).
    pub exclude: Vec<String>,
    /// Backbones to write.
    pub backbone: Backbone,
    /// Seed; each tensor's stream is derived from it and the tensor's name.
    pub seed: u64,
    /// Calibration on real text (`None`: every objective is the weights' own error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
    /// How bases are quantized: round to nearest, or GPTQ (needs `calibration`).
    #[serde(default, skip_serializing_if = "is_rtn")]
    pub quantizer: BaseQuantizer,
    /// Distill the start's adapters towards the full-precision model on the calibration
    /// text before the output is final (needs `calibration`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<Distill>,
    /// On a GPU, uncalibrated LoftQ runs up to this many targets of one shape as one batched
    /// problem (1: one at a time; the CPU always runs one at a time). Not part of the job's
    /// identity: a resumed run may change it.
    #[serde(skip, default = "default_device_batch")]
    pub device_batch: usize,
}

/// [`InitSpec::device_batch`]'s default.
pub const DEFAULT_DEVICE_BATCH: usize = 16;

fn default_device_batch() -> usize {
    DEFAULT_DEVICE_BATCH
}

fn is_rtn(q: &BaseQuantizer) -> bool {
    *q == BaseQuantizer::Rtn
}

/// The work area inside `out`.
pub fn work_dir(out: &Path) -> PathBuf {
    out.join(".loftq-partial")
}

/// Whether the work area holds this job's plan (written before any piece).
fn plan_written(work: &Path) -> bool {
    work.join("plan.json").is_file()
}

impl InitSpec {
    /// LoftQ at NF4 (blocks of 64) with rank `rank` and `iters` iterations on every linear
    /// layer of `model` into `out`, with `loftq init`'s other defaults: alpha = rank, exact
    /// scaling, randomized SVD, packed backbone, seed 0, no calibration.
    pub fn new(model: PathBuf, out: PathBuf, rank: usize, iters: usize) -> Self {
        Self {
            model,
            out,
            method: InitMethod::Loftq,
            quant: QuantConfig::nf4(),
            layer_rules: Vec::new(),
            budget: None,
            lora: LoraSpec::new(rank),
            iters,
            svd: SvdMethod::default(),
            target: Target::AllLinear,
            exclude: Vec::new(),
            backbone: Backbone::Packed,
            seed: 0,
            calibration: None,
            quantizer: BaseQuantizer::Rtn,
            distill: None,
            device_batch: DEFAULT_DEVICE_BATCH,
        }
    }

    fn method_for(&self, quant: QuantConfig, seed: u64) -> LoraInit {
        let svd = self.svd.with_seed(seed);
        match self.method {
            InitMethod::Loftq => LoraInit::Loftq(LoftqConfig {
                quant,
                lora: self.lora,
                iters: self.iters,
                svd,
                early_stop: None,
            }),
            InitMethod::Qlora => LoraInit::Zeros { quant, seed },
            InitMethod::Pissa => LoraInit::Pissa { svd },
            InitMethod::Qpissa => LoraInit::QPissa { quant, svd },
        }
    }
}

/// Checks the architecture (the GGUF metadata, or the directory's `config.json` when there is
/// one) and that every target has the shape it gives, before any work: a checkpoint that
/// disagrees with its config would otherwise be initialized and fail only when it is used.
fn check_shapes(
    spec: &InitSpec,
    gguf: Option<&LlamaConfig>,
    plan: &piece::Plan,
    weights: &dyn TensorSource,
) -> Result<()> {
    let file = spec.model.join("config.json");
    let config = match gguf {
        Some(c) => Architecture::Decoder(c.clone()),
        None if file.is_file() => Architecture::from_file(&file)?,
        None => return Ok(()),
    };
    let source = if gguf.is_some() { &spec.model } else { &file };
    let is_name = |n: &str, name: &str| n == name || n.ends_with(&format!(".{name}"));
    if let Some(name) = config.last_layer_tensor()
        && !plan.items.iter().any(|i| is_name(&i.name, &name))
    {
        return Err(ModelError::format(
            source,
            format!(
                "{} layers, but {} has no `{name}`",
                config.num_hidden_layers(),
                spec.model.display()
            ),
        ));
    }
    for item in &plan.items {
        let Some((shape, _)) = item.target else {
            continue;
        };
        if let Some(l) = plan::layer_index(&item.name)
            && l >= config.num_hidden_layers()
        {
            return Err(ModelError::format(
                source,
                format!(
                    "`{}` is in layer {l}, but the model has {} layers",
                    item.name,
                    config.num_hidden_layers()
                ),
            ));
        }
        if let Some(want) = config.linear_shape(&item.name)
            && want != shape
        {
            return Err(ModelError::format(
                source,
                format!(
                    "`{}` in {} is {shape:?}, the architecture gives {want:?}",
                    item.name,
                    weights.file_of(&item.name).display()
                ),
            ));
        }
    }
    Ok(())
}

/// Runs `loftq init` on one or more devices.
///
/// Each device takes whole tensors, the next one as it finishes the last. With devices of one
/// kind (`cuda:0,cuda:1`) the output does not depend on which device took which tensor; with
/// mixed kinds (`cpu,wgpu`) a tensor's last bits depend on where it ran.
///
/// # Errors
/// [`ModelError`] naming the tensor or option. On an error the work area is removed (and
/// `out`, if this call created it), except when writing under `out` failed after the plan was
/// written (a full disk): then, as after a kill, the work area stays for `--resume`.
pub fn run_init(
    spec: &InitSpec,
    devices: &[Device],
    resume: bool,
    events: &mut dyn FnMut(Event),
) -> Result<Report> {
    let start = Instant::now();
    if devices.is_empty() {
        return Err(ModelError::Settings("no device given".into()));
    }
    let out = &spec.out;
    let work = work_dir(out);
    if is_non_empty_dir(out) && !(resume && work.is_dir()) {
        return Err(ModelError::output(
            out,
            if resume {
                "nothing to resume (no work area); write elsewhere"
            } else {
                "exists and is not empty; write elsewhere, or resume an interrupted run"
            },
        ));
    }
    if !spec.model.exists() {
        return Err(ModelError::NotFound {
            path: spec.model.clone(),
        });
    }
    let calibration_ids = calibration::check(spec)?;
    budget::check(spec)?;
    distill::check(spec)?;
    check_gguf_out(spec)?;
    let source = open_source(&spec.model)?;
    let gguf_config = source.llama_config().cloned();
    let mut plan = piece::Plan::new(spec, source.as_ref())?;
    check_shapes(spec, gguf_config.as_ref(), &plan, source.as_ref())?;
    space::check_buffers(&plan, devices)?;
    space::check(
        out,
        &work,
        space::output_bytes(spec, &plan, source.as_ref())?,
    )?;
    // The side files (the GGUF vocabulary as tokenizer.json) are written last: one that
    // cannot be written is refused now, not after the work.
    crate::io::check_side_files(&spec.model)?;
    let created = !out.exists();
    if resume && work.is_dir() {
        // A different job's work area is refused and left as it is.
        plan.check(&work, spec)?;
    }
    std::fs::create_dir_all(&work).map_err(|e| ModelError::io(&work, e))?;
    let result = (|| {
        plan.check_or_write(&work, spec)?;
        let done = plan.done(&work);
        tracing::info!(
            model = %spec.model.display(),
            out = %out.display(),
            targets = plan.targets(),
            params = plan.target_params(),
            resumed = done.len(),
            devices = devices.len(),
            "planned"
        );
        events(Event::Planned {
            targets: plan.targets(),
            target_params: plan.target_params(),
            done: done
                .iter()
                .filter(|&&i| plan.items[i].target.is_some())
                .count(),
        });
        let ids = calibration_ids.as_deref();
        let rows = sensitivity::rows(spec, &work, ids, &devices[0], events)?;
        let calibration = (ids, rows.as_ref());
        budget::apply(
            spec,
            &mut plan,
            source.as_ref(),
            &work,
            calibration,
            &devices[0],
            events,
        )?;
        let mut reports: Vec<Option<TensorReport>> = vec![None; plan.items.len()];
        for &i in &done {
            reports[i] = piece::read_report(&work, i)?;
        }
        let calibrated = match ids {
            Some(ids) => calibrate::run(
                spec,
                &plan,
                source.as_ref(),
                &work,
                (ids, sensitivity::fitted(spec, rows.as_ref())),
                &devices[0],
                &mut |p| match p {
                    calibrate::Progress::Layer(e) => events(e),
                    calibrate::Progress::Tensor(i, r) => {
                        events(Event::Tensor(r.clone()));
                        reports[i] = Some(r);
                    }
                },
            )?,
            None => Default::default(),
        };
        let uncalibrated: Vec<usize> = (0..plan.items.len())
            .filter(|i| !calibrated.contains(i))
            .collect();
        workers::run(
            spec,
            &plan,
            (&uncalibrated, &done),
            source.as_ref(),
            &work,
            devices,
            &mut |i, r| {
                events(Event::Tensor(r.clone()));
                reports[i] = Some(r);
            },
        )?;
        let reports = reports.into_iter().flatten().collect();
        tracing::info!(out = %out.display(), "assembling the output files");
        events(Event::Assembling);
        let resumed = done.len();
        assemble::write_outputs(spec, &plan, gguf_config.as_ref())?;
        let distilled = match spec.distill {
            Some(_) => Some(distill::run(spec, &work, &devices[0], events).map_err(|e| {
                ModelError::Distillation {
                    work: work.clone(),
                    source: Box::new(e),
                }
            })?),
            None => None,
        };
        assemble::finish(spec, reports, distilled, start, resumed)
    })();
    match result {
        Ok(report) => {
            std::fs::remove_dir_all(&work).map_err(|e| ModelError::io(&work, e))?;
            Ok(report)
        }
        // A write under `out` that failed (a full disk, a quota) interrupts the run as a kill
        // does: the work done so far stays for `--resume`.
        Err(ModelError::Io { path, source }) if path.starts_with(out) && plan_written(&work) => {
            Err(ModelError::Interrupted { path, work, source })
        }
        // The start is made: it stays for a resume with other distillation settings.
        Err(e @ ModelError::Distillation { .. }) => Err(e),
        Err(e) => {
            // A refused input is not an interruption: leave nothing behind.
            let _ = std::fs::remove_dir_all(&work);
            if created {
                let _ = std::fs::remove_dir_all(out);
            }
            Err(e)
        }
    }
}

/// Refuses `--backbone gguf` where it cannot be written, before any work: the metadata and
/// vocabulary come from a GGUF source or are made from an HF directory (whose config and
/// tokenizer must convert), and every quantizer must be one of llama.cpp's.
fn check_gguf_out(spec: &InitSpec) -> Result<()> {
    if spec.backbone != Backbone::Gguf {
        return Ok(());
    }
    if !crate::io::is_gguf(&spec.model) {
        crate::io::gguf_metadata(&spec.model)?;
    }
    let quants = std::iter::once(spec.quant)
        .chain(spec.layer_rules.iter().map(|r| r.quant))
        .chain(
            spec.budget
                .iter()
                .flat_map(|b| b.candidates.iter().copied()),
        );
    for q in quants {
        let quantized = !matches!(spec.method, InitMethod::Pissa);
        if quantized && !matches!(q.scheme, loftq_core::quant::Scheme::Ggml { .. }) {
            return Err(ModelError::Settings(format!(
                "a GGUF backbone needs llama.cpp's formats ({}); {} is not one",
                loftq_core::quant::GgmlFormat::NAMES,
                q.label()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_method_builds_its_own_start() {
        use InitMethod::*;
        for method in [Loftq, Qlora, Pissa, Qpissa] {
            let spec = InitSpec {
                method,
                ..InitSpec::new("m".into(), "o".into(), 8, 2)
            };
            assert_eq!(spec.method_for(QuantConfig::nf4(), 1).method(), method);
        }
    }
}
