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
use super::small::{GramFactor, SettledFinal, SmallSvd, gram_inverse_factor, split_pairs};
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
/// Gaussian sketch and subspace iteration; the sketch is orthonormalised less often). Also returns the sketches' right bases `[b, n, k]`, the warm
/// start of a next call. `rider` travels with the first read. With `fuse` the final step
/// shares the last orthonormalisation's read where every sketch allows it ([`SettledFinal`]);
/// where one does not (with no power iteration), `fuse` turns false, so that a next call on
/// similar matrices does not spend a product on trying again.
pub(crate) fn rsvd_batch(
    a: &Tensor<3>,
    rank: usize,
    cfg: &RsvdConfig,
    seeds: &[u64],
    warm: Option<&Tensor<3>>,
    rider: &mut Rider,
    fuse: &mut bool,
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
        // of two Cholesky-QR passes, which hold up to `κ ≈ ε^(-1/2)`, and the product `Aᵀ·Y`
        // it read with serves the final step: 3 reads against 5. Each step is scaled by
        // `1/‖A‖²` (at most `1/σ₁²`), so that the sketch does not overflow.
        let scale = a.clone().powf_scalar(2.0).sum_dim(2).sum_dim(1);
        let scale = scale.clamp_min(f32::MIN_POSITIVE).recip();
        for _ in 0..power_iters {
            y = a.clone().matmul(tmul(a, &y)) * scale.clone();
        }
    }
    let mut aty = None;
    if *fuse {
        // `Y` at unit norm, so that `ZᵀZ` scales as `A`'s squares, as `B·Bᵀ` would.
        let norm = y.clone().powf_scalar(2.0).sum_dim(2).sum_dim(1).sqrt();
        y = y / norm.clamp_min(f32::MIN_POSITIVE);
        match settled_final(a, &mut y, rank, rider, &mut aty)? {
            Some(done) => return Ok(done),
            // Power iterations steepen the spectrum: that failure says nothing of a warm start.
            None => *fuse = power_iters > 0,
        }
    }
    let (q, aty) = orthonormalize(y, rider, aty)?;
    let bt = aty.unwrap_or_else(|| tmul(a, &q));
    crate::profile::mark(&device, "batch: svd products");
    let grams = rider.read(gram(&bt));
    let smalls = per_matrix(&grams, k * k, |g| SmallSvd::of_f32_gram(g, k));
    let finals = (smalls.into_iter())
        .map(|small| small.map(SettledFinal::of_orthonormal))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(finish(&q, bt, finals, rank))
}

/// `U = Y·left` and the right bases `Z·right` of each matrix's final step, uploaded at once.
fn finish(
    y: &Tensor<3>,
    z: Tensor<3>,
    finals: Vec<SettledFinal>,
    rank: usize,
) -> (BatchLowRank, Tensor<3>) {
    let ([b, _, k], n, device) = (y.dims(), z.dims()[1], y.device());
    let (mut s, mut left, mut right) = (Vec::with_capacity(b), Vec::new(), Vec::new());
    for f in finals {
        for i in 0..k {
            left.extend((0..rank).map(|j| f.left[(i, j)] as f32));
            right.extend((0..k).map(|j| f.right[(i, j)] as f32));
        }
        s.push(f.s[..rank].iter().map(|&x| x as f32).collect());
    }
    crate::upper::clear_upper_state();
    let basis = z.matmul(upload(right, [b, k, k], &device));
    let lr = BatchLowRank {
        u: y.clone().matmul(upload(left, [b, k, rank], &device)),
        s,
        v: basis.clone().slice([0..b, 0..n, 0..rank]),
    };
    crate::profile::mark(&device, "batch: svd final");
    (lr, basis)
}

/// The last orthonormalisation and the final step in one read, as the single-matrix path
/// ([`SettledFinal`]), where every `y[i]` settles in one Cholesky-QR pass; otherwise `None`,
/// `y` after that pass and, where every `κ(y[i])² ≤` [`REUSE_KAPPA2`], `Aᵀ·y` after it in
/// `aty` (`Z·R⁻¹`: the product made for the read is not spent).
fn settled_final(
    a: &Tensor<3>,
    y: &mut Tensor<3>,
    rank: usize,
    rider: &mut Rider,
    aty: &mut Option<Tensor<3>>,
) -> Result<Option<(BatchLowRank, Tensor<3>)>, LowRankError> {
    let ([b, _, k], device) = (y.dims(), y.device());
    let z = tmul(a, y);
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

/// Orthonormal bases of the columns of each `y[i]` (`[b, rows, k]`) by Cholesky-QR, twice:
/// one read of the `b` Gram matrices per pass. Once when the first pass finds every `y[i]`
/// well conditioned (as the single-matrix path). `with` gets the same factors (`Aᵀ·Y` becomes
/// `Aᵀ·Q`).
fn orthonormalize(
    mut y: Tensor<3>,
    rider: &mut Rider,
    mut with: Option<Tensor<3>>,
) -> Result<(Tensor<3>, Option<Tensor<3>>), LowRankError> {
    crate::profile::mark(&y.device(), "batch: svd products");
    let [b, _, k] = y.dims();
    for _ in 0..2 {
        let grams = rider.read(gram(&y));
        let found = per_matrix(&grams, k * k, |g| gram_inverse_factor(g, k));
        let found = found.into_iter().collect::<Result<Vec<_>, _>>()?;
        let settled = found.iter().flatten().all(|f| f.settled);
        let factors = upload(
            inverse_factors(found.into_iter(), k),
            [b, k, k],
            &y.device(),
        );
        with = with.map(|t| t.matmul(factors.clone()));
        y = y.matmul(factors);
        if settled {
            break;
        }
    }
    crate::profile::mark(&y.device(), "batch: svd orthonormalize");
    Ok((y, with))
}

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
