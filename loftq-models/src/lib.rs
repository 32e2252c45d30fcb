//! # loftq-models
//!
//! File formats and models of loftq-rs:
//!
//! - [`io`]: Hugging Face safetensors checkpoints (memory-mapped, sharded or not, f32/f16/bf16),
//!   PEFT adapter directories (read and write), and our packed backbone format.
//! - [`config`]: the architecture from a HF `config.json` (transformers 4 and 5 spellings).
//! - [`nn`]: the Llama-family causal LM (Llama 2/3, Mistral, Qwen2, SmolLM2) whose linear
//!   layers are [`nn::QLinear`]: a frozen base, dense or held packed, plus a LoRA adapter.
//!
//! - [`init`]: `loftq init`, the whole-checkpoint job (streaming, resumable).
//! - [`train`]: fine-tuning the LoRA factors on a frozen (quantized) base.
//! - [`generate`]: text from a prompt, with a KV cache and seeded sampling; [`chat`]: the
//!   model's chat template, BOS and stop tokens.
//!
//! GGUF files (llama.cpp) are read through [`io::GgufModel`], which presents them under HF
//! names and layout.

pub mod chat;
pub mod config;
mod error;
pub mod eval;
#[doc(hidden)]
pub mod fuzz;
pub mod generate;
pub mod init;
pub mod io;
pub mod nn;
pub mod refine;
pub mod tokenizer;
pub mod train;

pub use config::LlamaConfig;
pub use error::{ModelError, Result};
pub use tokenizer::Tokenizer;
