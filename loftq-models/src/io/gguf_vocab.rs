//! SentencePiece vocabularies of GGUF files (`tokenizer.ggml.model = llama`: Llama 2,
//! Mistral, TinyLlama) as a Hugging Face `tokenizer.json`.
//!
//! llama.cpp's SentencePiece tokenizer replaces spaces by `▁` (after a leading one), then
//! repeatedly merges the adjacent pair whose concatenation is the vocabulary entry of highest
//! score, and spells what no entry covers as byte tokens `<0xXX>`. A BPE model whose merges are
//! every split of every entry into two entries, ranked by the entry's score, does the same.

use std::collections::HashMap;

use serde_json::{Value, json};

/// llama.cpp's token types: normal, unknown, control, user-defined, unused, byte.
const NORMAL: u64 = 1;

/// The `tokenizer.json` of a SentencePiece vocabulary: `tokens`, their `scores` and types.
pub(super) fn spm_json(
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
