//! Codebooks: the sorted `f32` levels in `[-1, 1]` that a normalised weight is rounded to, and
//! the decision thresholds that make the rounding a few comparisons instead of a search.

use super::normal::{normal_ppf, torch_linspace_f32};
use super::{Rounding, Scheme};

/// The NormalFloat offset of QLoRA (bitsandbytes and PEFT): the outermost quantile used.
pub const NF_OFFSET: f32 = 0.967_708_3;

/// A sorted table of `2^bits` levels in `[-1, 1]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Codebook {
    levels: Vec<f32>,
}

impl Codebook {
    /// The codebook of `scheme`, if it rounds to one (NF and uniform codebooks; integers and
    /// llama.cpp's formats compute their levels).
    ///
    /// # Panics
    /// If the scheme's bit width is not in `1..=8` (a validated [`QuantConfig`](crate::QuantConfig)'s
    /// is).
    pub fn of(scheme: Scheme) -> Option<Self> {
        match scheme {
            Scheme::Nf { bits } => Some(Self::normal_float(bits)),
            Scheme::UniformCodebook { bits } => Some(Self::uniform(bits)),
            Scheme::IntSym { .. } | Scheme::IntAsym { .. } | Scheme::Ggml { .. } => None,
        }
    }

    /// The NormalFloat codebook with `2^bits` levels (NF2, NF3, NF4, NF8, ...).
    ///
    /// # Algorithm
    /// The reference construction (PEFT's `create_normal_map`, asymmetric): with `n = 2^bits`,
    /// `n/2` positive quantiles `Φ⁻¹(linspace(offset, 0.5, n/2 + 1)[..n/2])`, `n/2 − 1` negative
    /// ones `−Φ⁻¹(linspace(offset, 0.5, n/2)[..n/2 − 1])` and `0`; the `f64` quantiles are
    /// rounded to `f32`, sorted and divided by the largest in `f32`. NF4 equals bitsandbytes'
    /// table and all of them equal PEFT's, bit for bit.
    ///
    /// # Panics
    /// If `bits` is not in `1..=8`.
    pub fn normal_float(bits: u8) -> Self {
        assert!((1..=8).contains(&bits), "NF codebooks have 1 to 8 bits");
        let n = 1usize << bits;
        let pos = torch_linspace_f32(NF_OFFSET, 0.5, n / 2 + 1);
        let neg = if n >= 4 {
            torch_linspace_f32(NF_OFFSET, 0.5, n / 2)
        } else {
            vec![]
        };
        let mut v: Vec<f32> = pos[..n / 2]
            .iter()
            .map(|&p| normal_ppf(p as f64) as f32)
            .chain(std::iter::once(0.0))
            .chain(
                neg[..(n / 2).saturating_sub(1)]
                    .iter()
                    .map(|&p| -(normal_ppf(p as f64) as f32)),
            )
            .collect();
        v.sort_by(f32::total_cmp);
        let max = *v.last().expect("at least two levels");
        v.iter_mut().for_each(|x| *x /= max);
        Self { levels: v }
    }

    /// PEFT's uniform codebook: `torch.linspace(-1, 1, 2^bits)` (no exact zero).
    ///
    /// # Panics
    /// If `bits` is not in `1..=8`.
    pub fn uniform(bits: u8) -> Self {
        assert!(
            (1..=8).contains(&bits),
            "uniform codebooks have 1 to 8 bits"
        );
        Self {
            levels: torch_linspace_f32(-1.0, 1.0, 1 << bits),
        }
    }

    /// Builds a codebook from explicit levels.
    ///
    /// # Panics
    /// If there are fewer than two levels, more than 256, or they are not strictly increasing
    /// finite values.
    pub fn from_levels(levels: Vec<f32>) -> Self {
        assert!(
            (2..=256).contains(&levels.len()),
            "a codebook has 2 to 256 levels"
        );
        assert!(
            levels.iter().all(|x| x.is_finite()) && levels.windows(2).all(|w| w[0] < w[1]),
            "codebook levels must be finite and strictly increasing"
        );
        Self { levels }
    }

    /// The levels, sorted ascending.
    pub fn levels(&self) -> &[f32] {
        &self.levels
    }

    /// Number of levels.
    pub fn len(&self) -> usize {
        self.levels.len()
    }

    /// Always false: a codebook has at least two levels.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Decision thresholds: `code(v) = #{k : v ≥ t[k]}` for a normalised value `v ∈ [-1, 1]`.
    ///
    /// # Algorithm
    /// - [`Rounding::Peft`]: PEFT takes `argmin_k fl(|v − level_k|)` with the first index on
    ///   ties. Between two neighbours that predicate flips once, so `t[k]` is the smallest `f32`
    ///   for which the upper neighbour is strictly closer in `f32` arithmetic, found by bisection
    ///   over the `f32` values between the two levels. This reproduces the reference exactly
    ///   without its `numel × levels` distance tensor.
    /// - [`Rounding::Bnb`]: bitsandbytes compares with the midpoints (`v > mid` goes up); the
    ///   midpoint is computed in `f64` and rounded to `f32` as its kernel's literals are, and
    ///   `t[k]` is the next `f32` above it.
    pub fn thresholds(&self, rounding: Rounding) -> Vec<f32> {
        self.levels
            .windows(2)
            .map(|w| match rounding {
                Rounding::Peft => peft_threshold(w[0], w[1]),
                Rounding::Bnb => next_up((((w[0] as f64) + (w[1] as f64)) / 2.0) as f32),
            })
            .collect()
    }
}

/// Smallest `f32` `v` in `(lo, hi]` with `fl(|v − hi|) < fl(|v − lo|)`.
fn peft_threshold(lo: f32, hi: f32) -> f32 {
    let up = |v: f32| (v - hi).abs() < (v - lo).abs();
    // Bisection over the ordered integer keys of the f32 values in [lo, hi].
    let (mut a, mut b) = (ordered_key(lo), ordered_key(hi));
    debug_assert!(!up(lo) && up(hi));
    while b - a > 1 {
        let m = a + (b - a) / 2;
        if up(from_ordered_key(m)) {
            b = m;
        } else {
            a = m;
        }
    }
    from_ordered_key(b)
}

/// Maps an `f32` to an integer that orders like the float (−0.0 and 0.0 collapse).
fn ordered_key(x: f32) -> i64 {
    let bits = x.to_bits() as i32;
    if bits < 0 {
        -((bits & 0x7fff_ffff) as i64)
    } else {
        bits as i64
    }
}

fn from_ordered_key(k: i64) -> f32 {
    if k < 0 {
        f32::from_bits(((-k) as u32) | 0x8000_0000)
    } else {
        f32::from_bits(k as u32)
    }
}

/// The next representable `f32` towards `+∞`.
fn next_up(x: f32) -> f32 {
    from_ordered_key(ordered_key(x) + 1)
}

#[cfg(test)]
// The tables are written with the digits their sources print, to compare bit for bit.
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;

    /// bitsandbytes' NF4 table (`get_4bit_type("nf4")`), as printed in its source.
    const BNB_NF4: [f32; 16] = [
        -1.0,
        -0.696_192_800_998_687_7,
        -0.525_073_051_452_636_7,
        -0.394_917_488_098_144_53,
        -0.284_441_381_692_886_35,
        -0.184_773_430_228_233_34,
        -0.091_050_036_251_544_95,
        0.0,
        0.079_580_299_556_255_34,
        0.160_930_201_411_247_25,
        0.246_112_301_945_686_34,
        0.337_915_241_718_292_24,
        0.440_709_829_330_444_34,
        0.562_617_003_917_694_1,
        0.722_956_836_223_602_3,
        1.0,
    ];

    #[test]
    fn nf4_equals_bitsandbytes_bit_for_bit() {
        let nf4 = Codebook::normal_float(4);
        for (a, b) in nf4.levels().iter().zip(BNB_NF4) {
            assert_eq!(a.to_bits(), b.to_bits(), "{a} vs {b}");
        }
    }

    #[test]
    fn nf2_is_subset_of_nf4() {
        let nf2 = Codebook::normal_float(2);
        assert_eq!(nf2.levels(), &[-1.0, 0.0, BNB_NF4[11], 1.0]);
    }

    #[test]
    fn thresholds_split_neighbours() {
        for bits in [2, 3, 4, 8] {
            let cb = Codebook::normal_float(bits);
            for rounding in [Rounding::Peft, Rounding::Bnb] {
                let t = cb.thresholds(rounding);
                for (k, w) in cb.levels().windows(2).enumerate() {
                    assert!(w[0] < t[k] && t[k] <= w[1]);
                    // Just below the threshold rounds down, at it rounds up.
                    let below = from_ordered_key(ordered_key(t[k]) - 1);
                    let closer_up = |v: f32| (v - w[1]).abs() < (v - w[0]).abs();
                    if rounding == Rounding::Peft {
                        assert!(closer_up(t[k]) && !closer_up(below));
                    }
                }
            }
        }
    }

    #[test]
    fn bnb_nf4_midpoint_literal() {
        // bitsandbytes' kernel: `if (x > 0.03979014977812767f)` decides between codes 7 and 8.
        let t = Codebook::normal_float(4).thresholds(Rounding::Bnb);
        assert_eq!(t[7], next_up(0.039_790_149_778_127_67_f32));
    }

    #[test]
    fn ordered_key_round_trips() {
        for x in [-1.0f32, -1e-30, 0.0, 1e-30, 0.5, 1.0] {
            assert_eq!(from_ordered_key(ordered_key(x)), x);
        }
        assert!(ordered_key(-0.5) < ordered_key(-0.25));
        assert!(ordered_key(-1e-30) < ordered_key(0.0));
    }
}
