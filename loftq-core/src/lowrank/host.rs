//! Small dense helpers on the host: Cholesky, triangular inverse, a seeded Gaussian source and
//! the conversion of faer's factors.

use crate::dense::Dense;

/// A deterministic standard-normal source (SplitMix64 + Box–Muller), identical on every
/// platform and back end, so that a seed fixes the randomized SVD's sketch.
#[derive(Clone, Debug)]
pub struct Gaussian {
    state: u64,
    spare: Option<f64>,
}

impl Gaussian {
    /// A source for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform sample in `(0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// A standard normal sample.
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let (u, v) = (self.uniform(), self.uniform());
        let r = (-2.0 * u.ln()).sqrt();
        let t = std::f64::consts::TAU * v;
        self.spare = Some(r * t.sin());
        r * t.cos()
    }

    /// `count` standard normal samples as `f32`.
    pub fn values(&mut self, count: usize) -> Vec<f32> {
        (0..count).map(|_| self.normal() as f32).collect()
    }
}

/// The first `cols` columns of a faer matrix as a [`Dense`] matrix.
pub(super) fn from_faer<D: Dense>(ops: &D, a: faer::MatRef<'_, f64>, cols: usize) -> D::M {
    let m = a.nrows();
    let mut v = Vec::with_capacity(m * cols);
    for i in 0..m {
        for j in 0..cols {
            v.push(a[(i, j)] as f32);
        }
    }
    ops.matrix(v, [m, cols])
}

/// Inverse of the upper Cholesky factor `R` of the symmetric positive definite `g` (`k×k`,
/// row-major, `f64`): `g = RᵀR`, returns `R⁻¹` row-major. `None` if `g` is not numerically
/// positive definite.
pub(super) fn cholesky_inverse_upper(g: &[f64], k: usize) -> Option<Vec<f64>> {
    // Lower factor L (g = L·Lᵀ), so R = Lᵀ.
    let mut l = vec![0f64; k * k];
    for j in 0..k {
        let mut d = g[j * k + j];
        for p in 0..j {
            d -= l[j * k + p] * l[j * k + p];
        }
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        l[j * k + j] = d;
        for i in j + 1..k {
            let mut s = g[i * k + j];
            for p in 0..j {
                s -= l[i * k + p] * l[j * k + p];
            }
            l[i * k + j] = s / d;
        }
    }
    // Invert L (lower) by forward substitution, then R⁻¹ = (L⁻¹)ᵀ.
    let mut inv = vec![0f64; k * k];
    for c in 0..k {
        for i in c..k {
            let mut s = if i == c { 1.0 } else { 0.0 };
            for p in c..i {
                s -= l[i * k + p] * inv[p * k + c];
            }
            inv[i * k + c] = s / l[i * k + i];
        }
    }
    let mut r_inv = vec![0f64; k * k];
    for i in 0..k {
        for j in 0..k {
            r_inv[i * k + j] = inv[j * k + i];
        }
    }
    Some(r_inv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_inverse_of_known_matrix() {
        // g = RᵀR with R = [[2, 1], [0, 3]] → R⁻¹ = [[0.5, -1/6], [0, 1/3]].
        let g = [4.0, 2.0, 2.0, 10.0];
        let r_inv = cholesky_inverse_upper(&g, 2).unwrap();
        let want = [0.5, -1.0 / 6.0, 0.0, 1.0 / 3.0];
        for (a, b) in r_inv.iter().zip(want) {
            assert!((a - b).abs() < 1e-12);
        }
        assert!(cholesky_inverse_upper(&[1.0, 2.0, 2.0, 1.0], 2).is_none());
    }

    /// The stream is part of the interface: `bench/peft_loftq.py` regenerates the benchmark
    /// matrices from it (its `--self-test` checks the same values).
    #[test]
    fn gaussian_stream_is_pinned() {
        let v = Gaussian::new(0).values(4);
        let want = [1.278_633_6_f32, 0.214_340_58, 0.190_824_1, 0.150_621_67];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
    }

    #[test]
    fn gaussian_moments() {
        let mut g = Gaussian::new(5);
        let v: Vec<f64> = (0..100_000).map(|_| g.normal()).collect();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
    }
}
