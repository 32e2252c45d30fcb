//! # loftq-core
//!
//! The algorithms of LoftQ (LoRA-Fine-Tuning-aware Quantization, ICLR 2024), free of file
//! formats and models:
//!
//! - [`quant`]: block-wise quantizers (NormalFloat NF2/NF3/NF4/NF8, uniform codebooks,
//!   symmetric and asymmetric integers, LLM.int8 rows), bit packing and double quantization,
//!   on any Burn device.
//! - [`lowrank`]: truncated SVD, exact (host) and randomized (products on the device).
//! - [`loftq()`]: the alternating quantization / low-rank initialization; [`loftq_batch`]
//!   runs matrices of one shape as one device problem.
//! - [`calib`]: calibrated starts: input statistics, the activation-weighted adapter fit,
//!   GPTQ, and quantizers allocated under a bit budget.
//! - [`init`]: one API for QLoRA (zeros), LoftQ, PiSSA and QPiSSA starts.
//! - [`transfers`]: counts of host–device reads and uploads, the latency a GPU pays.
//! - [`profile`]: an opt-in split of device time by phase (`LOFTQ_PROFILE=1`).
//! - `cpu` (with the `flex` feature): faer matrix products for the CPU back end.
//! - `args` (with the `clap` feature): command-line parsers for these settings.
//!
//! Weights are `[out, in]` matrices (PyTorch layout) throughout.

#[cfg(feature = "clap")]
pub mod args;
mod batch;
pub mod calib;
#[cfg(feature = "flex")]
pub mod cpu;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod cube;
mod dense;
pub mod device;
mod error;
pub mod fused;
pub mod init;
mod loftq;
mod lora;
pub mod lowrank;
pub mod profile;
pub mod quant;
mod run;
pub mod simd;
pub mod transfers;
mod upper;

pub use dense::rel_dist;
pub use device::{DeviceList, DeviceSpec};

/// `a·b`: faer on the CPU back end (see `cpu`), Burn's matmul elsewhere.
pub fn matmul(a: &burn::tensor::Tensor<2>, b: &burn::tensor::Tensor<2>) -> burn::tensor::Tensor<2> {
    #[cfg(feature = "flex")]
    return cpu::matmul(a, b);
    #[cfg(not(feature = "flex"))]
    a.clone().matmul(b.clone())
}
pub use error::QuantError;
pub use loftq::{HostFactors, LoftqConfig, LoftqError, LoftqResult};
pub use lora::{InitScaling, LoraSpec};
pub use quant::{QuantConfig, Quantizer};
pub use run::{loftq, loftq_batch, loftq_batch_with};
