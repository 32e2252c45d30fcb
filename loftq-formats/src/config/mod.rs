//! [`LlamaConfig`]: the architecture, read straight from a Hugging Face `config.json`.
//!
//! Both spellings of the rotary settings are accepted: transformers 4 (`rope_theta` and
//! `rope_scaling` at the top level) and transformers 5 (`rope_parameters`).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{ModelError, Result};

mod encoder;
mod error;
mod names;
mod relative;
mod rope;
mod window;

pub use encoder::{
    Architecture, DEBERTA_LINEAR_PATHS, ENCODER_LINEAR_PATHS, EncoderConfig, EncoderKind,
};
pub use error::ConfigError;
use error::{fits, nonzero, positive};
pub use names::{
    Activation, FUSED_LINEAR_PATHS, LINEAR_PATHS, Layout, PHI_LINEAR_PATHS, decoder_linear_paths,
    linear_layout, linear_path,
};
pub use relative::RelativeAttention;
pub use rope::{RopeConfig, RopeScaling, inv_freq, inv_freq_for};
use rope::{parse_rope, partial_rotary};
pub use window::SlidingWindow;
use window::sliding_window;

/// The model families this crate runs; they share the Llama block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Llama 2/3, SmolLM2, TinyLlama and other `LlamaForCausalLM` checkpoints.
    Llama,
    /// Mistral (sliding-window attention on every layer when `sliding_window` is set).
    Mistral,
    /// Qwen2: biases on `q_proj`, `k_proj` and `v_proj`.
    Qwen2,
    /// Phi-3: q/k/v fused in `qkv_proj`, gate/up in `gate_up_proj`; a sliding window on every
    /// layer when `sliding_window` is set.
    Phi3,
    /// Phi-1, 1.5 and 2 (`model_type: phi`): LayerNorm with biases, attention and MLP in
    /// parallel on one normalized input, `dense` output, `fc1`/`gelu_new`/`fc2` MLP, biases
    /// on every linear layer and the LM head, rotary embeddings on part of each head.
    Phi,
}

/// The architecture of a Llama-family causal LM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Which family (decides the q/k/v biases).
    pub family: Family,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// The norms' epsilon (RMSNorm's; Phi's LayerNorm `layer_norm_eps`).
    pub rms_norm_eps: f64,
    /// Rotary settings.
    pub rope: RopeConfig,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on `q_proj`, `k_proj`, `v_proj` (and `o_proj` when `attention_bias` is set).
    pub qkv_bias: bool,
    /// Bias on `o_proj`.
    pub o_bias: bool,
    /// Biases in the MLP projections.
    pub mlp_bias: bool,
    /// Longest context the checkpoint declares.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token, if declared.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token, if declared.
    pub eos_token_id: Option<u32>,
    /// Sliding-window attention on some layers (Mistral, Qwen2's `use_sliding_window`), or
    /// `None` for full causal attention everywhere.
    #[serde(default)]
    pub sliding_window: Option<SlidingWindow>,
    /// The share of each head the rotary embedding turns (its first dimensions), when not the
    /// whole head (Phi's `partial_rotary_factor`); see [`LlamaConfig::rotary_dim`].
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    layer_norm_eps: Option<f64>,
    qk_layernorm: Option<bool>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    max_position_embeddings: Option<usize>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    partial_rotary_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

impl LlamaConfig {
    /// Reads `config.json`.
    ///
    /// # Errors
    /// [`ModelError::Io`] if the file cannot be read, [`ModelError::Format`] if it is not a
    /// Llama-family config this crate supports.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text).map_err(|e| ModelError::format(path, e.to_string()))
    }

    /// Parses the text of a `config.json`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the missing, unsupported or bad field.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        let family = match raw.model_type.as_deref() {
            Some("llama") | None => Family::Llama,
            Some("mistral") => Family::Mistral,
            Some("qwen2") => Family::Qwen2,
            Some("phi3") => Family::Phi3,
            Some("phi") => Family::Phi,
            Some(other) => {
                return Err(ConfigError::Unsupported {
                    field: "model_type",
                    value: other.to_string(),
                    supported: "llama, mistral, qwen2, phi3, phi",
                });
            }
        };
        let partial_rotary_factor = partial_rotary(family, &raw)?;
        // Settings that change the computation and are not implemented are refused.
        let act = raw.hidden_act.as_deref();
        if let Some(act) = act.filter(|a| !family.activation().names().contains(a)) {
            return Err(ConfigError::Unsupported {
                field: "hidden_act",
                value: act.to_string(),
                supported: family.activation().names()[0],
            });
        }
        if raw.qk_layernorm == Some(true) {
            return Err(ConfigError::Unsupported {
                field: "qk_layernorm",
                value: "true".into(),
                supported: "false",
            });
        }
        let max_positions = raw.max_position_embeddings.unwrap_or(2048);
        let sliding_window = sliding_window(family, &raw)?;
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(ConfigError::value(
                "num_key_value_heads",
                format!(
                    "num_attention_heads {heads} is not a multiple of num_key_value_heads \
                     {kv_heads}"
                ),
            ));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(ConfigError::value(
                "head_dim",
                format!("head_dim {head_dim} must be even and positive"),
            ));
        }
        let positions = [
            raw.max_position_embeddings,
            raw.original_max_position_embeddings,
        ];
        let rope = parse_rope(
            raw.rope_theta,
            raw.rope_scaling,
            raw.rope_parameters,
            positions,
        )?;
        // Phi has a bias on every linear layer.
        let attention_bias = raw.attention_bias.unwrap_or(false) || family == Family::Phi;
        let config = Self {
            family,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: (raw.rms_norm_eps.or(raw.layer_norm_eps)).unwrap_or(1e-6),
            rope,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: attention_bias || family == Family::Qwen2,
            o_bias: attention_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false) || family == Family::Phi,
            max_position_embeddings: max_positions,
            bos_token_id: first_id(raw.bos_token_id),
            eos_token_id: first_id(raw.eos_token_id),
            sliding_window,
            partial_rotary_factor,
        };
        config.validate()?;
        Ok(config)
    }

    /// `self`, if [`validate`](Self::validate) passes.
    ///
    /// # Errors
    /// As [`validate`](Self::validate).
    pub fn validated(self) -> Result<Self, ConfigError> {
        self.validate()?;
        Ok(self)
    }

    /// Checks the values a model is built from, before anything is sized by them: positive
    /// sizes (zero decoder layers is a valid, if degenerate, model), whole groups of heads, an
    /// even head width, products that fit a `usize`, a finite positive norm epsilon and rotary
    /// base, and LongRoPE factors for every frequency of a head (read from `config.json` or a
    /// GGUF file).
    ///
    /// # Errors
    /// [`ConfigError::Value`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        nonzero(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
        ])?;
        let (heads, kv) = (self.num_attention_heads, self.num_key_value_heads);
        if !heads.is_multiple_of(kv) {
            return Err(ConfigError::value(
                "num_key_value_heads",
                format!(
                    "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
                ),
            ));
        }
        let d = self.head_dim;
        if d == 0 || !d.is_multiple_of(2) {
            return Err(ConfigError::value(
                "head_dim",
                format!("head_dim {d} must be even and positive"),
            ));
        }
        let products = [
            heads.checked_mul(d),
            self.vocab_size.checked_mul(self.hidden_size),
            self.intermediate_size.checked_mul(self.hidden_size),
        ];
        fits(&products, "hidden_size", || {
            format!(
                "sizes too large: {heads} heads × {d}, vocabulary {} × {}, MLP {} × {}",
                self.vocab_size, self.hidden_size, self.intermediate_size, self.hidden_size
            )
        })?;
        positive("rms_norm_eps", self.rms_norm_eps)?;
        let rd = self.rotary_dim();
        if rd == 0 || !rd.is_multiple_of(2) || rd > d {
            return Err(ConfigError::value(
                "partial_rotary_factor",
                format!("{rd} rotary dimensions of a head of {d}: must be even, 2 to {d}"),
            ));
        }
        positive("rope_theta", self.rope.theta)?;
        if let RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        } = &self.rope.scaling
            && (short_factor.len() != rd / 2 || long_factor.len() != rd / 2)
        {
            return Err(ConfigError::value(
                "rope_scaling",
                format!(
                    "longrope has {} short and {} long factors; {rd} rotary dimensions need {}",
                    short_factor.len(),
                    long_factor.len(),
                    rd / 2
                ),
            ));
        }
        Ok(())
    }

    /// How many of each head's first dimensions the rotary embedding turns: `head_dim` times
    /// [`partial_rotary_factor`](Self::partial_rotary_factor), rounded down as transformers
    /// does; the whole head without one.
    pub fn rotary_dim(&self) -> usize {
        match self.partial_rotary_factor {
            Some(f) => (self.head_dim as f64 * f) as usize,
            None => self.head_dim,
        }
    }

    /// The attention window of decoder layer `layer`, if it has one.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .filter(|w| layer >= w.first_layer)
            .map(|w| w.size)
    }

    /// The tensor the last decoder layer must have (`None` with no layers): a checkpoint
    /// without it has fewer layers than `num_hidden_layers` says.
    pub fn last_layer_tensor(&self) -> Option<String> {
        let last = self.num_hidden_layers.checked_sub(1)?;
        Some(format!("model.layers.{last}.input_layernorm.weight"))
    }

    /// The `[out, in]` shape of a decoder layer's linear weight `model.layers.N.<path>.weight`
    /// (`path` one of [`Family::linear_paths`]); `None` for other names.
    pub fn linear_shape(&self, name: &str) -> Option<[usize; 2]> {
        let (h, inter) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let path = name.strip_prefix("model.layers.")?.split_once('.')?.1;
        let path = path.strip_suffix(".weight")?;
        if !self.family.linear_paths().contains(&path) {
            return None;
        }
        Some(match path {
            "self_attn.q_proj" => [q, h],
            "self_attn.k_proj" | "self_attn.v_proj" => [kv, h],
            "self_attn.o_proj" | "self_attn.dense" => [h, q],
            "mlp.gate_proj" | "mlp.up_proj" | "mlp.fc1" => [inter, h],
            "mlp.down_proj" | "mlp.fc2" => [h, inter],
            "self_attn.qkv_proj" => [q + 2 * kv, h],
            "mlp.gate_up_proj" => [2 * inter, h],
            _ => unreachable!("every linear path has a shape"),
        })
    }

    /// The transformers-4 style `config.json` of this architecture (also read by
    /// transformers 5).
    pub fn to_hf_json(&self) -> Value {
        let (model_type, arch) = match self.family {
            Family::Llama => ("llama", "LlamaForCausalLM"),
            Family::Mistral => ("mistral", "MistralForCausalLM"),
            Family::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
            Family::Phi3 => ("phi3", "Phi3ForCausalLM"),
            Family::Phi => ("phi", "PhiForCausalLM"),
        };
        let rope_scaling = match &self.rope.scaling {
            RopeScaling::None => Value::Null,
            RopeScaling::Linear { factor } => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => serde_json::json!({
                "rope_type": "longrope",
                "short_factor": short_factor,
                "long_factor": long_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
                "attention_factor": attention_factor,
            }),
        };
        let mut v = serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.family.activation().names()[0],
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.o_bias,
            "mlp_bias": self.mlp_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        });
        if let Some(f) = self.partial_rotary_factor {
            v["partial_rotary_factor"] = f.into();
        }
        if self.family == Family::Phi {
            v["layer_norm_eps"] = self.rms_norm_eps.into();
            v["qk_layernorm"] = false.into();
        }
        if let Some(w) = self.sliding_window {
            v["sliding_window"] = w.size.into();
            if self.family == Family::Qwen2 {
                v["use_sliding_window"] = true.into();
                v["max_window_layers"] = w.first_layer.into();
            }
        }
        v
    }
}

fn first_id(v: Option<Value>) -> Option<u32> {
    match v? {
        Value::Number(n) => n.as_u64().and_then(|x| u32::try_from(x).ok()),
        Value::Array(items) => items.first().and_then(|x| x.as_u64())?.try_into().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
