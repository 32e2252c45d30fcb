//! The Llama-family model with quantized LoRA layers.
//!
//! Weights keep PyTorch's `[out, in]` layout everywhere (products use the transpose), so a
//! checkpoint tensor maps to a module field by name and nothing else.

#[cfg(feature = "flex")]
#[macro_use]
mod simd;
mod attention;
mod cache;
#[cfg(feature = "flex")]
mod cpu_fused;
#[cfg(feature = "flex")]
mod cpu_kernels;
#[cfg(feature = "flex")]
mod cpu_linear;
mod init;
mod layerwise;
mod llama;
mod load;
mod mlp;
mod qlinear;
mod rope;
mod save;

pub use attention::Attention;
pub use cache::KvCache;
pub use init::{FreshLora, LayerInit};
pub use layerwise::{LayerReader, LayerSource};
pub use llama::{
    DecoderLayer, INPUT_GROUPS, LINEAR_PATHS, Llama, RmsNorm, decoder_linear_paths, linear_path,
};
pub use load::{
    LINEAR_NAMES, LoadOptions, load_ends, load_layer, load_model, load_pretrained,
    load_pretrained_with, open_pretrained,
};
pub use mlp::Mlp;
pub use qlinear::{BaseWeight, LoraAdapter, PackedWeight, QLinear};
pub use rope::{RopeTables, inv_freq};
pub use save::{BackboneFormat, adapter_of};
