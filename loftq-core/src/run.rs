//! Where a LoftQ run goes: one matrix or a stack, on the host's path or as device ops.

use burn::tensor::Tensor;

use crate::batch::{alternate_batch, stackable};
use crate::loftq::checked_alternation;
use crate::quant::{Kernel, is_host_device};
use crate::{LoftqConfig, LoftqError, LoftqResult};

/// LoftQ initialization of one weight `w` `[out, in]`.
///
/// # Algorithm
/// With `res = W`, for `t = 1..=T`: `Q_t = dequant(quant(res))`; `(U, S, V)` = rank-`r` SVD of
/// `W − Q_t` (warm-started from the previous `V` when randomized); `B = U·√S`, `A = √S·Vᵀ`;
/// `res = W − B·A`. The iterate with the lowest `‖W − Q − s·B·A‖` is returned (the alternation
/// is not monotone). With [`InitScaling::Exact`](crate::InitScaling::Exact) both factors are
/// divided by `√s`.
///
/// # Shapes
/// `w: [out, in]` → `lora_a: [r, in]`, `lora_b: [out, r]`, `q: [out, in]`.
///
/// # Numerical behaviour
/// `T = 1` with the exact SVD reproduces PEFT's `loftq_init` (same `Q` bit for bit). On a
/// device with the randomized SVD it runs as a batch of one ([`loftq_batch`]): the same
/// steps, each warm iteration one read of the device.
pub fn loftq(w: &Tensor<2>, cfg: &LoftqConfig) -> Result<LoftqResult, LoftqError> {
    if let Some(done) = alone_on_device(w, cfg) {
        return Ok(done);
    }
    Ok(checked_alternation(w, cfg, None)?.0)
}

/// [`loftq`] of each `ws[i]` with `cfgs[i]`, the matrices batched on a device (see
/// [`loftq_batch_with`] with [`Kernel::Auto`]).
pub fn loftq_batch(ws: &[Tensor<2>], cfgs: &[LoftqConfig]) -> Vec<Result<LoftqResult, LoftqError>> {
    loftq_batch_with(ws, cfgs, Kernel::Auto)
}

/// [`loftq`] of each `ws[i]` with `cfgs[i]`, one result per matrix in order.
///
/// The matrices run as one batched problem when they share a shape and a device, their
/// configurations differ only in the randomized SVD's seed, and the quantizer's blocks do not
/// straddle matrices; otherwise, and after any error (so that it names its matrix), each runs
/// on its own. `kernel` chooses: [`Kernel::Auto`] batches on devices whose memory is not the
/// host's (on the CPU the host path, one matrix at a time, is faster), [`Kernel::Portable`]
/// batches on any device, [`Kernel::Host`] never stacks matrices (each still runs as
/// [`loftq`] does).
///
/// # Numerical behaviour
/// Each matrix gets the sketch, the steps and the best-iterate choice of [`loftq`] on the same
/// device; the randomized SVD's last step differs in rounding only (see
/// `lowrank::batch`), so errors agree to a fraction of a percent, not bit for bit.
///
/// # Panics
/// If `ws` and `cfgs` differ in length.
pub fn loftq_batch_with(
    ws: &[Tensor<2>],
    cfgs: &[LoftqConfig],
    kernel: Kernel,
) -> Vec<Result<LoftqResult, LoftqError>> {
    assert_eq!(ws.len(), cfgs.len(), "one configuration per matrix");
    let one_by_one = || ws.iter().zip(cfgs).map(|(w, c)| loftq(w, c)).collect();
    let Some(first) = ws.first() else {
        return Vec::new();
    };
    let wanted = match kernel {
        Kernel::Host => false,
        Kernel::Portable => true,
        Kernel::Auto => !is_host_device(&first.device()),
    };
    if !(wanted && stackable(ws, cfgs)) {
        return one_by_one();
    }
    match alternate_batch(ws, cfgs) {
        Ok(Some(results)) => results.into_iter().map(Ok).collect(),
        _ => one_by_one(),
    }
}

/// [`loftq`] of one matrix on a device, as a batch of one where it stacks: the batched path
/// reads each iteration's errors with the next iteration's first read, one read per warm
/// iteration where the one-matrix path takes two. `None` where it does not apply, and after
/// any error (the one-matrix path then names it).
pub(crate) fn alone_on_device(w: &Tensor<2>, cfg: &LoftqConfig) -> Option<LoftqResult> {
    let (ws, cfgs) = (std::slice::from_ref(w), std::slice::from_ref(cfg));
    if is_host_device(&w.device()) || !stackable(ws, cfgs) {
        return None;
    }
    alternate_batch(ws, cfgs).ok().flatten()?.pop()
}
