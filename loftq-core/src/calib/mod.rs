//! Starts that use calibration data: the statistics `H = Σ xᵀx` of a layer's inputs, the
//! activation-weighted adapter fit (QERA / CLoQ / EoRA), GPTQ over this crate's quantizers,
//! and the allocation of quantizers to matrices under an average-bits budget (LQ-LoRA).
//!
//! With a factor `S` of `H` (`S·Sᵀ = H`), the output error of a replacement `W'` on the
//! calibration inputs `X` is `‖X·(W − W')ᵀ‖_F = ‖(W − W')·S‖_F`: every method here minimises
//! that instead of `‖W − W'‖_F`.

mod allocate;
mod gptq;
mod gram;
mod target;
mod weighted;

pub use allocate::{Allocation, Choice, allocate, score};
pub use gptq::{GptqConfig, gptq};
pub(crate) use gram::solve_lower_right;
pub use gram::{Gram, Weighting};
pub use target::Cross;
pub use weighted::{
    BaseQuantizer, CalibratedConfig, CalibratedResult, Objective, WeightedFit, base_errors,
    calibrated, fit_weighted, gptq_base,
};

/// GPTQ's damping: `λ` in `H + λ·mean(diag H)·I`.
pub const DEFAULT_DAMPING: f64 = 0.01;

/// How much of each layer's target is the full-precision model's output (`mix` of
/// [`Weighting::target`]): chosen on SmolLM2 at NF2 among 0, 0.15, 0.25, 0.3, 0.5 and 1
/// (docs/calibration.md).
pub const DEFAULT_DRIFT: f32 = 0.3;

/// What can go wrong with calibration statistics.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CalibError {
    /// Sizes that do not fit together.
    #[error("calibration statistics: {0}")]
    Shape(String),
    /// A NaN or infinite input or sum.
    #[error("calibration statistics: a NaN or infinite input")]
    NonFinite,
    /// No input reached the layer (all-zero statistics).
    #[error("calibration statistics: no input energy (no calibration tokens reached the layer?)")]
    Empty,
    /// The damped statistics could not be factored.
    #[error("calibration statistics are not positive definite: increase the damping")]
    NotPositiveDefinite,
    /// The bit budget cannot be met.
    #[error("bit budget: {0}")]
    Budget(String),
}
