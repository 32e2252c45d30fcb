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
        let burn = |x: Tensor<4>, cos: Tensor<2>, ssin: Tensor<2>| {
            let table = |t: Tensor<2>| t.reshape([1, s, 1, d]).expand([b, s, h, d]);
            let rot = x.clone().narrow(3, 0, d);
            let swapped = rot.clone().reshape([b, s, h, 2, d / 2]).flip([3]);
            let y = rot * table(cos) + swapped.reshape([b, s, h, d]) * table(ssin);
            match d < width {
                true => Tensor::cat(vec![y, x.narrow(3, d, width - d)], 3),
                false => y,
            }
        };
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

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = super::common::max_abs_diff(a, b);
    assert!(
        d <= 1e-5 * scale.max(1.0),
        "{what}: max |Δ| {d}, scale {scale}"
    );
}
