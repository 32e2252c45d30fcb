//! What a training run is told ([`TrainConfig`]), what it tells while it runs ([`TrainEvent`]),
//! and what it leaves ([`History`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::data::Sampling;
use super::distill::Objective;
use super::optim::{AdamWConfig, Schedule};
use super::step::Recompute;
use super::validate::EvalRecord;
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
    /// Next-token prediction, or distillation from a teacher ([`distill_on`](super::distill_on)).
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

    /// Checks that every one of `devices` gets a micro-batch in each step (see [`train_on`](super::train_on)).
    ///
    /// # Errors
    /// [`ModelError::Settings`] if `accum` is smaller than `devices`.
    pub fn check_devices(&self, devices: usize) -> Result<()> {
        if self.accum < devices {
            return Err(ModelError::Settings(format!(
                "{} micro-batches per step for {devices} devices: each device takes whole \
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

/// What the loop reports as it goes. Serialized as one JSON object tagged by `event`
/// (`{"event": "step", "step": 3, "loss": ...}`), as `loftq train --json` prints it.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
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

/// Whether something done "every `every` steps (0: never) and after the last" is due once
/// `done` of `total` steps are done: the rule of `eval_every` and `save_every`.
pub(crate) fn due(done: usize, total: usize, every: usize) -> bool {
    done == total || (every > 0 && done.is_multiple_of(every))
}
