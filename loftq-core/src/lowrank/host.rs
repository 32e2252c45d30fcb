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
        Self::from_state(seed ^ GAMMA)
    }

    /// A source whose next draw follows `state`, with no spare.
    fn from_state(state: u64) -> Self {
        Self { state, spare: None }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
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

    /// `count` standard normal samples as `f32`: the next `count` of [`Gaussian::normal`]'s
    /// stream. Long runs are made on all cores, each from its place in the stream (SplitMix64
    /// advances by a constant, so pair `p` starts from `state + 2p·γ`): a randomized SVD's
    /// cold sketch is `n × k` of them (200k for SmolLM2's `down_proj` at rank 64, 3.8 ms on one
    /// core here), and a batch on a device makes one per matrix.
    pub fn values(&mut self, count: usize) -> Vec<f32> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        if count < PARALLEL_VALUES || threads < 2 {
            return (0..count).map(|_| self.normal() as f32).collect();
        }
        // A spare from an odd run before comes first; then whole pairs, each thread's run of
        // them written in place.
        let lead = usize::from(self.spare.is_some());
        let pairs = (count - lead).div_ceil(2);
        let start = self.state;
        let at = |pair: usize| start.wrapping_add(GAMMA.wrapping_mul(2 * pair as u64));
        let per = pairs.div_ceil(threads);
        let mut out = vec![0f32; lead + 2 * pairs];
        let (head, body) = out.split_at_mut(lead);
        if let (Some(z), [first]) = (self.spare.take(), head) {
            *first = z as f32;
        }
        std::thread::scope(|scope| {
            for (c, run) in body.chunks_mut(2 * per).enumerate() {
                scope.spawn(move || {
                    let mut g = Gaussian::from_state(at(c * per));
                    for pair in run.chunks_exact_mut(2) {
                        pair[0] = g.normal() as f32;
                        pair[1] = g.spare.take().expect("a pair") as f32;
                    }
                });
            }
        });
        self.state = at(pairs);
        // An odd count leaves the last pair's second value for the next call (in `f64`), as
        // one at a time would.
        if out.len() > count {
            out.pop();
            let mut last = Gaussian::from_state(at(pairs - 1));
            last.normal();
            self.spare = last.spare;
        }
        out
    }
}

/// SplitMix64's increment.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Runs of normal values at least this long are made on all cores.
const PARALLEL_VALUES: usize = 1 << 15;

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
///
/// Every inner loop runs over contiguous rows, the sums in [`dot`]'s independent lanes: at
/// `k = 128` a quarter of the time of one serial sum per entry (0.8 ms here), and randomized
/// SVDs run this several times per matrix (ten for a cold LoftQ iteration on the CPU).
pub(super) fn cholesky_inverse_upper(g: &[f64], k: usize) -> Option<Vec<f64>> {
    // Lower factor L (g = L·Lᵀ), row-major, so R = Lᵀ.
    let mut l = vec![0f64; k * k];
    for i in 0..k {
        for j in 0..=i {
            let (row_j, row_i) = (&l[j * k..j * k + j], &l[i * k..i * k + j]);
            let s = g[i * k + j] - dot(row_i, row_j);
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return None;
                }
                l[i * k + i] = s.sqrt();
            } else {
                l[i * k + j] = s / l[j * k + j];
            }
        }
    }
    // X = L⁻¹ row by row (forward substitution on rows: X[i] = (eᵢ - Σ_{p<i} L[i,p]·X[p]) /
    // L[i,i], each X[p] zero past column p), then R⁻¹ = Xᵀ.
    let mut x = vec![0f64; k * k];
    for i in 0..k {
        let (done, rest) = x.split_at_mut(i * k);
        let row = &mut rest[..i + 1];
        row[i] = 1.0;
        for p in 0..i {
            let c = l[i * k + p];
            for (r, &v) in row[..=p].iter_mut().zip(&done[p * k..p * k + p + 1]) {
                *r -= c * v;
            }
        }
        let d = l[i * k + i];
        row.iter_mut().for_each(|r| *r /= d);
    }
    let mut r_inv = vec![0f64; k * k];
    for (j, row) in x.chunks_exact(k).enumerate() {
        for (i, &v) in row[..=j].iter().enumerate() {
            r_inv[i * k + j] = v;
        }
    }
    r_inv.iter().all(|v| v.is_finite()).then_some(r_inv)
}

/// `Σ aᵢ·bᵢ` over eight independent partial sums, which the compiler keeps in vector
/// registers (one running sum is bound by the latency of each addition).
pub(super) fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut lanes = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for t in 0..8 {
            lanes[t] += x[t] * y[t];
        }
    }
    lanes.iter().sum::<f64>() + tail
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

    /// `R⁻ᵀ·G·R⁻¹ = I` and `R⁻¹` upper triangular, at sizes whose rows are not a whole number
    /// of [`dot`]'s lanes.
    #[test]
    fn cholesky_inverse_whitens_its_gram_matrix() {
        for k in [1usize, 7, 37, 128] {
            let rows = 2 * k + 3;
            let mut src = Gaussian::new(k as u64);
            let y: Vec<f64> = (0..rows * k).map(|_| src.normal()).collect();
            let y = &y;
            let col = |j: usize| (0..rows).map(move |r| y[r * k + j]);
            let g: Vec<f64> = (0..k * k)
                .map(|t| col(t / k).zip(col(t % k)).map(|(a, b)| a * b).sum())
                .collect();
            let r = cholesky_inverse_upper(&g, k).unwrap();
            for i in 0..k {
                for j in 0..i {
                    assert_eq!(r[i * k + j], 0.0, "k {k}: R⁻¹[{i},{j}]");
                }
            }
            // (G·R⁻¹)[p, j], then R⁻ᵀ times it.
            let gr: Vec<f64> = (0..k * k)
                .map(|t| (0..k).map(|q| g[(t / k) * k + q] * r[q * k + t % k]).sum())
                .collect();
            for i in 0..k {
                for j in 0..k {
                    let v: f64 = (0..k).map(|p| r[p * k + i] * gr[p * k + j]).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((v - want).abs() < 1e-9, "k {k}: [{i},{j}] = {v}");
                }
            }
        }
        let y = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        assert_eq!(dot(&y, &y), 385.0);
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

    /// Long runs, made on several cores, are the stream one value at a time would give,
    /// across calls of odd lengths (a spare carried from one call to the next) and with
    /// single draws between them.
    #[test]
    fn long_runs_are_the_same_stream() {
        let (mut fast, mut slow) = (Gaussian::new(9), Gaussian::new(9));
        for count in [
            PARALLEL_VALUES + 1,
            3,
            2 * PARALLEL_VALUES + 7,
            PARALLEL_VALUES,
        ] {
            let got = fast.values(count);
            let want: Vec<f32> = (0..count).map(|_| slow.normal() as f32).collect();
            assert!(got == want, "a run of {count}");
            assert_eq!(fast.normal(), slow.normal());
        }
        assert_eq!(fast.uniform(), slow.uniform());
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
