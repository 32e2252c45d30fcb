//! The GPU's grouped LoRA layers and the kernels that read their outputs where they sit
//! (`loftq_core::fused`): each against the same work done one layer, or one part, at a time,
//! values and gradients; and the loss's negative log-likelihood against Burn's ops. On the
//! CPU they do not apply.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Distribution, Tensor};
use burn::tensor::{Int, TensorData};
use loftq_core::DeviceSpec;
use loftq_core::fused::{
    AdapterProduct, causal_attention, causal_attention_packed, lora_linear_codebook,
    lora_linear_codebook_group, nll_rows, silu_mul, silu_mul_packed,
};
use loftq_core::quant::{PackedTensor, QuantConfig};
use loftq_core::{Quantizer, lowrank::Gaussian};
use loftq_models::nn::PackedWeight;

use super::common::device;
use super::fused::close;
use super::host;

fn normal<const D: usize>(shape: [usize; D]) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device())
}

/// Two and three layers of one input (outputs of different widths, a LoRA scale of 1 and
/// others): the stacked output equals each layer's merged output side by side, and the
/// gradients of the input and of every factor equal theirs. At rank 4 the factors' gradients
/// come from the stacked factors, at rank 16 layer by layer (too many extra multiply-adds
/// for an input of 64).
#[test]
fn fused_lora_group_equals_its_layers_one_by_one() {
    let dev = device();
    let applies = !matches!(DeviceSpec::from_env(), DeviceSpec::Cpu);
    let mut rng = Gaussian::new(5);
    let (rows, inp) = (11, 64);
    for (outs, scales, r) in [
        (vec![20, 8, 8], [1.0, 0.5, 2.0], 4),
        (vec![24, 24], [0.5, 1.0, 0.0], 4),
        (vec![20, 8, 8], [1.0, 0.5, 2.0], 16),
        (vec![24, 24], [2.0, 1.0, 0.0], 16),
    ] {
        let weights: Vec<PackedWeight> = outs
            .iter()
            .map(|&out| {
                let w: Vec<f32> = (0..out * inp).map(|_| rng.normal() as f32).collect();
                let q = Quantizer::new(QuantConfig::nf4()).unwrap();
                let codes = q.quantize_host(&w, [out, inp]).unwrap();
                PackedWeight::new(PackedTensor::pack(&codes, QuantConfig::nf4()), &dev).unwrap()
            })
            .collect();
        let Some(codes) = weights
            .iter()
            .map(|w| w.codebook())
            .collect::<Option<Vec<_>>>()
        else {
            assert!(!applies, "a device holds codebook codes");
            return;
        };
        let x0 = normal([rows, inp]);
        let factors: Vec<[Tensor<2>; 2]> = outs
            .iter()
            .map(|&o| [normal([r, inp]), normal([o, r])])
            .collect();
        let total: usize = outs.iter().sum();
        let up = normal([rows, total]).autodiff();
        let how = format!("outputs {outs:?}, rank {r}");
        let run = |grouped: bool| {
            let x = x0.clone().autodiff().require_grad();
            let ab: Vec<[Tensor<2>; 2]> = (factors.iter())
                .map(|f| f.clone().map(|t| t.autodiff().require_grad()))
                .collect();
            let y = match grouped {
                true => {
                    let members: Vec<_> = (codes.iter().zip(&ab).zip(scales))
                        .map(|((c, [a, b]), s)| (c, [a, b], s))
                        .collect();
                    lora_linear_codebook_group(&x, &members).expect("applies")
                }
                false => Tensor::cat(
                    (codes.iter().zip(&ab).zip(scales))
                        .map(|((c, [a, b]), s)| {
                            lora_linear_codebook(&x, c, [a, b], s, AdapterProduct::Inline)
                                .expect("applies")
                        })
                        .collect(),
                    1,
                ),
            };
            let grads = (y.clone() * up.clone()).sum().backward();
            let mut out = vec![host(&y.inner()), host(&x.grad(&grads).unwrap())];
            for [a, b] in &ab {
                out.push(host(&a.grad(&grads).unwrap()));
                out.push(host(&b.grad(&grads).unwrap()));
            }
            out
        };
        let (got, want) = (run(true), run(false));
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            let what = match k {
                0 => "values".to_string(),
                1 => "∂x".to_string(),
                k => format!("∂{} of layer {}", ["A", "B"][k % 2], (k - 2) / 2),
            };
            close(g, w, &format!("{what}, {how}"));
        }
        // Outside autodiff too.
        let members: Vec<_> = (codes.iter().zip(&factors).zip(scales))
            .map(|((c, [a, b]), s)| (c, [a, b], s))
            .collect();
        let y = lora_linear_codebook_group(&x0, &members).expect("plain tensors");
        close(&host(&y), &want[0], &format!("plain values, {how}"));
    }
}

/// Queries, keys and values side by side in one tensor, grouped queries and not: attention
/// and the gradient in that tensor's layout equal attention over the three parts cut out.
#[test]
fn fused_packed_attention_equals_attention_over_the_parts() {
    let applies = !matches!(DeviceSpec::from_env(), DeviceSpec::Cpu);
    let (b, s, w) = (2, 6, 8);
    for ([h, kvh], d) in [([4, 2], w), ([3, 3], w / 2)] {
        let row = (h + 2 * kvh) * w;
        let (qkv0, up) = (normal([b, s, row]), normal([b, s, h * w]).autodiff());
        let (cos, ssin) = (normal([s, d]), normal([s, d]));
        let plain = causal_attention_packed(&qkv0, &cos, &ssin, [h, kvh]);
        assert_eq!(plain.is_some(), applies, "applies on GPU back ends only");
        let Some(plain) = plain else { return };
        let parts = |t: &Tensor<3>| {
            [
                t.clone().narrow(2, 0, h * w),
                t.clone().narrow(2, h * w, kvh * w),
                t.clone().narrow(2, (h + kvh) * w, kvh * w),
            ]
        };
        let flat = |t: Tensor<3>| {
            let width = t.dims()[2];
            host(&t.reshape([b * s, width]))
        };
        let run = |packed: bool| {
            let qkv = qkv0.clone().autodiff().require_grad();
            let (c, t) = (cos.clone().autodiff(), ssin.clone().autodiff());
            let y = match packed {
                true => causal_attention_packed(&qkv, &c, &t, [h, kvh]),
                false => {
                    let [q, k, v] = parts(&qkv);
                    causal_attention([&q, &k, &v], &c, &t, [h, kvh])
                }
            };
            let y = y.expect("applies");
            let grads = (y.clone() * up.clone()).sum().backward();
            [flat(y.inner()), flat(qkv.grad(&grads).unwrap())]
        };
        let (got, want) = (run(true), run(false));
        let how = format!("{h} heads over {kvh}, rotary dim {d}");
        close(&flat(plain), &want[0], &format!("plain values, {how}"));
        close(&got[0], &want[0], &format!("values, {how}"));
        close(&got[1], &want[1], &format!("∂qkv, {how}"));
    }
}

/// The gate and the up projection side by side: `silu(gate)·up` and its gradient in that
/// layout equal the kernel's over the two halves cut out.
#[test]
fn fused_packed_silu_mul_equals_it_over_the_halves() {
    let applies = !matches!(DeviceSpec::from_env(), DeviceSpec::Cpu);
    let (rows, inter) = (9, 70);
    let gu0 = normal([2, rows, 2 * inter]).mul_scalar(4.0);
    let up = normal([2, rows, inter]).autodiff();
    let plain = silu_mul_packed(&gu0);
    assert_eq!(plain.is_some(), applies, "applies on GPU back ends only");
    let Some(plain) = plain else { return };
    let flat = |t: Tensor<3>| {
        let width = t.dims()[2];
        host(&t.reshape([2 * rows, width]))
    };
    let run = |packed: bool| {
        let gu = gu0.clone().autodiff().require_grad();
        let y = match packed {
            true => silu_mul_packed(&gu),
            false => {
                let (g, u) = (
                    gu.clone().narrow(2, 0, inter),
                    gu.clone().narrow(2, inter, inter),
                );
                silu_mul(&g, &u)
            }
        };
        let y = y.expect("applies");
        let grads = (y.clone() * up.clone()).sum().backward();
        [flat(y.inner()), flat(gu.grad(&grads).unwrap())]
    };
    let (got, want) = (run(true), run(false));
    close(&flat(plain), &want[0], "plain values");
    close(&got[0], &want[0], "values");
    close(&got[1], &want[1], "∂gate_up");
}

/// The negative log-likelihood of one target per row, rows of a vocabulary that is no whole
/// number of the kernel's 256 threads, large logits (no overflow: the row's maximum comes
/// out first): values and the logits' gradient against `log_softmax` and `gather`.
#[test]
fn fused_nll_rows_equals_log_softmax_and_gather() {
    let applies = !matches!(DeviceSpec::from_env(), DeviceSpec::Cpu);
    let dev = device();
    let (rows, vocab) = (9, 1000);
    let logits0 = normal([rows, vocab]).mul_scalar(30.0);
    let targets: Vec<u32> = (0..rows as u32)
        .map(|r| (r * 337 + 5) % vocab as u32)
        .collect();
    let plain = nll_rows(&logits0, &targets);
    assert_eq!(plain.is_some(), applies, "applies on GPU back ends only");
    let Some(plain) = plain else { return };
    let plain = host(&plain);
    let ids: Vec<i64> = targets.iter().map(|&t| i64::from(t)).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [rows, 1]), &dev);
    let up = normal([rows, 1]).autodiff();
    let run = |fused: bool| {
        let logits = logits0.clone().autodiff().require_grad();
        let nll = match fused {
            true => nll_rows(&logits, &targets).expect("applies on the autodiff device too"),
            false => log_softmax(logits.clone(), 1)
                .gather(1, ids.clone().autodiff())
                .neg(),
        };
        let grads = (nll.clone() * up.clone()).sum().backward();
        [host(&nll.inner()), host(&logits.grad(&grads).unwrap())]
    };
    let (got, want) = (run(true), run(false));
    close(&plain, &want[0], "plain values");
    close(&got[0], &want[0], "values");
    close(&got[1], &want[1], "∂logits");
    // A target outside the vocabulary: not taken.
    assert!(nll_rows(&logits0, &[vocab as u32; 9]).is_none());
}
