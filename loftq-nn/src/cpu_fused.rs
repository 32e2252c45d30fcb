//! The kernels of [`super::cpu_kernels`] as Burn operations on the CPU back end: plain flex
//! tensors get the forward pass; on the autodiff device each kernel is one recorded operation
//! whose backward pass is the matching host kernel. Each function returns `None` when its
//! inputs live on another back end, and the caller falls back to Burn's generic ops.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Tensor, TensorData};
use faer::MatRef;
use loftq_core::cpu::{Host, flex, flex_autodiff};
use loftq_core::quant::is_host_device;

use super::cpu_attention::{self as attn, AttnShape, Rope};
use super::cpu_kernels as k;

/// Turns the gradient of an operation's output into the gradients of its `N` inputs.
pub(crate) type BackwardFn<const N: usize> = Arc<dyn Fn(&[f32]) -> [Vec<f32>; N] + Send + Sync>;

#[derive(Clone)]
struct State<const N: usize> {
    backward: BackwardFn<N>,
    shapes: [Vec<usize>; N],
}

impl<const N: usize> std::fmt::Debug for State<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("shapes", &self.shapes)
            .finish()
    }
}

#[derive(Debug)]
struct HostBackward<const N: usize>;

impl<const N: usize> Backward<Flex, N> for HostBackward<N> {
    type State = State<N>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = Host::rows(grads.consume::<Flex>(&ops.node));
        let out = (ops.state.backward)(g.slice());
        for ((parent, v), shape) in ops.parents.iter().zip(out).zip(&ops.state.shapes) {
            if let Some(node) = parent {
                let t = FlexTensor::from_data(TensorData::new(v, shape.clone()));
                grads.register::<Flex>(node.id, t);
            }
        }
    }
}

/// What a host operation computes: its output, and (only when asked for) its backward pass.
type Computed<const N: usize> = (Vec<f32>, Option<BackwardFn<N>>);

/// Which of an operation's inputs need a gradient: `None` when none does (no backward pass).
/// The backward pass may leave the others' gradients empty.
pub(crate) type Wanted<const N: usize> = Option<[bool; N]>;

/// Runs `op` on the host values of `inputs` (all on flex, or all on the flex autodiff
/// device, where constants are lifted). `op` returns a backward pass when its [`Wanted`] is
/// set.
pub(crate) fn run<const N: usize, const DI: usize, const DO: usize>(
    inputs: [&Tensor<DI>; N],
    out_shape: [usize; DO],
    op: impl FnOnce([Host; N], Wanted<N>) -> Computed<N>,
) -> Option<Tensor<DO>> {
    let out = |v: Vec<f32>| FlexTensor::from_data(TensorData::new(v, out_shape));
    let plain: Option<Vec<FlexTensor>> = inputs.iter().map(|t| flex(t)).collect();
    if let Some(plain) = plain {
        let hosts = plain.into_iter().map(Host::rows).collect::<Vec<_>>();
        let (y, _) = op(hosts.try_into().expect("N inputs"), None);
        return Some(Tensor::from_primitive::<Flex>(out(y)));
    }
    if !is_host_device(&inputs[0].device().without_autodiff()) {
        return None;
    }
    let mut ads = Vec::with_capacity(N);
    for t in inputs {
        ads.push(flex_autodiff(&t.clone().autodiff())?);
    }
    let nodes: [_; N] = std::array::from_fn(|i| ads[i].node());
    let shapes: [Vec<usize>; N] = inputs.map(|t| t.dims().to_vec());
    let wanted: [bool; N] = std::array::from_fn(|i| ads[i].is_tracked());
    let hosts: [Host; N] = std::array::from_fn(|i| Host::rows(ads[i].primitive().clone()));
    let tensor = match HostBackward::<N>
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (y, backward) = op(hosts, Some(wanted));
            let backward = backward.expect("asked for the backward pass");
            prep.finish(State { backward, shapes }, out(y))
        }
        OpsKind::UnTracked(prep) => prep.finish(out(op(hosts, None).0)),
    };
    Some(Tensor::from_primitive::<Autodiff<Flex>>(tensor))
}

/// RMSNorm over the last dimension with a frozen `weight`.
pub(crate) fn rms_norm<const D: usize>(
    x: &Tensor<D>,
    weight: &Tensor<1>,
    eps: f64,
) -> Option<Tensor<D>> {
    let w = Host::of(weight)?;
    let eps = eps as f32;
    run([x], x.dims(), move |[x], wanted| {
        let y = k::rms_norm(x.slice(), w.slice(), eps);
        let back = wanted.map(|_| {
            Arc::new(move |dy: &[f32]| [k::rms_norm_backward(x.slice(), w.slice(), eps, dy)])
                as BackwardFn<1>
        });
        (y, back)
    })
}

/// `silu(gate)·up`.
pub(crate) fn silu_mul<const D: usize>(gate: &Tensor<D>, up: &Tensor<D>) -> Option<Tensor<D>> {
    run([gate, up], gate.dims(), |[g, u], wanted| {
        let y = k::silu_mul(g.slice(), u.slice());
        let back = wanted.map(|_| {
            Arc::new(move |dy: &[f32]| {
                let (dg, du) = k::silu_mul_backward(g.slice(), u.slice(), dy);
                [dg, du]
            }) as BackwardFn<2>
        });
        (y, back)
    })
}

/// Causal grouped-query attention of projected `q [b, s, heads·d]`, `k`, `v`
/// `[b, s, kv_heads·d]` with rotary tables `cos`, `sin` `[s, r]` turning each head's first `r`
/// dimensions: `[b, s, heads·d]`.
pub(crate) fn attention(
    [q, kk, v]: [&Tensor<3>; 3],
    [cos, sin]: [&Tensor<2>; 2],
    [heads, kv_heads]: [usize; 2],
) -> Option<Tensor<3>> {
    let dim = cos.dims()[1];
    let (cos, sin) = (Host::of(cos)?, Host::of(sin)?);
    let [batch, seq, width] = q.dims();
    let sh = AttnShape {
        batch,
        seq,
        heads,
        kv_heads,
        head_dim: width / heads,
    };
    run(
        [q, kk, v],
        [batch, seq, width],
        move |[q, kk, v], wanted| {
            let rope = Rope {
                cos: cos.slice(),
                sin: sin.slice(),
                dim,
            };
            let y = attn::attention(q.slice(), kk.slice(), v.slice(), rope, sh);
            let back = wanted.map(|_| {
                Arc::new(move |dy: &[f32]| {
                    let rope = Rope {
                        cos: cos.slice(),
                        sin: sin.slice(),
                        dim,
                    };
                    attn::attention_backward([q.slice(), kk.slice(), v.slice()], rope, sh, dy)
                }) as BackwardFn<3>
            });
            (y, back)
        },
    )
}

/// The mean next-token NLL of `targets` under `softmax(h·Eᵀ)`, for `h [b, s, hidden]` and the
/// frozen head `e [vocab, hidden]`: a one-element tensor. The logits are never materialized;
/// on the autodiff device the gradient of `h` is formed in the same pass and kept until the
/// backward pass scales it.
pub(crate) fn head_nll(h: &Tensor<3>, e: &Host, targets: &[u32]) -> Option<Tensor<1>> {
    let hidden = h.dims()[2];
    run([h], [1], |[h], wanted| {
        let e = MatRef::from_row_major_slice(e.slice(), e.slice().len() / hidden, hidden);
        let (loss, dh) = k::cross_entropy(h.slice(), e, targets, wanted.is_some());
        let back = dh.map(|dh| {
            Arc::new(move |g: &[f32]| [dh.iter().map(|v| v * g[0]).collect()]) as BackwardFn<1>
        });
        (vec![loss as f32], back)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use burn::tensor::activation::{log_softmax, silu};
    use burn::tensor::{Device, Distribution, Int};

    use super::*;
    use crate::Norm;
    use crate::RopeTables;
    use crate::attention::attend_generic;
    use loftq_formats::config::{RopeConfig, RopeScaling};

    pub(crate) fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    /// Max-norm closeness, relative to the largest wanted value.
    pub(crate) fn close(got: Vec<f32>, want: Vec<f32>, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            d <= 2e-5 * scale.max(1e-3),
            "{what}: max |Δ| {d}, scale {scale}"
        );
    }

    fn ad() -> Device {
        Device::flex().autodiff()
    }

    fn rnd<const D: usize>(shape: [usize; D], dev: &Device) -> Tensor<D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), dev)
    }

    /// Values of `fused` and `generic` and the gradients of every input of a weighted sum
    /// of the output, for the same inputs: plain flex for the values, the autodiff device for
    /// the gradients.
    fn same<const N: usize, const D: usize>(
        inputs: [Tensor<D>; N],
        fused: impl Fn([Tensor<D>; N]) -> Option<Tensor<D>>,
        generic: impl Fn([Tensor<D>; N]) -> Tensor<D>,
        what: &str,
    ) {
        let plain = inputs.clone().map(|t| t.inner());
        let y = fused(plain.clone()).expect("flex inputs take the host kernel");
        close(host(y), host(generic(plain)), what);

        let leaves = || inputs.clone().map(|t| t.detach().require_grad());
        let run = |y: Tensor<D>| {
            let w = Tensor::<D>::random(y.dims(), Distribution::Normal(0.0, 1.0), &ad());
            (y, w)
        };
        let got_in = leaves();
        let (y, w) = run(fused(got_in.clone()).expect("autodiff flex inputs too"));
        let grads = (y * w.clone()).sum().backward();
        let got: Vec<_> = got_in
            .iter()
            .map(|t| host(t.grad(&grads).unwrap()))
            .collect();
        let want_in = leaves();
        let grads = (generic(want_in.clone()) * w).sum().backward();
        for (i, (g, t)) in got.into_iter().zip(&want_in).enumerate() {
            close(
                g,
                host(t.grad(&grads).unwrap()),
                &format!("{what}: d input {i}"),
            );
        }
    }

    #[test]
    fn rms_norm_matches_burn() {
        let dev = ad();
        let norm = Norm::rms(rnd([24], &Device::flex()), 1e-5);
        same(
            [rnd([3, 5, 24], &dev)],
            |[x]| rms_norm(&x, &norm.weight, norm.eps),
            |[x]| norm.forward_generic(x),
            "rms_norm",
        );
    }

    #[test]
    fn silu_mul_matches_burn() {
        let dev = ad();
        // Wide enough for several rayon chunks and large gates on both sides.
        let x = rnd([2, 9, 5000], &dev).mul_scalar(6.0);
        same(
            [x, rnd([2, 9, 5000], &dev)],
            |[g, u]| silu_mul(&g, &u),
            |[g, u]| silu(g) * u,
            "silu_mul",
        );
    }

    /// One block of positions, and several (the last one partial) of the causal products;
    /// rotary embeddings on whole heads and (Phi) on half of each.
    #[test]
    fn attention_matches_burn_with_grouped_heads_and_rope() {
        let dev = ad();
        let (b, h, kvh, d) = (2, 6, 2, 8);
        for (s, rd) in [(11, d), (70, d), (23, d / 2)] {
            let rope_cfg = RopeConfig {
                theta: 10_000.0,
                scaling: RopeScaling::None,
            };
            let rope = RopeTables::new(&rope_cfg, rd, s, &Device::flex());
            same(
                [
                    rnd([b, s, h * d], &dev),
                    rnd([b, s, kvh * d], &dev),
                    rnd([b, s, kvh * d], &dev),
                ],
                |[q, k, v]| attention([&q, &k, &v], [&rope.cos, &rope.sin], [h, kvh]),
                |[q, k, v]| attend_generic([q, k, v], &rope, [h, kvh], None),
                &format!("attention, {s} positions, {rd} rotary dimensions"),
            );
        }
    }

    /// The fused loss and its gradient against log-softmax and gather.
    #[test]
    fn head_nll_matches_burn() {
        let dev = ad();
        let (b, s, hidden, vocab) = (3, 50, 16, 301);
        let e = rnd([vocab, hidden], &Device::flex());
        let targets: Vec<u32> = (0..b * s).map(|i| (i * 37 % vocab) as u32).collect();
        let hm = Host::of_plain(&e).unwrap();
        let generic = |h: Tensor<3>| {
            let ids = Tensor::<2, Int>::from_data(
                TensorData::new(targets.iter().map(|&t| t as i64).collect(), [b * s, 1]),
                &h.device(),
            );
            let logits = h.reshape([b * s, hidden]).matmul(e.clone().transpose());
            log_softmax(logits, 1).gather(1, ids).mean().neg()
        };
        let h0 = rnd([b, s, hidden], &dev).mul_scalar(3.0);
        let y = head_nll(&h0.clone().inner(), &hm, &targets).unwrap();
        close(host(y), host(generic(h0.clone().inner())), "loss");

        let h = h0.clone().detach().require_grad();
        let grads = head_nll(&h, &hm, &targets)
            .unwrap()
            .mul_scalar(2.5)
            .backward();
        let got = host(h.grad(&grads).unwrap());
        let h2 = h0.detach().require_grad();
        let grads = generic(h2.clone()).mul_scalar(2.5).backward();
        close(got, host(h2.grad(&grads).unwrap()), "dL/dh");
    }

    /// Logits made in many row and column blocks give the loss and gradient of one block.
    #[test]
    fn cross_entropy_blocks_agree() {
        let (n, hidden, vocab) = (150, 16, 301);
        let rnd = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i + seed) * 2_654_435_761) % 1000) as f32 / 250.0 - 2.0)
                .collect()
        };
        let (h, e) = (rnd(n * hidden, 1), rnd(vocab * hidden, 2));
        let e = MatRef::from_row_major_slice(&e, vocab, hidden);
        let targets: Vec<u32> = (0..n).map(|i| (i * 37 % vocab) as u32).collect();
        let (want, want_dh) = k::cross_entropy_in(&h, e, &targets, true, [n, vocab]);
        let (got, got_dh) = k::cross_entropy_in(&h, e, &targets, true, [7, 64]);
        assert!((got - want).abs() <= 1e-6 * want.abs(), "{got} vs {want}");
        close(got_dh.unwrap(), want_dh.unwrap(), "dL/dh");
    }

    #[test]
    fn fast_exp_is_close_to_std() {
        let mut worst = 0f32;
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let (got, want) = (k::exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 5e-7, "relative error {worst}");
        // Results below the smallest normal `f32` are zeros, never subnormal.
        assert!(k::exp(-87.0).is_normal());
        assert_eq!(k::exp(-87.01), 0.0);
        assert_eq!(k::exp(f32::MIN), 0.0);
    }
}
