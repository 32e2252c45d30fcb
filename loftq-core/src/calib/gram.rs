//! Input statistics of a linear layer, `H = Σ xᵀx`, and the factors the calibrated methods
//! weight with.

use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatRef, Par, Side};

use super::CalibError;

/// Rows of `x` multiplied at once in `f32` before the partial sum joins the `f64` total.
const ROWS_PER_PRODUCT: usize = 1024;

/// The Gram matrix `H = Σ xᵀx` of a layer's inputs `x [rows, in]`, accumulated in `f64`.
///
/// Layers that read the same input (q/k/v, gate/up) share one.
#[derive(Clone, Debug, PartialEq)]
pub struct Gram {
    dim: usize,
    sum: Vec<f64>,
    rows: u64,
}

impl Gram {
    /// An empty sum for inputs of width `dim`.
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            sum: vec![0.0; dim * dim],
            rows: 0,
        }
    }

    /// `H = I` (every input direction weighs the same: the plain objective).
    pub fn identity(dim: usize) -> Self {
        let mut g = Self::new(dim);
        for i in 0..dim {
            g.sum[i * dim + i] = 1.0;
        }
        g.rows = 1;
        g
    }

    /// A sum given as row-major `dim × dim` values over `rows` input rows.
    ///
    /// # Errors
    /// [`CalibError::Shape`] if `values` is not `dim²` long.
    pub fn from_values(dim: usize, values: Vec<f64>, rows: u64) -> Result<Self, CalibError> {
        if values.len() != dim * dim {
            return Err(CalibError::Shape(format!(
                "{} values for a {dim}×{dim} Gram matrix",
                values.len()
            )));
        }
        Ok(Self {
            dim,
            sum: values,
            rows,
        })
    }

    /// Input width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Input rows summed so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The sum, row-major `dim × dim`.
    pub fn values(&self) -> &[f64] {
        &self.sum
    }

    /// Adds the rows of `x` (row-major `[rows, dim]`).
    ///
    /// # Errors
    /// [`CalibError::Shape`] if `x.len()` is not a multiple of the width;
    /// [`CalibError::NonFinite`] for a NaN or infinite input.
    pub fn add_rows(&mut self, x: &[f32]) -> Result<(), CalibError> {
        let d = self.dim;
        if d == 0 || !x.len().is_multiple_of(d) {
            return Err(CalibError::Shape(format!(
                "{} input values are not rows of width {d}",
                x.len()
            )));
        }
        if x.iter().any(|v| !v.is_finite()) {
            return Err(CalibError::NonFinite);
        }
        // H is symmetric: only the lower triangle is multiplied (half the products), summed,
        // then mirrored.
        let mut part = Mat::<f32>::zeros(d, d);
        for chunk in x.chunks(ROWS_PER_PRODUCT * d) {
            let rows = chunk.len() / d;
            let m = MatRef::from_row_major_slice(chunk, rows, d);
            triangular::matmul(
                part.as_mut(),
                BlockStructure::TriangularLower,
                Accum::Replace,
                m.transpose(),
                BlockStructure::Rectangular,
                m,
                BlockStructure::Rectangular,
                1.0,
                Par::rayon(0),
            );
            crate::upper::clear_upper_state();
            for i in 0..d {
                for j in 0..=i {
                    self.sum[i * d + j] += f64::from(part[(i, j)]);
                }
            }
            self.rows += rows as u64;
        }
        for i in 0..d {
            for j in 0..i {
                self.sum[j * d + i] = self.sum[i * d + j];
            }
        }
        Ok(())
    }

    /// Adds another sum over the same width.
    ///
    /// # Errors
    /// [`CalibError::Shape`] if the widths differ.
    pub fn merge(&mut self, other: &Gram) -> Result<(), CalibError> {
        if other.dim != self.dim {
            return Err(CalibError::Shape(format!(
                "widths {} and {} differ",
                self.dim, other.dim
            )));
        }
        self.sum
            .iter_mut()
            .zip(&other.sum)
            .for_each(|(a, b)| *a += b);
        self.rows += other.rows;
        Ok(())
    }

    /// The weighting of the damped `H + λ·mean(diag H)·I`, `λ = damping`.
    ///
    /// Input directions that never occur (a zero diagonal entry) get weight 1 there, as GPTQ
    /// does, so the factor exists.
    ///
    /// # Errors
    /// [`CalibError::Empty`] for a sum with no energy, [`CalibError::NotPositiveDefinite`] if
    /// the Cholesky factorisation fails (add damping), [`CalibError::NonFinite`] for a NaN sum.
    pub fn weighting(&self, damping: f64) -> Result<Weighting, CalibError> {
        let d = self.dim;
        if !(damping.is_finite() && damping >= 0.0) {
            return Err(CalibError::Shape(format!(
                "damping must be a finite number ≥ 0, got {damping}"
            )));
        }
        if self.sum.iter().any(|v| !v.is_finite()) {
            return Err(CalibError::NonFinite);
        }
        let mean_diag = (0..d).map(|i| self.sum[i * d + i]).sum::<f64>() / d.max(1) as f64;
        if d == 0 || mean_diag <= 0.0 {
            return Err(CalibError::Empty);
        }
        let add = damping * mean_diag;
        let h = Mat::<f64>::from_fn(d, d, |i, j| {
            let v = self.sum[i * d + j];
            match (i == j, v == 0.0) {
                (true, true) => 1.0 + add,
                (true, false) => v + add,
                _ => v,
            }
        });
        let llt = h
            .llt(Side::Lower)
            .map_err(|_| CalibError::NotPositiveDefinite)?;
        let l = llt.L().to_owned();
        let mut l_inv = Mat::<f64>::zeros(d, d);
        faer::linalg::triangular_inverse::invert_lower_triangular(
            l_inv.as_mut(),
            l.as_ref(),
            Par::rayon(0),
        );
        crate::upper::clear_upper_state();
        let rows = |m: &Mat<f64>| -> Vec<f32> {
            (0..d)
                .flat_map(|i| (0..d).map(move |j| (i, j)))
                .map(|(i, j)| m[(i, j)] as f32)
                .collect()
        };
        let (s, s_inv) = (rows(&l), rows(&l_inv));
        if s.iter().chain(&s_inv).any(|v| !v.is_finite()) {
            return Err(CalibError::NotPositiveDefinite);
        }
        Ok(Weighting {
            dim: d,
            s,
            s_inv,
            l_inv,
        })
    }
}

/// A factor `S` of the damped statistics (`S·Sᵀ = H`, lower triangular) and its inverse: the
/// output error of a replacement `W'` is `‖(W − W')·S‖_F`.
#[derive(Clone, Debug)]
pub struct Weighting {
    dim: usize,
    /// `S`, row-major.
    s: Vec<f32>,
    /// `S⁻¹`, row-major.
    s_inv: Vec<f32>,
    l_inv: Mat<f64>,
}

impl Weighting {
    /// Input width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// `S` (lower triangular), row-major `dim × dim`.
    pub fn factor(&self) -> &[f32] {
        &self.s
    }

    /// `S⁻¹` (lower triangular), row-major `dim × dim`.
    pub fn inverse_factor(&self) -> &[f32] {
        &self.s_inv
    }

    /// GPTQ's factor: the upper Cholesky factor `U` of `H⁻¹` (`H⁻¹ = Uᵀ·U`), row-major.
    ///
    /// # Errors
    /// [`CalibError::NotPositiveDefinite`] if `H⁻¹` is numerically singular.
    pub fn gptq_factor(&self) -> Result<Vec<f32>, CalibError> {
        let d = self.dim;
        // H⁻¹ = S⁻ᵀ·S⁻¹.
        let mut h_inv = Mat::<f64>::zeros(d, d);
        faer::linalg::matmul::matmul(
            h_inv.as_mut(),
            Accum::Replace,
            self.l_inv.transpose(),
            self.l_inv.as_ref(),
            1.0,
            Par::rayon(0),
        );
        let llt = h_inv
            .llt(Side::Lower)
            .map_err(|_| CalibError::NotPositiveDefinite)?;
        crate::upper::clear_upper_state();
        let l = llt.L();
        let u: Vec<f32> = (0..d)
            .flat_map(|i| (0..d).map(move |j| (i, j)))
            .map(|(i, j)| if j >= i { l[(j, i)] as f32 } else { 0.0 })
            .collect();
        if u.iter().any(|v| !v.is_finite()) {
            return Err(CalibError::NotPositiveDefinite);
        }
        Ok(u)
    }
}

/// `out = a·b` for row-major `a [m, k]` and `b [k, n]` (a host helper of the tests).
#[cfg(test)]
pub(crate) fn host_product(a: &[f32], b: &[f32], [m, k, n]: [usize; 3]) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    faer::linalg::matmul::matmul(
        faer::MatMut::from_row_major_slice_mut(&mut out, m, n),
        Accum::Replace,
        MatRef::from_row_major_slice(a, m, k),
        MatRef::from_row_major_slice(b, k, n),
        1.0,
        Par::Seq,
    );
    crate::upper::clear_upper_state_here();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lowrank::Gaussian;

    #[test]
    fn factor_reproduces_the_damped_sum() {
        let (n, d) = (50, 7);
        let x = Gaussian::new(3).values(n * d);
        let mut g = Gram::new(d);
        g.add_rows(&x[..20 * d]).unwrap();
        g.add_rows(&x[20 * d..]).unwrap();
        assert_eq!(g.rows(), n as u64);
        // The sum itself, both triangles, against a direct one.
        for i in 0..d {
            for j in 0..d {
                let direct: f64 = (0..n)
                    .map(|r| f64::from(x[r * d + i]) * f64::from(x[r * d + j]))
                    .sum();
                let v = g.values()[i * d + j];
                assert!(
                    (v - direct).abs() <= 1e-5 * (1.0 + direct.abs()),
                    "{v} vs {direct}"
                );
            }
        }
        let w = g.weighting(0.1).unwrap();
        let s = w.factor();
        let mean = (0..d).map(|i| g.values()[i * d + i]).sum::<f64>() / d as f64;
        for i in 0..d {
            for j in 0..d {
                let sst: f64 = (0..d)
                    .map(|k| f64::from(s[i * d + k]) * f64::from(s[j * d + k]))
                    .sum();
                let xtx: f64 = (0..n)
                    .map(|r| f64::from(x[r * d + i]) * f64::from(x[r * d + j]))
                    .sum();
                let want = xtx + if i == j { 0.1 * mean } else { 0.0 };
                assert!((sst - want).abs() < 1e-3 * want.abs().max(1.0), "{i},{j}");
            }
        }
        // S·S⁻¹ = I.
        let p = host_product(s, w.inverse_factor(), [d, d, d]);
        for i in 0..d {
            for j in 0..d {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((p[i * d + j] - want).abs() < 1e-4);
            }
        }
        // Uᵀ·U = H⁻¹, i.e. (Uᵀ·U)·(S·Sᵀ) = I.
        let u = w.gptq_factor().unwrap();
        for i in 0..d {
            for j in 0..d {
                let mut v = 0f64;
                for k in 0..d {
                    let utu: f64 = (0..d)
                        .map(|p| f64::from(u[p * d + i]) * f64::from(u[p * d + k]))
                        .sum();
                    let h: f64 = (0..d)
                        .map(|p| f64::from(s[k * d + p]) * f64::from(s[j * d + p]))
                        .sum();
                    v += utu * h;
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-3, "{i},{j}: {v}");
            }
        }
    }

    #[test]
    fn dead_inputs_and_bad_sums() {
        // Column 1 never sees a value: still factorable.
        let x = [1.0f32, 0.0, 2.0, 0.0, 0.5, 0.0];
        let mut g = Gram::new(2);
        g.add_rows(&x).unwrap();
        assert!(g.weighting(0.0).is_ok());
        assert_eq!(Gram::new(3).weighting(0.01).unwrap_err(), CalibError::Empty);
        assert!(matches!(g.add_rows(&[1.0; 3]), Err(CalibError::Shape(_))));
        assert_eq!(g.add_rows(&[f32::NAN, 0.0]), Err(CalibError::NonFinite));
        assert!(g.weighting(-1.0).is_err());
    }
}
