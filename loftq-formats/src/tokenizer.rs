//! [`Tokenizer`]: Hugging Face `tokenizers` over a `tokenizer.json` (from a checkpoint, or
//! built from a GGUF vocabulary).

use std::path::Path;

use crate::io::{Gguf, GgufModel};
use crate::{ModelError, Result};

/// A text tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// Reads a `tokenizer.json`.
    ///
    /// # Errors
    /// [`ModelError::Format`] if the file cannot be read or parsed.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let bad = |e: serde_json::Error| ModelError::format(path, format!("bad tokenizer: {e}"));
        // The JSON is checked first: tokenizers 0.23 panics on a syntax error inside
        // `decoder` (found by fuzzing), and a parsed value cannot have one.
        let value: serde_json::Value = serde_json::from_str(&text).map_err(bad)?;
        let mut inner: tokenizers::Tokenizer = serde_json::from_value(value).map_err(bad)?;
        // Lengths are this crate's to choose (windows, --seq): a file's own padding (MiniLM's
        // pads every text to 128) or truncation would change the ids.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| ModelError::format(path, format!("bad tokenizer: {e}")))?;
        Ok(Self { inner })
    }

    /// The tokenizer of a GGUF file (byte-level BPE).
    ///
    /// # Errors
    /// As [`GgufModel::tokenizer_json`].
    pub fn from_gguf(model: &GgufModel) -> Result<Self> {
        Self::from_vocabulary(&model.gguf)
    }

    /// The tokenizer of any GGUF file's vocabulary (a vocabulary-only file included).
    ///
    /// # Errors
    /// As [`crate::io::vocabulary_json`].
    pub fn from_vocabulary(gguf: &Gguf) -> Result<Self> {
        let json = crate::io::vocabulary_json(gguf)?.to_string();
        let inner: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| ModelError::format(gguf.path(), format!("bad tokenizer: {e}")))?;
        Ok(Self { inner })
    }

    /// The tokenizer that goes with a model: `tokenizer.json` in an HF directory, or the
    /// vocabulary of a `.gguf` file.
    ///
    /// # Errors
    /// As [`Tokenizer::from_file`] and [`Tokenizer::from_gguf`].
    pub fn for_model(path: &Path) -> Result<Self> {
        let file = path.join("tokenizer.json");
        if crate::io::is_gguf(path) {
            Self::from_gguf(&GgufModel::open(path)?)
        } else if path.is_dir() && !file.exists() {
            // DeBERTa-v3 and older Llamas ship only a SentencePiece model.
            let spm = ["spm.model", "tokenizer.model"]
                .iter()
                .find(|f| path.join(f).is_file());
            let has = spm.map_or(String::new(), |f| format!(" (its {f} is not read)"));
            Err(ModelError::format(
                path,
                format!(
                    "no tokenizer.json{has}: write one with transformers, \
                     AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)"
                ),
            ))
        } else {
            Self::from_file(&file)
        }
    }

    /// Token ids of `text`, without special tokens (no BOS/EOS).
    ///
    /// # Errors
    /// [`ModelError::Text`] if the tokenizer fails.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_as(text, false)
    }

    /// Token ids of `text` with the special tokens the tokenizer adds around a sequence (BOS
    /// for Llama 2 and 3), as transformers' `tokenizer(text)`.
    ///
    /// # Errors
    /// [`ModelError::Text`] if the tokenizer fails.
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_as(text, true)
    }

    fn encode_as(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| ModelError::Text {
                what: "tokenizer",
                msg: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`.
    ///
    /// # Errors
    /// [`ModelError::Text`] if the tokenizer fails.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| ModelError::Text {
            what: "tokenizer",
            msg: e.to_string(),
        })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// A byte-level `tokenizer.json` with one token per byte (id = byte value, no merges), so a
/// synthetic or test model with a vocabulary of at least 256 can read any text.
pub fn byte_level_json() -> serde_json::Value {
    // GPT-2's byte-to-character map: printable bytes stand for themselves, the others are
    // shifted past 255 in order.
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut vocab = serde_json::Map::new();
    let mut shifted = 0;
    for b in 0u32..256 {
        let c = if printable(b) {
            char::from_u32(b)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted)
        };
        vocab.insert(c.expect("valid char").to_string(), b.into());
    }
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []},
    })
}

/// A WordPiece `tokenizer.json` as BERT's (its normalizer and pre-tokenizer, `[CLS] text
/// [SEP]`) over `[PAD]`, `[UNK]`, `[CLS]`, `[SEP]` (ids 0 to 3) and then `words`, for a
/// synthetic or test encoder.
pub fn wordpiece_json(words: &[&str]) -> serde_json::Value {
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"];
    let vocab: serde_json::Map<String, serde_json::Value> = (specials.iter().chain(words))
        .enumerate()
        .map(|(i, w)| (w.to_string(), i.into()))
        .collect();
    let special =
        |name: &str, id: u32| serde_json::json!({"id": name, "ids": [id], "tokens": [name]});
    serde_json::json!({
        "version": "1.0",
        "normalizer": {"type": "BertNormalizer", "clean_text": true,
            "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
            "special_tokens": {"[CLS]": special("[CLS]", 2), "[SEP]": special("[SEP]", 3)}},
        "model": {"type": "WordPiece", "unk_token": "[UNK]",
            "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
            "vocab": vocab},
    })
}
