//! ggml tensor types: sizes, and dequantization of the ones this crate reads.

use half::f16;
use safetensors::Dtype;

use super::floats_from_le;

/// A ggml tensor type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlType(pub u32);

impl GgmlType {
    /// `F32`.
    pub const F32: Self = Self(0);
    /// `F16`.
    pub const F16: Self = Self(1);
    /// `Q4_0`: blocks of 32, `f16` scale, 4-bit codes offset by 8.
    pub const Q4_0: Self = Self(2);
    /// `Q4_1`: blocks of 32, `f16` scale and minimum, 4-bit codes.
    pub const Q4_1: Self = Self(3);
    /// `Q8_0`: blocks of 32, `f16` scale, `i8` codes.
    pub const Q8_0: Self = Self(8);
    /// `BF16`.
    pub const BF16: Self = Self(30);

    /// Name as llama.cpp spells it.
    pub fn name(self) -> String {
        let known = [
            "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
            "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",
            "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M",
            "BF16",
        ];
        known
            .get(self.0 as usize)
            .map_or_else(|| format!("type {}", self.0), |s| (*s).to_string())
    }

    /// `(elements per block, bytes per block)`, or `None` for a type whose layout this crate
    /// does not know.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        Some(match self.0 {
            0 => (1, 4),
            1 | 30 => (1, 2),
            2 => (32, 18),
            3 => (32, 20),
            6 => (32, 22),
            7 => (32, 24),
            8 => (32, 34),
            9 => (32, 36),
            10 => (256, 84),
            11 => (256, 110),
            12 => (256, 144),
            13 => (256, 176),
            14 => (256, 210),
            15 => (256, 292),
            24 => (1, 1),
            25 => (1, 2),
            26 => (1, 4),
            27 | 28 => (1, 8),
            _ => return None,
        })
    }

    /// Bytes of `numel` elements, or `None` if the layout is unknown or `numel` is not a
    /// whole number of blocks.
    pub fn byte_len(self, numel: usize) -> Option<usize> {
        let (per, bytes) = self.block_layout()?;
        numel
            .is_multiple_of(per)
            .then(|| (numel / per).checked_mul(bytes))?
    }

    /// True if [`dequantize`] reads this type.
    pub fn is_supported(self) -> bool {
        matches!(self.0, 0 | 1 | 2 | 3 | 8 | 30)
    }
}

/// Decodes `bytes` of type `ty` to `f32`, or `None` if the type is not supported.
///
/// # Algorithm
/// As llama.cpp's reference `dequantize_row_*`: `Q4_0` `x = (q − 8)·d`, `Q4_1` `x = q·d + m`,
/// `Q8_0` `x = q·d`, the low nibbles giving the first 16 values of a block and the high
/// nibbles the last 16.
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Option<Vec<f32>> {
    let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    let mut out = Vec::new();
    match ty {
        GgmlType::F32 => return floats_from_le(Dtype::F32, bytes),
        GgmlType::F16 => return floats_from_le(Dtype::F16, bytes),
        GgmlType::BF16 => return floats_from_le(Dtype::BF16, bytes),
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let (stride, qs) = if ty == GgmlType::Q4_0 {
                (18, 2)
            } else {
                (20, 4)
            };
            out.reserve(bytes.len() / stride * 32);
            for b in bytes.chunks_exact(stride) {
                let d = h(&b[0..2]);
                let (m, off) = if ty == GgmlType::Q4_0 {
                    (0.0, 8)
                } else {
                    (h(&b[2..4]), 0)
                };
                let q = &b[qs..qs + 16];
                let val = |c: u8| (i32::from(c) - off) as f32 * d + m;
                out.extend(q.iter().map(|&c| val(c & 0xF)));
                out.extend(q.iter().map(|&c| val(c >> 4)));
            }
        }
        GgmlType::Q8_0 => {
            out.reserve(bytes.len() / 34 * 32);
            for b in bytes.chunks_exact(34) {
                let d = h(&b[0..2]);
                out.extend(b[2..].iter().map(|&c| f32::from(c as i8) * d));
            }
        }
        _ => return None,
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_formats_decode_as_llama_cpp() {
        // Q4_0: d = 0.5, codes j and 15 − j.
        let mut b = f16::from_f32(0.5).to_le_bytes().to_vec();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let v = dequantize(GgmlType::Q4_0, &b).unwrap();
        assert_eq!(v[0], -4.0);
        assert_eq!(v[15], 3.5);
        assert_eq!(v[16], 3.5);
        assert_eq!(v[31], -4.0);
        // Q4_1: d = 2, m = −1.
        let mut b = f16::from_f32(2.0).to_le_bytes().to_vec();
        b.extend(f16::from_f32(-1.0).to_le_bytes());
        b.extend((0..16u8).map(|j| j | (1 << 4)));
        let v = dequantize(GgmlType::Q4_1, &b).unwrap();
        assert_eq!(v[3], 5.0);
        assert_eq!(v[20], 1.0);
        // Q8_0: d = 0.25, codes −128..
        let mut b = f16::from_f32(0.25).to_le_bytes().to_vec();
        b.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let v = dequantize(GgmlType::Q8_0, &b).unwrap();
        assert_eq!(v[0], -4.0);
        assert_eq!(v[31], 3.75);
        assert_eq!(GgmlType::Q4_1.byte_len(64), Some(40));
        assert_eq!(GgmlType::Q4_1.byte_len(33), None);
        assert!(dequantize(GgmlType(12), &[0; 144]).is_none());
        assert_eq!(GgmlType(12).name(), "Q4_K");
    }
}
