//! Exact truncated SVD on the host (faer, `f64`).

use burn::tensor::Tensor;

use super::host::{from_faer, to_faer};
use super::{LowRank, LowRankError};

/// The rank-`rank` truncation of the full thin SVD of `a`, computed on the host in `f64`.
///
/// # Shapes
/// `a: [m, n]` → `u: [m, rank]`, `s: [rank]`, `v: [n, rank]`.
///
/// # Numerical behaviour
/// Accurate to `f64` before the factors are rounded to `f32`; costs `O(m·n·min(m, n))` on the
/// host, which is why it is the oracle and not the default.
pub fn exact_svd(a: &Tensor<2>, rank: usize) -> Result<LowRank, LowRankError> {
    super::check_rank(a.dims(), rank)?;
    let device = a.device();
    let svd = to_faer(a)
        .thin_svd()
        .map_err(|_| LowRankError::NoConvergence)?;
    let s: Vec<f32> = (0..rank).map(|i| svd.S()[i] as f32).collect();
    if s.iter().any(|x| !x.is_finite()) {
        return Err(LowRankError::NoConvergence);
    }
    Ok(LowRank {
        u: from_faer(svd.U(), rank, &device),
        s,
        v: from_faer(svd.V(), rank, &device),
    })
}
