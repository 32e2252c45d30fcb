//! # loftq-nn
//!
//! The model floor of loftq-rs: the Llama-family causal LM (Llama 2/3, Mistral, Qwen2, SmolLM2,
//! Phi-3, Phi-2) on Burn, whose linear layers are [`QLinear`]: a frozen base, dense or held packed, plus a LoRA
//! adapter. It loads checkpoints and adapters through `loftq-formats`, starts adapters in memory
//! ([`FreshLora`], [`Llama::init_adapters`]), saves them, runs forward passes with a KV cache,
//! and hands out one decoder layer at a time ([`LayerSource`]). The jobs on a model (init,
//! calibrate, train, eval) are in `loftq-models`.
//!
//! Weights keep PyTorch's `[out, in]` layout everywhere (products use the transpose), so a
//! checkpoint tensor maps to a module field by name and nothing else.

mod adapters;
mod attention;
mod cache;
#[cfg(feature = "flex")]
mod cpu_attention;
#[cfg(feature = "flex")]
mod cpu_fused;
#[cfg(feature = "flex")]
mod cpu_kernels;
#[cfg(feature = "flex")]
mod cpu_linear;
mod deberta;
mod encoder;
mod kernels;
mod layerwise;
mod llama;
mod load;
mod mlp;
mod norm;
mod qlinear;
mod rope;
mod save;

pub use adapters::{FreshLora, LayerInit, tensor_seed};
pub use attention::Attention;
pub use cache::KvCache;
pub use deberta::{RelativeEmbeddings, relative_position};
pub use encoder::{Encoder, EncoderLayer, load_encoder};
pub use layerwise::{LayerReader, LayerSource};
pub use llama::{DecoderLayer, Llama};
pub use load::{
    LINEAR_NAMES, LoadOptions, load_ends, load_layer, load_model, load_pretrained,
    load_pretrained_with, open_pretrained,
};
pub use mlp::Mlp;
pub use norm::{Norm, NormKind};
pub use qlinear::{BaseWeight, LoraAdapter, PackedWeight, QLinear};
pub use rope::RopeTables;
pub use save::{BackboneFormat, adapter_of, host_tensor};

/// What a product's output is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Output {
    /// Its value, as usual.
    Value,
    /// Only the path of gradients back through it: on the CPU back end the value is left as
    /// zeros and the products that make it are skipped; the backward pass is the same.
    GradientOnly,
}
