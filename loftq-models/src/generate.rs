//! Text generation: incremental decoding over a [`KvCache`] and the usual samplers (greedy,
//! temperature, top-k, top-p), seeded.

use std::time::{Duration, Instant};

use loftq_core::lowrank::Gaussian;
use loftq_core::quant::host_f32;

use crate::eval::token_ids;
use crate::nn::{KvCache, Llama};
use crate::{ModelError, Result};

/// How the next token is drawn from the logits.
///
/// In the order of transformers' sampling: the logits are divided by the temperature, then
/// only the `top_k` most likely tokens are kept, then the smallest set of most likely tokens
/// whose probability reaches `top_p`; the token is drawn from what remains.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// `0`: greedy (the most likely token, the first on ties, as llama.cpp's greedy sampler).
    pub temperature: f64,
    /// Keep only this many tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the fewest tokens whose probability sums to at least this (`None`: all).
    pub top_p: Option<f64>,
    /// Seed of the draws: the same seed, model and prompt give the same text.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

/// Draws tokens from logits by [`SamplingParams`].
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Gaussian,
}

impl Sampler {
    /// A sampler whose draws follow `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = Gaussian::new(params.seed);
        Self { params, rng }
    }

    /// The next token from the logits of one position.
    ///
    /// # Panics
    /// If `logits` is empty.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        assert!(!logits.is_empty(), "no logits to sample from");
        let p = &self.params;
        if p.temperature <= 0.0 || p.top_k == Some(1) {
            return argmax(logits);
        }
        // Candidates by decreasing logit (index order on ties), then cut.
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        if let Some(k) = p.top_k {
            order.truncate(k.max(1));
        }
        let top = f64::from(logits[order[0] as usize]);
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((f64::from(logits[i as usize]) - top) / p.temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if let Some(top_p) = p.top_p {
            let mut sum = 0.0;
            let keep = probs
                .iter()
                .position(|&x| {
                    sum += x;
                    sum >= top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.uniform() * total;
        for (&id, &x) in order.iter().zip(&probs) {
            if u < x {
                return id;
            }
            u -= x;
        }
        order[probs.len() - 1]
    }
}

/// The index of the largest logit, the first on ties.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// What to generate.
#[derive(Clone, Debug, Default)]
pub struct GenerateParams {
    /// New tokens at most.
    pub max_new_tokens: usize,
    /// How each token is drawn.
    pub sampling: SamplingParams,
    /// Tokens that end the text (end of sequence, end of turn); not part of the output.
    pub stop: Vec<u32>,
}

/// A generated text and how long it took.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The new tokens (without the stop token).
    pub ids: Vec<u32>,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Whether a stop token ended the text (else the token budget or the context did).
    pub stopped: bool,
    /// The prompt's forward pass and the first token.
    pub prefill: Duration,
    /// Every later token.
    pub decode: Duration,
}

impl Generation {
    /// Prompt tokens per second of the prefill.
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second after the first.
    pub fn decode_tokens_per_second(&self) -> f64 {
        let after_first = self.ids.len().saturating_sub(1) + usize::from(self.stopped);
        after_first as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// Generates from `prompt` (at least one token), handing each new token to `on_token` as it
/// comes. Stops at a stop token, after `max_new_tokens`, or at the model's context length.
///
/// # Errors
/// [`ModelError::Data`] for an empty prompt or one that fills the context already.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    params: &GenerateParams,
    on_token: &mut dyn FnMut(u32),
) -> Result<Generation> {
    let context = model.config.max_position_embeddings;
    if prompt.is_empty() {
        return Err(ModelError::Data("the prompt has no token".into()));
    }
    if prompt.len() >= context {
        return Err(ModelError::Data(format!(
            "the prompt has {} tokens; the model's context holds {context}",
            prompt.len()
        )));
    }
    let device = model.embed_tokens.device();
    let mut sampler = Sampler::new(params.sampling.clone());
    let mut cache = KvCache::new();
    let mut out = Generation {
        ids: Vec::new(),
        prompt_tokens: prompt.len(),
        stopped: false,
        prefill: Duration::ZERO,
        decode: Duration::ZERO,
    };
    let mut input = prompt.to_vec();
    let started = Instant::now();
    while out.ids.len() < params.max_new_tokens {
        let n = input.len();
        let logits = model.forward_cached(token_ids(&input, [1, n], &device), &mut cache);
        let next = sampler.sample(&host_f32(&logits));
        if out.ids.is_empty() {
            // The prompt's pass and the first token.
            out.prefill = started.elapsed();
        }
        if params.stop.contains(&next) {
            out.stopped = true;
            break;
        }
        out.ids.push(next);
        on_token(next);
        if cache.len() + 1 >= context {
            break;
        }
        input = vec![next];
    }
    out.decode = started.elapsed().saturating_sub(out.prefill);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(params: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(params);
        (0..n).map(|_| s.sample(logits)).collect()
    }

    #[test]
    fn greedy_takes_the_first_largest() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        let g = draws(SamplingParams::default(), &[0.0, 2.0, 1.0], 3);
        assert_eq!(g, [1, 1, 1]);
    }

    #[test]
    fn top_k_and_top_p_keep_the_likely_tokens() {
        let logits = [0.0, 3.0, 2.9, -5.0, 2.8];
        let warm = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..SamplingParams::default()
        };
        let k2 = draws(
            SamplingParams {
                top_k: Some(2),
                ..warm.clone()
            },
            &logits,
            400,
        );
        assert!(k2.iter().all(|&t| t == 1 || t == 2));
        assert!(k2.contains(&1) && k2.contains(&2));
        // p(1) ≈ 0.36: top-p 0.3 keeps token 1 alone.
        let p = draws(
            SamplingParams {
                top_p: Some(0.3),
                ..warm.clone()
            },
            &logits,
            50,
        );
        assert!(p.iter().all(|&t| t == 1));
        // The same seed draws the same tokens; the frequencies follow the softmax.
        let a = draws(warm.clone(), &logits, 4000);
        assert_eq!(a, draws(warm, &logits, 4000));
        let freq = a.iter().filter(|&&t| t == 0).count() as f64 / 4000.0;
        let e: Vec<f64> = logits.iter().map(|&x| f64::from(x).exp()).collect();
        let want = e[0] / e.iter().sum::<f64>();
        assert!((freq - want).abs() < 0.02, "{freq} vs {want}");
    }
}
