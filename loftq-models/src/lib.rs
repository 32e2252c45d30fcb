//! # loftq-models
//!
//! The job floor of loftq-rs: what is done to a whole model, as a library under the CLI.
//!
//! - [`init`]: `loftq init`, the whole-checkpoint job (streaming, resumable; LoftQ, QLoRA,
//!   PiSSA, calibrated adapters, GPTQ, a bit budget).
//! - [`refine`]: more alternation steps on an initialized directory.
//! - [`train`]: fine-tuning the LoRA factors on a frozen (quantized) base; distillation from the
//!   full-precision model, whole or block by block.
//! - [`classify`]: sequence classification with an encoder (LoRA plus the head trained in
//!   full), and its accuracy.
//! - [`eval`]: perplexity; [`generate`]: text from a prompt, with a KV cache and seeded sampling.
//!
//! The floors below are re-exported under their own names: the files ([`io`], [`config`],
//! [`tokenizer`], [`chat`]; crate `loftq-formats`) and the model ([`nn`]; crate `loftq-nn`).
//! Arrows only go down: files know nothing of the model, the model nothing of the jobs.

pub mod classify;
pub mod eval;
#[doc(hidden)]
pub mod fuzz;
pub mod generate;
pub mod init;
pub mod refine;
pub mod train;

pub use loftq_formats::{LlamaConfig, ModelError, Result, Tokenizer};
pub use loftq_formats::{chat, config, io, tokenizer};
pub use loftq_nn as nn;
