//! llama.cpp's block formats: their names, type ids, block layout and byte sizes (the
//! quantizers themselves are in [`super::ggml`] and [`super::kquant`]).

use half::f16;
use serde::{Deserialize, Serialize};

/// Values per K-quant super-block.
pub const K_SUPER: usize = 256;

/// Values per block of the formats without super-blocks.
pub const GGML_BLOCK: usize = 32;

/// A llama.cpp block format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GgmlFormat {
    /// `x ≈ (q − 8)·d`, `d = max/−8` with `max` the value of largest magnitude (signed).
    #[serde(rename = "q4_0")]
    Q4_0,
    /// `x ≈ q·d + m`, `d = (max − min)/15`, `m = min`.
    #[serde(rename = "q4_1")]
    Q4_1,
    /// `x ≈ (q − 16)·d`, `d = max/−16`.
    #[serde(rename = "q5_0")]
    Q5_0,
    /// `x ≈ q·d + m`, `d = (max − min)/31`.
    #[serde(rename = "q5_1")]
    Q5_1,
    /// `x ≈ q·d`, `d = absmax/127`, `q` rounded half away from zero.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// `x ≈ d·T[q]` with `T` 16 non-uniform levels from −127 to 113.
    #[serde(rename = "iq4_nl")]
    Iq4Nl,
    /// Super-blocks of 256: 8 groups of 32, `x ≈ (d·sc)·q − dmin·m`, 6-bit `sc` and `m`.
    #[serde(rename = "q4_k")]
    Q4K,
    /// As `Q4_K` with 5-bit codes.
    #[serde(rename = "q5_k")]
    Q5K,
    /// Super-blocks of 256: 16 groups of 16, `x ≈ (d·sc)·(q − 32)`, `i8` `sc`.
    #[serde(rename = "q6_k")]
    Q6K,
}

impl GgmlFormat {
    /// Every format, in ggml's type order.
    pub const ALL: [GgmlFormat; 9] = [
        GgmlFormat::Q4_0,
        GgmlFormat::Q4_1,
        GgmlFormat::Q5_0,
        GgmlFormat::Q5_1,
        GgmlFormat::Q8_0,
        GgmlFormat::Q4K,
        GgmlFormat::Q5K,
        GgmlFormat::Q6K,
        GgmlFormat::Iq4Nl,
    ];

    /// The names of [`GgmlFormat::ALL`], for messages.
    pub const NAMES: &'static str = "q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k, iq4_nl";

    /// Bits per code.
    pub fn bits(self) -> u8 {
        match self {
            GgmlFormat::Q4_0 | GgmlFormat::Q4_1 | GgmlFormat::Iq4Nl | GgmlFormat::Q4K => 4,
            GgmlFormat::Q5_0 | GgmlFormat::Q5_1 | GgmlFormat::Q5K => 5,
            GgmlFormat::Q6K => 6,
            GgmlFormat::Q8_0 => 8,
        }
    }

    /// True for the K-quants (super-blocks of 256).
    pub fn is_k(self) -> bool {
        matches!(self, GgmlFormat::Q4K | GgmlFormat::Q5K | GgmlFormat::Q6K)
    }

    /// Values that share one (effective) scale: 16 for `Q6_K`, 32 otherwise.
    pub fn block(self) -> usize {
        if self == GgmlFormat::Q6K {
            16
        } else {
            GGML_BLOCK
        }
    }

    /// Values quantized together, and what a row's length must be a multiple of: 256 for the
    /// K-quants, 32 otherwise.
    pub fn super_block(self) -> usize {
        if self.is_k() { K_SUPER } else { GGML_BLOCK }
    }

    /// The format llama.cpp's `llama-quantize` puts in place of a K-quant on a matrix whose
    /// rows are not whole super-blocks (`Q4_K` → `Q5_0`, `Q5_K` → `Q5_1`, `Q6_K` → `Q8_0`);
    /// the format itself otherwise.
    pub fn fallback(self) -> Self {
        match self {
            GgmlFormat::Q4K => GgmlFormat::Q5_0,
            GgmlFormat::Q5K => GgmlFormat::Q5_1,
            GgmlFormat::Q6K => GgmlFormat::Q8_0,
            f => f,
        }
    }

    /// The format a matrix with rows of `cols` values gets: this one, or its
    /// [`GgmlFormat::fallback`] when the rows are not whole super-blocks.
    pub fn for_rows(self, cols: usize) -> Self {
        if cols.is_multiple_of(self.super_block()) {
            self
        } else {
            self.fallback()
        }
    }

    /// Lower-case name, as `--bits` takes it (`q4_0`).
    pub fn name(self) -> &'static str {
        match self {
            GgmlFormat::Q4_0 => "q4_0",
            GgmlFormat::Q4_1 => "q4_1",
            GgmlFormat::Q5_0 => "q5_0",
            GgmlFormat::Q5_1 => "q5_1",
            GgmlFormat::Q8_0 => "q8_0",
            GgmlFormat::Iq4Nl => "iq4_nl",
            GgmlFormat::Q4K => "q4_k",
            GgmlFormat::Q5K => "q5_k",
            GgmlFormat::Q6K => "q6_k",
        }
    }

    /// The format named `name` (`q4_0`, any case).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(name))
    }

    /// ggml's type number (`GGML_TYPE_Q4_0` = 2, ...), as GGUF files store it.
    pub fn type_id(self) -> u32 {
        match self {
            GgmlFormat::Q4_0 => 2,
            GgmlFormat::Q4_1 => 3,
            GgmlFormat::Q5_0 => 6,
            GgmlFormat::Q5_1 => 7,
            GgmlFormat::Q8_0 => 8,
            GgmlFormat::Q4K => 12,
            GgmlFormat::Q5K => 13,
            GgmlFormat::Q6K => 14,
            GgmlFormat::Iq4Nl => 20,
        }
    }

    /// True for the formats with a per-block minimum (`Q4_1`, `Q5_1`, `Q4_K`, `Q5_K`).
    pub fn has_min(self) -> bool {
        matches!(
            self,
            GgmlFormat::Q4_1 | GgmlFormat::Q5_1 | GgmlFormat::Q4K | GgmlFormat::Q5K
        )
    }

    /// What is subtracted from a stored code to get the signed level (0 for the formats with
    /// a minimum); for `IQ4_NL` the code of the level nearest zero.
    pub fn offset(self) -> i32 {
        match self {
            GgmlFormat::Q4_0 | GgmlFormat::Iq4Nl => 8,
            GgmlFormat::Q5_0 => 16,
            GgmlFormat::Q8_0 => 128,
            GgmlFormat::Q6K => 32,
            GgmlFormat::Q4_1 | GgmlFormat::Q5_1 | GgmlFormat::Q4K | GgmlFormat::Q5K => 0,
        }
    }

    /// Largest stored code.
    pub(super) fn top(self) -> f32 {
        ((1u32 << self.bits()) - 1) as f32
    }

    /// Bytes of one block (a super-block for the K-quants) in a GGUF file.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlFormat::Q4K => 144,
            GgmlFormat::Q5K => 176,
            GgmlFormat::Q6K => 210,
            _ => {
                let scales = if self.has_min() { 4 } else { 2 };
                scales + GGML_BLOCK * usize::from(self.bits()) / 8
            }
        }
    }

    /// Bytes of `numel` values (whole super-blocks) in a GGUF file.
    pub fn byte_len(self, numel: usize) -> usize {
        numel / self.super_block() * self.block_bytes()
    }
}

/// `v` rounded to the nearest `f16` (ties to even, as numpy's `astype(float16)`), as `f32`.
pub fn round_f16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}
