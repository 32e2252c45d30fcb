//! Four of the model's element-wise stretches as single CubeCL kernels (WGPU, CUDA), each
//! with a one-kernel backward pass: the MLP's `silu(gate)·up`, RMSNorm with a frozen weight,
//! the rotary embedding and the causal softmax of attention.
//!
//! In Burn's ops `silu(gate)·up` is eight kernels forward (its `sigmoid` alone is six:
//! negate, exp, add one, log, negate, exp) and fifteen backward, RMSNorm six forward and more
//! backward, each a pass over the activations; a GPU's training step is bound by such
//! launches. On the autodiff device each kernel is recorded as one operation whose backward
//! kernel writes the inputs' gradients. The formulas are the CPU host kernels'.
//!
//! Each function exists in every build and returns `None` where its kernel does not apply
//! (no CubeCL back end compiled in, tensors of another back end, Burn's fusion on with
//! `tuned`, inputs that are not `f32`, a weight that needs a gradient): the caller then takes
//! Burn's ops.

use burn::tensor::Tensor;

/// `silu(gate)·up` element by element, `silu(x) = x / (1 + e^{-x})`, in one kernel (and one
/// for the backward pass); `None` where the kernel does not apply (see the module
/// documentation) or the shapes differ.
pub fn silu_mul<const D: usize>(gate: &Tensor<D>, up: &Tensor<D>) -> Option<Tensor<D>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        (gate.dims() == up.dims())
            .then(|| ops::silu_mul(gate, up))
            .flatten()
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (gate, up);
        None
    }
}

/// RMSNorm of `x`'s last dimension scaled by the frozen `weight`,
/// `x · w / √(mean(x²) + ε)`, in one kernel (one thread a row; one more for the backward
/// pass); `None` where the kernel does not apply or the widths differ.
pub fn rms_norm<const D: usize>(x: &Tensor<D>, weight: &Tensor<1>, eps: f64) -> Option<Tensor<D>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        (x.dims()[D - 1] == weight.dims()[0])
            .then(|| ops::rms_norm(x, weight, eps as f32))
            .flatten()
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (x, weight, eps);
        None
    }
}

/// Rotary embedding of `x` `[batch, seq, heads, width]` (contiguous) with the tables `cos`
/// and `swapped_sin` `[seq, d]`, `d ≤ width` even: on the first `d` values of each head
/// `x·cos + x'·swapped_sin`, `x'` the head's first `d` values with their halves swapped, the
/// rest passed through; one kernel, and one for the backward pass. `None` where the kernel
/// does not apply or the shapes do not fit.
pub fn rotary(x: &Tensor<4>, cos: &Tensor<2>, swapped_sin: &Tensor<2>) -> Option<Tensor<4>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        let [_, s, _, width] = x.dims();
        let [ts, d] = cos.dims();
        let fits = ts == s && swapped_sin.dims() == [ts, d] && d <= width && d % 2 == 0;
        fits.then(|| ops::rotary(x, cos, swapped_sin)).flatten()
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (x, cos, swapped_sin);
        None
    }
}

/// Whether `t` is a tensor these kernels take: an unfused CubeCL one, plain or on the
/// autodiff device (a cheap check, for callers that would otherwise do work for nothing).
pub fn applies<const D: usize>(t: &Tensor<D>) -> bool {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        ops::applies(t)
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = t;
        false
    }
}

/// `softmax(scale·scores)` over the last dimension of `scores` `[b, h, n, t]` with a causal
/// mask: query `i` (position `t − n + i`) sees keys `0..=t − n + i`, the others get 0. One
/// kernel (a thread a row), and one for the backward pass, where Burn's ops take a scaling, the
/// mask (three kernels to build it, one to apply it), a maximum, an exponential, a sum and a
/// division, and more backward. `None` where the kernel does not apply or `n > t`.
pub fn causal_softmax(scores: &Tensor<4>, scale: f32) -> Option<Tensor<4>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        let [_, _, n, t] = scores.dims();
        (n <= t)
            .then(|| ops::causal_softmax(scores, scale))
            .flatten()
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (scores, scale);
        None
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod kernel;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod ops;
