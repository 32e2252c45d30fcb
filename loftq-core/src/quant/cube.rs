//! Codebook quantization and dequantization in one CubeCL kernel each (WGPU, CUDA).
//!
//! Burn's ops take four kernels per dequantization (shift, mask, codebook gather, scale),
//! each a pass over a tensor as large as the weight, and the shifted codes are 4 bytes each;
//! a training step dequantizes every packed weight once forward and once backward. Quantizing
//! a codebook scheme such as NF4 takes more: an absolute value, a maximum per block, a zero
//! test and a division, three kernels per threshold (15 for NF4), a gather and a product,
//! about fifty passes in each LoftQ iteration. These kernels read each value once and write
//! each result once, with the portable path's arithmetic (`x / absmax` or `x · (1/absmax)`,
//! the count of thresholds at or below, `levels[code] · absmax`), so codes and values are the
//! same bit for bit.
//!
//! Each function exists in every build and returns `None` where its kernel does not apply
//! (no CubeCL back end compiled in, tensors of another back end or dtype, or Burn's fusion on
//! with `tuned`, whose tensors are fusion tensors): the caller then takes the portable path,
//! which fusion already merges.

use burn::tensor::{Int, Tensor};

use super::Rounding;

/// Codes packed `⌊32/bits⌋` to an `i32` word, low bits first, one scale per `block` values.
#[derive(Clone, Copy, Debug)]
pub struct PackedWords<'a> {
    /// The words, on the device.
    pub words: &'a Tensor<1, Int>,
    /// Bits per code, 1 to 8.
    pub bits: u8,
    /// Values per scale.
    pub block: usize,
}

/// A weight packed as codebook codes on a device: `levels[code] · scales[block]`.
#[derive(Clone, Copy, Debug)]
pub struct Codebook<'a> {
    /// The codes.
    pub words: PackedWords<'a>,
    /// The codebook.
    pub levels: &'a Tensor<1>,
    /// One scale per block.
    pub scales: &'a Tensor<1>,
    /// `[out, in]`.
    pub shape: [usize; 2],
}

/// The `[out, in]` values `levels[code] · scales[block]` of `weight`, in one kernel; `None`
/// where the kernel does not apply (see the module documentation).
pub fn dequantize_codebook(weight: &Codebook) -> Option<Tensor<2>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        kernel::CodebookWeight::new(weight)?.values()
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = weight;
        None
    }
}

/// Codebook quantization of `x` in blocks of `block` consecutive values (row-major; the last
/// block may be shorter): the codes (`#{k : v ≥ thresholds[k]}`, `v` the value over its
/// block's absolute maximum, divided as `rounding` says), the blocks' absolute maxima, and
/// the dequantized values `levels[code] · absmax` (or, given `minus`, `minus − values`:
/// LoftQ's residual `W − Q` in the same pass), in one kernel (a thread a block); `None` where
/// the kernel does not apply (see the module documentation) or `minus` is not shaped as `x`.
pub fn quantize_codebook(
    x: &Tensor<2>,
    thresholds: &[f32],
    levels: &[f32],
    block: usize,
    rounding: Rounding,
    minus: Option<&Tensor<2>>,
) -> Option<(Tensor<1, Int>, Tensor<1>, Tensor<2>)> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        kernel::quantize(x, thresholds, levels, block, rounding, minus)
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (x, thresholds, levels, block, rounding, minus);
        None
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) use kernel::CodebookWeight;

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod kernel {
    use burn::tensor::{DType, Int, Shape, Tensor as BurnTensor};
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;
    use burn_cubecl::tensor::CubeTensor;

    use super::{Codebook, Rounding};
    use crate::cube::{empty, grid, plain, to_tensor};

    /// Value `i`: its code from its word, then `levels[code] · scales[block]`.
    #[cube]
    fn codebook_value(
        words: &Tensor<i32>,
        levels: &Tensor<f32>,
        scales: &Tensor<f32>,
        i: usize,
        #[comptime] bits: usize,
        #[comptime] block: usize,
    ) -> f32 {
        let per = comptime!(32 / bits);
        let mask = comptime!(((1u32 << bits) - 1) as i32);
        let shift = i32::cast_from((i % per) * bits);
        let code = (words[i / per] >> shift) & mask;
        levels[usize::cast_from(code)] * scales[i / block]
    }

    /// One thread per value; with `add`, the value plus `s` times what is already in `out`.
    #[cube(launch)]
    fn dequantize_codebook_kernel(
        words: &Tensor<i32>,
        levels: &Tensor<f32>,
        scales: &Tensor<f32>,
        out: &mut Tensor<f32>,
        s: f32,
        #[comptime] bits: usize,
        #[comptime] block: usize,
        #[comptime] add: bool,
    ) {
        let i = ABSOLUTE_POS;
        if i >= out.len() {
            terminate!();
        }
        let value = codebook_value(words, levels, scales, i, bits, block);
        if comptime!(add) {
            out[i] = value + s * out[i];
        } else {
            out[i] = value;
        }
    }

    /// One thread per value of `W + s·B·A` (`a: [r, cols]`, `b: [rows, r]`, row-major), the
    /// product's `r` terms summed by the thread.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn dequantize_lora_kernel(
        words: &Tensor<i32>,
        levels: &Tensor<f32>,
        scales: &Tensor<f32>,
        a: &Tensor<f32>,
        b: &Tensor<f32>,
        out: &mut Tensor<f32>,
        s: f32,
        cols: usize,
        rank: usize,
        count: usize,
        at: usize,
        #[comptime] bits: usize,
        #[comptime] block: usize,
    ) {
        let i = ABSOLUTE_POS;
        if i >= count {
            terminate!();
        }
        let (row, col) = (i / cols, i % cols);
        let mut sum = 0.0f32;
        for k in 0..rank {
            sum += b[row * rank + k] * a[k * cols + col];
        }
        out[at + i] = codebook_value(words, levels, scales, i, bits, block) + s * sum;
    }

    /// A packed codebook weight's device buffers, checked for the kernel: `i32` words, `f32`
    /// levels and scales of the unfused CubeCL back end.
    pub(crate) struct CodebookWeight {
        words: CubeTensor,
        levels: CubeTensor,
        scales: CubeTensor,
        bits: u8,
        block: usize,
        shape: [usize; 2],
    }

    impl CodebookWeight {
        /// `None` for tensors of another back end or dtype, or bits outside 1 to 8.
        pub(crate) fn new(weight: &Codebook) -> Option<Self> {
            let (bits, block, shape) = (weight.words.bits, weight.words.block, weight.shape);
            let words = plain(weight.words.words)?;
            let (levels, scales) = (plain(weight.levels)?, plain(weight.scales)?);
            let types = [words.dtype, levels.dtype, scales.dtype];
            let ok = types == [DType::I32, DType::F32, DType::F32]
                && (1..=8).contains(&bits)
                && block > 0;
            ok.then_some(Self {
                words,
                levels,
                scales,
                bits,
                block,
                shape,
            })
        }

        /// The values, a fresh tensor.
        pub(crate) fn values(&self) -> Option<BurnTensor<2>> {
            to_tensor(self.launch(None))
        }

        /// The values plus `s·t` (`t` shaped as the weight), written over `t`'s buffer when
        /// nothing else holds it.
        pub(crate) fn plus(&self, t: CubeTensor, s: f32) -> CubeTensor {
            self.launch(Some((t, s)))
        }

        /// The values plus `s·B·A` for LoRA factors `a: [r, in]` and `b: [out, r]`, each
        /// thread summing its value's `r` products: one kernel, for products small enough
        /// that a launch costs more than their arithmetic
        /// ([`AdapterProduct`](crate::fused::AdapterProduct)).
        pub(crate) fn plus_lora(&self, a: &CubeTensor, b: &CubeTensor, s: f32) -> CubeTensor {
            let out = empty(&self.words, Shape::new(self.shape), DType::F32);
            self.plus_lora_into(a, b, s, &out, 0);
            out
        }

        /// [`plus_lora`](Self::plus_lora) written into `out` (contiguous) from value `at` on:
        /// several layers' merged weights stacked in one tensor.
        pub(crate) fn plus_lora_into(
            &self,
            a: &CubeTensor,
            b: &CubeTensor,
            s: f32,
            out: &CubeTensor,
            at: usize,
        ) {
            let (a, b) = (
                burn_cubecl::kernel::into_contiguous(a.clone()),
                burn_cubecl::kernel::into_contiguous(b.clone()),
            );
            let ([rows, cols], rank) = (self.shape, b.meta.shape()[1]);
            let (cube_count, cube_dim) = grid(&self.words, rows * cols);
            dequantize_lora_kernel::launch(
                &out.client,
                cube_count,
                cube_dim,
                self.words.clone().into_tensor_arg(),
                self.levels.clone().into_tensor_arg(),
                self.scales.clone().into_tensor_arg(),
                a.into_tensor_arg(),
                b.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                s,
                cols,
                rank,
                rows * cols,
                at,
                usize::from(self.bits),
                self.block,
            );
        }

        /// The weight's shape `[out, in]`.
        pub(crate) fn shape(&self) -> [usize; 2] {
            self.shape
        }

        fn launch(&self, plus: Option<(CubeTensor, f32)>) -> CubeTensor {
            let (out, s, add) = match plus {
                None => (
                    empty(&self.words, Shape::new(self.shape), DType::F32),
                    0.0,
                    false,
                ),
                Some((t, s)) => {
                    let t = burn_cubecl::kernel::into_contiguous(t);
                    let t = if t.can_mut() { t } else { t.copy() };
                    (t, s, true)
                }
            };
            let (cube_count, cube_dim) = grid(&self.words, self.shape[0] * self.shape[1]);
            dequantize_codebook_kernel::launch(
                &out.client,
                cube_count,
                cube_dim,
                self.words.clone().into_tensor_arg(),
                self.levels.clone().into_tensor_arg(),
                self.scales.clone().into_tensor_arg(),
                out.clone().into_tensor_arg(),
                s,
                usize::from(self.bits),
                self.block,
                add,
            );
            out
        }
    }

    /// One thread per block of `block` values (the last may be shorter): the block's
    /// absolute maximum `m`, then for each value `v = x / m` (`x · (1/m)` with `bnb`; a zero
    /// `m` counts as 1), its code `#{k : v ≥ thresholds[k]}` and `levels[code] · m`, or
    /// `w − levels[code] · m` with `residual`.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn quantize_codebook_kernel(
        x: &Tensor<f32>,
        w: &Tensor<f32>,
        thresholds: &Tensor<f32>,
        levels: &Tensor<f32>,
        codes: &mut Tensor<i32>,
        scales: &mut Tensor<f32>,
        values: &mut Tensor<f32>,
        block: usize,
        #[comptime] bnb: bool,
        #[comptime] residual: bool,
    ) {
        let b = ABSOLUTE_POS;
        if b >= scales.len() {
            terminate!();
        }
        let start = b * block;
        let end = usize::min(start + block, x.len());
        let mut m = 0.0f32;
        for i in start..end {
            m = f32::max(m, f32::abs(x[i]));
        }
        scales[b] = m;
        // A zero maximum only comes with zero values: dividing by 1 gives them code(0).
        let safe = select(m == 0.0f32, 1.0f32, m);
        let inv = 1.0f32 / safe;
        for i in start..end {
            let v = if comptime!(bnb) {
                x[i] * inv
            } else {
                x[i] / safe
            };
            let mut code = 0;
            for k in 0..thresholds.len() {
                if v >= thresholds[k] {
                    code += 1;
                }
            }
            codes[i] = i32::cast_from(code);
            if comptime!(residual) {
                values[i] = w[i] - levels[code] * m;
            } else {
                values[i] = levels[code] * m;
            }
        }
    }

    /// [`quantize_codebook`](super::quantize_codebook) on the unfused CubeCL back end's
    /// `f32` tensors; `None` on any other.
    pub(super) fn quantize(
        x: &BurnTensor<2>,
        thresholds: &[f32],
        levels: &[f32],
        block: usize,
        rounding: Rounding,
        minus: Option<&BurnTensor<2>>,
    ) -> Option<(BurnTensor<1, Int>, BurnTensor<1>, BurnTensor<2>)> {
        let shape = x.dims();
        let n = shape[0] * shape[1];
        let xs = plain(x)?;
        let w = match minus {
            Some(w) if w.dims() == shape => Some(plain(w)?),
            Some(_) => return None,
            None => None,
        };
        let types_ok = xs.dtype == DType::F32 && w.as_ref().is_none_or(|w| w.dtype == DType::F32);
        if !types_ok || block == 0 || levels.len() != thresholds.len() + 1 {
            return None;
        }
        let device = x.device();
        let table = |v: &[f32]| plain(&crate::transfers::upload(v.to_vec(), [v.len()], &device));
        let (thresholds, levels) = (table(thresholds)?, table(levels)?);
        let xs = burn_cubecl::kernel::into_contiguous(xs);
        let blocks = n.div_ceil(block);
        let codes = empty(&xs, Shape::new([n]), DType::I32);
        let scales = empty(&xs, Shape::new([blocks]), DType::F32);
        let values = empty(&xs, Shape::new(shape), DType::F32);
        let residual = w.is_some();
        // Without a `w`, its slot is bound to `x` (read-only, never read there).
        let w = match w {
            Some(w) => burn_cubecl::kernel::into_contiguous(w),
            None => xs.clone(),
        };
        let (cube_count, cube_dim) = grid(&xs, blocks);
        quantize_codebook_kernel::launch(
            &xs.client,
            cube_count,
            cube_dim,
            xs.clone().into_tensor_arg(),
            w.into_tensor_arg(),
            thresholds.into_tensor_arg(),
            levels.into_tensor_arg(),
            codes.clone().into_tensor_arg(),
            scales.clone().into_tensor_arg(),
            values.clone().into_tensor_arg(),
            block,
            rounding == Rounding::Bnb,
            residual,
        );
        Some((to_tensor(codes)?, to_tensor(scales)?, to_tensor(values)?))
    }
}
