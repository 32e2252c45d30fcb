//! `--avg-bits --sensitivity`: how much the model's loss on the calibration text cares about
//! each linear layer's outputs, so that the allocator weighs the layers' output errors by it
//! instead of summing them as they are.
//!
//! A perturbation `ΔY = X·ΔWᵀ` of a layer's outputs raises the loss by about
//! `½·tr(ΔY·G·ΔYᵀ)`, `G` the second moment of the loss's gradient with respect to those
//! outputs. Taking `G ≈ γ·I` (as K-FAC takes it apart from the inputs' `H = XᵀX`), the raise is
//! `½·γ·‖ΔW·S‖²` with `S·Sᵀ = H`: the error the scores already hold, times `γ`. Errors in the
//! first layers pass through every later one and, at the same size, cost the loss far more
//! than in the last; summed unweighted, they look cheapest.
//!
//! `γ` is estimated without per-token gradients: with a fresh adapter (`B = 0`, `A` uniform in
//! `±1/√in`, scaling 1), `∂L/∂B = (∂L/∂W)·Aᵀ`, so `E‖∂L/∂B‖² = r·‖∂L/∂W‖²/(3·in)`; summed over the
//! calibration sequences, `Σ‖∂L/∂W‖² ≈ tr(G)·tr(H)` (the empirical Fisher information of `W`),
//! and `γ = tr(G)/out`.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::Device;
use loftq_core::quant::host_f32;

use crate::config::linear_path;
use crate::eval::token_ids;
use crate::nn::{Llama, load_pretrained};
use crate::train::{Batch, Recompute, loss_and_grads};
use crate::{ModelError, Result};

/// The fresh adapters' rank: enough directions for a steady estimate of `‖∂L/∂W‖²`.
const RANK: usize = 8;

/// `γ` of every decoder linear layer of `model` on the calibration sequences `ids` (whole
/// sequences of `seq` tokens), by module path (`model.layers.0.self_attn.q_proj`). Holds the
/// whole model, and for each sequence one backward pass (layer by layer, recomputed).
///
/// # Errors
/// A model that cannot be loaded; a sensitivity that is not finite and positive.
pub(super) fn sensitivities(
    model: &Path,
    ids: &[u32],
    seq: usize,
    seed: u64,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<HashMap<String, f64>> {
    let mut llama = load_pretrained(model, None, device)?;
    llama.add_lora(RANK, 1.0, 0.0, seed, |_| true);
    let layers = layer_linears(&llama);
    let (db, energy) = sums(&llama, ids, seq, device, progress);
    // Σ‖∂L/∂W‖² from Σ‖∂L/∂B‖².
    let fisher: Vec<f64> = (db.iter().zip(&layers))
        .map(|(d, item)| d * 3.0 * item.shape[1] as f64 / RANK as f64)
        .collect();
    let mut out = HashMap::with_capacity(layers.len());
    for (item, f) in layers.into_iter().zip(fisher) {
        let gamma = f / energy[item.layer][item.group] / item.shape[0] as f64;
        if !(gamma.is_finite() && gamma > 0.0) {
            return Err(ModelError::Data(format!(
                "{}: the loss's sensitivity to its outputs is {gamma} (a layer the loss does \
                 not reach, or NaN activations)",
                item.path
            )));
        }
        out.insert(item.path, gamma);
    }
    Ok(out)
}

/// `Σ‖∂L/∂B‖²` of every adapter of `llama` (in [`layer_linears`] order) and the inputs'
/// `Σ‖x‖²` of every decoder layer's four input groups, over the sequences of `seq` tokens in
/// `ids`.
fn sums(
    llama: &Llama,
    ids: &[u32],
    seq: usize,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> (Vec<f64>, Vec<[f64; 4]>) {
    let linears: usize = llama.layers.iter().map(|l| l.linears().len()).sum();
    let mut db = vec![0.0f64; linears];
    let mut energy = vec![[0.0f64; 4]; llama.layers.len()];
    let rope = llama.rope(seq);
    let sequences = ids.len() / seq;
    for (n, ids) in ids.chunks_exact(seq).enumerate() {
        let batch = Batch {
            ids: ids.to_vec(),
            batch: 1,
            seq,
        };
        let step = loss_and_grads(llama, &batch, Recompute::Layers);
        // `[dA, dB]` per adapted layer.
        for (d, pair) in db.iter_mut().zip(step.grads.chunks(2)) {
            *d += sum_squares(&host_f32(&pair[1]));
        }
        let mut x = llama.embed(token_ids(ids, [1, seq], device));
        for (l, layer) in llama.layers.iter().enumerate() {
            x = layer.forward_observed(x, &rope, &mut |g, t| {
                energy[l][g] += sum_squares(&host_f32(&t));
            });
        }
        progress(n + 1, sequences);
    }
    (db, energy)
}

/// A decoder linear layer: its module path, decoder layer, input group and `[out, in]`.
struct LayerLinear {
    path: String,
    layer: usize,
    group: usize,
    shape: [usize; 2],
}

/// Every decoder linear layer of `llama`, in [`Llama::lora_params`] order.
fn layer_linears(llama: &Llama) -> Vec<LayerLinear> {
    let mut v = Vec::new();
    for (l, layer) in llama.layers.iter().enumerate() {
        let named = layer.linear_paths().iter().zip(layer.input_groups());
        for ((name, &group), lin) in named.zip(layer.linears()) {
            v.push(LayerLinear {
                path: linear_path(l, name),
                layer: l,
                group,
                shape: lin.shape(),
            });
        }
    }
    v
}

fn sum_squares(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x).powi(2)).sum()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The tiny Llama's directory, the device, and 2 sequences of 8 token ids.
    fn tiny() -> (std::path::PathBuf, Device, Vec<u32>) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let ids = (0..16u32).map(|i| (i * 37 + 5) % 256).collect();
        (dir, Device::default(), ids)
    }

    /// The estimate of `Σ‖∂L/∂W‖²` from random rank-8 adapters against its exact value, from
    /// adapters whose `A` is the identity (`∂L/∂B = ∂L/∂W`): the constant `3·in/r` is right
    /// on average over the layers (a wrong one is off by its own factor).
    #[test]
    fn random_adapters_estimate_the_weight_gradients() {
        let (dir, device, ids) = tiny();
        let mut llama = load_pretrained(&dir, None, &device).unwrap();
        llama.add_lora(RANK, 1.0, 0.0, 0, |_| true);
        let layers = layer_linears(&llama);
        let (db, _) = sums(&llama, &ids, 8, &device, &mut |_, _| {});
        let mut exact = load_pretrained(&dir, None, &device).unwrap();
        let width = 64;
        exact.add_lora(width, 1.0, 0.0, 0, |_| true);
        let params = (exact.lora_params().chunks(2))
            .flat_map(|p| match p[0].dims()[1] == width {
                true => [burn::tensor::Tensor::eye(width, &device), p[1].clone()],
                false => [p[0].clone(), p[1].clone()],
            })
            .collect();
        exact.set_lora_params(params);
        let (dw, _) = sums(&exact, &ids, 8, &device, &mut |_, _| {});
        // down_proj (128 inputs) has no identity of rank 64: left out.
        let ratios: Vec<f64> = (layers.iter().zip(db.iter().zip(&dw)))
            .filter(|(item, _)| item.shape[1] == width)
            .map(|(item, (d, w))| d * 3.0 * item.shape[1] as f64 / RANK as f64 / w)
            .collect();
        assert_eq!(ratios.len(), 12);
        let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
        assert!((0.6..1.6).contains(&mean), "estimate / exact: {ratios:?}");
    }

    /// One finite, positive `γ` per decoder linear layer of the tiny Llama, a per-token
    /// average: the same text twice gives the same `γ`.
    #[test]
    fn one_positive_sensitivity_per_layer_independent_of_repetition() {
        let (dir, device, ids) = tiny();
        let twice: Vec<u32> = ids.iter().chain(&ids).copied().collect();
        let gammas = |ids: &[u32]| sensitivities(&dir, ids, 8, 0, &device, &mut |_, _| {});
        let (once, twice) = (gammas(&ids).unwrap(), gammas(&twice).unwrap());
        // 2 layers of q/k/v/o and gate/up/down.
        assert_eq!(once.len(), 14);
        for (path, g) in &once {
            assert!(g.is_finite() && *g > 0.0, "{path}: {g}");
            let t = twice[path];
            assert!((t - g).abs() <= 1e-9 * g, "{path}: {g} once, {t} twice");
        }
    }
}
