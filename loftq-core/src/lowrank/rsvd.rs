//! Randomized truncated SVD: sketch, power iterations with re-orthonormalisation, and a small
//! exact SVD of the projected matrix on the host.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::host::{Gaussian, from_faer};
use super::small::{SettledFinal, SmallSvd, gram_inverse_factor, split_pairs};
use super::{LowRank, LowRankError};
use crate::dense::{Dense, DeviceOps};

/// Parameters of [`randomized_svd`].
///
/// # Defaults
/// LoftQ's residuals have flat spectra, so the sketch needs power iterations (1–2) and extra
/// columns: with NF4, rank 64, T = 1 on a Gaussian 1024², 16 extra columns gave a LoftQ error
/// 1.3% above the exact SVD's, 64 pass the 1% test, and on 4096² they land 0.45% above. LoftQ
/// warm-starts each iteration from the previous one's right basis, so the subspace iteration
/// continues across LoftQ iterations and the later ones need no power iteration of their own:
/// on a 4096² Gaussian (NF4, r = 64, T = 5) 16 warm extra columns and none leave the error
/// within 0.8% of the exact SVD's at under half the time of 2 power iterations and 64 columns
/// (`loftq-bench loftq`).
///
/// With the `clap` feature the fields are the `--oversample`, `--power-iters`,
/// `--warm-oversample` and `--warm-power-iters` flags of every command that runs it (the seed
/// is not a flag).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct RsvdConfig {
    /// Randomized SVD: extra sketch columns of a cold start, `k = rank + oversample` (default
    /// max(16, rank)). LoftQ with more than one iteration uses the warm value throughout.
    #[cfg_attr(feature = "clap", arg(long))]
    pub oversample: Option<usize>,
    /// Randomized SVD: power iterations of a cold start (the first LoftQ iteration).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = RsvdConfig::DEFAULT.power_iters))]
    pub power_iters: usize,
    /// Randomized SVD: extra sketch columns of a warm start (LoftQ iterations 2..T of `init`).
    #[serde(default = "sixteen")]
    #[cfg_attr(
        feature = "clap",
        arg(long, default_value_t = RsvdConfig::DEFAULT.warm_oversample)
    )]
    pub warm_oversample: usize,
    /// Randomized SVD: power iterations of a warm start (LoftQ iterations 2..T of `init`).
    #[serde(default)]
    #[cfg_attr(
        feature = "clap",
        arg(long, default_value_t = RsvdConfig::DEFAULT.warm_power_iters)
    )]
    pub warm_power_iters: usize,
    /// Seed of the Gaussian sketch.
    #[cfg_attr(feature = "clap", arg(skip = RsvdConfig::DEFAULT.seed))]
    pub seed: u64,
}

impl RsvdConfig {
    /// The defaults: 2 cold power iterations, 16 warm extra columns, no warm power iteration.
    pub const DEFAULT: Self = Self {
        oversample: None,
        power_iters: 2,
        warm_oversample: 16,
        warm_power_iters: 0,
        seed: 0,
    };

    /// The sketch's columns `k` and the power iterations for a rank-`rank` SVD of an `[m, n]`
    /// matrix, cold or warm-started.
    pub(crate) fn sketch(&self, [m, n]: [usize; 2], rank: usize, warm: bool) -> (usize, usize) {
        let (extra, power_iters) = match warm {
            true => (self.warm_oversample, self.warm_power_iters),
            false => (self.oversample.unwrap_or(rank.max(16)), self.power_iters),
        };
        ((rank + extra).min(m.min(n)), power_iters)
    }
}

impl Default for RsvdConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

fn sixteen() -> usize {
    16
}

/// Rank-`rank` truncated SVD of `a` by randomized subspace iteration.
///
/// # Shapes
/// `a: [m, n]`, `warm: [n, j]` (optional, orthonormal columns; only the first `k` are used)
/// → `u: [m, rank]`, `s: [rank]`, `v: [n, rank]`.
///
/// # Algorithm
/// Halko, Martinsson & Tropp (2011), algorithm 4.4: `Q = orth(A·Ω)` for a Gaussian
/// `Ω: [n, k]` (its first columns replaced by `warm` when given), then `power_iters` times
/// (`warm_power_iters` with a warm start) `Q = orth(A·orth(Aᵀ·Q))`; finally the SVD of
/// `B = Qᵀ·A` (`k×n`) from the eigendecomposition of `B·Bᵀ` on the host (`B·Bᵀ` is formed
/// on `a`'s device and only it is read, not the tall `Bᵀ`). The products
/// with `A` run on `a`'s device; orthonormalisation is Cholesky-QR done twice (the Gram matrix
/// `k×k` goes to the host, its inverse factor comes back), with a diagonal shift if the Gram
/// matrix is numerically singular; once where the first pass finds the sketch well
/// conditioned (`κ² ≤ 100`, as LoftQ's are): a read and two products fewer. On a device
/// (`Dense::reads_wait`) the last sketch's orthonormalisation and the final step share one
/// read (`SettledFinal`) unless an earlier sketch of the same call needed two passes.
///
/// # Numerical behaviour
/// Deterministic for a seed on a given back end. The error of the top singular values falls
/// geometrically with `power_iters` at a rate set by `σ_{k+1}/σ_rank`.
pub fn randomized_svd(
    a: &Tensor<2>,
    rank: usize,
    cfg: &RsvdConfig,
    warm: Option<&Tensor<2>>,
) -> Result<LowRank, LowRankError> {
    let device = a.device();
    #[cfg(feature = "flex")]
    if let Some(x) = crate::cpu::flex(a) {
        let ops = crate::cpu::HostOps::default();
        let host = crate::cpu::RowMat::of_flex(&x, a.dims());
        let warm = warm.map(|w| ops.matrix(crate::quant::host_f32(w), w.dims()));
        return Ok(rsvd(&ops, &host, rank, cfg, warm.as_ref())?
            .0
            .into_tensors(&ops, &device));
    }
    Ok(rsvd(&DeviceOps(device), a, rank, cfg, warm)?.0)
}

/// [`randomized_svd`] with any [`Dense`] implementation. Also returns the sketch's whole right
/// basis `[n, k]` (the top `k` right singular vectors of the projection; on a device scaled by
/// `S⁻¹`), the best warm start for a next, similar matrix: it needs no new Gaussian columns.
pub(crate) fn rsvd<D: Dense>(
    ops: &D,
    a: &D::M,
    rank: usize,
    cfg: &RsvdConfig,
    warm: Option<&D::M>,
) -> Result<(LowRank<D::M>, D::M), LowRankError> {
    let [m, n] = ops.dims(a);
    super::check_rank([m, n], rank)?;
    let (k, power_iters) = cfg.sketch([m, n], rank, warm.is_some());
    let mut gauss = Gaussian::new(cfg.seed);
    let mut gaussian = |cols: usize| ops.matrix(gauss.values(n * cols), [n, cols]);
    let omega = match warm {
        Some(w) if ops.dims(w)[1] >= k => ops.first_cols(w, k),
        Some(w) => ops.cat_cols(w, &gaussian(k - ops.dims(w)[1])),
        None => gaussian(k),
    };
    ops.mark("svd: sketch");
    let product = |y: D::M| {
        ops.mark("svd: products");
        orthonormalize(ops, y)
    };
    let mut y = ops.mul(a, &omega);
    let mut fuse = ops.reads_wait();
    for _ in 0..power_iters {
        let (q, settled) = product(y)?;
        let (z, _) = product(ops.tmul(a, &q))?;
        y = ops.mul(a, &z);
        fuse &= settled;
    }
    if fuse {
        // Z = Aᵀ·Y, and YᵀY with ZᵀZ in one read.
        let z = ops.tmul(a, &y);
        ops.mark("svd: products");
        let grams = ops.to_rows(&ops.cat_cols(&ops.gram(&y), &ops.gram(&z)));
        let (g, h) = split_pairs(&grams, k);
        let (factor, fused) = SettledFinal::of_grams(&g, &h, k)?;
        if let Some(f) = fused {
            ops.mark("svd: small svd");
            return Ok(finish(ops, &y, &z, f, rank));
        }
        // The read gave the first Cholesky-QR pass: the rest as without fusing.
        y = match factor {
            Some(f) => ops.mul(&y, &ops.matrix(f.r_inv_f32(), [k, k])),
            None => y,
        };
    }
    let (q, _) = product(y)?;
    // Bᵀ = Aᵀ·Q: [n, k]; the SVD of B = Qᵀ·A gives A ≈ (Q·U_B)·S·V_Bᵀ, from the
    // eigendecomposition of the small B·Bᵀ (see [`SmallSvd`]); V_B = Bᵀ·U_B·S⁻¹. B·Bᵀ is
    // formed where `a` lives (f32; on a device only it is read, not Bᵀ).
    let bt = ops.tmul(a, &q);
    ops.mark("svd: products");
    let small = SmallSvd::of_f32_gram(&ops.to_rows(&ops.gram(&bt)), k)?;
    ops.mark("svd: small svd");
    Ok(finish(
        ops,
        &q,
        &bt,
        SettledFinal::of_orthonormal(small),
        rank,
    ))
}

/// `U = Y·left` and the right basis `Z·right` of the final step `f`; on a device the basis
/// scaled by [`SettledFinal::warm_scales`], so that a next warm sketch settles in one read
/// (the host's path, where reads are free, keeps its results as they were).
fn finish<D: Dense>(
    ops: &D,
    y: &D::M,
    z: &D::M,
    f: SettledFinal,
    rank: usize,
) -> (LowRank<D::M>, D::M) {
    let k = f.left.nrows();
    let basis = ops.mul(z, &from_faer(ops, f.right.as_ref(), k));
    crate::upper::clear_upper_state();
    let lr = LowRank {
        u: ops.mul(y, &from_faer(ops, f.left.as_ref(), rank)),
        s: f.s[..rank].iter().map(|&x| x as f32).collect(),
        v: ops.first_cols(&basis, rank),
    };
    let warm = match ops.reads_wait() {
        true => ops.scale_cols(&basis, &f.warm_scales().collect::<Vec<_>>()),
        false => basis,
    };
    (lr, warm)
}

/// Orthonormal basis of the columns of `y` (`[rows, k]`, `k` small) by Cholesky-QR, twice;
/// once when the first pass finds `y` well conditioned ([`GramFactor::settled`]): a read and
/// two products fewer (on the CPU, ~8% of a LoftQ run's work at SmolLM2's shapes).
/// Also whether the first pass settled.
fn orthonormalize<D: Dense>(ops: &D, mut y: D::M) -> Result<(D::M, bool), LowRankError> {
    let [_, k] = ops.dims(&y);
    let mut one_pass = true;
    for pass in 0..2 {
        match gram_inverse_factor(&ops.to_rows(&ops.gram(&y)), k)? {
            Some(f) => {
                y = ops.mul(&y, &ops.matrix(f.r_inv_f32(), [k, k]));
                if f.settled {
                    break;
                }
                one_pass &= pass > 0;
            }
            // A zero sketch (zero matrix): nothing to orthonormalise; the factors come out zero.
            None => break,
        }
    }
    ops.mark("svd: orthonormalize");
    Ok((y, one_pass))
}
