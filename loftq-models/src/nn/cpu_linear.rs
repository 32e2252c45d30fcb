//! The CPU kernel of [`super::QLinear`]'s frozen product `x·Wᵀ`: faer's matrix product
//! (runtime-dispatched AVX2/AVX-512, both cores), about 4× flex's own matmul on the 2-core
//! machine this project is tested on (`loftq-bench matmul`). On an autodiff device it is a
//! custom operation whose backward is `dx = g·W`, with `W` (not a graph leaf) kept only until
//! that backward runs. Other back ends keep using Burn's matmul.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Tensor, TensorData};
use faer::{MatMut, MatRef};
use loftq_core::cpu::HostMat;

/// A row-major `[out, in]` f32 matrix in host memory.
#[derive(Clone)]
pub(crate) enum HostMatrix {
    /// Dequantized for this product.
    Owned(Arc<Vec<f32>>),
    /// A contiguous flex tensor, shared.
    Flex(FlexTensor),
}

impl std::fmt::Debug for HostMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostMatrix")
    }
}

impl HostMatrix {
    pub(crate) fn slice(&self) -> &[f32] {
        match self {
            HostMatrix::Owned(v) => v,
            HostMatrix::Flex(t) => t.as_slice::<f32>().expect("checked when built"),
        }
    }

    /// A dense flex tensor's storage, if it is contiguous f32.
    pub(crate) fn from_tensor(w: &Tensor<2>) -> Option<Self> {
        let t = w.clone().try_into_primitive::<Flex>().ok()?;
        t.as_slice::<f32>().is_some().then_some(HostMatrix::Flex(t))
    }
}

/// `x·Wᵀ` for `x [rows, in]` on flex (with or without autodiff) and `w [out, in]`; `None`
/// if `x` lives elsewhere.
pub(crate) fn product(x: &Tensor<2>, w: &HostMatrix, shape: [usize; 2]) -> Option<Tensor<2>> {
    if let Ok(t) = x.clone().try_into_primitive::<Flex>() {
        return Some(Tensor::from_primitive::<Flex>(forward(&t, w, shape)));
    }
    let ad = x.clone().try_into_primitive::<Autodiff<Flex>>().ok()?;
    let y = forward(ad.primitive(), w, shape);
    let (_, guard) = ad.into_parts();
    let out = match BaseBackward
        .prepare::<NoCheckpointing>([guard])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((w.clone(), shape), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Some(Tensor::from_primitive::<Autodiff<Flex>>(out))
}

#[derive(Debug)]
struct BaseBackward;

impl Backward<Flex, 1> for BaseBackward {
    type State = (HostMatrix, [usize; 2]);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (w, [out, inp]) = &ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
            let rows = rows_of(&g, *out);
            let g = HostMat::new(&g);
            let w = MatRef::from_row_major_slice(w.slice(), *out, *inp);
            gemm(rows, *inp, g.view(rows, *out), w, 1.0)
        });
    }
}

fn forward(x: &FlexTensor, w: &HostMatrix, [out, inp]: [usize; 2]) -> FlexTensor {
    let rows = rows_of(x, inp);
    let x = HostMat::new(x);
    // Row-major W [out, in] is column-major Wᵀ [in, out].
    let wt = MatRef::from_column_major_slice(w.slice(), inp, out);
    gemm(rows, out, x.view(rows, inp), wt, 1.0)
}

/// `alpha·lhs·rhs` as a new `[m, n]` flex tensor.
fn gemm(m: usize, n: usize, lhs: MatRef<'_, f32>, rhs: MatRef<'_, f32>, alpha: f32) -> FlexTensor {
    let mut v = vec![0f32; m * n];
    loftq_core::cpu::gemm(
        MatMut::from_row_major_slice_mut(&mut v, m, n),
        lhs,
        rhs,
        alpha,
    );
    FlexTensor::from_data(TensorData::new(v, [m, n]))
}

/// Rows of `t` read as a matrix with `cols` columns.
fn rows_of(t: &FlexTensor, cols: usize) -> usize {
    t.layout().num_elements() / cols
}

/// The LoRA branch `s·(x·Aᵀ)·Bᵀ` for `x [rows, in]`, `a [r, in]`, `b [out, r]`, all on
/// flex: faer products, and on an autodiff device one operation whose backward gives the
/// gradients of `x`, `A` and `B` (flex's own gemm is slow on these thin shapes). `None` if
/// the inputs live elsewhere.
pub(crate) fn lora_product(
    x: &Tensor<2>,
    a: &Tensor<2>,
    b: &Tensor<2>,
    scaling: f64,
) -> Option<Tensor<2>> {
    let s = scaling as f32;
    if let (Ok(xp), Ok(ap), Ok(bp)) = (
        x.clone().try_into_primitive::<Flex>(),
        a.clone().try_into_primitive::<Flex>(),
        b.clone().try_into_primitive::<Flex>(),
    ) {
        let (_, y) = lora_forward(&xp, &ap, &bp, s);
        return Some(Tensor::from_primitive::<Flex>(y));
    }
    // Elsewhere than flex (with or without autodiff), leave it to Burn without wrapping
    // anything.
    if !loftq_core::quant::is_host_device(&a.device().without_autodiff()) {
        return None;
    }
    // On the autodiff device every input is an autodiff tensor (constants included).
    let ad = |t: &Tensor<2>| {
        t.clone()
            .autodiff()
            .try_into_primitive::<Autodiff<Flex>>()
            .ok()
    };
    let (xa, aa, ba) = (ad(x)?, ad(a)?, ad(b)?);
    let (xp, ap, bp) = (
        xa.primitive().clone(),
        aa.primitive().clone(),
        ba.primitive().clone(),
    );
    let (h, y) = lora_forward(&xp, &ap, &bp, s);
    let nodes = [xa.node(), aa.node(), ba.node()];
    let out = match LoraBackward
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((xp, ap, bp, h, s), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Some(Tensor::from_primitive::<Autodiff<Flex>>(out))
}

/// `(h, y)` with `h = x·Aᵀ [rows, r]` and `y = s·h·Bᵀ [rows, out]`.
fn lora_forward(
    x: &FlexTensor,
    a: &FlexTensor,
    b: &FlexTensor,
    s: f32,
) -> (FlexTensor, FlexTensor) {
    let (r, inp) = dims2(a);
    let out = dims2(b).0;
    let rows = rows_of(x, inp);
    let (x, a, b) = (HostMat::new(x), HostMat::new(a), HostMat::new(b));
    let h = gemm(rows, r, x.view(rows, inp), a.view(r, inp).transpose(), 1.0);
    let y = gemm(
        rows,
        out,
        HostMat::new(&h).view(rows, r),
        b.view(out, r).transpose(),
        s,
    );
    (h, y)
}

fn dims2(t: &FlexTensor) -> (usize, usize) {
    let d = t.layout().shape();
    (d[0], d[1])
}

#[derive(Debug)]
struct LoraBackward;

impl Backward<Flex, 3> for LoraBackward {
    type State = (FlexTensor, FlexTensor, FlexTensor, FlexTensor, f32);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, a, b, h, s) = &ops.state;
        let [px, pa, pb] = ops.parents;
        let g = grads.consume::<Flex>(&ops.node);
        let (r, inp) = dims2(a);
        let out = dims2(b).0;
        let rows = rows_of(&g, out);
        let (g, x, a, b, h) = (
            HostMat::new(&g),
            HostMat::new(x),
            HostMat::new(a),
            HostMat::new(b),
            HostMat::new(h),
        );
        let g = g.view(rows, out);
        // s·g·B, [rows, r]: the gradient of h.
        let gh = gemm(rows, r, g, b.view(out, r), *s);
        let gh = HostMat::new(&gh);
        let gh = gh.view(rows, r);
        if let Some(n) = pb {
            // s·gᵀ·h, [out, r].
            let gb = gemm(out, r, g.transpose(), h.view(rows, r), *s);
            grads.register::<Flex>(n.id, gb);
        }
        if let Some(n) = pa {
            // ghᵀ·x, [r, in].
            grads.register::<Flex>(n.id, gemm(r, inp, gh.transpose(), x.view(rows, inp), 1.0));
        }
        if let Some(n) = px {
            // gh·A, [rows, in].
            grads.register::<Flex>(n.id, gemm(rows, inp, gh, a.view(r, inp), 1.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};

    use super::*;

    fn host(t: Tensor<2>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    fn close(a: Vec<f32>, b: Vec<f32>, what: &str) {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            d <= 1e-5 * scale.max(1.0),
            "{what}: max |Δ| {d}, scale {scale}"
        );
    }

    /// Values and gradients of both kernels against Burn's own matmuls and autodiff.
    #[test]
    fn kernels_match_burn_autodiff() {
        let dev = burn::tensor::Device::flex().autodiff();
        let rnd = |r, c| Tensor::<2>::random([r, c], Distribution::Normal(0.0, 1.0), &dev);
        let (rows, inp, out, r) = (37, 29, 23, 5);
        let (x0, a0, b0, w0) = (rnd(rows, inp), rnd(r, inp), rnd(out, r), rnd(out, inp));
        let weight = rnd(rows, out);
        let s = 0.7;

        let leaves = || [&x0, &a0, &b0].map(|t| t.clone().detach().require_grad());
        let [x, a, b] = leaves();
        let w = HostMatrix::from_tensor(&w0.clone().inner()).expect("flex");
        let y = product(&x, &w, [out, inp]).unwrap() + lora_product(&x, &a, &b, s).unwrap();
        let grads = (y.clone() * weight.clone()).sum().backward();
        let got = [&x, &a, &b].map(|t| host(t.grad(&grads).unwrap()));

        let [x2, a2, b2] = leaves();
        let want_y = x2.clone().matmul(w0.clone().detach().transpose())
            + x2.clone()
                .matmul(a2.clone().transpose())
                .matmul(b2.clone().transpose())
                .mul_scalar(s);
        let grads = (want_y.clone() * weight).sum().backward();
        let want = [&x2, &a2, &b2].map(|t| host(t.grad(&grads).unwrap()));
        close(host(y.inner()), host(want_y.inner()), "y");
        for (name, (g, w)) in ["dx", "dA", "dB"].iter().zip(got.into_iter().zip(want)) {
            close(g, w, name);
        }
    }
}
