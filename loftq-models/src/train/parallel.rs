//! Data parallelism: the micro-batches of a step spread over one model replica per device.
//!
//! Each replica runs in its own thread on its own device and takes every `D`-th micro-batch.
//! The gradients come back to the first device and are summed there in micro-batch order,
//! so a step gives what gradient accumulation on one device gives. This is the scheme of
//! burn-train's multi-device strategy (`MultiDevicesTrainStep`: a worker per device, the
//! gradients moved to the main device and accumulated). Burn 0.22's collective operations
//! (all-reduce) exist only on its CUDA back end.

use burn::tensor::Tensor;

use super::step::{Batch, Recompute, StepGrads, loss_and_grads};
use crate::nn::Llama;

/// Runs each `(batch, dropout seed)` on `models` (the first is the main replica; the others
/// receive its LoRA factors first) and returns their losses and gradients in the order of
/// `batches`, the gradients on the main replica's device.
pub(crate) fn micro_batches(
    models: &mut [Llama],
    batches: &[(Batch, u64)],
    recompute: Recompute,
) -> Vec<StepGrads> {
    let devices = models.len();
    let (main, replicas) = models.split_first_mut().expect("at least one model");
    if replicas.is_empty() {
        return run_share(main, batches, 0, 1, recompute);
    }
    let main_device = main.embed_tokens.device();
    let params = main.lora_params();
    for r in replicas.iter_mut() {
        let device = r.embed_tokens.device();
        r.set_lora_params(
            params
                .iter()
                .map(|p| p.clone().to_device(&device))
                .collect(),
        );
    }
    let mut shares = std::thread::scope(|s| {
        let workers: Vec<_> = replicas
            .iter_mut()
            .enumerate()
            .map(|(i, r)| s.spawn(move || run_share(r, batches, i + 1, devices, recompute)))
            .collect();
        let mut shares = vec![run_share(main, batches, 0, devices, recompute)];
        for w in workers {
            match w.join() {
                Ok(share) => shares.push(share),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        shares
    });
    // Back into micro-batch order: share `d` holds batches d, d + D, d + 2D, ...
    let mut out = Vec::with_capacity(batches.len());
    let mut iters: Vec<_> = shares.iter_mut().map(|s| s.drain(..)).collect();
    for m in 0..batches.len() {
        let mut g = iters[m % devices]
            .next()
            .expect("one result per micro-batch");
        g.grads = g
            .grads
            .into_iter()
            .map(|t: Tensor<2>| t.to_device(&main_device))
            .collect();
        out.push(g);
    }
    out
}

/// Micro-batches `first, first + step, ...` of `batches` on `model`.
fn run_share(
    model: &mut Llama,
    batches: &[(Batch, u64)],
    first: usize,
    step: usize,
    recompute: Recompute,
) -> Vec<StepGrads> {
    let out = batches
        .iter()
        .skip(first)
        .step_by(step)
        .map(|(batch, seed)| {
            model.set_dropout_seed(Some(*seed));
            loss_and_grads(model, batch, recompute)
        })
        .collect();
    model.set_dropout_seed(None);
    out
}
