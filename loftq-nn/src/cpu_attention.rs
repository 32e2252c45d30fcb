//! Causal self-attention with rotary embeddings on the host, forward and backward, one
//! `(batch row, kv head)` group of query heads per rayon task, in blocks of query rows.

use loftq_core::cpu::{Threads, gemm_rows};
use loftq_core::multiversion;
use rayon::prelude::*;

use super::cpu_kernels::{exp_in_place, max_of, prod, rows};

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

/// The rotary tables, `[seq, dim]` each: the first `dim` dimensions of a head turn.
#[derive(Clone, Copy)]
pub(crate) struct Rope<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub dim: usize,
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
    /// Rows of `width` (a multiple of `d`: several heads at one position), each head's first
    /// [`dim`](Self::dim) rotated.
    fn rotate(&self, x: &mut [f32], d: usize, width: usize, transpose: bool) {
        rotate_rows(x, [self.cos, self.sin], [d, self.dim], width, transpose);
    }
}

multiversion! {
/// [`Rope::rotate`] of the rows of `x [seq, width]`, each a run of heads of `d` whose first
/// `rd` turn.
fn rotate_rows(x: &mut [f32], tables: [&[f32]; 2], dims: [usize; 2], width: usize, transpose: bool) {
    let ([cos, sin], [d, rd]) = (tables, dims);
    let half = rd / 2;
    for ((heads, cos), sin) in x.chunks_mut(width).zip(cos.chunks(rd)).zip(sin.chunks(rd)) {
        let (s1, s2) = sin.split_at(half);
        for row in heads.chunks_mut(d) {
            let (x1, x2) = row[..rd].split_at_mut(half);
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

/// A task's batch row, key head, and its query group, key and value heads.
type TaskHeads = (usize, usize, [Vec<f32>; 3]);

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

    /// The inputs of one of the `batch·kv_heads` tasks: its batch row `b` and key head `j`,
    /// the rotated query [`Self::group`] of `j`, the rotated key head and the value head.
    fn task(&self, task: usize, [q, k, v]: [&[f32]; 3], rope: Rope<'_>) -> TaskHeads {
        let (b, j) = (task / self.kv_heads, task % self.kv_heads);
        let heads = [
            self.group(q, b, j, Some(rope)),
            self.head(k, self.kv_heads, b, j, Some(rope)),
            self.head(v, self.kv_heads, b, j, None),
        ];
        (b, j, heads)
    }

    /// One block of the causal products: the probabilities `pb [n, t1]` of rows
    /// `r0..r0 + n` of a [`Self::group`] `qb` of roped query heads (`g` per position) against
    /// the first `t1` keys `k [t1, d]` (a row's keys after its position get zeros), and the
    /// output `ob [n, d] = pb·v` for the first `t1` values `v`.
    fn block(&self, pb: &mut [f32], ob: &mut [f32], [qb, k, v]: [&[f32]; 3], r0: usize, g: usize) {
        let d = self.head_dim;
        let (n, t1) = (qb.len() / d, k.len() / d);
        let (q, k) = (rows(qb, n, d), rows(k, t1, d));
        gemm_rows(pb, false, [q, k.transpose()], self.scale(), Threads::Here);
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
            let (b, j, [qg, kh, vh]) = sh.task(task, [q, k, v], rope);
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
            let (b, j, [qg, kh, vh]) = sh.task(task, [q, k, v], rope);
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
                let (qm, dom) = (rows(qb, m, d), rows(dob, m, d));
                prod(&mut dk[..t1 * d], true, dsm.transpose(), qm, 1.0);
                prod(&mut dv[..t1 * d], true, pm.transpose(), dom, 1.0);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_kernels::tests::values;

    /// The copies [`multiversion!`] compiles for this CPU give the portable copy's bits.
    #[test]
    fn vector_copies_give_the_portable_bits() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (s, d) = (19, 8);
        let (cos, sin) = (values(s * d, 5), values(s * d, 6));
        let (mut a, mut b) = (values(s * d, 7), values(s * d, 7));
        // Every dimension turning, and (Phi) the first 6 of 8.
        for rd in [d, 6] {
            let tables = [&cos[..s * rd], &sin[..s * rd]];
            rotate_rows(&mut a, tables, [d, rd], d, true);
            rotate_rows::portable(&mut b, tables, [d, rd], d, true);
            assert_eq!(bits(&a), bits(&b), "rope");
        }

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
