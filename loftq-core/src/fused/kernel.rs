//! The CubeCL kernels of [`super`]: one thread per value, or per row.

use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;

/// One thread per value of `out` `[rows, inter]`: `g·σ(g)·u`, the row `r`'s `g` at `r·row` in
/// `g`, its `u` at `r·row + u_at` in `u` (the gate and the up projection apart, `row = inter`
/// and `u_at = 0`; or side by side in one tensor, `row = 2·inter` and `u_at = inter`).
#[cube(launch)]
pub(super) fn silu_mul_kernel(
    g: &Tensor<f32>,
    u: &Tensor<f32>,
    out: &mut Tensor<f32>,
    inter: usize,
    row: usize,
    u_at: usize,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let at = (i / inter) * row + i % inter;
    let x = g[at];
    let s = 1.0 / (1.0 + (-x).exp());
    out[i] = x * s * u[at + u_at];
}

/// One thread per value of `dy` `[rows, inter]` (`g`, `u`, `row`, `u_at` as in
/// [`silu_mul_kernel`]): `∂/∂u = dy·g·σ(g)`, `∂/∂g = dy·u·σ(g)·(1 + g·(1 − σ(g)))`, written
/// where `g` and `u` were read from, into `dg` and `du`, or both into `dg` with `one`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn silu_mul_backward_kernel(
    g: &Tensor<f32>,
    u: &Tensor<f32>,
    dy: &Tensor<f32>,
    dg: &mut Tensor<f32>,
    du: &mut Tensor<f32>,
    inter: usize,
    row: usize,
    u_at: usize,
    #[comptime] one: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= dy.len() {
        terminate!();
    }
    let at = (i / inter) * row + i % inter;
    let x = g[at];
    let s = 1.0 / (1.0 + (-x).exp());
    let d_up = dy[i] * x * s;
    dg[at] = dy[i] * u[at + u_at] * s * (1.0 + x * (1.0 - s));
    if comptime!(one) {
        dg[at + u_at] = d_up;
    } else {
        du[at + u_at] = d_up;
    }
}

/// One thread per row of `n` values: `r = 1/√(Σx²/n + ε)`, `y = x·r·w`. Backward (`back`,
/// `dy` the output's gradient): `dx = r·(w·dy − x·r²·Σ(x·dy·w)/n)`.
#[cube(launch)]
pub(super) fn rms_norm_kernel(
    x: &Tensor<f32>,
    w: &Tensor<f32>,
    dy: &Tensor<f32>,
    out: &mut Tensor<f32>,
    eps: f32,
    #[comptime] back: bool,
) {
    let n = w.len();
    let row = ABSOLUTE_POS;
    if row * n >= x.len() {
        terminate!();
    }
    let at = row * n;
    let mut ss = 0.0;
    let mut dot = 0.0;
    for j in 0..n {
        let v = x[at + j];
        ss += v * v;
        if comptime!(back) {
            dot += v * dy[at + j] * w[j];
        }
    }
    let r = 1.0 / (ss / f32::cast_from(n) + eps).sqrt();
    if comptime!(back) {
        let c = dot * r * r / f32::cast_from(n);
        for j in 0..n {
            out[at + j] = r * (w[j] * dy[at + j] - x[at + j] * c);
        }
    } else {
        for j in 0..n {
            out[at + j] = x[at + j] * r * w[j];
        }
    }
}

/// One thread per row of `t` scores, the row's query at position `t − n + row % n`:
/// `p = softmax(scale·s)` over the visible keys, 0 beyond.
#[cube(launch)]
pub(super) fn causal_softmax_kernel(
    s: &Tensor<f32>,
    out: &mut Tensor<f32>,
    n: usize,
    t: usize,
    scale: f32,
) {
    let row = ABSOLUTE_POS;
    if row * t >= s.len() {
        terminate!();
    }
    let at = row * t;
    let seen = t - n + row % n + 1;
    let mut m = s[at] * scale;
    for j in 1..seen {
        m = f32::max(m, s[at + j] * scale);
    }
    let mut sum = 0.0;
    for j in 0..seen {
        sum += (s[at + j] * scale - m).exp();
    }
    let inv = 1.0 / sum;
    for j in 0..seen {
        out[at + j] = (s[at + j] * scale - m).exp() * inv;
    }
    for j in seen..t {
        out[at + j] = 0.0;
    }
}

/// One thread per row of `t` probabilities `p` (a softmax's output, scaled by `scale` on the
/// way in; zero where the mask hid a key): `ds = scale·p·(dp − Σ dp·p)`.
#[cube(launch)]
pub(super) fn softmax_backward_kernel(
    p: &Tensor<f32>,
    dp: &Tensor<f32>,
    out: &mut Tensor<f32>,
    t: usize,
    scale: f32,
) {
    let row = ABSOLUTE_POS;
    if row * t >= p.len() {
        terminate!();
    }
    let at = row * t;
    let mut dot = 0.0;
    for j in 0..t {
        dot += dp[at + j] * p[at + j];
    }
    for j in 0..t {
        out[at + j] = scale * p[at + j] * (dp[at + j] - dot);
    }
}

/// One thread per value of eight vectors laid end to end, `e0 ≤ … ≤ e7` their cumulative
/// ends (an unused vector ends where the one before it does), written to `out` from `start`
/// on. Eight parts and the output are ten buffers, within what Metal and Vulkan bind.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn concat8_kernel(
    p0: &Tensor<f32>,
    p1: &Tensor<f32>,
    p2: &Tensor<f32>,
    p3: &Tensor<f32>,
    p4: &Tensor<f32>,
    p5: &Tensor<f32>,
    p6: &Tensor<f32>,
    p7: &Tensor<f32>,
    out: &mut Tensor<f32>,
    start: usize,
    e0: usize,
    e1: usize,
    e2: usize,
    e3: usize,
    e4: usize,
    e5: usize,
    e6: usize,
    e7: usize,
) {
    let i = ABSOLUTE_POS;
    if i >= e7 {
        terminate!();
    }
    let o = start + i;
    if i < e0 {
        out[o] = p0[i];
    } else if i < e1 {
        out[o] = p1[i - e0];
    } else if i < e2 {
        out[o] = p2[i - e1];
    } else if i < e3 {
        out[o] = p3[i - e2];
    } else if i < e4 {
        out[o] = p4[i - e3];
    } else if i < e5 {
        out[o] = p5[i - e4];
    } else if i < e6 {
        out[o] = p6[i - e5];
    } else {
        out[o] = p7[i - e6];
    }
}

/// One thread per value of LoftQ's fit step, `p = B·A`: `next = w − p` and
/// `sq = (residual − c·p)²`.
#[cube(launch)]
pub(super) fn fit_step_kernel(
    residual: &Tensor<f32>,
    p: &Tensor<f32>,
    w: &Tensor<f32>,
    next: &mut Tensor<f32>,
    sq: &mut Tensor<f32>,
    c: f32,
) {
    let i = ABSOLUTE_POS;
    if i >= next.len() {
        terminate!();
    }
    let v = p[i];
    next[i] = w[i] - v;
    let d = residual[i] - c * v;
    sq[i] = d * d;
}

/// One thread per parameter of AdamW's update: `m = β₁m + rest1·g`, `v = β₂v + rest2·g²`,
/// `p = p·decay − m / (√(v / bias2) + ε) · step` with `rest = 1 − β`, `decay = 1 − lr·wd`,
/// `bias2 = 1 − β₂ᵗ` and `step = lr / (1 − β₁ᵗ)`, in the order of the tensor ops it replaces.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn adamw_kernel(
    g: &Tensor<f32>,
    m: &Tensor<f32>,
    v: &Tensor<f32>,
    p: &Tensor<f32>,
    m_out: &mut Tensor<f32>,
    v_out: &mut Tensor<f32>,
    p_out: &mut Tensor<f32>,
    beta1: f32,
    rest1: f32,
    beta2: f32,
    rest2: f32,
    decay: f32,
    bias2: f32,
    eps: f32,
    step: f32,
) {
    let i = ABSOLUTE_POS;
    if i >= p_out.len() {
        terminate!();
    }
    let gi = g[i];
    let mi = m[i] * beta1 + gi * rest1;
    let vi = v[i] * beta2 + gi * gi * rest2;
    m_out[i] = mi;
    v_out[i] = vi;
    p_out[i] = p[i] * decay - mi / ((vi / bias2).sqrt() + eps) * step;
}

/// One thread per value of a group of `N` LoRA layers' factors stacked (`N` = 2 or 3, one
/// rank `r`; layer `k`'s `A` `[r, in]` and `B` `[out_k, r]`): `a_all` `[N·r, in]`, the `A`s one
/// below the other, then `b_blk` `[Σ out, N·r]`, block-diagonal: `s_k·B_k` at layer `k`'s rows
/// (up to `t0`, then `t1`, then the rest) and columns `k·r..(k+1)·r`, zero elsewhere. With two
/// layers the third slots are bound to the first's and never read.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn stack_factors_kernel(
    a0: &Tensor<f32>,
    a1: &Tensor<f32>,
    a2: &Tensor<f32>,
    b0: &Tensor<f32>,
    b1: &Tensor<f32>,
    b2: &Tensor<f32>,
    a_all: &mut Tensor<f32>,
    b_blk: &mut Tensor<f32>,
    r: usize,
    width: usize,
    t0: usize,
    t1: usize,
    s0: f32,
    s1: f32,
    s2: f32,
) {
    let i = ABSOLUTE_POS;
    let na = a_all.len();
    if i >= na + b_blk.len() {
        terminate!();
    }
    if i < na {
        let ea = a0.len();
        if i < ea {
            a_all[i] = a0[i];
        } else if i < 2 * ea {
            a_all[i] = a1[i - ea];
        } else {
            a_all[i] = a2[i - 2 * ea];
        }
    } else {
        let j = i - na;
        let row = j / width;
        let col = j % width;
        let mut v = 0.0;
        if row < t0 {
            if col < r {
                v = s0 * b0[row * r + col];
            }
        } else if row < t1 {
            if col >= r && col < 2 * r {
                v = s1 * b1[(row - t0) * r + col - r];
            }
        } else if col >= 2 * r {
            v = s2 * b2[(row - t1) * r + col - 2 * r];
        }
        b_blk[j] = v;
    }
}

/// One thread per value of `out` `[Σ out, r]`: the diagonal blocks of `d` `[Σ out, width]`,
/// row `i` from column `k·r` on for the layer `k` it belongs to (rows up to `t0`, then `t1`,
/// then the rest, as in [`stack_factors_kernel`]), times that layer's `s_k`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn diagonal_blocks_kernel(
    d: &Tensor<f32>,
    out: &mut Tensor<f32>,
    r: usize,
    width: usize,
    t0: usize,
    t1: usize,
    s0: f32,
    s1: f32,
    s2: f32,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let row = i / r;
    let mut k = 2;
    let mut s = s2;
    if row < t0 {
        k = 0;
        s = s0;
    } else if row < t1 {
        k = 1;
        s = s1;
    }
    out[i] = s * d[row * width + k * r + i % r];
}
