//! The Hugging Face module names of a Llama-family decoder: what checkpoints, PEFT adapters and
//! LoRA targets call each linear layer.

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

impl Family {
    /// Whether q/k/v are one matrix, and gate/up another (Phi-3).
    pub fn fused(self) -> bool {
        self == Family::Phi3
    }

    /// The linear layers of a decoder block, as paths inside `model.layers.N`, in checkpoint
    /// order: [`LINEAR_PATHS`] or [`FUSED_LINEAR_PATHS`].
    pub fn linear_paths(self) -> &'static [&'static str] {
        linear_layout(self.fused()).0
    }

    /// Which input each of [`Family::linear_paths`] reads: 0 the normalized input (q/k/v), 1
    /// the attention's output (o_proj), 2 the normalized residual (gate/up), 3 the MLP's
    /// activation (down_proj). Layers of one group share their input statistics.
    pub fn input_groups(self) -> &'static [usize] {
        linear_layout(self.fused()).1
    }
}

/// The linear paths of a decoder block and the input group of each, with q/k/v and gate/up
/// `fused` into one matrix each or not.
pub fn linear_layout(fused: bool) -> (&'static [&'static str], &'static [usize]) {
    match fused {
        true => (&FUSED_LINEAR_PATHS, &[0, 1, 2, 3]),
        false => (&LINEAR_PATHS, &[0, 0, 0, 1, 2, 2, 3]),
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
