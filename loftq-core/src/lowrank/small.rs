//! The small `k × k` problems of the randomized SVD, solved on the host: Cholesky-QR's factor
//! of a sketch's Gram matrix, and the final step's eigenproblem, alone or fused with the last
//! orthonormalisation.

use faer::linalg::matmul::triangular::BlockStructure;

use super::LowRankError;
use super::host::{cholesky_inverse_upper, dot};

/// The two `k×k` halves of each row of a `[k, 2k]` matrix read as rows: `(G, H)`.
pub(crate) fn split_pairs(rows: &[f32], k: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut g, mut h) = (Vec::with_capacity(k * k), Vec::with_capacity(k * k));
    for row in rows.chunks_exact(2 * k) {
        g.extend_from_slice(&row[..k]);
        h.extend_from_slice(&row[k..]);
    }
    (g, h)
}

/// `a·b` on this thread (faer's operators spread small products over every core), reading
/// only the triangles that `structure` names: `R⁻¹` is upper triangular, so the products
/// with it take half the work.
fn seq_mul(
    a: faer::MatRef<'_, f64>,
    b: faer::MatRef<'_, f64>,
    structure: [BlockStructure; 2],
) -> faer::Mat<f64> {
    let mut out = faer::Mat::<f64>::zeros(a.nrows(), b.ncols());
    faer::linalg::matmul::triangular::matmul(
        out.as_mut(),
        BlockStructure::Rectangular,
        faer::Accum::Replace,
        a,
        structure[0],
        b,
        structure[1],
        1.0,
        faer::Par::Seq,
    );
    out
}

/// The last orthonormalisation and the final step at once, for a sketch `Y` (`[m, k]`) whose
/// Cholesky-QR settles in one pass ([`GramFactor::settled`]). With `Y = Q·R` and `Z = Aᵀ·Y`,
/// `Bᵀ = Aᵀ·Q = Z·R⁻¹`, so `B·Bᵀ = R⁻ᵀ·(ZᵀZ)·R⁻¹`: both Gram matrices come in one read, and
/// `Q·U_B = Y·(R⁻¹·U_B)`, `V_B = Z·(R⁻¹·U_B·S⁻¹)`. Against orthonormalising first, a read and
/// the product `Y·R⁻¹` fewer; with `κ(Y)² ≤ 100` the `f32` Gram matrices lose no more than
/// that pass's `Q` would.
pub(crate) struct SettledFinal {
    /// Singular values, decreasing.
    pub s: Vec<f64>,
    /// `R⁻¹·U_B` (`k×k`): `U = Y·left`.
    pub left: faer::Mat<f64>,
    /// `R⁻¹·U_B·S⁻¹` (`k×k`): `V_B = Z·right`.
    pub right: faer::Mat<f64>,
}

impl SettledFinal {
    /// The final step for an orthonormal `Q` (`R = I`), from the SVD of its projection:
    /// `left = U_B`, `right = U_B·S⁻¹`.
    pub fn of_orthonormal(small: SmallSvd) -> Self {
        let right = small.times_inv(&small.ub);
        Self {
            s: small.s,
            left: small.ub,
            right,
        }
    }

    /// The scales of the right basis's columns that make it the best warm start: `S⁻¹`. The
    /// range, and so the next result, stays as it is, but a next matrix near this one maps
    /// `V_B·S⁻¹` to near `U_B`, a sketch that one Cholesky-QR pass settles, where `A·V_B`
    /// (`κ = σ₁/σ_k`) may need two (NF2's residuals).
    pub fn warm_scales(&self) -> impl Iterator<Item = f32> + '_ {
        // Singular values from a Gram matrix in `f32` carry no relative accuracy below
        // `√ε·σ₁`: scaling by them would blow noise up. (A zero matrix keeps its scale.)
        let floor = self.s[0] * f64::from(f32::EPSILON).sqrt();
        (self.s.iter()).map(move |&x| match floor > 0.0 {
            true => 1.0 / x.max(floor) as f32,
            false => 1.0,
        })
    }

    /// From `G = YᵀY` and `H = ZᵀZ` (`k×k`, row-major, `f32`): `G`'s Cholesky-QR factor
    /// ([`gram_inverse_factor`]), and the final step unless `Y` needs a second pass or the
    /// Gram matrices' scales are far from 1 (orthonormalise `Y·R⁻¹` then). A zero `Y` has no
    /// factor and zero factorisations.
    pub fn of_grams(g: &[f32], h: &[f32], k: usize) -> Result<Fusion, LowRankError> {
        let Some(f) = gram_inverse_factor(g, k)? else {
            let zero = Self {
                s: vec![0.0; k],
                left: faer::Mat::zeros(k, k),
                right: faer::Mat::zeros(k, k),
            };
            return Ok((None, Some(zero)));
        };
        // `ZᵀZ` scales as `‖Y‖²·‖A‖²`: far from 1 its `f32` values lose their small entries
        // (or overflow), where `B·Bᵀ` of an orthonormal `Q` would not.
        let in_range = |m: &[f32]| {
            let top = (0..k).map(|i| m[i * k + i]).fold(0.0f32, f32::max);
            (1e-28..=1e28).contains(&top)
        };
        if !(f.settled && in_range(g) && in_range(h)) {
            return Ok((Some(f), None));
        }
        let r_inv = faer::Mat::from_fn(k, k, |i, j| f.r_inv[i * k + j]);
        let h = faer::Mat::from_fn(k, k, |i, j| f64::from(h[i * k + j]));
        let (full, upper) = (BlockStructure::Rectangular, BlockStructure::TriangularUpper);
        let lower = BlockStructure::TriangularLower;
        let hr = seq_mul(h.as_ref(), r_inv.as_ref(), [full, upper]);
        let m = seq_mul(r_inv.transpose(), hr.as_ref(), [lower, full]);
        // Symmetric up to rounding; the eigensolver reads one triangle.
        let m = faer::Mat::from_fn(k, k, |i, j| 0.5 * (m[(i, j)] + m[(j, i)]));
        let small = SmallSvd::of_gram(m)?;
        let left = seq_mul(r_inv.as_ref(), small.ub.as_ref(), [upper, full]);
        let right = small.times_inv(&left);
        let done = Self {
            s: small.s,
            left,
            right,
        };
        Ok((Some(f), Some(done)))
    }
}

/// What [`SettledFinal::of_grams`] makes of a sketch: its factor (none for a zero sketch) and
/// the final step where one pass settles.
pub(crate) type Fusion = (Option<GramFactor>, Option<SettledFinal>);

/// The SVD of a short, wide `B` (`k×n`) from its Gram matrix `B·Bᵀ = U_B·S²·U_Bᵀ`: 4× faster
/// than faer's SVD of the wide `B`. Squaring the singular values costs the smallest of them
/// relative accuracy (`ε·(σ₁/σᵢ)²`), far below what LoftQ's and PiSSA's top `r` need: the
/// same errors as forming `B·Bᵀ` in `f64` (SmolLM2, NF2, r64: every matrix within 5·10⁻⁵).
/// Then `V_B = Bᵀ·U_B·S⁻¹` = `Bᵀ·ub·inv`.
pub(crate) struct SmallSvd {
    /// Singular values, decreasing.
    pub s: Vec<f64>,
    /// `U_B` `[k, k]`, columns in the order of `s`.
    pub ub: faer::Mat<f64>,
    /// `S⁻¹` `[k, k]`, zero for directions with no energy.
    pub inv: faer::Mat<f64>,
}

impl SmallSvd {
    /// `m·S⁻¹` (`S⁻¹` is diagonal: a scaling of the columns, not a product).
    pub fn times_inv(&self, m: &faer::Mat<f64>) -> faer::Mat<f64> {
        faer::Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] * self.inv[(j, j)])
    }

    /// From `B·Bᵀ` formed in `f32` (`k×k`, row-major, symmetric).
    pub fn of_f32_gram(gram: &[f32], k: usize) -> Result<Self, LowRankError> {
        Self::of_gram(faer::Mat::from_fn(k, k, |i, j| f64::from(gram[i * k + j])))
    }

    /// From `B·Bᵀ` (`k×k`, symmetric).
    pub fn of_gram(gram: faer::Mat<f64>) -> Result<Self, LowRankError> {
        use faer::linalg::evd;
        let k = gram.nrows();
        // One thread: at these sizes faer's default (all cores) costs more than it saves
        // (k = 128: 2.3 ms against 1.9 ms), and batches already run one matrix per core.
        let (mut vals, mut vecs) = (
            faer::diag::Diag::<f64>::zeros(k),
            faer::Mat::<f64>::zeros(k, k),
        );
        let (par, params) = (faer::Par::Seq, Default::default());
        let need =
            evd::self_adjoint_evd_scratch::<f64>(k, evd::ComputeEigenvectors::Yes, par, params);
        let mut scratch = faer::dyn_stack::MemBuffer::new(need);
        let stack = faer::dyn_stack::MemStack::new(&mut scratch);
        evd::self_adjoint_evd(
            gram.as_ref(),
            vals.as_mut(),
            Some(vecs.as_mut()),
            par,
            stack,
            params,
        )
        .map_err(|_| LowRankError::NoConvergence)?;
        // Eigenvalues come in increasing order: reverse them.
        let s: Vec<f64> = (0..k).map(|i| vals[k - 1 - i].max(0.0).sqrt()).collect();
        if s.iter().any(|x| !x.is_finite()) {
            return Err(LowRankError::NoConvergence);
        }
        let ub = faer::Mat::<f64>::from_fn(k, k, |i, j| vecs[(i, k - 1 - j)]);
        // Directions with no energy (a matrix of lower rank) get zero vectors, not noise.
        let floor = s[0] * 1e-7;
        let inv = faer::Mat::<f64>::from_fn(k, k, |i, j| {
            if i == j && s[i] > floor {
                1.0 / s[i]
            } else {
                0.0
            }
        });
        Ok(Self { s, ub, inv })
    }
}

/// One step of Cholesky-QR: `R⁻¹`, and whether `Y·R⁻¹` is already orthonormal to `f32`'s
/// needs.
pub(crate) struct GramFactor {
    /// `R⁻¹` (`k×k`, row-major).
    pub r_inv: Vec<f64>,
    /// Whether `Y` is so well conditioned (`κ(Y)² ≤` [`SETTLED_KAPPA2`], no shift) that one
    /// pass loses at most about `κ²·ε ≈ 10⁻⁵` of orthogonality and a second is not needed.
    pub settled: bool,
    /// The estimate of `κ(Y)²` (from below); infinite where the diagonal was shifted.
    pub kappa2: f64,
}

/// The largest `κ(Y)²` for which one Cholesky-QR pass is kept. LoftQ's sketches are near
/// 1.3–1.7 (Gaussian or warm-started, 1024², rank 64), far inside it.
pub(crate) const SETTLED_KAPPA2: f64 = 100.0;

/// `R⁻¹` for the Gram matrix `gram = YᵀY = RᵀR` (`k×k`, row-major), the step of Cholesky-QR:
/// `Y·R⁻¹` has orthonormal columns. `None` for a zero `Y`. A numerically singular Gram
/// matrix (a rank-deficient sketch) gets its diagonal shifted until it factors. Also whether
/// one pass is enough ([`GramFactor::settled`]).
pub(crate) fn gram_inverse_factor(
    gram: &[f32],
    k: usize,
) -> Result<Option<GramFactor>, LowRankError> {
    let mut g: Vec<f64> = gram.iter().map(|&x| f64::from(x)).collect();
    let trace: f64 = (0..k).map(|i| g[i * k + i]).sum();
    if !trace.is_finite() {
        return Err(LowRankError::NoConvergence);
    }
    if trace == 0.0 {
        return Ok(None);
    }
    let mut shift = 0.0;
    let r_inv = loop {
        if let Some(r) = cholesky_inverse_upper(&g, k) {
            break r;
        }
        let next = if shift == 0.0 {
            1e-7 * trace.max(f64::MIN_POSITIVE)
        } else {
            shift * 10.0
        };
        for i in 0..k {
            g[i * k + i] += next - shift;
        }
        shift = next;
        if shift > trace {
            return Err(LowRankError::NoConvergence);
        }
    };
    let kappa2 = match shift == 0.0 {
        true => condition_squared(&g, &r_inv, k),
        false => f64::INFINITY,
    };
    Ok(Some(GramFactor {
        r_inv,
        settled: kappa2 <= SETTLED_KAPPA2,
        kappa2,
    }))
}

impl GramFactor {
    /// `R⁻¹` in `f32`, for the device.
    pub fn r_inv_f32(&self) -> Vec<f32> {
        self.r_inv.iter().map(|&x| x as f32).collect()
    }
}

/// `κ(Y)² = λ_max(G)·λ_max(G⁻¹)` for `G = YᵀY = RᵀR`, each by power iteration (`G⁻¹ =
/// R⁻¹·R⁻ᵀ`): estimates from below, which [`SETTLED_KAPPA2`]'s margin covers.
fn condition_squared(g: &[f64], r_inv: &[f64], k: usize) -> f64 {
    let largest = |step: &dyn Fn(&[f64]) -> Vec<f64>| {
        let mut x = vec![1.0 / (k as f64).sqrt(); k];
        let mut lambda = 0.0;
        for _ in 0..30 {
            let y = step(&x);
            let norm = dot(&y, &y).sqrt();
            if !(norm > 0.0 && norm.is_finite()) {
                return f64::INFINITY;
            }
            lambda = norm;
            x = y.into_iter().map(|v| v / norm).collect();
        }
        lambda
    };
    let big = largest(&|x| g.chunks_exact(k).map(|row| dot(row, x)).collect());
    // R⁻¹ is upper triangular: row i is zero before column i.
    let inv = largest(&|x| {
        let mut t = vec![0f64; k];
        for (i, row) in r_inv.chunks_exact(k).enumerate() {
            for (t, &v) in t[i..].iter_mut().zip(&row[i..]) {
                *t += x[i] * v;
            }
        }
        let rows = r_inv.chunks_exact(k).enumerate();
        rows.map(|(i, row)| dot(&row[i..], &t[i..])).collect()
    });
    big * inv
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `YᵀY` of a `[rows, k]` `y` whose column `j` is scaled by `scales[j]` (orthogonal
    /// columns before scaling: `κ(Y)` is the ratio of the scales).
    fn gram_of_scaled(scales: &[f32]) -> Vec<f32> {
        let k = scales.len();
        let mut g = vec![0f32; k * k];
        for (j, s) in scales.iter().enumerate() {
            g[j * k + j] = s * s;
        }
        // A rotation mixes the columns so that the Gram matrix is not diagonal.
        let (c, s) = (0.8f32, 0.6f32);
        let rot = |g: &[f32]| {
            let mut r = g.to_vec();
            for j in 0..k {
                let (a, b) = (g[j], g[k + j]);
                r[j] = c * a - s * b;
                r[k + j] = s * a + c * b;
            }
            let mut t = r.clone();
            for i in 0..k {
                let (a, b) = (r[i * k], r[i * k + 1]);
                t[i * k] = c * a - s * b;
                t[i * k + 1] = s * a + c * b;
            }
            t
        };
        rot(&g)
    }

    #[test]
    fn one_pass_only_for_well_conditioned_sketches() {
        let settled = |scales: &[f32]| {
            let g = gram_of_scaled(scales);
            let f = gram_inverse_factor(&g, scales.len()).unwrap().unwrap();
            f.settled
        };
        // κ² = 4 and 64: one pass; 400 and 10⁶: two.
        assert!(settled(&[2.0, 1.0, 1.5, 1.2]));
        assert!(settled(&[8.0, 1.0, 3.0, 2.0]));
        assert!(!settled(&[20.0, 1.0, 3.0, 2.0]));
        assert!(!settled(&[1.0, 1e-3, 0.5, 0.2]));
    }
}
