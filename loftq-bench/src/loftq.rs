//! Per-matrix LoftQ: time and error of randomized vs exact SVD, in the same run.

use burn::tensor::{Tensor, TensorData};
use loftq_core::lowrank::{Gaussian, RsvdConfig, SvdMethod};
use loftq_core::transfers::{Transfers, transfers};
use loftq_core::{DeviceSpec, LoftqConfig, LoftqResult, QuantConfig, loftq, loftq_batch};
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
    /// Above 1: also run this many matrices of each shape as one `loftq_batch` against as
    /// many `loftq` calls, in the same run.
    pub batch: usize,
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
    /// `exact`, `randomized`, or for `--batch B` `batch of B` and `B one at a time`
    /// (randomized; times and errors per matrix, transfers of all B).
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

/// A `[rows, cols]` matrix of Gaussian weights (std 0.02) from `seed`.
pub(crate) fn gaussian_matrix(
    [rows, cols]: [usize; 2],
    seed: u64,
    device: &burn::tensor::Device,
) -> Tensor<2> {
    let v: Vec<f32> = Gaussian::new(seed)
        .values(rows * cols)
        .into_iter()
        .map(|x| x * 0.02)
        .collect();
    Tensor::from_data(TensorData::new(v, [rows, cols]), device)
}

/// Runs every combination of the given axes on Gaussian weights (std 0.02) on `spec`.
pub fn run(args: &LoftqArgs, spec: DeviceSpec) -> Vec<LoftqCase> {
    let device = spec.device().expect("device");
    let mut cases = Vec::new();
    for &shape in &args.shapes {
        let w = gaussian_matrix(shape, shape[0] as u64 * 31 + shape[1] as u64, &device);
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
                            // A run ends when its device is idle (cubecl's profiler, when on,
                            // also prints the run's kernels then).
                            device.sync().expect("the device finishes the run");
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
                        stats::report_profile(&format!(
                            "{}x{} nf{b} r{rank} T{t} {name}",
                            shape[0], shape[1]
                        ));
                        if name == "randomized" && args.batch > 1 {
                            cases.extend(batch_cases(&w, &cfg, args));
                        }
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

/// `args.batch` matrices like `w` (other seeds) as one [`loftq_batch`] and one at a time: time
/// per matrix, the mean error, and the reads of all of them.
fn batch_cases(w: &Tensor<2>, cfg: &LoftqConfig, args: &LoftqArgs) -> Vec<LoftqCase> {
    let shape: [usize; 2] = w.dims();
    let b = args.batch;
    let ws: Vec<Tensor<2>> = (0..b)
        .map(|i| gaussian_matrix(shape, 1000 + i as u64, &w.device()))
        .collect();
    let cfgs: Vec<LoftqConfig> = (0..b)
        .map(|i| LoftqConfig {
            svd: cfg.svd.with_seed(i as u64),
            ..cfg.clone()
        })
        .collect();
    let runs: [(String, &dyn Fn() -> Vec<LoftqResult>); 2] = [
        (format!("batch of {b}"), &|| {
            loftq_batch(&ws, &cfgs)
                .into_iter()
                .map(|r| r.expect("loftq"))
                .collect()
        }),
        (format!("{b} one at a time"), &|| {
            ws.iter()
                .zip(&cfgs)
                .map(|(w, c)| loftq(w, c).expect("loftq"))
                .collect()
        }),
    ];
    runs.into_iter()
        .map(|(name, run)| {
            let (mut results, mut moved) = (Vec::new(), Transfers::default());
            let (timing, memory) = stats::measure(args.repeats, || {
                let before = transfers();
                results = run();
                let _ = results.last().map(|r| r.lora_a.to_data());
                moved = transfers() - before;
                w.device().sync().expect("the device finishes the run");
            });
            let mean = |f: fn(&LoftqResult) -> f32| {
                results.iter().map(f).sum::<f32>() / results.len() as f32
            };
            let per = |t: f64| t / b as f64;
            eprintln!(
                "{}x{} {} r{} T{} {name}: {:.3} s per matrix, err {:.4}, {} reads ({} values)",
                shape[0],
                shape[1],
                cfg.quant.label(),
                cfg.lora.rank,
                cfg.iters,
                per(timing.median_s),
                mean(LoftqResult::rel_err),
                moved.reads,
                moved.read_values
            );
            stats::report_profile(&name);
            LoftqCase {
                shape,
                quantizer: cfg.quant.label(),
                rank: cfg.lora.rank,
                iters: cfg.iters,
                svd: name,
                seconds: per(timing.median_s),
                timing: Timing {
                    median_s: per(timing.median_s),
                    min_s: per(timing.min_s),
                    max_s: per(timing.max_s),
                    ..timing
                },
                memory,
                rel_err: mean(LoftqResult::rel_err),
                rel_err_quant: mean(|r| r.rel_err_quant),
                transfers: moved,
            }
        })
        .collect()
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
    let batched: Vec<&LoftqCase> = cases
        .iter()
        .filter(|c| c.svd.starts_with("batch of"))
        .collect();
    if !batched.is_empty() {
        s.push_str(
            "\n| shape | quantizer | r | T | matrices | batched: s per matrix, error, reads | one at a time: s per matrix, error, reads | speed-up |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
    }
    for c in batched {
        let b = c.svd.trim_start_matches("batch of ");
        let Some(one) = cases.iter().find(|o| {
            o.svd == format!("{b} one at a time")
                && o.shape == c.shape
                && o.quantizer == c.quantizer
                && o.rank == c.rank
                && o.iters == c.iters
        }) else {
            continue;
        };
        s.push_str(&format!(
            "| {}×{} | {} | {} | {} | {b} | {:.4} s, {:.4}, {} | {:.4} s, {:.4}, {} | {:.1}× |\n",
            c.shape[0],
            c.shape[1],
            c.quantizer,
            c.rank,
            c.iters,
            c.seconds,
            c.rel_err,
            c.transfers.reads,
            one.seconds,
            one.rel_err,
            one.transfers.reads,
            one.seconds / c.seconds
        ));
    }
    s
}
