//! The randomized SVD of `b` matrices of one shape at once, as `[b, m, n]` tensors: every
//! product is one batched op, and every small host problem (Cholesky-QR's `k×k` Gram
//! matrices, the final `k×k` eigenproblem) is read and answered for the whole batch at once,
//! so the number of reads does not grow with `b`. As [`rsvd`](super::rsvd::rsvd) on a device,
//! the final step reads `B·Bᵀ` (`k×k`, formed in `f32` on the device), not `Bᵀ` (`n×k`), or
//! with the last sketch's Gram matrix `ZᵀZ` for `Z = Aᵀ·Y` in one read ([`SettledFinal`]).
//! Unlike it, the power steps run with no read between them, and a [`Rider`] carries the
//! caller's values to be read along: LoftQ's warm iterations read once each.

use burn::tensor::Tensor;

use super::host::Gaussian;
use super::rsvd::RsvdConfig;
use super::small::{GramFactor, SettledFinal, SmallSvd, split_pairs};
use super::{LowRankError, check_rank};
use crate::transfers::upload;

/// `b` rank-`r` factorisations `U·diag(s)·Vᵀ`.
pub(crate) struct BatchLowRank {
    /// `[b, m, r]`.
    pub u: Tensor<3>,
    /// `b` lists of `r` decreasing singular values.
    pub s: Vec<Vec<f32>>,
    /// `[b, n, r]`.
    pub v: Tensor<3>,
}

/// `aᵀ·b` per batch element, as `(bᵀ·a)ᵀ` so that the large `a` stays a contiguous operand.
fn tmul(a: &Tensor<3>, b: &Tensor<3>) -> Tensor<3> {
    b.clone().swap_dims(1, 2).matmul(a.clone()).swap_dims(1, 2)
}

/// `aᵀ·a` per batch element (symmetric: no transposed view, whose read would copy it).
fn gram(a: &Tensor<3>) -> Tensor<3> {
    a.clone().swap_dims(1, 2).matmul(a.clone())
}

/// A tensor that travels with the next read from the device (one wait for it, not two), and
/// its values once read.
pub(crate) struct Rider {
    pending: Option<Tensor<1>>,
    /// The values, after the read.
    pub values: Option<Vec<f32>>,
}

impl Rider {
    /// A rider for `t`, or none.
    pub fn new(t: Option<Tensor<1>>) -> Self {
        Self {
            pending: t,
            values: None,
        }
    }

    /// The values of `t`, with the rider's if it has not travelled yet.
    fn read(&mut self, t: Tensor<3>) -> Vec<f32> {
        let Some(extra) = self.pending.take() else {
            return crate::quant::host_f32(&t);
        };
        let len = t.shape().num_elements();
        let mut values = crate::quant::host_f32(&Tensor::cat(vec![t.reshape([len]), extra], 0));
        self.values = Some(values.split_off(len));
        values
    }
}

/// The randomized SVD of each `a[i]` (`[b, m, n]`) with the sketch of seed `seeds[i]`: for
/// each, the result of [`randomized_svd`](super::randomized_svd) up to rounding (the same
/// Gaussian sketch and subspace iteration; the sketch is orthonormalised less often). Also
/// returns the warm start of a next call, `[b, n, k]`: each sketch's right basis `V_B` scaled
/// by [`SettledFinal::warm_scales`]. `rider` travels with the first read. Each Cholesky-QR pass reads its Gram matrix with `ZᵀZ`
/// (`Z = Aᵀ·Y`), so that the pass that settles every sketch is also the final step's read
/// ([`SettledFinal`]).
pub(crate) fn rsvd_batch(
    a: &Tensor<3>,
    rank: usize,
    cfg: &RsvdConfig,
    seeds: &[u64],
    warm: Option<&Tensor<3>>,
    rider: &mut Rider,
) -> Result<(BatchLowRank, Tensor<3>), LowRankError> {
    let [b, m, n] = a.dims();
    debug_assert_eq!(seeds.len(), b);
    check_rank([m, n], rank)?;
    let device = a.device();
    let (k, power_iters) = cfg.sketch([m, n], rank, warm.is_some());
    let mut sources: Vec<Gaussian> = seeds.iter().map(|&s| Gaussian::new(s)).collect();
    let mut gaussian = |cols: usize| {
        let v = sources
            .iter_mut()
            .flat_map(|g| g.values(n * cols))
            .collect();
        upload(v, [b, n, cols], &device)
    };
    let omega = match warm {
        Some(w) if w.dims()[2] >= k => w.clone().slice([0..b, 0..n, 0..k]),
        Some(w) => {
            let j = w.dims()[2];
            Tensor::cat(vec![w.clone(), gaussian(k - j)], 2)
        }
        None => gaussian(k),
    };
    crate::profile::mark(&device, "batch: svd sketch");
    let mut y = a.clone().matmul(omega);
    if power_iters > 0 {
        // Power steps `A·Aᵀ·Y` with no orthonormalisation between them (it cost two reads a
        // step): the final step's one read settles `(A·Aᵀ)^p·A·Ω` where LoftQ's residuals
        // have flat spectra (NF4). Where it does not (NF2), that read's factor is the first
        // of two Cholesky-QR passes, which hold up to `κ ≈ ε^(-1/2)`, and the second pass's
        // read is the final step's: 2 reads against 5. Each step is scaled by `1/‖A‖²` (at
        // most `1/σ₁²`), so that the sketch does not overflow.
        let scale = a.clone().powf_scalar(2.0).sum_dim(2).sum_dim(1);
        let scale = scale.clamp_min(f32::MIN_POSITIVE).recip();
        for _ in 0..power_iters {
            y = a.clone().matmul(tmul(a, &y)) * scale.clone();
        }
    }
    // `Y` at unit norm, so that `ZᵀZ` scales as `A`'s squares, as `B·Bᵀ` would.
    let norm = y.clone().powf_scalar(2.0).sum_dim(2).sum_dim(1).sqrt();
    y = y / norm.clamp_min(f32::MIN_POSITIVE);
    let mut aty = None;
    for _ in 0..3 {
        if let Some(done) = settled_final(a, &mut y, rank, rider, &mut aty)? {
            return Ok(done);
        }
    }
    // Three passes that did not settle (a sketch of lower numerical rank, whose Gram matrices
    // need a shift to factor), or Gram matrices far from unit scale: the final step apart.
    let q = y;
    crate::profile::mark(&device, "batch: svd orthonormalize");
    let bt = aty.unwrap_or_else(|| tmul(a, &q));
    crate::profile::mark(&device, "batch: svd products");
    let grams = rider.read(gram(&bt));
    let smalls = per_matrix(&grams, k * k, |g| SmallSvd::of_f32_gram(g, k));
    let finals = (smalls.into_iter())
        .map(|small| small.map(SettledFinal::of_orthonormal))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(finish(&q, bt, finals, rank))
}

/// `U = Y·left` and the right bases `Z·right` of each matrix's final step, uploaded at once;
/// also the warm start of a next call, the right bases scaled by `S⁻¹`.
fn finish(
    y: &Tensor<3>,
    z: Tensor<3>,
    finals: Vec<SettledFinal>,
    rank: usize,
) -> (BatchLowRank, Tensor<3>) {
    let ([b, _, k], n, device) = (y.dims(), z.dims()[1], y.device());
    let (mut s, mut left, mut right) = (Vec::with_capacity(b), Vec::new(), Vec::new());
    let mut whiten = Vec::with_capacity(b * k);
    for f in finals {
        for i in 0..k {
            left.extend((0..rank).map(|j| f.left[(i, j)] as f32));
            right.extend((0..k).map(|j| f.right[(i, j)] as f32));
        }
        s.push(f.s[..rank].iter().map(|&x| x as f32).collect());
        whiten.extend(f.warm_scales());
    }
    crate::upper::clear_upper_state();
    let basis = z.matmul(upload(right, [b, k, k], &device));
    let lr = BatchLowRank {
        u: y.clone().matmul(upload(left, [b, k, rank], &device)),
        s,
        v: basis.clone().slice([0..b, 0..n, 0..rank]),
    };
    let warm = basis * upload(whiten, [b, 1, k], &device);
    crate::profile::mark(&device, "batch: svd final");
    (lr, warm)
}

/// One Cholesky-QR pass and the final step in one read, as the single-matrix path
/// ([`SettledFinal`]), where every `y[i]` settles in that pass; otherwise `None`, `y` after
/// the pass and, where every `κ(y[i])² ≤` [`REUSE_KAPPA2`], `Aᵀ·y` after it in `aty` (`Z·R⁻¹`:
/// the product made for the read is not spent). `aty` in is `Aᵀ·y`, if known.
fn settled_final(
    a: &Tensor<3>,
    y: &mut Tensor<3>,
    rank: usize,
    rider: &mut Rider,
    aty: &mut Option<Tensor<3>>,
) -> Result<Option<(BatchLowRank, Tensor<3>)>, LowRankError> {
    let ([b, _, k], device) = (y.dims(), y.device());
    let z = aty.take().unwrap_or_else(|| tmul(a, y));
    crate::profile::mark(&device, "batch: svd products");
    let grams = rider.read(Tensor::cat(vec![gram(y), gram(&z)], 2));
    let fusions = per_matrix(&grams, 2 * k * k, |pair| {
        let (g, h) = split_pairs(pair, k);
        SettledFinal::of_grams(&g, &h, k)
    });
    let fusions = fusions.into_iter().collect::<Result<Vec<_>, _>>()?;
    if fusions.iter().any(|(_, done)| done.is_none()) {
        let reuse = (fusions.iter().flat_map(|(f, _)| f)).all(|f| f.kappa2 <= REUSE_KAPPA2);
        let factors = inverse_factors(fusions.into_iter().map(|(f, _)| f), k);
        let factors = upload(factors, [b, k, k], &device);
        *aty = reuse.then(|| z.matmul(factors.clone()));
        *y = y.clone().matmul(factors);
        return Ok(None);
    }
    let finals = fusions.into_iter().filter_map(|(_, done)| done).collect();
    Ok(Some(finish(y, z, finals, rank)))
}

/// The `R⁻¹` of each sketch stacked (`b·k·k` values), the identity for a zero sketch (left as
/// it is, as the single-matrix path does).
fn inverse_factors(factors: impl Iterator<Item = Option<GramFactor>>, k: usize) -> Vec<f32> {
    let identity = |i: usize| f32::from(u8::from(i.is_multiple_of(k + 1)));
    factors
        .flat_map(|f| match f {
            Some(f) => f.r_inv_f32(),
            None => (0..k * k).map(identity).collect(),
        })
        .collect()
}

/// The largest `κ(Y)²` for which the final step takes `Aᵀ·Q` as `(Aᵀ·Y)·R⁻¹`: that product's
/// rounding grows by `κ(Y)`, at most 100 (`10⁻⁵` relative in `f32`).
const REUSE_KAPPA2: f64 = 1e4;

/// `f` of each `len`-long chunk of `values`, in order, the chunks spread over the machine's
/// cores. Each is a small dense problem on the host (a `k×k` factorization); one after the
/// other, a batch of 16 of them at `k = 128` kept one core busy ~300 ms per LoftQ run of a
/// group while the GPU waited (`bench/results/h200`).
fn per_matrix<T: Send>(values: &[f32], len: usize, f: impl Fn(&[f32]) -> T + Sync) -> Vec<T> {
    let chunks: Vec<&[f32]> = values.chunks_exact(len).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if chunks.len() < 2 || threads < 2 {
        return chunks.into_iter().map(f).collect();
    }
    let per = chunks.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let parts: Vec<_> = chunks
            .chunks(per)
            .map(|part| {
                scope.spawn(move || {
                    let out: Vec<T> = part.iter().map(|c| f(c)).collect();
                    // faer's kernels leave the vector registers' upper halves dirty.
                    crate::upper::clear_upper_state_here();
                    out
                })
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use burn::tensor::TensorData;

    use super::*;
    use crate::transfers::transfers;

    /// A warm start scaled by `S⁻¹` makes the next sketch of the same matrix orthonormal up to
    /// rounding: one read (the settled pass, shared with the final step). Of `V_B` alone the
    /// sketch `A·V_B` has `κ = σ₁/σ_k = 0.8⁻²³ ≈ 170`, which one Cholesky-QR pass does not
    /// settle: two reads. The cold sketch (no power iteration, the same `κ`) takes two: its
    /// second pass's read is the final step's.
    #[test]
    fn a_scaled_warm_start_settles_in_one_read() {
        let (m, n, rank) = (48, 40, 8);
        let device = crate::DeviceSpec::from_env().device().expect("device");
        let mut diag = vec![0.0f32; m * n];
        for i in 0..n {
            diag[i * n + i] = 0.8f32.powi(i as i32);
        }
        let a = Tensor::<3>::from_data(TensorData::new(diag, [1, m, n]), &device);
        let cfg = RsvdConfig {
            power_iters: 0,
            ..RsvdConfig::DEFAULT
        };
        let before = transfers();
        let cold = rsvd_batch(&a, rank, &cfg, &[1], None, &mut Rider::new(None));
        let (_, warm) = cold.unwrap();
        assert_eq!((transfers() - before).reads, 2, "reads of the cold run");
        let before = transfers();
        let (lr, _) = rsvd_batch(&a, rank, &cfg, &[2], Some(&warm), &mut Rider::new(None)).unwrap();
        assert_eq!((transfers() - before).reads, 1, "reads of the warm run");
        for (i, s) in lr.s[0].iter().enumerate() {
            let want = 0.8f32.powi(i as i32);
            assert!((s - want).abs() <= 1e-4, "σ{i} = {s}, want {want}");
        }
    }
}
