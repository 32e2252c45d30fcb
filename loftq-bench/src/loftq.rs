//! Per-matrix LoftQ: time and error of randomized vs exact SVD, in the same run.

use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use loftq_core::lowrank::{Gaussian, RsvdConfig, SvdMethod};
use loftq_core::{DeviceSpec, LoftqConfig, QuantConfig, loftq};
use serde::Serialize;

/// One measured case.
#[derive(Debug, Serialize)]
pub struct LoftqCase {
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// Quantizer label.
    pub quantizer: String,
    /// LoRA rank.
    pub rank: usize,
    /// Iterations.
    pub iters: usize,
    /// `exact` or `randomized`.
    pub svd: String,
    /// Wall time of `loftq()` (one run after a warm-up of the same shape).
    pub seconds: f64,
    /// `‖W − Q − s·B·A‖ / ‖W‖` of the result.
    pub rel_err: f32,
    /// `‖W − Q(W)‖ / ‖W‖` (plain quantization).
    pub rel_err_quant: f32,
}

/// Runs every combination of the given axes on Gaussian weights (std 0.02) on `spec`.
pub fn run(
    shapes: &[[usize; 2]],
    bits: &[u8],
    ranks: &[usize],
    iters: &[usize],
    exact: bool,
    spec: DeviceSpec,
) -> Vec<LoftqCase> {
    let device = spec.device().expect("device");
    let mut cases = Vec::new();
    for &shape in shapes {
        let mut g = Gaussian::new(shape[0] as u64 * 31 + shape[1] as u64);
        let data: Vec<f32> = (0..shape[0] * shape[1])
            .map(|_| g.normal() as f32 * 0.02)
            .collect();
        let w = Tensor::<2>::from_data(TensorData::new(data, shape), &device);
        // Warm-up: first use of the device and of the kernels.
        let _ = loftq(&w, &LoftqConfig::new(QuantConfig::nf4(), 8, 1));
        for &b in bits {
            for &rank in ranks {
                for &t in iters {
                    let methods: &[(&str, SvdMethod)] = if exact {
                        &[
                            ("randomized", SvdMethod::Randomized(RsvdConfig::default())),
                            ("exact", SvdMethod::Exact),
                        ]
                    } else {
                        &[("randomized", SvdMethod::Randomized(RsvdConfig::default()))]
                    };
                    for (name, svd) in methods {
                        let cfg = LoftqConfig {
                            svd: *svd,
                            ..LoftqConfig::new(QuantConfig::nf(b), rank, t)
                        };
                        let start = Instant::now();
                        let r = loftq(&w, &cfg).expect("loftq");
                        let _ = r.lora_a.to_data();
                        let seconds = start.elapsed().as_secs_f64();
                        eprintln!(
                            "{}x{} nf{b} r{rank} T{t} {name}: {seconds:.2} s, err {:.4}",
                            shape[0],
                            shape[1],
                            r.rel_err()
                        );
                        cases.push(LoftqCase {
                            shape,
                            quantizer: cfg.quant.label(),
                            rank,
                            iters: t,
                            svd: name.to_string(),
                            seconds,
                            rel_err: r.rel_err(),
                            rel_err_quant: r.rel_err_quant,
                        });
                    }
                }
            }
        }
    }
    cases
}

/// Markdown table with the randomized/exact ratios where both ran.
pub fn markdown(cases: &[LoftqCase]) -> String {
    let mut s = String::from(
        "| shape | quantizer | r | T | ‖W−Q‖/‖W‖ | randomized: time, error | exact: time, error | speed-up | error ratio |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for c in cases.iter().filter(|c| c.svd == "randomized") {
        let ex = cases.iter().find(|e| {
            e.svd == "exact"
                && e.shape == c.shape
                && e.quantizer == c.quantizer
                && e.rank == c.rank
                && e.iters == c.iters
        });
        let (ex_cell, speed, ratio) = match ex {
            Some(e) => (
                format!("{:.2} s, {:.4}", e.seconds, e.rel_err),
                format!("{:.0}×", e.seconds / c.seconds),
                format!("{:.4}", c.rel_err / e.rel_err),
            ),
            None => ("–".into(), "–".into(), "–".into()),
        };
        s.push_str(&format!(
            "| {}×{} | {} | {} | {} | {:.4} | {:.2} s, {:.4} | {ex_cell} | {speed} | {ratio} |\n",
            c.shape[0],
            c.shape[1],
            c.quantizer,
            c.rank,
            c.iters,
            c.rel_err_quant,
            c.seconds,
            c.rel_err
        ));
    }
    s
}
