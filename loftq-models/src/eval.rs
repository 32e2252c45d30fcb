//! Evaluation: next-token negative log-likelihood and perplexity.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use loftq_core::device::rows_per_buffer;
use loftq_core::quant::host_f32;

use crate::nn::Llama;

/// Mean negative log-likelihood (nats) and perplexity of a text.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Perplexity {
    /// Mean NLL of each token given the ones before it.
    pub nll: f64,
    /// `exp(nll)`.
    pub ppl: f64,
    /// Number of predicted tokens.
    pub tokens: usize,
}

/// Perplexity of `ids` in one forward pass (the first token is context only).
///
/// # Panics
/// If `ids` has fewer than two tokens.
pub fn perplexity(model: &Llama, ids: &[u32]) -> Perplexity {
    let n = ids.len().max(2);
    perplexity_windows(model, ids, n, n)
}

/// Perplexity of `ids` with a sliding window (as transformers' perplexity guide): windows of
/// `window` tokens whose starts are `stride` apart; each window scores only the tokens that
/// earlier windows did not, with the rest of the window as context. A window at least as long
/// as `ids` is one pass ([`perplexity`]).
///
/// # Panics
/// If `ids` has fewer than two tokens, `window < 2` or `stride` is 0 or larger than `window`.
pub fn perplexity_windows(model: &Llama, ids: &[u32], window: usize, stride: usize) -> Perplexity {
    assert!(ids.len() >= 2, "perplexity needs at least two tokens");
    let (mut total, mut count) = (0.0, 0usize);
    for w in windows(ids.len(), window, stride) {
        let nll = token_nlls(model, &ids[w.begin..w.end]);
        total += nll[w.skip..].iter().sum::<f64>();
        count += nll.len() - w.skip;
    }
    let nll = total / count as f64;
    Perplexity {
        nll,
        ppl: nll.exp(),
        tokens: count,
    }
}

/// One window of a sliding-window evaluation: tokens `begin..end`, whose positions `skip..`
/// (counted from `begin`, up to the last but one) predict tokens no earlier window scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Window {
    pub begin: usize,
    pub end: usize,
    pub skip: usize,
}

/// The windows of [`perplexity_windows`] over `len` tokens: one window when `window` covers
/// them all.
///
/// # Panics
/// If `len < 2`, `window < 2` or `stride` is 0 or larger than `window`.
pub(crate) fn windows(len: usize, window: usize, stride: usize) -> Vec<Window> {
    assert!(len >= 2, "perplexity needs at least two tokens");
    assert!(
        window >= 2 && stride >= 1 && stride <= window,
        "bad window/stride"
    );
    let mut v = Vec::new();
    // Tokens 1.. are predicted; `scored` is how many of them are done.
    let (mut scored, mut begin) = (0, 0);
    while scored < len - 1 {
        let end = (begin + window).min(len);
        v.push(Window {
            begin,
            end,
            skip: scored.saturating_sub(begin),
        });
        scored = end - 1;
        begin += stride;
    }
    v
}

/// The logits of `ids [batch, seq]` on the host, `[batch·seq, vocab]` row-major: as
/// [`Llama::forward`], made in blocks of positions that each fit one buffer of the device.
pub fn host_logits(model: &Llama, ids: Tensor<2, Int>) -> Vec<f32> {
    let hidden = model.hidden_states(ids);
    let [b, s, _] = hidden.dims();
    let rows = rows_per_buffer(&hidden.device(), model.config.vocab_size);
    row_chunks(0, b * s, rows)
        .flat_map(|(start, m)| host_f32(&model.head(positions(&hidden, start, m))))
        .collect()
}

/// The NLL of each token of `ids` after the first, given the ones before it.
fn token_nlls(model: &Llama, ids: &[u32]) -> Vec<f64> {
    let device = model.embed_tokens.device();
    let n = ids.len();
    let hidden = model.hidden_states(token_ids(ids, [1, n], &device));
    let mut v = Vec::with_capacity(n - 1);
    for (start, m) in row_chunks(0, n - 1, logit_rows(model)) {
        let logp = log_probs(model, hidden.clone().narrow(1, start, m));
        v.extend(nlls(&logp, &ids[start + 1..start + 1 + m]));
    }
    v
}

/// Positions whose logits are alive at once: `[ROWS, vocab]` (100 MB for a 49,152-token
/// vocabulary, 260 MB for 128,256) instead of a whole window's.
const ROWS: usize = 512;

/// Positions whose logits `model` makes at once: [`ROWS`], or fewer where one buffer of its
/// device holds fewer rows.
pub(crate) fn logit_rows(model: &Llama) -> usize {
    rows_per_buffer(&model.embed_tokens.device(), model.config.vocab_size).min(ROWS)
}

/// Positions `start..start + m` of `hidden [b, s, width]`, counted row-major over the batch, as
/// `[1, m, width]`; `hidden` itself (no copy) when they are all of them.
pub(crate) fn positions(hidden: &Tensor<3>, start: usize, m: usize) -> Tensor<3> {
    let [b, s, width] = hidden.dims();
    match m == b * s {
        true => hidden.clone(),
        false => hidden
            .clone()
            .reshape([1, b * s, width])
            .narrow(1, start, m),
    }
}

/// Positions `from..to` in chunks of at most `rows`: `(start, len)`.
pub(crate) fn row_chunks(
    from: usize,
    to: usize,
    rows: usize,
) -> impl Iterator<Item = (usize, usize)> {
    let rows = rows.max(1);
    (from..to).step_by(rows).map(move |s| (s, rows.min(to - s)))
}

/// Next-token log-probabilities `[b·m, vocab]` from final normalized hidden states `[b, m,
/// hidden]`.
pub(crate) fn log_probs(model: &Llama, normed: Tensor<3>) -> Tensor<2> {
    let [b, m, _] = normed.dims();
    let logits = model.head(normed);
    let vocab = logits.dims()[2];
    log_softmax(logits.reshape([b * m, vocab]), 1)
}

/// The NLL of `targets` (one per row) under [`log_probs`].
pub(crate) fn nlls(logp: &Tensor<2>, targets: &[u32]) -> Vec<f64> {
    let targets = token_ids(targets, [targets.len(), 1], &logp.device());
    host_f64(logp.clone().gather(1, targets))
        .into_iter()
        .map(|x| -x)
        .collect()
}

/// A tensor's values on the host, as `f64`.
pub(crate) fn host_f64<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32")
        .into_iter()
        .map(f64::from)
        .collect()
}

/// Token ids as an int tensor of `shape` (row-major) on `device`.
///
/// # Panics
/// If `shape` does not hold `ids.len()` elements.
pub fn token_ids(ids: &[u32], shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    let v: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}
