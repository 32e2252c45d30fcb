//! Host kernels for the element-wise parts of a decoder layer and for the loss, forward and
//! backward: RMSNorm, the SiLU gate, causal attention with rotary embeddings, and the LM head
//! with its cross-entropy. Burn's CPU back end runs these as chains of single-threaded
//! element-wise ops, each allocating a fresh tensor; here each is one pass over row-major
//! slices, split across the rayon pool. [`super::cpu_fused`] wires them into Burn's autodiff.

use faer::{MatMut, MatRef};
use loftq_core::cpu::{gemm, gemm_seq};
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
fn max_of(x: &[f32]) -> f32 {
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
fn exp_in_place(x: &mut [f32], shift: f32) -> f32 {
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

/// The shape of a causal self-attention: `q [batch, seq, heads·head_dim]`, `k` and `v`
/// `[batch, seq, kv_heads·head_dim]`, and the rotary tables `cos`, `sin` `[seq, head_dim]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// The rotary tables, `[seq, head_dim]` each.
#[derive(Clone, Copy)]
pub(crate) struct Rope<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
}

impl Rope<'_> {
    /// `x·cos + rotate_half(x)·sin` for each row of `x [seq, d]`, in place.
    fn apply(&self, x: &mut [f32], d: usize) {
        self.rotate(x, d, d, false);
    }

    /// The transpose of [`Self::apply`] (the gradient of its input), in place.
    fn unapply(&self, g: &mut [f32], d: usize) {
        self.rotate(g, d, d, true);
    }

    /// With `(a, b)` the two halves' entries at one position, `(a·cos₁ + b·p, b·cos₂ + a·q)`:
    /// `p = −sin₁`, `q = sin₂` for the rotation, and `p = sin₂`, `q = −sin₁` for its transpose.
    /// Rows of `width` (a multiple of `d`: several heads at one position), each head rotated.
    fn rotate(&self, x: &mut [f32], d: usize, width: usize, transpose: bool) {
        rotate_rows(x, self.cos, self.sin, d, width, transpose);
    }
}

multiversion! {
/// [`Rope::rotate`] of the rows of `x [seq, width]`, each a run of heads of `d`.
fn rotate_rows(x: &mut [f32], cos: &[f32], sin: &[f32], d: usize, width: usize, transpose: bool) {
    let half = d / 2;
    for ((heads, cos), sin) in x.chunks_mut(width).zip(cos.chunks(d)).zip(sin.chunks(d)) {
        let (s1, s2) = sin.split_at(half);
        for row in heads.chunks_mut(d) {
            let (x1, x2) = row.split_at_mut(half);
            for c in 0..half {
                let (a, b) = (x1[c], x2[c]);
                let (p, q) = if transpose {
                    (s2[c], -s1[c])
                } else {
                    (-s1[c], s2[c])
                };
                x1[c] = a * cos[c] + b * p;
                x2[c] = b * cos[half + c] + a * q;
            }
        }
    }
}
}

impl AttnShape {
    /// Head `head` of batch row `b` of `x [batch, seq, n_heads·head_dim]` as `[seq, head_dim]`.
    fn gather(&self, x: &[f32], n_heads: usize, b: usize, head: usize) -> Vec<f32> {
        let (s, d) = (self.seq, self.head_dim);
        let width = n_heads * d;
        let mut out = Vec::with_capacity(s * d);
        for t in 0..s {
            let at = (b * s + t) * width + head * d;
            out.extend_from_slice(&x[at..at + d]);
        }
        out
    }

    /// Writes runs of consecutive heads back into `[batch, seq, n_heads·head_dim]`: each entry
    /// is a batch row, its first head, and `[seq, run·head_dim]` (the run's heads side by
    /// side at each position, as [`Self::group`] makes them).
    fn scatter(&self, runs: Vec<(usize, usize, Vec<f32>)>, n_heads: usize) -> Vec<f32> {
        let (s, d) = (self.seq, self.head_dim);
        let width = n_heads * d;
        let mut out = vec![0f32; self.batch * s * width];
        for (b, first, run) in runs {
            let w = run.len() / s;
            for (t, row) in run.chunks(w).enumerate() {
                let at = (b * s + t) * width + first * d;
                out[at..at + w].copy_from_slice(row);
            }
        }
        out
    }

    /// [`Self::gather`], with the rotary embedding applied if given.
    fn head(
        &self,
        x: &[f32],
        n_heads: usize,
        b: usize,
        head: usize,
        rope: Option<Rope<'_>>,
    ) -> Vec<f32> {
        let mut h = self.gather(x, n_heads, b, head);
        if let Some(rope) = rope {
            rope.apply(&mut h, self.head_dim);
        }
        h
    }

    /// The query heads that share key head `j` (`g = heads / kv_heads` of them) of batch row
    /// `b` of `x [batch, seq, heads·head_dim]`, rotated if asked: `[seq, g·head_dim]`, read as
    /// `[seq·g, head_dim]` rows (position `t`'s heads at rows `t·g..(t+1)·g`). One product then
    /// serves the group, and a block of positions is a block of rows.
    fn group(&self, x: &[f32], b: usize, j: usize, rope: Option<Rope<'_>>) -> Vec<f32> {
        let (s, d) = (self.seq, self.head_dim);
        let gd = self.heads / self.kv_heads * d;
        let width = self.heads * d;
        let mut out = Vec::with_capacity(s * gd);
        for t in 0..s {
            let at = (b * s + t) * width + j * gd;
            out.extend_from_slice(&x[at..at + gd]);
        }
        if let Some(rope) = rope {
            rope.rotate(&mut out, d, gd, false);
        }
        out
    }

    /// Key head `j` of batch row `b` (rotated) and its value head.
    fn key_value(
        &self,
        [k, v]: [&[f32]; 2],
        rope: Rope<'_>,
        b: usize,
        j: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        (
            self.head(k, self.kv_heads, b, j, Some(rope)),
            self.head(v, self.kv_heads, b, j, None),
        )
    }

    /// One block of the causal products: the probabilities `pb [n, t1]` of rows
    /// `r0..r0 + n` of a [`Self::group`] `qb` of roped query heads (`g` per position) against
    /// the first `t1` keys `k [t1, d]` (a row's keys after its position get zeros), and the
    /// output `ob [n, d] = pb·v` for the first `t1` values `v`.
    fn block(&self, pb: &mut [f32], ob: &mut [f32], [qb, k, v]: [&[f32]; 3], r0: usize, g: usize) {
        let d = self.head_dim;
        let (n, t1) = (qb.len() / d, k.len() / d);
        gemm_seq(
            MatMut::from_row_major_slice_mut(pb, n, t1),
            false,
            rows(qb, n, d),
            rows(k, t1, d).transpose(),
            self.scale(),
        );
        for (i, row) in pb.chunks_mut(t1).enumerate() {
            let (live, future) = row.split_at_mut((r0 + i) / g + 1);
            let inv = 1.0 / exp_in_place(live, max_of(live));
            live.iter_mut().for_each(|v| *v *= inv);
            future.fill(0.0);
        }
        prod(ob, false, rows(pb, n, t1), rows(v, t1, d), 1.0);
    }

    /// The output `[seq·g, d]` of a [`Self::group`] of roped query heads against one key and
    /// value head `[seq, d]`. A block of positions needs only the keys up to its end
    /// (causality), and its probabilities are held a block at a time.
    fn output(&self, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let (s, d) = (self.seq, self.head_dim);
        let g = q.len() / (s * d);
        let mut pb = vec![0f32; ATTN_BLOCK.min(s) * g * s];
        let mut o = vec![0f32; s * g * d];
        for [r0, r1, t1] in causal_blocks(s, g) {
            let qkv = [&q[r0 * d..r1 * d], &k[..t1 * d], &v[..t1 * d]];
            self.block(
                &mut pb[..(r1 - r0) * t1],
                &mut o[r0 * d..r1 * d],
                qkv,
                r0,
                g,
            );
        }
        o
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// Query positions per block of the causal products.
const ATTN_BLOCK: usize = 32;

/// `[first row, end row, keys]` of each block of [`ATTN_BLOCK`] positions of a group of `g`
/// heads over `s` positions: rows `t·g` for positions `t`, keys up to the block's end.
fn causal_blocks(s: usize, g: usize) -> impl Iterator<Item = [usize; 3]> {
    (0..s).step_by(ATTN_BLOCK).map(move |t0| {
        let t1 = (t0 + ATTN_BLOCK).min(s);
        [t0 * g, t1 * g, t1]
    })
}

multiversion! {
/// `dS = P∘(dP − rowsum(dO∘O))·scale` in place of `dP` (`ds`), for `[rows, seq]` blocks `ds`,
/// `p` and `[rows, d]` blocks `dout`, `o`.
fn softmax_backward(ds: &mut [f32], p: &[f32], dout: &[f32], o: &[f32], d: usize, scale: f32) {
    let s = p.len() / (dout.len() / d);
    for ((row, prow), (dor, or)) in ds.chunks_mut(s).zip(p.chunks(s)).zip(dout.chunks(d).zip(o.chunks(d))) {
        let dot: f32 = dor.iter().zip(or).map(|(a, b)| a * b).sum();
        for (x, p) in row.iter_mut().zip(prow) {
            *x = p * (*x - dot) * scale;
        }
    }
}
}

/// `[s, a]·[s, b]` products on `[seq, d]` blocks.
fn prod(dst: &mut [f32], add: bool, lhs: MatRef<'_, f32>, rhs: MatRef<'_, f32>, alpha: f32) {
    let (m, n) = (lhs.nrows(), rhs.ncols());
    gemm_seq(
        MatMut::from_row_major_slice_mut(dst, m, n),
        add,
        lhs,
        rhs,
        alpha,
    );
}

fn rows(x: &[f32], r: usize, c: usize) -> MatRef<'_, f32> {
    MatRef::from_row_major_slice(x, r, c)
}

/// Causal grouped-query attention with rotary embeddings applied to `q` and `k`; the output
/// is `[batch, seq, heads·head_dim]`, ready for `o_proj`.
pub(crate) fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    rope: Rope<'_>,
    sh: AttnShape,
) -> Vec<f32> {
    let g = sh.heads / sh.kv_heads;
    let runs: Vec<_> = (0..sh.batch * sh.kv_heads)
        .into_par_iter()
        .map(|task| {
            let (b, j) = (task / sh.kv_heads, task % sh.kv_heads);
            let (kh, vh) = sh.key_value([k, v], rope, b, j);
            let qg = sh.group(q, b, j, Some(rope));
            (b, j * g, sh.output(&qg, &kh, &vh))
        })
        .collect();
    sh.scatter(runs, sh.heads)
}

/// The gradients `(dq, dk, dv)` of [`attention`] for the output gradient `dout`. The
/// probabilities are recomputed rather than kept from the forward pass.
pub(crate) fn attention_backward(
    [q, k, v]: [&[f32]; 3],
    rope: Rope<'_>,
    sh: AttnShape,
    dout: &[f32],
) -> [Vec<f32>; 3] {
    let (s, d, g) = (sh.seq, sh.head_dim, sh.heads / sh.kv_heads);
    let n = g * s;
    let per_task: Vec<_> = (0..sh.batch * sh.kv_heads)
        .into_par_iter()
        .map(|task| {
            let (b, j) = (task / sh.kv_heads, task % sh.kv_heads);
            let (kh, vh) = sh.key_value([k, v], rope, b, j);
            let qg = sh.group(q, b, j, Some(rope));
            let dog = sh.group(dout, b, j, None);
            // One block's probabilities, their gradient and output at a time.
            let block = ATTN_BLOCK.min(s) * g;
            let (mut pb, mut dsb) = (vec![0f32; block * s], vec![0f32; block * s]);
            let mut ob = vec![0f32; block * d];
            let mut dq = vec![0f32; n * d];
            let (mut dk, mut dv) = (vec![0f32; s * d], vec![0f32; s * d]);
            for [r0, r1, t1] in causal_blocks(s, g) {
                let m = r1 - r0;
                let (pb, dsb, ob) = (&mut pb[..m * t1], &mut dsb[..m * t1], &mut ob[..m * d]);
                let (qb, dob) = (&qg[r0 * d..r1 * d], &dog[r0 * d..r1 * d]);
                let (kb, vb) = (rows(&kh[..t1 * d], t1, d), rows(&vh[..t1 * d], t1, d));
                sh.block(pb, ob, [qb, &kh[..t1 * d], &vh[..t1 * d]], r0, g);
                // dP = dO·Vᵀ, then dS = P∘(dP − rowsum(dO∘O))·scale.
                prod(dsb, false, rows(dob, m, d), vb.transpose(), 1.0);
                softmax_backward(dsb, pb, dob, ob, d, sh.scale());
                let (dsm, pm) = (rows(dsb, m, t1), rows(pb, m, t1));
                prod(&mut dq[r0 * d..r1 * d], false, dsm, kb, 1.0);
                prod(
                    &mut dk[..t1 * d],
                    true,
                    dsm.transpose(),
                    rows(qb, m, d),
                    1.0,
                );
                prod(
                    &mut dv[..t1 * d],
                    true,
                    pm.transpose(),
                    rows(dob, m, d),
                    1.0,
                );
            }
            rope.rotate(&mut dq, d, g * d, true);
            rope.unapply(&mut dk, d);
            ((b, j * g, dq), (b, j, dk), (b, j, dv))
        })
        .collect();
    let mut dq = Vec::new();
    let (mut dk, mut dv) = (Vec::new(), Vec::new());
    for (q, k, v) in per_task {
        dq.push(q);
        dk.push(k);
        dv.push(v);
    }
    [
        sh.scatter(dq, sh.heads),
        sh.scatter(dk, sh.kv_heads),
        sh.scatter(dv, sh.kv_heads),
    ]
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
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
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

        let (s, d) = (19, 8);
        let (cos, sin) = (values(s * d, 5), values(s * d, 6));
        let (mut a, mut b) = (values(s * d, 7), values(s * d, 7));
        rotate_rows(&mut a, &cos, &sin, d, d, true);
        rotate_rows::portable(&mut b, &cos, &sin, d, d, true);
        assert_eq!(bits(&a), bits(&b), "rope");

        let (p, o, dout) = (
            values(3 * s * s, 8),
            values(3 * s * d, 9),
            values(3 * s * d, 10),
        );
        let (mut a, mut b) = (values(3 * s * s, 11), values(3 * s * s, 11));
        softmax_backward(&mut a, &p, &dout, &o, d, 0.3);
        softmax_backward::portable(&mut b, &p, &dout, &o, d, 0.3);
        assert_eq!(bits(&a), bits(&b), "softmax backward");
    }
}
