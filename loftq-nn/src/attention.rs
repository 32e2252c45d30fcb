//! Causal grouped-query self-attention with rotary embeddings.

use burn::module::Module;
use burn::tensor::{Bool, Device, Tensor};
use loftq_core::device::rows_per_buffer;

use super::kernels;
use super::norm::sum_last;
use super::{QLinear, RopeTables};

/// `self_attn.{q_proj, k_proj, v_proj, o_proj}`, or Phi-3's `self_attn.{qkv_proj, o_proj}`.
#[derive(Module, Debug)]
pub struct Attention {
    /// `q_proj [heads·head_dim, hidden]`, `k_proj` and `v_proj` `[kv_heads·head_dim, hidden]`;
    /// or one `qkv_proj` with their rows stacked in that order.
    pub qkv: Vec<QLinear>,
    /// `[hidden, heads·head_dim]`.
    pub o_proj: QLinear,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; each serves `heads / kv_heads` query heads.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Sliding window: each position attends to this many positions, itself included
    /// (`None`: every earlier position).
    #[module(skip)]
    pub window: Option<usize>,
}

impl Attention {
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`, every position attending to itself
    /// and the ones before it (the last [`window`](Self::window) of them, if set).
    pub fn forward(&self, x: Tensor<3>, rope: &RopeTables) -> Tensor<3> {
        self.o_proj.forward(self.attention(x, rope))
    }

    /// The attention of `x [batch, seq, hidden]` before `o_proj`: `[batch, seq, heads·head_dim]`.
    /// On WGPU and CUDA, where the projections can make their outputs side by side in one
    /// product (one `qkv_proj`, or q/k/v merged over packed codebook bases), attention reads
    /// them there, with no copies to split them.
    pub fn attention(&self, x: Tensor<3>, rope: &RopeTables) -> Tensor<3> {
        let [b, seq, _] = x.dims();
        let (hs, window) = ([self.heads, self.kv_heads], self.window);
        // What `attend` would give the fused operation: the whole input, scores in one buffer.
        let one_piece =
            window.is_none_or(|w| w >= seq) && scores_fit(&x.device(), [b, self.heads, seq]);
        let stacked = match self.qkv.as_slice() {
            [qkv] => Some(qkv.forward(x.clone())),
            layers if one_piece && loftq_core::fused::applies(&x) => {
                QLinear::forward_group(layers, &x)
            }
            _ => None,
        };
        let Some(qkv) = stacked else {
            return attend(self.project(x), rope, hs, window);
        };
        let fused = one_piece
            .then(|| {
                loftq_core::fused::causal_attention_packed(&qkv, &rope.cos, &rope.swapped_sin, hs)
            })
            .flatten();
        fused.unwrap_or_else(|| attend(self.split(qkv), rope, hs, window))
    }

    /// The queries `[batch, seq, heads·head_dim]`, keys and values
    /// `[batch, seq, kv_heads·head_dim]` of `x [batch, seq, hidden]`.
    pub fn project(&self, x: Tensor<3>) -> [Tensor<3>; 3] {
        match self.qkv.as_slice() {
            [q, k, v] => [q.forward(x.clone()), k.forward(x.clone()), v.forward(x)],
            [qkv] => self.split(qkv.forward(x)),
            other => unreachable!("{} q/k/v projections", other.len()),
        }
    }

    /// The queries, keys and values of `y`, where they sit side by side.
    fn split(&self, y: Tensor<3>) -> [Tensor<3>; 3] {
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        [
            y.clone().narrow(2, 0, q),
            y.clone().narrow(2, q, kv),
            y.narrow(2, q + kv, kv),
        ]
    }
}

/// Causal attention of projected `q [b, s, heads·d]`, `k`, `v` `[b, s, kv_heads·d]`, rotary
/// embeddings applied to `q` and `k`: `[b, s, heads·d]`, each position seeing the last `window`
/// positions when set. When the window covers the input: one host kernel on the CPU back end,
/// one recorded operation of CubeCL kernels and products on WGPU and CUDA.
pub(crate) fn attend(
    [q, k, v]: [Tensor<3>; 3],
    rope: &RopeTables,
    [h, kvh]: [usize; 2],
    window: Option<usize>,
) -> Tensor<3> {
    let [b, seq, _] = q.dims();
    // A window at least as long as the input changes nothing.
    let window = window.filter(|&w| w < seq);
    if window.is_none()
        && let Some(y) = kernels::attention([&q, &k, &v], [&rope.cos, &rope.sin], [h, kvh])
    {
        return y;
    }
    // Scores too large for one device buffer go block by block, in the generic path.
    if window.is_none()
        && scores_fit(&q.device(), [b, h, seq])
        && let Some(y) = loftq_core::fused::causal_attention(
            [&q, &k, &v],
            &rope.cos,
            &rope.swapped_sin,
            [h, kvh],
        )
    {
        return y;
    }
    attend_generic([q, k, v], rope, [h, kvh], window)
}

/// Whether the scores of `h` heads over `seq` positions, `b` rows of the batch, fit one device
/// buffer (else attention goes block by block).
fn scores_fit(device: &Device, [b, h, seq]: [usize; 3]) -> bool {
    rows_per_buffer(device, b * h * seq) >= seq
}

/// [`attend`] in Burn's generic ops.
pub(crate) fn attend_generic(
    [q, k, v]: [Tensor<3>; 3],
    rope: &RopeTables,
    [h, kvh]: [usize; 2],
    window: Option<usize>,
) -> Tensor<3> {
    let [b, s, width] = q.dims();
    let d = width / h;
    let split = |t: Tensor<3>, heads: usize| t.reshape([b, s, heads, d]);
    let heads_first = |t: Tensor<4>| t.swap_dims(1, 2);
    attend_rotated(
        heads_first(rope.apply(split(q, h))),
        heads_first(rope.apply(split(k, kvh))),
        heads_first(split(v, kvh)),
        window,
    )
}

/// Attention of rotated queries `q [b, heads, n, d]` over rotated keys and values
/// `[b, kv_heads, t, d]`, the queries being the last `n` of the `t` positions, each seeing
/// itself and the positions before it (the last `window` of them, if set): `[b, n, heads·d]`.
pub(crate) fn attend_rotated(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    window: Option<usize>,
) -> Tensor<3> {
    let [b, h, n, _] = q.dims();
    let t = k.dims()[2];
    // Query rows whose scores (`h·t` per row of the batch) fit one device buffer.
    match rows_per_buffer(&q.device(), b * h * t) {
        rows if rows < n => attend_blocks(q, k, v, window, rows),
        _ => attend_block(q, k, v, window),
    }
}

/// [`attend_rotated`] `rows` queries at a time, each block over the keys its queries see (from
/// the first one its window reaches to its last query), so that no block's scores are larger
/// than `rows × t` per head: on a GPU one buffer holds a block's scores where the whole input's
/// would not fit (151 MB for 9 heads over 2,048 positions, lavapipe's limit being 128 MiB).
fn attend_blocks(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    window: Option<usize>,
    rows: usize,
) -> Tensor<3> {
    let n = q.dims()[2];
    let t = k.dims()[2];
    let blocks = (0..n).step_by(rows.max(1)).map(|i| {
        let m = rows.min(n - i);
        // Query `i` is at position `t − n + i`.
        let (first, end) = (t - n + i, t - n + i + m);
        let from = window.map_or(0, |w| (first + 1).saturating_sub(w));
        let keys = |x: &Tensor<4>| x.clone().narrow(2, from, end - from);
        attend_block(q.clone().narrow(2, i, m), keys(&k), keys(&v), window)
    });
    Tensor::cat(blocks.collect(), 1)
}

/// [`attend_rotated`] in one piece.
fn attend_block(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, window: Option<usize>) -> Tensor<3> {
    let [b, h, n, d] = q.dims();
    let [_, kvh, t, _] = k.dims();
    let (k, v) = (repeat_kv(k, h / kvh), repeat_kv(v, h / kvh));
    // On WGPU and CUDA the scaled, masked softmax is one kernel when every earlier key is
    // visible.
    if window.is_none_or(|w| w >= t) && loftq_core::fused::applies(&q) {
        let scores = q.clone().matmul(k.clone().swap_dims(2, 3));
        let scale = 1.0 / (d as f32).sqrt();
        if let Some(p) = loftq_core::fused::causal_softmax(&scores, scale) {
            return p.matmul(v).swap_dims(1, 2).reshape([b, n, h * d]);
        }
    }
    let hidden = hidden_keys(t - n, n, window, &q.device())
        .map(|m| m.reshape([1, 1, n, t]).expand([b, h, n, t]));
    softmax_attention(q, k, v, hidden)
}

/// Scaled dot-product attention of `q [b, h, n, d]` over `k`, `v` `[b, h, t, d]` (as many
/// heads), the keys where `hidden [b, h, n, t]` is true left out: `[b, n, h·d]`, the heads side
/// by side. Causal decoders and bidirectional encoders differ only in `hidden`.
pub(crate) fn softmax_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    hidden: Option<Tensor<4, Bool>>,
) -> Tensor<3> {
    let d = q.dims()[3];
    biased_attention(q, k, v, (d as f64).sqrt(), None, hidden)
}

/// [`softmax_attention`] with the scores divided by `scale` and `bias [b, h, n, t]` added to
/// them (DeBERTa's relative-position scores).
pub(crate) fn biased_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    scale: f64,
    bias: Option<Tensor<4>>,
    hidden: Option<Tensor<4, Bool>>,
) -> Tensor<3> {
    let [b, h, n, d] = q.dims();
    let mut scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / scale);
    if let Some(bias) = bias {
        scores = scores + bias;
    }
    if let Some(hidden) = hidden {
        scores = scores.mask_fill(hidden, f32::MIN);
    }
    let out = softmax_last(scores).matmul(v);
    out.swap_dims(1, 2).reshape([b, n, h * d])
}

/// Softmax over the last dimension, its sums by [`sum_last`] (Burn's `softmax` sums with
/// `sum_dim`, whose backward pass takes three kernels where a product's takes one).
fn softmax_last(x: Tensor<4>) -> Tensor<4> {
    let max = x.clone().detach().max_dim(3);
    let e = (x - max).exp();
    e.clone().div(sum_last(e, 1.0))
}

/// `[n, start + n]`, true where the query at position `start + i` may not see key `j`: a
/// later position (`j > start + i`) or, with a window `w`, one at `j ≤ start + i - w`. `None`
/// when every key is visible (one query within the window).
fn hidden_keys(
    start: usize,
    n: usize,
    window: Option<usize>,
    device: &Device,
) -> Option<Tensor<2, Bool>> {
    if n == 1 && window.is_none_or(|w| w > start) {
        return None;
    }
    let shape = [n, start + n];
    // `tril_mask` is true where `j - i > offset`: the keys after each query's position.
    let future: Tensor<2, Bool> = Tensor::tril_mask(shape, start as i64, device);
    Some(match window {
        None => future,
        // `triu_mask` is true where `j - i < offset`: here `start + i - j ≥ w`.
        Some(w) => future.bool_or(Tensor::triu_mask(
            shape,
            start as i64 + 1 - w as i64,
            device,
        )),
    })
}

/// `[b, kv_heads, s, d]` → `[b, kv_heads·groups, s, d]`, each head repeated `groups` times in
/// place (as transformers' `repeat_kv`).
fn repeat_kv(x: Tensor<4>, groups: usize) -> Tensor<4> {
    if groups == 1 {
        return x;
    }
    let [b, kvh, s, d] = x.dims();
    x.reshape([b, kvh, 1, s, d])
        .expand([b, kvh, groups, s, d])
        .reshape([b, kvh * groups, s, d])
}

#[cfg(test)]
mod tests {
    use burn::tensor::Distribution;

    use super::*;
    use crate::cpu_fused::tests::{close, host};

    /// Blocks of queries give the one-piece attention's values and gradients: grouped heads,
    /// fewer queries than keys (a decoding step), windows shorter and longer than a block.
    #[test]
    fn attention_in_blocks_equals_one_piece() {
        let dev = Device::flex().autodiff();
        let rnd =
            |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
        let (b, h, kvh, d) = (2, 4, 2, 8);
        for (n, t, rows, window) in [
            (13, 13, 4, None),
            (13, 13, 1, None),
            (9, 20, 4, None),
            (17, 17, 5, Some(3)),
            (17, 17, 3, Some(8)),
            (6, 30, 4, Some(10)),
        ] {
            let what = format!("{n} queries over {t} keys, blocks of {rows}, window {window:?}");
            let mine = [rnd([b, h, n, d]), rnd([b, kvh, t, d]), rnd([b, kvh, t, d])]
                .map(|x| x.require_grad());
            // The same values, tracked apart.
            let whole = mine.clone().map(|x| x.detach().require_grad());
            let [q, k, v] = mine.clone();
            let y = attend_blocks(q, k, v, window, rows);
            let [q, k, v] = whole.clone();
            let want = attend_block(q, k, v, window);
            close(host(y.clone()), host(want.clone()), &what);
            let w = Tensor::<3>::random(y.dims(), Distribution::Normal(0.0, 1.0), &dev);
            let got = (y * w.clone()).sum().backward();
            let wanted = (want * w).sum().backward();
            for (i, (a, z)) in mine.iter().zip(&whole).enumerate() {
                close(
                    host(a.grad(&got).unwrap()),
                    host(z.grad(&wanted).unwrap()),
                    &format!("{what}: d input {i}"),
                );
            }
        }
    }

    #[test]
    fn hidden_keys_follow_causality_and_the_window() {
        let device = Device::default();
        let ints = |m: Tensor<2, Bool>| {
            let data = m.int().into_data().convert::<i32>();
            data.try_to_vec::<i32>().unwrap()
        };
        assert!(hidden_keys(5, 1, None, &device).is_none());
        assert!(hidden_keys(5, 1, Some(6), &device).is_none());
        // Query 2 sees 1, 2; query 3 sees 2, 3.
        let m = hidden_keys(2, 2, Some(2), &device).unwrap();
        assert_eq!(ints(m), [1, 0, 0, 1, 1, 1, 0, 0]);
        let causal = hidden_keys(0, 3, None, &device).unwrap();
        assert_eq!(ints(causal), [0, 1, 1, 0, 0, 1, 0, 0, 0]);
    }
}
