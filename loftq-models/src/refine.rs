//! `loftq refine`: the best rank-`r` adapter for a backbone that is already quantized (ours
//! packed, bitsandbytes 4-bit, or a LoftQ organisation release, whose `Q` is stored
//! dequantized in bf16), from the full-precision weights, streamed one at a time.
//!
//! Each targeted layer gets the truncated SVD of `W − Q` ([`fit_adapter`]). With a check
//! text, the layers are then visited in model order and a layer keeps its new adapter only
//! if the logits on that text get closer to the full-precision model's; a refused layer gets
//! QLoRA's start (`B = 0`), so the adapter stays trainable. This is PEFT's
//! `replace_lora_weights_loftq` with its logits callback, for any quantized base.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use loftq_core::LoraSpec;
use loftq_core::init::{fit_adapter, qlora_factors};
use loftq_core::lowrank::SvdMethod;
use loftq_core::quant::host_f32;
use serde::{Deserialize, Serialize};

use crate::config::LlamaConfig;
use crate::eval::token_ids;
use crate::init::plan::{layer_index, module_of_weight};
use crate::init::{Target, peak_rss_bytes};
use crate::io::{
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter, AdapterConfig, HostTensor, LoraWeights, TensorSource,
    adapter_dir, dequantize_packed, open_source, require_empty_dir,
};
use crate::nn::{Llama, LoraAdapter, load_pretrained};
use crate::nn::{host_tensor, tensor_seed};
use crate::{ModelError, Result, Tokenizer};

/// Everything `loftq refine` needs.
#[derive(Clone, Debug)]
pub struct RefineSpec {
    /// The quantized backbone: an HF directory with our packed weights, bitsandbytes 4-bit
    /// weights, or a LoftQ organisation release (the modules its `loftq_init/` adapter adapts
    /// hold `Q`).
    pub base: PathBuf,
    /// The full-precision model (HF directory or `.gguf`) the base was quantized from.
    pub model: PathBuf,
    /// Output: a PEFT adapter directory, plus `report.json`.
    pub out: PathBuf,
    /// The adapter: rank, alpha, rsLoRA, whether the factors absorb `s`.
    pub lora: LoraSpec,
    /// Truncated SVD.
    pub svd: SvdMethod,
    /// Targeted modules (among the quantized weights of the base).
    pub target: Target,
    /// Modules left alone.
    pub exclude: Vec<String>,
    /// Seed of the randomized SVD and of the QLoRA start of refused layers.
    pub seed: u64,
    /// The accept/reject check, if any.
    pub check: Option<Check>,
}

/// The per-layer accept/reject check on a calibration text.
#[derive(Clone, Debug)]
pub struct Check {
    /// UTF-8 text, tokenized with the full-precision model's tokenizer.
    pub text: PathBuf,
    /// Tokens of it to use, in one pass.
    pub tokens: usize,
}

/// One line of `report.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefineTensor {
    /// Weight name.
    pub name: String,
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// The base's quantizer (`nf4-b64`; `bitsandbytes` for a bitsandbytes weight;
    /// `loftq-release-bf16` for the dequantized `Q` of a LoftQ organisation release).
    pub quantizer: String,
    /// `‖W − Q‖/‖W‖`.
    pub rel_err_base: f32,
    /// `‖W − Q − s·B·A‖/‖W‖` with the fitted adapter.
    pub rel_err_fit: f32,
    /// With a check: whether the fitted adapter was kept.
    pub accepted: Option<bool>,
    /// With a check: the logits error after deciding this layer.
    pub logits_err: Option<f32>,
    /// Fit time.
    pub seconds: f64,
}

/// `report.json` of `loftq refine`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RefineReport {
    /// One entry per targeted weight, in model order.
    pub tensors: Vec<RefineTensor>,
    /// Mean `rel_err_base`.
    pub mean_rel_err_base: f64,
    /// Mean weight error of the written adapter (refused layers count with `rel_err_base`).
    pub mean_rel_err_final: f64,
    /// With a check: `‖logits − reference‖/‖reference‖` of the base alone, then with the
    /// written adapter.
    pub logits_err: Option<[f32; 2]>,
    /// With a check: layers that kept their fitted adapter.
    pub accepted: Option<usize>,
    /// Wall time.
    pub wall_seconds: f64,
    /// Peak resident memory (Linux), bytes.
    pub peak_rss_bytes: Option<u64>,
}

/// What happened, for progress displays.
#[derive(Clone, Debug)]
pub enum RefineEvent {
    /// The targets are known.
    Planned {
        /// Targeted weights.
        targets: usize,
        /// Their parameters.
        params: u64,
    },
    /// A weight's adapter is fitted.
    Fitted(RefineTensor),
    /// The check starts from the base alone, with this logits error.
    Checking(f32),
    /// A layer was decided: its name, whether kept, the logits error now.
    Decided(String, bool, f32),
}

struct Fitted {
    report: RefineTensor,
    module: String,
    a: HostTensor,
    b: HostTensor,
}

impl RefineSpec {
    /// `all-linear` means every quantized weight: only linear layers are quantized.
    fn wanted(&self, module: &str) -> bool {
        self.target.picks(module, &self.exclude, true)
    }
}

/// Runs `loftq refine` on `device`.
///
/// # Errors
/// [`ModelError`] naming the file, tensor or option: an `out` that is not empty, a base with
/// no quantized weight matching `--target`, a weight whose shape differs between the base
/// and the model, a rank that does not fit. Nothing is written unless everything succeeded.
pub fn run_refine(
    spec: &RefineSpec,
    device: &Device,
    events: &mut dyn FnMut(RefineEvent),
) -> Result<RefineReport> {
    let start = Instant::now();
    require_empty_dir(&spec.out)?;
    let base = open_source(&spec.base)?;
    let model = open_source(&spec.model)?;
    let release = release_modules(&spec.base)?;
    let mut targets = Vec::new();
    for name in base.tensor_names() {
        if let Some(m) = module_of_weight(&name)
            && spec.wanted(m)
            && (base.quantized(&name)? || release.contains(m))
        {
            targets.push(name);
        }
    }
    // Model order (layer 2 before layer 10), which the check's cache relies on.
    targets.sort_by_key(|n| (layer_index(n), n.clone()));
    if targets.is_empty() {
        return Err(ModelError::Settings(format!(
            "{}: no quantized weight matches the targets {:?} (minus the exclusions); the base \
             must be a quantized backbone or a LoftQ release (with loftq_init/)",
            spec.base.display(),
            spec.target
        )));
    }
    let mut params = 0u64;
    for n in &targets {
        params += base.shape(n)?.iter().product::<usize>() as u64;
    }
    events(RefineEvent::Planned {
        targets: targets.len(),
        params,
    });
    let mut fitted = Vec::with_capacity(targets.len());
    for name in &targets {
        let f = fit_one(spec, base.as_ref(), model.as_ref(), name, device)?;
        let r = &f.report;
        tracing::info!(
            tensor = %r.name,
            shape = ?r.shape,
            quantizer = %r.quantizer,
            rel_err_base = r.rel_err_base,
            rel_err_fit = r.rel_err_fit,
            seconds = r.seconds,
            "fitted"
        );
        events(RefineEvent::Fitted(f.report.clone()));
        fitted.push(f);
    }
    drop((base, model));
    let logits_err = match &spec.check {
        Some(check) => Some(run_check(spec, check, &mut fitted, device, events)?),
        None => None,
    };
    let n = fitted.len() as f64;
    let report = RefineReport {
        mean_rel_err_base: fitted
            .iter()
            .map(|f| f64::from(f.report.rel_err_base))
            .sum::<f64>()
            / n,
        mean_rel_err_final: fitted
            .iter()
            .map(|f| match f.report.accepted {
                Some(false) => f64::from(f.report.rel_err_base),
                _ => f64::from(f.report.rel_err_fit),
            })
            .sum::<f64>()
            / n,
        accepted: logits_err.map(|_| {
            fitted
                .iter()
                .filter(|f| f.report.accepted == Some(true))
                .count()
        }),
        logits_err,
        tensors: fitted.iter().map(|f| f.report.clone()).collect(),
        wall_seconds: start.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
    };
    write(spec, fitted, &report)?;
    Ok(report)
}

/// The modules a LoftQ organisation release quantized: those its `loftq_init/` adapter adapts
/// (none when `base` is not a release).
fn release_modules(base: &Path) -> Result<BTreeSet<String>> {
    let dir = adapter_dir(base);
    if dir == base {
        return Ok(BTreeSet::new());
    }
    Adapter::modules_in(&dir)
}

fn fit_one(
    spec: &RefineSpec,
    base: &dyn TensorSource,
    model: &dyn TensorSource,
    name: &str,
    device: &Device,
) -> Result<Fitted> {
    let t0 = Instant::now();
    // A packed weight is read once: its label and values come from the same unpacking.
    let (quantizer, q) = match base.packed(name)? {
        Some(p) => (p.config.label(), dequantize_packed(base.root(), name, &p)?),
        None if base.quantized(name)? => ("bitsandbytes".to_string(), base.tensor(name)?),
        None => ("loftq-release-bf16".to_string(), base.tensor(name)?),
    };
    base.release(name);
    let Some([rows, cols]) = q.matrix_shape() else {
        return Err(ModelError::tensor(
            base.root(),
            name,
            String::from("not a matrix"),
        ));
    };
    let w = crate::io::check_finite(model, name, model.shaped(name, &q.shape)?)?;
    model.release(name);
    let up = |t: HostTensor| Tensor::<2>::from_data(TensorData::new(t.data, [rows, cols]), device);
    let svd = spec.svd.with_seed(tensor_seed(spec.seed, name));
    let fit = fit_adapter(
        &up(w),
        &up(q),
        spec.lora.rank,
        &svd,
        spec.lora.scale(),
        spec.lora.scaling,
    )
    .map_err(|source| ModelError::Loftq {
        name: name.to_string(),
        source,
    })?;
    Ok(Fitted {
        report: RefineTensor {
            name: name.to_string(),
            shape: [rows, cols],
            quantizer,
            rel_err_base: fit.rel_err_base,
            rel_err_fit: fit.rel_err,
            accepted: None,
            logits_err: None,
            seconds: t0.elapsed().as_secs_f64(),
        },
        module: module_of_weight(name)
            .expect("targets are weights")
            .to_string(),
        a: host_tensor(&fit.lora_a),
        b: host_tensor(&fit.lora_b),
    })
}

/// Greedy accept/reject in model order. The hidden state entering layer `l` is kept, so a
/// trial runs only layers `l..` and the head. Returns the logits error before and after.
fn run_check(
    spec: &RefineSpec,
    check: &Check,
    fitted: &mut [Fitted],
    device: &Device,
    events: &mut dyn FnMut(RefineEvent),
) -> Result<[f32; 2]> {
    let tok = Tokenizer::for_model(&spec.model)?;
    let text = std::fs::read_to_string(&check.text).map_err(|e| ModelError::io(&check.text, e))?;
    let mut ids = tok.encode(&text)?;
    ids.truncate(check.tokens);
    if ids.len() < 2 {
        return Err(ModelError::format(&check.text, "fewer than two tokens"));
    }
    let n = ids.len();
    let input = token_ids(&ids, [1, n], device);
    let vocab_rows = |t: Tensor<3>| {
        let [_, seq, vocab] = t.dims();
        host_f32(&t.reshape([seq, vocab]))
    };
    let reference = vocab_rows(load_pretrained(&spec.model, None, device)?.forward(input.clone()));
    let mut llama = load_pretrained(&spec.base, None, device)?;
    let rope = llama.rope(n);
    let logits_err = |llama: &Llama, from: usize, h: &Tensor<3>| -> f32 {
        let mut h = h.clone();
        for layer in &llama.layers[from..] {
            h = layer.forward(h, &rope);
        }
        let logits = vocab_rows(llama.head(llama.norm.forward(h)));
        loftq_core::rel_dist(&reference, &logits) as f32
    };
    let mut h = llama.embed(input);
    let first = logits_err(&llama, 0, &h);
    tracing::info!(tokens = n, logits_err = first, "checking; the base alone");
    events(RefineEvent::Checking(first));
    let mut current = first;
    let layers = llama.layers.len();
    let mut next = 0;
    for l in 0..layers {
        while next < fitted.len() {
            let f = &mut fitted[next];
            let (layer, j) = linear_slot(&f.module, &llama.config)?;
            if layer != l {
                break;
            }
            let up = |t: &HostTensor| {
                Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), device)
            };
            let scale = f64::from(spec.lora.scale());
            llama.layers[l].linears_mut()[j].lora =
                Some(LoraAdapter::new(up(&f.a), up(&f.b), scale, 0.0));
            let err = logits_err(&llama, l, &h);
            let keep = err < current;
            if keep {
                current = err;
            } else {
                llama.layers[l].linears_mut()[j].lora = None;
                let [rows, cols] = f.report.shape;
                let (a, b) = qlora_factors(
                    [rows, cols],
                    spec.lora.rank,
                    tensor_seed(spec.seed, &f.report.name),
                    device,
                );
                (f.a, f.b) = (host_tensor(&a), host_tensor(&b));
            }
            f.report.accepted = Some(keep);
            f.report.logits_err = Some(current);
            tracing::info!(tensor = %f.report.name, kept = keep, logits_err = current, "checked");
            events(RefineEvent::Decided(f.report.name.clone(), keep, current));
            next += 1;
        }
        h = llama.layers[l].forward(h, &rope);
    }
    // Every target was decided: `linear_slot` refuses any outside the decoder layers.
    debug_assert_eq!(next, fitted.len());
    Ok([first, current])
}

/// `model.layers.3.mlp.up_proj` → `(3, index in the family's linear paths)`.
fn linear_slot(module: &str, config: &LlamaConfig) -> Result<(usize, usize)> {
    let layers = config.num_hidden_layers;
    let slot = layer_index(module).filter(|&l| l < layers).and_then(|l| {
        let rest = module.strip_prefix(&format!("model.layers.{l}."))?;
        let paths = config.family.linear_paths();
        Some((l, paths.iter().position(|p| *p == rest)?))
    });
    slot.ok_or_else(|| {
        ModelError::Settings(format!(
            "the check: `{module}` is not a decoder layer's linear layer"
        ))
    })
}

fn write(spec: &RefineSpec, fitted: Vec<Fitted>, report: &RefineReport) -> Result<()> {
    let out = &spec.out;
    let created = !out.exists();
    let modules: Vec<String> = fitted.iter().map(|f| f.module.clone()).collect();
    let adapter = Adapter {
        config: AdapterConfig::of_lora(&spec.lora, modules, &spec.base),
        modules: fitted
            .into_iter()
            .map(|f| (f.module, LoraWeights { a: f.a, b: f.b }))
            .collect::<BTreeMap<_, _>>(),
        saved: BTreeMap::new(),
    };
    let result = adapter.write(out).and_then(|()| {
        let json = serde_json::to_string_pretty(report).expect("report serializes");
        crate::io::write_atomic(&out.join("report.json"), json.as_bytes())
    });
    if result.is_err() {
        // Nothing half-written: the directory if this run made it, else the files it writes.
        if created {
            let _ = std::fs::remove_dir_all(out);
        } else {
            for f in [ADAPTER_CONFIG, ADAPTER_WEIGHTS, "report.json"] {
                let _ = std::fs::remove_file(out.join(f));
            }
        }
    }
    result
}
