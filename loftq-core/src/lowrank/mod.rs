//! Truncated SVD: the exact one (host, faer) and a randomized one whose large products stay on
//! the device.
//!
//! Both return a [`LowRank`] `A ≈ U·diag(s)·Vᵀ` with the `rank` largest singular values in
//! decreasing order.

mod exact;
mod host;
mod rsvd;

pub use exact::exact_svd;
pub use host::Gaussian;
pub use rsvd::{RsvdConfig, randomized_svd};

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// How to compute the truncated SVD.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum SvdMethod {
    /// Full thin SVD on the host in `f64` (faer), then truncated: the oracle.
    Exact,
    /// Randomized range finder with power iterations (Halko, Martinsson & Tropp 2011).
    Randomized(RsvdConfig),
}

impl Default for SvdMethod {
    fn default() -> Self {
        SvdMethod::Randomized(RsvdConfig::default())
    }
}

/// A rank-`r` factorisation `U·diag(s)·Vᵀ`.
///
/// # Shapes
/// `u: [m, r]`, `s: [r]`, `v: [n, r]` for an `[m, n]` input.
#[derive(Clone, Debug)]
pub struct LowRank {
    /// Left singular vectors, orthonormal columns.
    pub u: Tensor<2>,
    /// Singular values, decreasing.
    pub s: Vec<f32>,
    /// Right singular vectors, orthonormal columns.
    pub v: Tensor<2>,
}

impl LowRank {
    /// The balanced factors of LoRA: `B = U·√S` `[m, r]` and `A = √S·Vᵀ` `[r, n]`, so `B·A`
    /// is the rank-`r` approximation (the reference's `L` and `R`).
    pub fn balanced_factors(&self) -> (Tensor<2>, Tensor<2>) {
        let r = self.s.len();
        let device = self.u.device();
        let sqrt: Vec<f32> = self.s.iter().map(|s| s.max(0.0).sqrt()).collect();
        let root = Tensor::<1>::from_data(TensorData::new(sqrt, [r]), &device);
        let b = self.u.clone() * root.clone().reshape([1, r]);
        let a = (self.v.clone() * root.reshape([1, r])).transpose();
        (b, a)
    }

    /// Rank.
    pub fn rank(&self) -> usize {
        self.s.len()
    }
}

/// Errors of the low-rank solvers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LowRankError {
    /// The requested rank is zero or exceeds `min(m, n)`.
    #[error("rank {rank} is not in 1..={max} for a {rows}×{cols} matrix")]
    Rank {
        /// Requested rank.
        rank: usize,
        /// Largest possible rank.
        max: usize,
        /// Rows of the matrix.
        rows: usize,
        /// Columns of the matrix.
        cols: usize,
    },
    /// The SVD did not converge (NaN/Inf input, typically).
    #[error("the SVD did not converge (is the matrix finite?)")]
    NoConvergence,
}

/// Checks that a rank-`rank` factorisation of a `[rows, cols]` matrix exists.
pub fn check_rank(shape: [usize; 2], rank: usize) -> Result<(), LowRankError> {
    let [rows, cols] = shape;
    let max = rows.min(cols);
    if rank == 0 || rank > max {
        return Err(LowRankError::Rank {
            rank,
            max,
            rows,
            cols,
        });
    }
    Ok(())
}

/// Computes the rank-`rank` truncated SVD of `a` with `method`. `warm` (`[n, k]`, orthonormal
/// columns) seeds the randomized method's subspace, e.g. the previous LoftQ iteration's `V`.
pub fn truncated_svd(
    a: &Tensor<2>,
    rank: usize,
    method: &SvdMethod,
    warm: Option<&Tensor<2>>,
) -> Result<LowRank, LowRankError> {
    match method {
        SvdMethod::Exact => exact_svd(a, rank),
        SvdMethod::Randomized(cfg) => randomized_svd(a, rank, cfg, warm),
    }
}
