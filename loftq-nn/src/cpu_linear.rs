//! The CPU kernels of [`super::QLinear`]: faer's matrix products (runtime-dispatched
//! AVX2/AVX-512, both cores), about 4× flex's own matmul on the 2-core machine this project
//! is tested on (`loftq-bench matmul`). Each product is one operation of
//! [`super::cpu_fused`]: on an autodiff device its backward pass is a few more products, and
//! the frozen weight (not a graph leaf) is kept only until that pass runs. Other back ends
//! keep using Burn's matmul.

use std::sync::Arc;

use burn::tensor::Tensor;
use faer::MatRef;
use loftq_core::cpu::{Threads, gemm_rows};

use super::Output;
use loftq_core::cpu::Host;

use super::cpu_fused::{BackwardFn, run};

/// Inputs of at most this many rows take [`super::cpu_kernels::matvec`].
const MATVEC_ROWS: usize = 2;

/// `x·Wᵀ` for `x [n, cols]` and `w [out, cols]`, both row-major: a plain pass over the
/// weight for one or two rows (decoding a token), faer's product otherwise.
fn times_transposed(n: usize, x: &[f32], w: &[f32], cols: usize) -> Vec<f32> {
    if n <= MATVEC_ROWS {
        return super::cpu_kernels::matvec(n, x, w, cols);
    }
    product_of(
        n,
        w.len() / cols,
        rows(x, cols),
        rows(w, cols).transpose(),
        1.0,
    )
}

/// A new `[m, n]` buffer holding `alpha·lhs·rhs`.
fn product_of(
    m: usize,
    n: usize,
    lhs: MatRef<'_, f32>,
    rhs: MatRef<'_, f32>,
    alpha: f32,
) -> Vec<f32> {
    let mut v = vec![0f32; m * n];
    gemm_rows(&mut v, false, [lhs, rhs], alpha, Threads::Pool);
    v
}

/// `dst += alpha·lhs·rhs` for a row-major `dst [m, n]`.
fn add_product(dst: &mut [f32], n: usize, lhs: MatRef<'_, f32>, rhs: MatRef<'_, f32>, alpha: f32) {
    debug_assert_eq!(dst.len(), lhs.nrows() * n);
    gemm_rows(dst, true, [lhs, rhs], alpha, Threads::Pool);
}

fn rows(x: &[f32], cols: usize) -> MatRef<'_, f32> {
    MatRef::from_row_major_slice(x, x.len() / cols, cols)
}

/// `x·Wᵀ` for `x [rows, in]` on flex (with or without autodiff) and `w [out, in]`; `None` if
/// `x` lives elsewhere.
pub(crate) fn product(
    x: &Tensor<2>,
    w: &Host,
    shape: [usize; 2],
    output: Output,
) -> Option<Tensor<2>> {
    let [out, inp] = shape;
    let n = x.dims()[0];
    let w = w.clone();
    run([x], [n, out], move |[x], wanted| {
        let y = match output {
            Output::Value => times_transposed(n, x.slice(), w.slice(), inp),
            Output::GradientOnly => vec![0f32; n * out],
        };
        let back = wanted.map(|_| {
            Arc::new(move |g: &[f32]| [product_of(n, inp, rows(g, out), rows(w.slice(), inp), 1.0)])
                as BackwardFn<1>
        });
        (y, back)
    })
}

/// `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` for `x [rows, in]`, `w [out, in]`, `a [r, in]`, `b [out, r]`, as
/// one operation: the adapter's product is added into the base's output, and the backward
/// pass gives `dx`, `dA` and `dB`. `None` if the inputs live elsewhere than the CPU back end.
pub(crate) fn product_with_lora(
    x: &Tensor<2>,
    w: Option<&Host>,
    [a, b]: [&Tensor<2>; 2],
    scaling: f64,
    output: Output,
) -> Option<Tensor<2>> {
    let s = scaling as f32;
    let ([r, inp], out) = (a.dims(), b.dims()[0]);
    let n = x.dims()[0];
    let w = w.cloned();
    run([x, a, b], [n, out], move |[x, a, b], wanted| {
        // `h` is kept for `dB` in either case.
        let h = times_transposed(n, x.slice(), a.slice(), inp);
        let y = match (output, &w) {
            (Output::Value, Some(w)) if n <= MATVEC_ROWS => {
                let mut y = times_transposed(n, x.slice(), w.slice(), inp);
                let hb = times_transposed(n, &h, b.slice(), r);
                y.iter_mut().zip(&hb).for_each(|(y, v)| *y += s * v);
                y
            }
            (Output::Value, Some(w)) => {
                let mut y = times_transposed(n, x.slice(), w.slice(), inp);
                add_product(&mut y, out, rows(&h, r), rows(b.slice(), r).transpose(), s);
                y
            }
            (Output::Value, None) => {
                product_of(n, out, rows(&h, r), rows(b.slice(), r).transpose(), s)
            }
            (Output::GradientOnly, _) => vec![0f32; n * out],
        };
        let back = wanted.map(|[want_x, ..]| {
            Arc::new(move |g: &[f32]| {
                let g = rows(g, out);
                // s·g·B: the gradient of h, [rows, r].
                let gh = product_of(n, r, g, rows(b.slice(), r), s);
                let gh = rows(&gh, r);
                // No dx where the input needs none (the first layer's: the embeddings are
                // frozen), which saves that layer's largest product.
                let dx = want_x.then(|| {
                    let mut dx = match &w {
                        Some(w) => product_of(n, inp, g, rows(w.slice(), inp), 1.0),
                        None => vec![0f32; n * inp],
                    };
                    add_product(&mut dx, inp, gh, rows(a.slice(), inp), 1.0);
                    dx
                });
                let da = product_of(r, inp, gh.transpose(), rows(x.slice(), inp), 1.0);
                let db = product_of(out, r, g.transpose(), rows(&h, r), s);
                [dx.unwrap_or_default(), da, db]
            }) as BackwardFn<3>
        });
        (y, back)
    })
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};

    use super::*;
    use crate::cpu_fused::tests::{close, host};

    /// Values and gradients of both kernels (the base alone, and base plus adapter in one
    /// operation; also the adapter alone) against Burn's own matmuls and autodiff.
    #[test]
    fn kernels_match_burn_autodiff() {
        let dev = burn::tensor::Device::flex().autodiff();
        let rnd = |r, c| Tensor::<2>::random([r, c], Distribution::Normal(0.0, 1.0), &dev);
        let (rows, inp, out, r) = (37, 29, 23, 5);
        let (x0, a0, b0, w0) = (rnd(rows, inp), rnd(r, inp), rnd(out, r), rnd(out, inp));
        let weight = rnd(rows, out);
        let s = 0.7;
        let w = Host::of_plain(&w0.clone().inner()).expect("flex");

        let leaves = || [&x0, &a0, &b0].map(|t| t.clone().detach().require_grad());
        let [x2, a2, b2] = leaves();
        let lora = x2
            .clone()
            .matmul(a2.clone().transpose())
            .matmul(b2.clone().transpose())
            .mul_scalar(s);
        let want_y = x2.clone().matmul(w0.clone().detach().transpose()) + lora;
        let grads = (want_y.clone() * weight.clone()).sum().backward();
        let want = [&x2, &a2, &b2].map(|t| host(t.grad(&grads).unwrap()));

        // Base and adapter in one operation, and the base product plus the adapter alone.
        for split in [false, true] {
            let [x, a, b] = leaves();
            let y = if split {
                product(&x, &w, [out, inp], Output::Value).unwrap()
                    + product_with_lora(&x, None, [&a, &b], s, Output::Value).unwrap()
            } else {
                product_with_lora(&x, Some(&w), [&a, &b], s, Output::Value).unwrap()
            };
            let grads = (y.clone() * weight.clone()).sum().backward();
            let got = [&x, &a, &b].map(|t| host(t.grad(&grads).unwrap()));
            close(host(y.inner()), host(want_y.clone().inner()), "y");
            for (name, (g, w)) in ["dx", "dA", "dB"]
                .iter()
                .zip(got.into_iter().zip(want.clone()))
            {
                close(g, w, name);
            }
        }

        // Only the gradient path: the value is zeros, the gradients are the same.
        for with_base in [true, false] {
            let [x, a, b] = leaves();
            let base = with_base.then_some(&w);
            let y = product_with_lora(&x, base, [&a, &b], s, Output::GradientOnly).unwrap();
            assert!(host(y.clone().inner()).iter().all(|&v| v == 0.0));
            let grads = (y * weight.clone()).sum().backward();
            let got = [&x, &a, &b].map(|t| host(t.grad(&grads).unwrap()));
            if with_base {
                for (name, (g, w)) in ["dx", "dA", "dB"]
                    .iter()
                    .zip(got.into_iter().zip(want.clone()))
                {
                    close(g, w, name);
                }
            } else {
                // Without the base, dA and dB are the same as with it.
                close(got[1].clone(), want[1].clone(), "dA");
                close(got[2].clone(), want[2].clone(), "dB");
            }
        }
        let x = x0.clone().detach().require_grad();
        let y = product(&x, &w, [out, inp], Output::GradientOnly).unwrap();
        assert!(host(y.clone().inner()).iter().all(|&v| v == 0.0));
        let grads = (y * weight.clone()).sum().backward();
        let x1 = x0.clone().detach().require_grad();
        let want_grads = (x1.clone().matmul(w0.clone().detach().transpose()) * weight.clone())
            .sum()
            .backward();
        close(
            host(x.grad(&grads).unwrap()),
            host(x1.grad(&want_grads).unwrap()),
            "dx of the base alone",
        );
    }
}
