//! # loftq-core
//!
//! The algorithms of LoftQ (LoRA-Fine-Tuning-aware Quantization, ICLR 2024), free of file
//! formats and models:
//!
//! - [`quant`]: block-wise quantizers (NormalFloat NF2/NF3/NF4/NF8, uniform codebooks,
//!   symmetric and asymmetric integers, LLM.int8 rows), bit packing and double quantization,
//!   on any Burn device.
//!
//! Weights are `[out, in]` matrices (PyTorch layout) throughout.

pub mod device;
mod error;
pub mod quant;

pub use device::DeviceSpec;
pub use error::QuantError;
pub use quant::{QuantConfig, Quantizer};
