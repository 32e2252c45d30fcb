//! The full-precision target: what a layer of the quantized model should output is what the
//! full-precision model's layer outputs on *its* inputs, not what it would output on the
//! quantized model's inputs.
//!
//! With the quantized model's inputs `X` (statistics `H = XᵀX`) and the full-precision
//! model's inputs `F` to the same layer, `‖X·W'ᵀ − F·Wᵀ‖² + r·‖W' − W‖²` (the ridge `r` is the
//! weighting's damping, so that equal inputs give `W* = W`) is minimal at
//! `W* = W·(Mᵀ + r·I)·(H + r·I)⁻¹` with `M = XᵀF`, and equals `‖(W' − W*)·S‖²` plus a
//! constant (GPTAQ's asymmetric calibration). Fitting `W*` outright corrects the drift of the
//! inputs that the quantized layers below caused, but from a few thousand tokens it
//! over-fits; [`Weighting::target`] mixes the two objectives.

use faer::{Accum, Mat, MatMut, MatRef, Par};

use super::{CalibError, Weighting};

/// The pairing of the quantized model's inputs `x` to a layer with the full-precision
/// model's, on the same tokens, in one of two forms:
/// - of inputs, `M = Σ xᵀf` (`in × in`, shared by a group's weights), with `f` the
///   full-precision model's inputs;
/// - of outputs, `Pᵀ = Σ xᵀy` (`in × out`, one weight's), with `y = f·Wᵀ` the full-precision
///   layer's outputs, which is `(W·Mᵀ)ᵀ`: the product the target needs, summed directly. It is
///   the smaller when `out < in` (down_proj: the 7B shapes' 180 MB against 485 MB) and cheaper
///   to sum by the same ratio.
#[derive(Clone, Debug, PartialEq)]
pub struct Cross {
    /// `in × in` (`M`) or `in × out` (`Pᵀ`).
    sum: Mat<f32>,
    rows: u64,
    outputs: bool,
}

impl Cross {
    /// An empty sum of inputs of width `dim` (the `M` form).
    pub fn new(dim: usize) -> Self {
        Self {
            sum: Mat::zeros(dim, dim),
            rows: 0,
            outputs: false,
        }
    }

    /// An empty sum for one weight `[out, dim]` (the `P` form).
    pub fn of_outputs(out: usize, dim: usize) -> Self {
        Self {
            sum: Mat::zeros(dim, out),
            rows: 0,
            outputs: true,
        }
    }

    /// Input width.
    pub fn dim(&self) -> usize {
        self.sum.nrows()
    }

    /// The output width of the one weight a sum of outputs belongs to; `None` for a sum of
    /// inputs.
    pub fn outputs(&self) -> Option<usize> {
        self.outputs.then(|| self.sum.ncols())
    }

    /// Rows summed so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// `M[i, j] = Σ x_i·f_j`, or `P[j, i] = Σ y_j·x_i`.
    pub fn value(&self, i: usize, j: usize) -> f32 {
        self.sum[(i, j)]
    }

    /// Adds the paired rows of `x` (row-major `[rows, dim]`) and `f`: row-major `[rows, dim]`
    /// for a sum of inputs, `[rows, out]` (the full-precision outputs) for a sum of outputs.
    ///
    /// # Errors
    /// [`CalibError::Shape`] for lengths that are not the same number of rows of the widths;
    /// [`CalibError::NonFinite`] for a NaN or infinite value.
    pub fn add_rows(&mut self, x: &[f32], f: &[f32]) -> Result<(), CalibError> {
        let (d, k) = (self.dim(), self.sum.ncols());
        let rows = x.len() / d.max(1);
        if d == 0 || k == 0 || x.len() != rows * d || f.len() != rows * k {
            return Err(CalibError::Shape(format!(
                "paired rows of {} and {} values are not rows of widths {d} and {k}",
                x.len(),
                f.len()
            )));
        }
        if x.iter().chain(f).any(|v| !v.is_finite()) {
            return Err(CalibError::NonFinite);
        }
        let (x, f) = (
            MatRef::from_row_major_slice(x, rows, d),
            MatRef::from_row_major_slice(f, rows, k),
        );
        faer::linalg::matmul::matmul(
            self.sum.as_mut(),
            Accum::Add,
            x.transpose(),
            f,
            1.0,
            Par::rayon(0),
        );
        crate::upper::clear_upper_state();
        self.rows += rows as u64;
        Ok(())
    }
}

impl Weighting {
    /// The target `W + mix·(W* − W)` of a weight `w` (row-major `[out, in]`) for the paired
    /// statistics `cross`, with `W* = W·(Mᵀ + r·I)·(H + r·I)⁻¹`; `r` and `H + r·I = S·Sᵀ` are
    /// this weighting's. It minimises `mix·‖X·W'ᵀ − F·Wᵀ‖² + (1 − mix)·‖X·W'ᵀ − X·Wᵀ‖²`
    /// (plus the ridge): the full-precision model's outputs weigh `mix`, the layer's own
    /// outputs on its inputs `1 − mix`. `mix = 0` returns `w`.
    ///
    /// # Errors
    /// [`CalibError::Shape`] if the widths differ or `w` is not rows of the width;
    /// [`CalibError::NonFinite`] if the target is not finite (add damping).
    pub fn target(&self, w: &[f32], cross: &Cross, mix: f32) -> Result<Vec<f32>, CalibError> {
        let n = self.dim();
        let out = w.len() / n.max(1);
        let fits = cross.outputs().is_none_or(|k| k == out);
        if cross.dim() != n || n == 0 || w.len() != out * n || !fits {
            return Err(CalibError::Shape(format!(
                "a weight of {} values, statistics {n} wide, paired statistics {}×{}",
                w.len(),
                cross.dim(),
                cross.sum.ncols()
            )));
        }
        if mix == 0.0 {
            return Ok(w.to_vec());
        }
        // Z = W·Mᵀ + r·W, written row-major: its column-major view is Zᵀ = M·Wᵀ + r·Wᵀ (or
        // Pᵀ + r·Wᵀ, summed as such).
        let mut z = vec![0f32; w.len()];
        let mut zt = MatMut::from_column_major_slice_mut(&mut z, n, out);
        match cross.outputs {
            true => zt.copy_from(cross.sum.as_ref()),
            false => faer::linalg::matmul::matmul(
                zt.as_mut(),
                Accum::Replace,
                cross.sum.as_ref(),
                MatRef::from_row_major_slice(w, out, n).transpose(),
                1.0,
                Par::rayon(0),
            ),
        }
        let r = self.ridge();
        for (zi, wi) in z.iter_mut().zip(w) {
            *zi += r * wi;
        }
        let mut zt = MatMut::from_column_major_slice_mut(&mut z, n, out);
        // W*·S·Sᵀ = Z: S·Vᵀ = Zᵀ (V = W*·S), then Sᵀ·W*ᵀ = Vᵀ.
        let s = MatRef::from_row_major_slice(self.factor(), n, n);
        faer::linalg::triangular_solve::solve_lower_triangular_in_place(
            s,
            zt.as_mut(),
            Par::rayon(0),
        );
        faer::linalg::triangular_solve::solve_upper_triangular_in_place(
            s.transpose(),
            zt.as_mut(),
            Par::rayon(0),
        );
        crate::upper::clear_upper_state();
        for (zi, wi) in z.iter_mut().zip(w) {
            *zi = wi + mix * (*zi - wi);
        }
        match z.iter().all(|v| v.is_finite()) {
            true => Ok(z),
            false => Err(CalibError::NonFinite),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calib::Gram;

    fn rows(n: usize, d: usize, seed: u32) -> Vec<f32> {
        (0..n * d)
            .map(|i| {
                let v = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (v % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Equal inputs give the weight itself; different ones the least-squares optimum, checked
    /// through its normal equations in `f64`.
    #[test]
    fn target_is_the_ridge_least_squares_fit() {
        let (n, d, out) = (64, 8, 5);
        let (x, w) = (rows(n, d, 1), rows(out, d, 2));
        let f: Vec<f32> = (x.iter().zip(rows(n, d, 3)))
            .map(|(a, b)| a + 0.3 * b)
            .collect();
        let mut gram = Gram::new(d);
        gram.add_rows(&x).unwrap();
        let weighting = gram.weighting(0.05).unwrap();
        let mut same = Cross::new(d);
        same.add_rows(&x, &x).unwrap();
        let t = weighting.target(&w, &same, 1.0).unwrap();
        for (a, b) in t.iter().zip(&w) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        let mut cross = Cross::new(d);
        cross.add_rows(&x, &f).unwrap();
        assert_eq!(weighting.target(&w, &cross, 0.0).unwrap(), w);
        let t = weighting.target(&w, &cross, 1.0).unwrap();
        // Between the two objectives, the target moves along the line from W to W*.
        let half = weighting.target(&w, &cross, 0.25).unwrap();
        for ((h, t), w) in half.iter().zip(&t).zip(&w) {
            assert!((h - (w + 0.25 * (t - w))).abs() < 1e-5, "{h}");
        }
        assert!(t.iter().zip(&w).any(|(t, w)| (t - w).abs() > 1e-2));
        // (H + r·I)·W*ᵀ = (M + r·I)·Wᵀ, column by column of Wᵀ.
        let r = f64::from(weighting.ridge());
        let at = |m: &[f32], i: usize, j: usize| f64::from(m[i * d + j]);
        for o in 0..out {
            for i in 0..d {
                let (mut lhs, mut rhs) = (r * at(&t, o, i), r * at(&w, o, i));
                for j in 0..d {
                    let (mut h, mut m) = (0f64, 0f64);
                    for k in 0..n {
                        h += at(&x, k, i) * at(&x, k, j);
                        m += at(&x, k, i) * at(&f, k, j);
                    }
                    lhs += h * at(&t, o, j);
                    rhs += m * at(&w, o, j);
                }
                assert!(
                    (lhs - rhs).abs() < 1e-3 * (1.0 + rhs.abs()),
                    "{lhs} vs {rhs}"
                );
            }
        }
        assert!(cross.add_rows(&x, &f[1..]).is_err());
        assert!(weighting.target(&w[1..], &cross, 1.0).is_err());
    }

    /// The sum of outputs `Σ xᵀ(f·Wᵀ)` gives the target the sum of inputs gives, and belongs
    /// to its one weight.
    #[test]
    fn sum_of_outputs_gives_the_same_target() {
        let (n, d, out) = (48, 9, 4);
        let (x, w) = (rows(n, d, 5), rows(out, d, 6));
        let f: Vec<f32> = (x.iter().zip(rows(n, d, 7)))
            .map(|(a, b)| a - 0.4 * b)
            .collect();
        // y = f·Wᵀ, row-major [n, out].
        let y: Vec<f32> = (0..n * out)
            .map(|i| {
                (0..d)
                    .map(|j| f[i / out * d + j] * w[i % out * d + j])
                    .sum()
            })
            .collect();
        let mut gram = Gram::new(d);
        gram.add_rows(&x).unwrap();
        let weighting = gram.weighting(0.05).unwrap();
        let (mut inputs, mut outputs) = (Cross::new(d), Cross::of_outputs(out, d));
        inputs.add_rows(&x, &f).unwrap();
        // In two parts: the sum accumulates.
        let half = n / 2;
        outputs.add_rows(&x[..half * d], &y[..half * out]).unwrap();
        outputs.add_rows(&x[half * d..], &y[half * out..]).unwrap();
        assert_eq!((outputs.rows(), outputs.outputs()), (n as u64, Some(out)));
        assert_eq!(inputs.outputs(), None);
        for mix in [0.3, 1.0] {
            let a = weighting.target(&w, &inputs, mix).unwrap();
            let b = weighting.target(&w, &outputs, mix).unwrap();
            for (a, b) in a.iter().zip(&b) {
                assert!((a - b).abs() < 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
            }
        }
        // Another weight's shape, or outputs of the wrong width, are refused.
        assert!(weighting.target(&w[d..], &outputs, 1.0).is_err());
        assert!(outputs.add_rows(&x, &f).is_err());
    }
}
