//! # loftq-models
//!
//! File formats and models of loftq-rs. This crate is the place for reading Hugging Face
//! checkpoints and GGUF files, writing PEFT adapters and packed backbones, and the Llama-family
//! model with quantized LoRA layers. None of that is implemented yet; it is planned work, not
//! a stub that claims to work. What exists today lives in `loftq-core` (the quantizers).
