//! Fuzz targets: each reader of this crate, driven by arbitrary bytes.
//!
//! The coverage-guided fuzzer (`fuzz/`, run by `cargo xtask fuzz`) calls these functions with
//! its inputs, and `tests/fuzz_corpus.rs` runs them over the kept corpus and every crash
//! reproducer, so a fixed crash stays fixed. A target may return any error; a panic, an abort
//! or an allocation far beyond the input's size is a crash.
//!
//! The readers take paths, so each input is written to a scratch directory first (under
//! `$TMPDIR`; `cargo xtask fuzz` points it at `/dev/shm` when there is one).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::io::{
    Adapter, Checkpoint, Gguf, GgufModel, TensorSource, TorchState, bnb_names, dequantize_packed,
    packed_names, read_bnb, read_packed,
};
use crate::{LlamaConfig, Tokenizer};

/// A fuzz target: any bytes in, a crash the only failure. It returns whether its reader
/// accepted the input whole (every seed must be).
pub type Target = fn(&[u8]) -> bool;

/// The targets by name, for the fuzzer's command line and the corpus test.
pub const TARGETS: &[(&str, Target)] = &[
    ("safetensors", safetensors),
    ("gguf", gguf),
    ("config", config),
    ("tokenizer", tokenizer),
    ("adapter", adapter),
    ("torch_bin", torch_bin),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// This process's scratch directory.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("loftq-fuzz-{}", std::process::id()));
        // The fuzzer cannot go on without it; this is the harness, not a reader.
        std::fs::create_dir_all(&dir).expect("scratch directory for fuzz inputs");
        dir
    })
}

/// Writes `data` to `name` in the scratch directory and returns its path.
fn put(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    std::fs::write(&path, data).expect("writing a fuzz input");
    path
}

/// Splits an input into two files' bytes: a little-endian `u16` length, then the first file,
/// then the second (what is left).
pub fn split2(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return (data, &[]);
    };
    rest.split_at(usize::from(u16::from_le_bytes(*len)).min(rest.len()))
}

/// Joins two files' bytes as [`split2`] splits them (for seeds).
pub fn join2(a: &[u8], b: &[u8]) -> Vec<u8> {
    let len = u16::try_from(a.len()).expect("a seed's first file is under 64 KiB");
    let mut v = len.to_le_bytes().to_vec();
    v.extend_from_slice(a);
    v.extend_from_slice(b);
    v
}

/// A safetensors file: opened, every tensor read, and every packed and bitsandbytes weight it
/// describes read and dequantized.
pub fn safetensors(data: &[u8]) -> bool {
    let path = put("model.safetensors", data);
    let Ok(ck) = Checkpoint::open(&path) else {
        return false;
    };
    let mut ok = true;
    let names: Vec<String> = ck.names().map(str::to_string).collect();
    for name in &names {
        // Floats and integers convert; the parts of packed and 4-bit weights are raw bytes.
        let float = ck.f32(name).is_ok();
        let int = ck.i64(name).is_ok();
        ok &= float | int | ck.bytes(name).is_ok();
    }
    for name in packed_names(&ck) {
        ok &= match read_packed(&ck, &name) {
            Ok(Some(p)) => dequantize_packed(&path, &name, &p).is_ok(),
            _ => false,
        };
    }
    for name in bnb_names(&ck) {
        ok &= matches!(read_bnb(&ck, &name), Ok(Some(_)));
    }
    ok
}

/// A GGUF file: the tensor table and every tensor dequantized, then the Llama reading of it
/// (architecture, shapes, HF names) and its vocabulary as a tokenizer.
pub fn gguf(data: &[u8]) -> bool {
    let path = put("model.gguf", data);
    let raw = match Gguf::open(&path) {
        Ok(g) => g.tensors.keys().all(|name| g.f32(name).is_ok()),
        Err(_) => false,
    };
    let Ok(model) = GgufModel::open(&path) else {
        return false;
    };
    let tensors = model
        .tensor_names()
        .iter()
        .all(|name| model.tensor(name).is_ok());
    let vocab =
        Tokenizer::from_gguf(&model).is_ok_and(|tok| tok.encode("To be, or not to be").is_ok());
    raw & tensors & vocab
}

/// A `config.json`: parsed, validated, the shapes and names derived from it, and written back.
pub fn config(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(cfg) = LlamaConfig::from_json(text).and_then(LlamaConfig::validated) else {
        return false;
    };
    let _ = cfg.last_layer_tensor();
    for layer in [0, cfg.num_hidden_layers.saturating_sub(1)] {
        let _ = cfg.window(layer);
        for m in crate::config::LINEAR_PATHS {
            let _ = cfg.linear_shape(&format!("model.layers.{layer}.{m}.weight"));
        }
    }
    // What is written back reads back as the same architecture.
    LlamaConfig::from_json(&cfg.to_hf_json().to_string()).is_ok_and(|back| back == cfg)
}

/// A `tokenizer.json`: loaded, then text encoded and decoded.
pub fn tokenizer(data: &[u8]) -> bool {
    let path = put("tokenizer.json", data);
    let Ok(tok) = Tokenizer::from_file(&path) else {
        return false;
    };
    let _ = tok.vocab_size();
    let text = "To be, or not to be: that is the question. 1234 \u{e9}\u{4e16}";
    tok.encode(text).and_then(|ids| tok.decode(&ids)).is_ok()
}

/// A PEFT adapter directory: `adapter_config.json` and `adapter_model.safetensors`, the
/// input split between them by [`split2`].
pub fn adapter(data: &[u8]) -> bool {
    let (config, weights) = split2(data);
    let dir = scratch().join("adapter");
    if std::fs::create_dir_all(&dir).is_err() {
        return false;
    }
    put("adapter/adapter_config.json", config);
    put("adapter/adapter_model.safetensors", weights);
    Adapter::read(&dir).is_ok_and(|a| a.modules.keys().all(|p| a.scaling(p).is_some()))
}

/// A PyTorch `.bin` state dict (`torch.save`'s zip archive and pickle): opened, every tensor
/// read.
pub fn torch_bin(data: &[u8]) -> bool {
    let path = put("state.bin", data);
    TorchState::open(&path).is_ok_and(|s| s.names().all(|n| s.f32(n).is_ok()))
}
