//! Sliding-window attention as Mistral and Qwen2 configure it.

use serde::{Deserialize, Serialize};

use super::{ConfigError, Family, RawConfig};

/// Sliding-window attention: from layer `first_layer` on, position `i` attends to positions
/// `j` with `i - size < j ≤ i` only (transformers' `sliding_window_overlay`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlidingWindow {
    /// Positions each query sees, itself included.
    pub size: usize,
    /// The first layer that uses the window (Mistral: 0; Qwen2: `max_window_layers`).
    pub first_layer: usize,
}

/// The sliding window as transformers applies it: Mistral on every layer; Qwen2 only with
/// `use_sliding_window`, on the layers `layer_types` marks `sliding_attention` (by default those
/// from `max_window_layers` on); Llama never.
pub(super) fn sliding_window(
    family: Family,
    raw: &RawConfig,
) -> Result<Option<SlidingWindow>, ConfigError> {
    let (size, first_layer) = match family {
        Family::Llama | Family::Phi => return Ok(None),
        Family::Mistral | Family::Phi3 => (raw.sliding_window, 0),
        Family::Qwen2 if raw.use_sliding_window == Some(true) => {
            (raw.sliding_window, raw.max_window_layers.unwrap_or(28))
        }
        Family::Qwen2 => return Ok(None),
    };
    let Some(size) = size else {
        return Ok(None);
    };
    if size == 0 {
        return Err(ConfigError::value(
            "sliding_window",
            "sliding_window 0 leaves a position nothing to attend to",
        ));
    }
    let first_layer = match (&raw.layer_types, family) {
        (Some(types), Family::Qwen2) => {
            if types.len() != raw.num_hidden_layers {
                return Err(ConfigError::value(
                    "layer_types",
                    format!(
                        "layer_types has {} entries for {} layers",
                        types.len(),
                        raw.num_hidden_layers
                    ),
                ));
            }
            let full = types.iter().take_while(|t| *t == "full_attention").count();
            // Only full layers followed by sliding ones can be expressed (what transformers
            // derives from max_window_layers).
            if let Some(t) = types[full..].iter().find(|t| *t != "sliding_attention") {
                return Err(ConfigError::value(
                    "layer_types",
                    format!("layer_types {types:?}: `{t}` after a sliding layer is not supported"),
                ));
            }
            full
        }
        _ => first_layer,
    };
    Ok(Some(SlidingWindow { size, first_layer }))
}

#[cfg(test)]
mod tests {
    use super::super::LlamaConfig;
    use super::super::tests::BASE;

    #[test]
    fn settings_that_are_not_implemented_are_refused() {
        let parse = |extra: &str| LlamaConfig::from_json(&format!("{{{BASE}, {extra}}}"));
        // Mistral's window is on every layer; Qwen2 uses its window only when asked, from
        // max_window_layers on (28 by default) or as layer_types says.
        let window = |extra: &str| parse(extra).map(|c| (c.window(0), c.window(1)));
        let mistral = r#""model_type": "mistral", "max_position_embeddings": 32768"#;
        assert_eq!(
            window(&format!(r#"{mistral}, "sliding_window": 4096"#)),
            Ok((Some(4096), Some(4096)))
        );
        assert_eq!(
            window(&format!(r#"{mistral}, "sliding_window": null"#)),
            Ok((None, None))
        );
        let qwen = r#""model_type": "qwen2", "sliding_window": 4096"#;
        assert_eq!(window(qwen), Ok((None, None)));
        let on = format!(r#"{qwen}, "use_sliding_window": true"#);
        assert_eq!(window(&on), Ok((None, None)));
        assert_eq!(
            window(&format!(r#"{on}, "max_window_layers": 1"#)),
            Ok((None, Some(4096)))
        );
        assert_eq!(
            window(&format!(
                r#"{on}, "layer_types": ["sliding_attention", "sliding_attention"]"#
            )),
            Ok((Some(4096), Some(4096)))
        );
        // Patterns that cannot be expressed, and a window of nothing, are refused by name.
        let mixed = format!(r#"{on}, "layer_types": ["sliding_attention", "full_attention"]"#);
        assert!(
            parse(&mixed)
                .unwrap_err()
                .to_string()
                .contains("layer_types")
        );
        assert!(
            parse(r#""model_type": "mistral", "sliding_window": 0"#)
                .unwrap_err()
                .to_string()
                .contains("sliding_window 0")
        );
        // Llama ignores the field, as transformers does.
        assert_eq!(window(r#""sliding_window": 8"#), Ok((None, None)));
        assert!(
            parse(r#""hidden_act": "gelu""#)
                .unwrap_err()
                .to_string()
                .contains("gelu")
        );
        assert!(parse(r#""hidden_act": "silu""#).is_ok());
    }
}
