//! Explicit AVX-512 code path for codebooks of up to 16 levels (NF2/NF3/NF4): a branch-free
//! binary search where each step looks its threshold up with one in-register permute, instead
//! of comparing against every threshold.
//!
//! Same arithmetic as the portable kernel (true division or multiply by the reciprocal, then
//! `code = #{k : v ≥ t[k]}`), so the codes are identical; tests compare them.

#![allow(unsafe_code)]

use super::Rounding;

/// The sorted thresholds of a codebook of `bits ≤ 4` bits, padded with `+∞` to 16.
#[derive(Debug, Clone, Copy)]
pub(super) struct Table16 {
    thresholds: [f32; 16],
    bits: u8,
}

impl Table16 {
    /// `search` (the padded thresholds of a `bits`-bit codebook) if it fits in 16 lanes.
    pub(super) fn new(search: &[f32], bits: u8) -> Option<Self> {
        (!search.is_empty() && search.len() < 16).then(|| {
            let mut thresholds = [f32::INFINITY; 16];
            thresholds[..search.len()].copy_from_slice(search);
            Self { thresholds, bits }
        })
    }

    /// Codes of `x` normalised by `scale`. Returns false (and does nothing) when the CPU
    /// lacks AVX-512, so the caller falls back to the portable loop.
    #[inline]
    pub(super) fn codes(&self, x: &[f32], scale: f32, rounding: Rounding, out: &mut [u8]) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::simd::level() == crate::simd::Level::Avx512 {
                // SAFETY: `level` found AVX-512F (and more), the only feature the method needs.
                unsafe { self.codes_avx512(x, scale, rounding, out) };
                return true;
            }
        }
        let _ = (x, scale, rounding, out);
        false
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn codes_avx512(&self, x: &[f32], scale: f32, rounding: Rounding, codes: &mut [u8]) {
        use std::arch::x86_64::*;
        let (table, bits) = (&self.thresholds, self.bits);
        debug_assert_eq!(x.len(), codes.len());
        let inv = 1.0 / scale;
        // SAFETY: loads and stores stay inside `x`, `codes` and `table` (16 lanes each, the loop
        // stops before a partial chunk); the intrinsics need only AVX-512F.
        unsafe {
            let t = _mm512_loadu_ps(table.as_ptr());
            let s = _mm512_set1_ps(scale);
            let r = _mm512_set1_ps(inv);
            let mut chunks = x.chunks_exact(16).zip(codes.chunks_exact_mut(16));
            for (xc, cc) in &mut chunks {
                let v = _mm512_loadu_ps(xc.as_ptr());
                let v = match rounding {
                    Rounding::Peft => _mm512_div_ps(v, s),
                    Rounding::Bnb => _mm512_mul_ps(v, r),
                };
                let mut c = _mm512_setzero_si512();
                let mut step = 1i32 << (bits - 1);
                while step > 0 {
                    let idx = _mm512_or_si512(c, _mm512_set1_epi32(step - 1));
                    let th = _mm512_permutexvar_ps(idx, t);
                    let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, th);
                    c = _mm512_mask_or_epi32(c, up, c, _mm512_set1_epi32(step));
                    step >>= 1;
                }
                _mm512_mask_cvtepi32_storeu_epi8(cc.as_mut_ptr().cast(), 0xFFFF, c);
            }
        }
        let done = x.len() / 16 * 16;
        for (c, &xi) in codes[done..].iter_mut().zip(&x[done..]) {
            let v = match rounding {
                Rounding::Peft => xi / scale,
                Rounding::Bnb => xi * inv,
            };
            *c = table
                .iter()
                .fold(0u8, |n, &tk| n.wrapping_add(u8::from(v >= tk)));
        }
    }
}

/// Bit pattern of the largest `|x|`: for non-negative floats the integer order is the float
/// order, and NaN/±inf compare above every finite value.
#[inline]
pub(super) fn absmax_bits(x: &[f32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::level() == crate::simd::Level::Avx512 {
            // SAFETY: `level` found AVX-512F (and more), the only feature the function needs.
            return unsafe { absmax_bits_avx512(x) };
        }
    }
    absmax_bits_scalar(x)
}

fn absmax_bits_scalar(x: &[f32]) -> u32 {
    x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn absmax_bits_avx512(x: &[f32]) -> u32 {
    use std::arch::x86_64::*;
    let chunks = x.chunks_exact(16);
    let tail = absmax_bits_scalar(chunks.remainder());
    // SAFETY: each load reads one full chunk of 16 values.
    let m = unsafe {
        let abs = _mm512_set1_epi32(0x7fff_ffff);
        let mut acc = _mm512_setzero_si512();
        for c in chunks {
            let v = _mm512_loadu_si512(c.as_ptr().cast());
            acc = _mm512_max_epu32(acc, _mm512_and_si512(v, abs));
        }
        _mm512_reduce_max_epu32(acc)
    };
    m.max(tail)
}

/// `out[i] = levels[codes[i]] · scale` for codebooks of at most 16 levels (`levels` padded to
/// 16). Returns false when the CPU lacks AVX-512.
#[inline]
pub(super) fn dequant16(codes: &[u8], levels: &[f32; 16], scale: f32, out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::level() == crate::simd::Level::Avx512 {
            // SAFETY: `level` found AVX-512F (and more), the only feature the function needs.
            unsafe { dequant16_avx512(codes, levels, scale, out) };
            return true;
        }
    }
    let _ = (codes, levels, scale, out);
    false
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn dequant16_avx512(codes: &[u8], levels: &[f32; 16], scale: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    debug_assert_eq!(codes.len(), out.len());
    // SAFETY: each iteration reads 16 codes and writes 16 values of full chunks.
    unsafe {
        let table = _mm512_loadu_ps(levels.as_ptr());
        let s = _mm512_set1_ps(scale);
        for (c, o) in codes.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
            let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(c.as_ptr().cast()));
            let v = _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), s);
            _mm512_storeu_ps(o.as_mut_ptr(), v);
        }
    }
    let done = codes.len() / 16 * 16;
    for (o, &c) in out[done..].iter_mut().zip(&codes[done..]) {
        *o = levels[usize::from(c) & 15] * scale;
    }
}
