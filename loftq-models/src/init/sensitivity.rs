//! `--sensitivity`: how much the model's loss on the calibration text cares about each output
//! of each linear layer, so that the calibrated fits weigh the output rows by it (and the
//! allocator the matrices) instead of counting every output alike.
//!
//! A perturbation `ΔY = X·ΔWᵀ` of a layer's outputs raises the loss by about
//! `½·tr(ΔY·G·ΔYᵀ)`, `G` the second moment of the loss's gradient with respect to those
//! outputs. Taking `G ≈ D` diagonal (as K-FAC takes it apart from the inputs' `H = XᵀX`; the
//! Fisher-weighted SVD's row weights), the raise is `½·‖D^{1/2}·ΔW·S‖²` with `S·Sᵀ = H`: the
//! calibrated objective with row weights ([`Objective`](loftq_core::calib::Objective)). Errors
//! in the first layers pass through every later one and cost the loss far more than in the
//! last; within a layer, some outputs matter far more than others.
//!
//! `D` is estimated without per-token gradients: with a fresh adapter (`B = 0`, `A` uniform in
//! `±1/√in`, scaling 1), row `i` of `∂L/∂B` is `(∂L/∂W)_i·Aᵀ`, so
//! `E‖(∂L/∂B)_i‖² = r·‖(∂L/∂W)_i‖²/(3·in)`; summed over the calibration sequences,
//! `Σ‖(∂L/∂W)_i‖² ≈ D_ii·tr(H)` (the empirical Fisher information of row `i`). Each sequence
//! gets adapters of its own: with one `A` for all, a matrix's estimate kept the error of its
//! `r` random directions however many sequences were summed (on SmolLM2, two seeds' per-matrix
//! means differed by 37% (standard deviation of the log ratio), against 9% with fresh ones).

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::Device;
use loftq_core::quant::host_f32;

use super::plan::module_of_weight;
use super::{Event, InitSpec, Sensitivity};
use crate::config::linear_path;
use crate::eval::token_ids;
use crate::io::write_atomic;
use crate::nn::{Llama, LoadOptions, load_pretrained_with};
use crate::train::{Batch, Recompute, loss_and_grads};
use crate::{ModelError, Result};

/// The fresh adapters' rank: enough directions for a steady estimate of each row's
/// `‖(∂L/∂W)_i‖²` (the sum over sequences averages the rest).
const RANK: usize = 8;

/// `D`'s diagonal of every decoder linear layer, by module path
/// (`model.layers.0.self_attn.q_proj`).
pub(super) type Rows = HashMap<String, Vec<f32>>;

const FILE: &str = "sensitivity.json";

/// The row weights `spec` asks for (`None` without a sensitivity), for the bit budget's
/// scores: read from the work area `work` when an interrupted run measured them, else
/// measured on the calibration tokens `ids` and saved there. By [`Sensitivity::Layers`] each
/// matrix's mean in every row ([`fitted`] then gives the fits none).
///
/// # Errors
/// As [`sensitivities`]; a damaged file in the work area.
pub(super) fn rows(
    spec: &InitSpec,
    work: &Path,
    ids: Option<&[u32]>,
    device: &Device,
    events: &mut dyn FnMut(Event),
) -> Result<Option<Rows>> {
    let (Some(c), Some(ids)) = (&spec.calibration, ids) else {
        return Ok(None);
    };
    let Some(by) = c.sensitivity else {
        return Ok(None);
    };
    let path = work.join(FILE);
    let rows: Rows = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| ModelError::format(&path, format!("bad sensitivities: {e}")))?,
        Err(_) => {
            let mut progress = |done, total| events(Event::Sensitivity { done, total });
            let rows = sensitivities(&spec.model, ids, c.seq, spec.seed, device, &mut progress)?;
            let json = serde_json::to_vec(&rows).expect("sensitivities serialize");
            write_atomic(&path, &json)?;
            rows
        }
    };
    Ok(Some(match by {
        Sensitivity::Rows => rows,
        Sensitivity::Layers => (rows.into_iter())
            .map(|(path, d)| {
                let mean = d.iter().map(|&v| f64::from(v)).sum::<f64>() / d.len().max(1) as f64;
                (path, vec![mean as f32; d.len()])
            })
            .collect(),
    }))
}

/// The row weights of [`rows`] that the fits take: all of them by [`Sensitivity::Rows`], none
/// by layers.
pub(super) fn fitted<'r>(spec: &InitSpec, rows: Option<&'r Rows>) -> Option<&'r Rows> {
    let by = spec.calibration.as_ref().and_then(|c| c.sensitivity);
    rows.filter(|_| by == Some(Sensitivity::Rows))
}

/// The row weights of the matrix `name` (`….weight`) in `rows`, if any.
///
/// # Errors
/// `rows` without this matrix, or with another number of rows than `out`.
pub(super) fn of<'r>(rows: Option<&'r Rows>, name: &str, out: usize) -> Result<Option<&'r [f32]>> {
    let Some(rows) = rows else { return Ok(None) };
    let path = module_of_weight(name).unwrap_or(name);
    match rows.get(path) {
        Some(r) if r.len() == out => Ok(Some(r)),
        _ => Err(ModelError::Data(format!(
            "{name}: no sensitivity for its {out} rows (damaged work area?)"
        ))),
    }
}

/// `D`'s diagonal (`Σ‖(∂L/∂W)_i‖² / tr(H)`) of every decoder linear layer of `model` on the
/// calibration sequences `ids` (whole sequences of `seq` tokens). Holds the whole model (its
/// decoder linear layers in NF8: a quarter of `f32`'s memory, gradients within a fraction of a
/// percent of the full-precision ones), and for each sequence one backward pass (layer by
/// layer, recomputed).
///
/// # Errors
/// A model that cannot be loaded; a layer whose sensitivity is not finite and positive.
pub(super) fn sensitivities(
    model: &Path,
    ids: &[u32],
    seq: usize,
    seed: u64,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Rows> {
    let mut llama = load(model, device)?;
    let layers = layer_linears(&llama);
    // `sums` gives each sequence adapters of its own.
    let (db, energy) = sums(&mut llama, ids, seq, Some(seed), device, progress);
    let mut out = HashMap::with_capacity(layers.len());
    for (item, rows) in layers.into_iter().zip(db) {
        // Σ‖(∂L/∂W)_i‖² from Σ‖(∂L/∂B)_i‖², over tr(H).
        let to_w = 3.0 * item.shape[1] as f64 / RANK as f64 / energy[item.layer][item.group];
        let d: Vec<f64> = rows.iter().map(|v| v * to_w).collect();
        let mean = d.iter().sum::<f64>() / d.len().max(1) as f64;
        if !(mean.is_finite() && mean > 0.0) {
            return Err(ModelError::Data(format!(
                "{}: the loss's sensitivity to its outputs is {mean} (a layer the loss does \
                 not reach, or NaN activations)",
                item.path
            )));
        }
        // A row the loss did not reach still gets a little weight: the fit divides by it.
        let floor = mean * 1e-6;
        out.insert(item.path, d.iter().map(|&v| v.max(floor) as f32).collect());
    }
    Ok(out)
}

/// `model` with its decoder linear layers quantized to NF8.
fn load(model: &Path, device: &Device) -> Result<Llama> {
    let opts = LoadOptions {
        quantize: Some(loftq_core::QuantConfig::nf(8)),
        adapter: None,
    };
    load_pretrained_with(model, device, &opts)
}

/// `Σ‖(∂L/∂B)_i‖²` of every row of every adapter of `llama` (in [`layer_linears`] order) and
/// the inputs' `Σ‖x‖²` of every decoder layer's four input groups, over the sequences of `seq`
/// tokens in `ids`. With `fresh`, each sequence gets fresh adapters of their own seed (from
/// `fresh`): with one `A` for all, a row's estimate `(∂L/∂W)_i·AᵀA·(∂L/∂W)_iᵀ` keeps the
/// error of those `r` directions whatever the number of sequences (about `√(2/r)`, 50% at
/// rank 8, where the gradients' directions repeat from one sequence to the next); with an `A`
/// per sequence the errors average out.
fn sums(
    llama: &mut Llama,
    ids: &[u32],
    seq: usize,
    fresh: Option<u64>,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> (Vec<Vec<f64>>, Vec<[f64; 4]>) {
    let mut db: Vec<Vec<f64>> = (llama.layers.iter())
        .flat_map(|l| l.linears().into_iter().map(|lin| vec![0.0; lin.shape()[0]]))
        .collect();
    let mut energy = vec![[0.0f64; 4]; llama.layers.len()];
    let rope = llama.rope(seq);
    let sequences = ids.len() / seq;
    for (n, ids) in ids.chunks_exact(seq).enumerate() {
        if let Some(seed) = fresh {
            let seed = seed ^ (n as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            llama.add_lora(RANK, 1.0, 0.0, seed, |_| true);
        }
        let llama = &*llama;
        let batch = Batch {
            ids: ids.to_vec(),
            batch: 1,
            seq,
        };
        let step = loss_and_grads(llama, &batch, Recompute::Layers);
        // `[dA, dB]` per adapted layer.
        for (d, pair) in db.iter_mut().zip(step.grads.chunks(2)) {
            // `∂L/∂B` is `[out, rank]`.
            let g = host_f32(&pair[1]);
            let rank = g.len() / d.len();
            for (d, row) in d.iter_mut().zip(g.chunks(rank)) {
                *d += sum_squares(row);
            }
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
    /// on average over the layers (a wrong one is off by its own factor), with one adapter for
    /// all sequences or fresh ones for each.
    #[test]
    fn random_adapters_estimate_the_weight_gradients() {
        let (dir, device, ids) = tiny();
        let mut llama = load(&dir, &device).unwrap();
        llama.add_lora(RANK, 1.0, 0.0, 0, |_| true);
        let layers = layer_linears(&llama);
        let (db, _) = sums(&mut llama, &ids, 8, None, &device, &mut |_, _| {});
        let mut exact = load(&dir, &device).unwrap();
        let width = 64;
        exact.add_lora(width, 1.0, 0.0, 0, |_| true);
        let params = (exact.lora_params().chunks(2))
            .flat_map(|p| match p[0].dims()[1] == width {
                true => [burn::tensor::Tensor::eye(width, &device), p[1].clone()],
                false => [p[0].clone(), p[1].clone()],
            })
            .collect();
        exact.set_lora_params(params);
        let (dw, _) = sums(&mut exact, &ids, 8, None, &device, &mut |_, _| {});
        // down_proj (128 inputs) has no identity of rank 64: left out.
        let to_w = |item: &LayerLinear| 3.0 * item.shape[1] as f64 / RANK as f64;
        let pairs: Vec<_> = (layers.iter())
            .zip(db.iter().zip(&dw))
            .filter(|(item, _)| item.shape[1] == width)
            .collect();
        assert_eq!(pairs.len(), 12);
        let ratios: Vec<f64> = (pairs.iter())
            .map(|(item, (d, w))| d.iter().sum::<f64>() * to_w(item) / w.iter().sum::<f64>())
            .collect();
        let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
        assert!((0.6..1.6).contains(&mean), "estimate / exact: {ratios:?}");
        // Row by row: the estimates follow the exact values (in logarithms, a correlation well
        // above chance).
        let (mut est, mut exact) = (Vec::new(), Vec::new());
        for (item, (d, w)) in &pairs {
            for (d, w) in d.iter().zip(w.iter()) {
                est.push((d * to_w(item)).ln());
                exact.push(w.ln());
            }
        }
        let r = correlation(&est, &exact);
        assert!(
            r > 0.9,
            "row estimates against exact values: correlation {r}"
        );
        // Fresh adapters for each sequence keep the constant.
        let (fresh, _) = sums(&mut llama, &ids, 8, Some(0), &device, &mut |_, _| {});
        let ratios: Vec<f64> = (layers.iter().zip(fresh.iter().zip(&dw)))
            .filter(|(item, _)| item.shape[1] == width)
            .map(|(item, (d, w))| d.iter().sum::<f64>() * to_w(item) / w.iter().sum::<f64>())
            .collect();
        let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
        assert!((0.6..1.6).contains(&mean), "fresh adapters: {ratios:?}");
    }

    fn correlation(x: &[f64], y: &[f64]) -> f64 {
        let n = x.len() as f64;
        let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
        let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
        let sx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum::<f64>().sqrt();
        let sy: f64 = y.iter().map(|b| (b - my).powi(2)).sum::<f64>().sqrt();
        cov / (sx * sy)
    }

    /// One finite, positive weight per output row of every decoder linear layer of the tiny
    /// Llama, a per-token average: the same text twice gives the same weights but for the
    /// probes' noise (the second pass has adapters of its own; a sum instead of an average
    /// would double them).
    #[test]
    fn one_positive_weight_per_row_independent_of_repetition() {
        let (dir, device, _) = tiny();
        // 16 sequences, so that the probes' noise averages out.
        let ids: Vec<u32> = (0..128u32).map(|i| (i * 37 + 5) % 256).collect();
        let twice: Vec<u32> = ids.iter().chain(&ids).copied().collect();
        let rows = |ids: &[u32]| sensitivities(&dir, ids, 8, 0, &device, &mut |_, _| {});
        let (once, twice) = (rows(&ids).unwrap(), rows(&twice).unwrap());
        // 2 layers of q/k/v/o and gate/up/down.
        assert_eq!(once.len(), 14);
        for (path, d) in &once {
            // hidden 64, intermediate 128, as many key/value heads as heads.
            let wide = path.ends_with("gate_proj") || path.ends_with("up_proj");
            let out = if wide { 128 } else { 64 };
            assert_eq!(d.len(), out, "{path}");
            for g in d {
                assert!(g.is_finite() && *g > 0.0, "{path}: {g}");
            }
            let mean = |d: &[f32]| d.iter().map(|&v| f64::from(v)).sum::<f64>() / d.len() as f64;
            let ratio = mean(&twice[path]) / mean(d);
            assert!((0.8..1.25).contains(&ratio), "{path}: twice / once {ratio}");
        }
    }
}
