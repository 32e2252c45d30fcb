//! The GPU's fused `silu(gate)·up`, RMSNorm, rotary embedding and causal softmax
//! (`loftq_core::fused`) against Burn's ops on the device under test: values and gradients. On the CPU the kernels do not apply (the CPU
//! has its own host kernels); on WGPU they must.

use burn::tensor::activation::silu;
use burn::tensor::{Distribution, Tensor};
use loftq_core::DeviceSpec;
use loftq_core::fused::{causal_softmax, rms_norm, rotary, silu_mul};

use super::common::device;
use super::host;

#[test]
fn fused_silu_mul_matches_burn_ops_values_and_gradients() {
    let dev = device();
    let applies = !matches!(DeviceSpec::from_env(), DeviceSpec::Cpu);
    // Large gates on both sides, where σ saturates.
    let g0 = Tensor::<2>::random([37, 130], Distribution::Normal(0.0, 1.0), &dev).mul_scalar(8.0);
    let u0 = Tensor::<2>::random([37, 130], Distribution::Normal(0.0, 1.0), &dev);
    // Outside autodiff: the forward kernel alone.
    let plain = silu_mul(&g0, &u0);
    assert_eq!(
        plain.is_some(),
        applies,
        "the kernel applies on GPU back ends only"
    );
    let Some(plain) = plain else { return };
    let want = silu(g0.clone()) * u0.clone();
    close(&host(&plain), &host(&want), "forward");

    // On the autodiff device: the same values, and the gradients of a weighted sum.
    let w = Tensor::<2>::random([37, 130], Distribution::Normal(0.0, 1.0), &dev);
    let run = |fused: bool| {
        let g = g0.clone().autodiff().require_grad();
        let u = u0.clone().autodiff().require_grad();
        let y = match fused {
            true => silu_mul(&g, &u).expect("applies on the autodiff device too"),
            false => silu(g.clone()) * u.clone(),
        };
        let grads = (y.clone() * w.clone().autodiff()).sum().backward();
        let (dg, du) = (g.grad(&grads).unwrap(), u.grad(&grads).unwrap());
        [host(&y.inner()), host(&dg), host(&du)]
    };
    let (got, want) = (run(true), run(false));
    for (what, (a, b)) in ["values", "∂gate", "∂up"].iter().zip(got.iter().zip(&want)) {
        close(a, b, what);
    }
}

#[test]
fn fused_rms_norm_matches_burn_ops_values_and_gradient() {
    let dev = device();
    let applies = !matches!(DeviceSpec::from_env(), DeviceSpec::Cpu);
    let eps = 1e-5;
    let x0 = Tensor::<3>::random([2, 7, 96], Distribution::Normal(0.0, 3.0), &dev);
    let w = Tensor::<1>::random([96], Distribution::Normal(1.0, 0.5), &dev);
    let burn = |x: Tensor<3>, w: Tensor<1>| {
        let ms = x.clone().square().mean_dim(2).add_scalar(eps);
        x.div(ms.sqrt()) * w.unsqueeze()
    };
    let plain = rms_norm(&x0, &w, eps);
    assert_eq!(
        plain.is_some(),
        applies,
        "the kernel applies on GPU back ends only"
    );
    let Some(plain) = plain else { return };
    let flat = |t: Tensor<3>| host(&t.reshape([14, 96]));
    close(&flat(plain), &flat(burn(x0.clone(), w.clone())), "forward");
    let up = Tensor::<3>::random([2, 7, 96], Distribution::Normal(0.0, 1.0), &dev).autodiff();
    let run = |fused: bool| {
        let x = x0.clone().autodiff().require_grad();
        let wa = w.clone().autodiff();
        let y = match fused {
            true => rms_norm(&x, &wa, eps).expect("applies on the autodiff device too"),
            false => burn(x.clone(), wa),
        };
        let grads = (y.clone() * up.clone()).sum().backward();
        [flat(y.inner()), flat(x.grad(&grads).unwrap())]
    };
    let (got, want) = (run(true), run(false));
    for (what, (a, b)) in ["values", "∂x"].iter().zip(got.iter().zip(&want)) {
        close(a, b, what);
    }
}

/// Whole heads and (Phi) the first half of each.
#[test]
fn fused_rotary_matches_burn_ops_values_and_gradient() {
    let dev = device();
    let applies = !matches!(DeviceSpec::from_env(), DeviceSpec::Cpu);
    let (b, s, h, width) = (2, 5, 3, 8);
    for d in [width, width / 2] {
        let x0 = Tensor::<4>::random([b, s, h, width], Distribution::Normal(0.0, 1.0), &dev);
        let cos = Tensor::<2>::random([s, d], Distribution::Normal(0.0, 1.0), &dev);
        let ssin = Tensor::<2>::random([s, d], Distribution::Normal(0.0, 1.0), &dev);
        let burn = rotary_ops;
        let plain = rotary(&x0, &cos, &ssin);
        assert_eq!(
            plain.is_some(),
            applies,
            "the kernel applies on GPU back ends only"
        );
        let Some(plain) = plain else { return };
        let flat = |t: Tensor<4>| host(&t.reshape([b * s, h * width]));
        let want = burn(x0.clone(), cos.clone(), ssin.clone());
        close(&flat(plain), &flat(want), "forward");
        let up = Tensor::<4>::random([b, s, h, width], Distribution::Normal(0.0, 1.0), &dev);
        let run = |fused: bool| {
            let x = x0.clone().autodiff().require_grad();
            let (c, t) = (cos.clone().autodiff(), ssin.clone().autodiff());
            let y = match fused {
                true => rotary(&x, &c, &t).expect("applies on the autodiff device too"),
                false => burn(x.clone(), c, t),
            };
            let grads = (y.clone() * up.clone().autodiff()).sum().backward();
            [flat(y.inner()), flat(x.grad(&grads).unwrap())]
        };
        let (got, want) = (run(true), run(false));
        for (what, (a, b)) in ["values", "∂x"].iter().zip(got.iter().zip(&want)) {
            close(a, b, &format!("{what}, rotary dim {d}"));
        }
    }
}

/// Every query seeing the keys up to its position: as many queries as keys (training), and
/// the last few of them (decoding after a cache).
#[test]
fn fused_causal_softmax_matches_burn_ops_values_and_gradient() {
    use burn::tensor::Bool;
    use burn::tensor::activation::softmax;
    let dev = device();
    let applies = !matches!(DeviceSpec::from_env(), DeviceSpec::Cpu);
    let (b, h, t, scale) = (2, 3, 9, 0.35);
    for n in [t, 3] {
        let s0 = Tensor::<4>::random([b, h, n, t], Distribution::Normal(0.0, 4.0), &dev);
        let burn = |s: Tensor<4>| {
            let hidden = Tensor::<2, Bool>::tril_mask([n, t], (t - n) as i64, &s.device());
            let hidden = hidden.reshape([1, 1, n, t]).expand([b, h, n, t]);
            softmax(s.mul_scalar(scale).mask_fill(hidden, f32::MIN), 3)
        };
        let plain = causal_softmax(&s0, scale);
        assert_eq!(
            plain.is_some(),
            applies,
            "the kernel applies on GPU back ends only"
        );
        let Some(plain) = plain else { return };
        let flat = |t4: Tensor<4>| host(&t4.reshape([b * h * n, t]));
        close(&flat(plain), &flat(burn(s0.clone())), "forward");
        let up = Tensor::<4>::random([b, h, n, t], Distribution::Normal(0.0, 1.0), &dev);
        let run = |fused: bool| {
            let s = s0.clone().autodiff().require_grad();
            let y = match fused {
                true => causal_softmax(&s, scale).expect("applies on the autodiff device too"),
                false => burn(s.clone()),
            };
            let grads = (y.clone() * up.clone().autodiff()).sum().backward();
            [flat(y.inner()), flat(s.grad(&grads).unwrap())]
        };
        let (got, want) = (run(true), run(false));
        for (what, (a, b)) in ["values", "∂scores"].iter().zip(got.iter().zip(&want)) {
            close(a, b, &format!("{what}, {n} queries"));
        }
    }
}

/// The rotary embedding of `x [b, s, h, width]` in Burn's ops: on the first `d` values of
/// each head `x·cos + x'·ssin`, `x'` with its halves swapped.
fn rotary_ops(x: Tensor<4>, cos: Tensor<2>, ssin: Tensor<2>) -> Tensor<4> {
    let [b, s, h, width] = x.dims();
    let d = cos.dims()[1];
    let table = |t: Tensor<2>| t.reshape([1, s, 1, d]).expand([b, s, h, d]);
    let rot = x.clone().narrow(3, 0, d);
    let swapped = rot.clone().reshape([b, s, h, 2, d / 2]).flip([3]);
    let y = rot * table(cos) + swapped.reshape([b, s, h, d]) * table(ssin);
    match d < width {
        true => Tensor::cat(vec![y, x.narrow(3, d, width - d)], 3),
        false => y,
    }
}

/// Queries, keys and values from the projections to the output projection's input: grouped
/// queries (4 heads over 2) and not (3 over 3), whole and partial rotary.
#[test]
fn fused_causal_attention_matches_burn_ops_values_and_gradients() {
    use burn::tensor::Bool;
    use burn::tensor::activation::softmax;
    use loftq_core::fused::causal_attention;
    let dev = device();
    let applies = !matches!(DeviceSpec::from_env(), DeviceSpec::Cpu);
    let (b, s, w) = (2, 6, 8);
    for ([h, kvh], d) in [([4, 2], w), ([3, 3], w / 2)] {
        let normal =
            |shape: [usize; 3]| Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
        let (q0, k0, v0) = (
            normal([b, s, h * w]),
            normal([b, s, kvh * w]),
            normal([b, s, kvh * w]),
        );
        let cos = Tensor::<2>::random([s, d], Distribution::Normal(0.0, 1.0), &dev);
        let ssin = Tensor::<2>::random([s, d], Distribution::Normal(0.0, 1.0), &dev);
        let burn = |q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, cos: Tensor<2>, ssin: Tensor<2>| {
            let split = |t: Tensor<3>, n: usize| t.reshape([b, s, n, w]);
            let repeat = |t: Tensor<4>| {
                let t = t.swap_dims(1, 2).reshape([b, kvh, 1, s, w]);
                t.expand([b, kvh, h / kvh, s, w]).reshape([b, h, s, w])
            };
            let q = rotary_ops(split(q, h), cos.clone(), ssin.clone()).swap_dims(1, 2);
            let k = repeat(rotary_ops(split(k, kvh), cos, ssin));
            let v = repeat(split(v, kvh));
            let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((w as f32).sqrt());
            let hidden = Tensor::<2, Bool>::tril_mask([s, s], 0, &scores.device());
            let hidden = hidden.reshape([1, 1, s, s]).expand([b, h, s, s]);
            let p = softmax(scores.mask_fill(hidden, f32::MIN), 3);
            p.matmul(v).swap_dims(1, 2).reshape([b, s, h * w])
        };
        let flat = |t: Tensor<3>| host(&t.reshape([b * s, h * w]));
        let plain = causal_attention([&q0, &k0, &v0], &cos, &ssin, [h, kvh]);
        assert_eq!(plain.is_some(), applies, "applies on GPU back ends only");
        let Some(plain) = plain else { return };
        let want = burn(
            q0.clone(),
            k0.clone(),
            v0.clone(),
            cos.clone(),
            ssin.clone(),
        );
        close(&flat(plain), &flat(want), "forward");
        let up = normal([b, s, h * w]).autodiff();
        let run = |fused: bool| {
            let [q, k, v] = [&q0, &k0, &v0].map(|t| t.clone().autodiff().require_grad());
            let (c, t) = (cos.clone().autodiff(), ssin.clone().autodiff());
            let y = match fused {
                true => causal_attention([&q, &k, &v], &c, &t, [h, kvh]).expect("applies"),
                false => burn(q.clone(), k.clone(), v.clone(), c, t),
            };
            let grads = (y.clone() * up.clone()).sum().backward();
            let grad = |x: &Tensor<3>| host(&x.grad(&grads).unwrap().reshape([b * s, x.dims()[2]]));
            [flat(y.inner()), grad(&q), grad(&k), grad(&v)]
        };
        let (got, want) = (run(true), run(false));
        for (what, (a, b)) in ["values", "∂q", "∂k", "∂v"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            close(
                a,
                b,
                &format!("{what}, {h} heads over {kvh}, rotary dim {d}"),
            );
        }
    }
}

/// A frozen weight with an adapter, factored and merged: values and the gradients of the
/// input and both factors, at a LoRA scale of 1 (no scaling kernel) and another; plain
/// factors (inference) and a plain input (the first layer's) too.
#[test]
fn fused_lora_linear_matches_burn_ops_values_and_gradients() {
    use loftq_core::fused::lora_linear;
    let dev = device();
    let applies = !matches!(DeviceSpec::from_env(), DeviceSpec::Cpu);
    let (rows, inp, out, r) = (11, 24, 20, 4);
    let normal =
        |shape: [usize; 2]| Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
    let (x0, w, a0, b0) = (
        normal([rows, inp]),
        normal([out, inp]),
        normal([r, inp]),
        normal([out, r]),
    );
    let up = normal([rows, out]).autodiff();
    let w_values = host(&w);
    for (s, merge) in [(1.0, false), (0.5, false), (1.0, true), (0.5, true)] {
        let how = format!("scale {s}, merged {merge}");
        let burn = |x: Tensor<2>, w: Tensor<2>, a: Tensor<2>, b: Tensor<2>| {
            x.clone().matmul(w.transpose())
                + x.matmul(a.transpose()).matmul(b.transpose()).mul_scalar(s)
        };
        let plain = lora_linear(&x0, &w, [&a0, &b0], s, merge);
        assert_eq!(plain.is_some(), applies, "applies on GPU back ends only");
        let Some(plain) = plain else { return };
        let want = burn(x0.clone(), w.clone(), a0.clone(), b0.clone());
        close(&host(&plain), &host(&want), &format!("forward, {how}"));
        let run = |fused: bool| {
            let [x, a, b] = [&x0, &a0, &b0].map(|t| t.clone().autodiff().require_grad());
            let wa = w.clone().autodiff();
            let y = match fused {
                true => lora_linear(&x, &wa, [&a, &b], s, merge).expect("applies"),
                false => burn(x.clone(), wa, a.clone(), b.clone()),
            };
            let grads = (y.clone() * up.clone()).sum().backward();
            let grad = |t: &Tensor<2>| host(&t.grad(&grads).unwrap());
            [host(&y.inner()), grad(&x), grad(&a), grad(&b)]
        };
        let (got, want) = (run(true), run(false));
        for (what, (g, w)) in ["values", "∂x", "∂A", "∂B"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            close(g, w, &format!("{what}, {how}"));
        }
        let [a, b] = [&a0, &b0].map(|t| t.clone().autodiff().require_grad());
        let y = lora_linear(&x0, &w, [&a, &b], s, merge).expect("applies to a plain input");
        let grads = (y * up.clone()).sum().backward();
        for (what, (t, i)) in ["∂A", "∂B"].iter().zip([(&a, 2), (&b, 3)]) {
            let g = host(&t.grad(&grads).expect("a gradient"));
            close(&g, &want[i], &format!("{what} of a plain input, {how}"));
        }
        // The merged form's sum must not have written into the weight.
        assert_eq!(host(&w), w_values, "the weight changed, {how}");
    }
}

/// The merged form over codebook codes (`W + s·B·A` written by the dequantization kernel)
/// against the merged form over the dequantized weight: values and the gradients of the input
/// and both factors, for NF4, NF3 in blocks of 32 and a shape whose blocks straddle rows, at
/// a LoRA scale of 1 and another.
#[test]
fn fused_lora_linear_over_codebook_codes_matches_the_dequantized_weight() {
    use loftq_core::fused::{AdapterProduct, lora_linear, lora_linear_codebook};
    use loftq_core::quant::{BlockSize, PackedTensor, QuantConfig};
    use loftq_core::{Quantizer, lowrank::Gaussian};
    let dev = device();
    let applies = !matches!(DeviceSpec::from_env(), DeviceSpec::Cpu);
    let nf3 = QuantConfig::nf(3).with_block_size(BlockSize::Elements(32));
    let mut rng = Gaussian::new(3);
    for (config, [out, inp], s) in [
        (QuantConfig::nf4(), [20, 64], 1.0),
        (nf3, [20, 64], 0.5),
        (QuantConfig::nf4(), [7, 37], 2.0),
    ] {
        let how = format!("{} [{out}, {inp}], scale {s}", config.label());
        let w: Vec<f32> = (0..out * inp).map(|_| rng.normal() as f32).collect();
        let q = Quantizer::new(config).unwrap();
        let packed = PackedTensor::pack(&q.quantize_host(&w, [out, inp]).unwrap(), config);
        let weight = loftq_models::nn::PackedWeight::new(packed, &dev).unwrap();
        let Some(codes) = weight.codebook() else {
            assert!(!applies, "a device holds codebook codes");
            return;
        };
        let dense = weight.dequantize();
        let (rows, r) = (13, 4);
        let normal =
            |shape: [usize; 2]| Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
        let (x0, a0, b0, up) = (
            normal([rows, inp]),
            normal([r, inp]),
            normal([out, r]),
            normal([rows, out]).autodiff(),
        );
        let run = |over_codes: Option<AdapterProduct>| {
            let [x, a, b] = [&x0, &a0, &b0].map(|t| t.clone().autodiff().require_grad());
            let y = match over_codes {
                Some(p) => lora_linear_codebook(&x, &codes, [&a, &b], s, p).expect("applies"),
                None => lora_linear(&x, &dense, [&a, &b], s, true).expect("applies"),
            };
            let grads = (y.clone() * up.clone()).sum().backward();
            let grad = |t: &Tensor<2>| host(&t.grad(&grads).unwrap());
            [host(&y.inner()), grad(&x), grad(&a), grad(&b)]
        };
        let want = run(None);
        for p in [AdapterProduct::Inline, AdapterProduct::Product] {
            let how = format!("{how}, {p:?}");
            for (what, (g, w)) in ["values", "∂x", "∂A", "∂B"]
                .iter()
                .zip(run(Some(p)).iter().zip(&want))
            {
                close(g, w, &format!("{what}, {how}"));
            }
            // Outside autodiff too; the codes' own values stay as they were.
            let y = lora_linear_codebook(&x0, &codes, [&a0, &b0], s, p).expect("plain tensors");
            close(&host(&y), &want[0], &format!("plain values, {how}"));
            assert_eq!(host(&weight.dequantize()), host(&dense), "{how}");
        }
    }
}

/// LoftQ's fit step, `w − p` and `(residual − c·p)²` in one kernel, against Burn's ops, for a
/// `c` of 1 and another, on matrices and on a stack of them.
#[test]
fn fused_fit_step_equals_burn_ops() {
    let dev = device();
    let applies = !matches!(DeviceSpec::from_env(), DeviceSpec::Cpu);
    let normal =
        |shape: [usize; 3]| Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
    for (shape, c) in [([1, 37, 53], 1.0), ([3, 16, 40], 0.25)] {
        let (residual, p, w) = (normal(shape), normal(shape), normal(shape));
        let got = loftq_core::fused::fit_step(&residual, &p, &w, c);
        assert_eq!(got.is_some(), applies, "applies on GPU back ends only");
        let Some((next, squares)) = got else { return };
        let flat = |t: Tensor<3>| host(&t.reshape([shape[0] * shape[1], shape[2]]));
        let d = residual - p.clone().mul_scalar(c);
        close(&flat(next), &flat(w - p), &format!("next, c {c}"));
        close(
            &flat(squares),
            &flat(d.clone() * d),
            &format!("squares, c {c}"),
        );
    }
}

/// AdamW's update in one kernel against the tensor ops it replaces (those of
/// `train::optim`), with and without weight decay, at the first step and a later one.
#[test]
fn fused_adamw_equals_burn_ops() {
    let dev = device();
    let applies = !matches!(DeviceSpec::from_env(), DeviceSpec::Cpu);
    let n = 1000;
    let normal = |s: f64| Tensor::<1>::random([n], Distribution::Normal(0.0, s), &dev);
    let (g, m, p) = (normal(1e-2), normal(1e-3), normal(0.5));
    let v = normal(1e-4).abs();
    let (beta1, beta2, eps, lr) = (0.9f64, 0.999f64, 1e-8f64, 2e-4f64);
    for (t, wd) in [(1, 0.0), (7, 0.05)] {
        let (bias1, bias2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
        let scalars = [
            beta1,
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            1.0 - lr * wd,
            bias2,
            eps,
            lr / bias1,
        ];
        let got = loftq_core::fused::adamw(&g, &m, &v, &p, scalars.map(|x| x as f32));
        assert_eq!(got.is_some(), applies, "applies on GPU back ends only");
        let Some([gm, gv, gp]) = got else { return };
        let wm = m.clone().mul_scalar(beta1) + g.clone().mul_scalar(1.0 - beta1);
        let wv = v.clone().mul_scalar(beta2) + g.clone().square().mul_scalar(1.0 - beta2);
        let step = wm
            .clone()
            .div(wv.clone().div_scalar(bias2).sqrt().add_scalar(eps));
        let wp = p.clone().mul_scalar(1.0 - lr * wd) - step.mul_scalar(lr / bias1);
        // The parameters' change, not the parameters: the decay's share of it is small.
        let (gp, wp) = (gp - p.clone(), wp - p.clone());
        for (what, (a, b)) in [("m", (gm, wm)), ("v", (gv, wv)), ("p's change", (gp, wp))] {
            let (a, b) = (host(&a.unsqueeze::<2>()), host(&b.unsqueeze::<2>()));
            let scale = b.iter().fold(0f32, |s, x| s.max(x.abs()));
            let d = super::common::max_abs_diff(&a, &b);
            assert!(
                d <= 1e-4 * scale,
                "{what}, step {t}, decay {wd}: |Δ| {d}, scale {scale}"
            );
        }
    }
}

/// Vectors end to end, eight to a kernel: 19 parts of different lengths (two whole groups and
/// a partial one), and a single part.
#[test]
fn fused_concat_equals_burn_cat() {
    let dev = device();
    let applies = !matches!(DeviceSpec::from_env(), DeviceSpec::Cpu);
    for count in [19, 1] {
        let parts: Vec<Tensor<1>> = (0..count)
            .map(|i| Tensor::random([1 + 7 * i % 23], Distribution::Normal(0.0, 1.0), &dev))
            .collect();
        let got = loftq_core::fused::concat(&parts);
        assert_eq!(got.is_some(), applies, "applies on GPU back ends only");
        let Some(got) = got else { return };
        let want = Tensor::cat(parts, 0);
        let as_rows = |t: Tensor<1>| host(&t.unsqueeze::<2>());
        assert_eq!(as_rows(got), as_rows(want), "{count} parts");
    }
}

pub(super) fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = super::common::max_abs_diff(a, b);
    assert!(
        d <= 1e-5 * scale.max(1.0),
        "{what}: max |Δ| {d}, scale {scale}"
    );
}
