//! The Llama-family causal LM (Llama 2/3, Mistral, Qwen2, SmolLM2) with Hugging Face module
//! names, so that HF checkpoints and PEFT adapters map by name.

use burn::module::Module;
use burn::tensor::{Int, Tensor};

use super::{Attention, Mlp, QLinear, RopeTables};
use crate::config::LlamaConfig;

/// The linear layers of a decoder block, as paths inside `model.layers.N`.
pub const LINEAR_PATHS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// RMSNorm: `x / √(mean(x²) + ε) · weight`.
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// `[hidden]` (frozen).
    pub weight: Tensor<1>,
    /// ε.
    pub eps: f64,
}

impl RmsNorm {
    /// Normalizes the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let rms = x
            .clone()
            .square()
            .mean_dim(D - 1)
            .add_scalar(self.eps)
            .sqrt();
        x.div(rms) * self.weight.clone().unsqueeze()
    }
}

/// `model.layers.N`: pre-norm attention and MLP with residual connections.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// `input_layernorm`.
    pub input_layernorm: RmsNorm,
    /// `self_attn`.
    pub self_attn: Attention,
    /// `post_attention_layernorm`.
    pub post_attention_layernorm: RmsNorm,
    /// `mlp`.
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<3>, rope: &RopeTables) -> Tensor<3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rope);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// `LlamaForCausalLM`: embeddings, decoder layers, final norm, LM head.
#[derive(Module, Debug)]
pub struct Llama {
    /// `model.embed_tokens.weight` `[vocab, hidden]` (frozen).
    pub embed_tokens: Tensor<2>,
    /// `model.layers`.
    pub layers: Vec<DecoderLayer>,
    /// `model.norm`.
    pub norm: RmsNorm,
    /// `lm_head`; `None` when tied to the embeddings.
    pub lm_head: Option<QLinear>,
    /// The architecture.
    #[module(skip)]
    pub config: LlamaConfig,
}

impl Llama {
    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]` (positions `0..seq`, causal,
    /// no padding).
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let h = self.hidden_states(ids);
        let [b, s, hidden] = h.dims();
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => {
                let vocab = self.embed_tokens.dims()[0];
                h.reshape([b * s, hidden])
                    .matmul(self.embed_tokens.clone().transpose())
                    .reshape([b, s, vocab])
            }
        }
    }

    /// The final normalized hidden states `[batch, seq, hidden]`.
    pub fn hidden_states(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [b, s] = ids.dims();
        let device = ids.device();
        let hidden = self.embed_tokens.dims()[1];
        let mut h = self
            .embed_tokens
            .clone()
            .select(0, ids.reshape([b * s]))
            .reshape([b, s, hidden]);
        let rope = RopeTables::new(&self.config.rope, self.config.head_dim, s, &device);
        for layer in &self.layers {
            h = layer.forward(h, &rope);
        }
        self.norm.forward(h)
    }

    /// Every linear layer with its module path (`model.layers.0.self_attn.q_proj`, ...), in
    /// checkpoint order; the LM head last if untied.
    pub fn linears(&self) -> Vec<(String, &QLinear)> {
        let mut v = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let (a, m) = (&l.self_attn, &l.mlp);
            let lins = [
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ];
            for (name, lin) in LINEAR_PATHS.iter().zip(lins) {
                v.push((format!("model.layers.{i}.{name}"), lin));
            }
        }
        if let Some(head) = &self.lm_head {
            v.push(("lm_head".to_string(), head));
        }
        v
    }

    /// Every decoder linear layer, mutably, with its module path (the LM head excluded).
    pub fn decoder_linears_mut(&mut self) -> Vec<(String, &mut QLinear)> {
        let mut v = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let a = &mut l.self_attn;
            let m = &mut l.mlp;
            let lins = [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut m.gate_proj,
                &mut m.up_proj,
                &mut m.down_proj,
            ];
            for (name, lin) in LINEAR_PATHS.iter().zip(lins) {
                v.push((format!("model.layers.{i}.{name}"), lin));
            }
        }
        v
    }

    /// Turns every adapter on or off (off: the base model alone).
    pub fn set_adapters_enabled(&mut self, enabled: bool) {
        for (_, lin) in self.decoder_linears_mut() {
            lin.adapter_enabled = enabled;
        }
        if let Some(head) = &mut self.lm_head {
            head.adapter_enabled = enabled;
        }
    }
}
