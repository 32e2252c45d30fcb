//! A Hugging Face Llama-family directory as a GGUF file, as llama.cpp's `convert_hf_to_gguf.py`
//! lays it out: the architecture from `config.json`, the byte-level BPE vocabulary of
//! `tokenizer.json` (tokens, types, merges, the pre-tokenizer's llama.cpp name), BOS/EOS, the
//! chat template; every tensor under its llama.cpp name in its own type (`f32`, `f16`, `bf16`;
//! vectors as `f32`), `q_proj`/`k_proj` rows in llama.cpp's order.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::ggml::GgmlType;
use super::gguf_llama::{GgufModel, gguf_name, permute_rows, rotary_heads};
use super::gguf_write::{GgufWriter, KvEntry, TensorInfo};
use super::{Checkpoint, TensorSource};
use crate::chat::PromptFormat;
use crate::config::{Family, RopeScaling};
use crate::{LlamaConfig, ModelError, Result, Tokenizer};

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The GGUF a model is described by: a `.gguf` file itself, or an HF directory converted
/// ([`write_gguf_from_hf`]) into a temporary file that is removed when this is dropped.
pub struct SourceGguf {
    /// The opened file.
    pub model: GgufModel,
    temp: Option<PathBuf>,
}

impl SourceGguf {
    /// Opens `path`, a `.gguf` file, or converts the HF directory `path` into `temp` first.
    ///
    /// # Errors
    /// As [`GgufModel::open`] and [`write_gguf_from_hf`].
    pub fn open(path: &Path, temp: &Path) -> Result<Self> {
        if super::is_gguf(path) {
            return Ok(Self {
                model: GgufModel::open(path)?,
                temp: None,
            });
        }
        let _ = std::fs::remove_file(temp);
        write_gguf_from_hf(path, temp)?;
        GgufModel::open(temp)
            .map(|model| Self {
                model,
                temp: Some(temp.to_path_buf()),
            })
            .inspect_err(|_| {
                let _ = std::fs::remove_file(temp);
            })
    }
}

impl Drop for SourceGguf {
    fn drop(&mut self) {
        if let Some(t) = &self.temp {
            let _ = std::fs::remove_file(t);
        }
    }
}

/// Writes `out`, the GGUF of HF directory `dir` (see the module doc). One tensor in memory at a
/// time; written atomically.
///
/// # Errors
/// What [`gguf_metadata`] refuses; a tensor without a llama.cpp name or in another dtype;
/// I/O errors. Nothing is left at `out` on error.
pub fn write_gguf_from_hf(dir: &Path, out: &Path) -> Result<()> {
    let (config, kv) = gguf_metadata(dir)?;
    let source = Checkpoint::open(dir)?;
    let mut names = source.tensor_names();
    names.sort_by_key(|n| order_key(n));
    // The checkpoint must be the architecture the metadata describes.
    let config_file = dir.join("config.json");
    if let Some(last) = config.last_layer_tensor()
        && !names.contains(&last)
    {
        return Err(ModelError::format(
            &config_file,
            format!(
                "{} layers, but the checkpoint has no `{last}`",
                config.num_hidden_layers
            ),
        ));
    }
    let mut infos = Vec::new();
    let mut plan = Vec::new();
    for name in &names {
        let g = gguf_name(name).ok_or_else(|| {
            ModelError::tensor(
                dir,
                name,
                "has no llama.cpp name (not a Llama-family tensor)",
            )
        })?;
        if source.quantized(name)? {
            return Err(ModelError::tensor(
                dir,
                name,
                "is quantized; give the full-precision model",
            ));
        }
        let entry = source.entry(name).expect("listed");
        let shape = entry.shape.clone();
        let layer = super::layer_index(name);
        if layer.is_some_and(|l| l >= config.num_hidden_layers) {
            return Err(ModelError::format(
                &config_file,
                format!("`{name}` is past the {} layers", config.num_hidden_layers),
            ));
        }
        if let Some(want) = config.linear_shape(name)
            && want.as_slice() != shape.as_slice()
        {
            return Err(ModelError::tensor(
                &source.file_of(name),
                name,
                format!("shape {shape:?}, the architecture gives {want:?}"),
            ));
        }
        if let Some(h) = rotary_heads(&config, name)
            && !shape[0].is_multiple_of(2 * h)
        {
            return Err(ModelError::tensor(
                dir,
                name,
                format!("shape {shape:?} is not {h} heads of rotary pairs"),
            ));
        }
        let numel: usize = shape.iter().product();
        let ty = match (shape.len(), entry.dtype) {
            (2, safetensors::Dtype::F16) => GgmlType::F16,
            (2, safetensors::Dtype::BF16) => GgmlType::BF16,
            _ => GgmlType::F32,
        };
        let (_, size) = ty.block_layout().expect("plain types");
        infos.push(TensorInfo {
            name: g,
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            ty,
            len: numel * size,
        });
        plan.push((name.clone(), ty, shape[0]));
    }
    let rope_freqs = llama3_factors(&config);
    if let Some(factors) = &rope_freqs {
        infos.push(TensorInfo {
            name: "rope_freqs.weight".into(),
            dims: vec![factors.len() as u64],
            ty: GgmlType::F32,
            len: 4 * factors.len(),
        });
    }
    let mut w = GgufWriter::create(out, &kv, &infos)?;
    for (info, (name, ty, rows)) in infos.iter().zip(&plan) {
        let t = super::check_finite(&source, name, source.tensor(name)?)?;
        let bytes = if *ty == GgmlType::F32 {
            super::f32_le_bytes(&t.data)
        } else {
            // f16 and bf16 as stored.
            source.raw(name)?.expect("a safetensors tensor").1
        };
        let bytes = match rotary_heads(&config, name) {
            Some(h) => permute_rows(&bytes, *rows, h, true),
            None => bytes,
        };
        w.write(&info.name, &bytes)?;
        TensorSource::release(&source, name);
    }
    if let Some(factors) = &rope_freqs {
        w.write("rope_freqs.weight", &super::f32_le_bytes(factors))?;
    }
    w.finish()
}

/// llama.cpp's order: the embeddings, the layers in order, the final norm and head.
fn order_key(name: &str) -> (usize, usize, String) {
    match super::layer_index(name) {
        Some(l) => (1, l, name.to_string()),
        None if name.contains("embed_tokens") => (0, 0, name.to_string()),
        None => (2, 0, name.to_string()),
    }
}

/// Llama 3.1's scaling as llama.cpp's converter stores it, one divisor per frequency; `None`
/// for another scaling.
fn llama3_factors(config: &LlamaConfig) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = config.rope.scaling
    else {
        return None;
    };
    Some(super::gguf_rope::converter_factors(
        config.rope.theta,
        config.head_dim,
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    ))
}

/// The config and the GGUF metadata of HF directory `dir`, checked before any tensor is read.
///
/// # Errors
/// [`ModelError::Format`] naming the file: a config this crate does not run, a `tokenizer.json`
/// that is not byte-level BPE with a pre-tokenizer llama.cpp names (GPT-2's, SmolLM2's digits,
/// Llama 3's, Qwen2's), a RoPE scaling llama.cpp's Llama has no key for.
pub fn gguf_metadata(dir: &Path) -> Result<(LlamaConfig, Vec<KvEntry>)> {
    let config = LlamaConfig::from_file(&dir.join("config.json"))?;
    let arch = match config.family {
        Family::Llama | Family::Mistral => "llama",
        Family::Qwen2 => "qwen2",
        Family::Phi3 | Family::Phi => {
            return Err(ModelError::format(
                &dir.join("config.json"),
                format!(
                    "{:?} has no GGUF conversion here yet (its layers are not Llama's)",
                    config.family
                ),
            ));
        }
    };
    let name = dir
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    let u = |k: &str, v: usize| KvEntry::u32(&format!("{arch}.{k}"), v as u32);
    let mut kv = vec![
        KvEntry::str("general.architecture", arch),
        KvEntry::str("general.name", &name),
        u("vocab_size", config.vocab_size),
        u("context_length", config.max_position_embeddings),
        u("embedding_length", config.hidden_size),
        u("block_count", config.num_hidden_layers),
        u("feed_forward_length", config.intermediate_size),
        u("rope.dimension_count", config.head_dim),
        u("attention.head_count", config.num_attention_heads),
        u("attention.head_count_kv", config.num_key_value_heads),
        KvEntry::f32(
            &format!("{arch}.attention.layer_norm_rms_epsilon"),
            config.rms_norm_eps as f32,
        ),
        KvEntry::f32(&format!("{arch}.rope.freq_base"), config.rope.theta as f32),
    ];
    if config.head_dim * config.num_attention_heads != config.hidden_size {
        kv.push(u("attention.key_length", config.head_dim));
        kv.push(u("attention.value_length", config.head_dim));
    }
    if let RopeScaling::LongRope { .. } = config.rope.scaling {
        return Err(ModelError::format(
            &dir.join("config.json"),
            "LongRoPE scaling has no llama.cpp Llama key",
        ));
    }
    if let RopeScaling::Linear { factor } = config.rope.scaling {
        kv.push(KvEntry::str(&format!("{arch}.rope.scaling.type"), "linear"));
        kv.push(KvEntry::f32(
            &format!("{arch}.rope.scaling.factor"),
            factor as f32,
        ));
    }
    kv.extend(vocabulary(dir, &config)?);
    Ok((config, kv))
}

/// The `tokenizer.*` entries of `dir`'s `tokenizer.json` (and its side files).
fn vocabulary(dir: &Path, config: &LlamaConfig) -> Result<Vec<KvEntry>> {
    let path = dir.join("tokenizer.json");
    let bad = |m: String| ModelError::format(&path, m);
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let tj: Value = serde_json::from_str(&text).map_err(|e| bad(format!("bad JSON: {e}")))?;
    let model = &tj["model"];
    if model["type"] != "BPE" || !tj["normalizer"].is_null() {
        return Err(bad(
            "only byte-level BPE vocabularies (no normalizer) are written as GGUF; \
             a SentencePiece one needs llama.cpp's convert_hf_to_gguf.py"
                .into(),
        ));
    }
    let pre = pre_tokenizer_name(&tj["pre_tokenizer"]).ok_or_else(|| {
        bad(format!(
            "pre-tokenizer {} has no llama.cpp name here (GPT-2's, SmolLM2's, Llama 3's, \
             Qwen2's)",
            tj["pre_tokenizer"]
        ))
    })?;
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object".into()))?;
    let added = tj["added_tokens"].as_array().cloned().unwrap_or_default();
    let id_of = |v: &Value| v.as_u64().map(|i| i as usize);
    let count = vocab
        .values()
        .chain(added.iter().map(|a| &a["id"]))
        .filter_map(id_of)
        .max()
        .map_or(0, |m| m + 1)
        .max(config.vocab_size);
    let mut tokens: Vec<Option<String>> = vec![None; count];
    let mut types = vec![NORMAL; count];
    for (tok, id) in vocab {
        let id = id_of(id).ok_or_else(|| bad(format!("token {tok:?} has no id")))?;
        tokens[id] = Some(tok.clone());
    }
    for a in &added {
        let (Some(id), Some(content)) = (id_of(&a["id"]), a["content"].as_str()) else {
            return Err(bad(format!("added token {a} has no id or content")));
        };
        tokens[id] = Some(content.to_string());
        types[id] = if a["special"] == true {
            CONTROL
        } else {
            USER_DEFINED
        };
    }
    // Ids no token has (a vocabulary padded for the embedding): llama.cpp's `[PADn]`.
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = UNUSED;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges: Vec<String> = model["merges"]
        .as_array()
        .ok_or_else(|| bad("model.merges is not a list".into()))?
        .iter()
        .map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .collect::<Option<_>>()
        .ok_or_else(|| bad("a merge is neither \"a b\" nor [a, b]".into()))?;
    let mut kv = vec![
        KvEntry::str("tokenizer.ggml.model", "gpt2"),
        KvEntry::str("tokenizer.ggml.pre", pre),
        KvEntry::strs("tokenizer.ggml.tokens", &tokens),
        KvEntry::i32s("tokenizer.ggml.token_type", &types),
        KvEntry::strs("tokenizer.ggml.merges", &merges),
    ];
    if let Some(b) = config.bos_token_id {
        kv.push(KvEntry::u32("tokenizer.ggml.bos_token_id", b));
    }
    if let Some(e) = config.eos_token_id {
        kv.push(KvEntry::u32("tokenizer.ggml.eos_token_id", e));
    }
    let tok = Tokenizer::from_file(&path)?;
    let format = PromptFormat::for_model(dir, &tok)?;
    kv.push(KvEntry::bool(
        "tokenizer.ggml.add_bos_token",
        format.bos.is_some(),
    ));
    if let Some(t) = &format.template {
        kv.push(KvEntry::str("tokenizer.chat_template", t.source()));
    }
    Ok(kv)
}

/// HF's spelling of Llama 3's split regex (llama.cpp's [`super::gguf_llama`] spells the
/// contractions out).
const HF_LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's name (`tokenizer.ggml.pre`) of a `tokenizer.json` pre-tokenizer, for the ones
/// its reader here also understands.
fn pre_tokenizer_name(p: &Value) -> Option<&'static str> {
    let byte_level = |v: &Value, regex: bool| {
        v["type"] == "ByteLevel" && v["use_regex"].as_bool().unwrap_or(true) == regex
    };
    if byte_level(p, true) {
        return Some("gpt-2");
    }
    let seq = p["pretokenizers"].as_array()?;
    match seq.as_slice() {
        [d, b]
            if d["type"] == "Digits" && d["individual_digits"] == true && byte_level(b, true) =>
        {
            Some("smollm")
        }
        [s, b] if s["type"] == "Split" && byte_level(b, false) => {
            let regex = s["pattern"]["Regex"].as_str()?;
            let llama3 = [super::gguf_vocab::LLAMA3_SPLIT, HF_LLAMA3_SPLIT];
            if llama3.contains(&regex) {
                Some("llama-bpe")
            } else if llama3
                .iter()
                .any(|r| r.replace(r"\p{N}{1,3}", r"\p{N}") == regex)
            {
                Some("qwen2")
            } else {
                None
            }
        }
        _ => None,
    }
}
