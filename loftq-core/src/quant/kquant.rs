//! llama.cpp's K-quants `Q4_K`, `Q5_K`, `Q6_K`: super-blocks of 256 values of a row, cut into
//! groups (32 values for `Q4_K`/`Q5_K`, 16 for `Q6_K`) whose scales are themselves quantized
//! against one `f16` scale per super-block.
//!
//! A group's *effective* scale is what llama.cpp multiplies a code by: `d·sc` (`f16` `d`, 6-bit
//! or `i8` `sc`), and for `Q4_K`/`Q5_K` its minimum `dmin·m`. Those are what this crate keeps
//! per group (the minimum negated, so a value is `q·scale + min` as for `Q4_1`); they are exact
//! in `f32`, and the super-block's `d`, `dmin` and the small integers come back from them when
//! the bytes are written (the largest `sc` and `m` of a super-block are always 63, and `Q6_K`'s
//! largest `|sc|` is 128). The one case that does not come back: a super-block whose `f16`
//! scale underflows to zero (all its groups' scales below ~2·10⁻⁶) still has non-zero 6-bit
//! scales in llama.cpp's bytes, which multiply that zero; they are written as zeros here, so the
//! values are the same but those bytes are not.
//!
//! The arithmetic follows llama.cpp's reference quantizers without an importance matrix
//! (`quantize_row_q4_K_ref`, `…q5_K_ref`, `…q6_K_ref`), operation for operation in `f32`:
//! the groups' affine fits (a search over 21 or 16 trial scales of a weighted least-squares
//! fit with a minimum clamped to zero) or `Q6_K`'s symmetric fit (19 trial scales, `x²`-weighted),
//! then the codes again from the quantized group scales.

use half::f16;

use super::ggml_format::{GgmlFormat, K_SUPER, round_f16};
use crate::QuantError;

/// Round half to even by adding 1.5·2²³ and reading the low mantissa bits: llama.cpp's
/// `nearest_int`, bit for bit (beyond ±2²² it wraps as llama.cpp's does), and one addition
/// where `round_ties_even` is a library call on baseline x86-64.
#[inline(always)]
fn nearest(v: f32) -> i32 {
    ((v + 12_582_912.0).to_bits() & 0x007F_FFFF) as i32 - 0x0040_0000
}

/// Quantizes one super-block of `format` (256 finite values): codes, and the effective scale
/// (and minimum) of each group.
#[inline(always)]
pub(super) fn quantize_super(
    format: GgmlFormat,
    x: &[f32],
    codes: &mut [u8],
    scales: &mut [f32],
    mins: &mut [f32],
) {
    match format {
        GgmlFormat::Q4K => affine_super(x, 15, (-1.0, 0.1, 20), codes, scales, mins),
        GgmlFormat::Q5K => affine_super(x, 31, (-0.5, 0.1, 15), codes, scales, mins),
        GgmlFormat::Q6K => q6k_super(x, codes, scales),
        _ => unreachable!("{} is not a K-quant", format.name()),
    }
}

/// `Q4_K` / `Q5_K` (`nmax` 15 / 31): eight groups of 32 with an affine fit each, their scales
/// and minimums quantized to 6 bits against `d = max/63` and `dmin = max/63`.
#[inline(always)]
fn affine_super(
    x: &[f32],
    nmax: i32,
    search: (f32, f32, i32),
    codes: &mut [u8],
    scales: &mut [f32],
    mins: &mut [f32],
) {
    let mut fit = [(0f32, 0f32); 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for (j, (xg, cg)) in x
        .chunks_exact(32)
        .zip(codes.chunks_exact_mut(32))
        .enumerate()
    {
        let sum_x2 = xg.iter().fold(0f32, |s, &v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut w = [0f32; 32];
        for (w, &v) in w.iter_mut().zip(xg) {
            *w = av_x + v.abs();
        }
        fit[j] = fit_affine(xg, &w, nmax, search, cg);
        if fit[j].0 > max_scale {
            max_scale = fit[j].0;
        }
        if fit[j].1 > max_min {
            max_min = fit[j].1;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let d = round_f16(max_scale / 63.0);
    let dmin = round_f16(max_min / 63.0);
    for (j, (xg, cg)) in x
        .chunks_exact(32)
        .zip(codes.chunks_exact_mut(32))
        .enumerate()
    {
        // `uint8_t` then `MIN(63, ·)`, as llama.cpp stores them.
        let ls = (nearest(inv_scale * fit[j].0) as u8).min(63);
        let lm = (nearest(inv_min * fit[j].1) as u8).min(63);
        let dl = d * f32::from(ls);
        let ml = dmin * f32::from(lm);
        scales[j] = dl;
        mins[j] = -ml;
        // A zero scale keeps the codes of the group's own fit.
        if dl != 0.0 {
            for (c, &v) in cg.iter_mut().zip(xg) {
                *c = nearest((v + ml) / dl).clamp(0, nmax) as u8;
            }
        }
    }
}

/// One group's affine fit `x ≈ scale·q + min` (`min ≤ 0`), codes `0..=nmax`: the range's own
/// scale, then `nstep + 1` trial scales `(rmin + rdelta·i + nmax)/(max − min)`, each refitted by
/// weighted least squares, the one with the least weighted squared error kept (llama.cpp's
/// `make_qkx2_quants`). Returns `(scale, −min)`.
#[inline(always)]
fn fit_affine(
    x: &[f32],
    w: &[f32],
    nmax: i32,
    (rmin, rdelta, nstep): (f32, f32, i32),
    codes: &mut [u8],
) -> (f32, f32) {
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for (&v, &wi) in x.iter().zip(w).skip(1) {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
        sum_w += wi;
        sum_x += wi * v;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        codes.fill(0);
        return (0.0, -min);
    }
    let top = nmax as f32;
    let code = |iscale: f32, min: f32, v: f32| nearest(iscale * (v - min)).clamp(0, nmax) as u8;
    let error = |scale: f32, min: f32, codes: &[u8]| {
        x.iter().zip(w).zip(codes).fold(0f32, |e, ((&v, &wi), &c)| {
            let diff = scale * f32::from(c) + min - v;
            e + wi * (diff * diff)
        })
    };
    let iscale = top / (max - min);
    let mut scale = 1.0 / iscale;
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = code(iscale, min, v);
    }
    let mut best = error(scale, min, codes);
    let mut trial = [0u8; 32];
    let trial = &mut trial[..x.len()];
    // The trials start from the best fit so far: its minimum moves the range.
    for is in 0..=nstep {
        let iscale = (rmin + rdelta * is as f32 + top) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for ((t, &v), &wi) in trial.iter_mut().zip(x).zip(w) {
            *t = code(iscale, min, v);
            let l = f32::from(*t);
            sum_l += wi * l;
            sum_l2 += wi * l * l;
            sum_xl += wi * l * v;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let e = error(this_scale, this_min, trial);
            if e < best {
                codes.copy_from_slice(trial);
                best = e;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `Q6_K`: sixteen groups of 16 with a symmetric fit each, their scales quantized to `i8`
/// against `d = −max/128` (`max` the group scale of largest magnitude).
#[inline(always)]
fn q6k_super(x: &[f32], codes: &mut [u8], scales: &mut [f32]) {
    let mut fit = [0f32; 16];
    let (mut max_scale, mut max_abs) = (0f32, 0f32);
    for (j, (xg, cg)) in x
        .chunks_exact(16)
        .zip(codes.chunks_exact_mut(16))
        .enumerate()
    {
        fit[j] = fit_symmetric(xg, cg);
        if fit[j].abs() > max_abs {
            max_abs = fit[j].abs();
            max_scale = fit[j];
        }
    }
    if max_abs < GROUP_MAX_EPS {
        codes.fill(0);
        scales.fill(0.0);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = round_f16(1.0 / iscale);
    for (j, (xg, cg)) in x
        .chunks_exact(16)
        .zip(codes.chunks_exact_mut(16))
        .enumerate()
    {
        let sc = nearest(iscale * fit[j]).min(127) as i8;
        let dl = d * f32::from(sc);
        scales[j] = dl;
        if dl != 0.0 {
            for (c, &v) in cg.iter_mut().zip(xg) {
                *c = (nearest(v / dl).clamp(-32, 31) + 32) as u8;
            }
        }
    }
}

/// Below this magnitude a group is all zeros (llama.cpp's `GROUP_MAX_EPS`).
pub(super) const GROUP_MAX_EPS: f32 = 1e-15;

/// One group's symmetric fit `x ≈ scale·(q − 32)`, codes `0..64`: the scale `max/−32` and 18
/// trials around it, each refitted by `x²`-weighted least squares, the best fit kept (llama.cpp's
/// `make_qx_quants` with `nmax = 32`, `rmse_type = 1`). Returns the scale.
#[inline(always)]
fn fit_symmetric(x: &[f32], codes: &mut [u8]) -> f32 {
    const NMAX: i32 = 32;
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        codes.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest(iscale * v).clamp(-NMAX, NMAX - 1);
    // (Σ w·x·l, Σ w·l²) with w = x².
    let sums = |iscale: f32| {
        x.iter().fold((0f32, 0f32), |(lx, l2), &v| {
            let l = level(iscale, v) as f32;
            let w = v * v;
            (lx + w * v * l, l2 + w * l * l)
        })
    };
    let iscale = -(NMAX as f32) / max;
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = (level(iscale, v) + NMAX) as u8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&i| i != 0) {
        let iscale = -(NMAX as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (c, &v) in codes.iter_mut().zip(x) {
                *c = (level(iscale, v) + NMAX) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// The super-block scale `d` and small integers `q` in `range` with `d·q[j] = eff[j]` exactly,
/// given that the value of largest magnitude has `q = top`: `d = eff[k]/top`. `None` if `eff`
/// is not of that form (not made by this module).
fn factor(eff: &[f32], top: i32, range: std::ops::RangeInclusive<i32>) -> Option<(f32, Vec<i32>)> {
    let big = eff
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    if big == 0.0 {
        return Some((0.0, vec![0; eff.len()]));
    }
    let d = big / top as f32;
    if round_f16(d).to_bits() != d.to_bits() {
        return None;
    }
    let q: Vec<i32> = eff.iter().map(|&v| (v / d).round() as i32).collect();
    q.iter()
        .zip(eff)
        .all(|(&q, &v)| range.contains(&q) && (d * q as f32).to_bits() == v.to_bits())
        .then_some((d, q))
}

/// The GGUF bytes of whole super-blocks of `format` from codes and effective group scales
/// (and minimums, negated).
///
/// # Errors
/// [`QuantError::Corrupt`] if the scales of a super-block are not `d·sc` for an `f16` `d` and
/// small integers `sc` (they were not made by this crate's quantizer).
pub(super) fn encode(
    format: GgmlFormat,
    codes: &[u8],
    scales: &[f32],
    mins: &[f32],
) -> Result<Vec<u8>, QuantError> {
    let groups = K_SUPER / format.block();
    let bad = |b: usize| {
        QuantError::Corrupt(format!(
            "the group scales of {} super-block {b} are not an f16 times small integers",
            format.name()
        ))
    };
    let mut out = Vec::with_capacity(scales.len() / groups * format.block_bytes());
    for (b, c) in codes.chunks_exact(K_SUPER).enumerate() {
        let s = &scales[b * groups..(b + 1) * groups];
        if format == GgmlFormat::Q6K {
            let (d, sc) = factor(s, -128, -128..=127).ok_or_else(|| bad(b))?;
            q6k_bytes(c, &sc, d, &mut out);
            continue;
        }
        let m: Vec<f32> = mins[b * groups..(b + 1) * groups]
            .iter()
            .map(|v| -v)
            .collect();
        let (d, sc) = factor(s, 63, 0..=63).ok_or_else(|| bad(b))?;
        let (dmin, mn) = factor(&m, 63, 0..=63).ok_or_else(|| bad(b))?;
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(f16::from_f32(dmin).to_le_bytes());
        let mut packed = [0u8; 12];
        for j in 0..8 {
            let (ls, lm) = (sc[j] as u8, mn[j] as u8);
            if j < 4 {
                packed[j] = ls;
                packed[j + 4] = lm;
            } else {
                packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
                packed[j - 4] |= (ls >> 4) << 6;
                packed[j] |= (lm >> 4) << 6;
            }
        }
        out.extend(packed);
        if format == GgmlFormat::Q5K {
            let mut qh = [0u8; 32];
            for (n, chunk) in c.chunks_exact(64).enumerate() {
                for (l, h) in qh.iter_mut().enumerate() {
                    *h |= ((chunk[l] >> 4) << (2 * n)) | ((chunk[l + 32] >> 4) << (2 * n + 1));
                }
            }
            out.extend(qh);
        }
        for chunk in c.chunks_exact(64) {
            out.extend((0..32).map(|l| (chunk[l] & 0xF) | ((chunk[l + 32] & 0xF) << 4)));
        }
    }
    Ok(out)
}

/// `Q6_K`'s 210 bytes: `ql[128]`, `qh[64]`, `scales[16]`, `d`.
fn q6k_bytes(c: &[u8], sc: &[i32], d: f32, out: &mut Vec<u8>) {
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for (h, half) in c.chunks_exact(128).enumerate() {
        for l in 0..32 {
            let q = [half[l], half[l + 32], half[l + 64], half[l + 96]];
            ql[64 * h + l] = (q[0] & 0xF) | ((q[2] & 0xF) << 4);
            ql[64 * h + l + 32] = (q[1] & 0xF) | ((q[3] & 0xF) << 4);
            qh[32 * h + l] =
                (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6);
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc.iter().map(|&s| s as i8 as u8));
    out.extend(f16::from_f32(d).to_le_bytes());
}
