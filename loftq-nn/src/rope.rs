//! Rotary position embeddings in Hugging Face's `rotate_half` layout: the first half of each
//! head is paired with the second half (not adjacent pairs as in llama.cpp). With a partial
//! rotary factor (Phi) only the first `rotary_dim` dimensions of a head turn, halves of those
//! paired, and the rest pass through.

use burn::tensor::{Device, Tensor, TensorData};

use loftq_formats::config::{RopeConfig, inv_freq_for};

/// `cos` and `sin` tables `[seq, rotary_dim]` for positions `0..seq` (each half repeated, as
/// `torch.cat((freqs, freqs), -1)`).
#[derive(Clone, Debug)]
pub struct RopeTables {
    /// `cos(pos · f)`.
    pub cos: Tensor<2>,
    /// `sin(pos · f)`.
    pub sin: Tensor<2>,
    /// `sin` with the first half of each row negated: `rotate_half(x)·sin` is `x` with its
    /// halves swapped times this, one flip where slices and a concatenation took several
    /// kernels, and more in the backward pass (a zero fill and a copy per slice).
    pub(crate) swapped_sin: Tensor<2>,
}

impl RopeTables {
    /// Tables for `seq` positions, `rotary_dim` wide ([`LlamaConfig::rotary_dim`]).
    ///
    /// [`LlamaConfig::rotary_dim`]: loftq_formats::config::LlamaConfig::rotary_dim
    pub fn new(rope: &RopeConfig, rotary_dim: usize, seq: usize, device: &Device) -> Self {
        Self::positions(rope, rotary_dim, 0..seq, device)
    }

    /// Tables for the positions `range` (row `i` is position `range.start + i`): the new
    /// tokens of a decoding step.
    pub fn positions(
        rope: &RopeConfig,
        rotary_dim: usize,
        range: std::ops::Range<usize>,
        device: &Device,
    ) -> Self {
        // LongRoPE's factors depend on the last position, as in transformers.
        let freqs = inv_freq_for(rope, rotary_dim, range.end);
        let scale = rope.scaling.attention_factor();
        let seq = range.len();
        let mut cos = Vec::with_capacity(seq * rotary_dim);
        let mut sin = Vec::with_capacity(seq * rotary_dim);
        for pos in range {
            let angles: Vec<f64> = freqs.iter().map(|f| pos as f64 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| (a.cos() * scale) as f32));
                sin.extend(angles.iter().map(|a| (a.sin() * scale) as f32));
            }
        }
        let half = rotary_dim / 2;
        let swapped_sin = sin
            .chunks(rotary_dim)
            .flat_map(|row| {
                row[..half]
                    .iter()
                    .map(|s| -s)
                    .chain(row[half..].iter().copied())
            })
            .collect();
        let make = |v: Vec<f32>| Tensor::from_data(TensorData::new(v, [seq, rotary_dim]), device);
        Self {
            cos: make(cos),
            sin: make(sin),
            swapped_sin: make(swapped_sin),
        }
    }

    /// Rotates `x` `[batch, seq, heads, head_dim]` (the projection's layout, before the heads
    /// are moved in front of the positions, so that splitting a head's halves is a view):
    /// `x·cos + rotate_half(x)·sin` on the first `rotary_dim` dimensions of each head, the
    /// others unchanged.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        // One CubeCL kernel on WGPU and CUDA.
        if let Some(y) = loftq_core::fused::rotary(&x, &self.cos, &self.swapped_sin) {
            return y;
        }
        let [b, s, h, width] = x.dims();
        let d = self.cos.dims()[1];
        if d < width {
            let pass = x.clone().narrow(3, d, width - d);
            return Tensor::cat(vec![self.apply(x.narrow(3, 0, d)), pass], 3);
        }
        let half = d / 2;
        let swapped = x
            .clone()
            .reshape([b, s, h, 2, half])
            .flip([3])
            .reshape([b, s, h, d]);
        let table = |t: &Tensor<2>| t.clone().reshape([1, s, 1, d]).expand([b, s, h, d]);
        x * table(&self.cos) + swapped * table(&self.swapped_sin)
    }
}
