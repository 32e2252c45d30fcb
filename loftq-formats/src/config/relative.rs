//! DeBERTa's relative-attention settings in `config.json`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ConfigError;

/// DeBERTa's disentangled attention: scores between contents and relative positions
/// (`c2p`, `p2c`), the positions' embeddings projected by the layer's own query and key
/// projections (`share_att_key`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelativeAttention {
    /// `position_buckets`: relative distances beyond half of it share log-spaced buckets.
    pub buckets: Option<usize>,
    /// `max_relative_positions` (`max_position_embeddings` when not set).
    pub max_relative_positions: usize,
    /// Content-to-position scores.
    pub c2p: bool,
    /// Position-to-content scores.
    pub p2c: bool,
    /// A LayerNorm on the relative embeddings (`norm_rel_ebd: layer_norm`).
    pub norm: bool,
}

impl RelativeAttention {
    /// Relative distances kept on each side: the embeddings table has twice as many rows.
    pub fn span(&self) -> usize {
        self.buckets.unwrap_or(self.max_relative_positions)
    }
}

/// The relative-attention fields of a DeBERTa-v2 `config.json`.
#[derive(Deserialize)]
pub(super) struct RawRelative {
    relative_attention: Option<bool>,
    position_buckets: Option<i64>,
    max_relative_positions: Option<i64>,
    pos_att_type: Option<Value>,
    share_att_key: Option<bool>,
    norm_rel_ebd: Option<String>,
}

/// DeBERTa's relative attention settings, as transformers reads them (`None` when off).
pub(super) fn deberta_relative(
    raw: &RawRelative,
    max_position_embeddings: usize,
) -> Result<Option<RelativeAttention>, ConfigError> {
    if raw.relative_attention != Some(true) {
        return Ok(None);
    }
    // A list, or the older "p2c|c2p" string.
    let kinds: Vec<String> = match &raw.pos_att_type {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => s.split('|').map(|x| x.trim().to_lowercase()).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().unwrap_or("?").trim().to_lowercase())
            .collect(),
        Some(other) => {
            return Err(ConfigError::value(
                "pos_att_type",
                format!("{other} is neither a list nor a string"),
            ));
        }
    };
    if let Some(k) = kinds
        .iter()
        .find(|k| !["c2p", "p2c", ""].contains(&k.as_str()))
    {
        return Err(ConfigError::Unsupported {
            field: "pos_att_type",
            value: k.clone(),
            supported: "c2p, p2c",
        });
    }
    let (c2p, p2c) = (
        kinds.iter().any(|k| k == "c2p"),
        kinds.iter().any(|k| k == "p2c"),
    );
    if (c2p || p2c) && raw.share_att_key != Some(true) {
        return Err(ConfigError::Unsupported {
            field: "share_att_key",
            value: "false".into(),
            supported: "true (positions projected by the query and key projections)",
        });
    }
    let positive = |v: Option<i64>| v.and_then(|v| usize::try_from(v).ok()).filter(|&v| v > 0);
    let norm = raw.norm_rel_ebd.as_deref().unwrap_or("none").to_lowercase();
    let norm: Vec<&str> = norm.split('|').map(str::trim).collect();
    Ok(Some(RelativeAttention {
        buckets: positive(raw.position_buckets),
        max_relative_positions: positive(raw.max_relative_positions)
            .unwrap_or(max_position_embeddings),
        c2p,
        p2c,
        norm: norm.contains(&"layer_norm"),
    }))
}
