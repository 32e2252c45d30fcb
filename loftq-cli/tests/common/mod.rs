//! Helpers shared by the CLI's hostile-input and write-fault tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use loftq_models::io::Checkpoint;
use loftq_models::io::ggml::GgmlType;
use loftq_models::io::gguf::MetaValue;
use loftq_models::io::gguf_name;
use loftq_models::io::gguf_write::{RawTensor, gguf_bytes};

#[path = "../../../loftq-models/tests/common/skip.rs"]
mod skip;
#[allow(unused_imports)] // not every test binary skips
pub use skip::skip;

/// A fixture of `loftq-models`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../loftq-models/tests/fixtures")
        .join(name)
}

/// A path as `&str`, for command lines.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `root/model`: the tiny Llama (config, weights) with a byte-level `tokenizer.json`; and
/// `root/text.txt` to train on.
pub fn tiny_model(root: &Path) -> PathBuf {
    let model = root.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-llama").join(f), model.join(f)).unwrap();
    }
    let tok = loftq_models::tokenizer::byte_level_json().to_string();
    std::fs::write(model.join("tokenizer.json"), tok).unwrap();
    std::fs::write(root.join("text.txt"), "To be, or not to be. ".repeat(40)).unwrap();
    model
}

/// The tiny Llama as an all-`f32` GGUF file (no vocabulary).
pub fn tiny_gguf() -> Vec<u8> {
    gguf_bytes(&gguf_meta(&[]), &gguf_tensors())
}

/// The tiny Llama's GGUF metadata, with `over` replacing or adding keys.
pub fn gguf_meta(over: &[(&'static str, MetaValue)]) -> Vec<(&'static str, MetaValue)> {
    let u = MetaValue::U64;
    let mut m: BTreeMap<&str, MetaValue> = [
        ("general.architecture", MetaValue::Str("llama".into())),
        ("llama.block_count", u(2)),
        ("llama.embedding_length", u(64)),
        ("llama.feed_forward_length", u(128)),
        ("llama.attention.head_count", u(4)),
        ("llama.attention.head_count_kv", u(4)),
        ("llama.rope.freq_base", MetaValue::F64(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F64(1e-6),
        ),
        ("llama.context_length", u(128)),
        ("llama.vocab_size", u(256)),
    ]
    .into_iter()
    .collect();
    for (k, v) in over {
        m.insert(k, v.clone());
    }
    m.into_iter().collect()
}

/// The tiny Llama's tensors as `f32` GGUF tensors (GGUF names and dims).
pub fn gguf_tensors() -> Vec<RawTensor> {
    let ck = Checkpoint::open(&fixture("tiny-llama/model.safetensors")).unwrap();
    ck.names()
        .map(|name| {
            let t = ck.f32(name).unwrap();
            RawTensor {
                name: gguf_name(name).unwrap(),
                dims: t.shape.iter().rev().map(|&d| d as u64).collect(),
                ty: GgmlType::F32,
                bytes: t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            }
        })
        .collect()
}
