//! The Hugging Face module names of a Llama-family decoder: what checkpoints, PEFT adapters and
//! LoRA targets call each linear layer.

use serde::{Deserialize, Serialize};

use super::Family;

/// The linear layers of a Llama decoder block, as paths inside `model.layers.N`.
pub const LINEAR_PATHS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Phi-3's linear layers: q/k/v are one matrix (`[q; k; v]` rows), gate/up too (`[gate; up]`).
pub const FUSED_LINEAR_PATHS: [&str; 4] = [
    "self_attn.qkv_proj",
    "self_attn.o_proj",
    "mlp.gate_up_proj",
    "mlp.down_proj",
];

/// Phi-1/1.5/2's linear layers: `dense` is the attention's output, `fc1`/`fc2` the MLP's.
pub const PHI_LINEAR_PATHS: [&str; 6] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.dense",
    "mlp.fc1",
    "mlp.fc2",
];

/// How a family names and splits the linear layers of a decoder block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Llama's seven: q/k/v, o, gate/up, down ([`LINEAR_PATHS`]).
    Llama,
    /// Phi-3's four: q/k/v in one matrix, gate/up in another ([`FUSED_LINEAR_PATHS`]).
    Fused,
    /// Phi-2's six: q/k/v, dense, fc1, fc2 ([`PHI_LINEAR_PATHS`]).
    Phi,
}

/// The MLP's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// `silu(gate)·up` (Llama, Phi-3).
    SiluGated,
    /// `gelu_new`, GELU's tanh form, of one input projection (Phi).
    GeluTanh,
    /// `gelu`, the exact GELU (`x·Φ(x)`) of one input projection (BERT).
    Gelu,
    /// `tanh`: BERT's pooler (and a DeBERTa `pooler_hidden_act`).
    Tanh,
}

impl Activation {
    /// The `hidden_act` names of `config.json` that mean this activation.
    pub fn names(self) -> &'static [&'static str] {
        match self {
            Activation::SiluGated => &["silu", "swish"],
            Activation::GeluTanh => &["gelu_new", "gelu_pytorch_tanh"],
            Activation::Gelu => &["gelu"],
            Activation::Tanh => &["tanh"],
        }
    }
}

impl Family {
    /// How the family lays out its linear layers.
    pub fn layout(self) -> Layout {
        match self {
            Family::Phi3 => Layout::Fused,
            Family::Phi => Layout::Phi,
            Family::Llama | Family::Mistral | Family::Qwen2 => Layout::Llama,
        }
    }

    /// The MLP's activation.
    pub fn activation(self) -> Activation {
        match self {
            Family::Phi => Activation::GeluTanh,
            _ => Activation::SiluGated,
        }
    }

    /// Whether attention and MLP read the same normalized input and add to one residual
    /// (Phi), with LayerNorms (biases included) instead of RMSNorms and a bias on the LM head.
    pub fn parallel(self) -> bool {
        self == Family::Phi
    }

    /// The linear layers of a decoder block, as paths inside `model.layers.N`, in checkpoint
    /// order.
    pub fn linear_paths(self) -> &'static [&'static str] {
        linear_layout(self.layout()).0
    }

    /// Which part of the block each of [`Family::linear_paths`] belongs to, in order: 0 the
    /// query/key/value projections, 1 the attention's output, 2 the MLP's input projections,
    /// 3 its output. Each group reads one input (Phi's MLP reads the attention's, so groups 0
    /// and 2 see the same values there); layers of one group share their input statistics.
    pub fn input_groups(self) -> &'static [usize] {
        linear_layout(self.layout()).1
    }

    /// The path of the final norm: `model.norm`, Phi's `model.final_layernorm`.
    pub fn final_norm(self) -> &'static str {
        match self.parallel() {
            true => "model.final_layernorm",
            false => "model.norm",
        }
    }
}

/// The linear paths of a decoder block of `layout` and the input group of each.
pub fn linear_layout(layout: Layout) -> (&'static [&'static str], &'static [usize]) {
    match layout {
        Layout::Llama => (&LINEAR_PATHS, &[0, 0, 0, 1, 2, 2, 3]),
        Layout::Fused => (&FUSED_LINEAR_PATHS, &[0, 1, 2, 3]),
        Layout::Phi => (&PHI_LINEAR_PATHS, &[0, 0, 0, 1, 2, 3]),
    }
}

/// The module path of decoder layer `i`'s linear layer `name` (one of
/// [`Family::linear_paths`]), e.g. `model.layers.0.self_attn.q_proj`.
pub fn linear_path(i: usize, name: &str) -> String {
    format!("model.layers.{i}.{name}")
}

/// Every decoder linear module path of a `family` model of `layers` layers, in checkpoint
/// order.
pub fn decoder_linear_paths(family: Family, layers: usize) -> impl Iterator<Item = String> {
    (0..layers).flat_map(move |i| family.linear_paths().iter().map(move |p| linear_path(i, p)))
}
