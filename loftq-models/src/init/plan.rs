//! Which tensors `loftq init` quantizes, and with which quantizer.

use loftq_core::QuantConfig;
use loftq_core::quant::{BlockSize, GgmlFormat, Scheme};
use serde::{Deserialize, Serialize};

/// Which 2-D weights get an adapter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// Every 2-D `.weight` except embeddings and the LM head (found by name and shape).
    AllLinear,
    /// Modules whose path equals one of these or ends with `.<name>` (PEFT's rule), e.g.
    /// `q_proj`, `mlp.down_proj`, `model.layers.0.self_attn.v_proj`.
    Names(Vec<String>),
}

impl Target {
    /// True if module `module` is targeted and not excluded; `linear` says whether `all-linear`
    /// covers it (the caller knows what a linear layer is in its input).
    pub fn picks(&self, module: &str, exclude: &[String], linear: bool) -> bool {
        let hit = match self {
            Target::AllLinear => linear,
            Target::Names(list) => list.iter().any(|t| module_matches(module, t)),
        };
        hit && !exclude.iter().any(|x| module_matches(module, x))
    }

    /// Parses `all-linear` or a comma-separated list of names.
    pub fn parse(s: &str) -> Self {
        if s == "all-linear" {
            Target::AllLinear
        } else {
            Target::Names(split_list(s))
        }
    }
}

/// Comma-separated, trimmed, non-empty items.
pub fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect()
}

pub use crate::io::{layer_index, module_matches};

/// True for names of embeddings and output heads, which `all-linear` never targets.
pub fn is_embedding_or_head(name: &str) -> bool {
    const PARTS: [&str; 6] = [
        "embed",
        "lm_head",
        "wte",
        "wpe",
        "word_embeddings",
        "embeddings.",
    ];
    PARTS.iter().any(|p| name.contains(p)) || name == "output.weight"
}

/// The module path of a weight name (`...q_proj.weight` → `...q_proj`), if it is a weight.
pub fn module_of_weight(name: &str) -> Option<&str> {
    name.strip_suffix(".weight")
}

/// Parses a quantizer name: `nf2`..`nf8`, `int2`..`int8` (symmetric), `int2-asym`..,
/// `uniform2`..; `block` elements per block (0 = one block per row), double quantization.
/// llama.cpp's formats (`q4_0` ... `q8_0`, `iq4_nl`, the K-quants `q4_k`, `q5_k`, `q6_k`) have
/// their own fixed blocks and `f16` scales: `block` does not apply to them, double
/// quantization is refused.
///
/// # Errors
/// A message naming the bad value.
pub fn parse_bits(s: &str, block: usize, double_quant: bool) -> Result<QuantConfig, String> {
    if let Some(format) = GgmlFormat::from_name(s) {
        if double_quant {
            return Err(format!(
                "`{s}` is llama.cpp's format with f16 scales; double quantization does not apply"
            ));
        }
        return Ok(QuantConfig::ggml(format));
    }
    let num = |p: &str| -> Result<u8, String> {
        s.strip_prefix(p)
            .and_then(|r| r.strip_suffix("-asym").unwrap_or(r).parse().ok())
            .ok_or_else(|| format!("bad quantizer `{s}`"))
    };
    let scheme = if s.starts_with("nf") {
        Scheme::Nf { bits: num("nf")? }
    } else if s.starts_with("uniform") {
        Scheme::UniformCodebook {
            bits: num("uniform")?,
        }
    } else if s.starts_with("int") && s.ends_with("-asym") {
        Scheme::IntAsym { bits: num("int")? }
    } else if s.starts_with("int") {
        Scheme::IntSym { bits: num("int")? }
    } else {
        return Err(format!(
            "bad quantizer `{s}` (nf2..nf8, int2..int8, int2-asym.., uniform2.., {})",
            GgmlFormat::NAMES
        ));
    };
    let cfg = QuantConfig::new(scheme)
        .with_block_size(if block == 0 {
            BlockSize::Row
        } else {
            BlockSize::Elements(block)
        })
        .with_double_quant(double_quant);
    cfg.validate().map_err(|e| format!("`{s}`: {e}"))?;
    Ok(cfg)
}

/// A per-layer precision rule: layers `from..=to` (or every layer) use `quant`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerRule {
    /// First layer, inclusive (`None` = every layer).
    pub layers: Option<(usize, usize)>,
    /// The quantizer.
    pub quant: QuantConfig,
}

/// Parses `--layer-bits "0-3:nf4,*:nf2"` (first matching rule wins).
///
/// # Errors
/// A message naming the bad rule.
pub fn parse_layer_bits(
    s: &str,
    block: usize,
    double_quant: bool,
) -> Result<Vec<LayerRule>, String> {
    split_list(s)
        .iter()
        .map(|rule| {
            let (range, bits) = rule
                .split_once(':')
                .ok_or_else(|| format!("layer rule `{rule}` is not RANGE:BITS"))?;
            let layers = match range.trim() {
                "*" => None,
                r => {
                    let (a, b) = r.split_once('-').unwrap_or((r, r));
                    let p = |x: &str| {
                        x.trim()
                            .parse::<usize>()
                            .map_err(|_| format!("bad layer range `{r}`"))
                    };
                    let (a, b) = (p(a)?, p(b)?);
                    if a > b {
                        return Err(format!("bad layer range `{r}`"));
                    }
                    Some((a, b))
                }
            };
            Ok(LayerRule {
                layers,
                quant: parse_bits(bits.trim(), block, double_quant)?,
            })
        })
        .collect()
}

/// Parses a quantizer with its storage: a name as [`parse_bits`] (`nf3`, `int4-asym`), then
/// optionally `-b<N>` (elements per block) or `-row`, and `-dq` (double quantization), as
/// [`QuantConfig::label`] writes them: `nf3-b128-dq`. What is not given comes from `block`
/// and `double_quant`.
///
/// # Errors
/// A message naming the bad value.
pub fn parse_quantizer(s: &str, block: usize, double_quant: bool) -> Result<QuantConfig, String> {
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
                    .ok_or_else(|| {
                        format!("bad quantizer `{s}` (e.g. nf3, nf3-b128, nf3-b64-dq, nf4-row)")
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
    parse_bits(&name, block, dq).map_err(|e| e.replace(&format!("`{name}`"), &format!("`{s}`")))
}

/// The quantizer of tensor `name` `[_, cols]` under `rules`, else `default`, as it applies
/// to rows of `cols` values ([`fit_rows`]).
pub fn quant_for(
    name: &str,
    cols: usize,
    rules: &[LayerRule],
    default: QuantConfig,
) -> QuantConfig {
    let layer = layer_index(name);
    let quant = rules
        .iter()
        .find(|r| match (r.layers, layer) {
            (None, _) => true,
            (Some((a, b)), Some(l)) => (a..=b).contains(&l),
            (Some(_), None) => false,
        })
        .map_or(default, |r| r.quant);
    fit_rows(quant, cols)
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
        assert!(
            parse_bits("q4_0", 64, true)
                .unwrap_err()
                .contains("double quantization")
        );
        for bad in [
            "nf3-b0", "nf3-x", "nf9", "nf3-b", "fp4-b64", "q3_k", "q4_0-dq", "q6_k-dq",
        ] {
            assert!(parse_quantizer(bad, 64, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_and_applies_layer_rules() {
        let rules = parse_layer_bits("0-3:nf4, *:nf2", 64, false).unwrap();
        let nf2 = parse_bits("nf2", 64, false).unwrap();
        let nf4 = parse_bits("nf4", 64, false).unwrap();
        assert_eq!(
            quant_for("model.layers.3.mlp.up_proj.weight", 64, &rules, nf4),
            nf4
        );
        assert_eq!(
            quant_for("model.layers.4.mlp.up_proj.weight", 64, &rules, nf4),
            nf2
        );
        assert!(parse_layer_bits("3-1:nf4", 64, false).is_err());
        // K-quants fall back on rows that are not whole super-blocks, as llama-quantize does.
        let q4k = parse_bits("q4_k", 64, false).unwrap();
        let rules = parse_layer_bits("*:q6_k", 64, false).unwrap();
        assert_eq!(
            quant_for("model.layers.0.mlp.down_proj.weight", 1536, &[], q4k),
            q4k
        );
        assert_eq!(
            quant_for("model.layers.0.self_attn.q_proj.weight", 576, &[], q4k).label(),
            "q5_0"
        );
        assert_eq!(
            quant_for("model.layers.0.self_attn.q_proj.weight", 576, &rules, q4k).label(),
            "q8_0"
        );
        assert_eq!(fit_rows(nf4, 576), nf4);
        assert!(parse_bits("nf9", 64, false).is_err());
        assert!(parse_bits("fp4", 64, false).is_err());
        assert_eq!(
            layer_index("encoder.layer.5.attention.self.query.weight"),
            Some(5)
        );
        assert!(module_matches("model.layers.0.self_attn.q_proj", "q_proj"));
        assert!(!module_matches("model.layers.0.self_attn.q_proj", "proj"));
        assert!(is_embedding_or_head("model.embed_tokens.weight"));
    }
}
