//! Rotary position embeddings in Hugging Face's `rotate_half` layout: the first half of each
//! head is paired with the second half (not adjacent pairs as in llama.cpp).

use burn::tensor::{Device, Tensor, TensorData};

use crate::config::{RopeConfig, RopeScaling};

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

/// `cos` and `sin` tables `[seq, head_dim]` for positions `0..seq` (each half repeated, as
/// `torch.cat((freqs, freqs), -1)`).
#[derive(Clone, Debug)]
pub struct RopeTables {
    /// `cos(pos · f)`.
    pub cos: Tensor<2>,
    /// `sin(pos · f)`.
    pub sin: Tensor<2>,
}

impl RopeTables {
    /// Tables for `seq` positions.
    pub fn new(rope: &RopeConfig, head_dim: usize, seq: usize, device: &Device) -> Self {
        Self::positions(rope, head_dim, 0..seq, device)
    }

    /// Tables for the positions `range` (row `i` is position `range.start + i`): the new
    /// tokens of a decoding step.
    pub fn positions(
        rope: &RopeConfig,
        head_dim: usize,
        range: std::ops::Range<usize>,
        device: &Device,
    ) -> Self {
        let freqs = inv_freq(rope, head_dim);
        let seq = range.len();
        let mut cos = Vec::with_capacity(seq * head_dim);
        let mut sin = Vec::with_capacity(seq * head_dim);
        for pos in range {
            let angles: Vec<f64> = freqs.iter().map(|f| pos as f64 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos() as f32));
                sin.extend(angles.iter().map(|a| a.sin() as f32));
            }
        }
        let make = |v: Vec<f32>| Tensor::from_data(TensorData::new(v, [seq, head_dim]), device);
        Self {
            cos: make(cos),
            sin: make(sin),
        }
    }

    /// Rotates `x` `[batch, heads, seq, head_dim]`: `x·cos + rotate_half(x)·sin`.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, h, s, d] = x.dims();
        let half = d / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        let cos = self.cos.clone().reshape([1, 1, s, d]).expand([b, h, s, d]);
        let sin = self.sin.clone().reshape([1, 1, s, d]).expand([b, h, s, d]);
        x * cos + rotated * sin
    }
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
