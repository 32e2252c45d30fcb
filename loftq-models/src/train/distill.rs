//! Distillation: the adapters of a quantized student fitted to its full-precision teacher.
//!
//! The loss of a batch is the KL divergence of the student's next-token distribution from the
//! teacher's, at temperature 1, averaged over every position (RILQ's model-level loss), plus,
//! optionally, `hidden_weight` times the mean squared difference of the final normalized hidden
//! states. The teacher runs once per micro-batch, without autodiff, and only that micro-batch's
//! log-probabilities are held.

use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;
use serde::{Deserialize, Serialize};

use super::data::Batch;
use loftq_core::device::rows_per_buffer;

use crate::eval::{log_probs, positions, row_chunks, token_ids};
use crate::nn::Llama;
use crate::{ModelError, Result};

/// What the adapters are trained to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Predict the next token of the text (cross-entropy).
    #[default]
    NextToken,
    /// Match a teacher model's outputs on the text.
    Distill(DistillLoss),
}

/// The distillation loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DistillLoss {
    /// Weight of the mean squared difference of the final normalized hidden states, added to
    /// the KL divergence (0: KL alone).
    pub hidden_weight: f64,
}

/// What the teacher gives for one micro-batch.
#[derive(Clone, Debug)]
pub struct TeacherOutputs {
    /// Log-probabilities `[rows, vocab]` of every position (`batch·seq` rows in all), in
    /// blocks of rows that each fit one buffer of the device (one block on the CPU).
    pub logp: Vec<Tensor<2>>,
    /// Final normalized hidden states `[batch, seq, hidden]`, when the loss uses them.
    pub hidden: Option<Tensor<3>>,
    /// The loss they are for.
    pub loss: DistillLoss,
}

/// Runs `teacher` on `batch` (no autodiff).
pub fn teacher_outputs(teacher: &Llama, batch: &Batch, loss: DistillLoss) -> TeacherOutputs {
    let device = teacher.embed_tokens.device();
    let ids = token_ids(&batch.ids, [batch.batch, batch.seq], &device);
    let hidden = teacher.hidden_states(ids);
    let rows = rows_per_buffer(&device, teacher.config.vocab_size);
    let logp = row_chunks(0, batch.batch * batch.seq, rows)
        .map(|(start, m)| log_probs(teacher, positions(&hidden, start, m)))
        .collect();
    TeacherOutputs {
        logp,
        hidden: (loss.hidden_weight > 0.0).then_some(hidden),
        loss,
    }
}

impl TeacherOutputs {
    /// Positions (`batch·seq`).
    pub fn rows(&self) -> usize {
        self.logp.iter().map(|t| t.dims()[0]).sum()
    }
}

/// The distillation loss of the student's final normalized hidden states `hidden`
/// `[batch, seq, width]` and its head `logits` (tracked or not) against `teacher`: the mean
/// over positions of `KL(teacher ‖ student)`, plus the weighted hidden-state term. The
/// student's logits are made for one of the teacher's blocks of positions at a time.
pub fn distill_loss(
    hidden: Tensor<3>,
    logits: impl Fn(Tensor<3>) -> Tensor<3>,
    teacher: &TeacherOutputs,
) -> Tensor<1> {
    let [b, s, _] = hidden.dims();
    let mut start = 0;
    let kl = teacher.logp.iter().map(|t_logp| {
        let [m, vocab] = t_logp.dims();
        let logp = log_softmax(logits(positions(&hidden, start, m)).reshape([m, vocab]), 1);
        start += m;
        // The teacher's tensors hold no graph: with a tracked student they are constants.
        (t_logp.clone().exp() * (t_logp.clone() - logp)).sum()
    });
    let kl = kl.reduce(|a, b| a + b).expect("at least one position");
    let mut loss = kl.div_scalar((b * s) as f64);
    if let Some(t_hidden) = &teacher.hidden {
        let mse = (hidden - t_hidden.clone()).powi_scalar(2).mean();
        loss = loss + mse.mul_scalar(teacher.loss.hidden_weight);
    }
    loss
}

/// Checks that `teacher` can teach `student`: the same vocabulary, and the same hidden size
/// when the loss compares hidden states.
///
/// # Errors
/// [`ModelError::Mismatch`] saying what differs.
pub fn check_teacher(student: &Llama, teacher: &Llama, loss: DistillLoss) -> Result<()> {
    let (s, t) = (&student.config, &teacher.config);
    if s.vocab_size != t.vocab_size {
        return Err(ModelError::Mismatch(format!(
            "the teacher's vocabulary has {} tokens, the student's {}: distillation needs the \
             same tokenizer",
            t.vocab_size, s.vocab_size
        )));
    }
    if loss.hidden_weight > 0.0 && s.hidden_size != t.hidden_size {
        return Err(ModelError::Mismatch(format!(
            "the hidden-state loss compares hidden states of the same size; the teacher's are \
             {}, the student's {}",
            t.hidden_size, s.hidden_size
        )));
    }
    Ok(())
}
