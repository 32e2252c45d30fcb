//! Causal attention from the projections to the output projection's input as one recorded
//! operation: the rotary embedding and the move of the heads in front of the positions in
//! one kernel per tensor, grouped queries without repeating the keys and values, the scores'
//! two products and the softmax; its backward pass written out by hand.
//!
//! Through Burn's ops the same work launched 12 kernels forward and 19 backward per layer
//! (six layout copies to move heads and repeat grouped keys and values, a reduction per
//! repeated tensor backward, more copies for the transposes); here it is 7 and 9.

use std::sync::Arc;

use burn::tensor::{DType, Shape, Tensor as BurnTensor};
use burn_cubecl::ops::reshape;
use burn_cubecl::tensor::CubeTensor;

use super::kernel;
use super::ops::{
    BackwardFn, frozen, product, run_saving, softmax_backward, softmax_kernel, transposed,
};
use crate::cube::{empty, grid};

/// Which way [`heads`] moves a tensor.
#[derive(Clone, Copy, PartialEq)]
enum Move {
    /// `[b, s, h·w]` → `[b, h, s, w]`; given tables, the rotary embedding on the way.
    First,
    /// `[b, h, s, w]` → `[b, s, h·w]`; given tables, the rotation's transpose on the way.
    Last,
}

/// The geometry of one call: batch, positions, head width.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    s: usize,
    w: usize,
}

pub(super) fn causal_attention(
    [q, k, v]: [&BurnTensor<3>; 3],
    cos: &BurnTensor<2>,
    swapped_sin: &BurnTensor<2>,
    [h, kvh]: [usize; 2],
) -> Option<BurnTensor<3>> {
    let (c, t) = (frozen(cos)?, frozen(swapped_sin)?);
    let [b, s, width] = q.dims();
    let dims = Dims { b, s, w: width / h };
    let scale = 1.0 / (dims.w as f32).sqrt();
    let g = h / kvh;
    let (cf, tf) = (c.clone(), t.clone());
    let forward = move |[q, k, v]: &[CubeTensor; 3]| {
        let rot = Some((&cf, &tf));
        let qh = heads(q, dims, h, Move::First, rot);
        let kh = heads(k, dims, kvh, Move::First, rot);
        let vh = heads(v, dims, kvh, Move::First, None);
        // The `g` query heads of a key/value head stacked as rows: no repeated keys.
        let q2 = reshape(qh, Shape::new([b, kvh, g * s, dims.w]));
        let scores = product(q2.clone(), transposed(kh.clone()));
        let p = softmax_kernel(&scores, s, scale);
        let o = product(p.clone(), vh.clone());
        let out = heads(&o, dims, h, Move::Last, None);
        (out, vec![q2, kh, vh, p])
    };
    let backward: BackwardFn<3> = Arc::new(move |saved: &[CubeTensor], dy: CubeTensor, _| {
        let [q2, kh, vh, p] = saved else {
            unreachable!("four tensors saved")
        };
        let rot = Some((&c, &t));
        let d_o = heads(&dy, dims, h, Move::First, None);
        let d_o = reshape(d_o, Shape::new([b, kvh, g * s, dims.w]));
        let dp = product(d_o.clone(), transposed(vh.clone()));
        // The rows of all `g` query heads meet in these products: the sum over the group.
        let dv = product(transposed(p.clone()), d_o);
        let ds = softmax_backward(p, &dp, scale);
        let dq = product(ds.clone(), kh.clone());
        let dk = product(transposed(ds), q2.clone());
        [
            heads(&dq, dims, h, Move::Last, rot),
            heads(&dk, dims, kvh, Move::Last, rot),
            heads(&dv, dims, kvh, Move::Last, None),
        ]
        .map(Some)
    });
    run_saving([q, k, v], forward, backward)
}

/// `x` (contiguous) moved as `how` says, `n` heads of `dims.w`, in one kernel; given
/// `tables` (cos, swapped sin), rotated on the way to heads first, by the rotation's transpose
/// on the way back.
fn heads(
    x: &CubeTensor,
    dims: Dims,
    n: usize,
    how: Move,
    tables: Option<(&CubeTensor, &CubeTensor)>,
) -> CubeTensor {
    let Dims { b, s, w } = dims;
    let first = how == Move::First;
    let shape = match how {
        Move::First => Shape::new([b, n, s, w]),
        Move::Last => Shape::new([b, s, n * w]),
    };
    let out = empty(x, shape, DType::F32);
    let (cos, ssin) = tables.unwrap_or((x, x));
    let (count, dim) = grid(x, b * s * n * w);
    kernel::heads_kernel::launch(
        &out.client,
        count,
        dim,
        x.clone().into_tensor_arg(),
        cos.clone().into_tensor_arg(),
        ssin.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        s,
        n,
        w,
        first,
        tables.is_some(),
        !first,
    );
    out
}
