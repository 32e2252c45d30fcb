//! `loftq init --distill-steps`: the start's adapters fitted to the full-precision model's
//! next-token distributions on the calibration text (KL at every position, no labels), as
//! `loftq train --distill-from` does, before the output is final. The bases do not change.
//!
//! The run lives in the work area (`distill/`: checkpoints and history), so `--resume`
//! continues it; the distilled adapter then replaces `<out>/adapter` in one rename. Should it
//! fail (a diverged loss), the start stays in the work area and a resume may change the
//! distillation's settings or drop it.

use std::path::Path;
use std::time::Instant;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::{Event, InitSpec};
use crate::io::{Adapter, write_atomic, write_dir_atomic};
use crate::nn::{LoadOptions, load_pretrained_with};
use crate::tokenizer::Tokenizer;
use crate::train::{
    AdamWConfig, Decay, DistillLoss, EvalRecord, Objective, Recompute, Sampling, Schedule,
    TokenStream, TrainConfig, TrainEvent, TrainJob, Validation, distill_on,
};
use crate::{ModelError, Result};

/// Distillation after the start ([`InitSpec::distill`]): AdamW with cosine decay, gradient
/// norm clipped to 1, random windows of the calibration text, `InitSpec::seed` its seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Distill {
    /// Optimizer steps.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up steps (at most `steps`).
    pub warmup: usize,
    /// Rows per step.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
}

impl Distill {
    /// `steps` steps with the defaults measured on SmolLM2 (docs/calibration.md): lr 5e-4,
    /// 10 warm-up steps, 4 rows of 128 tokens.
    pub fn new(steps: usize) -> Self {
        Self {
            steps,
            lr: 5e-4,
            warmup: 10,
            batch: 4,
            seq: 128,
        }
    }
}

/// What the distillation did (`report.json`'s `distill`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistillReport {
    /// Steps run in all (resumed ones included).
    pub steps: usize,
    /// Training tokens (the calibration text but its held-out tail).
    pub train_tokens: usize,
    /// The held-out tail of the calibration text before the first step and after the last:
    /// perplexity and KL from the full-precision model.
    pub before: Option<EvalRecord>,
    /// As `before`, after the last step.
    pub after: Option<EvalRecord>,
    /// Wall time of this invocation's share.
    pub seconds: f64,
}

/// Removes `dir` when it holds the checkpoints of other settings (a resume that changed them),
/// then records `d` there.
fn start_again_if_changed(dir: &Path, d: &Distill) -> Result<()> {
    let path = dir.join(SETTINGS);
    let json = serde_json::to_string(d).expect("settings serialize");
    match std::fs::read_to_string(&path) {
        Ok(old) if old == json => return Ok(()),
        Ok(_) => std::fs::remove_dir_all(dir).map_err(|e| ModelError::io(dir, e))?,
        Err(_) => {}
    }
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    write_atomic(&path, json.as_bytes())
}

/// The settings the checkpoints in the work area's `distill/` were made with.
const SETTINGS: &str = "settings.json";
/// Fraction of the calibration text held out to validate on.
const HELD_OUT: f64 = 0.05;
/// Validation tokens scored at most.
const VAL_TOKENS: usize = 2048;
/// Steps between checkpoints.
const SAVE_EVERY: usize = 10;

/// Refuses distillation settings that cannot work, before any work.
pub(super) fn check(spec: &InitSpec) -> Result<()> {
    let Some(d) = &spec.distill else {
        return Ok(());
    };
    let bad = |msg: String| Err(ModelError::Settings(msg));
    if spec.calibration.is_none() {
        return bad("distillation runs on the calibration text: give calibration files".into());
    }
    if d.steps == 0 || d.batch == 0 {
        return bad("distillation needs at least one step of at least one row".into());
    }
    if d.seq < 2 {
        return bad(format!(
            "distillation rows of {} tokens: need at least 2",
            d.seq
        ));
    }
    if !(d.lr.is_finite() && d.lr > 0.0) {
        return bad(format!(
            "the distillation learning rate {} must be positive",
            d.lr
        ));
    }
    Ok(())
}

/// Distills the adapter written in `spec.out` (with the backbone there) towards `spec.model`
/// on the calibration text, in `work/distill/`, and replaces `spec.out/adapter` with the
/// result.
pub(super) fn run(
    spec: &InitSpec,
    work: &Path,
    device: &Device,
    events: &mut dyn FnMut(Event),
) -> Result<DistillReport> {
    let start = Instant::now();
    let (d, calib) = match (&spec.distill, &spec.calibration) {
        (Some(d), Some(c)) => (d, c),
        _ => unreachable!("checked before the work"),
    };
    let out = &spec.out;
    let adapter = Adapter::read(&out.join("adapter"))?;
    let opts = LoadOptions {
        quantize: None,
        adapter: Some(&adapter),
    };
    let mut student = load_pretrained_with(out, device, &opts)?;
    let teacher = load_pretrained_with(&spec.model, device, &LoadOptions::default())?;
    let tok = Tokenizer::for_model(&spec.model)?;
    let eos = student.config.eos_token_id;
    let (stream, val) = TokenStream::from_files(&tok, &calib.files, eos)?.split_tail(HELD_OUT);
    let tokens: Vec<u32> = val.tokens.into_iter().take(VAL_TOKENS).collect();
    let n = tokens.len();
    let val = (n >= 2).then_some(Validation {
        window: n,
        stride: n,
        tokens,
    });
    let cfg = TrainConfig {
        steps: d.steps,
        batch: d.batch,
        seq: d.seq,
        accum: 1,
        schedule: Schedule {
            lr: d.lr,
            warmup: d.warmup.min(d.steps),
            decay: Decay::Cosine,
            total: d.steps,
        },
        adamw: AdamWConfig::default(),
        max_grad_norm: Some(1.0),
        sampling: Sampling::Random,
        seed: spec.seed,
        recompute: Recompute::Layers,
        objective: Objective::Distill(DistillLoss { hidden_weight: 0.0 }),
        // Before the first step and after the last.
        eval_every: d.steps,
        save_every: SAVE_EVERY,
        keep_checkpoints: 1,
        // The work area is this job's (its plan matched), so a checkpoint there is ours.
        resume: true,
    };
    let dir = work.join("distill");
    start_again_if_changed(&dir, d)?;
    let job = TrainJob::new(&adapter.config, &stream.tokens, &cfg, &dir).validated(val.as_ref());
    let history = distill_on(
        std::slice::from_mut(&mut student),
        std::slice::from_ref(&teacher),
        job,
        |e: &TrainEvent| events(Event::Distill(e.clone())),
    )?;
    // The student holds the distilled factors (also after a resume that found the run done).
    let distilled = (student.adapter(adapter.config.clone()))
        .expect("distill_on refuses a student without adapters");
    write_dir_atomic(&out.join("adapter"), |tmp| distilled.write(tmp))?;
    let first = history.evals.iter().min_by_key(|e| e.step).cloned();
    let last = history.evals.iter().max_by_key(|e| e.step).cloned();
    Ok(DistillReport {
        steps: history.steps.len(),
        train_tokens: stream.tokens.len(),
        before: first.filter(|e| e.step == 0),
        after: last.filter(|e| e.step == d.steps),
        seconds: start.elapsed().as_secs_f64(),
    })
}
