//! Incremental decoding: the keys and values of the positions seen so far, kept per layer, so
//! that each new token costs one position's work instead of the whole sequence's.

use burn::tensor::{Int, Tensor};

use super::attention::attend_rotated;
use super::{Attention, DecoderLayer, Llama, RopeTables};

/// The rotated keys and values `[batch, kv_heads, positions, head_dim]` of every layer.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
}

/// One layer's rotated keys and values, `None` before the first position.
type LayerKv = Option<[Tensor<4>; 2]>;

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
            self.config.rotary_dim(),
            start..start + n,
            &device,
        );
        cache.layers.resize(self.layers.len(), None);
        let mut h = self.embed(ids);
        for (layer, kv) in self.layers.iter().zip(&mut cache.layers) {
            h = layer.forward_cached(h, &rope, kv);
        }
        cache.len += n;
        let last = self.norm.forward(h.narrow(1, n - 1, 1));
        let vocab = self.config.vocab_size;
        self.head(last).reshape([b, vocab])
    }
}

impl DecoderLayer {
    /// [`DecoderLayer::forward`] for the positions after those whose keys and values `kv`
    /// holds (the new ones are appended); `rope` has the new positions' tables.
    fn forward_cached(&self, x: Tensor<3>, rope: &RopeTables, kv: &mut LayerKv) -> Tensor<3> {
        let xn = self.input_layernorm.forward(x.clone());
        let h = x + self.self_attn.forward_cached(xn.clone(), rope, kv);
        h.clone() + self.mlp.forward(self.mlp_input(h, xn))
    }
}

impl Attention {
    fn forward_cached(&self, x: Tensor<3>, rope: &RopeTables, kv: &mut LayerKv) -> Tensor<3> {
        let [b, n, _] = x.dims();
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let split = |t: Tensor<3>, heads: usize| t.reshape([b, n, heads, d]);
        let heads_first = |t: Tensor<4>| t.swap_dims(1, 2);
        let [q, k, v] = self.project(x);
        let (q, k, v) = (
            heads_first(rope.apply(split(q, h))),
            heads_first(rope.apply(split(k, kvh))),
            heads_first(split(v, kvh)),
        );
        let [k, v] = match kv.take() {
            Some([pk, pv]) => [Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)],
            None => [k, v],
        };
        *kv = Some([k.clone(), v.clone()]);
        self.o_proj.forward(attend_rotated(q, k, v, self.window))
    }
}
