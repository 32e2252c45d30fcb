//! Evaluation: next-token negative log-likelihood and perplexity.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

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
    assert!(ids.len() >= 2, "perplexity needs at least two tokens");
    let v = token_nlls(model, ids);
    let nll = v.iter().sum::<f64>() / v.len() as f64;
    Perplexity {
        nll,
        ppl: nll.exp(),
        tokens: v.len(),
    }
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
    assert!(
        window >= 2 && stride >= 1 && stride <= window,
        "bad window/stride"
    );
    if window >= ids.len() {
        return perplexity(model, ids);
    }
    let (mut total, mut count) = (0.0, 0usize);
    // Tokens 1.. are predicted; `scored` is how many of them are done.
    let mut scored = 0;
    let mut begin = 0;
    while scored < ids.len() - 1 {
        let end = (begin + window).min(ids.len());
        let nll = token_nlls(model, &ids[begin..end]);
        // Position j of the window predicts token begin + j + 1.
        let skip = scored.saturating_sub(begin);
        for &x in &nll[skip..] {
            total += x;
            count += 1;
        }
        scored = end - 1;
        if end == ids.len() {
            break;
        }
        begin += stride;
    }
    let nll = total / count as f64;
    Perplexity {
        nll,
        ppl: nll.exp(),
        tokens: count,
    }
}

/// The NLL of each token of `ids` after the first, given the ones before it.
fn token_nlls(model: &Llama, ids: &[u32]) -> Vec<f64> {
    let device = model.embed_tokens.device();
    let n = ids.len();
    let input = token_ids(ids, [1, n], &device);
    let hidden = model.hidden_states(input).narrow(1, 0, n - 1);
    let logits = model.head(hidden);
    let vocab = logits.dims()[2];
    let logp = log_softmax(logits.reshape([n - 1, vocab]), 1);
    let targets = token_ids(&ids[1..], [n - 1, 1], &device);
    logp.gather(1, targets)
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32")
        .into_iter()
        .map(|x| -f64::from(x))
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
