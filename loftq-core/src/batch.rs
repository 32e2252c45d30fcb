//! LoftQ on several matrices of one shape as one device problem.
//!
//! On a GPU each small LoftQ step is a kernel launch and each host read a synchronization;
//! a whole model is hundreds of small matrices, and one at a time the device idles. Stacked
//! as `[b, m, n]` (a layer's `q_proj` and `o_proj`, the same projection across layers) every
//! step is one batched op, and the reads per iteration are those of one matrix.

use burn::tensor::kind::Basic;
use burn::tensor::{Bool, Device, Tensor, TensorData};

use crate::dense::{fit_step, norm_of_row_sums, row_sums, scaled};
use crate::loftq::{check_config, judge, loftq};
use crate::lowrank::batch::{BatchLowRank, rsvd_batch};
use crate::lowrank::{SvdMethod, check_rank};
use crate::quant::{HostQuantized, PackedTensor, Quantizer};
use crate::quant::{Kernel, Quantized, is_host_device};
use crate::transfers::upload;
use crate::{LoftqConfig, LoftqError, LoftqResult, QuantError};

/// [`loftq`] of each `ws[i]` with `cfgs[i]`, the matrices batched on a device (see
/// [`loftq_batch_with`] with [`Kernel::Auto`]).
pub fn loftq_batch(ws: &[Tensor<2>], cfgs: &[LoftqConfig]) -> Vec<Result<LoftqResult, LoftqError>> {
    loftq_batch_with(ws, cfgs, Kernel::Auto)
}

/// [`loftq`] of each `ws[i]` with `cfgs[i]`, one result per matrix in order.
///
/// The matrices run as one batched problem when they share a shape and a device, their
/// configurations differ only in the randomized SVD's seed, and the quantizer's blocks do not
/// straddle matrices; otherwise, and after any error (so that it names its matrix), each runs
/// on its own. `kernel` chooses: [`Kernel::Auto`] batches on devices whose memory is not the
/// host's (on the CPU the host path, one matrix at a time, is faster), [`Kernel::Portable`]
/// batches on any device, [`Kernel::Host`] never batches.
///
/// # Numerical behaviour
/// Each matrix gets the sketch, the steps and the best-iterate choice of [`loftq`] on the same
/// device; the randomized SVD's last step differs in rounding only (see
/// `lowrank::batch`), so errors agree to a fraction of a percent, not bit for bit.
///
/// # Panics
/// If `ws` and `cfgs` differ in length.
pub fn loftq_batch_with(
    ws: &[Tensor<2>],
    cfgs: &[LoftqConfig],
    kernel: Kernel,
) -> Vec<Result<LoftqResult, LoftqError>> {
    assert_eq!(ws.len(), cfgs.len(), "one configuration per matrix");
    let one_by_one = || ws.iter().zip(cfgs).map(|(w, c)| loftq(w, c)).collect();
    let Some(first) = ws.first() else {
        return Vec::new();
    };
    let wanted = match kernel {
        Kernel::Host => false,
        Kernel::Portable => true,
        Kernel::Auto => !is_host_device(&first.device()),
    };
    if !(wanted && stackable(ws, cfgs)) {
        return one_by_one();
    }
    match alternate_batch(ws, cfgs) {
        Ok(Some(results)) => results.into_iter().map(Ok).collect(),
        _ => one_by_one(),
    }
}

/// Whether the batch can be one problem (see [`loftq_batch_with`]).
fn stackable(ws: &[Tensor<2>], cfgs: &[LoftqConfig]) -> bool {
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

/// The alternation of [`loftq`](crate::loftq::alternate) on the stack of `ws`. `None` when a
/// weight is not finite (the caller finds which, one matrix at a time).
fn alternate_batch(
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
    let w: Tensor<3> = Tensor::stack(ws.to_vec(), 0);
    let (factor_scale, product_scale) = cfg.lora.scaling.scales(cfg.lora.scale());

    let mut res = w.clone();
    let mut warm: Option<Tensor<3>> = None;
    let mut history = vec![Vec::with_capacity(cfg.iters); b];
    let (mut norms, mut rel_err_quant) = (vec![], vec![]);
    let mut best_iter = vec![0usize; b];
    let mut active = vec![true; b];
    let mut best: Option<Best> = None;
    for t in 1..=cfg.iters {
        let source = if t == 1 { &w } else { &res };
        // `W − B·A` after the first: finite, as `W` was and the factors are.
        let flat = |t: &Tensor<3>| t.clone().reshape([b * m, n]);
        let (codes, residual) =
            match quantizer.quantize_residual_portable(&flat(source), &flat(&w), t == 1) {
                Err(QuantError::NonFinite { .. }) => return Ok(None),
                other => other?,
            };
        let residual = residual.reshape([b, m, n]);
        crate::profile::mark(&device, "batch: quantize");
        let seeds: Vec<u64> = seeds.iter().map(|s| s.wrapping_add(t as u64)).collect();
        let (lr, basis) = rsvd_batch(&residual, rank, &rsvd, &seeds, warm.as_ref())?;
        let (fb, fa) = balanced(lr, &device);
        let fit_squares;
        (res, fit_squares) = fit_step(&residual, fb.clone().matmul(fa.clone()), &w, product_scale);
        crate::profile::mark(&device, "batch: factors");
        // One read for every norm the iteration needs.
        let square = |t: &Tensor<3>| t.clone().powf_scalar(2.0);
        let read = if t == 1 {
            norms_of(vec![square(&w), square(&residual), fit_squares])
        } else {
            norms_of(vec![fit_squares])
        };
        crate::profile::mark(&device, "batch: norms");
        if t == 1 {
            norms = read[0].iter().map(|x| x.max(f32::MIN_POSITIVE)).collect();
            rel_err_quant = read[1].iter().zip(&norms).map(|(e, n)| e / n).collect();
        }
        let fit_norms = read.last().expect("at least one norm");
        let mut improved = vec![false; b];
        for i in 0..b {
            if !active[i] {
                continue;
            }
            let err = fit_norms[i] / norms[i];
            history[i].push(err);
            let prev = (best_iter[i] > 0).then(|| history[i][best_iter[i] - 1]);
            let stop;
            (improved[i], stop) = judge(prev, err, cfg.early_stop);
            if improved[i] {
                best_iter[i] = t;
            }
            active[i] = !stop;
        }
        let new = Best {
            codes,
            a: fa,
            b: fb,
        };
        best = Some(match best {
            None => new,
            Some(old) => merge(old, new, &improved),
        });
        crate::profile::mark(&device, "batch: best");
        if !active.contains(&true) {
            break;
        }
        warm = Some(basis);
    }
    let best = best.expect("at least one iteration");
    let q = quantizer
        .dequantize_with(&best.codes, Kernel::Portable)
        .reshape([b, m, n]);
    let hosts = split(best.codes.to_host(), b);
    let (a, fb) = (scaled(best.a, factor_scale), scaled(best.b, factor_scale));
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
            })
            .collect(),
    ))
}

/// LoRA's balanced factors `B = U·√S` `[b, m, r]` and `A = √S·Vᵀ` `[b, r, n]`.
fn balanced(lr: BatchLowRank, device: &Device) -> (Tensor<3>, Tensor<3>) {
    let b = lr.s.len();
    let r = lr.s.first().map_or(0, Vec::len);
    let root: Vec<f32> = lr.s.iter().flatten().map(|s| s.max(0.0).sqrt()).collect();
    let root = upload(root, [b, 1, r], device);
    (lr.u * root.clone(), (lr.v * root).swap_dims(1, 2))
}

/// The Frobenius norm of every matrix of every stack, given its squares, in one read:
/// squared row sums on the device, each matrix's total in `f64` on the host, as
/// [`frobenius`](crate::dense::frobenius).
fn norms_of(squares: Vec<Tensor<3>>) -> Vec<Vec<f32>> {
    let [b, m, n] = squares[0].dims();
    let sums = row_sums(squares.into_iter().map(|t| t.reshape([b * m, n])).collect());
    sums.chunks_exact(b * m)
        .map(|stack| stack.chunks_exact(m).map(norm_of_row_sums).collect())
        .collect()
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
