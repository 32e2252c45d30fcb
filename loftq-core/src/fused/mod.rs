//! The GPU training step's own CubeCL kernels (WGPU, CUDA), each recorded on the autodiff
//! device as one operation with a backward pass of its own:
//! - element-wise stretches as one kernel each way: the MLP's `silu(gate)·up`, RMSNorm with a
//!   frozen weight, the rotary embedding, the causal softmax;
//! - causal attention as a whole (rotation and head moves in one kernel per tensor, or one
//!   for the stacked queries, keys and values; the products, the softmax), 7 kernels forward
//!   and 9 backward where Burn's ops take 31 (5 and 7 over the stacked projections);
//! - a LoRA linear layer, whose backward pass gives the factors' gradients in their own
//!   layout, and layers of one input as one product (their factors' gradients from the
//!   factors stacked);
//! - the loss's negative log-likelihood of one target per row of logits;
//! - and, outside autodiff, the optimizer's concatenation of many vectors, eight to a kernel,
//!   LoftQ's fit step (the next input and the squares of the fit error) and AdamW's update.
//!
//! In Burn's ops `silu(gate)·up` is eight kernels forward (its `sigmoid` alone is six:
//! negate, exp, add one, log, negate, exp) and fifteen backward, RMSNorm six forward and more
//! backward, each a pass over the activations; a GPU's training step is bound by such
//! launches. The element-wise formulas are the CPU host kernels'.
//!
//! Each function exists in every build and returns `None` where it does not apply (no CubeCL
//! back end compiled in, tensors of another back end, Burn's fusion on with `tuned`, inputs
//! that are not `f32`, a weight or table that needs a gradient): the caller then takes Burn's
//! ops.

use burn::tensor::Tensor;

/// `silu(gate)·up` element by element, `silu(x) = x / (1 + e^{-x})`, in one kernel (and one
/// for the backward pass); `None` where the kernel does not apply (see the module
/// documentation) or the shapes differ.
pub fn silu_mul<const D: usize>(gate: &Tensor<D>, up: &Tensor<D>) -> Option<Tensor<D>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        (gate.dims() == up.dims())
            .then(|| silu::silu_mul(gate, up))
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
        tables_fit([cos, swapped_sin], s, width)
            .then(|| ops::rotary(x, cos, swapped_sin))
            .flatten()
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

/// Causal attention of the projected queries `q` `[b, s, heads·w]` over the keys and values
/// `k`, `v` `[b, s, kv_heads·w]` (grouped queries when `kv_heads < heads`), the rotary
/// embedding of [`rotary`] (tables `[s, d]`, `d ≤ w` even) applied to `q` and `k`, each
/// position seeing itself and every earlier one: `[b, s, heads·w]`, the heads side by side, as
/// the output projection takes them. One recorded operation of 7 kernels (and 9 backward)
/// where Burn's ops take 31; `None` where it does not apply or the shapes do not fit.
pub fn causal_attention(
    [q, k, v]: [&Tensor<3>; 3],
    cos: &Tensor<2>,
    swapped_sin: &Tensor<2>,
    [heads, kv_heads]: [usize; 2],
) -> Option<Tensor<3>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        let [b, s, width] = q.dims();
        let w = width / heads.max(1);
        let fits = heads_fit([heads, kv_heads])
            && width == heads * w
            && k.dims() == [b, s, kv_heads * w]
            && v.dims() == k.dims()
            && tables_fit([cos, swapped_sin], s, w);
        fits.then(|| attention::causal_attention([q, k, v], cos, swapped_sin, [heads, kv_heads]))
            .flatten()
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (q, k, v, cos, swapped_sin, heads, kv_heads);
        None
    }
}

/// `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` for `x [rows, in]`, a frozen `w [out, in]` and the adapter's factors
/// `a [r, in]`, `b [out, r]`, recorded as one operation whose backward pass gives each
/// factor's gradient in its own layout (Burn's gives `A`'s and `B`'s as transposed views,
/// which the optimizer then copies). With `merge`, as `x·(W + s·B·A)ᵀ`: two kernels fewer
/// each way, for `out·r·in` multiply-adds where the factored adapter costs `rows·r·(in + out)`,
/// and the merged weight kept for the backward pass (worth it when `W` is dequantized for the
/// step anyway). `None` where it does not apply (see the module documentation; `w` must need
/// no gradient) or the shapes do not fit.
pub fn lora_linear(
    x: &Tensor<2>,
    w: &Tensor<2>,
    [a, b]: [&Tensor<2>; 2],
    scaling: f32,
    merge: bool,
) -> Option<Tensor<2>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        adapter_fits(x, w.dims(), [a, b])
            .then(|| lora::lora_linear([x, a, b], w, scaling, merge))
            .flatten()
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (x, w, a, b, scaling, merge);
        None
    }
}

/// How [`lora_linear_codebook`] forms the adapter's product in the merged weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterProduct {
    /// Each value's `r` terms of `B·A` summed by the dequantization kernel's thread: one
    /// kernel in all, but none of a matrix product's reuse of loaded values.
    Inline,
    /// `B·A` as a matrix product, which the dequantization kernel adds: two kernels.
    Product,
}

impl AdapterProduct {
    /// The most multiply-adds (`out·in·r`) formed [`Inline`](Self::Inline): SmolLM2's
    /// layers at rank 64 (56.6 million for its `1536 × 576` MLP), not a 1B model's MLP at
    /// rank 16 (268 million), where a launch is small beside the product.
    pub const INLINE_MAX: usize = 1 << 26;

    /// The most multiply-adds of an inline `B·A` worth forming where the factored adapter
    /// would cost far less arithmetic (few rows, as in decoding) just to save its launches:
    /// about what three launches cost on a GPU (16.8 million, ~30 µs at 1 TFLOP/s). SmolLM2's
    /// layers at rank 16 (14.2 million for its MLP), not at rank 64. Below
    /// [`INLINE_MAX`](Self::INLINE_MAX): such a product is always formed inline.
    pub const FEW_ROWS_MAX: usize = 1 << 24;

    /// [`Inline`](Self::Inline) for an `[out, in]` weight and rank `r` whose product takes at
    /// most [`INLINE_MAX`](Self::INLINE_MAX) multiply-adds, [`Product`](Self::Product) above.
    pub fn for_shape([out, inp]: [usize; 2], r: usize) -> Self {
        match out.saturating_mul(inp).saturating_mul(r) <= Self::INLINE_MAX {
            true => Self::Inline,
            false => Self::Product,
        }
    }
}

/// [`lora_linear`]'s merged form over a frozen base packed as codebook codes:
/// `x·(W + s·B·A)ᵀ`, the dequantization and the sum `W + s·B·A` in one kernel where
/// dequantizing first takes a kernel for `W`, one for the sum and one for a scale other than
/// one, and `B·A` either summed in that kernel or a product of its own (`how`; see
/// [`AdapterProduct::for_shape`]). `None` where it does not apply (see the module
/// documentation and [`dequantize_codebook`](crate::quant::cube::dequantize_codebook)) or the
/// shapes do not fit.
pub fn lora_linear_codebook(
    x: &Tensor<2>,
    base: &crate::quant::cube::Codebook,
    [a, b]: [&Tensor<2>; 2],
    scaling: f32,
    how: AdapterProduct,
) -> Option<Tensor<2>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        let w = crate::quant::cube::CodebookWeight::new(base)?;
        adapter_fits(x, base.shape, [a, b])
            .then(|| lora::lora_linear_codebook([x, a, b], w, scaling, how))
            .flatten()
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (x, base, a, b, scaling, how);
        None
    }
}

/// One layer of [`lora_linear_codebook_group`]: its packed base, its factors `[A, B]` and its
/// LoRA scaling.
pub type GroupMember<'a> = (
    &'a crate::quant::cube::Codebook<'a>,
    [&'a Tensor<2>; 2],
    f32,
);

/// [`lora_linear_codebook`] for two or three layers of one input `x` (a decoder layer's
/// query, key and value projections, or its gate and up projections), each merged with its
/// `B·A` summed inline ([`AdapterProduct::Inline`]): `[rows, Σ out]`, the layers' outputs side
/// by side in `members`' order, as one layer with their rows stacked would give. Their merged
/// weights are written into one stacked tensor, so the group takes one product forward and
/// one for `x`'s gradient where each layer took its own (and their gradients for `x` need no
/// sum): for q/k/v, 6 kernels fewer per step and layer, for gate/up 3. Where the layers share
/// a rank `r` and `(N−1)·r` is at most an eighth of `x`'s width, the factors' gradients come
/// from the factors stacked: 6 more fewer for q/k/v, 2 for gate/up. `None` where it does
/// not apply (as for [`lora_linear_codebook`]), a product is too large to form inline, or for
/// another number of layers.
pub fn lora_linear_codebook_group(x: &Tensor<2>, members: &[GroupMember]) -> Option<Tensor<2>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        let mut weights = Vec::with_capacity(members.len());
        for (base, [a, b], s) in members {
            let w = crate::quant::cube::CodebookWeight::new(base)?;
            let inline =
                AdapterProduct::for_shape(base.shape, a.dims()[0]) == AdapterProduct::Inline;
            if !(adapter_fits(x, base.shape, [a, b]) && inline) {
                return None;
            }
            weights.push((w, *s));
        }
        match members {
            [(_, [a0, b0], _), (_, [a1, b1], _)] => lora::lora_group([x, a0, b0, a1, b1], weights),
            [(_, [a0, b0], _), (_, [a1, b1], _), (_, [a2, b2], _)] => {
                lora::lora_group([x, a0, b0, a1, b1, a2, b2], weights)
            }
            _ => None,
        }
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (x, members);
        None
    }
}

/// [`silu_mul`] of the gate's and the up projection's values side by side in `gate_up`
/// `[.., 2·inter]` (as [`lora_linear_codebook_group`] or Phi-3's `gate_up_proj` gives them):
/// `[.., inter]`, with no copies to split them and one gradient in `gate_up`'s layout.
/// `None` where the kernel does not apply or the last dimension is odd.
pub fn silu_mul_packed<const D: usize>(gate_up: &Tensor<D>) -> Option<Tensor<D>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        gate_up.dims()[D - 1]
            .is_multiple_of(2)
            .then(|| silu::silu_mul_packed(gate_up))
            .flatten()
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = gate_up;
        None
    }
}

/// [`causal_attention`] of the queries, keys and values side by side in `qkv`
/// `[b, s, (heads + 2·kv_heads)·w]` (as [`lora_linear_codebook_group`] or Phi-3's `qkv_proj`
/// gives them): read where they are, no copies to split them, and one gradient in `qkv`'s
/// layout. `None` where it does not apply or the shapes do not fit.
pub fn causal_attention_packed(
    qkv: &Tensor<3>,
    cos: &Tensor<2>,
    swapped_sin: &Tensor<2>,
    [heads, kv_heads]: [usize; 2],
) -> Option<Tensor<3>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        let [_, s, row] = qkv.dims();
        let parts = heads + 2 * kv_heads;
        let w = row / parts.max(1);
        let fits = heads_fit([heads, kv_heads])
            && row == parts * w
            && tables_fit([cos, swapped_sin], s, w);
        fits.then(|| attention::causal_attention_packed(qkv, cos, swapped_sin, [heads, kv_heads]))
            .flatten()
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (qkv, cos, swapped_sin, heads, kv_heads);
        None
    }
}

/// LoftQ's fit step for `p = B·A`: the next quantization's input `w − p` and the squares
/// `(residual − c·p)²` whose sum is the fit error, in one kernel where Burn's ops take three
/// (two differences and a square; four with a `c` other than 1). `None` where the kernel
/// does not apply (see the module documentation) or the shapes differ.
pub fn fit_step<const D: usize>(
    residual: &Tensor<D>,
    p: &Tensor<D>,
    w: &Tensor<D>,
    c: f32,
) -> Option<(Tensor<D>, Tensor<D>)> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        ops::fit_step(residual, p, w, c)
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (residual, p, w, c);
        None
    }
}

/// AdamW's update of flattened parameters `p`, moments `m`, `v` and gradients `g` in one
/// kernel, where Burn's ops take thirteen: returns the new `[m, v, p]`. The scalars are
/// `[β₁, 1 − β₁, β₂, 1 − β₂, 1 − lr·wd, 1 − β₂ᵗ, ε, lr / (1 − β₁ᵗ)]` (each rounded once to
/// `f32`, as Burn's scalar ops round theirs), and the arithmetic is the tensor ops' in their
/// order: `m = β₁·m + (1 − β₁)·g`, `v = β₂·v + (1 − β₂)·g²`,
/// `p = p·(1 − lr·wd) − m / (√(v / (1 − β₂ᵗ)) + ε) · lr / (1 − β₁ᵗ)`. `None` where the kernel
/// does not apply (see the module documentation) or the lengths differ.
pub fn adamw(
    g: &Tensor<1>,
    m: &Tensor<1>,
    v: &Tensor<1>,
    p: &Tensor<1>,
    scalars: [f32; 8],
) -> Option<[Tensor<1>; 3]> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        ops::adamw([g, m, v, p], scalars)
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (g, m, v, p, scalars);
        None
    }
}

/// The negative log-likelihood of `targets` (one token id per row) under the softmax of each
/// row of `logits` `[rows, vocab]`: `[rows, 1]`, `logsumexp(row) − row[target]`, in one kernel
/// (a cube of threads per row) and one backward, where Burn's `log_softmax` and `gather`
/// take 21 kernels, most of them passes over all the logits. `None` where the kernel does not
/// apply (see the module documentation), for a target id outside the vocabulary, a
/// vocabulary of 2²⁴ tokens or more (the ids go to the device as `f32`), or 2¹⁶ rows or more
/// (a launch's cubes along one axis).
pub fn nll_rows(logits: &Tensor<2>, targets: &[u32]) -> Option<Tensor<2>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        let [rows, vocab] = logits.dims();
        let fits = (1..1 << 16).contains(&rows) && (1..1 << 24).contains(&vocab);
        if targets.len() != rows || !fits || targets.iter().any(|&t| t as usize >= vocab) {
            return None;
        }
        crate::cube::values(logits)?;
        let ids = targets.iter().map(|&t| t as f32).collect();
        let ids = crate::transfers::upload(ids, [rows, 1], &logits.device());
        nll::nll_rows(logits, &ids)
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (logits, targets);
        None
    }
}

/// [`concat()`] of `parts`, or Burn's `cat` where it does not apply.
pub fn cat(parts: Vec<Tensor<1>>) -> Tensor<1> {
    concat(&parts).unwrap_or_else(|| Tensor::cat(parts, 0))
}

/// The vectors `parts` end to end, eight to a kernel where Burn's `cat` launches one per part: the optimizer flattens hundreds of LoRA
/// gradients each step. `None` where it does not apply (see the module documentation).
pub fn concat(parts: &[Tensor<1>]) -> Option<Tensor<1>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        ops::concat(parts)
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = parts;
        None
    }
}

/// Whether rotary tables `[s, d]` (cos, swapped sin) fit `s` positions of heads `width` wide:
/// `d ≤ width`, even.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn tables_fit([cos, swapped_sin]: [&Tensor<2>; 2], s: usize, width: usize) -> bool {
    let [ts, d] = cos.dims();
    ts == s && swapped_sin.dims() == [ts, d] && d <= width && d.is_multiple_of(2)
}

/// Whether `heads` query heads group evenly over `kv_heads` key/value heads.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn heads_fit([heads, kv_heads]: [usize; 2]) -> bool {
    heads > 0 && kv_heads > 0 && heads.is_multiple_of(kv_heads)
}

/// Whether factors `a [r, in]` and `b [out, r]` fit a weight `[out, in]` and the input `x`.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn adapter_fits(x: &Tensor<2>, [out, inp]: [usize; 2], [a, b]: [&Tensor<2>; 2]) -> bool {
    let ([_, n], [r, ai], [bo, br]) = (x.dims(), a.dims(), b.dims());
    n == inp && ai == inp && bo == out && br == r
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod attention;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod heads;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod kernel;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod lora;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod nll;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod ops;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod silu;
