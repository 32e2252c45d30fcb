//! The loss of one batch and the gradients of every LoRA factor.
//!
//! Layer-wise gradient checkpointing: the forward pass runs without autodiff and keeps only
//! each decoder layer's input `[batch, seq, hidden]`. The backward pass then recomputes one
//! layer at a time on the autodiff device, from its saved input, and backpropagates the
//! gradient of its output through it. So at most one layer's dequantized weights and
//! activations are alive at once, whatever the depth of the model; the price is a second
//! forward pass through the decoder layers. That pass skips each layer's last product (the
//! MLP's `down_proj`), whose value only the layer's output needs and the first pass gave.

use burn::module::Param;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor};
use loftq_core::device::rows_per_buffer;
use loftq_core::profile;
use loftq_core::quant::host_f32;

use super::data::Batch;
use super::distill::{TeacherOutputs, distill_loss};
use crate::eval::{positions, row_chunks, token_ids};
use crate::nn::{Llama, QLinear};

/// The loss and the gradient of every trainable LoRA factor.
#[derive(Debug)]
pub struct StepGrads {
    /// Mean next-token negative log-likelihood over the batch (nats), or the distillation
    /// loss.
    pub loss: f64,
    /// Positions the loss averages over.
    pub tokens: usize,
    /// `[dL/dA, dL/dB]` for each adapted layer, in [`Llama::lora_params`] order.
    pub grads: Vec<Tensor<2>>,
}

/// How much of the forward pass the backward pass recomputes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Each decoder layer is recomputed from its input (see the module documentation): the
    /// memory of one layer at a time, for a second forward pass through the layers.
    #[default]
    Layers,
    /// One ordinary backward pass: every layer's activations and dequantized weights stay
    /// alive until the backward pass reaches them. Faster; memory grows with the depth.
    None,
}

/// Forward and backward pass of `batch` through `model` (see the module documentation).
///
/// # Panics
/// If `batch.seq < 2` or the ids do not fill `[batch, seq]`.
pub fn loss_and_grads(model: &Llama, batch: &Batch, recompute: Recompute) -> StepGrads {
    loss_and_grads_against(model, batch, recompute, None)
}

/// [`loss_and_grads`] with the distillation loss against `teacher`'s outputs on the same
/// batch ([`super::distill::teacher_outputs`]): every position counts.
///
/// # Panics
/// As [`loss_and_grads`], or if `teacher` was computed for another batch shape.
pub fn distill_loss_and_grads(
    model: &Llama,
    batch: &Batch,
    recompute: Recompute,
    teacher: &TeacherOutputs,
) -> StepGrads {
    assert_eq!(
        teacher.rows(),
        batch.batch * batch.seq,
        "the teacher's outputs are for another batch"
    );
    loss_and_grads_against(model, batch, recompute, Some(teacher))
}

/// What a batch's loss compares the model's outputs with: the batch's own next tokens, or a
/// teacher's outputs.
#[derive(Clone, Copy)]
enum Target<'a> {
    Tokens(&'a [u32]),
    Teacher(&'a TeacherOutputs),
}

fn loss_and_grads_against(
    model: &Llama,
    batch: &Batch,
    recompute: Recompute,
    teacher: Option<&TeacherOutputs>,
) -> StepGrads {
    let (b, s) = (batch.batch, batch.seq);
    assert!(s >= 2, "a training row needs at least two tokens");
    assert_eq!(batch.ids.len(), b * s, "ids must fill [batch, seq]");
    let device = model.embed_tokens.device();
    let ids = token_ids(&batch.ids, [b, s], &device);
    let next: Vec<u32> = (0..b)
        .flat_map(|r| batch.ids[r * s + 1..(r + 1) * s].iter().copied())
        .collect();
    let (target, tokens) = match teacher {
        Some(t) => (Target::Teacher(t), b * s),
        None => (Target::Tokens(&next), b * (s - 1)),
    };

    let rope = model.rope(s);
    profile::start(&device);
    if recompute == Recompute::None {
        return whole_graph(model, ids, target, &rope, tokens);
    }
    // Forward without autodiff, keeping each layer's input.
    let mut inputs = Vec::with_capacity(model.layers.len() + 1);
    inputs.push(model.embed(ids));
    for layer in &model.layers {
        let h = layer.forward(inputs.last().expect("pushed").clone(), &rope);
        inputs.push(h);
    }
    profile::mark(&device, "model: other");

    // Norm, head and loss on the autodiff device.
    let last = inputs.pop().expect("pushed").autodiff().require_grad();
    let (mut head, loss) = head_loss(model, last.clone(), target);
    let loss_value = loss.clone().inner();
    let grads = loss.backward();
    let mut upstream = last.grad(&grads).expect("the input of the head is tracked");
    let head_grads = head.as_mut().map(|h| lora_grads(h, &grads, &device));
    drop(grads);
    profile::mark(&device, "train: head and loss");

    // Recompute each layer from its input and push the gradient back through it.
    let mut per_layer = Vec::with_capacity(model.layers.len());
    for (i, layer) in model.layers.iter().enumerate().rev() {
        let mut layer = layer.clone();
        for lin in layer.linears_mut() {
            *lin = tracked(lin);
        }
        // The first layer's input needs no gradient (the embeddings are frozen), and an
        // untracked input lets its products skip `dx`.
        let x = match i {
            0 => inputs[i].clone().autodiff(),
            _ => inputs[i].clone().autodiff().require_grad(),
        };
        // Only the gradient through the layer is wanted (its output is `inputs[i + 1]`), and
        // `(y·upstream)`'s gradient with respect to `y` is `upstream` whatever `y` holds.
        let y = layer.forward_for_gradient(x.clone(), &rope);
        profile::mark(&device, "model: other");
        let grads = (y * upstream).sum().backward();
        profile::mark(&device, "train: backward");
        let mut g = Vec::new();
        for lin in layer.linears_mut() {
            g.extend(lora_grads(lin, &grads, &device));
        }
        per_layer.push(g);
        upstream = match i {
            0 => Tensor::zeros([1, 1, 1], &device),
            _ => x.grad(&grads).expect("the layer input is tracked"),
        };
    }
    let mut all: Vec<Tensor<2>> = per_layer.into_iter().rev().flatten().collect();
    all.extend(head_grads.into_iter().flatten());
    StepGrads {
        loss: read_loss(loss_value),
        tokens,
        grads: all,
    }
}

/// The loss on the host: read once every backward kernel is issued, so that the device is not
/// drained between the forward and the backward pass (this function's one read).
fn read_loss(loss: Tensor<1>) -> f64 {
    f64::from(host_f32(&loss)[0])
}

/// The whole model on the autodiff device, one backward pass.
fn whole_graph(
    model: &Llama,
    ids: Tensor<2, Int>,
    target: Target,
    rope: &crate::nn::RopeTables,
    tokens: usize,
) -> StepGrads {
    let device = model.embed_tokens.device();
    let mut h = model.embed(ids);
    let mut layers = Vec::with_capacity(model.layers.len());
    for layer in &model.layers {
        let mut layer = layer.clone();
        for lin in layer.linears_mut() {
            *lin = tracked(lin);
        }
        h = layer.forward(h, rope);
        layers.push(layer);
    }
    profile::mark(&device, "model: other");
    let (head, loss) = head_loss(model, h, target);
    let loss_value = loss.clone().inner();
    profile::mark(&device, "train: head and loss");
    let grads = loss.backward();
    profile::mark(&device, "train: backward");
    let mut all: Vec<Tensor<2>> = layers
        .iter()
        .flat_map(|l| l.linears())
        .flat_map(|lin| lora_grads(lin, &grads, &device))
        .collect();
    if let Some(h) = &head {
        all.extend(lora_grads(h, &grads, &device));
    }
    StepGrads {
        loss: read_loss(loss_value),
        tokens,
        grads: all,
    }
}

/// The final norm, the LM head (tracked, if the model has its own) and the loss against
/// `target` from the last layer's output `h [b, s, hidden]`: the mean next-token NLL of the
/// `b·(s-1)` target ids, or the distillation loss over all `b·s` positions.
fn head_loss(model: &Llama, h: Tensor<3>, target: Target) -> (Option<QLinear>, Tensor<1>) {
    let s = h.dims()[1];
    let head = model.lm_head.as_ref().map(tracked);
    let logits = |hidden: Tensor<3>| match &head {
        Some(h) => h.forward(hidden),
        None => model.head(hidden),
    };
    let loss = match target {
        Target::Teacher(t) => distill_loss(model.norm.forward(h), logits, t),
        Target::Tokens(targets) => {
            let hidden = model.norm.forward(h).narrow(1, 0, s - 1);
            match model.fused_head_nll(&hidden, targets) {
                Some(loss) => loss,
                None => {
                    let vocab = model.config.vocab_size;
                    let rows = rows_per_buffer(&hidden.device(), vocab);
                    token_nll(hidden, targets, logits, [vocab, rows])
                }
            }
        }
    };
    (head, loss)
}

/// The mean NLL of `targets`, one per position of `hidden [b, s, width]` (row-major), under the
/// log-softmax of `logits(hidden)` over `vocab` tokens; made `block` positions at a time, so
/// that no block's logits outgrow one device buffer (2,048 positions of a 49,152-token
/// vocabulary are 403 MB, lavapipe's buffers 128 MiB).
fn token_nll(
    hidden: Tensor<3>,
    targets: &[u32],
    logits: impl Fn(Tensor<3>) -> Tensor<3>,
    [vocab, block]: [usize; 2],
) -> Tensor<1> {
    let [b, s, _] = hidden.dims();
    let (rows, device) = (b * s, hidden.device());
    let mut nll: Vec<Tensor<2>> = row_chunks(0, rows, block)
        .map(|(start, m)| {
            let logits = logits(positions(&hidden, start, m)).reshape([m, vocab]);
            let ids = &targets[start..start + m];
            // One kernel each way on a GPU; else Burn's ops.
            loftq_core::fused::nll_rows(&logits, ids).unwrap_or_else(|| {
                let logp = log_softmax(logits, 1);
                logp.gather(1, token_ids(ids, [m, 1], &device)).neg()
            })
        })
        .collect();
    // One block: one reduction (the mean), as when there were no blocks.
    match nll.len() {
        1 => nll.pop().expect("one block").mean(),
        _ => (nll.into_iter().map(|p| p.sum()))
            .reduce(|a, b| a + b)
            .expect("at least one position")
            .div_scalar(rows as f64),
    }
}

/// A copy of `lin` whose LoRA factors are leaves of the autodiff graph.
pub(crate) fn tracked(lin: &QLinear) -> QLinear {
    let mut lin = lin.clone();
    if let Some(lora) = &mut lin.lora {
        lora.a = Param::from_tensor(lora.a.val().autodiff().require_grad());
        lora.b = Param::from_tensor(lora.b.val().autodiff().require_grad());
    }
    lin
}

/// `[dA, dB]` of a tracked layer (zeros where the factor took no part, e.g. a disabled
/// adapter), or nothing if it has no adapter.
pub(crate) fn lora_grads(
    lin: &QLinear,
    grads: &burn::tensor::Gradients,
    device: &Device,
) -> Vec<Tensor<2>> {
    let Some(lora) = &lin.lora else {
        return Vec::new();
    };
    [lora.a.val(), lora.b.val()]
        .into_iter()
        .map(|p| {
            p.grad(grads)
                .unwrap_or_else(|| Tensor::zeros(p.dims(), device))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use burn::tensor::Distribution;

    use super::super::distill::DistillLoss;
    use super::*;

    fn rnd<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
    }

    /// The loss and the gradient of the hidden states, against the same loss in one block.
    fn same_in_blocks(loss: impl Fn(Tensor<3>, usize) -> Tensor<1>, what: &str) {
        let device = Device::flex().autodiff();
        let h0 = rnd([2, 7, 5], &device);
        let run = |block| {
            let h = h0.clone().detach().require_grad();
            let y = loss(h.clone(), block);
            let g = h.grad(&y.clone().backward()).unwrap();
            (host_f32(&y.inner()), host_f32(&g.reshape([70])))
        };
        let (want, want_g) = run(14);
        for block in [1, 3, 13] {
            let (got, got_g) = run(block);
            assert!(
                (got[0] - want[0]).abs() < 1e-5,
                "{what}, blocks of {block}: loss"
            );
            let d = got_g
                .iter()
                .zip(&want_g)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(d < 1e-6, "{what}, blocks of {block}: gradient off by {d}");
        }
    }

    #[test]
    fn token_loss_in_blocks_equals_one_block() {
        let vocab = 11;
        let w = rnd([5, vocab], &Device::flex().autodiff());
        let targets: Vec<u32> = (0..14).map(|i| (i * 7 % vocab) as u32).collect();
        let logits = |h: Tensor<3>| h.matmul(w.clone().unsqueeze());
        same_in_blocks(
            |h, block| token_nll(h, &targets, logits, [vocab, block]),
            "next-token NLL",
        );
    }

    #[test]
    fn distillation_loss_follows_the_teachers_blocks() {
        let (vocab, device) = (11, Device::flex().autodiff());
        let w = rnd([5, vocab], &device);
        let t_logp = log_softmax(rnd([14, vocab], &Device::flex()).mul_scalar(2.0), 1);
        let logits = |h: Tensor<3>| h.matmul(w.clone().unsqueeze());
        same_in_blocks(
            |h, block| {
                let teacher = TeacherOutputs {
                    logp: row_chunks(0, 14, block)
                        .map(|(s, m)| t_logp.clone().narrow(0, s, m))
                        .collect(),
                    hidden: None,
                    loss: DistillLoss::default(),
                };
                assert_eq!(teacher.rows(), 14);
                distill_loss(h, logits, &teacher)
            },
            "distillation KL",
        );
    }
}
