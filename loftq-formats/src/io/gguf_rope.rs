//! Llama 3.1's rotary scaling in a GGUF file: llama.cpp's converter stores it as one divisor
//! per frequency (`rope_freqs.weight`), computed from the checkpoint's `rope_scaling`. The
//! parameters are recovered from the divisors, so that the model has one description of its
//! rotary scaling whatever file it came from (and `convert` can write it as transformers does).

use crate::config::inv_freq;
use crate::config::{RopeConfig, RopeScaling};

/// The Llama 3 scaling whose per-frequency divisors are `factors` (`rope_freqs.weight`,
/// `head_dim / 2` values) for base `theta`, checked by recomputing every divisor.
///
/// The divisors fix the ratio of the context lengths to the frequency factors, not each one:
/// `low_freq_factor` is taken as 1, as in every Llama 3.x release, and the original context and
/// `high_freq_factor` come from the blended frequencies (8192 and 4 when none is blended).
///
/// # Errors
/// A message when the length is not `head_dim / 2`, a divisor is not finite and at least 1,
/// or the divisors are not a Llama 3 scaling.
pub fn llama3_from_factors(
    factors: &[f32],
    theta: f64,
    head_dim: usize,
) -> Result<RopeScaling, String> {
    let bad = |why: &str| Err(format!("rope_freqs.weight: {why}"));
    if factors.len() != head_dim / 2 {
        return bad(&format!(
            "{} values for a head width of {head_dim} (want {})",
            factors.len(),
            head_dim / 2
        ));
    }
    if factors.iter().any(|f| !f.is_finite() || *f < 1.0 - 1e-6) {
        return bad("a divisor is not finite and at least 1");
    }
    let ff: Vec<f64> = factors.iter().map(|&f| f64::from(f)).collect();
    let factor = ff.iter().copied().fold(1.0, f64::max);
    if factor - 1.0 < 1e-6 {
        return Ok(RopeScaling::None);
    }
    let plain = RopeConfig {
        theta,
        scaling: RopeScaling::None,
    };
    let freqs = inv_freq(&plain, head_dim);
    // A blended frequency i: 1/ff = (1 - s)/F + s, s = (orig/λ - 1)/(high - 1), λ = 2π/f.
    let blended: Vec<(f64, f64)> = ff
        .iter()
        .zip(&freqs)
        .filter(|(f, _)| **f > 1.0 + 1e-4 && **f < factor - 1e-4)
        .map(|(f, fr)| {
            let s = (1.0 / f - 1.0 / factor) / (1.0 - 1.0 / factor);
            (s, fr / (2.0 * std::f64::consts::PI))
        })
        .collect();
    let (orig, high) = match (blended.first(), blended.last()) {
        (Some(&(s1, u1)), Some(&(s2, u2))) if (u1 - u2).abs() > 1e-12 * u1 => {
            // s·(high - 1) = orig·u - 1 at both ends: two equations in orig and high.
            let orig = (s2 - s1) / (s2 * u1 - s1 * u2);
            (orig.round(), 1.0 + (orig * u1 - 1.0) / s1)
        }
        _ => (8192.0, 4.0),
    };
    let scaling = RopeScaling::Llama3 {
        factor: (factor * 1e4).round() / 1e4,
        low_freq_factor: 1.0,
        high_freq_factor: (high * 1e4).round() / 1e4,
        original_max_position_embeddings: orig,
    };
    let scaled = inv_freq(
        &RopeConfig {
            theta,
            scaling: scaling.clone(),
        },
        head_dim,
    );
    let fits = ff
        .iter()
        .zip(freqs.iter().zip(&scaled))
        .all(|(f, (a, b))| ((a / b) / f - 1.0).abs() < 1e-4);
    if !fits || !orig.is_finite() || orig <= 0.0 || high.is_nan() || high <= 1.0 {
        return bad("the divisors are not a Llama 3 scaling (rope_type llama3)");
    }
    Ok(scaling)
}

/// The divisors (`rope_freqs.weight`) of a Llama 3 scaling with `factor` `f`, `low` and `high`
/// frequency factors and original context `orig`, as llama.cpp's `convert_hf_to_gguf.py`
/// computes them (frequencies in `f32`, the blend in `f64`, stored as `f32`).
pub(super) fn converter_factors(
    theta: f64,
    dim: usize,
    f: f64,
    low: f64,
    high: f64,
    orig: f64,
) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / (theta as f32).powf((2 * i) as f32 / dim as f32);
            let wavelen = 2.0 * std::f64::consts::PI / f64::from(freq);
            let ff = if wavelen < orig / high {
                1.0
            } else if wavelen > orig / low {
                f
            } else {
                let smooth = (orig / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / f + smooth)
            };
            ff as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_parameters_come_back_from_the_divisors() {
        for (f, dim) in [(8.0, 128), (32.0, 64), (8.0, 64)] {
            let ff = converter_factors(500_000.0, dim, f, 1.0, 4.0, 8192.0);
            let got = llama3_from_factors(&ff, 500_000.0, dim).unwrap();
            assert_eq!(
                got,
                RopeScaling::Llama3 {
                    factor: f,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192.0,
                },
                "factor {f}, head width {dim}"
            );
        }
        assert_eq!(
            llama3_from_factors(&[1.0; 32], 10_000.0, 64),
            Ok(RopeScaling::None)
        );
    }

    #[test]
    fn other_divisors_are_refused() {
        let mut ff = converter_factors(500_000.0, 128, 8.0, 1.0, 4.0, 8192.0);
        assert!(llama3_from_factors(&ff[..10], 500_000.0, 128).is_err());
        ff[3] = 2.5;
        let e = llama3_from_factors(&ff, 500_000.0, 128).unwrap_err();
        assert!(e.contains("not a Llama 3 scaling"), "{e}");
        ff[3] = f32::NAN;
        assert!(llama3_from_factors(&ff, 500_000.0, 128).is_err());
    }
}
