//! `IQ4_NL`: 32 values to a block, each code an index into 16 fixed non-uniform levels, the
//! block's `f16` scale the best of 16 candidates under a weighted least-squares fit.

use super::ggml_format::round_f16;
use super::kquant::GROUP_MAX_EPS;

/// `IQ4_NL`'s levels (llama.cpp's `kvalues_iq4nl`).
pub(super) const IQ4_NL_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// The index of the level nearest `x` (the lower one on ties between two), as llama.cpp's
/// `best_index_int8`.
pub(super) fn nearest_level(x: f32) -> usize {
    let v = |i: usize| f32::from(IQ4_NL_LEVELS[i]);
    if x <= v(0) {
        return 0;
    }
    if x >= v(15) {
        return 15;
    }
    let (mut lo, mut hi) = (0, 15);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if x < v(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    if x - v(hi - 1) < v(hi) - x {
        hi - 1
    } else {
        hi
    }
}

/// `IQ4_NL` on one block: the scale with the least `x²`-weighted squared error among the
/// absmax scale's refit and 15 candidates around it, then the codes for that scale; returns
/// `(d, 0)`. The same `f32` operations in the same order as llama.cpp's
/// `quantize_row_iq4_nl_impl` with no importance matrix and 7 tries each way.
pub(super) fn iq4_nl_block(x: &[f32], codes: &mut [u8]) -> (f32, f32) {
    const NTRY: i32 = 7;
    let level = |l: usize| f32::from(IQ4_NL_LEVELS[l]);
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let mut d = 0f32;
    if amax >= GROUP_MAX_EPS {
        // The weighted fit for the codes `id·x` gives; returns (Σ w·q·x, Σ w·q²).
        let fit = |id: f32| {
            x.iter().fold((0f32, 0f32), |(sqx, sq2), &v| {
                let q = level(nearest_level(id * v));
                let w = v * v;
                (sqx + w * q * v, sq2 + w * q * q)
            })
        };
        let (sumqx, sumq2) = fit(1.0 / (-max / level(0)));
        d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
        let mut best = d * sumqx;
        for itry in -NTRY..=NTRY {
            let (sumqx, sumq2) = fit((itry + i32::from(IQ4_NL_LEVELS[0])) as f32 / max);
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                d = sumqx / sumq2;
                best = d * sumqx;
            }
        }
    }
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = nearest_level(id * v) as u8;
    }
    (round_f16(d), 0.0)
}
