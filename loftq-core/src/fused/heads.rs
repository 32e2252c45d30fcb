//! The kernels that rotate attention's queries and keys and move heads between the
//! projections' layout and attention's.

use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;

/// One thread per value of `x` `[b, s, h, width]`: on a head's first `d` values
/// `x·cos + x[partner]·ssin` (the partner the same place in the other half), the rest
/// copied. Backward (`back`): `dx = dy·cos + dy[partner]·ssin[partner]`, the rotation's
/// transpose.
#[cube(launch)]
pub(super) fn rotary_kernel(
    x: &Tensor<f32>,
    cos: &Tensor<f32>,
    ssin: &Tensor<f32>,
    out: &mut Tensor<f32>,
    heads_width: usize,
    width: usize,
    #[comptime] back: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let j = i % width;
    let pos = (i / heads_width) % cos.shape(0);
    out[i] = rotated(x, i - j, j, pos, cos, ssin, back);
}

/// Value `j` of the head starting at `x[at]`, position `pos`, rotated: on the first `d`
/// (the tables' width) `x·cos + x[partner]·ssin`, the partner the same place in the other
/// half (with `back`, the transpose: `ssin[partner]`); beyond `d`, as it is.
#[cube]
fn rotated(
    x: &Tensor<f32>,
    at: usize,
    j: usize,
    pos: usize,
    cos: &Tensor<f32>,
    ssin: &Tensor<f32>,
    #[comptime] back: bool,
) -> f32 {
    let d = cos.shape(1);
    let mut y = x[at + j];
    if j < d {
        let half = d / 2;
        let partner = if j < half { j + half } else { j - half };
        let c = pos * d + j;
        let t = if comptime!(back) {
            pos * d + partner
        } else {
            c
        };
        y = x[at + j] * cos[c] + x[at + partner] * ssin[t];
    }
    y
}

/// One thread per value of `[b, s, n, width]` tensors moved between the projections' layout
/// (heads last: row `(b, s)` of a `[b, s, row]` tensor from column `at` on, so that one tensor
/// can hold the queries, keys and values side by side) and attention's (heads first,
/// `[b, n, s, width]`, contiguous): to heads first with `first`, back otherwise.
///
/// Up to three parts in one launch: threads below `c0` move the first (`heads` heads, from
/// column `at`), below `c1` the second and below `count` the third (`kv_heads` heads each,
/// side by side after the first); one part alone: `c0 = c1 = count`. The projections' side is
/// `x0` with `first` (the three bound to it), else `out`; attention's side is `out` with
/// `first`, the parts end to end, else `x0`, `x1`, `x2`. With `rotate`, the first two parts
/// get the rotary embedding of [`rotary_kernel`] on the way (its transpose with `back`).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn heads_kernel(
    x0: &Tensor<f32>,
    x1: &Tensor<f32>,
    x2: &Tensor<f32>,
    cos: &Tensor<f32>,
    ssin: &Tensor<f32>,
    out: &mut Tensor<f32>,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    width: usize,
    row: usize,
    at: usize,
    c0: usize,
    c1: usize,
    count: usize,
    #[comptime] first: bool,
    #[comptime] rotate: bool,
    #[comptime] back: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= count {
        terminate!();
    }
    // The part, where it starts among the threads and in a row, and its heads.
    let mut part = 0;
    let mut start = 0;
    let mut col = at;
    let mut n = heads;
    if i >= c1 {
        part = 2;
        start = c1;
        col = at + (heads + kv_heads) * width;
        n = kv_heads;
    } else if i >= c0 {
        part = 1;
        start = c0;
        col = at + heads * width;
        n = kv_heads;
    }
    let local = i - start;
    let j = local % width;
    let r = local / width;
    // The output's faster of position and head, then the other.
    let inner = if comptime!(first) { seq } else { n };
    let other = if comptime!(first) { n } else { seq };
    let (fast, slow) = (r % inner, (r / inner) % other);
    let pos = if comptime!(first) { fast } else { slow };
    let head = if comptime!(first) { slow } else { fast };
    let batch = r / (seq * n);
    // Where the value's head starts in the input, and where the value goes in the output.
    let (from, to) = if comptime!(first) {
        ((batch * seq + pos) * row + col + head * width, i)
    } else {
        let line = n * width;
        (
            ((batch * n + head) * seq + pos) * width,
            (local / line) * row + col + local % line,
        )
    };
    let turn = part < 2;
    // Heads first, every part is read from `x0`.
    let mut input = part;
    if comptime!(first) {
        input = 0;
    }
    if input == 0 {
        out[to] = moved(x0, from, j, pos, cos, ssin, turn, rotate, back);
    } else if input == 1 {
        out[to] = moved(x1, from, j, pos, cos, ssin, turn, rotate, back);
    } else {
        out[to] = moved(x2, from, j, pos, cos, ssin, turn, rotate, back);
    }
}

/// Value `j` of the head starting at `x[at]`: [`rotated`] where `rotate` and `turn`, else as
/// it is.
#[cube]
#[allow(clippy::too_many_arguments, clippy::collapsible_if)]
fn moved(
    x: &Tensor<f32>,
    at: usize,
    j: usize,
    pos: usize,
    cos: &Tensor<f32>,
    ssin: &Tensor<f32>,
    turn: bool,
    #[comptime] rotate: bool,
    #[comptime] back: bool,
) -> f32 {
    let mut y = x[at + j];
    if comptime!(rotate) {
        if turn {
            y = rotated(x, at, j, pos, cos, ssin, back);
        }
    }
    y
}
