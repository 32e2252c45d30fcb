//! [`Quantizer`]: a checked [`QuantConfig`] with its tables precomputed.

use super::simd::Table16;
use super::{Codebook, QuantConfig, Rounding, Scheme};
use crate::QuantError;

/// A ready-to-use quantizer: configuration plus levels and decision thresholds.
///
/// Build it once per configuration ([`Quantizer::new`]) and use it for every tensor: the
/// host kernels ([`Quantizer::quantize_host`]) and the device path
/// ([`Quantizer::quantize`]) share these tables, so they produce identical codes.
#[derive(Clone, Debug)]
pub struct Quantizer {
    pub(super) config: QuantConfig,
    /// Dequantized value of each code before scaling (codebook schemes only).
    pub(super) levels: Vec<f32>,
    /// `code(v) = #{k : v ≥ thresholds[k]}` (codebook schemes only).
    pub(super) thresholds: Vec<f32>,
    /// `thresholds` padded with `+∞` to `2^bits − 1` entries, for a branch-free binary search.
    pub(super) search: Vec<f32>,
    /// Code of a normalised zero (all-zero blocks).
    pub(super) zero_code: u8,
    /// `search` padded to 16 entries, for codebooks of at most 16 levels (SIMD lookup).
    pub(super) table16: Option<Table16>,
    /// `levels` padded to 16 entries, for codebooks of at most 16 levels (SIMD lookup).
    pub(super) levels16: Option<[f32; 16]>,
}

impl Quantizer {
    /// Checks `config` and precomputes its tables.
    pub fn new(config: QuantConfig) -> Result<Self, QuantError> {
        config.validate()?;
        let codebook = Codebook::of(config.scheme);
        let (levels, thresholds) = match &codebook {
            Some(cb) => (cb.levels().to_vec(), cb.thresholds(config.rounding)),
            None => (vec![], vec![]),
        };
        let mut search = thresholds.clone();
        if !search.is_empty() {
            search.resize((1usize << config.scheme.bits()) - 1, f32::INFINITY);
        }
        let zero_code = match config.scheme {
            Scheme::IntSym { bits } => qmax(bits) as u8,
            Scheme::IntAsym { .. } => 0,
            Scheme::Ggml { format } => format.offset() as u8,
            _ => thresholds.iter().filter(|&&t| 0.0 >= t).count() as u8,
        };
        let table16 = Table16::new(&search, config.scheme.bits());
        let levels16 = (!levels.is_empty() && levels.len() <= 16).then(|| {
            let mut t = [0f32; 16];
            t[..levels.len()].copy_from_slice(&levels);
            t
        });
        Ok(Self {
            config,
            levels,
            thresholds,
            search,
            zero_code,
            table16,
            levels16,
        })
    }

    /// Shortcut for `Quantizer::new(QuantConfig::nf4())`.
    pub fn nf4() -> Self {
        Self::new(QuantConfig::nf4()).expect("NF4 is a valid configuration")
    }

    /// The configuration.
    pub fn config(&self) -> &QuantConfig {
        &self.config
    }

    /// Codebook levels (empty for the integer schemes).
    pub fn levels(&self) -> &[f32] {
        &self.levels
    }

    /// Decision thresholds (empty for the integer schemes).
    pub fn thresholds(&self) -> &[f32] {
        &self.thresholds
    }

    /// Bits per code.
    pub fn bits(&self) -> u8 {
        self.config.scheme.bits()
    }

    /// Block length for a matrix of the given shape.
    pub fn block_len(&self, shape: [usize; 2]) -> Result<usize, QuantError> {
        let block = self.config.block_size.len(shape[1]);
        if let super::Scheme::Ggml { format } = self.config.scheme
            && !shape[1].is_multiple_of(format.super_block())
        {
            return Err(QuantError::InvalidConfig(format!(
                "{} needs rows whose length is a multiple of {}, shape is {shape:?}",
                format.name(),
                format.super_block()
            )));
        }
        if block == 0 {
            return Err(QuantError::InvalidConfig(format!(
                "row blocks need at least one column, shape is {shape:?}"
            )));
        }
        Ok(block)
    }

    /// The code and dequantized value of one value `x` in a block whose scale (absmax, or
    /// the step for [`Scheme::IntAsym`]) and minimum are already fixed: the same arithmetic as
    /// the block kernels, so a value quantized here gets the code the kernels give it.
    /// Values outside the block's range clamp to its end codes (GPTQ's updated weights).
    pub(crate) fn code_fixed(&self, x: f32, scale: f32, min: f32) -> (u8, f32) {
        let div = |v: f32, s: f32| match self.config.rounding {
            Rounding::Peft => v / s,
            Rounding::Bnb => v * (1.0 / s),
        };
        match self.config.scheme {
            Scheme::Ggml { format } => format.code_fixed(x, scale, min),
            Scheme::IntAsym { bits } => {
                if scale == 0.0 || !scale.is_finite() {
                    return (0, min);
                }
                let top = ((1u32 << bits) - 1) as f32;
                let c = div(x - min, scale).round_ties_even().clamp(0.0, top) as u8;
                (c, f32::from(c) * scale + min)
            }
            _ if scale == 0.0 || !scale.is_finite() => (self.zero_code, 0.0),
            Scheme::IntSym { bits } => {
                let q = qmax(bits);
                let qf = q as f32;
                let c = ((div(x, scale) * qf).round_ties_even().clamp(-qf, qf) + qf) as u8;
                (c, (i32::from(c).wrapping_sub(q) as f32 * scale) / qf)
            }
            _ => {
                let v = div(x, scale);
                let c = self.thresholds.iter().filter(|&&t| v >= t).count();
                (c as u8, self.levels[c] * scale)
            }
        }
    }
}

/// Largest magnitude of a symmetric `bits`-bit integer.
pub(super) fn qmax(bits: u8) -> i32 {
    (1 << (bits - 1)) - 1
}
