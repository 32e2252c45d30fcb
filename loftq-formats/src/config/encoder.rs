//! [`EncoderConfig`]: a BERT-family encoder with a sequence-classification head, read from a
//! Hugging Face `config.json` (`model_type: bert`, e.g. MiniLM).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{fits, nonzero, positive};
use super::{Activation, ConfigError};
use crate::{ModelError, Result};

/// The linear layers of an encoder layer, as paths inside `encoder.layer.N`.
pub const ENCODER_LINEAR_PATHS: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

/// The architecture of a BERT-family encoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncoderConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of each layer's intermediate projection.
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Learned positions.
    pub max_position_embeddings: usize,
    /// Segment types (sentence A/B).
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// The intermediate activation (`gelu`, or `gelu_new`).
    pub hidden_act: Activation,
    /// Classes of the classification head (`id2label`'s size; 2 when not declared).
    pub num_labels: usize,
    /// The padding token.
    pub pad_token_id: u32,
}

#[derive(Deserialize)]
struct RawEncoder {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    type_vocab_size: Option<usize>,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    num_labels: Option<usize>,
    id2label: Option<BTreeMap<String, Value>>,
    pad_token_id: Option<u32>,
    position_embedding_type: Option<String>,
}

impl EncoderConfig {
    /// Reads `config.json`.
    ///
    /// # Errors
    /// [`ModelError::Io`] if the file cannot be read, [`ModelError::Format`] if it is not an
    /// encoder this crate runs.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text).map_err(|e| ModelError::format(path, e.to_string()))
    }

    /// Parses the text of a `config.json`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the missing, unsupported or bad field.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let raw: RawEncoder =
            serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        let unsupported = |field, value: &str, supported| ConfigError::Unsupported {
            field,
            value: value.to_string(),
            supported,
        };
        match raw.model_type.as_deref() {
            Some("bert") => {}
            other => return Err(unsupported("model_type", other.unwrap_or("none"), "bert")),
        }
        if let Some(p) = raw.position_embedding_type.filter(|p| p != "absolute") {
            return Err(unsupported("position_embedding_type", &p, "absolute"));
        }
        let act = raw.hidden_act.as_deref().unwrap_or("gelu");
        let Some(hidden_act) = [Activation::Gelu, Activation::GeluTanh]
            .into_iter()
            .find(|a| a.names().contains(&act))
        else {
            return Err(unsupported("hidden_act", act, "gelu, gelu_new"));
        };
        let config = Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            max_position_embeddings: raw.max_position_embeddings,
            type_vocab_size: raw.type_vocab_size.unwrap_or(2),
            layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-12),
            hidden_act,
            num_labels: (raw.id2label.map(|m| m.len()))
                .or(raw.num_labels)
                .unwrap_or(2),
            pad_token_id: raw.pad_token_id.unwrap_or(0),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the sizes before anything is allocated from them: positive, whole heads, a
    /// finite positive epsilon, products that fit.
    ///
    /// # Errors
    /// [`ConfigError::Value`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        nonzero(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
            ("num_labels", self.num_labels),
        ])?;
        let (h, heads) = (self.hidden_size, self.num_attention_heads);
        if !h.is_multiple_of(heads) {
            return Err(ConfigError::value(
                "num_attention_heads",
                format!("hidden_size {h} is not a multiple of num_attention_heads {heads}"),
            ));
        }
        let products = [
            self.vocab_size.checked_mul(h),
            self.intermediate_size.checked_mul(h),
            self.max_position_embeddings.checked_mul(h),
        ];
        fits(&products, "hidden_size", || "sizes too large".into())?;
        positive("layer_norm_eps", self.layer_norm_eps)?;
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The `[out, in]` shape of a linear weight of the encoder or its pooler
    /// (`[bert.]encoder.layer.N.attention.self.query.weight`, `[bert.]pooler.dense.weight`);
    /// `None` for other names.
    pub fn linear_shape(&self, name: &str) -> Option<[usize; 2]> {
        let (h, inter) = (self.hidden_size, self.intermediate_size);
        let name = name.strip_prefix("bert.").unwrap_or(name);
        if name == "pooler.dense.weight" {
            return Some([h, h]);
        }
        let path = name.strip_prefix("encoder.layer.")?.split_once('.')?.1;
        match path.strip_suffix(".weight")? {
            "intermediate.dense" => Some([inter, h]),
            "output.dense" => Some([h, inter]),
            p if ENCODER_LINEAR_PATHS.contains(&p) => Some([h, h]),
            _ => None,
        }
    }
}

/// A model's architecture as its `config.json` gives it: a causal LM of the Llama family, or
/// an encoder.
#[derive(Clone, Debug, PartialEq)]
pub enum Architecture {
    /// A decoder-only causal LM.
    Decoder(super::LlamaConfig),
    /// A BERT-family encoder.
    Encoder(EncoderConfig),
}

impl Architecture {
    /// Reads `config.json`: an encoder when `model_type` is one, a decoder otherwise.
    ///
    /// # Errors
    /// As [`EncoderConfig::from_file`] and [`super::LlamaConfig::from_file`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let model_type = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| Some(v.get("model_type")?.as_str()?.to_string()));
        let parsed = match model_type.as_deref() {
            Some("bert") => EncoderConfig::from_json(&text).map(Self::Encoder),
            _ => super::LlamaConfig::from_json(&text).map(Self::Decoder),
        };
        parsed.map_err(|e| ModelError::format(path, e.to_string()))
    }

    /// Number of decoder or encoder layers.
    pub fn num_hidden_layers(&self) -> usize {
        match self {
            Self::Decoder(c) => c.num_hidden_layers,
            Self::Encoder(c) => c.num_hidden_layers,
        }
    }

    /// A tensor of the last layer, as the end of its name (an encoder's may be prefixed): a
    /// checkpoint without it has fewer layers than the config says.
    pub fn last_layer_tensor(&self) -> Option<String> {
        match self {
            Self::Decoder(c) => c.last_layer_tensor(),
            Self::Encoder(c) => {
                let last = c.num_hidden_layers.checked_sub(1)?;
                Some(format!("encoder.layer.{last}.output.dense.weight"))
            }
        }
    }

    /// The `[out, in]` shape of linear weight `name`, if the architecture has it.
    pub fn linear_shape(&self, name: &str) -> Option<[usize; 2]> {
        match self {
            Self::Decoder(c) => c.linear_shape(name),
            Self::Encoder(c) => c.linear_shape(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#""vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 32"#;

    #[test]
    fn reads_bert_and_refuses_what_it_cannot_run() {
        let c = EncoderConfig::from_json(&format!(
            r#"{{{BASE}, "model_type": "bert", "id2label": {{"0": "a", "1": "b", "2": "c"}}}}"#
        ))
        .unwrap();
        assert_eq!((c.num_labels, c.head_dim(), c.type_vocab_size), (3, 8, 2));
        assert_eq!(c.hidden_act, Activation::Gelu);
        let refused = |extra: &str, what: &str| {
            let base = BASE.replace(r#", "num_attention_heads": 4"#, "");
            let heads = match extra.contains("num_attention_heads") {
                true => "",
                false => r#", "num_attention_heads": 4"#,
            };
            let json = format!(r#"{{{base}{heads}, "model_type": "bert"{extra}}}"#);
            let err = EncoderConfig::from_json(&json).unwrap_err().to_string();
            assert!(err.contains(what), "{what}: {err}");
        };
        refused(
            r#", "position_embedding_type": "relative_key""#,
            "relative_key",
        );
        refused(r#", "hidden_act": "relu""#, "relu");
        refused(r#", "num_attention_heads": 5"#, "not a multiple");
        refused(r#", "layer_norm_eps": 0"#, "layer_norm_eps");
        let llama = format!(r#"{{{BASE}, "model_type": "llama"}}"#);
        assert!(EncoderConfig::from_json(&llama).is_err());
    }
}
