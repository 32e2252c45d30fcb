//! Causal attention from the projections to the output projection's input as one recorded
//! operation: the rotary embedding and the move of the heads in front of the positions in
//! one kernel per tensor (one for all three where the queries, keys and values sit side by
//! side), grouped queries without repeating the keys and values, the scores' two products and
//! the softmax; its backward pass written out by hand.
//!
//! Through Burn's ops the same work launched 12 kernels forward and 19 backward per layer
//! (six layout copies to move heads and repeat grouped keys and values, a reduction per
//! repeated tensor backward, more copies for the transposes); here it is 7 and 9, over the
//! stacked projections 5 and 7.

use std::sync::Arc;

use burn::tensor::{DType, Shape, Tensor as BurnTensor};
use burn_cubecl::kernel::slice;
use burn_cubecl::ops::reshape;
use burn_cubecl::tensor::CubeTensor;

use super::heads::heads_kernel;
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

/// Where one projection's values sit on the projection side: rows of `row` values, the
/// projection's from column `at` on (queries, keys and values apart, or side by side in one
/// tensor).
#[derive(Clone, Copy)]
struct Place {
    row: usize,
    at: usize,
}

impl Place {
    fn alone(width: usize) -> Self {
        Place { row: width, at: 0 }
    }
}

pub(super) fn causal_attention(
    [q, k, v]: [&BurnTensor<3>; 3],
    cos: &BurnTensor<2>,
    swapped_sin: &BurnTensor<2>,
    [h, kvh]: [usize; 2],
) -> Option<BurnTensor<3>> {
    let tables = [frozen(cos)?, frozen(swapped_sin)?];
    let [b, s, width] = q.dims();
    let dims = Dims { b, s, w: width / h };
    let places = [h, kvh, kvh].map(|n| Place::alone(n * dims.w));
    let core = Core {
        tables,
        dims,
        heads: [h, kvh],
    };
    let c = core.clone();
    let forward = move |[q, k, v]: &[CubeTensor; 3]| c.forward([q, k, v], places);
    let backward: BackwardFn<3> = Arc::new(move |saved: &[CubeTensor], dy: CubeTensor, _| {
        core.backward(saved, dy, places, None).map(Some)
    });
    run_saving([q, k, v], forward, backward)
}

/// [`causal_attention`] of the queries, keys and values side by side in `qkv`
/// `[b, s, (h + 2·kvh)·w]`, as one product of the three projections makes them: read where
/// they are, and their gradient written into one tensor of that layout.
pub(super) fn causal_attention_packed(
    qkv: &BurnTensor<3>,
    cos: &BurnTensor<2>,
    swapped_sin: &BurnTensor<2>,
    [h, kvh]: [usize; 2],
) -> Option<BurnTensor<3>> {
    let tables = [frozen(cos)?, frozen(swapped_sin)?];
    let [b, s, row] = qkv.dims();
    let dims = Dims {
        b,
        s,
        w: row / (h + 2 * kvh),
    };
    let places = [0, h, h + kvh].map(|n| Place {
        row,
        at: n * dims.w,
    });
    let core = Core {
        tables,
        dims,
        heads: [h, kvh],
    };
    let c = core.clone();
    let forward = move |[x]: &[CubeTensor; 1]| c.forward([x, x, x], places);
    let backward: BackwardFn<1> = Arc::new(move |saved: &[CubeTensor], dy: CubeTensor, _| {
        let d = empty(&dy, Shape::new([b, s, row]), DType::F32);
        core.backward(saved, dy, places, Some(&d));
        [Some(d)]
    });
    run_saving([qkv], forward, backward)
}

/// The work of one attention call, wherever its inputs sit.
#[derive(Clone)]
struct Core {
    /// The rotary tables: cos, swapped sin.
    tables: [CubeTensor; 2],
    dims: Dims,
    heads: [usize; 2],
}

impl Core {
    fn forward(
        &self,
        [q, k, v]: [&CubeTensor; 3],
        [pq, pk, pv]: [Place; 3],
    ) -> (CubeTensor, Vec<CubeTensor>) {
        let (dims, [h, kvh]) = (self.dims, self.heads);
        let Dims { b, s, w } = dims;
        let rot = Some((&self.tables[0], &self.tables[1]));
        let [qh, kh, vh] = match packed([pq, pk, pv]) {
            Some(place) => heads_packed(q, dims, [h, kvh], rot, place),
            None => {
                let first = |x, n, rot, place| heads(x, dims, n, Move::First, rot, place, None);
                [
                    first(q, h, rot, pq),
                    first(k, kvh, rot, pk),
                    first(v, kvh, None, pv),
                ]
            }
        };
        // The `g` query heads of a key/value head stacked as rows: no repeated keys.
        let q2 = reshape(qh, Shape::new([b, kvh, (h / kvh) * s, w]));
        let scores = product(q2.clone(), transposed(kh.clone()));
        let p = softmax_kernel(&scores, s, 1.0 / (w as f32).sqrt());
        let o = product(p.clone(), vh.clone());
        let out = heads(&o, dims, h, Move::Last, None, Place::alone(h * w), None);
        (out, vec![q2, kh, vh, p])
    }

    /// The inputs' gradients, each a tensor of its own, or all written into `into` at their
    /// places.
    fn backward(
        &self,
        saved: &[CubeTensor],
        dy: CubeTensor,
        places: [Place; 3],
        into: Option<&CubeTensor>,
    ) -> [CubeTensor; 3] {
        let [q2, kh, vh, p] = saved else {
            unreachable!("four tensors saved")
        };
        let (dims, [h, kvh]) = (self.dims, self.heads);
        let Dims { b, s, w } = dims;
        let rot = Some((&self.tables[0], &self.tables[1]));
        let d_o = heads(&dy, dims, h, Move::First, None, Place::alone(h * w), None);
        let d_o = reshape(d_o, Shape::new([b, kvh, (h / kvh) * s, w]));
        let dp = product(d_o.clone(), transposed(vh.clone()));
        // The rows of all `g` query heads meet in these products: the sum over the group.
        let dv = product(transposed(p.clone()), d_o);
        let ds = softmax_backward(p, &dp, 1.0 / (w as f32).sqrt());
        let dq = product(ds.clone(), kh.clone());
        let dk = product(transposed(ds), q2.clone());
        let [pq, pk, pv] = places;
        if let (Some(place), Some(into)) = (packed(places), into) {
            launch_heads(
                [&dq, &dk, &dv],
                into,
                dims,
                [h, kvh],
                Move::Last,
                rot,
                place,
            );
            return [into.clone(), into.clone(), into.clone()];
        }
        let back = |x, n, rot, place| heads(x, dims, n, Move::Last, rot, place, into);
        [
            back(&dq, h, rot, pq),
            back(&dk, kvh, rot, pk),
            back(&dv, kvh, None, pv),
        ]
    }
}

/// The place of the queries where they, the keys and the values sit side by side in one
/// tensor (as [`causal_attention_packed`] has them), else `None`.
fn packed([pq, pk, pv]: [Place; 3]) -> Option<Place> {
    (pq.row == pk.row && pk.row == pv.row && pk.at > pq.at && pv.at > pk.at).then_some(pq)
}

/// The queries, keys and values side by side in `x` (the queries at `place`) moved to heads
/// first in one kernel, the queries and keys rotated by `tables`: three `[b, n, s, w]`
/// tensors, end to end in one buffer.
fn heads_packed(
    x: &CubeTensor,
    dims: Dims,
    [h, kvh]: [usize; 2],
    tables: Option<(&CubeTensor, &CubeTensor)>,
    place: Place,
) -> [CubeTensor; 3] {
    let Dims { b, s, w } = dims;
    let out = empty(x, Shape::new([b * (h + 2 * kvh) * s * w]), DType::F32);
    launch_heads([x, x, x], &out, dims, [h, kvh], Move::First, tables, place);
    let mut at = 0;
    [h, kvh, kvh].map(|n| {
        let len = b * n * s * w;
        let part = slice(out.clone(), std::slice::from_ref(&(at..at + len)));
        at += len;
        reshape(part, Shape::new([b, n, s, w]))
    })
}

/// `x` moved as `how` says, `n` heads of `dims.w`, in one kernel; given `tables` (cos,
/// swapped sin), rotated on the way to heads first, by the rotation's transpose on the way
/// back. The projection side (`x` for [`Move::First`], the output for [`Move::Last`]) is at
/// `place`: the output is `into` there when given, else a fresh `[b, s, n·w]`.
fn heads(
    x: &CubeTensor,
    dims: Dims,
    n: usize,
    how: Move,
    tables: Option<(&CubeTensor, &CubeTensor)>,
    place: Place,
    into: Option<&CubeTensor>,
) -> CubeTensor {
    let Dims { b, s, w } = dims;
    let out = match (how, into) {
        (Move::First, _) => empty(x, Shape::new([b, n, s, w]), DType::F32),
        (Move::Last, Some(t)) => t.clone(),
        (Move::Last, None) => empty(x, Shape::new([b, s, n * w]), DType::F32),
    };
    // One part: `n` heads, no keys or values after it.
    launch_heads([x, x, x], &out, dims, [n, 0], how, tables, place);
    out
}

/// [`heads_kernel`] over the parts (`[h, kvh]` heads: the queries, then the keys and
/// the values; `kvh = 0` for one part of `h` heads), the projection side at `place`.
fn launch_heads(
    [x0, x1, x2]: [&CubeTensor; 3],
    out: &CubeTensor,
    dims: Dims,
    [h, kvh]: [usize; 2],
    how: Move,
    tables: Option<(&CubeTensor, &CubeTensor)>,
    place: Place,
) {
    let Dims { b, s, w } = dims;
    let first = how == Move::First;
    let (c0, c1) = (b * s * h * w, b * s * (h + kvh) * w);
    let count = c1 + b * s * kvh * w;
    let (cos, ssin) = tables.unwrap_or((x0, x0));
    let (cube_count, dim) = grid(x0, count);
    heads_kernel::launch(
        &out.client,
        cube_count,
        dim,
        x0.clone().into_tensor_arg(),
        x1.clone().into_tensor_arg(),
        x2.clone().into_tensor_arg(),
        cos.clone().into_tensor_arg(),
        ssin.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        s,
        h,
        kvh,
        w,
        place.row,
        place.at,
        c0,
        c1,
        count,
        first,
        tables.is_some(),
        !first,
    );
}
