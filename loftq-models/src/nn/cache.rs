//! Incremental decoding: the keys and values of the positions seen so far, kept per layer, so
//! that each new token costs one position's work instead of the whole sequence's.

use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use super::attention::repeat_kv;
use super::{Attention, DecoderLayer, Llama, RopeTables};

/// The rotated keys and values `[batch, kv_heads, positions, head_dim]` of every layer.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<[Tensor<4>; 2]>>,
    len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions held (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Llama {
    /// Logits `[batch, vocab]` of the last of `ids [batch, new]`, the tokens at positions
    /// `cache.len()..cache.len() + new`, whose keys and values join `cache`. Feeding a sequence
    /// in pieces gives the last logits of [`Llama::forward`] on the whole sequence.
    pub fn forward_cached(&self, ids: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<2> {
        let [b, n] = ids.dims();
        let start = cache.len;
        let device = self.embed_tokens.device();
        let rope = RopeTables::positions(
            &self.config.rope,
            self.config.head_dim,
            start..start + n,
            &device,
        );
        cache.layers.resize(self.layers.len(), None);
        let mut h = self.embed(ids);
        for (layer, kv) in self.layers.iter().zip(&mut cache.layers) {
            h = layer.forward_cached(h, &rope, start, kv);
        }
        cache.len += n;
        let last = self.norm.forward(h.narrow(1, n - 1, 1));
        let vocab = self.config.vocab_size;
        self.head(last).reshape([b, vocab])
    }
}

impl DecoderLayer {
    /// [`DecoderLayer::forward`] for new positions from `start` on, the earlier ones' keys and
    /// values read from (and the new ones appended to) `kv`.
    fn forward_cached(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        start: usize,
        kv: &mut Option<[Tensor<4>; 2]>,
    ) -> Tensor<3> {
        let attn =
            self.self_attn
                .forward_cached(self.input_layernorm.forward(x.clone()), rope, start, kv);
        let h = x + attn;
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

impl Attention {
    fn forward_cached(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        start: usize,
        kv: &mut Option<[Tensor<4>; 2]>,
    ) -> Tensor<3> {
        let [b, n, _] = x.dims();
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let split = |t: Tensor<3>, heads: usize| t.reshape([b, n, heads, d]).swap_dims(1, 2);
        let q = rope.apply(split(self.q_proj.forward(x.clone()), h));
        let k = rope.apply(split(self.k_proj.forward(x.clone()), kvh));
        let v = split(self.v_proj.forward(x), kvh);
        let [k, v] = match kv.take() {
            Some([pk, pv]) => [Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)],
            None => [k, v],
        };
        *kv = Some([k.clone(), v.clone()]);
        let total = start + n;
        let (k, v) = (repeat_kv(k, h / kvh), repeat_kv(v, h / kvh));
        let mut scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (d as f64).sqrt());
        if let Some(hidden) = hidden_keys(start, n, self.window, &scores.device()) {
            scores = scores.mask_fill(
                hidden.reshape([1, 1, n, total]).expand([b, h, n, total]),
                f32::MIN,
            );
        }
        let out = softmax(scores, 3).matmul(v);
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([b, n, h * d]))
    }
}

/// `[n, start + n]`, true where the query at position `start + i` may not see key `j`: a
/// later position, or one `window` or more behind it. `None` when every key is visible (one
/// new token within the window).
fn hidden_keys(
    start: usize,
    n: usize,
    window: Option<usize>,
    device: &Device,
) -> Option<Tensor<2, Bool>> {
    let total = start + n;
    let hidden = |i: usize, j: usize| {
        let pos = start + i;
        j > pos || window.is_some_and(|w| j + w <= pos)
    };
    let mask: Vec<bool> = (0..n)
        .flat_map(|i| (0..total).map(move |j| hidden(i, j)))
        .collect();
    mask.iter()
        .any(|&m| m)
        .then(|| Tensor::from_data(TensorData::new(mask, [n, total]), device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_keys_follow_causality_and_the_window() {
        let device = Device::default();
        assert!(hidden_keys(5, 1, None, &device).is_none());
        assert!(hidden_keys(5, 1, Some(6), &device).is_none());
        let m = hidden_keys(2, 2, Some(2), &device).unwrap();
        let v = m
            .int()
            .into_data()
            .convert::<i32>()
            .try_to_vec::<i32>()
            .unwrap();
        // Query 2 sees 1, 2; query 3 sees 2, 3.
        assert_eq!(v, [1, 0, 0, 1, 1, 1, 0, 0]);
    }
}
