//! Bit packing of codes into bytes.
//!
//! Codes are written as one big-endian bit stream: element 0 takes the most significant bits of
//! byte 0. At 4 bits this is bitsandbytes' layout (`byte = q[2j] << 4 | q[2j+1]`); at 2 and 3
//! bits it is the same rule, dense, with 3-bit codes straddling byte boundaries; at 8 bits a
//! plain copy. A final partial byte is padded with zero bits. Codes read from a device travel
//! packed too, into `i32` words ([`device_words`]).

use burn::tensor::{Int, Tensor, TensorData};

/// `codes` (each below `2^bits`, `bits ≤ 8`) packed on their device into `i32` words of
/// `⌊31/bits⌋` codes (bit 31 stays clear, so no product or sum overflows), to be read as they
/// are and unpacked by [`unpack_words`]: a read of an eighth of the codes at 4 bits.
pub(crate) fn device_words(codes: &Tensor<1, Int>, bits: u8) -> Tensor<1, Int> {
    let n = codes.dims()[0];
    let bits = u32::from(bits.clamp(1, 8));
    let per = (31 / bits) as usize;
    let words = n.div_ceil(per);
    let device = codes.device();
    let mut flat = codes.clone();
    if words * per > n {
        flat = Tensor::cat(vec![flat, Tensor::zeros([words * per - n], &device)], 0);
    }
    let weights: Vec<i32> = (0..per as u32).map(|j| 1 << (j * bits)).collect();
    crate::transfers::count_upload(per);
    let weights = Tensor::<2, Int>::from_data(TensorData::new(weights, [1, per]), &device);
    (flat.reshape([words, per]) * weights)
        .sum_dim(1)
        .reshape([words])
}

/// The first `n` codes of the words [`device_words`] packed, `bits` each.
pub(crate) fn unpack_words(words: &[i32], bits: u8, n: usize) -> Vec<u8> {
    let bits = u32::from(bits.clamp(1, 8));
    let per = 31 / bits;
    let mask = (1u32 << bits) - 1;
    let mut out = Vec::with_capacity(words.len() * per as usize);
    for &w in words {
        let w = w as u32;
        out.extend((0..per).map(|j| ((w >> (j * bits)) & mask) as u8));
    }
    out.truncate(n);
    out
}

/// Bytes needed for `n` codes of `bits` bits.
pub fn packed_len(n: usize, bits: u8) -> usize {
    (n * bits as usize).div_ceil(8)
}

/// Packs `codes` (each `< 2^bits`) into a byte stream.
///
/// # Panics
/// If `bits` is not in `1..=8` (bits above the width of a code are ignored, not checked).
pub fn pack_codes(codes: &[u8], bits: u8) -> Vec<u8> {
    assert!((1..=8).contains(&bits), "codes have 1 to 8 bits");
    match bits {
        8 => codes.to_vec(),
        // Fixed-width chunks for the common widths, so the loop vectorises.
        4 => codes
            .chunks(2)
            .map(|c| (c[0] & 15) << 4 | c.get(1).map_or(0, |q| q & 15))
            .collect(),
        2 | 1 => {
            let per = (8 / bits) as usize;
            let mask = (1u8 << bits) - 1;
            codes
                .chunks(per)
                .map(|c| {
                    c.iter().enumerate().fold(0u8, |byte, (i, &q)| {
                        byte | ((q & mask) << (8 - bits as usize * (i + 1)))
                    })
                })
                .collect()
        }
        _ => {
            let mut out = vec![0u8; packed_len(codes.len(), bits)];
            let mask = (1u16 << bits) - 1;
            for (i, &q) in codes.iter().enumerate() {
                let bit = i * bits as usize;
                // Place the code in a 16-bit window starting at its first byte.
                let shifted = (u16::from(q) & mask) << (16 - bits as usize - bit % 8);
                out[bit / 8] |= (shifted >> 8) as u8;
                if let Some(next) = out.get_mut(bit / 8 + 1) {
                    *next |= shifted as u8;
                }
            }
            out
        }
    }
}

/// Unpacks `n` codes of `bits` bits; `None` if `data` is too short.
///
/// # Panics
/// If `bits` is not in `1..=8`.
pub fn unpack_codes(data: &[u8], bits: u8, n: usize) -> Option<Vec<u8>> {
    let mut out = vec![0u8; n];
    unpack_codes_into(data, bits, &mut out).then_some(out)
}

/// [`unpack_codes`] into `out` (`out.len()` codes); false, with `out` untouched, if `data` is
/// too short.
///
/// # Panics
/// If `bits` is not in `1..=8`.
pub fn unpack_codes_into(data: &[u8], bits: u8, out: &mut [u8]) -> bool {
    assert!((1..=8).contains(&bits), "codes have 1 to 8 bits");
    let n = out.len();
    if data.len() < packed_len(n, bits) {
        return false;
    }
    match bits {
        8 => out.copy_from_slice(&data[..n]),
        4 => unpack_whole_bytes::<4>(data, out),
        2 => unpack_whole_bytes::<2>(data, out),
        1 => unpack_whole_bytes::<1>(data, out),
        _ => {
            let mask = (1u16 << bits) - 1;
            for (i, q) in out.iter_mut().enumerate() {
                let bit = i * bits as usize;
                let hi = u16::from(data[bit / 8]) << 8;
                let lo = data.get(bit / 8 + 1).map_or(0, |&b| u16::from(b));
                *q = (((hi | lo) >> (16 - bits as usize - bit % 8)) & mask) as u8;
            }
        }
    }
    true
}

/// Codes of `BITS` dividing 8: whole bytes in fixed-width chunks (constant shifts, so the loop
/// vectorises), then the partial byte.
fn unpack_whole_bytes<const BITS: usize>(data: &[u8], out: &mut [u8]) {
    let per = 8 / BITS;
    let mask = (1u8 << BITS) - 1;
    let n = out.len();
    // The codes of byte `b`, first code in the high bits.
    let byte = |b: u8, codes: &mut [u8]| {
        for (i, q) in codes.iter_mut().enumerate() {
            *q = (b >> (8 - BITS * (i + 1))) & mask;
        }
    };
    let mut chunks = out.chunks_exact_mut(per);
    for (c, &b) in (&mut chunks).zip(data) {
        byte(b, c);
    }
    if let Some(&b) = data.get(n / per) {
        byte(b, chunks.into_remainder());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn four_bit_matches_bitsandbytes_layout() {
        assert_eq!(pack_codes(&[0x1, 0xF, 0x7], 4), vec![0x1F, 0x70]);
    }

    #[test]
    fn two_and_three_bit_layouts() {
        assert_eq!(pack_codes(&[3, 0, 1, 2], 2), vec![0b11_00_01_10]);
        // 101 011 11|1 000 000 0
        assert_eq!(
            pack_codes(&[5, 3, 7, 0, 0], 3),
            vec![0b1010_1111, 0b1000_0000]
        );
    }

    proptest! {
        #[test]
        fn round_trip(bits in 1u8..=8, codes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let codes: Vec<u8> = codes.iter().map(|c| c & ((1u16 << bits) - 1) as u8).collect();
            let packed = pack_codes(&codes, bits);
            prop_assert_eq!(packed.len(), packed_len(codes.len(), bits));
            prop_assert_eq!(unpack_codes(&packed, bits, codes.len()).unwrap(), codes);
        }
    }

    #[test]
    fn short_data_is_rejected() {
        assert!(unpack_codes(&[0u8; 2], 3, 6).is_none());
    }
}
