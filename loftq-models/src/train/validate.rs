//! Validation: the perplexity of held-out text and, when distilling, the teacher–student KL
//! at the same positions.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::eval::{Window, host_f64, log_probs, logit_rows, nlls, row_chunks, token_ids, windows};
use crate::nn::Llama;

/// Validation text, scored with a sliding window.
#[derive(Clone, Debug)]
pub struct Validation {
    /// Tokens to score.
    pub tokens: Vec<u32>,
    /// Window length (one pass if at least the token count).
    pub window: usize,
    /// Stride between windows.
    pub stride: usize,
}

/// A validation result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// After this many updates.
    pub step: usize,
    /// Mean NLL.
    pub nll: f64,
    /// Perplexity.
    pub ppl: f64,
    /// Distillation: the mean `KL(teacher ‖ model)` of the next-token distributions at the
    /// positions the perplexity scores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
}

impl Validation {
    /// The sliding windows over the tokens (as [`crate::eval::perplexity_windows`]).
    pub(crate) fn windows(&self) -> Vec<Window> {
        windows(self.tokens.len(), self.window, self.stride)
    }

    /// Scores `model` (and its KL from `teacher`, if given) after `step` updates: each window
    /// runs through each model once.
    pub(crate) fn evaluate(
        &self,
        model: &Llama,
        teacher: Option<&Llama>,
        step: usize,
    ) -> EvalRecord {
        let mut sums = Scores::default();
        for w in self.windows() {
            let ids = &self.tokens[w.begin..w.end];
            let normed = |m: &Llama| {
                let device = m.embed_tokens.device();
                m.hidden_states(token_ids(ids, [1, ids.len()], &device))
            };
            sums.add(
                ids,
                w,
                model,
                normed(model),
                teacher.map(|t| (t, normed(t))),
            );
        }
        sums.record(step)
    }
}

/// Sums over the scored positions of the windows seen so far.
#[derive(Clone, Debug, Default)]
pub(crate) struct Scores {
    nll: f64,
    kl: Option<f64>,
    count: usize,
}

impl Scores {
    /// Adds window `w` (tokens `ids`) from the model's final normalized hidden states
    /// `[1, n, hidden]` and, when distilling, the teacher's, making the logits a chunk of
    /// positions at a time.
    pub(crate) fn add(
        &mut self,
        ids: &[u32],
        w: Window,
        model: &Llama,
        normed: Tensor<3>,
        teacher: Option<(&Llama, Tensor<3>)>,
    ) {
        let end = ids.len() - 1;
        let rows = teacher.as_ref().map_or(logit_rows(model), |(t, _)| {
            logit_rows(model).min(logit_rows(t))
        });
        for (start, m) in row_chunks(w.skip, end, rows) {
            let logp = log_probs(model, normed.clone().narrow(1, start, m));
            self.nll += nlls(&logp, &ids[start + 1..start + 1 + m])
                .iter()
                .sum::<f64>();
            if let Some((t, t_normed)) = &teacher {
                let tp = log_probs(t, t_normed.clone().narrow(1, start, m));
                let tp = tp.to_device(&logp.device());
                let rows = (tp.clone().exp() * (tp - logp)).sum_dim(1);
                *self.kl.get_or_insert(0.0) += host_f64(rows).iter().sum::<f64>();
            }
        }
        self.count += end - w.skip;
    }

    /// The means, as the record of `step`.
    pub(crate) fn record(&self, step: usize) -> EvalRecord {
        let n = self.count.max(1) as f64;
        EvalRecord {
            step,
            nll: self.nll / n,
            ppl: (self.nll / n).exp(),
            kl: self.kl.map(|kl| kl / n),
        }
    }
}
