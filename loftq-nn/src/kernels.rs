//! The one door between the model and the CPU back end's fused kernels. Every function here
//! exists in every build and returns `None` when its inputs are not tensors of the CPU back
//! end (or the crate is built without `flex`); the caller then uses Burn's generic ops. The
//! model's code (`llama`, `attention`, `mlp`, `qlinear`) calls only this module, so it has no
//! `cfg` on back ends.

use burn::tensor::Tensor;
use loftq_core::quant::PackedTensor;

use crate::Output;
#[cfg(feature = "flex")]
use crate::{cpu_fused as fused, cpu_linear as linear};

/// A weight in host memory for the CPU products: shared, not copied, when it was a tensor of
/// the CPU back end. There is none without the `flex` feature.
#[cfg(feature = "flex")]
pub(crate) type HostWeight = loftq_core::cpu::Host;
/// A weight in host memory for the CPU products: there is none without the `flex` feature.
#[cfg(not(feature = "flex"))]
#[derive(Clone, Debug)]
pub(crate) enum HostWeight {}

/// `$flex` where the CPU kernels are built; `None`, the arguments unused, where they are not.
macro_rules! on_cpu {
    ($flex:expr; $($arg:expr),*) => {{
        #[cfg(feature = "flex")]
        {
            $flex
        }
        #[cfg(not(feature = "flex"))]
        {
            let _ = ($($arg,)*);
            None
        }
    }};
}

/// `w` as a host weight when it is a contiguous `f32` tensor of the CPU back end outside
/// autodiff.
pub(crate) fn plain(w: &Tensor<2>) -> Option<HostWeight> {
    on_cpu!(HostWeight::of_plain(w); w)
}

/// The dequantized values of a weight packed in host memory (what the CPU back end keeps).
pub(crate) fn dequantized(p: &PackedTensor) -> Option<HostWeight> {
    on_cpu!(Some(HostWeight::owned(
        p.dequantize().expect("checked when built"),
        &p.shape,
    )); p)
}

/// RMS normalization of the last dimension in one host pass.
pub(crate) fn rms_norm<const D: usize>(
    x: &Tensor<D>,
    weight: &Tensor<1>,
    eps: f64,
) -> Option<Tensor<D>> {
    on_cpu!(fused::rms_norm(x, weight, eps); x, weight, eps)
}

/// `silu(gate)·up` in one host pass.
pub(crate) fn silu_mul<const D: usize>(gate: &Tensor<D>, up: &Tensor<D>) -> Option<Tensor<D>> {
    on_cpu!(fused::silu_mul(gate, up); gate, up)
}

/// Causal attention with rotary embeddings, fused (no window).
pub(crate) fn attention(
    qkv: [&Tensor<3>; 3],
    rope: [&Tensor<2>; 2],
    heads: [usize; 2],
) -> Option<Tensor<3>> {
    on_cpu!(fused::attention(qkv, rope, heads); qkv, rope, heads)
}

/// The mean negative log-likelihood of `targets` under the head `w`, never holding the logits.
pub(crate) fn head_nll(h: &Tensor<3>, w: &HostWeight, targets: &[u32]) -> Option<Tensor<1>> {
    on_cpu!(fused::head_nll(h, w, targets); h, w, targets)
}

/// `x·Wᵀ` for `x [rows, in]` and the host weight `w` of `shape` `[out, in]`.
pub(crate) fn product(
    x: &Tensor<2>,
    w: &HostWeight,
    shape: [usize; 2],
    output: Output,
) -> Option<Tensor<2>> {
    on_cpu!(linear::product(x, w, shape, output); x, w, shape, output)
}

/// `x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, or the LoRA branch alone when `w` is `None`.
pub(crate) fn product_with_lora(
    x: &Tensor<2>,
    w: Option<&HostWeight>,
    lora: [&Tensor<2>; 2],
    scaling: f64,
    output: Output,
) -> Option<Tensor<2>> {
    on_cpu!(linear::product_with_lora(x, w, lora, scaling, output); x, w, lora, scaling, output)
}
