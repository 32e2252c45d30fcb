//! Dequantization of packed codebook weights in one CubeCL kernel (WGPU, CUDA).
//!
//! Burn's ops take four kernels per dequantization (shift, mask, codebook gather, scale),
//! each a pass over a tensor as large as the weight, and the shifted codes are 4 bytes each;
//! a training step dequantizes every packed weight once forward and once backward. This kernel
//! reads each word and scale once and writes each value once: `levels[code] · scale`, the
//! same single `f32` product as the host and the portable paths, so the values are the same
//! bit for bit.
//!
//! [`dequantize_codebook`] exists in every build and returns `None` where the kernel does not
//! apply (no CubeCL back end compiled in, tensors of another back end, or Burn's fusion on with
//! `tuned`, whose tensors are fusion tensors): the caller then takes the portable path, which
//! fusion already merges.

use burn::tensor::{Int, Tensor};

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

/// The `[out, in]` values `levels[code] · scales[block]` of `words`, in one kernel; `None`
/// where the kernel does not apply (see the module documentation).
pub fn dequantize_codebook(
    words: &PackedWords,
    levels: &Tensor<1>,
    scales: &Tensor<1>,
    shape: [usize; 2],
) -> Option<Tensor<2>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        kernel::dequantize(words, levels, scales, shape)
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (words, levels, scales, shape);
        None
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod kernel {
    use std::any::Any;

    use burn::backend::Cube;
    use burn::tensor::{DType, Shape, Tensor as BurnTensor};
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;
    use burn_cubecl::cubecl::{CubeDim, calculate_cube_count_elemwise};
    use burn_cubecl::ops::numeric::empty_device_dtype;
    use burn_cubecl::tensor::CubeTensor;

    use super::PackedWords;

    /// One thread per value: its code from its word, then `levels[code] · scales[block]`.
    #[cube(launch)]
    fn dequantize_codebook_kernel(
        words: &Tensor<i32>,
        levels: &Tensor<f32>,
        scales: &Tensor<f32>,
        out: &mut Tensor<f32>,
        #[comptime] bits: usize,
        #[comptime] block: usize,
    ) {
        let i = ABSOLUTE_POS;
        if i >= out.len() {
            terminate!();
        }
        let per = comptime!(32 / bits);
        let mask = comptime!(((1u32 << bits) - 1) as i32);
        let shift = i32::cast_from((i % per) * bits);
        let code = (words[i / per] >> shift) & mask;
        out[i] = levels[usize::cast_from(code)] * scales[i / block];
    }

    /// [`dequantize_codebook`](super::dequantize_codebook) on the unfused CubeCL back end's
    /// tensors (`i32` words, `f32` levels and scales); `None` on any other.
    pub(super) fn dequantize(
        packed: &PackedWords,
        levels: &BurnTensor<1>,
        scales: &BurnTensor<1>,
        shape: [usize; 2],
    ) -> Option<BurnTensor<2>> {
        let (bits, block) = (packed.bits, packed.block);
        let words = cube(packed.words.clone().try_into_primitive::<Cube>().ok()?)?;
        let levels = cube(levels.clone().try_into_primitive::<Cube>().ok()?)?;
        let scales = cube(scales.clone().try_into_primitive::<Cube>().ok()?)?;
        let types = [words.dtype, levels.dtype, scales.dtype];
        if types != [DType::I32, DType::F32, DType::F32] || !(1..=8).contains(&bits) || block == 0 {
            return None;
        }
        let n = shape[0] * shape[1];
        let out = empty_device_dtype(
            words.client.clone(),
            words.device.clone(),
            Shape::new(shape),
            DType::F32,
        );
        let cube_dim = CubeDim::new(&words.client, n);
        let cube_count = calculate_cube_count_elemwise(&words.client, n, cube_dim);
        dequantize_codebook_kernel::launch(
            &out.client,
            cube_count,
            cube_dim,
            words.into_tensor_arg(),
            levels.into_tensor_arg(),
            scales.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            usize::from(bits),
            block,
        );
        let out: Box<dyn Any> = Box::new(out);
        Some(BurnTensor::from_primitive::<Cube>(*out.downcast().ok()?))
    }

    /// `p` as a [`CubeTensor`] when Burn's `Cube` back end is the unfused one.
    fn cube<P: Any>(p: P) -> Option<CubeTensor> {
        let p: Box<dyn Any> = Box::new(p);
        p.downcast::<CubeTensor>().ok().map(|t| *t)
    }
}
