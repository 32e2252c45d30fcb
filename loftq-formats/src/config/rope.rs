//! Rotary position embeddings: the settings of `config.json` and the frequencies they give.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ConfigError;

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
}

/// Inverse frequencies `1 / θ^(2i/d)` for `i < d/2`, rescaled as the config says.
///
/// # Numerical behaviour
/// Computed in `f64`; transformers computes them in `f32`. The difference in the angles is
/// below `1e-6` relative, far under the `1e-4` logits tolerance.
pub fn inv_freq(rope: &RopeConfig, head_dim: usize) -> Vec<f64> {
    let half = head_dim / 2;
    (0..half)
        .map(|i| {
            let f = 1.0 / rope.theta.powf((2 * i) as f64 / head_dim as f64);
            match rope.scaling {
                RopeScaling::None => f,
                RopeScaling::Linear { factor } => f / factor,
                RopeScaling::Llama3 {
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

pub(super) fn parse_rope(
    theta: Option<f64>,
    scaling: Option<Value>,
    params: Option<Value>,
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
        other => {
            return Err(ConfigError::Unsupported {
                field: "rope_type",
                value: other.to_string(),
                supported: "default, linear, llama3",
            });
        }
    };
    Ok(RopeConfig { theta, scaling })
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
}
