//! Rotary position embeddings: the settings of `config.json` and the frequencies they give.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ConfigError, Family, RawConfig};

/// Rotary position embedding settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeConfig {
    /// Base of the frequencies (`rope_theta`).
    pub theta: f64,
    /// Frequency scaling, if any.
    pub scaling: RopeScaling,
}

/// How the rotary frequencies are rescaled for long contexts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// No scaling (`rope_type: "default"`).
    None,
    /// Every frequency divided by `factor` (`"linear"`).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.x scaling (`"llama3"`): low frequencies divided by `factor`, high ones kept,
    /// a smooth blend between.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths longer than `original / low_freq_factor` are divided.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Context length the model was trained with before scaling.
        original_max_position_embeddings: f64,
    },
    /// LongRoPE (`"longrope"`, Phi-3's long-context variants): each frequency divided by its
    /// own factor, `short_factor` while the positions stay within the original context and
    /// `long_factor` beyond it; `cos` and `sin` multiplied by `attention_factor`.
    LongRope {
        /// Divisors for inputs within `original_max_position_embeddings` positions.
        short_factor: Vec<f64>,
        /// Divisors for longer inputs.
        long_factor: Vec<f64>,
        /// Context length the model was trained with before scaling.
        original_max_position_embeddings: usize,
        /// Scale of `cos` and `sin`.
        attention_factor: f64,
    },
}

impl RopeScaling {
    /// The scale of the rotary tables' `cos` and `sin` (1 but for LongRoPE).
    pub fn attention_factor(&self) -> f64 {
        match self {
            RopeScaling::LongRope {
                attention_factor, ..
            } => *attention_factor,
            _ => 1.0,
        }
    }
}

/// Inverse frequencies `1 / θ^(2i/d)` for `i < d/2`, rescaled as the config says (LongRoPE:
/// its short factors).
///
/// # Numerical behaviour
/// Computed in `f64`; transformers computes them in `f32`. The difference in the angles is
/// below `1e-6` relative, far under the `1e-4` logits tolerance.
pub fn inv_freq(rope: &RopeConfig, head_dim: usize) -> Vec<f64> {
    inv_freq_for(rope, head_dim, 0)
}

/// [`inv_freq`] for tables covering the first `positions` positions: LongRoPE takes its long
/// factors when they reach past the original context, as transformers does for a forward
/// pass whose last position is `positions - 1`.
pub fn inv_freq_for(rope: &RopeConfig, head_dim: usize, positions: usize) -> Vec<f64> {
    let half = head_dim / 2;
    (0..half)
        .map(|i| {
            let f = 1.0 / rope.theta.powf((2 * i) as f64 / head_dim as f64);
            match &rope.scaling {
                RopeScaling::None => f,
                RopeScaling::Linear { factor } => f / factor,
                RopeScaling::LongRope {
                    short_factor,
                    long_factor,
                    original_max_position_embeddings: orig,
                    ..
                } => match positions > *orig {
                    true => f / long_factor[i],
                    false => f / short_factor[i],
                },
                &RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings: orig,
                } => {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < orig / high_freq_factor {
                        f
                    } else if wavelen > orig / low_freq_factor {
                        f / factor
                    } else {
                        let smooth = (orig / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                }
            }
        })
        .collect()
}

/// The `partial_rotary_factor` of a `config.json` (in `rope_parameters` or at the top level),
/// `None` for the whole head. Phi's default is 0.5, as transformers'; families whose attention
/// in transformers rotates the whole head refuse any other share.
pub(super) fn partial_rotary(family: Family, raw: &RawConfig) -> Result<Option<f64>, ConfigError> {
    let factor = (raw.rope_parameters.as_ref())
        .and_then(|p| p.get("partial_rotary_factor")?.as_f64())
        .or(raw.partial_rotary_factor)
        .or((family == Family::Phi).then_some(0.5))
        .filter(|&f| f != 1.0);
    match factor {
        Some(f) if !matches!(family, Family::Phi | Family::Phi3) => Err(ConfigError::Unsupported {
            field: "partial_rotary_factor",
            value: f.to_string(),
            supported: "1 (rotary embeddings on the whole head) outside Phi and Phi-3",
        }),
        Some(f) if !(f > 0.0 && f < 1.0) => Err(ConfigError::value(
            "partial_rotary_factor",
            format!("partial_rotary_factor {f} must be in (0, 1]"),
        )),
        other => Ok(other),
    }
}

/// The rotary settings of a `config.json`: `rope_theta` and `rope_scaling` (transformers 4) or
/// `rope_parameters` (5); `positions` are the top-level `max_position_embeddings` and
/// `original_max_position_embeddings`, which LongRoPE reads when its own entry lacks them.
pub(super) fn parse_rope(
    theta: Option<f64>,
    scaling: Option<Value>,
    params: Option<Value>,
    positions: [Option<usize>; 2],
) -> Result<RopeConfig, ConfigError> {
    // transformers 5 puts everything in `rope_parameters`; 4 splits theta and scaling.
    let (theta, spec) = match params {
        Some(Value::Object(p)) => (
            p.get("rope_theta").and_then(Value::as_f64).or(theta),
            Some(Value::Object(p)),
        ),
        _ => (theta, scaling),
    };
    let theta = theta.unwrap_or(10_000.0);
    if !(theta.is_finite() && theta > 0.0) {
        return Err(ConfigError::value(
            "rope_theta",
            format!("rope_theta {theta} must be positive"),
        ));
    }
    let Some(Value::Object(spec)) = spec else {
        return Ok(RopeConfig {
            theta,
            scaling: RopeScaling::None,
        });
    };
    let kind = spec
        .get("rope_type")
        .or_else(|| spec.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64, ConfigError> {
        spec.get(key)
            .and_then(Value::as_f64)
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| {
                ConfigError::value(
                    "rope_scaling",
                    format!("rope scaling `{kind}` needs a positive `{key}`"),
                )
            })
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        // `su` is the name Phi-3's first configs gave it.
        "longrope" | "su" => long_rope(&spec, positions)?,
        other => {
            return Err(ConfigError::Unsupported {
                field: "rope_type",
                value: other.to_string(),
                supported: "default, linear, llama3, longrope",
            });
        }
    };
    Ok(RopeConfig { theta, scaling })
}

/// LongRoPE's settings, with transformers' defaults: the original context from the entry or
/// the top level; `attention_factor` from the entry, else `√(1 + ln s / ln original)` for the
/// extension `s` (`factor`, else `max_position_embeddings / original`), 1 when `s ≤ 1`.
fn long_rope(
    spec: &serde_json::Map<String, Value>,
    [max, original]: [Option<usize>; 2],
) -> Result<RopeScaling, ConfigError> {
    let bad = |msg: String| ConfigError::value("rope_scaling", msg);
    let factors = |key: &str| -> Result<Vec<f64>, ConfigError> {
        let list = spec.get(key).and_then(Value::as_array);
        let v: Option<Vec<f64>> = list.and_then(|l| l.iter().map(Value::as_f64).collect());
        v.filter(|v| !v.is_empty() && v.iter().all(|x| x.is_finite() && *x > 0.0))
            .ok_or_else(|| bad(format!("longrope needs a list of positive `{key}`")))
    };
    let (short_factor, long_factor) = (factors("short_factor")?, factors("long_factor")?);
    let original = (spec.get("original_max_position_embeddings"))
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .or(original)
        .filter(|&o| o > 1)
        .ok_or_else(|| bad("longrope needs original_max_position_embeddings above 1".into()))?;
    let extension = match spec.get("factor").and_then(Value::as_f64) {
        Some(f) => f,
        None => max.unwrap_or(original) as f64 / original as f64,
    };
    let attention_factor = match spec.get("attention_factor").and_then(Value::as_f64) {
        Some(a) => a,
        None if extension <= 1.0 => 1.0,
        None => (1.0 + extension.ln() / (original as f64).ln()).sqrt(),
    };
    if !(attention_factor.is_finite() && attention_factor > 0.0) {
        return Err(bad(format!("longrope attention_factor {attention_factor}")));
    }
    Ok(RopeScaling::LongRope {
        short_factor,
        long_factor,
        original_max_position_embeddings: original,
        attention_factor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = RopeConfig {
            theta: 500_000.0,
            scaling: RopeScaling::None,
        };
        let scaled = RopeConfig {
            theta: 500_000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        let a = inv_freq(&plain, 128);
        let b = inv_freq(&scaled, 128);
        assert_eq!(a[0], b[0]);
        assert!((b[63] - a[63] / 8.0).abs() < 1e-15);
        assert!(b.iter().zip(&a).all(|(x, y)| x <= y && *x >= y / 8.0));
    }

    /// Phi-3.5's spelling (transformers 4): `rope_scaling.type`, the original context at the
    /// top level, the attention factor derived from the extension 131072 / 4096.
    #[test]
    fn longrope_reads_transformers_4_configs() {
        let spec = serde_json::json!({
            "type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 8.0]
        });
        let rope = parse_rope(Some(1e4), Some(spec), None, [Some(131072), Some(4096)]).unwrap();
        let RopeScaling::LongRope {
            original_max_position_embeddings,
            attention_factor,
            ..
        } = rope.scaling.clone()
        else {
            panic!("{rope:?}");
        };
        assert_eq!(original_max_position_embeddings, 4096);
        let want = (1.0 + 32f64.ln() / 4096f64.ln()).sqrt();
        assert!((attention_factor - want).abs() < 1e-12);
        let (short, long) = (inv_freq_for(&rope, 4, 4096), inv_freq_for(&rope, 4, 4097));
        assert_eq!(short, inv_freq(&rope, 4));
        assert_eq!([short[1] * 1.5, long[1] * 8.0], [1e-2, 1e-2]);
        let missing = serde_json::json!({"type": "longrope", "short_factor": [1.0, 1.5]});
        let err = parse_rope(None, Some(missing), None, [None, Some(4096)]).unwrap_err();
        assert!(err.to_string().contains("long_factor"), "{err}");
    }
}
