//! Per-matrix LoftQ: time and error of randomized vs exact SVD, in the same run.

use burn::tensor::{Tensor, TensorData};
use loftq_core::lowrank::{Gaussian, RsvdConfig, SvdMethod};
use loftq_core::transfers::{Transfers, transfers};
use loftq_core::{DeviceSpec, LoftqConfig, QuantConfig, loftq};
use serde::Serialize;

use crate::stats::{self, Memory, Timing};

/// What to measure.
#[derive(Clone, Debug)]
pub struct LoftqArgs {
    /// `[out, in]` shapes.
    pub shapes: Vec<[usize; 2]>,
    /// NF bit widths.
    pub bits: Vec<u8>,
    /// LoRA ranks.
    pub ranks: Vec<usize>,
    /// Iteration counts.
    pub iters: Vec<usize>,
    /// Also run the exact SVD (once per case: minutes on large matrices).
    pub exact: bool,
    /// Timed repeats of the randomized runs, after one warm-up.
    pub repeats: usize,
    /// The randomized SVD's parameters.
    pub rsvd: RsvdConfig,
}

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
    /// Wall time of `loftq()`: median of the repeats (randomized) or one run (exact).
    pub seconds: f64,
    /// Median, min and max over the repeats.
    pub timing: Timing,
    /// Peak resident memory during the case, and the memory before it.
    pub memory: Memory,
    /// `‖W − Q − s·B·A‖ / ‖W‖` of the result.
    pub rel_err: f32,
    /// `‖W − Q(W)‖ / ‖W‖` (plain quantization).
    pub rel_err_quant: f32,
    /// Host–device reads and uploads of one run (on a GPU each read waits for the device).
    pub transfers: Transfers,
}

/// Runs every combination of the given axes on Gaussian weights (std 0.02) on `spec`.
pub fn run(args: &LoftqArgs, spec: DeviceSpec) -> Vec<LoftqCase> {
    let device = spec.device().expect("device");
    let mut cases = Vec::new();
    for &shape in &args.shapes {
        let mut g = Gaussian::new(shape[0] as u64 * 31 + shape[1] as u64);
        let data: Vec<f32> = (0..shape[0] * shape[1])
            .map(|_| g.normal() as f32 * 0.02)
            .collect();
        let w = Tensor::<2>::from_data(TensorData::new(data, shape), &device);
        let mut methods = vec![("randomized", SvdMethod::Randomized(args.rsvd))];
        if args.exact {
            methods.push(("exact", SvdMethod::Exact));
        }
        for &b in &args.bits {
            for &rank in &args.ranks {
                for &t in &args.iters {
                    for &(name, svd) in &methods {
                        let cfg = LoftqConfig {
                            svd,
                            ..LoftqConfig::new(QuantConfig::nf(b), rank, t)
                        };
                        let mut result = None;
                        let mut moved = Transfers::default();
                        let repeats = if name == "exact" { 0 } else { args.repeats };
                        let (timing, memory) = stats::measure(repeats, || {
                            let before = transfers();
                            let r = loftq(&w, &cfg).expect("loftq");
                            let _ = r.lora_a.to_data();
                            moved = transfers() - before;
                            result = Some(r);
                        });
                        let r = result.expect("one run");
                        eprintln!(
                            "{}x{} nf{b} r{rank} T{t} {name}: {:.2} s ({:.2}–{:.2}), err {:.4}, \
                             {} reads ({} values)",
                            shape[0],
                            shape[1],
                            timing.median_s,
                            timing.min_s,
                            timing.max_s,
                            r.rel_err(),
                            moved.reads,
                            moved.read_values
                        );
                        cases.push(LoftqCase {
                            shape,
                            quantizer: cfg.quant.label(),
                            rank,
                            iters: t,
                            svd: name.to_string(),
                            seconds: timing.median_s,
                            timing,
                            memory,
                            rel_err: r.rel_err(),
                            rel_err_quant: r.rel_err_quant,
                            transfers: moved,
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
        "| shape | quantizer | r | T | ‖W−Q‖/‖W‖ | randomized: time (min–max), error | host reads (values) | exact: time, error | speed-up | error ratio |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
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
            "| {}×{} | {} | {} | {} | {:.4} | {:.2} s ({:.2}–{:.2}), {:.4} | {} ({}) | {ex_cell} | {speed} | {ratio} |\n",
            c.shape[0],
            c.shape[1],
            c.quantizer,
            c.rank,
            c.iters,
            c.rel_err_quant,
            c.seconds,
            c.timing.min_s,
            c.timing.max_s,
            c.rel_err,
            c.transfers.reads,
            c.transfers.read_values
        ));
    }
    s
}
