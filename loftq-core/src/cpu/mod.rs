//! Matrix products on the CPU back end through faer.
//!
//! Burn's flex back end multiplies with the `gemm` crate's AVX2 kernels (about 45–56 GFLOP/s on
//! the 2-core AVX-512 machine this project is measured on); faer's kernels detect AVX-512 at run
//! time and reach 110–180 GFLOP/s on the same shapes (`loftq-bench matmul`). [`matmul`] uses
//! them for flex tensors outside autodiff and falls back to Burn's matmul anywhere else.

mod dense;
mod host;

pub use crate::upper::{clear_upper_state, clear_upper_state_here};
pub use dense::release_buffers;
pub(crate) use dense::{HostOps, RowMat};
pub use host::Host;

use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{BackendPrimitive, Float, Tensor, TensorData};
use faer::{Accum, MatMut, MatRef, Par};

/// `dst = alpha·lhs·rhs` with faer on the rayon pool, then [`clear_upper_state`]. Every faer
/// product of the project goes through here.
pub fn gemm(dst: MatMut<'_, f32>, lhs: MatRef<'_, f32>, rhs: MatRef<'_, f32>, alpha: f32) {
    faer::linalg::matmul::matmul(dst, Accum::Replace, lhs, rhs, alpha, Par::rayon(0));
    clear_upper_state();
}

/// `dst = lhs·rhs` for a lower-triangular `rhs` (its upper triangle is not read).
pub fn gemm_lower(dst: MatMut<'_, f32>, lhs: MatRef<'_, f32>, rhs: MatRef<'_, f32>) {
    use faer::linalg::matmul::triangular::{BlockStructure, matmul};
    matmul(
        dst,
        BlockStructure::Rectangular,
        Accum::Replace,
        lhs,
        BlockStructure::Rectangular,
        rhs,
        BlockStructure::TriangularLower,
        1.0,
        Par::rayon(0),
    );
    clear_upper_state();
}

/// The threads a product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// The rayon pool; then [`clear_upper_state`].
    Pool,
    /// The calling thread alone, for small products inside a rayon task; then
    /// [`clear_upper_state_here`].
    Here,
}

/// `dst = alpha·lhs·rhs`, or `dst += alpha·lhs·rhs` with `add`, for a row-major `dst` of
/// `lhs.nrows() × rhs.ncols()`.
pub fn gemm_rows(
    dst: &mut [f32],
    add: bool,
    [lhs, rhs]: [MatRef<'_, f32>; 2],
    alpha: f32,
    threads: Threads,
) {
    let dst = MatMut::from_row_major_slice_mut(dst, lhs.nrows(), rhs.ncols());
    let accum = if add { Accum::Add } else { Accum::Replace };
    let (par, clear): (_, fn()) = match threads {
        Threads::Pool => (Par::rayon(0), clear_upper_state),
        Threads::Here => (Par::Seq, clear_upper_state_here),
    };
    faer::linalg::matmul::matmul(dst, accum, lhs, rhs, alpha, par);
    clear();
}

/// `a·b` (`[m, k]·[k, n]`): faer for flex tensors, Burn's matmul otherwise.
pub fn matmul(a: &Tensor<2>, b: &Tensor<2>) -> Tensor<2> {
    match (flex(a), flex(b)) {
        (Some(x), Some(y)) => {
            let ([m, k], [_, n]) = (a.dims(), b.dims());
            let (xa, ya) = (Host::matrix(x), Host::matrix(y));
            let mut out = vec![0f32; m * n];
            gemm(
                MatMut::from_row_major_slice_mut(&mut out, m, n),
                xa.view(m, k),
                ya.view(k, n),
                1.0,
            );
            Tensor::from_primitive::<Flex>(FlexTensor::from_data(TensorData::new(out, [m, n])))
        }
        _ => a.clone().matmul(b.clone()),
    }
}

/// The CPU back end's primitive of a tensor outside autodiff; `None` for a tensor of another
/// back end or on the autodiff device. With [`flex_autodiff`], the one way the workspace asks
/// whether a tensor is on the CPU back end.
pub fn flex<const D: usize>(t: &Tensor<D>) -> Option<FlexTensor> {
    t.clone().try_into_primitive::<Flex>().ok()
}

/// The CPU back end's autodiff primitive of a tensor on its autodiff device; `None` for a
/// plain tensor or one of another back end.
pub fn flex_autodiff<const D: usize>(
    t: &Tensor<D>,
) -> Option<<Float as BackendPrimitive<Autodiff<Flex>>>::Primitive> {
    t.clone().try_into_primitive::<Autodiff<Flex>>().ok()
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution};

    use super::*;

    #[test]
    fn matches_burn_for_every_layout() {
        let d = Device::flex();
        let a = Tensor::<2>::random([33, 20], Distribution::Normal(0.0, 1.0), &d);
        let b = Tensor::<2>::random([20, 17], Distribution::Normal(0.0, 1.0), &d);
        let at = Tensor::<2>::random([20, 33], Distribution::Normal(0.0, 1.0), &d);
        let host = |t: Tensor<2>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        let cases = [
            (a.clone(), b.clone()),
            (at.clone().transpose(), b.clone()),
            (a.clone(), b.clone().transpose().transpose()),
            (at.clone().transpose(), b.clone().slice([0..20, 3..17])),
        ];
        for (x, y) in cases {
            let want = host(x.clone().matmul(y.clone()));
            let got = host(matmul(&x, &y));
            let d = want
                .iter()
                .zip(&got)
                .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(d < 1e-4, "max |Δ| {d}");
        }
    }
}
