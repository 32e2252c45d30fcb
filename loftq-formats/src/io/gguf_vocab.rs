//! The vocabulary of a GGUF file as a Hugging Face `tokenizer.json`: byte-level BPE
//! (`tokenizer.ggml.model = gpt2`) with its pre-tokenizer, and SentencePiece (`llama`: Llama 2,
//! Mistral, TinyLlama).
//!
//! For SentencePiece, llama.cpp's SentencePiece tokenizer replaces spaces by `▁` (after a leading one), then
//! repeatedly merges the adjacent pair whose concatenation is the vocabulary entry of highest
//! score, and spells what no entry covers as byte tokens `<0xXX>`. A BPE model whose merges are
//! every split of every entry into two entries, ranked by the entry's score, does the same.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::gguf::{Gguf, MetaValue};
use crate::{ModelError, Result};

/// `tokenizer.json` (Hugging Face `tokenizers` format) built from the vocabulary of any GGUF
/// file, a vocabulary-only one included.
///
/// # Errors
/// [`ModelError::Format`] naming the file if it has no vocabulary or one this crate cannot
/// express: byte-level BPE (`tokenizer.ggml.model = gpt2`) with the pre-tokenizers of GPT-2,
/// Llama 3, Qwen2 and the digit-splitting ones of SmolLM2 and StarCoder, and SentencePiece
/// (`llama`) are.
pub fn vocabulary_json(g: &Gguf) -> Result<Value> {
    tokenizer_json(g).map_err(|m| ModelError::format(g.path(), m))
}

/// llama.cpp's `LLAMA3` pre-tokenizer regex (its `llama-bpe`); Qwen2's is the same with
/// single digits.
pub(super) const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn tokenizer_json(g: &Gguf) -> Result<Value, String> {
    let model = g
        .meta("tokenizer.ggml.model")
        .and_then(MetaValue::as_str)
        .ok_or("no tokenizer.ggml.model")?;
    let strings = |key: &str| -> Result<Vec<String>, String> {
        g.meta(key)
            .and_then(MetaValue::as_array)
            .ok_or_else(|| format!("no {key}"))?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{key} holds a non-string"))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let types: Vec<u64> = g
        .meta("tokenizer.ggml.token_type")
        .and_then(MetaValue::as_array)
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
        .unwrap_or_default();
    match model {
        "gpt2" => {}
        "llama" => {
            let scores: Vec<f64> = g
                .meta("tokenizer.ggml.scores")
                .and_then(MetaValue::as_array)
                .ok_or("no tokenizer.ggml.scores")?
                .iter()
                .map(|v| v.as_f64().ok_or("tokenizer.ggml.scores holds a non-number"))
                .collect::<Result<_, _>>()?;
            let prefix = !matches!(
                g.meta("tokenizer.ggml.add_space_prefix"),
                Some(MetaValue::Bool(false))
            );
            return spm_json(&tokens, &scores, &types, prefix);
        }
        other => {
            return Err(format!(
                "tokenizer model `{other}` is not supported (byte-level BPE `gpt2` and \
                 SentencePiece `llama` are)"
            ));
        }
    }
    let merges = strings("tokenizer.ggml.merges")?;
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        vocab.insert(tok.clone(), json!(id));
        // llama.cpp token types: 3 = control, 4 = user-defined.
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == 3 || ty == 4 {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": ty == 4, "special": ty == 3,
            }));
        }
    }
    let pre = g
        .meta("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("gpt2");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    // llama.cpp's `smollm`, `starcoder`, `refact`, `command-r`, `codeshell` pre-tokenizers
    // split digits one by one before the GPT-2 regex.
    // Llama 3 and Qwen2 split with their own regex first, then map bytes without GPT-2's.
    let split = |pattern: String| {
        json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
            ],
        })
    };
    // Llama 3 takes a pre-token that is in the vocabulary whole, before any merge (llama.cpp's
    // `ignore_merges`).
    let ignore_merges = matches!(pre, "llama-bpe" | "llama3" | "llama-v3");
    let pre_tokenizer = match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level],
        }),
        "llama-bpe" | "llama3" | "llama-v3" => split(LLAMA3_SPLIT.to_string()),
        "qwen2" => split(LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")),
        "gpt2" | "gpt-2" | "default" | "mpt" | "olmo" => byte_level.clone(),
        other => return Err(format!("pre-tokenizer `{other}` is not supported")),
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges,
        },
    }))
}

/// llama.cpp's token types: normal, unknown, control, user-defined, unused, byte.
const NORMAL: u64 = 1;

/// The `tokenizer.json` of a SentencePiece vocabulary: `tokens`, their `scores` and types.
fn spm_json(
    tokens: &[String],
    scores: &[f64],
    types: &[u64],
    add_space_prefix: bool,
) -> Result<Value, String> {
    if scores.len() != tokens.len() {
        return Err(format!(
            "{} scores for {} tokens",
            scores.len(),
            tokens.len()
        ));
    }
    let ty = |id: usize| types.get(id).copied().unwrap_or(NORMAL);
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let normal = |s: &str| ids.get(s).is_some_and(|&i| ty(i) == NORMAL);
    // (score of the merged entry, its id, split position) → merge.
    let mut merges: Vec<(f64, usize, usize, &str, &str)> = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        if ty(id) != NORMAL {
            continue;
        }
        for (at, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(at);
            if normal(l) && normal(r) {
                merges.push((scores[id], id, at, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<Value> = merges.iter().map(|m| json!([m.3, m.4])).collect();
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(id));
        // Unknown (2) and control (3) tokens are special; user-defined (4) ones are matched
        // in the text.
        if matches!(ty(id), 2..=4) {
            added.push(json!({
                "id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": ty(id) == 4, "special": ty(id) != 4,
            }));
        }
    }
    let unk = (0..tokens.len())
        .find(|&i| ty(i) == 2)
        .map(|i| tokens[i].clone());
    let mut normalizers = Vec::new();
    if add_space_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    }))
}
