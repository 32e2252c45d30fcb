//! llama.cpp's block formats as quantizers: `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`, `IQ4_NL`,
//! and the K-quants `Q4_K`, `Q5_K`, `Q6_K` (see [`super::kquant`]).
//!
//! Each block is 32 consecutive values of a row with an `f16` scale `d` (and for `Q4_1`/`Q5_1`
//! an `f16` minimum `m`); a K-quant's group (32 or 16 values) has an effective scale `d·sc`.
//! The codes are computed from the `f32` scale before it is rounded to `f16`, then the value of
//! a code is taken with the rounded scale — as llama.cpp's reference quantizers
//! (`quantize_row_q4_0_ref`, ...) and gguf-py's `quants` do, operation for operation in `f32`,
//! so codes and bytes are identical (checked against gguf-py, `tests/ggml_quant.rs`).
//!
//! Codes are stored unsigned: `Q4_0` `q + 8`, `Q5_0` `q + 16`, `Q8_0` `q + 128`; `IQ4_NL`'s
//! code is its index into a fixed table of 16 non-uniform levels, its scale the best of 16
//! candidates under a weighted least-squares fit (`quantize_row_iq4_nl_impl` without an
//! importance matrix, checked against llama.cpp's quantizer itself).

use half::f16;

use super::ggml_format::{GGML_BLOCK, GgmlFormat, K_SUPER, round_f16};
use super::iq4nl::{IQ4_NL_LEVELS, iq4_nl_block, nearest_level};
use super::kquant;
use crate::QuantError;

impl GgmlFormat {
    /// The level of each code before scaling, when the levels are not `code − offset`
    /// (`IQ4_NL`).
    pub fn levels(self) -> Option<[f32; 16]> {
        (self == GgmlFormat::Iq4Nl).then(|| IQ4_NL_LEVELS.map(f32::from))
    }

    /// Quantizes a run of whole super-blocks (`x.len()` a multiple of
    /// [`GgmlFormat::super_block`], or for the formats without them any run of blocks) of
    /// finite values: codes, and one scale (and minimum) per [`GgmlFormat::block`].
    #[inline(always)]
    pub fn quantize_run(self, x: &[f32], codes: &mut [u8], scales: &mut [f32], mins: &mut [f32]) {
        if self.is_k() {
            let groups = K_SUPER / self.block();
            for (b, (xs, cs)) in x
                .chunks_exact(K_SUPER)
                .zip(codes.chunks_exact_mut(K_SUPER))
                .enumerate()
            {
                let g = b * groups..(b + 1) * groups;
                let m = mins.get_mut(g.clone()).unwrap_or(&mut []);
                kquant::quantize_super(self, xs, cs, &mut scales[g], m);
            }
            return;
        }
        for (b, (xb, cb)) in x
            .chunks(GGML_BLOCK)
            .zip(codes.chunks_mut(GGML_BLOCK))
            .enumerate()
        {
            let (d, m) = self.quantize_block(xb, cb);
            scales[b] = d;
            if let Some(slot) = mins.get_mut(b) {
                *slot = m;
            }
        }
    }

    /// Quantizes one block (at most 32 finite values) of a format without super-blocks into
    /// `codes`; returns `(d, m)`, both already rounded to `f16` (`m` is 0 without a minimum).
    #[inline(always)]
    fn quantize_block(self, x: &[f32], codes: &mut [u8]) -> (f32, f32) {
        let inverse = |d: f32| if d == 0.0 { 0.0 } else { 1.0 / d };
        match self {
            GgmlFormat::Q4_0 | GgmlFormat::Q5_0 => {
                // The first value of largest magnitude, with its sign (numpy's argmax).
                let mut max = x.first().copied().unwrap_or(0.0);
                for &v in x {
                    if v.abs() > max.abs() {
                        max = v;
                    }
                }
                let half = self.offset() as f32;
                let d = max / -half;
                let id = inverse(d);
                let top = self.top();
                for (c, &v) in codes.iter_mut().zip(x) {
                    *c = (v * id + (half + 0.5)).trunc().clamp(0.0, top) as u8;
                }
                (round_f16(d), 0.0)
            }
            GgmlFormat::Q4_1 | GgmlFormat::Q5_1 => {
                let first = x.first().copied().unwrap_or(0.0);
                let (min, max) = x.iter().fold((first, first), |(lo, hi), &v| {
                    (if v < lo { v } else { lo }, if v > hi { v } else { hi })
                });
                let top = self.top();
                let d = (max - min) / top;
                let id = inverse(d);
                for (c, &v) in codes.iter_mut().zip(x) {
                    *c = ((v - min) * id + 0.5).trunc().clamp(0.0, top) as u8;
                }
                (round_f16(d), round_f16(min))
            }
            GgmlFormat::Iq4Nl => iq4_nl_block(x, codes),
            GgmlFormat::Q4K | GgmlFormat::Q5K | GgmlFormat::Q6K => {
                unreachable!("quantize_run takes the K-quants a super-block at a time")
            }
            GgmlFormat::Q8_0 => {
                let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = inverse(d);
                for (c, &v) in codes.iter_mut().zip(x) {
                    // `round` is half away from zero, as gguf-py's `np_roundf`.
                    *c = ((v * id).round().clamp(-127.0, 127.0) as i32 + 128) as u8;
                }
                (round_f16(d), 0.0)
            }
        }
    }

    /// The value of stored code `c` in a block with scale `d` and minimum `m`.
    #[inline(always)]
    pub fn value(self, c: u8, d: f32, m: f32) -> f32 {
        if self == GgmlFormat::Iq4Nl {
            d * f32::from(IQ4_NL_LEVELS[usize::from(c & 15)])
        } else if self.has_min() {
            f32::from(c) * d + m
        } else {
            (i32::from(c) - self.offset()) as f32 * d
        }
    }

    /// The nearest code to `x` in a block whose `d` and `m` are fixed (values outside the
    /// block's range clamp to its end codes), with its value.
    pub fn code_fixed(self, x: f32, d: f32, m: f32) -> (u8, f32) {
        let off = self.offset() as f32;
        let c = if self == GgmlFormat::Iq4Nl {
            let v = if d == 0.0 || !d.is_finite() {
                0.0
            } else {
                x / d
            };
            nearest_level(v) as f32
        } else if d == 0.0 || !d.is_finite() {
            off
        } else if self.has_min() {
            ((x - m) / d).round_ties_even().clamp(0.0, self.top())
        } else {
            let lo = if self == GgmlFormat::Q8_0 {
                -127.0
            } else {
                -off
            };
            (x / d).round_ties_even().clamp(lo, self.top() - off) + off
        };
        let c = c as u8;
        (c, self.value(c, d, m))
    }

    /// The GGUF bytes of whole super-blocks: `codes` (a multiple of
    /// [`GgmlFormat::super_block`]), one scale per [`GgmlFormat::block`] and, for the formats
    /// with a minimum, one minimum per block.
    ///
    /// # Errors
    /// [`QuantError::Corrupt`] if the lengths disagree or the scales are not what the format
    /// stores (an `f16`; for a K-quant, an `f16` times small integers).
    pub fn encode(self, codes: &[u8], scales: &[f32], mins: &[f32]) -> Result<Vec<u8>, QuantError> {
        let want_mins = if self.has_min() { scales.len() } else { 0 };
        if codes.len() != self.block() * scales.len()
            || !codes.len().is_multiple_of(self.super_block())
            || mins.len() != want_mins
        {
            return Err(QuantError::Corrupt(format!(
                "{} codes, {} scales and {} minimums are not whole {} blocks",
                codes.len(),
                scales.len(),
                mins.len(),
                self.name()
            )));
        }
        if self.is_k() {
            return kquant::encode(self, codes, scales, mins);
        }
        let mut out = Vec::with_capacity(scales.len() * self.block_bytes());
        let half_bytes = |v: f32| {
            let h = f16::from_f32(v);
            if h.to_f32().to_bits() != v.to_bits() {
                return Err(QuantError::Corrupt(format!(
                    "{} scale {v} is not an f16",
                    self.name()
                )));
            }
            Ok(h.to_le_bytes())
        };
        for (b, c) in codes.chunks_exact(GGML_BLOCK).enumerate() {
            out.extend(half_bytes(scales[b])?);
            if self.has_min() {
                out.extend(half_bytes(mins[b])?);
            }
            match self.bits() {
                8 => out.extend(c.iter().map(|&q| q ^ 0x80)),
                bits => {
                    if bits == 5 {
                        let qh = (0..GGML_BLOCK).fold(0u32, |h, j| h | (u32::from(c[j] >> 4) << j));
                        out.extend(qh.to_le_bytes());
                    }
                    out.extend((0..16).map(|j| (c[j] & 0xF) | ((c[j + 16] & 0xF) << 4)));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in GgmlFormat::ALL {
            assert_eq!(GgmlFormat::from_name(f.name()), Some(f));
            assert_eq!(GgmlFormat::from_name(&f.name().to_uppercase()), Some(f));
        }
        assert_eq!(GgmlFormat::from_name("q3_k"), None);
    }

    /// One super-block of each format: codes, scales, minimums.
    fn quantize(f: GgmlFormat, x: &[f32]) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
        let blocks = x.len() / f.block();
        let mut codes = vec![0u8; x.len()];
        let mut scales = vec![0f32; blocks];
        let mut mins = vec![0f32; if f.has_min() { blocks } else { 0 }];
        f.quantize_run(x, &mut codes, &mut scales, &mut mins);
        (codes, scales, mins)
    }

    #[test]
    fn fixed_codes_reproduce_the_block_codes() {
        // With the scale fixed from the block, the nearest code is the block's own code for
        // every value that the block kernel put in range (up to f16 rounding of the scale).
        for f in GgmlFormat::ALL {
            let x: Vec<f32> = (0..f.super_block())
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.013)
                .collect();
            let (codes, scales, mins) = quantize(f, &x);
            for (i, (&v, &c)) in x.iter().zip(&codes).enumerate() {
                let (d, m) = (scales[i / f.block()], mins.get(i / f.block()).copied());
                let m = m.unwrap_or(0.0);
                let (cf, vf) = f.code_fixed(v, d, m);
                assert!(
                    (i32::from(cf) - i32::from(c)).abs() <= 1,
                    "{f:?}: {v} got {cf}, block code {c}"
                );
                // Q4_0 and Q5_0 reach one level less on the side opposite the block's max.
                let (lo, hi) = (f.value(0, d, m), f.value(f.top() as u8, d, m));
                let clamped = v.clamp(lo.min(hi), lo.max(hi));
                // Half the widest gap between neighbouring levels.
                let half_gap = if f == GgmlFormat::Iq4Nl { 12.0 } else { 0.5 };
                assert!(
                    (vf - clamped).abs() <= d.abs() * half_gap + 1e-6,
                    "{f:?}: {v} → {vf}"
                );
            }
        }
    }

    #[test]
    fn zero_block_encodes_zeros() {
        for f in GgmlFormat::ALL {
            let (codes, scales, mins) = quantize(f, &vec![0.0; f.super_block()]);
            assert!(scales.iter().chain(&mins).all(|&v| v == 0.0));
            for (i, &c) in codes.iter().enumerate() {
                let m = mins.get(i / f.block()).copied().unwrap_or(0.0);
                assert_eq!(f.value(c, scales[i / f.block()], m), 0.0);
            }
            let bytes = f.encode(&codes, &scales, &mins).unwrap();
            assert_eq!(bytes.len(), f.block_bytes());
            assert_eq!(bytes.len(), f.byte_len(f.super_block()));
        }
    }

    #[test]
    fn scales_that_are_not_the_format_are_refused() {
        for f in GgmlFormat::ALL {
            let x: Vec<f32> = (0..f.super_block()).map(|i| (i as f32).sin()).collect();
            let (codes, mut scales, mins) = quantize(f, &x);
            assert!(f.encode(&codes, &scales, &mins).is_ok(), "{f:?}");
            scales[0] *= 1.0 + 1e-6;
            assert!(f.encode(&codes, &scales, &mins).is_err(), "{f:?}");
            assert!(f.encode(&codes[1..], &scales, &mins).is_err(), "{f:?}");
        }
    }
}
