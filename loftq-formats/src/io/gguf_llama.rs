//! A llama.cpp GGUF file seen as a Hugging Face Llama checkpoint: HF names, HF row order for
//! `q_proj`/`k_proj`, a [`LlamaConfig`] from the metadata, and `tokenizer.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::Value;

use super::gguf::{Gguf, MetaValue};
use super::gguf_vocab::vocabulary_json;
use super::{HostTensor, OutTensor, TensorSource, write_atomic, write_safetensors};
use crate::config::{Family, LINEAR_PATHS, LlamaConfig, RopeConfig, RopeScaling};
use crate::{ModelError, Result};

/// A GGUF Llama-family model.
#[derive(Debug)]
pub struct GgufModel {
    /// The file.
    pub gguf: Gguf,
    /// The architecture from its metadata.
    pub config: LlamaConfig,
}

/// GGUF tensor name of HF name `hf`, e.g. `model.layers.3.self_attn.q_proj.weight` →
/// `blk.3.attn_q.weight`.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return Some((*g).to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// HF name of GGUF tensor `g` (inverse of [`gguf_name`]).
pub fn hf_name(g: &str, layers: usize) -> Option<String> {
    let fixed = [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ];
    if let Some(h) = fixed.iter().find(|h| gguf_name(h).as_deref() == Some(g)) {
        return Some((*h).to_string());
    }
    let rest = g.strip_prefix("blk.")?;
    let (layer, _) = rest.split_once('.')?;
    let l: usize = layer.parse().ok().filter(|&l| l < layers)?;
    ["input_layernorm", "post_attention_layernorm"]
        .iter()
        .chain(LINEAR_PATHS.iter())
        .flat_map(|m| ["weight", "bias"].map(|k| format!("model.layers.{l}.{m}.{k}")))
        .find(|h| gguf_name(h).as_deref() == Some(g))
}

/// Undoes llama.cpp's row permutation of `q_proj`/`k_proj` (for its interleaved RoPE):
/// HF row `(head, i, j)` of `[heads, 2, rows/heads/2]` is GGUF row `(head, j, i)`.
///
/// # Panics
/// If `rows` is not a multiple of `2·heads` or `w.len() != rows·cols`.
pub fn unpermute_rows(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    assert_eq!(w.len(), rows * cols);
    permute_rows(w, rows, heads, false)
}

/// Moves the rows of a `q_proj`/`k_proj` matrix (or any per-row data of one, such as its
/// encoded blocks) between HF's order and llama.cpp's (`to_gguf`), see [`unpermute_rows`].
///
/// # Panics
/// If `rows` is not a multiple of `2·heads` or `w.len()` of `rows`.
pub fn permute_rows<T: Copy + Default>(
    w: &[T],
    rows: usize,
    heads: usize,
    to_gguf: bool,
) -> Vec<T> {
    assert!(rows.is_multiple_of(2 * heads) && w.len().is_multiple_of(rows.max(1)));
    let cols = w.len() / rows.max(1);
    let per = rows / heads;
    let half = per / 2;
    let mut out = vec![T::default(); w.len()];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..half {
                let hf = h * per + i * half + j;
                let gguf = h * per + 2 * j + i;
                let (dst, src) = if to_gguf { (gguf, hf) } else { (hf, gguf) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// The rotary heads whose rows llama.cpp permutes in HF tensor `name` (`q_proj` and `k_proj`
/// weights and biases), or `None`.
pub fn rotary_heads(config: &LlamaConfig, name: &str) -> Option<usize> {
    let module = name.rsplit_once('.').map_or(name, |(m, _)| m);
    if module.ends_with("self_attn.q_proj") {
        Some(config.num_attention_heads)
    } else if module.ends_with("self_attn.k_proj") {
        Some(config.num_key_value_heads)
    } else {
        None
    }
}

impl GgufModel {
    /// Opens a GGUF file and reads its architecture.
    ///
    /// # Errors
    /// [`ModelError::Format`] if the file is malformed or not a supported architecture.
    pub fn open(path: &Path) -> Result<Self> {
        let gguf = Gguf::open(path)?;
        let config = config_from_gguf(&gguf).map_err(|m| ModelError::format(path, m))?;
        let model = Self { gguf, config };
        // Every linear weight has the shape the metadata gives, checked from the table
        // alone, before a command computes with (or converts) any of them.
        for name in model.tensor_names() {
            if let Some(want) = model.config.linear_shape(&name) {
                let got = model.shape(&name)?;
                if got != want {
                    return Err(ModelError::tensor(
                        path,
                        &name,
                        format!("shape {got:?}, the metadata's architecture gives {want:?}"),
                    ));
                }
            }
        }
        Ok(model)
    }

    /// `tokenizer.json` (Hugging Face `tokenizers` format) built from the GGUF vocabulary.
    ///
    /// # Errors
    /// As [`vocabulary_json`].
    pub fn tokenizer_json(&self) -> Result<Value> {
        vocabulary_json(&self.gguf)
    }

    /// Writes an HF-style directory: `config.json`, `model.safetensors` (every tensor
    /// dequantized to `f32`, HF names and row order), `tokenizer.json` when the file has
    /// a vocabulary, and `chat_template.jinja` when it has a chat template. Each file is
    /// written atomically.
    ///
    /// # Errors
    /// [`ModelError`] naming the tensor for unsupported types; I/O errors.
    pub fn convert(&self, out: &Path) -> Result<()> {
        let tokenizer = match self.gguf.meta("tokenizer.ggml.model") {
            Some(_) => Some(self.tokenizer_json()?),
            None => None,
        };
        let mut tensors = BTreeMap::new();
        for name in self.tensor_names() {
            let t = self.tensor(&name)?;
            tensors.insert(name, OutTensor::f32(t.shape, &t.data));
        }
        std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(&out.join("model.safetensors"), &tensors, Some(meta))?;
        let config = serde_json::to_string_pretty(&self.config.to_hf_json()).expect("json");
        write_atomic(&out.join("config.json"), config.as_bytes())?;
        if let Some(tok) = tokenizer {
            let text = serde_json::to_string(&tok).expect("json");
            write_atomic(&out.join("tokenizer.json"), text.as_bytes())?;
        }
        if let Some(t) = self
            .gguf
            .meta("tokenizer.chat_template")
            .and_then(MetaValue::as_str)
        {
            write_atomic(&out.join("chat_template.jinja"), t.as_bytes())?;
        }
        Ok(())
    }
}

impl TensorSource for GgufModel {
    fn root(&self) -> &Path {
        self.gguf.path()
    }

    fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .gguf
            .tensors
            .keys()
            .filter_map(|g| hf_name(g, self.config.num_hidden_layers))
            .collect();
        v.sort();
        v
    }

    fn llama_config(&self) -> Option<&LlamaConfig> {
        Some(&self.config)
    }

    fn release(&self, name: &str) {
        if let Some(g) = gguf_name(name) {
            self.gguf.release(&g);
        }
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let g = gguf_name(name)
            .ok_or_else(|| ModelError::tensor(self.root(), name, "has no GGUF counterpart"))?;
        self.gguf
            .tensors
            .get(&g)
            .map(|t| t.shape.clone())
            .ok_or_else(|| ModelError::tensor(self.root(), &g, "not found"))
    }

    fn tensor(&self, name: &str) -> Result<HostTensor> {
        let g = gguf_name(name)
            .ok_or_else(|| ModelError::tensor(self.root(), name, "has no GGUF counterpart"))?;
        let (shape, mut data) = self.gguf.f32(&g)?;
        let heads = rotary_heads(&self.config, name);
        if let Some(h) = heads {
            let rows = shape[0];
            let cols = data.len() / rows.max(1);
            if !rows.is_multiple_of(2 * h) {
                return Err(ModelError::tensor(
                    self.root(),
                    &g,
                    format!("{rows} rows cannot be split into {h} rotary heads"),
                ));
            }
            data = unpermute_rows(&data, rows, cols, h);
        }
        Ok(HostTensor { shape, data })
    }
}

fn config_from_gguf(g: &Gguf) -> Result<LlamaConfig, String> {
    let arch = g
        .meta("general.architecture")
        .and_then(MetaValue::as_str)
        .ok_or("no general.architecture")?;
    let family = match arch {
        "llama" => Family::Llama,
        "mistral" => Family::Mistral,
        "qwen2" => Family::Qwen2,
        other => {
            return Err(format!(
                "architecture `{other}` is not supported (llama, mistral, qwen2)"
            ));
        }
    };
    let int = |key: &str| -> Result<usize, String> {
        g.meta(&format!("{arch}.{key}"))
            .and_then(MetaValue::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| format!("missing or non-integer `{arch}.{key}`"))
    };
    let float = |key: &str| g.meta(&format!("{arch}.{key}")).and_then(MetaValue::as_f64);
    let hidden = int("embedding_length")?;
    let heads = int("attention.head_count")?;
    let kv_heads = int("attention.head_count_kv").unwrap_or(heads);
    let layers = int("block_count")?;
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(format!("head counts {heads}/{kv_heads} are inconsistent"));
    }
    let scaling = match g
        .meta(&format!("{arch}.rope.scaling.type"))
        .and_then(MetaValue::as_str)
    {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: float("rope.scaling.factor").ok_or("linear RoPE scaling without a factor")?,
        },
        Some(other) => return Err(format!("RoPE scaling `{other}` is not supported")),
    };
    let tokens = g
        .meta("tokenizer.ggml.tokens")
        .and_then(MetaValue::as_array)
        .map(<[MetaValue]>::len);
    let vocab = int("vocab_size")
        .ok()
        .or(tokens)
        .or_else(|| g.tensors.get("token_embd.weight").map(|t| t.shape[0]));
    let tok_id = |k: &str| {
        g.meta(&format!("tokenizer.ggml.{k}"))
            .and_then(MetaValue::as_u64)
            .and_then(|v| u32::try_from(v).ok())
    };
    let head_dim = int("attention.key_length").unwrap_or(hidden / heads);
    let theta = float("rope.freq_base").unwrap_or(10_000.0);
    // Llama 3.1+: the scaling as one divisor per frequency.
    let scaling = match (g.tensors.contains_key("rope_freqs.weight"), scaling) {
        (true, RopeScaling::None) => {
            let (_, factors) = g.f32("rope_freqs.weight").map_err(|e| e.to_string())?;
            super::gguf_rope::llama3_from_factors(&factors, theta, head_dim)?
        }
        (true, _) => return Err("both rope_freqs.weight and a RoPE scaling type".into()),
        (false, s) => s,
    };
    let qkv_bias = g.tensors.contains_key("blk.0.attn_q.bias");
    LlamaConfig {
        family,
        vocab_size: vocab.ok_or("cannot tell the vocabulary size")?,
        hidden_size: hidden,
        intermediate_size: int("feed_forward_length")?,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope: RopeConfig { theta, scaling },
        tie_word_embeddings: !g.tensors.contains_key("output.weight"),
        qkv_bias: qkv_bias || family == Family::Qwen2,
        o_bias: g.tensors.contains_key("blk.0.attn_output.bias"),
        mlp_bias: false,
        max_position_embeddings: int("context_length").unwrap_or(2048),
        bos_token_id: tok_id("bos_token_id"),
        eos_token_id: tok_id("eos_token_id"),
        // llama.cpp computes these architectures with full attention.
        sliding_window: None,
        partial_rotary_factor: None,
    }
    .validated()
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for hf in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.norm.weight",
            "model.layers.12.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.bias",
            "model.layers.3.mlp.down_proj.weight",
            "model.layers.3.post_attention_layernorm.weight",
        ] {
            let g = gguf_name(hf).unwrap();
            assert_eq!(hf_name(&g, 30).as_deref(), Some(hf), "{g}");
        }
        assert_eq!(
            gguf_name("model.layers.1.mlp.up_proj.weight").unwrap(),
            "blk.1.ffn_up.weight"
        );
        assert_eq!(hf_name("blk.40.ffn_up.weight", 30), None);
        assert_eq!(hf_name("rope_freqs.weight", 30), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(h, 2, rows/h/2, cols).swapaxes(1, 2).reshape(rows, cols).
        let (rows, cols, heads) = (12, 3, 3);
        let w: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let half = rows / heads / 2;
        let mut permuted = vec![0.0; w.len()];
        for h in 0..heads {
            for j in 0..half {
                for i in 0..2 {
                    let src = h * 2 * half + i * half + j; // (h, i, j) of [h, 2, half]
                    let dst = h * 2 * half + j * 2 + i; // (h, j, i) of [h, half, 2]
                    permuted[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_ne!(permuted, w);
        assert_eq!(unpermute_rows(&permuted, rows, cols, heads), w);
    }
}
