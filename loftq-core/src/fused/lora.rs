//! A linear layer with a LoRA adapter, `x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, as one recorded operation whose
//! backward pass gives each factor's gradient in the factor's own layout (Burn's autodiff gave
//! the gradient of `Aᵀ` transposed, as a view: 14 copies per decoder layer and step before the
//! optimizer flattened them).
//!
//! Two forms. Factored: three products and a sum forward, five products and a sum backward.
//! Merged, `W' = W + s·B·A` and one product forward, `∂x = dy·W'` backward: two kernels fewer
//! each way, for `out·r·in` multiply-adds to form `B·A` where the factored adapter costs
//! `rows·r·(in + out)`, and `W'` kept for the backward pass. The caller picks. Over a packed
//! codebook base the dequantization kernel writes `W + s·B·A`: over a product `B·A` made
//! before, or, for small products, summing `B·A`'s terms itself (one kernel in all).

use std::sync::Arc;

use burn::tensor::{DType, Shape, Tensor as BurnTensor};
use burn_cubecl::cubecl::ir::FloatKind;
use burn_cubecl::cubecl::prelude::InputScalar;
use burn_cubecl::kernel::slice;
use burn_cubecl::ops::numeric;
use burn_cubecl::tensor::CubeTensor;

use super::ops::{BackwardFn, frozen, product, run_saving, transposed};
use super::{AdapterProduct, kernel};
use crate::cube::{empty, grid};
use crate::quant::cube::CodebookWeight;

pub(super) fn lora_linear(
    [x, a, b]: [&BurnTensor<2>; 3],
    w: &BurnTensor<2>,
    scaling: f32,
    merge: bool,
) -> Option<BurnTensor<2>> {
    let w = frozen(w)?;
    if merge {
        // The fresh `s·B·A` is the sum's left operand: the sum may reuse its buffer, never W's.
        let add_w = move |a: &CubeTensor, b: &CubeTensor| {
            numeric::add(scaled(product(b.clone(), a.clone()), scaling), w)
        };
        return merged([x, a, b], add_w, scaling);
    }
    let wf = w.clone();
    let forward = move |[x, a, b]: &[CubeTensor; 3]| {
        let xa = scaled(product(x.clone(), transposed(a.clone())), scaling);
        let y = numeric::add(
            product(x.clone(), transposed(wf.clone())),
            product(xa.clone(), transposed(b.clone())),
        );
        (y, vec![x.clone(), a.clone(), b.clone(), xa])
    };
    let backward: BackwardFn<3> = Arc::new(move |saved, dy, [need_x, need_a, need_b]| {
        let [x, a, b, xa] = saved else {
            unreachable!("four tensors saved")
        };
        // `xa` is `s·x·Aᵀ`; the gradient reaching `x·Aᵀ` is `s·dy·B`.
        let dxa = (need_x || need_a).then(|| scaled(product(dy.clone(), b.clone()), scaling));
        let dx = need_x.then(|| {
            let through_a = product(dxa.clone().expect("made for x"), a.clone());
            numeric::add(product(dy.clone(), w.clone()), through_a)
        });
        let da = need_a.then(|| product(transposed(dxa.expect("made for A")), x.clone()));
        let db = need_b.then(|| product(transposed(dy), xa.clone()));
        [dx, da, db]
    });
    run_saving([x, a, b], forward, backward)
}

/// The merged form over a packed codebook base: `W + s·B·A` by the dequantization kernel,
/// which sums `B·A`'s terms itself or adds a product made before (`how`).
pub(super) fn lora_linear_codebook(
    [x, a, b]: [&BurnTensor<2>; 3],
    w: CodebookWeight,
    scaling: f32,
    how: AdapterProduct,
) -> Option<BurnTensor<2>> {
    let form = move |a: &CubeTensor, b: &CubeTensor| match how {
        AdapterProduct::Inline => w.plus_lora(a, b, scaling),
        AdapterProduct::Product => w.plus(product(b.clone(), a.clone()), scaling),
    };
    merged([x, a, b], form, scaling)
}

/// The merged form: `x·W'ᵀ` with `W' = merge(A, B)`, which is `W + s·B·A`.
fn merged(
    [x, a, b]: [&BurnTensor<2>; 3],
    merge: impl FnOnce(&CubeTensor, &CubeTensor) -> CubeTensor,
    scaling: f32,
) -> Option<BurnTensor<2>> {
    let forward = move |[x, a, b]: &[CubeTensor; 3]| {
        let merged = merge(a, b);
        let y = product(x.clone(), transposed(merged.clone()));
        (y, vec![x.clone(), a.clone(), b.clone(), merged])
    };
    let backward: BackwardFn<3> = Arc::new(move |saved, dy, [need_x, need_a, need_b]| {
        let [x, a, b, merged] = saved else {
            unreachable!("four tensors saved")
        };
        let dx = need_x.then(|| product(dy.clone(), merged.clone()));
        let [da, db] = factor_grads([x, a, b], dy, scaling, [need_a, need_b]);
        [dx, da, db]
    });
    run_saving([x, a, b], forward, backward)
}

/// Several merged layers of one input `x` (`inputs`: `x`, then each layer's `A` and `B`), each
/// over its packed codebook base with its `B·A` summed inline: `x·[W₁'; W₂'; …]ᵀ`, the layers'
/// outputs side by side. The merged weights are written into one stacked tensor, so the
/// layers take one product forward and one for `x`'s gradient (and no sum of the layers'
/// gradients) where each took its own.
pub(super) fn lora_group<const N: usize>(
    inputs: [&BurnTensor<2>; N],
    weights: Vec<(CodebookWeight, f32)>,
) -> Option<BurnTensor<2>> {
    let outs: Vec<usize> = weights.iter().map(|(w, _)| w.shape()[0]).collect();
    let cols = weights.first()?.0.shape()[1];
    let total: usize = outs.iter().sum();
    let scales: Vec<f32> = weights.iter().map(|(_, s)| *s).collect();
    let forward = move |values: &[CubeTensor; N]| {
        let x = &values[0];
        let merged = empty(x, Shape::new([total, cols]), DType::F32);
        let mut at = 0;
        for (k, (w, s)) in weights.iter().enumerate() {
            let [a, b] = [&values[1 + 2 * k], &values[2 + 2 * k]];
            w.plus_lora_into(a, b, *s, &merged, at * cols);
            at += w.shape()[0];
        }
        let y = product(x.clone(), transposed(merged.clone()));
        let mut saved = values.to_vec();
        saved.push(merged);
        (y, saved)
    };
    let backward: BackwardFn<N> = Arc::new(move |saved, dy, needed| {
        let (x, merged) = (&saved[0], &saved[N]);
        let mut grads: [Option<CubeTensor>; N] = std::array::from_fn(|_| None);
        grads[0] = needed[0].then(|| product(dy.clone(), merged.clone()));
        if needed[1..].iter().all(|&n| n)
            && let Some(factors) = stacked_factor_grads(&saved[..N], &dy, &outs, &scales)
        {
            for (k, [da, db]) in factors.into_iter().enumerate() {
                (grads[1 + 2 * k], grads[2 + 2 * k]) = (Some(da), Some(db));
            }
            return grads;
        }
        let rows = dy.meta.shape()[0];
        let mut at = 0;
        for (k, (&out, &s)) in outs.iter().zip(&scales).enumerate() {
            let (ia, ib) = (1 + 2 * k, 2 + 2 * k);
            let dy_k = slice(dy.clone(), &[0..rows, at..at + out]);
            let ab = [x, &saved[ia], &saved[ib]];
            let [da, db] = factor_grads(ab, dy_k, s, [needed[ia], needed[ib]]);
            (grads[ia], grads[ib]) = (da, db);
            at += out;
        }
        grads
    });
    run_saving(inputs, forward, backward)
}

/// Every layer's factor gradients of a group (`saved`: `x`, then each layer's `A` and `B`) in
/// six kernels where the layers one by one take four products each: the `A`s stacked and the
/// `s·B`s block-diagonal (one kernel), `x·A_allᵀ`, `dy·B_blk`, `∂A_all = (dy·B_blk)ᵀ·x` (each
/// `∂A` a block of its rows), `dyᵀ·(x·A_allᵀ)`, whose diagonal blocks are the `∂B`s (one kernel
/// gathers and scales them). The two block products do the other layers' multiply-adds too,
/// `(N−1)·r` per output value and row: taken while that is at most an eighth of the base
/// product's `in`, else (or for layers of different ranks) `None`.
fn stacked_factor_grads(
    saved: &[CubeTensor],
    dy: &CubeTensor,
    outs: &[usize],
    scales: &[f32],
) -> Option<Vec<[CubeTensor; 2]>> {
    // The inputs were saved contiguous (`run_saving`), as the kernels read them.
    let x = &saved[0];
    let n = outs.len();
    let a: Vec<&CubeTensor> = (0..n).map(|k| &saved[1 + 2 * k]).collect();
    let b: Vec<&CubeTensor> = (0..n).map(|k| &saved[2 + 2 * k]).collect();
    let [r, cols] = a[0].meta.shape()[..] else {
        return None;
    };
    if !(2..=3).contains(&n) || a.iter().any(|a| a.meta.shape()[0] != r) || (n - 1) * r * 8 > cols {
        return None;
    }
    let (total, width) = (outs.iter().sum::<usize>(), n * r);
    let (t0, t1) = (outs[0], outs[0] + outs[1]);
    let s = |k: usize| scales.get(k).copied().unwrap_or(0.0);
    let a_all = empty(x, Shape::new([width, cols]), DType::F32);
    let b_blk = empty(x, Shape::new([total, width]), DType::F32);
    let slot = |v: &[&CubeTensor], k: usize| (*v.get(k).unwrap_or(&v[0])).clone().into_tensor_arg();
    let (count, dim) = grid(x, width * cols + total * width);
    kernel::stack_factors_kernel::launch(
        &x.client,
        count,
        dim,
        slot(&a, 0),
        slot(&a, 1),
        slot(&a, 2),
        slot(&b, 0),
        slot(&b, 1),
        slot(&b, 2),
        a_all.clone().into_tensor_arg(),
        b_blk.clone().into_tensor_arg(),
        r,
        width,
        t0,
        t1,
        s(0),
        s(1),
        s(2),
    );
    let xa = product(x.clone(), transposed(a_all));
    let da_all = product(transposed(product(dy.clone(), b_blk)), x.clone());
    let d = product(transposed(dy.clone()), xa);
    let db_all = empty(x, Shape::new([total, r]), DType::F32);
    let (count, dim) = grid(x, total * r);
    kernel::diagonal_blocks_kernel::launch(
        &x.client,
        count,
        dim,
        d.into_tensor_arg(),
        db_all.clone().into_tensor_arg(),
        r,
        width,
        t0,
        t1,
        s(0),
        s(1),
        s(2),
    );
    let mut at = 0;
    let grads = (outs.iter().enumerate())
        .map(|(k, &out)| {
            let da = slice(da_all.clone(), &[k * r..(k + 1) * r, 0..cols]);
            let db = slice(db_all.clone(), &[at..at + out, 0..r]);
            at += out;
            [da, db]
        })
        .collect();
    Some(grads)
}

/// The factors' gradients of `y = x·(W + s·B·A)ᵀ` for the output's gradient `dy`:
/// `∂A = s·(dy·B)ᵀ·x`, `∂B = s·dyᵀ·(x·Aᵀ)`, each where `need` asks.
fn factor_grads(
    [x, a, b]: [&CubeTensor; 3],
    dy: CubeTensor,
    scaling: f32,
    [need_a, need_b]: [bool; 2],
) -> [Option<CubeTensor>; 2] {
    let dyb = need_a.then(|| product(dy.clone(), b.clone()));
    let da = dyb.map(|dyb| scaled(product(transposed(dyb), x.clone()), scaling));
    let db = need_b.then(|| {
        scaled(
            product(transposed(dy), product(x.clone(), transposed(a.clone()))),
            scaling,
        )
    });
    [da, db]
}

/// `s·x`, no kernel for a scale of 1.
fn scaled(x: CubeTensor, s: f32) -> CubeTensor {
    if s == 1.0 {
        return x;
    }
    numeric::mul_scalar(x, InputScalar::new(s, FloatKind::F32))
}
