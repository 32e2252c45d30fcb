//! The negative log-likelihood of one target per row of logits, `logsumexp(row) − row[t]`,
//! as one recorded operation: one kernel forward (a cube of threads per row, which reduce the
//! row's maximum, then its sum of exponentials) and one backward,
//! `∂row = g·(softmax(row) − onehot(t))`. Burn's `log_softmax` and `gather` took 21 kernels
//! for a step's loss, most of them passes over the whole `[rows, vocab]` logits.

use std::sync::Arc;

use burn::tensor::{DType, Shape, Tensor as BurnTensor};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::tensor::CubeTensor;

use super::ops::{BackwardFn, empty_like, frozen, run_saving};
use crate::cube::{empty, grid};

/// Threads that share a row in the forward kernel (a power of two).
const ROW_THREADS: u32 = 256;

/// One cube of [`ROW_THREADS`] per row of `logits` `[rows, vocab]`: the row's
/// `lse = log Σ exp` into `lse[row]` and `lse − logits[row, targets[row]]` into `nll[row]`
/// (targets as `f32`, exact below 2²⁴).
#[cube(launch)]
fn nll_rows_kernel(
    logits: &Tensor<f32>,
    targets: &Tensor<f32>,
    nll: &mut Tensor<f32>,
    lse: &mut Tensor<f32>,
    vocab: usize,
) {
    let row = CUBE_POS;
    if row >= nll.len() {
        terminate!();
    }
    let at = row * vocab;
    let unit = UNIT_POS as usize;
    let mut shared = Shared::new_slice(ROW_THREADS as usize);
    let mut high = f32::new(-3.0e38_f32);
    let mut j = unit;
    while j < vocab {
        let v = logits[at + j];
        if v > high {
            high = v;
        }
        j += CUBE_DIM as usize;
    }
    shared[unit] = high;
    let top = fold(&mut shared, unit, true);
    sync_cube();
    let mut sum = f32::new(0.0_f32);
    let mut j = unit;
    while j < vocab {
        sum += (logits[at + j] - top).exp();
        j += CUBE_DIM as usize;
    }
    shared[unit] = sum;
    let total = fold(&mut shared, unit, false);
    if unit == 0 {
        let l = top + total.ln();
        lse[row] = l;
        nll[row] = l - logits[at + usize::cast_from(targets[row])];
    }
}

/// The cube's values in `shared` (one per thread, a power of two of them) folded pairwise:
/// their maximum with `max`, else their sum.
#[cube]
fn fold(shared: &mut Shared<[f32]>, unit: usize, #[comptime] max: bool) -> f32 {
    sync_cube();
    let mut active = CUBE_DIM as usize / 2;
    while active > 0 {
        if unit < active {
            let (mine, other) = (shared[unit], shared[unit + active]);
            let mut v = mine + other;
            if comptime!(max) {
                v = mine;
                if other > mine {
                    v = other;
                }
            }
            shared[unit] = v;
        }
        sync_cube();
        active /= 2;
    }
    shared[0]
}

/// One thread per value of `dlogits` `[rows, vocab]`: `g[row]·(exp(logit − lse[row]) − [the
/// value is the row's target])`.
#[cube(launch)]
fn nll_rows_backward_kernel(
    logits: &Tensor<f32>,
    targets: &Tensor<f32>,
    lse: &Tensor<f32>,
    g: &Tensor<f32>,
    dlogits: &mut Tensor<f32>,
    vocab: usize,
) {
    let i = ABSOLUTE_POS;
    if i >= dlogits.len() {
        terminate!();
    }
    let row = i / vocab;
    let mut d = (logits[i] - lse[row]).exp();
    if i % vocab == usize::cast_from(targets[row]) {
        d -= 1.0;
    }
    dlogits[i] = g[row] * d;
}

pub(super) fn nll_rows(logits: &BurnTensor<2>, targets: &BurnTensor<2>) -> Option<BurnTensor<2>> {
    let targets = frozen(targets)?;
    let [rows, vocab] = logits.dims();
    let forward = move |[x]: &[CubeTensor; 1]| {
        let nll = empty(x, Shape::new([rows, 1]), DType::F32);
        let lse = empty(x, Shape::new([rows]), DType::F32);
        let count = CubeCount::Static(rows as u32, 1, 1);
        nll_rows_kernel::launch(
            &x.client,
            count,
            CubeDim::new_1d(ROW_THREADS),
            x.clone().into_tensor_arg(),
            targets.clone().into_tensor_arg(),
            nll.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            vocab,
        );
        (nll, vec![x.clone(), targets.clone(), lse])
    };
    let backward: BackwardFn<1> = Arc::new(move |saved, g, _| {
        let [x, targets, lse] = saved else {
            unreachable!("the logits, targets and log-sums saved")
        };
        let dx = empty_like(x);
        let (count, dim) = grid(x, rows * vocab);
        nll_rows_backward_kernel::launch(
            &x.client,
            count,
            dim,
            x.clone().into_tensor_arg(),
            targets.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            g.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            vocab,
        );
        [Some(dx)]
    });
    run_saving([logits], forward, backward)
}
