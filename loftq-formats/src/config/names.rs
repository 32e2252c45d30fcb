//! The Hugging Face module names of a Llama-family decoder: what checkpoints, PEFT adapters and
//! LoRA targets call each linear layer.

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

/// The module path of decoder layer `i`'s linear layer `name` (one of [`LINEAR_PATHS`]), e.g.
/// `model.layers.0.self_attn.q_proj`.
pub fn linear_path(i: usize, name: &str) -> String {
    format!("model.layers.{i}.{name}")
}

/// Every decoder linear module path of a model of `layers` layers, in checkpoint order.
pub fn decoder_linear_paths(layers: usize) -> impl Iterator<Item = String> {
    (0..layers).flat_map(|i| LINEAR_PATHS.map(|p| linear_path(i, p)))
}
