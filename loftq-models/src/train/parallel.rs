//! Data parallelism: the micro-batches of a step spread over one model replica per device.
//!
//! Each replica runs in its own thread on its own device, takes every `D`-th micro-batch and
//! sums its gradients there; the sums come back to the first device and are added there. So a
//! step gives what gradient accumulation on one device gives, up to the order of the sums.
//! This is the scheme of burn-train's multi-device strategy (`MultiDevicesTrainStep`: a worker
//! per device, the gradients moved to the main device and accumulated). Burn 0.22's collective
//! operations (all-reduce) exist only on its CUDA back end; 0.23 has them on every back end,
//! and the branch `burn-0.23-collectives` moves this module onto them.

use burn::tensor::Tensor;

use super::data::Batch;
use super::distill::{DistillLoss, teacher_outputs};
use super::step::{Recompute, distill_loss_and_grads, loss_and_grads};
use crate::nn::Llama;

/// The teachers of a distillation step: one per model replica, on that replica's device.
#[derive(Clone, Copy, Debug)]
pub struct Teachers<'a> {
    /// The teacher models, in the replicas' order.
    pub models: &'a [Llama],
    /// The loss.
    pub loss: DistillLoss,
}

/// The loss and gradients of a step: the sums over its micro-batches.
#[derive(Debug)]
pub struct Sums {
    /// Sum of the micro-batches' mean losses.
    pub loss: f64,
    /// Sum of their gradients, in [`Llama::lora_params`] order, on the main replica's device.
    pub grads: Vec<Tensor<2>>,
}

/// Runs each `(batch, dropout seed)` on `models` (the first is the main replica; the others
/// receive its LoRA factors first) and sums the losses and gradients: next-token losses, or,
/// with `teachers`, distillation losses against each replica's teacher. With one model the
/// micro-batches run in order and are summed in that order.
///
/// # Panics
/// If there are fewer batches than models, or none, or `teachers` has not one model per
/// replica.
pub fn micro_batches(
    models: &mut [Llama],
    batches: &[(Batch, u64)],
    recompute: Recompute,
    teachers: Option<Teachers>,
) -> Sums {
    let devices = models.len();
    assert!(
        batches.len() >= devices,
        "one micro-batch per device at least"
    );
    if let Some(t) = &teachers {
        assert_eq!(t.models.len(), devices, "one teacher per replica");
    }
    let teacher = |i: usize| teachers.map(|t| (&t.models[i], t.loss));
    let (main, replicas) = models.split_first_mut().expect("at least one model");
    if replicas.is_empty() {
        return run_share(main, teacher(0), batches, 0, 1, recompute);
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
    std::thread::scope(|s| {
        let workers: Vec<_> = replicas
            .iter_mut()
            .enumerate()
            .map(|(i, r)| {
                let t = teacher(i + 1);
                s.spawn(move || run_share(r, t, batches, i + 1, devices, recompute))
            })
            .collect();
        let mut total = run_share(main, teacher(0), batches, 0, devices, recompute);
        for w in workers {
            let share = w
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            total.loss += share.loss;
            total.grads = total
                .grads
                .into_iter()
                .zip(share.grads)
                .map(|(a, b)| a + b.to_device(&main_device))
                .collect();
        }
        total
    })
}

/// Micro-batches `first, first + step, ...` of `batches` on `model`, summed.
fn run_share(
    model: &mut Llama,
    teacher: Option<(&Llama, DistillLoss)>,
    batches: &[(Batch, u64)],
    first: usize,
    step: usize,
    recompute: Recompute,
) -> Sums {
    let mut sums: Option<Sums> = None;
    for (batch, seed) in batches.iter().skip(first).step_by(step) {
        model.set_dropout_seed(Some(*seed));
        let g = match teacher {
            // The teacher's outputs live only for this micro-batch.
            Some((t, loss)) => {
                let outputs = teacher_outputs(t, batch, loss);
                distill_loss_and_grads(model, batch, recompute, &outputs)
            }
            None => loss_and_grads(model, batch, recompute),
        };
        sums = Some(match sums {
            None => Sums {
                loss: g.loss,
                grads: g.grads,
            },
            Some(s) => Sums {
                loss: s.loss + g.loss,
                grads: s
                    .grads
                    .into_iter()
                    .zip(g.grads)
                    .map(|(a, b)| a + b)
                    .collect(),
            },
        });
    }
    model.set_dropout_seed(None);
    sums.expect("one micro-batch per device at least")
}
