//! Input statistics of a linear layer, `H = Σ xᵀx`, and the factors the calibrated methods
//! weight with.
//!
//! Everything is `f32`, as GPTQ's reference computes it: a 7B model's widest input (11,008)
//! gives a 485 MB matrix, and only the lower triangle is ever multiplied or factored.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{
    LltRegularization, cholesky_in_place, cholesky_in_place_scratch,
};
use faer::linalg::matmul::triangular::{self, BlockStructure};
use std::sync::OnceLock;

use faer::{Accum, Mat, MatMut, MatRef, Par};

use super::CalibError;

/// The Gram matrix `H = Σ xᵀx` of a layer's inputs `x [rows, in]` (its lower triangle).
///
/// Layers that read the same input (q/k/v, gate/up) share one.
#[derive(Clone, Debug, PartialEq)]
pub struct Gram {
    sum: Mat<f32>,
    rows: u64,
}

impl Gram {
    /// An empty sum for inputs of width `dim`.
    pub fn new(dim: usize) -> Self {
        Self {
            sum: Mat::zeros(dim, dim),
            rows: 0,
        }
    }

    /// `H = I` (every input direction weighs the same: the plain objective).
    pub fn identity(dim: usize) -> Self {
        Self {
            sum: Mat::identity(dim, dim),
            rows: 1,
        }
    }

    /// Input width.
    pub fn dim(&self) -> usize {
        self.sum.nrows()
    }

    /// Input rows summed so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// `H[i, j]`.
    pub fn value(&self, i: usize, j: usize) -> f32 {
        if i >= j {
            self.sum[(i, j)]
        } else {
            self.sum[(j, i)]
        }
    }

    /// Adds the rows of `x` (row-major `[rows, dim]`).
    ///
    /// # Errors
    /// [`CalibError::Shape`] if `x.len()` is not a multiple of the width;
    /// [`CalibError::NonFinite`] for a NaN or infinite input.
    pub fn add_rows(&mut self, x: &[f32]) -> Result<(), CalibError> {
        let d = self.dim();
        if d == 0 || !x.len().is_multiple_of(d) {
            return Err(CalibError::Shape(format!(
                "{} input values are not rows of width {d}",
                x.len()
            )));
        }
        if x.iter().any(|v| !v.is_finite()) {
            return Err(CalibError::NonFinite);
        }
        let rows = x.len() / d;
        let m = MatRef::from_row_major_slice(x, rows, d);
        // H is symmetric: only its lower triangle is multiplied (half the products).
        triangular::matmul(
            self.sum.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Add,
            m.transpose(),
            BlockStructure::Rectangular,
            m,
            BlockStructure::Rectangular,
            1.0,
            Par::rayon(0),
        );
        crate::upper::clear_upper_state();
        self.rows += rows as u64;
        Ok(())
    }

    /// The weighting of the damped `H + λ·mean(diag H)·I`, `λ = damping` (a copy of the sum
    /// is factored; [`Gram::into_weighting`] factors it in place).
    ///
    /// # Errors
    /// As [`Gram::into_weighting`].
    pub fn weighting(&self, damping: f64) -> Result<Weighting, CalibError> {
        self.clone().into_weighting(damping)
    }

    /// The weighting of the damped `H + λ·mean(diag H)·I`, `λ = damping`, factored in the
    /// sum's own memory.
    ///
    /// Input directions that never occur (a zero diagonal entry) get weight 1 there, as GPTQ
    /// does, so the factor exists.
    ///
    /// # Errors
    /// [`CalibError::Empty`] for a sum with no energy, [`CalibError::NotPositiveDefinite`] if
    /// the Cholesky factorisation fails (add damping), [`CalibError::NonFinite`] for a NaN sum.
    pub fn into_weighting(self, damping: f64) -> Result<Weighting, CalibError> {
        let d = self.dim();
        if !(damping.is_finite() && damping >= 0.0) {
            return Err(CalibError::Shape(format!(
                "damping must be a finite number ≥ 0, got {damping}"
            )));
        }
        let mut h = self.sum;
        let lower_finite = (0..d).all(|j| (j..d).all(|i| h[(i, j)].is_finite()));
        if !lower_finite {
            return Err(CalibError::NonFinite);
        }
        let mean_diag = (0..d).map(|i| f64::from(h[(i, i)])).sum::<f64>() / d.max(1) as f64;
        if d == 0 || mean_diag <= 0.0 {
            return Err(CalibError::Empty);
        }
        let add = (damping * mean_diag) as f32;
        for i in 0..d {
            let v = h[(i, i)];
            h[(i, i)] = if v == 0.0 { 1.0 + add } else { v + add };
        }
        lower_cholesky(h.as_mut())?;
        let s = row_major_lower(h.as_ref());
        if s.iter().any(|v| !v.is_finite()) {
            return Err(CalibError::NotPositiveDefinite);
        }
        Ok(Weighting {
            dim: d,
            ridge: add,
            s,
            s_inv: OnceLock::new(),
        })
    }
}

/// Factors the symmetric `a` (its lower triangle) in place into its lower Cholesky factor.
fn lower_cholesky(a: MatMut<'_, f32>) -> Result<(), CalibError> {
    let d = a.nrows();
    let par = Par::rayon(0);
    let mut buf = MemBuffer::new(cholesky_in_place_scratch::<f32>(d, par, Default::default()));
    let factored = cholesky_in_place(
        a,
        LltRegularization::default(),
        par,
        MemStack::new(&mut buf),
        Default::default(),
    );
    crate::upper::clear_upper_state();
    factored
        .map(|_| ())
        .map_err(|_| CalibError::NotPositiveDefinite)
}

/// The lower triangle of `m` as a row-major `d × d` buffer, zeros above the diagonal.
fn row_major_lower(m: MatRef<'_, f32>) -> Vec<f32> {
    // Tile by tile, so that the column-major reads and the row-major writes both stay in
    // cache: a plain strided copy of a 1536-wide factor took ~40 ms, two per weighting.
    const TILE: usize = 64;
    let d = m.nrows();
    let mut out = vec![0f32; d * d];
    for j0 in (0..d).step_by(TILE) {
        for i0 in (j0..d).step_by(TILE) {
            for i in i0..(i0 + TILE).min(d) {
                let row = &mut out[i * d..(i + 1) * d];
                for (j, v) in row
                    .iter_mut()
                    .enumerate()
                    .take((j0 + TILE).min(i + 1))
                    .skip(j0)
                {
                    *v = m[(i, j)];
                }
            }
        }
    }
    out
}

/// A factor `S` of the damped statistics (`S·Sᵀ = H`, lower triangular): the output error of
/// a replacement `W'` is `‖(W − W')·S‖_F`.
#[derive(Clone, Debug)]
pub struct Weighting {
    dim: usize,
    /// `λ·mean(diag H)`, the damping added to the diagonal.
    ridge: f32,
    /// `S`, row-major.
    s: Vec<f32>,
    /// `S⁻¹`, row-major (or why there is none), made when first asked for: the host
    /// alternation solves with `S` instead, and a 1536-wide inverse costs as much as the
    /// factorisation.
    s_inv: OnceLock<Result<Vec<f32>, CalibError>>,
}

impl Weighting {
    /// Input width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The damping added to the diagonal of `H`: `λ·mean(diag H)`.
    pub fn ridge(&self) -> f32 {
        self.ridge
    }

    /// `S` (lower triangular), row-major `dim × dim`.
    pub fn factor(&self) -> &[f32] {
        &self.s
    }

    /// `S⁻¹` (lower triangular), row-major `dim × dim`.
    ///
    /// # Errors
    /// [`CalibError::NotPositiveDefinite`] if `S` is numerically singular.
    pub fn inverse_factor(&self) -> Result<&[f32], CalibError> {
        let inv = self.s_inv.get_or_init(|| {
            let d = self.dim;
            // Row-major `S` read column-major is `Sᵀ`, and the column-major `(Sᵀ)⁻¹` written
            // is the row-major `S⁻¹`: no copies.
            // On this thread alone: a rayon thread waiting inside a parallel inversion could
            // steal a task that asks for this same inverse and wait on itself (the calibration
            // pass runs a layer's tensors as rayon tasks sharing one weighting).
            let mut inv = vec![0f32; d * d];
            faer::linalg::triangular_inverse::invert_upper_triangular(
                MatMut::from_column_major_slice_mut(&mut inv, d, d),
                MatRef::from_column_major_slice(&self.s, d, d),
                Par::Seq,
            );
            crate::upper::clear_upper_state_here();
            for (i, row) in inv.chunks_mut(d.max(1)).enumerate().take(d) {
                row[i + 1..].fill(0.0);
            }
            match inv.iter().all(|v| v.is_finite()) {
                true => Ok(inv),
                false => Err(CalibError::NotPositiveDefinite),
            }
        });
        inv.as_deref().map_err(Clone::clone)
    }

    /// GPTQ's factor: the upper Cholesky factor `U` of `H⁻¹` (`H⁻¹ = Uᵀ·U`), row-major.
    ///
    /// # Errors
    /// [`CalibError::NotPositiveDefinite`] if `H⁻¹` is numerically singular.
    pub fn gptq_factor(&self) -> Result<Vec<f32>, CalibError> {
        let d = self.dim;
        // H⁻¹ = S⁻ᵀ·S⁻¹ (its lower triangle), then its lower factor L: U = Lᵀ.
        let s_inv = MatRef::from_row_major_slice(self.inverse_factor()?, d, d);
        let mut h_inv = Mat::<f32>::zeros(d, d);
        triangular::matmul(
            h_inv.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Replace,
            s_inv.transpose(),
            BlockStructure::TriangularUpper,
            s_inv,
            BlockStructure::TriangularLower,
            1.0,
            Par::rayon(0),
        );
        crate::upper::clear_upper_state();
        lower_cholesky(h_inv.as_mut())?;
        // Row-major U = Lᵀ: U[i, j] = L[j, i] for j ≥ i.
        let mut u = vec![0f32; d * d];
        for (i, row) in u.chunks_mut(d.max(1)).enumerate().take(d) {
            for (j, v) in row.iter_mut().enumerate().skip(i) {
                *v = h_inv[(j, i)];
            }
        }
        if u.iter().any(|v| !v.is_finite()) {
            return Err(CalibError::NotPositiveDefinite);
        }
        Ok(u)
    }
}

/// `a ← a·S⁻¹` for a row-major `a [rows, n]` and a row-major lower-triangular `S [n, n]`, by
/// a triangular solve (`Sᵀ·(a·S⁻¹)ᵀ = aᵀ`).
pub(crate) fn solve_lower_right(a: &mut [f32], rows: usize, s: &[f32], n: usize) {
    // Row-major buffers read column-major are the transposes: `Sᵀ` (upper) and `aᵀ`. On this
    // thread: `a` is a rank's rows (16), too few to split; on the pool the solves of a
    // SmolLM2 run took 1.7 s of thread time, 0.4 s here.
    faer::linalg::triangular_solve::solve_upper_triangular_in_place(
        MatRef::from_column_major_slice(s, n, n),
        MatMut::from_column_major_slice_mut(a, n, rows),
        Par::Seq,
    );
    crate::upper::clear_upper_state_here();
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
                let v = f64::from(g.value(i, j));
                assert!(
                    (v - direct).abs() <= 1e-5 * (1.0 + direct.abs()),
                    "{v} vs {direct}"
                );
            }
        }
        let w = g.weighting(0.1).unwrap();
        let s = w.factor();
        let mean = (0..d).map(|i| f64::from(g.value(i, i))).sum::<f64>() / d as f64;
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
        let p = host_product(s, w.inverse_factor().unwrap(), [d, d, d]);
        for i in 0..d {
            for j in 0..d {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((p[i * d + j] - want).abs() < 1e-4);
            }
        }
        // a·S⁻¹ by the triangular solve, times S, is a again.
        let a = Gaussian::new(5).values(3 * d);
        let mut x = a.clone();
        solve_lower_right(&mut x, 3, s, d);
        for (got, want) in host_product(&x, s, [3, d, d]).iter().zip(&a) {
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
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
    fn row_major_lower_copies_the_lower_triangle_across_tiles() {
        // Widths below, at and across the tile size.
        for d in [1, 5, 64, 130] {
            let m = Mat::<f32>::from_fn(d, d, |i, j| (i * 1000 + j) as f32);
            let out = row_major_lower(m.as_ref());
            for i in 0..d {
                for j in 0..d {
                    let want = if j <= i { (i * 1000 + j) as f32 } else { 0.0 };
                    assert_eq!(out[i * d + j], want, "d {d}: ({i}, {j})");
                }
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
