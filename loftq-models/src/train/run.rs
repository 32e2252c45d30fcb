//! The training loop: schedule, accumulation, clipping, validation, checkpoints and resume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use loftq_core::quant::host_f32;
use serde::{Deserialize, Serialize};

use super::data::{Sampling, draw_batch, mix};
use super::distill::{Objective, check_teacher};
use super::optim::{AdamW, AdamWConfig, Schedule, clip_grad_norm};
use super::parallel::{Teachers, micro_batches};
use super::step::Recompute;
use super::validate::{EvalRecord, Validation};
use crate::io::{AdapterConfig, Checkpoint, OutTensor, write_atomic, write_safetensors};
use crate::nn::Llama;
use crate::{ModelError, Result};

/// What and how to train. Everything here except `eval_every`, `save_every` and
/// `keep_checkpoints` must be the same for `--resume` to continue a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Rows per micro-batch.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
    /// Micro-batches per step (gradient accumulation); the step's gradient is their mean.
    pub accum: usize,
    /// Learning rate over the steps.
    pub schedule: Schedule,
    /// AdamW.
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this (none: no clipping).
    pub max_grad_norm: Option<f64>,
    /// How rows are cut from the training stream.
    pub sampling: Sampling,
    /// Seed of the batches and of dropout.
    pub seed: u64,
    /// Recompute each layer in the backward pass (bounded memory) or keep the whole graph.
    pub recompute: Recompute,
    /// Next-token prediction, or distillation from a teacher ([`distill_on`]).
    #[serde(default)]
    pub objective: Objective,
    /// Validate every this many steps (and before the first, and after the last); 0: only
    /// after the last.
    #[serde(skip)]
    pub eval_every: usize,
    /// Write a checkpoint every this many steps (and after the last); 0: only after the
    /// last.
    #[serde(skip)]
    pub save_every: usize,
    /// Checkpoints kept on disk (the oldest are removed).
    #[serde(skip)]
    pub keep_checkpoints: usize,
    /// Continue from the latest checkpoint in the output directory, if there is one.
    #[serde(skip)]
    pub resume: bool,
}

impl TrainConfig {
    /// Whether `other` continues the same run (the fields that do not change the result,
    /// `eval_every`, `save_every` and `keep_checkpoints`, aside).
    pub fn same_run(&self, other: &TrainConfig) -> bool {
        let strip = |c: &TrainConfig| TrainConfig {
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 0,
            resume: false,
            ..c.clone()
        };
        strip(self) == strip(other)
    }

    /// Checks that every one of `devices` gets a micro-batch in each step (see [`train_on`]).
    ///
    /// # Errors
    /// [`ModelError::Invalid`], naming `--accum`, if `accum` is smaller than `devices`.
    pub fn check_devices(&self, devices: usize) -> Result<()> {
        if self.accum < devices {
            return Err(ModelError::Invalid(format!(
                "--accum {} is smaller than the {devices} devices: each device takes whole \
                 micro-batches, so give at least one per device",
                self.accum
            )));
        }
        Ok(())
    }
}

/// One line of the training history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step number (1-based: after this many updates).
    pub step: usize,
    /// Mean training loss of the step's batches.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Wall seconds of the step.
    pub seconds: f64,
}

/// Everything a run has recorded; saved with each checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// Per step.
    pub steps: Vec<StepRecord>,
    /// Per validation.
    pub evals: Vec<EvalRecord>,
    /// Training tokens per step (the positions the loss averages over).
    pub tokens_per_step: usize,
}

/// What the loop reports as it goes.
#[derive(Clone, Debug)]
pub enum TrainEvent {
    /// Continuing from a checkpoint.
    Resumed {
        /// Steps already done.
        step: usize,
    },
    /// A step finished.
    Step(StepRecord),
    /// A validation finished.
    Eval(EvalRecord),
    /// A checkpoint was written.
    Saved {
        /// Steps done.
        step: usize,
        /// Its directory.
        path: PathBuf,
    },
}

#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    config: TrainConfig,
    history: History,
}

const STATE: &str = "trainer_state.json";
const OPTIMIZER: &str = "optimizer.safetensors";

/// Trains the LoRA factors of `model` on `stream`, writing checkpoints and the final
/// adapter (PEFT format, `adapter_template` as its config) under `out`: `out/checkpoint-N/`
/// and `out/adapter/`, plus `out/history.json`. With `cfg.resume`, continues from the latest
/// checkpoint in `out`; the result is the same as an uninterrupted run.
///
/// # Errors
/// [`ModelError::Invalid`] for a model without adapters, a stream shorter than a row, or a
/// checkpoint from another configuration; [`ModelError::Io`] when writing fails.
pub fn train(
    model: &mut Llama,
    adapter_template: &AdapterConfig,
    stream: &[u32],
    val: Option<&Validation>,
    cfg: &TrainConfig,
    out: &Path,
    on_event: impl FnMut(&TrainEvent),
) -> Result<History> {
    let models = std::slice::from_mut(model);
    train_on(models, adapter_template, stream, val, cfg, out, on_event)
}

/// [`train`] with data parallelism: `models` are replicas of one model, each on its own
/// device, the first one the main replica. The `cfg.accum` micro-batches of each step are
/// spread over the replicas (replica `d` takes micro-batches `d, d + D, ...`), each in its
/// own thread; each replica sums its gradients, the sums are added on the main replica's
/// device, and the update, validation and checkpoints happen there. The result is that of
/// one device with the same `cfg`, up to the devices' rounding and the order of the sums
/// (the same bits on identical devices with one micro-batch each). The replicas receive the
/// main replica's LoRA factors before every step.
///
/// # Errors
/// As [`train`]; also [`ModelError::Invalid`] if `models` is empty, if the replicas' adapters
/// differ in shape from the main one's, or if `cfg.accum` is smaller than the number of
/// replicas (each device takes whole micro-batches).
pub fn train_on(
    models: &mut [Llama],
    adapter_template: &AdapterConfig,
    stream: &[u32],
    val: Option<&Validation>,
    cfg: &TrainConfig,
    out: &Path,
    on_event: impl FnMut(&TrainEvent),
) -> Result<History> {
    run(
        models,
        &[],
        adapter_template,
        stream,
        val,
        cfg,
        out,
        on_event,
    )
}

/// [`train_on`] with the distillation objective (`cfg.objective`): each replica's adapters
/// are fitted to the outputs of its teacher, `teachers[d]` on the same device as `models[d]`
/// (the full-precision model the student was quantized from). Validation reports the
/// teacher–student KL beside the perplexity.
///
/// # Errors
/// As [`train_on`]; also [`ModelError::Invalid`] if `cfg.objective` is not distillation, if
/// there is not one teacher per replica, or if a teacher cannot teach its student
/// ([`check_teacher`]).
#[allow(clippy::too_many_arguments)]
pub fn distill_on(
    models: &mut [Llama],
    teachers: &[Llama],
    adapter_template: &AdapterConfig,
    stream: &[u32],
    val: Option<&Validation>,
    cfg: &TrainConfig,
    out: &Path,
    on_event: impl FnMut(&TrainEvent),
) -> Result<History> {
    run(
        models,
        teachers,
        adapter_template,
        stream,
        val,
        cfg,
        out,
        on_event,
    )
}

#[allow(clippy::too_many_arguments)]
fn run(
    models: &mut [Llama],
    teachers: &[Llama],
    adapter_template: &AdapterConfig,
    stream: &[u32],
    val: Option<&Validation>,
    cfg: &TrainConfig,
    out: &Path,
    mut on_event: impl FnMut(&TrainEvent),
) -> Result<History> {
    let teachers = match cfg.objective {
        Objective::Distill(loss) => {
            if teachers.len() != models.len() {
                return Err(ModelError::Invalid(format!(
                    "{} teachers for {} model replicas: distillation (distill_on) needs one per \
                     device",
                    teachers.len(),
                    models.len()
                )));
            }
            for (s, t) in models.iter().zip(teachers) {
                check_teacher(s, t, loss)?;
            }
            Some(Teachers {
                models: teachers,
                loss,
            })
        }
        Objective::NextToken if teachers.is_empty() => None,
        Objective::NextToken => {
            return Err(ModelError::Invalid(
                "teachers were given, but distillation needs the distillation objective".into(),
            ));
        }
    };
    let Some(model) = models.first() else {
        return Err(ModelError::Invalid("no model to train".into()));
    };
    let shapes = |m: &Llama| m.lora_params().iter().map(|t| t.dims()).collect::<Vec<_>>();
    if models.iter().skip(1).any(|r| shapes(r) != shapes(model)) {
        return Err(ModelError::Invalid(
            "the replicas' adapters differ from the first device's".into(),
        ));
    }
    cfg.check_devices(models.len())?;
    if model.lora_params().is_empty() {
        return Err(ModelError::Invalid(
            "the model has no LoRA adapter to train".into(),
        ));
    }
    if stream.len() < cfg.seq || cfg.seq < 2 {
        return Err(ModelError::Invalid(format!(
            "the training text has {} tokens, fewer than one row of --seq {}",
            stream.len(),
            cfg.seq
        )));
    }
    if cfg.batch == 0 || cfg.accum == 0 {
        return Err(ModelError::Invalid(
            "--batch and --accum must be at least 1".into(),
        ));
    }
    check_space(model, cfg, out)?;
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let mut opt = AdamW::new(cfg.adamw, &model.lora_params());
    let model = &mut models[0];
    let positions = match teachers {
        Some(_) => cfg.seq,
        None => cfg.seq - 1,
    };
    let mut history = History {
        tokens_per_step: cfg.batch * cfg.accum * positions,
        ..History::default()
    };
    let mut start = 0;
    if cfg.resume
        && let Some(dir) = latest_checkpoint(out)?
    {
        let state = load_checkpoint(&dir, model, &mut opt, cfg)?;
        start = state.step;
        history = state.history;
        on_event(&TrainEvent::Resumed { step: start });
    }
    let validate = |model: &Llama, step: usize, history: &mut History| -> Option<EvalRecord> {
        let v = val?;
        if history.evals.iter().any(|e| e.step == step) {
            return None;
        }
        let rec = v.evaluate(model, teachers.map(|t| &t.models[0]), step);
        history.evals.push(rec.clone());
        Some(rec)
    };
    if cfg.eval_every > 0
        && let Some(r) = validate(model, start, &mut history)
    {
        on_event(&TrainEvent::Eval(r));
    }
    for step in start..cfg.steps {
        let t0 = Instant::now();
        let batches: Vec<_> = (0..cfg.accum)
            .map(|micro| {
                let batch = draw_batch(
                    stream,
                    cfg.sampling,
                    cfg.batch,
                    cfg.seq,
                    cfg.seed,
                    (step, micro, cfg.accum),
                );
                (batch, mix(cfg.seed, &[step as u64, micro as u64, 1]))
            })
            .collect();
        let sums = micro_batches(models, &batches, cfg.recompute, teachers);
        let loss = sums.loss / cfg.accum as f64;
        let model = &mut models[0];
        if !loss.is_finite() {
            return Err(ModelError::Invalid(format!(
                "step {}: the training loss is {loss}; nothing was saved for this step (lower \
                 --lr, or clip with --max-grad-norm)",
                step + 1
            )));
        }
        let mut grads = sums.grads;
        if cfg.accum > 1 {
            let inv = 1.0 / cfg.accum as f64;
            grads = grads.into_iter().map(|g| g.mul_scalar(inv)).collect();
        }
        let grad_norm = match cfg.max_grad_norm {
            Some(max) => clip_grad_norm(&mut grads, max),
            None => super::optim::grad_norm(&grads),
        };
        let lr = cfg.schedule.lr(step);
        let params = opt.update(model.lora_params(), grads, lr);
        model.set_lora_params(params);
        let rec = StepRecord {
            step: step + 1,
            loss,
            lr,
            grad_norm,
            seconds: t0.elapsed().as_secs_f64(),
        };
        history.steps.push(rec.clone());
        on_event(&TrainEvent::Step(rec));
        let done = step + 1;
        let last = done == cfg.steps;
        if ((cfg.eval_every > 0 && done % cfg.eval_every == 0) || last)
            && let Some(r) = validate(model, done, &mut history)
        {
            on_event(&TrainEvent::Eval(r));
        }
        if (cfg.save_every > 0 && done % cfg.save_every == 0) || last {
            let path = save_checkpoint(out, model, adapter_template, &opt, cfg, done, &history)?;
            on_event(&TrainEvent::Saved { step: done, path });
        }
    }
    let adapter = models[0]
        .adapter(adapter_template.clone())
        .expect("checked above: the model has adapters");
    write_dir_atomic(&out.join("adapter"), |dir| adapter.write(dir))?;
    let json = serde_json::to_string_pretty(&history).expect("history serializes");
    write_atomic(&out.join("history.json"), json.as_bytes())?;
    Ok(history)
}

/// Refuses a run whose checkpoints (the adapter and AdamW's two moments, `f32`; one more than
/// `keep_checkpoints` exists while the oldest is replaced) and final adapter would not fit under
/// `out`.
fn check_space(model: &Llama, cfg: &TrainConfig, out: &Path) -> Result<()> {
    let values: usize = model
        .lora_params()
        .iter()
        .map(|t| t.dims().iter().product::<usize>())
        .sum();
    let adapter = 4 * values as u64;
    let written = match cfg.save_every {
        0 => 1,
        every => cfg.steps.div_ceil(every) + 1,
    };
    let checkpoints = (cfg.keep_checkpoints.max(1) + 1).min(written) as u64;
    let need = adapter * (3 * checkpoints + 1);
    let what = format!(
        "about {} ({checkpoints} checkpoints of {} and the adapter)",
        crate::io::space::human(need),
        crate::io::space::human(3 * adapter)
    );
    crate::io::space::check_free(out, need, &what)
}

/// The checkpoint directory with the most steps under `out`, if any.
///
/// # Errors
/// [`ModelError::Io`] if `out` cannot be listed.
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>> {
    let found = match checkpoints(out) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ModelError::io(out, e)),
    };
    Ok(found
        .into_iter()
        .rev()
        .map(|(_, p)| p)
        .find(|p| p.join(STATE).is_file()))
}

/// The `checkpoint-N` directories under `out`, by ascending `N`.
fn checkpoints(out: &Path) -> std::io::Result<Vec<(usize, PathBuf)>> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(out)?
        .flatten()
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

fn save_checkpoint(
    out: &Path,
    model: &Llama,
    template: &AdapterConfig,
    opt: &AdamW,
    cfg: &TrainConfig,
    step: usize,
    history: &History,
) -> Result<PathBuf> {
    let dir = out.join(format!("checkpoint-{step}"));
    write_dir_atomic(&dir, |tmp| {
        let adapter = model.adapter(template.clone()).expect("has adapters");
        adapter.write(tmp)?;
        let mut tensors = BTreeMap::new();
        for (i, (m, v)) in opt.m.iter().zip(&opt.v).enumerate() {
            tensors.insert(
                format!("m.{i}"),
                OutTensor::f32(m.dims().to_vec(), &host_f32(m)),
            );
            tensors.insert(
                format!("v.{i}"),
                OutTensor::f32(v.dims().to_vec(), &host_f32(v)),
            );
        }
        let meta = [("adamw_step".to_string(), opt.step.to_string())].into();
        write_safetensors(&tmp.join(OPTIMIZER), &tensors, Some(meta))?;
        let state = TrainerState {
            step,
            config: cfg.clone(),
            history: history.clone(),
        };
        let json = serde_json::to_string_pretty(&state).expect("state serializes");
        write_atomic(&tmp.join(STATE), json.as_bytes())
    })?;
    prune_checkpoints(out, cfg.keep_checkpoints.max(1));
    Ok(dir)
}

fn load_checkpoint(
    dir: &Path,
    model: &mut Llama,
    opt: &mut AdamW,
    cfg: &TrainConfig,
) -> Result<TrainerState> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| ModelError::format(&path, format!("bad trainer state: {e}")))?;
    if !state.config.same_run(cfg) {
        return Err(ModelError::Invalid(format!(
            "{} was written with other training options ({:?}); resume with the same options or \
             use another --out",
            dir.display(),
            state.config
        )));
    }
    // The step is the directory's own (`checkpoint-N`) and within the run.
    let named = dir.file_name().and_then(|n| {
        n.to_str()?
            .strip_prefix("checkpoint-")?
            .parse::<usize>()
            .ok()
    });
    if named != Some(state.step) || state.step > cfg.steps {
        return Err(ModelError::format(
            &path,
            format!(
                "step {} does not match the directory or lies past --steps {}",
                state.step, cfg.steps
            ),
        ));
    }
    let adapter = crate::io::Adapter::read(dir)?;
    let device = model.embed_tokens.device();
    let mut params = Vec::new();
    for (p, lin) in model.linears() {
        if lin.lora.is_none() {
            continue;
        }
        let w = adapter.modules.get(&p).ok_or_else(|| {
            ModelError::format(dir, format!("the checkpoint has no factors for `{p}`"))
        })?;
        for t in [&w.a, &w.b] {
            params.push(Tensor::<2>::from_data(
                TensorData::new(t.data.clone(), t.shape.clone()),
                &device,
            ));
        }
    }
    let shapes: Vec<[usize; 2]> = model.lora_params().iter().map(|t| t.dims()).collect();
    if params.iter().map(|t| t.dims()).ne(shapes.iter().copied()) {
        return Err(ModelError::format(
            dir,
            "the checkpoint's factors do not fit the model",
        ));
    }
    model.set_lora_params(params);
    let opath = dir.join(OPTIMIZER);
    let ck = Checkpoint::open(&opath)?;
    let load = |name: String, shape: [usize; 2]| -> Result<Tensor<2>> {
        let t = ck.shaped(&name, &shape)?;
        Ok(Tensor::from_data(TensorData::new(t.data, t.shape), &device))
    };
    for (i, &shape) in shapes.iter().enumerate() {
        opt.m[i] = load(format!("m.{i}"), shape)?;
        opt.v[i] = load(format!("v.{i}"), shape)?;
    }
    opt.step = ck
        .metadata()
        .get("adamw_step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ModelError::format(&opath, "no adamw_step in the metadata"))?;
    Ok(state)
}

/// Writes a directory through `fill` into a temporary sibling, then renames it into place
/// (replacing an older one).
pub(crate) fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = crate::io::safetensors::temp_path(dir);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let result = fill(&tmp).and_then(|()| {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| ModelError::io(dir, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn prune_checkpoints(out: &Path, keep: usize) {
    let Ok(found) = checkpoints(out) else {
        return;
    };
    let drop = found.len().saturating_sub(keep);
    for (_, p) in found.into_iter().take(drop) {
        let _ = std::fs::remove_dir_all(p);
    }
}
