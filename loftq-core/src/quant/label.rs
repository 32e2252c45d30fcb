//! Quantizer labels: `nf4-b64`, `nf3-b128-dq`, `int4-asym-row`, `q4_k`, read back into a
//! [`QuantConfig`] ([`QuantConfig::label`] writes them).

use std::fmt;
use std::str::FromStr;

use super::{BlockSize, GgmlFormat, Scheme};
use crate::{QuantConfig, QuantError};

/// A quantizer label that does not parse; each variant names the label as given.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LabelError {
    /// Not a quantizer name, or a storage suffix that is not `-b<N>`, `-row` or `-dq`.
    #[error("bad quantizer `{label}` ({expected})")]
    Unknown {
        /// The label.
        label: String,
        /// What would have parsed.
        expected: String,
    },
    /// Double quantization asked of a llama.cpp format (their scales are `f16`).
    #[error("`{label}` is llama.cpp's format with f16 scales; double quantization does not apply")]
    DoubleQuantGgml {
        /// The label.
        label: String,
    },
    /// A well-formed label whose configuration is refused (e.g. `nf9`).
    #[error("`{label}`: {source}")]
    Invalid {
        /// The label.
        label: String,
        /// Why the configuration is refused.
        source: QuantError,
    },
}

/// Parses a quantizer name: `nf2`..`nf8`, `int2`..`int8` (symmetric), `int2-asym`..,
/// `uniform2`..; `block` elements per block (0 = one block per row), double quantization.
/// llama.cpp's formats (`q4_0` ... `q8_0`, `iq4_nl`, the K-quants `q4_k`, `q5_k`, `q6_k`) have
/// their own fixed blocks and `f16` scales: `block` does not apply to them, double
/// quantization is refused.
///
/// # Errors
/// [`LabelError`], naming `s`.
pub fn parse_bits(s: &str, block: usize, double_quant: bool) -> Result<QuantConfig, LabelError> {
    parse_name(s, s, block, double_quant)
}

/// [`parse_bits`] of `name`, the errors naming `label` (the whole label `name` came from).
fn parse_name(
    name: &str,
    label: &str,
    block: usize,
    double_quant: bool,
) -> Result<QuantConfig, LabelError> {
    if let Some(format) = GgmlFormat::from_name(name) {
        if double_quant {
            return Err(LabelError::DoubleQuantGgml {
                label: label.to_string(),
            });
        }
        return Ok(QuantConfig::ggml(format));
    }
    let unknown = || LabelError::Unknown {
        label: label.to_string(),
        expected: format!(
            "nf2..nf8, int2..int8, int2-asym.., uniform2.., {}",
            GgmlFormat::NAMES
        ),
    };
    let num = |p: &str| -> Result<u8, LabelError> {
        name.strip_prefix(p)
            .and_then(|r| r.strip_suffix("-asym").unwrap_or(r).parse().ok())
            .ok_or_else(unknown)
    };
    let scheme = if name.starts_with("nf") {
        Scheme::Nf { bits: num("nf")? }
    } else if name.starts_with("uniform") {
        Scheme::UniformCodebook {
            bits: num("uniform")?,
        }
    } else if name.starts_with("int") && name.ends_with("-asym") {
        Scheme::IntAsym { bits: num("int")? }
    } else if name.starts_with("int") {
        Scheme::IntSym { bits: num("int")? }
    } else {
        return Err(unknown());
    };
    let cfg = QuantConfig::new(scheme)
        .with_block_size(if block == 0 {
            BlockSize::Row
        } else {
            BlockSize::Elements(block)
        })
        .with_double_quant(double_quant);
    cfg.validate().map_err(|source| LabelError::Invalid {
        label: label.to_string(),
        source,
    })?;
    Ok(cfg)
}

/// Parses a quantizer with its storage: a name as [`parse_bits`] (`nf3`, `int4-asym`), then
/// optionally `-b<N>` (elements per block) or `-row`, and `-dq` (double quantization), as
/// [`QuantConfig::label`] writes them: `nf3-b128-dq`. What is not given comes from `block`
/// and `double_quant`.
///
/// # Errors
/// [`LabelError`], naming `s`.
pub fn parse_quantizer(
    s: &str,
    block: usize,
    double_quant: bool,
) -> Result<QuantConfig, LabelError> {
    let mut parts: Vec<&str> = s.split('-').collect();
    let name = match parts.get(1) {
        Some(&"asym") => format!("{}-asym", parts[0]),
        _ => parts[0].to_string(),
    };
    parts.drain(..name.split('-').count());
    let (mut block, mut dq) = (block, double_quant);
    let mut explicit_dq = false;
    for p in parts {
        match p {
            "row" => block = 0,
            "dq" => {
                dq = true;
                explicit_dq = true;
            }
            b => {
                block = b
                    .strip_prefix('b')
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| LabelError::Unknown {
                        label: s.to_string(),
                        expected: "e.g. nf3, nf3-b128, nf3-b64-dq, nf4-row".to_string(),
                    })?;
            }
        }
    }
    // A label without `-dq` that names its block is complete: no double quantization (the
    // llama.cpp formats name their block).
    let fixed_block = GgmlFormat::from_name(&name).is_some();
    if !explicit_dq && (s.contains("-b") || s.contains("-row") || fixed_block) {
        dq = false;
    }
    parse_name(&name, s, block, dq)
}

/// `quant` as it applies to rows of `cols` values: a K-quant on rows that are not whole
/// super-blocks of 256 becomes llama.cpp's fallback for it (`q4_k` → `q5_0`, `q5_k` → `q5_1`,
/// `q6_k` → `q8_0`), as `llama-quantize` does; any other quantizer is unchanged.
pub fn fit_rows(quant: QuantConfig, cols: usize) -> QuantConfig {
    match quant.scheme {
        Scheme::Ggml { format } if format.for_rows(cols) != format => {
            QuantConfig::ggml(format.fallback())
        }
        _ => quant,
    }
}

impl fmt::Display for QuantConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

/// A label as [`parse_quantizer`] reads it, with blocks of 64 and no double quantization
/// where the label does not say.
impl FromStr for QuantConfig {
    type Err = LabelError;

    fn from_str(s: &str) -> Result<Self, LabelError> {
        parse_quantizer(s, 64, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quantizer_labels() {
        for label in [
            "nf3-b128-dq",
            "nf4-b64",
            "nf2-row",
            "int4-asym-b32",
            "int8-row-dq",
            "q4_0",
            "q5_1",
            "q4_k",
            "q6_k",
        ] {
            assert_eq!(parse_quantizer(label, 64, true).unwrap().label(), label);
        }
        assert_eq!(
            parse_quantizer("nf3", 128, true).unwrap().label(),
            "nf3-b128-dq"
        );
        assert_eq!(
            parse_quantizer("nf3-dq", 64, false).unwrap().label(),
            "nf3-b64-dq"
        );
        assert_eq!(
            parse_quantizer("int4-asym", 64, false).unwrap().label(),
            "int4-asym-b64"
        );
        // llama.cpp's formats keep their blocks of 32 and refuse double quantization.
        assert_eq!(parse_bits("q8_0", 128, false).unwrap().label(), "q8_0");
        assert!(matches!(
            parse_bits("q4_0", 64, true),
            Err(LabelError::DoubleQuantGgml { .. })
        ));
        // Errors name the whole label, not the name inside it.
        let e = parse_quantizer("nf9-b128", 64, false).unwrap_err();
        assert!(matches!(&e, LabelError::Invalid { label, .. } if label == "nf9-b128"));
        assert!(e.to_string().starts_with("`nf9-b128`: "), "{e}");
        for bad in [
            "nf3-b0", "nf3-x", "nf9", "nf3-b", "fp4-b64", "q3_k", "q4_0-dq", "q6_k-dq",
        ] {
            assert!(parse_quantizer(bad, 64, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn labels_round_trip_through_from_str() {
        for label in ["nf4-b64", "nf2-row-dq", "int3-asym-b32", "q6_k"] {
            let q: QuantConfig = label.parse().unwrap();
            assert_eq!(q.to_string(), label);
        }
        assert!("nf4-b0".parse::<QuantConfig>().is_err());
    }
}
