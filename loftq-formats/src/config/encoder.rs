//! [`EncoderConfig`]: an encoder with a sequence-classification head, read from a Hugging Face
//! `config.json`: BERT-family (`model_type: bert`, e.g. MiniLM) or DeBERTa-v2/v3
//! (`deberta-v2`, disentangled relative attention).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{fits, nonzero, positive};
use super::relative::{RawRelative, deberta_relative};
use super::{Activation, ConfigError, RelativeAttention};
use crate::{ModelError, Result};

/// The linear layers of a BERT layer, as paths inside `encoder.layer.N`.
pub const ENCODER_LINEAR_PATHS: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

/// The linear layers of a DeBERTa-v2 layer, as paths inside `encoder.layer.N`.
pub const DEBERTA_LINEAR_PATHS: [&str; 6] = [
    "attention.self.query_proj",
    "attention.self.key_proj",
    "attention.self.value_proj",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

/// Which encoder: they share the layer (post-norm attention and GELU MLP) and differ in
/// names, positions and pooler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EncoderKind {
    /// BERT and its family (MiniLM): absolute positions, a tanh pooler under `bert.`.
    Bert,
    /// DeBERTa-v2 and v3: relative positions in the attention, a context pooler beside
    /// `deberta.`.
    DebertaV2,
}

impl EncoderKind {
    /// The linear layers of an encoder layer, as paths inside `encoder.layer.N`, queries,
    /// keys and values first.
    pub fn linear_paths(self) -> [&'static str; 6] {
        match self {
            Self::Bert => ENCODER_LINEAR_PATHS,
            Self::DebertaV2 => DEBERTA_LINEAR_PATHS,
        }
    }

    /// What a classifier's checkpoint puts before `embeddings.` and `encoder.`.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Bert => "bert.",
            Self::DebertaV2 => "deberta.",
        }
    }
}

/// The architecture of an encoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncoderConfig {
    /// BERT or DeBERTa-v2.
    pub kind: EncoderKind,
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
    /// Whether learned absolute positions are added to the input (always for BERT;
    /// DeBERTa's `position_biased_input`).
    pub absolute_positions: bool,
    /// Segment types (sentence A/B); 0: none (DeBERTa-v3).
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// The intermediate activation (`gelu`, or `gelu_new`).
    pub hidden_act: Activation,
    /// The pooler's activation: tanh for BERT, `pooler_hidden_act` for DeBERTa.
    pub pooler_act: Activation,
    /// DeBERTa's relative attention, when on.
    pub relative: Option<RelativeAttention>,
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
    // DeBERTa-v2.
    #[serde(flatten)]
    relative: RawRelative,
    position_biased_input: Option<bool>,
    pooler_hidden_act: Option<String>,
    pooler_hidden_size: Option<usize>,
    embedding_size: Option<usize>,
    conv_kernel_size: Option<usize>,
    attention_head_size: Option<usize>,
}

/// The activation `name` among `allowed`.
fn activation(
    field: &'static str,
    name: &str,
    allowed: &[Activation],
) -> Result<Activation, ConfigError> {
    allowed
        .iter()
        .copied()
        .find(|a| a.names().contains(&name))
        .ok_or_else(|| ConfigError::Unsupported {
            field,
            value: name.to_string(),
            supported: "gelu, gelu_new (and tanh for a pooler)",
        })
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
        let kind = match raw.model_type.as_deref() {
            Some("bert") => EncoderKind::Bert,
            Some("deberta-v2") => EncoderKind::DebertaV2,
            other => {
                let other = other.unwrap_or("none");
                return Err(unsupported("model_type", other, "bert, deberta-v2"));
            }
        };
        if let Some(p) = (raw.position_embedding_type.as_ref()).filter(|p| *p != "absolute") {
            return Err(unsupported("position_embedding_type", p, "absolute"));
        }
        let gelus = [Activation::Gelu, Activation::GeluTanh];
        let hidden_act = activation(
            "hidden_act",
            raw.hidden_act.as_deref().unwrap_or("gelu"),
            &gelus,
        )?;
        let h = raw.hidden_size;
        let (pooler_act, relative) = match kind {
            EncoderKind::Bert => (Activation::Tanh, None),
            EncoderKind::DebertaV2 => {
                let acts = [Activation::Gelu, Activation::GeluTanh, Activation::Tanh];
                let act = raw.pooler_hidden_act.as_deref().unwrap_or("gelu");
                let pooler_act = activation("pooler_hidden_act", act, &acts)?;
                let same = |field, v: Option<usize>, what| match v {
                    Some(v) if v != h => Err(unsupported(field, &v.to_string(), what)),
                    _ => Ok(()),
                };
                same("pooler_hidden_size", raw.pooler_hidden_size, "hidden_size")?;
                same("embedding_size", raw.embedding_size, "hidden_size")?;
                if let Some(w) = raw.attention_head_size
                    && w.checked_mul(raw.num_attention_heads) != Some(h)
                {
                    let what = "hidden_size / num_attention_heads";
                    return Err(unsupported("attention_head_size", &w.to_string(), what));
                }
                if let Some(k) = raw.conv_kernel_size.filter(|&k| k > 0) {
                    return Err(unsupported(
                        "conv_kernel_size",
                        &k.to_string(),
                        "0 (no ConvLayer)",
                    ));
                }
                (
                    pooler_act,
                    deberta_relative(&raw.relative, raw.max_position_embeddings)?,
                )
            }
        };
        let config = Self {
            kind,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            max_position_embeddings: raw.max_position_embeddings,
            absolute_positions: kind == EncoderKind::Bert
                || raw.position_biased_input.unwrap_or(true),
            type_vocab_size: raw.type_vocab_size.unwrap_or(2),
            layer_norm_eps: (raw.layer_norm_eps).unwrap_or(match kind {
                EncoderKind::Bert => 1e-12,
                EncoderKind::DebertaV2 => 1e-7,
            }),
            hidden_act,
            pooler_act,
            relative,
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
            ("num_labels", self.num_labels),
        ])?;
        if self.kind == EncoderKind::Bert {
            nonzero(&[("type_vocab_size", self.type_vocab_size)])?;
        }
        let (h, heads) = (self.hidden_size, self.num_attention_heads);
        if !h.is_multiple_of(heads) {
            return Err(ConfigError::value(
                "num_attention_heads",
                format!("hidden_size {h} is not a multiple of num_attention_heads {heads}"),
            ));
        }
        let span = self.relative.as_ref().map_or(0, RelativeAttention::span);
        let products = [
            self.vocab_size.checked_mul(h),
            self.intermediate_size.checked_mul(h),
            self.max_position_embeddings.checked_mul(h),
            self.type_vocab_size.checked_mul(h),
            span.checked_mul(2).and_then(|s| s.checked_mul(h)),
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
    /// (`[bert.]encoder.layer.N.attention.self.query.weight`, `[bert.]pooler.dense.weight`,
    /// `deberta.encoder.layer.N.attention.self.query_proj.weight`, ...); `None` for other
    /// names.
    pub fn linear_shape(&self, name: &str) -> Option<[usize; 2]> {
        let (h, inter) = (self.hidden_size, self.intermediate_size);
        let name = name.strip_prefix(self.kind.prefix()).unwrap_or(name);
        if name == "pooler.dense.weight" {
            return Some([h, h]);
        }
        let path = name.strip_prefix("encoder.layer.")?.split_once('.')?.1;
        match path.strip_suffix(".weight")? {
            "intermediate.dense" => Some([inter, h]),
            "output.dense" => Some([h, inter]),
            p if self.kind.linear_paths().contains(&p) => Some([h, h]),
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
    /// An encoder (BERT-family or DeBERTa-v2).
    Encoder(EncoderConfig),
}

impl Architecture {
    /// Reads `config.json`: an encoder when `model_type` is one, a decoder otherwise.
    ///
    /// # Errors
    /// As [`EncoderConfig::from_file`] and [`super::LlamaConfig::from_file`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text).map_err(|e| ModelError::format(path, e.to_string()))
    }

    /// Parses the text of a `config.json`: an encoder when `model_type` is one, a decoder
    /// otherwise.
    ///
    /// # Errors
    /// As [`EncoderConfig::from_json`] and [`super::LlamaConfig::from_json`].
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let model_type = serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|v| Some(v.get("model_type")?.as_str()?.to_string()));
        match model_type.as_deref() {
            Some("bert" | "deberta-v2" | "deberta") => {
                EncoderConfig::from_json(text).map(Self::Encoder)
            }
            _ => super::LlamaConfig::from_json(text).map(Self::Decoder),
        }
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

    #[test]
    fn reads_deberta_v2_and_v3_and_refuses_what_it_cannot_run() {
        let v3 = r#", "model_type": "deberta-v2", "relative_attention": true,
            "position_buckets": 256, "max_relative_positions": -1, "pos_att_type": ["p2c", "c2p"],
            "share_att_key": true, "norm_rel_ebd": "layer_norm", "position_biased_input": false,
            "type_vocab_size": 0, "pooler_hidden_act": "gelu", "pooler_hidden_size": 32"#;
        let c = EncoderConfig::from_json(&format!("{{{BASE}{v3}}}")).unwrap();
        assert_eq!(c.kind, EncoderKind::DebertaV2);
        assert!(!c.absolute_positions && c.type_vocab_size == 0 && c.layer_norm_eps == 1e-7);
        let rel = c.relative.clone().unwrap();
        assert_eq!(
            (rel.buckets, rel.max_relative_positions, rel.span()),
            (Some(256), 32, 256)
        );
        assert!(rel.c2p && rel.p2c && rel.norm);
        assert_eq!(c.pooler_act, Activation::Gelu);
        assert_eq!(
            c.linear_shape("deberta.encoder.layer.1.attention.self.query_proj.weight"),
            Some([32, 32])
        );
        assert_eq!(
            c.linear_shape("deberta.encoder.layer.1.attention.self.query.weight"),
            None
        );
        // The older spelling of the score kinds.
        let v2 = r#", "model_type": "deberta-v2", "relative_attention": true,
            "pos_att_type": "c2p|p2c", "share_att_key": true"#;
        let c = EncoderConfig::from_json(&format!("{{{BASE}{v2}}}")).unwrap();
        let rel = c.relative.unwrap();
        assert!(rel.c2p && rel.p2c && !rel.norm && rel.buckets.is_none());
        assert!(c.absolute_positions && c.type_vocab_size == 2);
        // Each field set over v3's.
        let refused = |field: &str, value: Value, what: &str| {
            let mut json: Value = serde_json::from_str(&format!("{{{BASE}{v3}}}")).unwrap();
            json[field] = value;
            let err = EncoderConfig::from_json(&json.to_string())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(what) && !err.contains("duplicate"),
                "{what}: {err}"
            );
        };
        refused("conv_kernel_size", 3.into(), "conv_kernel_size");
        refused("share_att_key", false.into(), "share_att_key");
        refused("embedding_size", 16.into(), "embedding_size");
        refused("pooler_hidden_size", 16.into(), "pooler_hidden_size");
        refused("attention_head_size", 16.into(), "attention_head_size");
        refused("pos_att_type", serde_json::json!(["p2p"]), "p2p");
        refused("pooler_hidden_act", "relu".into(), "relu");
        let v1 = format!(r#"{{{BASE}, "model_type": "deberta"}}"#);
        let err = EncoderConfig::from_json(&v1).unwrap_err().to_string();
        assert!(err.contains("deberta-v2"), "{err}");
    }
}
