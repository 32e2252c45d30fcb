//! Exact truncated SVD on the host (faer, `f64`).

use burn::tensor::Tensor;

use super::host::from_faer;
use super::{LowRank, LowRankError};
use crate::dense::{Dense, DeviceOps};

/// The rank-`rank` truncation of the full thin SVD of `a`, computed on the host in `f64`.
///
/// # Shapes
/// `a: [m, n]` → `u: [m, rank]`, `s: [rank]`, `v: [n, rank]`.
///
/// # Numerical behaviour
/// Accurate to `f64` before the factors are rounded to `f32`; costs `O(m·n·min(m, n))` on the
/// host, which is why it is the oracle and not the default.
pub fn exact_svd(a: &Tensor<2>, rank: usize) -> Result<LowRank, LowRankError> {
    exact(&DeviceOps(a.device()), a, rank)
}

/// [`exact_svd`] with any [`Dense`] implementation.
pub(crate) fn exact<D: Dense>(
    ops: &D,
    a: &D::M,
    rank: usize,
) -> Result<LowRank<D::M>, LowRankError> {
    let [m, n] = ops.dims(a);
    super::check_rank([m, n], rank)?;
    let v = ops.to_rows(a);
    let svd = faer::Mat::<f64>::from_fn(m, n, |i, j| f64::from(v[i * n + j]))
        .thin_svd()
        .map_err(|_| LowRankError::NoConvergence)?;
    crate::upper::clear_upper_state();
    let s: Vec<f32> = (0..rank).map(|i| svd.S()[i] as f32).collect();
    if s.iter().any(|x| !x.is_finite()) {
        return Err(LowRankError::NoConvergence);
    }
    Ok(LowRank {
        u: from_faer(ops, svd.U(), rank),
        s,
        v: from_faer(ops, svd.V(), rank),
    })
}
