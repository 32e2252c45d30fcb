//! The Llama-family causal LM (Llama 2/3, Mistral, Qwen2, SmolLM2, Phi-3, Phi-2) with Hugging
//! Face module names, so that HF checkpoints and PEFT adapters map by name.

use burn::module::{Module, Param};
use burn::tensor::{Int, Tensor};

use super::Output;
use super::kernels;
use super::{Attention, Mlp, Norm, QLinear, RopeTables};
use loftq_formats::config::{Layout, LlamaConfig, linear_layout, linear_path};

/// `model.layers.N`: pre-norm attention and MLP with residual connections, one after the
/// other, or (Phi) both on the same normalized input.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// `input_layernorm`.
    pub input_layernorm: Norm,
    /// `self_attn`.
    pub self_attn: Attention,
    /// `post_attention_layernorm`; `None` when the MLP reads `input_layernorm`'s output, in
    /// parallel with the attention (Phi).
    pub post_attention_layernorm: Option<Norm>,
    /// `mlp`.
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<3>, rope: &RopeTables) -> Tensor<3> {
        self.forward_as(x, rope, Output::Value)
    }

    /// A tensor with [`forward`](Self::forward)'s graph, for the backward pass of a layer
    /// whose output is known already (gradient checkpointing). The MLP's last product, whose
    /// output only joins the residual, is skipped on the CPU back end, so the values are not
    /// the layer's output. The gradients of `(y·g).sum()` for a fixed `g` are exact, as they
    /// do not depend on `y`'s values.
    pub fn forward_for_gradient(&self, x: Tensor<3>, rope: &RopeTables) -> Tensor<3> {
        self.forward_as(x, rope, Output::GradientOnly)
    }

    fn forward_as(&self, x: Tensor<3>, rope: &RopeTables, output: Output) -> Tensor<3> {
        let xn = self.input_layernorm.forward(x.clone());
        let h = x + self.self_attn.forward(xn.clone(), rope);
        h.clone() + self.mlp.forward_as(self.mlp_input(h, xn), output)
    }

    /// [`forward`](Self::forward), handing the input of each group of linear layers to
    /// `observe` as `[batch·seq, in]`: the group index is [`Self::input_groups`]' (0: q/k/v,
    /// 1: o_proj, 2: gate/up, 3: down_proj; in parallel, 2 is handed group 0's input again).
    /// Calibration with full-precision inputs reads its statistics from here.
    pub fn forward_observed(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        observe: &mut dyn FnMut(usize, Tensor<2>),
    ) -> Tensor<3> {
        let (h, act) = self.observed(x, rope, observe);
        self.after_mlp(h, act)
    }

    /// [`forward_observed`](Self::forward_observed) without the layer's output: it stops
    /// after observing down_proj's input (a quarter of the products fewer).
    pub fn observe_inputs(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        observe: &mut dyn FnMut(usize, Tensor<2>),
    ) {
        self.observed(x, rope, observe);
    }

    /// The residual stream after attention and down_proj's input, every group's input
    /// observed on the way.
    fn observed(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        observe: &mut dyn FnMut(usize, Tensor<2>),
    ) -> (Tensor<3>, Tensor<3>) {
        let flat = |t: &Tensor<3>| {
            let [b, s, w] = t.dims();
            t.clone().reshape([b * s, w])
        };
        let xn = self.attention_input(x.clone());
        observe(0, flat(&xn));
        let att = self.attention_heads(xn.clone(), rope);
        observe(1, flat(&att));
        let h = self.after_attention(x, att);
        let hn = self.mlp_input(h.clone(), xn);
        observe(2, flat(&hn));
        let act = self.mlp.activation(hn);
        observe(3, flat(&act));
        (h, act)
    }

    // The steps of `forward` one group of linear layers at a time: calibration in GPTQ's
    // true-sequential order (`--calibration-inputs sequential`) changes each group's weights
    // before the next group's input is computed.

    /// Group 0's input (q/k/v's): `input_layernorm(x)`.
    pub fn attention_input(&self, x: Tensor<3>) -> Tensor<3> {
        self.input_layernorm.forward(x)
    }

    /// Group 1's input (o_proj's): the attention of group 0's input `xn`, before o_proj.
    pub fn attention_heads(&self, xn: Tensor<3>, rope: &RopeTables) -> Tensor<3> {
        self.self_attn.attention(xn, rope)
    }

    /// The residual stream after attention: `x + o_proj(att)`.
    pub fn after_attention(&self, x: Tensor<3>, att: Tensor<3>) -> Tensor<3> {
        x + self.self_attn.o_proj.forward(att)
    }

    /// Group 2's input (the MLP's): the normalized residual `h` after attention, or (in
    /// parallel) the attention's own input `xn`.
    pub fn mlp_input(&self, h: Tensor<3>, xn: Tensor<3>) -> Tensor<3> {
        match &self.post_attention_layernorm {
            Some(norm) => norm.forward(h),
            None => xn,
        }
    }

    /// The layer's output from the residual `h` after attention and down_proj's input `act`
    /// (group 3's, [`Mlp::activation`]).
    pub fn after_mlp(&self, h: Tensor<3>, act: Tensor<3>) -> Tensor<3> {
        h + self.mlp.down_proj.forward(act)
    }

    /// How the linear layers are named and split: Llama's seven, Phi-3's four fused, Phi's six.
    pub fn layout(&self) -> Layout {
        match (self.self_attn.qkv.len(), &self.post_attention_layernorm) {
            (1, _) => Layout::Fused,
            (_, None) => Layout::Phi,
            _ => Layout::Llama,
        }
    }

    /// The paths of the linear layers inside `model.layers.N`, in [`Self::linears`] order
    /// (`self_attn.q_proj`, ...).
    pub fn linear_paths(&self) -> &'static [&'static str] {
        linear_layout(self.layout()).0
    }

    /// The input group of each of [`Self::linears`] (see [`Self::forward_observed`]).
    pub fn input_groups(&self) -> &'static [usize] {
        linear_layout(self.layout()).1
    }

    /// The linear layers, in checkpoint order (q/k/v, o, gate/up, down).
    pub fn linears(&self) -> Vec<&QLinear> {
        let (a, m) = (&self.self_attn, &self.mlp);
        let attn = a.qkv.iter().chain([&a.o_proj]);
        attn.chain(&m.gate_up).chain([&m.down_proj]).collect()
    }

    /// The linear layers, mutably, in [`Self::linears`] order.
    pub fn linears_mut(&mut self) -> Vec<&mut QLinear> {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        let attn = a.qkv.iter_mut().chain([&mut a.o_proj]);
        attn.chain(&mut m.gate_up)
            .chain([&mut m.down_proj])
            .collect()
    }
}

/// `LlamaForCausalLM`: embeddings, decoder layers, final norm, LM head.
#[derive(Module, Debug)]
pub struct Llama {
    /// `model.embed_tokens.weight` `[vocab, hidden]` (frozen).
    pub embed_tokens: Tensor<2>,
    /// `model.layers`.
    pub layers: Vec<DecoderLayer>,
    /// `model.norm` (Phi's `model.final_layernorm`).
    pub norm: Norm,
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
        self.head(self.hidden_states(ids))
    }

    /// The final normalized hidden states `[batch, seq, hidden]`.
    pub fn hidden_states(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let rope = self.rope(ids.dims()[1]);
        let mut h = self.embed(ids);
        for layer in &self.layers {
            h = layer.forward(h, &rope);
        }
        self.norm.forward(h)
    }

    /// Token embeddings `[batch, seq, hidden]` for ids `[batch, seq]`.
    pub fn embed(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [b, s] = ids.dims();
        let hidden = self.embed_tokens.dims()[1];
        self.embed_tokens
            .clone()
            .select(0, ids.reshape([b * s]))
            .reshape([b, s, hidden])
    }

    /// The rotary tables for positions `0..seq`.
    pub fn rope(&self, seq: usize) -> RopeTables {
        let device = self.embed_tokens.device();
        RopeTables::new(&self.config.rope, self.config.rotary_dim(), seq, &device)
    }

    /// The mean negative log-likelihood of `targets` (one per position) from normalized hidden
    /// states `h [batch, seq, hidden]`, in one host pass that never holds the whole logits:
    /// the CPU back end with a head that has no adapter and no bias. `None` otherwise.
    pub fn fused_head_nll(&self, h: &Tensor<3>, targets: &[u32]) -> Option<Tensor<1>> {
        let w = match &self.lm_head {
            None => kernels::plain(&self.embed_tokens)?,
            Some(head) if head.bias.is_none() && (head.lora.is_none() || !head.adapter_enabled) => {
                head.host_weight()?
            }
            Some(_) => return None,
        };
        kernels::head_nll(h, &w, targets)
    }

    /// The LM head (or the tied embeddings) on normalized hidden states: logits
    /// `[batch, seq, vocab]`.
    pub fn head(&self, h: Tensor<3>) -> Tensor<3> {
        let [b, s, hidden] = h.dims();
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => {
                let vocab = self.embed_tokens.dims()[0];
                super::qlinear::dense_product(h.reshape([b * s, hidden]), &self.embed_tokens)
                    .reshape([b, s, vocab])
            }
        }
    }

    /// Every linear layer with its module path (`model.layers.0.self_attn.q_proj`, ...), in
    /// checkpoint order; the LM head last if untied.
    pub fn linears(&self) -> Vec<(String, &QLinear)> {
        let mut v = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (name, lin) in l.linear_paths().iter().zip(l.linears()) {
                v.push((linear_path(i, name), lin));
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
            let paths = l.linear_paths();
            for (name, lin) in paths.iter().zip(l.linears_mut()) {
                v.push((linear_path(i, name), lin));
            }
        }
        v
    }

    /// The LoRA factors `[A, B]` of every adapted layer, in [`Llama::linears`] order: the
    /// trainable parameters.
    pub fn lora_params(&self) -> Vec<Tensor<2>> {
        self.linears()
            .into_iter()
            .filter_map(|(_, lin)| lin.lora.as_ref())
            .flat_map(|l| [l.a.val(), l.b.val()])
            .collect()
    }

    /// Replaces the LoRA factors, given in [`Llama::lora_params`] order.
    ///
    /// # Panics
    /// If `params` does not hold one tensor of the same shape for each factor.
    pub fn set_lora_params(&mut self, params: Vec<Tensor<2>>) {
        let mut it = params.into_iter();
        for lin in self.all_linears_mut() {
            let Some(lora) = &mut lin.lora else { continue };
            for p in [&mut lora.a, &mut lora.b] {
                let t = it.next().expect("one tensor per LoRA factor");
                assert_eq!(t.dims(), p.dims(), "LoRA factor shape changed");
                *p = Param::initialized(p.id, t);
            }
        }
        assert!(it.next().is_none(), "more tensors than LoRA factors");
    }

    /// Sets the dropout seed of every adapter (`None`: no dropout). Each layer gets its own
    /// seed derived from `seed` and its position.
    pub fn set_dropout_seed(&mut self, seed: Option<u64>) {
        for (i, lin) in self.all_linears_mut().enumerate() {
            lin.dropout_seed = seed.map(|s| s ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
    }

    /// Every linear layer, mutably, in [`Llama::linears`] order (the LM head last).
    fn all_linears_mut(&mut self) -> impl Iterator<Item = &mut QLinear> {
        self.layers
            .iter_mut()
            .flat_map(|l| l.linears_mut())
            .chain(self.lm_head.as_mut())
    }

    /// Replaces every packed base weight by its dequantized matrix, kept on the device: the
    /// same products without a dequantization in each forward pass (on a GPU, one kernel
    /// fewer per linear layer and pass), at 4 bytes a parameter. Returns how many.
    pub fn dequantize_bases(&mut self) -> usize {
        let mut n = 0;
        for lin in self.all_linears_mut() {
            if let super::BaseWeight::Packed(p) = &lin.base {
                lin.base = super::BaseWeight::Dense(p.dequantize());
                n += 1;
            }
        }
        n
    }

    /// Turns every adapter on or off (off: the base model alone).
    pub fn set_adapters_enabled(&mut self, enabled: bool) {
        for lin in self.all_linears_mut() {
            lin.adapter_enabled = enabled;
        }
    }
}
