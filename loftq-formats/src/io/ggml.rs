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
    /// `Q5_0`: blocks of 32, `f16` scale, 5-bit codes offset by 16 (high bits in a `u32`).
    pub const Q5_0: Self = Self(6);
    /// `Q5_1`: blocks of 32, `f16` scale and minimum, 5-bit codes.
    pub const Q5_1: Self = Self(7);
    /// `Q8_0`: blocks of 32, `f16` scale, `i8` codes.
    pub const Q8_0: Self = Self(8);
    /// `Q2_K`: super-blocks of 256, 16 groups with 4-bit scales and minimums, 2-bit codes.
    pub const Q2_K: Self = Self(10);
    /// `Q3_K`: super-blocks of 256, 16 groups with 6-bit signed scales, 3-bit codes.
    pub const Q3_K: Self = Self(11);
    /// `Q4_K`: super-blocks of 256, 8 groups with 6-bit scales and minimums, 4-bit codes.
    pub const Q4_K: Self = Self(12);
    /// `Q5_K`: as `Q4_K` with 5-bit codes.
    pub const Q5_K: Self = Self(13);
    /// `Q6_K`: super-blocks of 256, 16 groups with `i8` scales, 6-bit codes offset by 32.
    pub const Q6_K: Self = Self(14);
    /// `IQ4_NL`: blocks of 32, `f16` scale, 4-bit indices into a fixed non-linear table.
    pub const IQ4_NL: Self = Self(20);
    /// `IQ4_XS`: super-blocks of 256, 8 groups with 6-bit signed scales, `IQ4_NL`'s table.
    pub const IQ4_XS: Self = Self(23);
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
            20 => (32, 18),
            23 => (256, 136),
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
        matches!(self.0, 0..=3 | 6..=8 | 10..=14 | 20 | 23 | 30)
    }
}

/// `IQ4_NL`'s (and `IQ4_XS`'s) values of the 16 codes.
const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// The `f16` at `b[at..at + 2]`, as `f32`.
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Code `e` of 32 packed two to a byte: the low nibbles are codes 0–15, the high 16–31.
fn nibble(qs: &[u8], e: usize) -> u8 {
    if e < 16 { qs[e] & 0xF } else { qs[e - 16] >> 4 }
}

/// Decodes `bytes` of type `ty` to `f32`, or `None` if the type is not supported or `bytes`
/// is not a whole number of blocks.
///
/// # Algorithm
/// As llama.cpp's reference `dequantize_row_*` and gguf-py's `dequantize`, operation for
/// operation in `f32` (so the values are the same bits): for example `Q4_0` `x = (q − 8)·d`,
/// `Q4_1` `x = q·d + m`, `Q4_K` `x = (d·sc)·q − dmin·m` per group of 32. Checked bit for bit
/// against gguf-py on every type (`tests/gguf.rs`).
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Option<Vec<f32>> {
    match ty {
        GgmlType::F32 => return floats_from_le(Dtype::F32, bytes),
        GgmlType::F16 => return floats_from_le(Dtype::F16, bytes),
        GgmlType::BF16 => return floats_from_le(Dtype::BF16, bytes),
        _ => {}
    }
    let (per, size) = ty.block_layout()?;
    if !ty.is_supported() || !bytes.len().is_multiple_of(size) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / size * per);
    for b in bytes.chunks_exact(size) {
        match ty {
            GgmlType::Q4_0 => {
                let d = f16_at(b, 0);
                out.extend((0..32).map(|e| d * f32::from(nibble(&b[2..], e) as i8 - 8)));
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                out.extend((0..32).map(|e| d * f32::from(nibble(&b[4..], e)) + m));
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let d = f16_at(b, 0);
                let at = if ty == GgmlType::Q5_0 { 2 } else { 4 };
                let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                let qs = &b[at + 4..at + 20];
                let code = |e: usize| nibble(qs, e) | ((((qh >> e) & 1) as u8) << 4);
                if ty == GgmlType::Q5_0 {
                    out.extend((0..32).map(|e| d * f32::from(code(e) as i8 - 16)));
                } else {
                    let m = f16_at(b, 2);
                    out.extend((0..32).map(|e| d * f32::from(code(e)) + m));
                }
            }
            GgmlType::Q8_0 => {
                let d = f16_at(b, 0);
                out.extend(b[2..].iter().map(|&c| f32::from(c as i8) * d));
            }
            GgmlType::Q2_K => q2_k(b, &mut out),
            GgmlType::Q3_K => q3_k(b, &mut out),
            GgmlType::Q4_K | GgmlType::Q5_K => q45_k(b, ty == GgmlType::Q5_K, &mut out),
            GgmlType::Q6_K => q6_k(b, &mut out),
            GgmlType::IQ4_NL => {
                let d = f16_at(b, 0);
                out.extend(
                    (0..32).map(|e| d * f32::from(IQ4_VALUES[usize::from(nibble(&b[2..], e))])),
                );
            }
            GgmlType::IQ4_XS => iq4_xs(b, &mut out),
            _ => return None,
        }
    }
    Some(out)
}

/// Element `e` (0..256) of a K-quant super-block whose 2-bit fields are packed four to a byte
/// in two halves of 128: byte `half·32 + e % 32`, shift `2·((e % 128) / 32)`.
fn crumb(q: &[u8], e: usize) -> u8 {
    (q[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3
}

/// `Q2_K` (84 bytes): `scales[16]` (scale low nibble, minimum high), `qs[64]`, `d`, `dmin`.
fn q2_k(b: &[u8], out: &mut Vec<f32>) {
    let (scales, qs) = (&b[..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for (g, &s) in scales.iter().enumerate() {
        let (dl, ml) = (d * f32::from(s & 0xF), dmin * f32::from(s >> 4));
        out.extend((g * 16..g * 16 + 16).map(|e| dl * f32::from(crumb(qs, e)) - ml));
    }
}

/// `Q3_K` (110 bytes): `hmask[32]`, `qs[64]`, 16 six-bit scales in 12 bytes, `d`.
fn q3_k(b: &[u8], out: &mut Vec<f32>) {
    let (hmask, qs, s) = (&b[..32], &b[32..96], &b[96..108]);
    let d = f16_at(b, 108);
    let scale = |g: usize| {
        let low = (s[g % 8] >> (4 * (g / 8))) & 0xF;
        let high = (s[8 + g % 4] >> (2 * (g / 4))) & 3;
        f32::from((low | (high << 4)) as i8 - 32)
    };
    for g in 0..16 {
        let dl = d * scale(g);
        out.extend((g * 16..g * 16 + 16).map(|e| {
            let high = (hmask[e % 32] >> (e / 32)) & 1;
            // The code is offset by 4 when its high bit is clear.
            let q = crumb(qs, e) as i8 - (((high ^ 1) << 2) as i8);
            dl * f32::from(q)
        }));
    }
}

/// The eight 6-bit scales and minimums of `Q4_K` and `Q5_K`, packed in 12 bytes.
fn scale_min_k4(s: &[u8], g: usize) -> (u8, u8) {
    if g < 4 {
        (s[g] & 63, s[g + 4] & 63)
    } else {
        (
            (s[g + 4] & 0xF) | ((s[g - 4] >> 2) & 0x30),
            (s[g + 4] >> 4) | ((s[g] >> 2) & 0x30),
        )
    }
}

/// `Q4_K` (144 bytes: `d`, `dmin`, scales, `qs[128]`) and `Q5_K` (176: the same with
/// `qh[32]` before `qs`).
fn q45_k(b: &[u8], five: bool, out: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let s = &b[4..16];
    let (qh, qs) = if five {
        (&b[16..48], &b[48..176])
    } else {
        (&b[..0], &b[16..144])
    };
    for g in 0..8 {
        let (sc, m) = scale_min_k4(s, g);
        let (dl, ml) = (d * f32::from(sc), dmin * f32::from(m));
        out.extend((0..32).map(|l| {
            let low = (qs[(g / 2) * 32 + l] >> (4 * (g % 2))) & 0xF;
            let high = if five { ((qh[l] >> g) & 1) << 4 } else { 0 };
            dl * f32::from(low | high) - ml
        }));
    }
}

/// `Q6_K` (210 bytes): `ql[128]`, `qh[64]`, `scales[16]` (`i8`), `d`.
fn q6_k(b: &[u8], out: &mut Vec<f32>) {
    let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for (g, &sc) in scales.iter().enumerate() {
        let dl = d * f32::from(sc as i8);
        out.extend((g * 16..g * 16 + 16).map(|e| {
            let (half, r) = (e / 128, e % 128);
            let low = (ql[half * 64 + r % 64] >> (4 * (r / 64))) & 0xF;
            let q = (low | (crumb(qh, e) << 4)) as i8 - 32;
            dl * f32::from(q)
        }));
    }
}

/// `IQ4_XS` (136 bytes): `d`, high scale bits (`u16`), low scale nibbles `[4]`, `qs[128]`.
fn iq4_xs(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let high = u16::from_le_bytes([b[2], b[3]]);
    let (low, qs) = (&b[4..8], &b[8..136]);
    for j in 0..8 {
        let s = ((low[j / 2] >> (4 * (j % 2))) & 0xF) | ((((high >> (2 * j)) & 3) as u8) << 4);
        let dl = d * f32::from(s as i8 - 32);
        let group = &qs[j * 16..j * 16 + 16];
        out.extend((0..32).map(|l| dl * f32::from(IQ4_VALUES[usize::from(nibble(group, l))])));
    }
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
        assert!(dequantize(GgmlType(15), &[0; 292]).is_none());
        assert!(dequantize(GgmlType::Q4_K, &[0; 143]).is_none());
        assert_eq!(GgmlType(12).name(), "Q4_K");
    }
}
