//! Which tensors `loftq init` quantizes, and with which quantizer.

use loftq_core::QuantConfig;
use loftq_core::quant::{LabelError, fit_rows, parse_bits};
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

/// True for names of embeddings and output heads, which `all-linear` never targets: a
/// classification head (`classifier`, `score`) is trained in full, as PEFT's `modules_to_save`.
pub fn is_embedding_or_head(name: &str) -> bool {
    const PARTS: [&str; 6] = [
        "embed",
        "lm_head",
        "wte",
        "wpe",
        "word_embeddings",
        "embeddings.",
    ];
    const HEADS: [&str; 3] = ["output.weight", "classifier.weight", "score.weight"];
    PARTS.iter().any(|p| name.contains(p)) || HEADS.contains(&name)
}

/// The module path of a weight name (`...q_proj.weight` → `...q_proj`), if it is a weight.
pub fn module_of_weight(name: &str) -> Option<&str> {
    name.strip_suffix(".weight")
}

/// A per-layer precision rule: layers `from..=to` (or every layer) use `quant`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerRule {
    /// First layer, inclusive (`None` = every layer).
    pub layers: Option<(usize, usize)>,
    /// The quantizer.
    pub quant: QuantConfig,
}

/// A per-layer precision rule that does not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LayerRuleError {
    /// Not `RANGE:BITS`.
    #[error("layer rule `{0}` is not RANGE:BITS")]
    Form(String),
    /// A range that is not `*`, `N` or `A-B` with `A ≤ B`.
    #[error("bad layer range `{0}`")]
    Range(String),
    /// A quantizer label that does not parse.
    #[error(transparent)]
    Quantizer(#[from] LabelError),
}

/// Parses layer rules such as `"0-3:nf4,*:nf2"` (first matching rule wins).
///
/// # Errors
/// [`LayerRuleError`] naming the bad rule, range or quantizer.
pub fn parse_layer_bits(
    s: &str,
    block: usize,
    double_quant: bool,
) -> Result<Vec<LayerRule>, LayerRuleError> {
    split_list(s)
        .iter()
        .map(|rule| {
            let (range, bits) = rule
                .split_once(':')
                .ok_or_else(|| LayerRuleError::Form(rule.clone()))?;
            let layers = match range.trim() {
                "*" => None,
                r => {
                    let bad = || LayerRuleError::Range(r.to_string());
                    let (a, b) = r.split_once('-').unwrap_or((r, r));
                    let p = |x: &str| x.trim().parse::<usize>().map_err(|_| bad());
                    let (a, b) = (p(a)?, p(b)?);
                    if a > b {
                        return Err(bad());
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

#[cfg(test)]
mod tests {
    use super::*;

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
