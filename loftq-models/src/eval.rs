//! Evaluation: next-token negative log-likelihood and perplexity.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};

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
    let device = model.embed_tokens.device();
    let n = ids.len();
    let input: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let input: Tensor<2, Int> = Tensor::from_data(TensorData::new(input, [1, n]), &device);
    let logits = model.forward(input);
    let vocab = logits.dims()[2];
    let logp = log_softmax(logits.reshape([n, vocab]).narrow(0, 0, n - 1), 1);
    let targets: Vec<i32> = ids[1..].iter().map(|&i| i as i32).collect();
    let targets: Tensor<2, Int> = Tensor::from_data(TensorData::new(targets, [n - 1, 1]), &device);
    let picked = logp.gather(1, targets);
    let v = picked
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32");
    let nll = -v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
    Perplexity {
        nll,
        ppl: nll.exp(),
        tokens: v.len(),
    }
}
