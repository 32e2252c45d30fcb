//! Causal grouped-query self-attention with rotary embeddings.

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Device, Tensor};

use super::{QLinear, RopeTables};

/// `self_attn.{q_proj, k_proj, v_proj, o_proj}`.
#[derive(Module, Debug)]
pub struct Attention {
    /// `[heads·head_dim, hidden]`.
    pub q_proj: QLinear,
    /// `[kv_heads·head_dim, hidden]`.
    pub k_proj: QLinear,
    /// `[kv_heads·head_dim, hidden]`.
    pub v_proj: QLinear,
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
        let q = self.q_proj.forward(x.clone());
        let k = self.k_proj.forward(x.clone());
        let v = self.v_proj.forward(x);
        self.o_proj.forward(attend(
            [q, k, v],
            rope,
            [self.heads, self.kv_heads],
            self.window,
        ))
    }
}

/// Causal attention of projected `q [b, s, heads·d]`, `k`, `v` `[b, s, kv_heads·d]`, rotary
/// embeddings applied to `q` and `k`: `[b, s, heads·d]`, each position seeing the last `window`
/// positions when set. One host kernel on the CPU back end when the window covers the input.
pub(crate) fn attend(
    [q, k, v]: [Tensor<3>; 3],
    rope: &RopeTables,
    [h, kvh]: [usize; 2],
    window: Option<usize>,
) -> Tensor<3> {
    let seq = q.dims()[1];
    // A window at least as long as the input changes nothing.
    let window = window.filter(|&w| w < seq);
    #[cfg(feature = "flex")]
    if window.is_none()
        && let Some(y) = super::cpu_fused::attention([&q, &k, &v], [&rope.cos, &rope.sin], [h, kvh])
    {
        return y;
    }
    attend_generic([q, k, v], rope, [h, kvh], window)
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
    let split = |t: Tensor<3>, heads: usize| t.reshape([b, s, heads, d]).swap_dims(1, 2);
    let q = rope.apply(split(q, h));
    let k = rope.apply(split(k, kvh));
    let v = split(v, kvh);
    let (k, v) = (repeat_kv(k, h / kvh), repeat_kv(v, h / kvh));

    let scores = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar(1.0 / (d as f64).sqrt());
    let hidden = hidden_positions(s, window, &scores.device());
    let scores = scores.mask_fill(hidden.reshape([1, 1, s, s]).expand([b, h, s, s]), f32::MIN);
    let out = softmax(scores, 3).matmul(v);
    out.swap_dims(1, 2).reshape([b, s, h * d])
}

/// `[s, s]`, true where query `i` may not see key `j`: the future (`j > i`) and, with a
/// window `w`, the positions `j ≤ i - w`.
fn hidden_positions(s: usize, window: Option<usize>, device: &Device) -> Tensor<2, Bool> {
    // `tril_mask` is true outside the lower triangle: exactly the future positions.
    let future: Tensor<2, Bool> = Tensor::tril_mask([s, s], 0, device);
    match window {
        None => future,
        Some(w) => {
            let w = w as i64;
            // `triu_mask` is true where `j - i < offset`: here `i - j ≥ w`.
            let past: Tensor<2, Bool> = Tensor::triu_mask([s, s], 1 - w, device);
            future.bool_or(past)
        }
    }
}

/// `[b, kv_heads, s, d]` → `[b, kv_heads·groups, s, d]`, each head repeated `groups` times in
/// place (as transformers' `repeat_kv`).
pub(crate) fn repeat_kv(x: Tensor<4>, groups: usize) -> Tensor<4> {
    if groups == 1 {
        return x;
    }
    let [b, kvh, s, d] = x.dims();
    x.reshape([b, kvh, 1, s, d])
        .expand([b, kvh, groups, s, d])
        .reshape([b, kvh * groups, s, d])
}
