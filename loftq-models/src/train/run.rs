//! The training loop: schedule, accumulation, clipping, validation, checkpoints and resume.

use std::path::Path;
use std::time::Instant;

use super::checkpoint::{latest_checkpoint, load_checkpoint, save_checkpoint};
use super::config::{History, StepRecord, TrainConfig, TrainEvent, due};
use super::data::{draw_batch, mix};
use super::distill::{Objective, check_teacher};
use super::job::TrainJob;
use super::optim::AdamW;
use super::parallel::{Teachers, micro_batches};
use super::validate::EvalRecord;
use crate::io::{write_atomic, write_dir_atomic};
use crate::nn::Llama;
use crate::{ModelError, Result};

/// Trains the LoRA factors of `model` on `job.stream`, writing checkpoints and the final
/// adapter (PEFT format, `job.template` as its config) under `job.out`: `checkpoint-N/` and
/// `adapter/`, plus `history.json`. With `job.cfg.resume`, continues from the latest
/// checkpoint there; the result is the same as an uninterrupted run.
///
/// # Errors
/// [`ModelError::Settings`] for a model without adapters or zero sizes, [`ModelError::Data`]
/// for a stream shorter than a row, [`ModelError::Output`] for a checkpoint from another
/// configuration, [`ModelError::Diverged`] for a loss that is not finite;
/// [`ModelError::Io`] when writing fails.
pub fn train(
    model: &mut Llama,
    job: TrainJob<'_, TrainConfig>,
    on_event: impl FnMut(&TrainEvent),
) -> Result<History> {
    train_on(std::slice::from_mut(model), job, on_event)
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
/// As [`train`]; also [`ModelError::Settings`] if `models` is empty, if the replicas' adapters
/// differ in shape from the main one's, or if `cfg.accum` is smaller than the number of
/// replicas (each device takes whole micro-batches).
pub fn train_on(
    models: &mut [Llama],
    job: TrainJob<'_, TrainConfig>,
    on_event: impl FnMut(&TrainEvent),
) -> Result<History> {
    distill_on(models, &[], job, on_event)
}

/// [`train_on`] with the distillation objective (`cfg.objective`): each replica's adapters
/// are fitted to the outputs of its teacher, `teachers[d]` on the same device as `models[d]`
/// (the full-precision model the student was quantized from). Validation reports the
/// teacher–student KL beside the perplexity. With no teachers and the next-token objective,
/// this is [`train_on`].
///
/// # Errors
/// As [`train_on`]; also [`ModelError::Settings`] if `cfg.objective` is not distillation, if
/// there is not one teacher per replica, or if a teacher cannot teach its student
/// ([`check_teacher`]).
pub fn distill_on(
    models: &mut [Llama],
    teachers: &[Llama],
    job: TrainJob<'_, TrainConfig>,
    mut on_event: impl FnMut(&TrainEvent),
) -> Result<History> {
    let (template, stream, val, cfg, out) = (job.template, job.stream, job.val, job.cfg, job.out);
    let teachers = match cfg.objective {
        Objective::Distill(loss) => {
            if teachers.len() != models.len() {
                return Err(ModelError::Settings(format!(
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
            return Err(ModelError::Settings(
                "teachers were given, but distillation needs the distillation objective".into(),
            ));
        }
    };
    let Some(model) = models.first() else {
        return Err(ModelError::Settings("no model to train".into()));
    };
    let shapes = |m: &Llama| m.lora_params().iter().map(|t| t.dims()).collect::<Vec<_>>();
    if models.iter().skip(1).any(|r| shapes(r) != shapes(model)) {
        return Err(ModelError::Mismatch(
            "the replicas' adapters differ from the first device's".into(),
        ));
    }
    cfg.check_devices(models.len())?;
    if model.lora_params().is_empty() {
        return Err(ModelError::Settings(
            "the model has no LoRA adapter to train".into(),
        ));
    }
    if stream.len() < cfg.seq || cfg.seq < 2 {
        return Err(ModelError::Data(format!(
            "the training text has {} tokens, fewer than one row of {}",
            stream.len(),
            cfg.seq
        )));
    }
    if cfg.batch == 0 || cfg.accum == 0 {
        return Err(ModelError::Settings(
            "the batch and the accumulation must be at least 1".into(),
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
            return Err(ModelError::Diverged {
                step: step + 1,
                loss,
            });
        }
        let mut grads = sums.grads;
        if cfg.accum > 1 {
            let inv = 1.0 / cfg.accum as f64;
            grads = grads.into_iter().map(|g| g.mul_scalar(inv)).collect();
        }
        let lr = cfg.schedule.lr(step);
        let device = model.embed_tokens.device();
        loftq_core::profile::mark(&device, "train: other");
        let (params, grad_norm) = opt.update_clipped(grads, lr, cfg.max_grad_norm);
        model.set_lora_params(params);
        loftq_core::profile::mark(&device, "train: gradient norm and adamw");
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
        if due(done, cfg.steps, cfg.eval_every)
            && let Some(r) = validate(model, done, &mut history)
        {
            on_event(&TrainEvent::Eval(r));
        }
        if due(done, cfg.steps, cfg.save_every) {
            let path = save_checkpoint(out, model, template, &opt, cfg, done, &history)?;
            on_event(&TrainEvent::Saved { step: done, path });
        }
    }
    let adapter = models[0]
        .adapter(template.clone())
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
