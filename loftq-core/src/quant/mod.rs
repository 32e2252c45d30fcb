//! Block-wise weight quantizers: NormalFloat and uniform codebooks, symmetric and asymmetric
//! integers, LLM.int8 rows; bit packing and double quantization of the scales.
//!
//! A [`QuantConfig`] says *what* to do; [`Quantizer::new`] checks it and precomputes the
//! tables; [`Quantizer::quantize`] runs on any Burn device and [`PackedTensor`] is the compact
//! host storage.
//!
//! # Layout
//! A matrix is flattened row-major and cut into blocks of `block_size` consecutive elements
//! (the last block may be shorter: a *tail block*, handled like the others). Each block has
//! one scale (its absmax, or for [`Scheme::IntAsym`] its step and minimum).

mod codebook;
pub mod cube;
mod double_quant;
mod ggml;
mod ggml_format;
mod host;
mod iq4nl;
mod kquant;
mod label;
mod normal;
mod pack;
mod packed;
mod portable;
mod quantizer;
mod simd;
mod tensor;

pub use codebook::{Codebook, NF_OFFSET};
pub use double_quant::{DYNAMIC_BLOCK, DoubleQuant, dynamic_map};
pub use ggml_format::{GGML_BLOCK, GgmlFormat, K_SUPER, round_f16};
pub use host::HostQuantized;
pub use label::{LabelError, fit_rows, parse_bits, parse_quantizer};
pub use normal::{normal_cdf, normal_ppf, torch_linspace_f32};
pub use pack::{pack_codes, packed_len, unpack_codes, unpack_codes_into};
pub use packed::{PackedTensor, Scales};
pub use quantizer::Quantizer;
pub use tensor::{Codes, Kernel, Quantized, host_f32, host_values, is_host_device};

use serde::{Deserialize, Serialize};

use crate::QuantError;

/// What a code means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Scheme {
    /// NormalFloat codebook (QLoRA's NF4, LoftQ's NF2), scaled by the block absmax.
    Nf {
        /// Bits per weight, 1 to 8.
        bits: u8,
    },
    /// PEFT's uniform codebook `linspace(-1, 1, 2^bits)`, scaled by the block absmax.
    UniformCodebook {
        /// Bits per weight, 1 to 8.
        bits: u8,
    },
    /// Symmetric integers `-qmax..=qmax` (`qmax = 2^(bits-1) − 1`), `x ≈ q·absmax/qmax`.
    /// With [`BlockSize::Row`] and 8 bits this is LLM.int8's weight format.
    IntSym {
        /// Bits per weight, 2 to 8.
        bits: u8,
    },
    /// Asymmetric (affine) integers `0..2^bits`, `x ≈ q·step + min` per block.
    IntAsym {
        /// Bits per weight, 1 to 8.
        bits: u8,
    },
    /// One of llama.cpp's block formats (blocks of 32 with `f16` scales, or the K-quants'
    /// super-blocks of 256), byte-identical with llama.cpp's own quantizer, so a GGUF file
    /// written from it holds exactly these values.
    Ggml {
        /// Which format.
        format: GgmlFormat,
    },
}

impl Scheme {
    /// Bits per stored code.
    pub fn bits(self) -> u8 {
        match self {
            Scheme::Nf { bits }
            | Scheme::UniformCodebook { bits }
            | Scheme::IntSym { bits }
            | Scheme::IntAsym { bits } => bits,
            Scheme::Ggml { format } => format.bits(),
        }
    }

    /// True if every block has a minimum besides its scale.
    pub fn has_mins(self) -> bool {
        match self {
            Scheme::IntAsym { .. } => true,
            Scheme::Ggml { format } => format.has_min(),
            _ => false,
        }
    }

    /// Short name, e.g. `nf4`, `int4-asym`.
    pub fn name(self) -> String {
        match self {
            Scheme::Nf { bits } => format!("nf{bits}"),
            Scheme::UniformCodebook { bits } => format!("uniform{bits}"),
            Scheme::IntSym { bits } => format!("int{bits}"),
            Scheme::IntAsym { bits } => format!("int{bits}-asym"),
            Scheme::Ggml { format } => format.name().to_string(),
        }
    }
}

/// How a value is normalised by its block scale and rounded to a code.
///
/// The two references agree except for values within an ulp of a decision boundary.
/// [`Rounding::Peft`] is the default because LoftQ's reference (PEFT's `loftq_init`) uses it,
/// so its outputs can be reproduced exactly; [`Rounding::Bnb`] reproduces what bitsandbytes
/// computes when it quantizes NF4 itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Rounding {
    /// `v = x / scale` (true division); the nearest level, the lower one on ties.
    #[default]
    Peft,
    /// `v = x · (1/scale)`; `v > midpoint` goes up, a value on the midpoint goes down.
    Bnb,
}

/// Elements that share one scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockSize {
    /// Consecutive row-major elements per block (64 in QLoRA and LoftQ).
    Elements(usize),
    /// One block per matrix row (LLM.int8's per-output-row scale).
    Row,
}

impl BlockSize {
    /// The block length for a matrix with `cols` columns.
    pub fn len(self, cols: usize) -> usize {
        match self {
            BlockSize::Elements(n) => n,
            BlockSize::Row => cols,
        }
    }
}

/// A complete quantizer description: scheme, blocks, rounding, and how scales are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuantConfig {
    /// What a code means.
    pub scheme: Scheme,
    /// Elements per scale.
    pub block_size: BlockSize,
    /// Normalisation and tie rule.
    pub rounding: Rounding,
    /// Store the scales double-quantized (bitsandbytes `compress_statistics`): 8-bit codes,
    /// 256 per second-level block, instead of `f32`. Affects only [`PackedTensor`].
    pub double_quant: bool,
}

impl QuantConfig {
    /// NormalFloat with `bits` bits, blocks of 64, PEFT rounding, `f32` scales.
    pub fn nf(bits: u8) -> Self {
        Self::new(Scheme::Nf { bits })
    }

    /// QLoRA's NF4: 4 bits, blocks of 64.
    pub fn nf4() -> Self {
        Self::nf(4)
    }

    /// LLM.int8 weights: symmetric 8-bit with one absmax per row.
    pub fn int8_rowwise() -> Self {
        Self::new(Scheme::IntSym { bits: 8 }).with_block_size(BlockSize::Row)
    }

    /// Integers with `bits` bits, symmetric (absmax) or asymmetric (min/max), blocks of 64.
    pub fn int(bits: u8, symmetric: bool) -> Self {
        Self::new(if symmetric {
            Scheme::IntSym { bits }
        } else {
            Scheme::IntAsym { bits }
        })
    }

    /// llama.cpp's block format `format` (its own fixed blocks).
    pub fn ggml(format: GgmlFormat) -> Self {
        Self::new(Scheme::Ggml { format })
    }

    /// A scheme with the defaults: blocks of 64 (the llama.cpp formats' own, which are
    /// fixed), PEFT rounding, `f32` scales.
    pub fn new(scheme: Scheme) -> Self {
        let block = match scheme {
            Scheme::Ggml { format } => format.block(),
            _ => 64,
        };
        Self {
            scheme,
            block_size: BlockSize::Elements(block),
            rounding: Rounding::Peft,
            double_quant: false,
        }
    }

    /// Sets the block size.
    pub fn with_block_size(mut self, block_size: BlockSize) -> Self {
        self.block_size = block_size;
        self
    }

    /// Sets the rounding rule.
    pub fn with_rounding(mut self, rounding: Rounding) -> Self {
        self.rounding = rounding;
        self
    }

    /// Turns double quantization of the scales on or off.
    pub fn with_double_quant(mut self, double_quant: bool) -> Self {
        self.double_quant = double_quant;
        self
    }

    /// Checks that the configuration can work.
    pub fn validate(&self) -> Result<(), QuantError> {
        let bits = self.scheme.bits();
        let min_bits = if matches!(self.scheme, Scheme::IntSym { .. }) {
            2
        } else {
            1
        };
        if !(min_bits..=8).contains(&bits) {
            return Err(QuantError::InvalidConfig(format!(
                "{} needs {min_bits} to 8 bits, got {bits}",
                self.scheme.name()
            )));
        }
        if let Scheme::Ggml { format } = self.scheme
            && (self.block_size != BlockSize::Elements(format.block()) || self.double_quant)
        {
            return Err(QuantError::InvalidConfig(format!(
                "{} has its own blocks of {} with f16 scales; other block sizes and double \
                 quantization do not apply",
                format.name(),
                format.block()
            )));
        }
        if self.block_size == BlockSize::Elements(0) {
            return Err(QuantError::InvalidConfig(
                "block size must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// Name for reports and file metadata, e.g. `nf4-b64`, `nf4-b64-dq`, `int8-row`.
    pub fn label(&self) -> String {
        if let Scheme::Ggml { format } = self.scheme {
            return format.name().to_string();
        }
        let block = match self.block_size {
            BlockSize::Elements(n) => format!("b{n}"),
            BlockSize::Row => "row".into(),
        };
        let mut s = format!("{}-{block}", self.scheme.name());
        if self.double_quant {
            s.push_str("-dq");
        }
        if self.rounding == Rounding::Bnb {
            s.push_str("-bnb");
        }
        s
    }
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self::nf4()
    }
}
