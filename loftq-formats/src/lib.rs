//! # loftq-formats
//!
//! The file floor of loftq-rs: everything read from or written to disk, with no model and no
//! tensors of a deep-learning framework.
//!
//! - [`io`]: Hugging Face safetensors checkpoints (memory-mapped, sharded or not,
//!   f32/f16/bf16), GGUF files (llama.cpp; read under HF names and layout, written), PEFT
//!   adapter directories, our packed backbone format, bitsandbytes' 4-bit layout, atomic and
//!   streaming writers.
//! - [`config`]: the architecture from a HF `config.json` (transformers 4 and 5 spellings),
//!   rotary settings and the HF module names of a decoder's linear layers.
//! - [`tokenizer`]: the model's tokenizer (`tokenizer.json`, or the vocabulary inside a GGUF
//!   file); [`chat`]: its chat template, BOS and stop tokens.
//!
//! Every error is a [`ModelError`] naming the file and, where there is one, the tensor.

pub mod chat;
pub mod config;
mod error;
pub mod io;
pub mod tokenizer;

pub use config::LlamaConfig;
pub use error::{ModelError, Result};
pub use tokenizer::Tokenizer;
