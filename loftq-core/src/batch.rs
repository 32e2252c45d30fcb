//! LoftQ on several matrices of one shape as one device problem.
//!
//! On a GPU each small LoftQ step is a kernel launch and each host read a synchronization;
//! a whole model is hundreds of small matrices, and one at a time the device idles. Stacked
//! as `[b, m, n]` (a layer's `q_proj` and `o_proj`, the same projection across layers) every
//! step is one batched op, and the reads per iteration are those of one matrix.

use burn::tensor::kind::Basic;
use burn::tensor::{Bool, Device, Tensor, TensorData};

use crate::dense::{fit_step, norm_of_row_sums, row_sums_tensor, scaled};
use crate::loftq::{check_config, judge};
use crate::lowrank::batch::{BatchLowRank, Rider, rsvd_batch};
use crate::lowrank::{SvdMethod, check_rank};
use crate::quant::{HostQuantized, PackedTensor, Quantizer};
use crate::quant::{Kernel, Quantized, host_f32};
use crate::transfers::upload;
use crate::{HostFactors, LoftqConfig, LoftqError, LoftqResult};

/// Whether the batch can be one problem (see [`loftq_batch_with`](crate::loftq_batch_with)).
pub(crate) fn stackable(ws: &[Tensor<2>], cfgs: &[LoftqConfig]) -> bool {
    let (shape, device) = (ws[0].dims(), ws[0].device());
    let unseeded = |c: &LoftqConfig| LoftqConfig {
        svd: c.svd.with_seed(0),
        ..c.clone()
    };
    let cfg = unseeded(&cfgs[0]);
    ws.iter().all(|w| w.dims() == shape && w.device() == device)
        && cfgs.iter().all(|c| unseeded(c) == cfg)
        && matches!(cfg.svd, SvdMethod::Randomized(_))
        && check_config(&cfg).is_ok()
        && check_rank(shape, cfg.lora.rank).is_ok()
        && Quantizer::new(cfg.quant).is_ok_and(|q| q.stacks(shape))
}

/// The best iterate of every matrix so far.
struct Best {
    codes: Quantized,
    a: Tensor<3>,
    b: Tensor<3>,
}

/// The alternation of [`loftq`](crate::loftq()) on the stack of `ws`. `None` when a
/// weight is not finite (the caller finds which, one matrix at a time).
pub(crate) fn alternate_batch(
    ws: &[Tensor<2>],
    cfgs: &[LoftqConfig],
) -> Result<Option<Vec<LoftqResult>>, LoftqError> {
    let cfg = &cfgs[0];
    let SvdMethod::Randomized(rsvd) = cfg.svd else {
        unreachable!("stackable() admits the randomized SVD only")
    };
    let seeds: Vec<u64> = cfgs
        .iter()
        .map(|c| match c.svd {
            SvdMethod::Randomized(r) => r.seed,
            SvdMethod::Exact => 0,
        })
        .collect();
    let quantizer = Quantizer::new(cfg.quant)?;
    let (b, [m, n], rank) = (ws.len(), ws[0].dims(), cfg.lora.rank);
    let device = ws[0].device();
    crate::profile::start(&device);
    // One matrix is its own stack (no copy).
    let w: Tensor<3> = match ws {
        [one] => one.clone().reshape([1, m, n]),
        _ => Tensor::stack(ws.to_vec(), 0),
    };
    let (factor_scale, product_scale) = cfg.lora.scaling.scales(cfg.lora.scale());

    let mut res = w.clone();
    let mut warm: Option<Tensor<3>> = None;
    let mut track = Tracker::new(b, m, cfg);
    // The last iterate, whose errors are still on the device: they travel with the next
    // iteration's first read (one wait for the device, not two), and are read alone after the
    // last. An iteration that turns out to follow the stop is dropped.
    let mut pending: Option<Pending> = None;
    for t in 1..=cfg.iters {
        let source = if t == 1 { &w } else { &res };
        // Unchecked (a read fewer): `W`'s finiteness shows in its norms, read with the next
        // read, and the one-matrix path names a value that is not finite.
        let flat = |t: &Tensor<3>| t.clone().reshape([b * m, n]);
        let (codes, residual) =
            quantizer.quantize_residual_portable(&flat(source), &flat(&w), false)?;
        let residual = residual.reshape([b, m, n]);
        crate::profile::mark(&device, "batch: quantize");
        let seeds: Vec<u64> = seeds.iter().map(|s| s.wrapping_add(t as u64)).collect();
        let mut rider = Rider::new(pending.as_ref().map(|p| p.sums.clone()));
        let (lr, basis) = rsvd_batch(&residual, rank, &rsvd, &seeds, warm.as_ref(), &mut rider)?;
        if let Some(p) = pending.take() {
            let values = rider.values.unwrap_or_else(|| host_f32(&p.sums));
            let running = track.judge(p, &values);
            if !track.finite {
                return Ok(None);
            }
            if !running {
                break;
            }
        }
        let (fb, fa) = balanced(lr, &device);
        let fit_squares;
        (res, fit_squares) = fit_step(&residual, fb.clone().matmul(fa.clone()), &w, product_scale);
        crate::profile::mark(&device, "batch: factors");
        let square = |t: &Tensor<3>| t.clone().powf_scalar(2.0);
        let squares = match t {
            1 => vec![square(&w), square(&residual), fit_squares],
            _ => vec![fit_squares],
        };
        let flat = |t: Tensor<3>| t.reshape([b * m, n]);
        pending = Some(Pending {
            t,
            sums: row_sums_tensor(squares.into_iter().map(flat).collect()),
            iterate: Best {
                codes,
                a: fa,
                b: fb,
            },
        });
        warm = Some(basis);
    }
    if let Some(p) = pending.take() {
        let values = host_f32(&p.sums);
        track.judge(p, &values);
        if !track.finite {
            return Ok(None);
        }
    }
    crate::profile::mark(&device, "batch: norms");
    let Tracker {
        best,
        mut history,
        best_iter,
        rel_err_quant,
        ..
    } = track;
    let best = best.expect("at least one iteration");
    let q = quantizer
        .dequantize_with(&best.codes, Kernel::Portable)
        .reshape([b, m, n]);
    let (a, fb) = (scaled(best.a, factor_scale), scaled(best.b, factor_scale));
    // The factors' values come with the codes (one read): a caller writing them need not read.
    let flat = |t: &Tensor<3>| t.clone().reshape([t.shape().num_elements()]);
    let (codes, factors) = best.codes.to_host_with(vec![flat(&a), flat(&fb)]);
    let hosts = split(codes, b);
    let [a_values, b_values] = <[Vec<f32>; 2]>::try_from(factors).expect("two factors");
    let (a_len, b_len) = (rank * n, m * rank);
    crate::profile::mark(&device, "batch: results");
    let element = |t: &Tensor<3>, i: usize, [r, c]: [usize; 2]| -> Tensor<2> {
        t.clone().slice([i..i + 1, 0..r, 0..c]).reshape([r, c])
    };
    Ok(Some(
        hosts
            .into_iter()
            .enumerate()
            .map(|(i, host)| LoftqResult {
                packed: PackedTensor::pack(&host, cfg.quant),
                q: element(&q, i, [m, n]),
                lora_a: element(&a, i, [rank, n]),
                lora_b: element(&fb, i, [m, rank]),
                history: std::mem::take(&mut history[i]),
                rel_err_quant: rel_err_quant[i],
                best_iter: best_iter[i],
                host_factors: Some(HostFactors {
                    lora_a: a_values[i * a_len..(i + 1) * a_len].to_vec(),
                    lora_b: b_values[i * b_len..(i + 1) * b_len].to_vec(),
                }),
            })
            .collect(),
    ))
}

/// An iterate and its errors' squared row sums on the device (`[stacks·b·m]`: at `t = 1` of
/// `W`, `W − Q` and the fit, later of the fit).
struct Pending {
    t: usize,
    sums: Tensor<1>,
    iterate: Best,
}

/// What the alternation keeps per matrix: errors, best iterates, and which still run.
struct Tracker {
    b: usize,
    m: usize,
    early_stop: Option<f32>,
    /// Whether every `‖W‖` is finite (known once the first iterate is judged).
    finite: bool,
    history: Vec<Vec<f32>>,
    norms: Vec<f32>,
    rel_err_quant: Vec<f32>,
    best_iter: Vec<usize>,
    active: Vec<bool>,
    best: Option<Best>,
}

impl Tracker {
    fn new(b: usize, m: usize, cfg: &LoftqConfig) -> Self {
        Self {
            b,
            m,
            early_stop: cfg.early_stop,
            finite: true,
            history: vec![Vec::with_capacity(cfg.iters); b],
            norms: vec![],
            rel_err_quant: vec![],
            best_iter: vec![0; b],
            active: vec![true; b],
            best: None,
        }
    }

    /// Judges iterate `p` by its row sums `values` as [`loftq`](crate::loftq()) does; whether
    /// any matrix still runs.
    fn judge(&mut self, p: Pending, values: &[f32]) -> bool {
        let (b, m) = (self.b, self.m);
        // Each matrix's total in `f64`, as [`frobenius`](crate::dense::frobenius).
        let read: Vec<Vec<f32>> = values
            .chunks_exact(b * m)
            .map(|stack| stack.chunks_exact(m).map(norm_of_row_sums).collect())
            .collect();
        if p.t == 1 {
            self.finite = read[0].iter().all(|x| x.is_finite());
            self.norms = read[0].iter().map(|x| x.max(f32::MIN_POSITIVE)).collect();
            self.rel_err_quant = read[1]
                .iter()
                .zip(&self.norms)
                .map(|(e, n)| e / n)
                .collect();
        }
        let fit_norms = read.last().expect("at least one norm");
        let mut improved = vec![false; b];
        for i in 0..b {
            if !self.active[i] {
                continue;
            }
            let err = fit_norms[i] / self.norms[i];
            self.history[i].push(err);
            let prev = (self.best_iter[i] > 0).then(|| self.history[i][self.best_iter[i] - 1]);
            let stop;
            (improved[i], stop) = judge(prev, err, self.early_stop);
            if improved[i] {
                self.best_iter[i] = p.t;
            }
            self.active[i] = !stop;
        }
        self.best = Some(match self.best.take() {
            None => p.iterate,
            Some(old) => merge(old, p.iterate, &improved),
        });
        self.active.contains(&true)
    }
}

/// LoRA's balanced factors `B = U·√S` `[b, m, r]` and `A = √S·Vᵀ` `[b, r, n]`.
fn balanced(lr: BatchLowRank, device: &Device) -> (Tensor<3>, Tensor<3>) {
    let b = lr.s.len();
    let r = lr.s.first().map_or(0, Vec::len);
    let root: Vec<f32> = lr.s.iter().flatten().map(|s| s.max(0.0).sqrt()).collect();
    let root = upload(root, [b, 1, r], device);
    (lr.u * root.clone(), (lr.v * root).swap_dims(1, 2))
}

/// `new` where `improved`, `old` elsewhere, matrix by matrix.
fn merge(old: Best, new: Best, improved: &[bool]) -> Best {
    if improved.iter().all(|&x| x) {
        return new;
    }
    if !improved.contains(&true) {
        return old;
    }
    let b = improved.len();
    let mask =
        Tensor::<2, Bool>::from_data(TensorData::new(improved.to_vec(), [b, 1]), &new.a.device());
    crate::transfers::count_upload(b);
    let pick3 = |old: Tensor<3>, new: Tensor<3>| {
        let dims = new.dims();
        old.mask_where(mask.clone().reshape([b, 1, 1]).expand(dims), new)
    };
    let codes = Quantized {
        shape: new.codes.shape,
        block: new.codes.block,
        bits: new.codes.bits,
        codes: pick(old.codes.codes, new.codes.codes, &mask),
        scales: pick(old.codes.scales, new.codes.scales, &mask),
        mins: match (old.codes.mins, new.codes.mins) {
            (Some(o), Some(n)) => Some(pick(o, n, &mask)),
            _ => None,
        },
    };
    Best {
        codes,
        a: pick3(old.a, new.a),
        b: pick3(old.b, new.b),
    }
}

/// `new` where `mask` (`[b, 1]`) holds, `old` elsewhere, for `b` equal runs of a flat tensor.
fn pick<K: Basic>(old: Tensor<1, K>, new: Tensor<1, K>, mask: &Tensor<2, Bool>) -> Tensor<1, K> {
    let b = mask.dims()[0];
    let per = new.dims()[0] / b;
    old.reshape([b, per])
        .mask_where(mask.clone().expand([b, per]), new.reshape([b, per]))
        .reshape([b * per])
}

/// The codes of a stack `[b·rows, cols]`, matrix by matrix.
fn split(all: HostQuantized, b: usize) -> Vec<HostQuantized> {
    let shape = [all.shape[0] / b, all.shape[1]];
    let per = shape[0] * shape[1];
    let blocks = per / all.block;
    let part = |v: &[f32], i: usize| match v.is_empty() {
        true => Vec::new(),
        false => v[i * blocks..(i + 1) * blocks].to_vec(),
    };
    (0..b)
        .map(|i| HostQuantized {
            shape,
            block: all.block,
            codes: all.codes[i * per..(i + 1) * per].to_vec(),
            scales: part(&all.scales, i),
            mins: part(&all.mins, i),
        })
        .collect()
}
