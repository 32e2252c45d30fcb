//! Host kernels for the element-wise parts of a decoder layer and for the loss, forward and
//! backward: RMSNorm, the SiLU gate, and the LM head with its cross-entropy (attention is in
//! [`super::cpu_attention`]). Burn's CPU back end runs these as chains of single-threaded
//! element-wise ops, each allocating a fresh tensor; here each is one pass over row-major
//! slices, split across the rayon pool. [`super::cpu_fused`] wires them into Burn's autodiff.

use faer::{MatMut, MatRef};
use loftq_core::cpu::{Threads, gemm, gemm_rows};
use loftq_core::multiversion;
use rayon::prelude::*;

/// Elements per rayon task in the element-wise kernels.
const GRAIN: usize = 1 << 14;

/// `eˣ` within a few ulp and without branches, so that loops over slices vectorize (glibc's
/// `expf` is a scalar call per element). Cephes' range reduction and polynomial.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // Below −87 the result is under the smallest normal `f32`: zero keeps the products that
    // use it (attention's `P·V`) out of subnormal numbers, which x86 computes many times slower.
    let vanishes = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    // Round x·log₂e to the nearest integer by the 1.5·2²³ trick (no SSE4.1 `round` needed).
    let big = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = big - 12_582_912.0;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2ⁿ: `big`'s low mantissa bits hold n; integer ops only, which vectorize (a float-to-int
    // cast does not).
    let y = y * f32::from_bits(big.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23);
    if vanishes { 0.0 } else { y }
}

/// Lanes of the reductions below: independent partial results let them vectorize (one running
/// float sum cannot be reordered by the compiler).
const LANES: usize = 8;

/// `Σ f(xᵢ)`.
#[inline(always)]
fn sum_of(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// `max xᵢ` (−∞ for none).
pub(super) fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    acc.iter().fold(rest, |m, &v| m.max(v))
}

multiversion! {
/// Replaces each `xᵢ` by `exp(xᵢ − shift)` and returns their sum, accumulated in `f64`: over a
/// 49k vocabulary most terms are below half an `f32` ulp of a running sum, and an `f32` sum
/// (Burn's log-softmax) reads the loss about 1.5e-4 nats low on SmolLM2.
pub(super) fn exp_in_place(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f64; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *v = exp(*v - shift);
            *a += f64::from(*v);
        }
    }
    let mut rest = 0f64;
    for v in chunks.into_remainder() {
        *v = exp(*v - shift);
        rest += f64::from(*v);
    }
    (acc.iter().sum::<f64>() + rest) as f32
}
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

multiversion! {
/// `y[o] = x·w[o]` for every row `o` of `w` (`cols` wide): 16 lanes, then the lanes summed.
fn dot_rows(x: &[f32], w: &[f32], cols: usize, y: &mut [f32]) {
    for (yo, wr) in y.iter_mut().zip(w.chunks_exact(cols)) {
        let mut acc = [0f32; 16];
        let (mut xs, mut ws) = (x.chunks_exact(16), wr.chunks_exact(16));
        for (xa, wa) in (&mut xs).zip(&mut ws) {
            for l in 0..16 {
                acc[l] += xa[l] * wa[l];
            }
        }
        let tail: f32 = xs.remainder().iter().zip(ws.remainder()).map(|(a, b)| a * b).sum();
        *yo = acc.iter().sum::<f32>() + tail;
    }
}
}

/// `x·Wᵀ` for a few rows `x [n, cols]` and `w [out, cols]` (decoding one token): each weight
/// row read once per input row, split across the rayon pool. The general product packs its
/// operands first, which costs a quarter of the time when `n` is 1.
pub(crate) fn matvec(n: usize, x: &[f32], w: &[f32], cols: usize) -> Vec<f32> {
    const ROWS: usize = 64;
    let out = w.len() / cols;
    let mut y = vec![0f32; n * out];
    for (xr, yr) in x.chunks_exact(cols).zip(y.chunks_exact_mut(out)) {
        yr.par_chunks_mut(ROWS)
            .zip(w.par_chunks(ROWS * cols))
            .for_each(|(yc, wc)| dot_rows(xr, wc, cols, yc));
    }
    y
}

/// Row-wise RMSNorm of `x [rows, n]`: `x / √(mean(x²) + eps) · w`.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .with_min_len(GRAIN / n.max(1) + 1)
        .for_each(|(y, x)| rms_norm_row(y, x, w, eps));
    y
}

multiversion! {
fn rms_norm_row(y: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let r = inv_rms(x, eps);
    for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
        *y = x * r * w;
    }
}
}

#[inline(always)]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss = sum_of(x, |v| v * v);
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

/// The gradient of [`rms_norm`]'s input: `r·(w∘dy − x̂·mean(w∘dy∘x̂))` with `x̂ = r·x`.
pub(crate) fn rms_norm_backward(x: &[f32], w: &[f32], eps: f32, dy: &[f32]) -> Vec<f32> {
    let n = w.len();
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(n)
        .zip(x.par_chunks(n).zip(dy.par_chunks(n)))
        .with_min_len(GRAIN / n.max(1) + 1)
        .for_each(|(dx, (x, dy))| rms_norm_row_backward(dx, x, w, eps, dy));
    dx
}

multiversion! {
fn rms_norm_row_backward(dx: &mut [f32], x: &[f32], w: &[f32], eps: f32, dy: &[f32]) {
    let r = inv_rms(x, eps);
    let dot: f32 = x.iter().zip(dy).zip(w).map(|((x, g), w)| x * g * w).sum();
    let c = dot * r * r / x.len() as f32;
    for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
        *dx = r * (w * g - x * c);
    }
}
}

/// `silu(g)·u`, element-wise.
pub(crate) fn silu_mul(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; g.len()];
    y.par_chunks_mut(GRAIN)
        .zip(g.par_chunks(GRAIN).zip(u.par_chunks(GRAIN)))
        .for_each(|(y, (g, u))| silu_mul_run(y, g, u));
    y
}

multiversion! {
fn silu_mul_run(y: &mut [f32], g: &[f32], u: &[f32]) {
    for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
        *y = g * sigmoid(*g) * u;
    }
}
}

/// The gradients `(dg, du)` of [`silu_mul`].
pub(crate) fn silu_mul_backward(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
    dg.par_chunks_mut(GRAIN)
        .zip(du.par_chunks_mut(GRAIN))
        .zip(
            g.par_chunks(GRAIN)
                .zip(u.par_chunks(GRAIN))
                .zip(dy.par_chunks(GRAIN)),
        )
        .for_each(|((dg, du), ((g, u), dy))| silu_mul_backward_run(dg, du, g, u, dy));
    (dg, du)
}

multiversion! {
fn silu_mul_backward_run(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
    for ((((dg, du), g), u), dy) in dg.iter_mut().zip(du).zip(g).zip(u).zip(dy) {
        let s = sigmoid(*g);
        *dg = dy * u * s * (1.0 + g * (1.0 - s));
        *du = dy * g * s;
    }
}
}

/// `[s, a]·[s, b]` products on `[seq, d]` blocks.
pub(super) fn prod(
    dst: &mut [f32],
    add: bool,
    lhs: MatRef<'_, f32>,
    rhs: MatRef<'_, f32>,
    alpha: f32,
) {
    gemm_rows(dst, add, [lhs, rhs], alpha, Threads::Here);
}

pub(super) fn rows(x: &[f32], r: usize, c: usize) -> MatRef<'_, f32> {
    MatRef::from_row_major_slice(x, r, c)
}

/// Rows of logits held at once by [`cross_entropy`]: 512 × a 49k vocabulary is 100 MB, a
/// twentieth of the whole graph's peak. Fewer rows make the head's products slower (on this
/// machine 107 against 133 GFLOP/s for the logits, 147 against 210 for `dL/dh`, at 128 and
/// 512 rows).
const CE_ROWS: usize = 512;

/// Vocabulary entries per product of the logits: faer's product over the whole 49k vocabulary
/// runs at 133 GFLOP/s on this machine, in blocks of 8192 at 195.
const CE_COLS: usize = 8192;

/// The mean negative log-likelihood of `targets` under `softmax(h·Eᵀ)` for `h [rows, hidden]`
/// and `e [vocab, hidden]`, and with `grad` also `dL/dh [rows, hidden]`. The logits are made
/// a block of rows at a time and never kept.
///
/// # Panics
/// If a target is not below `vocab`.
pub(crate) fn cross_entropy(
    h: &[f32],
    e: MatRef<'_, f32>,
    targets: &[u32],
    grad: bool,
) -> (f64, Option<Vec<f32>>) {
    cross_entropy_in(h, e, targets, grad, [CE_ROWS, CE_COLS])
}

/// [`cross_entropy`] with logits made `block_rows` rows at a time, each row block in
/// products of `block_cols` vocabulary entries.
pub(crate) fn cross_entropy_in(
    h: &[f32],
    e: MatRef<'_, f32>,
    targets: &[u32],
    grad: bool,
    [block_rows, block_cols]: [usize; 2],
) -> (f64, Option<Vec<f32>>) {
    let (vocab, hidden) = (e.nrows(), e.ncols());
    let n = targets.len();
    assert_eq!(h.len(), n * hidden, "one target per row of h");
    let mut dh = grad.then(|| vec![0f32; n * hidden]);
    let mut logits = vec![0f32; block_rows.min(n) * vocab];
    let mut nll = 0f64;
    for start in (0..n).step_by(block_rows) {
        let c = block_rows.min(n - start);
        let block = &mut logits[..c * vocab];
        let hb = rows(&h[start * hidden..(start + c) * hidden], c, hidden);
        let mut dst = MatMut::from_row_major_slice_mut(block, c, vocab);
        for v0 in (0..vocab).step_by(block_cols) {
            let w = block_cols.min(vocab - v0);
            gemm(
                dst.as_mut().submatrix_mut(0, v0, c, w),
                hb,
                e.subrows(v0, w).transpose(),
                1.0,
            );
        }
        let tgt = &targets[start..start + c];
        nll += block
            .par_chunks_mut(vocab)
            .zip(tgt.par_iter())
            .map(|(row, &t)| {
                let t = t as usize;
                assert!(t < vocab, "target {t} is outside the vocabulary ({vocab})");
                let max = max_of(row);
                let target = row[t];
                let sum = exp_in_place(row, max);
                if grad {
                    // softmax / n, minus 1/n at the target.
                    let inv_n = 1.0 / n as f32;
                    let c = inv_n / sum;
                    row.iter_mut().for_each(|v| *v *= c);
                    row[t] -= inv_n;
                }
                f64::from(max + sum.ln() - target)
            })
            .sum::<f64>();
        if let Some(dh) = &mut dh {
            gemm(
                MatMut::from_row_major_slice_mut(
                    &mut dh[start * hidden..(start + c) * hidden],
                    c,
                    hidden,
                ),
                rows(block, c, vocab),
                e,
                1.0,
            );
        }
    }
    (nll / n as f64, dh)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic test values in `[-5, 5)`.
    pub(crate) fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 2_654_435_761) % 10_007) as f32 / 1000.0 - 5.0)
            .collect()
    }

    /// The one-row product against every weight row, `cols` not a multiple of the lanes, two
    /// input rows: the `f64` dot products within `f32` rounding, and the portable copy's bits.
    #[test]
    fn matvec_is_the_product() {
        let (n, out, cols) = (2, 203, 77);
        let (x, w) = (values(n * cols, 5), values(out * cols, 6));
        let y = matvec(n, &x, &w, cols);
        for r in 0..n {
            for o in 0..out {
                let want: f64 = (0..cols)
                    .map(|i| f64::from(x[r * cols + i]) * f64::from(w[o * cols + i]))
                    .sum();
                let got = f64::from(y[r * out + o]);
                assert!(
                    (got - want).abs() < 1e-5 * (1.0 + want.abs()) * cols as f64,
                    "{r},{o}"
                );
            }
        }
        let mut p = vec![0f32; out];
        dot_rows::portable(&x[..cols], &w, cols, &mut p);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&p), bits(&y[..out]));
    }

    /// The copies [`multiversion!`] compiles for this CPU give the portable copy's bits.
    #[test]
    fn vector_copies_give_the_portable_bits() {
        let n = 1000 + 7;
        let (g, u, dy) = (values(n, 1), values(n, 2), values(n, 3));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();

        let (mut a, mut b) = (g.clone(), g.clone());
        let (sa, sb) = (
            exp_in_place(&mut a, 1.5),
            exp_in_place::portable(&mut b, 1.5),
        );
        assert_eq!((sa.to_bits(), bits(&a)), (sb.to_bits(), bits(&b)), "exp");

        let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
        silu_mul_run(&mut a, &g, &u);
        silu_mul_run::portable(&mut b, &g, &u);
        assert_eq!(bits(&a), bits(&b), "silu");

        let (mut a, mut b) = (
            [vec![0f32; n], vec![0f32; n]],
            [vec![0f32; n], vec![0f32; n]],
        );
        let [a0, a1] = &mut a;
        silu_mul_backward_run(a0, a1, &g, &u, &dy);
        let [b0, b1] = &mut b;
        silu_mul_backward_run::portable(b0, b1, &g, &u, &dy);
        assert_eq!(a.map(|v| bits(&v)), b.map(|v| bits(&v)), "silu backward");

        let w = values(n, 4);
        let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
        rms_norm_row(&mut a, &g, &w, 1e-5);
        rms_norm_row::portable(&mut b, &g, &w, 1e-5);
        assert_eq!(bits(&a), bits(&b), "rms");
        rms_norm_row_backward(&mut a, &g, &w, 1e-5, &dy);
        rms_norm_row_backward::portable(&mut b, &g, &w, 1e-5, &dy);
        assert_eq!(bits(&a), bits(&b), "rms backward");
    }
}
