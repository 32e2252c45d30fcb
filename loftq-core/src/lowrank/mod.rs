//! Truncated SVD: the exact one (host, faer) and a randomized one whose large products stay on
//! the device.
//!
//! Both return a [`LowRank`] `A ≈ U·diag(s)·Vᵀ` with the `rank` largest singular values in
//! decreasing order.

pub(crate) mod batch;
mod exact;
mod host;
pub(crate) mod rsvd;
mod small;

pub use exact::exact_svd;
pub use host::Gaussian;
pub use rsvd::{RsvdConfig, randomized_svd};

#[cfg(feature = "flex")]
use burn::tensor::Device;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::dense::{Dense, DeviceOps};

/// How to compute the truncated SVD.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum SvdMethod {
    /// Full thin SVD on the host in `f64` (faer), then truncated: the oracle.
    Exact,
    /// Randomized range finder with power iterations (Halko, Martinsson & Tropp 2011).
    Randomized(RsvdConfig),
}

impl SvdMethod {
    /// The same method with the randomized sketch's seed set to `seed` (exact: unchanged).
    pub fn with_seed(self, seed: u64) -> Self {
        match self {
            SvdMethod::Randomized(r) => SvdMethod::Randomized(RsvdConfig { seed, ..r }),
            SvdMethod::Exact => SvdMethod::Exact,
        }
    }
}

impl Default for SvdMethod {
    fn default() -> Self {
        SvdMethod::Randomized(RsvdConfig::default())
    }
}

/// A rank-`r` factorisation `U·diag(s)·Vᵀ`; `M` is the matrix type (Burn tensors in the
/// public API).
///
/// # Shapes
/// `u: [m, r]`, `s: [r]`, `v: [n, r]` for an `[m, n]` input.
#[derive(Clone, Debug)]
pub struct LowRank<M = Tensor<2>> {
    /// Left singular vectors, orthonormal columns.
    pub u: M,
    /// Singular values, decreasing.
    pub s: Vec<f32>,
    /// Right singular vectors, orthonormal columns (zero columns for directions with no
    /// energy when the randomized method meets a matrix of lower rank).
    pub v: M,
}

impl LowRank {
    /// The balanced factors of LoRA: `B = U·√S` `[m, r]` and `A = √S·Vᵀ` `[r, n]`, so `B·A`
    /// is the rank-`r` approximation (the reference's `L` and `R`).
    pub fn balanced_factors(&self) -> (Tensor<2>, Tensor<2>) {
        self.balanced_with(&DeviceOps(self.u.device()))
    }
}

impl<M> LowRank<M> {
    /// Rank.
    pub fn rank(&self) -> usize {
        self.s.len()
    }

    /// [`LowRank::balanced_factors`] with any [`Dense`] implementation.
    pub(crate) fn balanced_with<D: Dense<M = M>>(&self, ops: &D) -> (M, M) {
        let root: Vec<f32> = self.s.iter().map(|s| s.max(0.0).sqrt()).collect();
        let b = ops.scale_cols(&self.u, &root);
        let a = ops.transpose(&ops.scale_cols(&self.v, &root));
        (b, a)
    }

    /// The factors as tensors on `device`.
    #[cfg(feature = "flex")]
    pub(crate) fn into_tensors<D: Dense<M = M>>(self, ops: &D, device: &Device) -> LowRank {
        LowRank {
            u: ops.to_tensor(self.u, device),
            s: self.s,
            v: ops.to_tensor(self.v, device),
        }
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

/// [`truncated_svd`] with any [`Dense`] implementation; also returns the warm start for a
/// next, similar matrix (the randomized method's whole right basis, or `V`).
pub(crate) fn svd_with<D: Dense>(
    ops: &D,
    a: &D::M,
    rank: usize,
    method: &SvdMethod,
    warm: Option<&D::M>,
) -> Result<(LowRank<D::M>, D::M), LowRankError> {
    match method {
        SvdMethod::Exact => {
            let lr = exact::exact(ops, a, rank)?;
            let v = lr.v.clone();
            Ok((lr, v))
        }
        SvdMethod::Randomized(cfg) => rsvd::rsvd(ops, a, rank, cfg, warm),
    }
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
