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

use crate::config::{Architecture, EncoderConfig, linear_path};
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
    ("pickle", pickle),
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

/// A `config.json` as the commands read it ([`Architecture`]: a decoder or an encoder by its
/// `model_type`): parsed, validated, the shapes and names derived from it; a decoder's also
/// written back.
pub fn config(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    match Architecture::from_json(text) {
        Ok(Architecture::Decoder(cfg)) => decoder_config(cfg),
        Ok(Architecture::Encoder(cfg)) => encoder_config(&cfg),
        Err(_) => false,
    }
}

fn decoder_config(cfg: LlamaConfig) -> bool {
    let Ok(cfg) = cfg.validated() else {
        return false;
    };
    let _ = cfg.last_layer_tensor();
    for layer in [0, cfg.num_hidden_layers.saturating_sub(1)] {
        let _ = cfg.window(layer);
        for m in cfg.family.linear_paths() {
            let _ = cfg.linear_shape(&linear_path(layer, m));
        }
    }
    // What is written back reads back as the same architecture.
    LlamaConfig::from_json(&cfg.to_hf_json().to_string()).is_ok_and(|back| back == cfg)
}

fn encoder_config(cfg: &EncoderConfig) -> bool {
    if cfg.validate().is_err() {
        return false;
    }
    let _ = cfg.head_dim();
    let prefix = cfg.kind.prefix();
    for layer in [0, cfg.num_hidden_layers.saturating_sub(1)] {
        for m in cfg.kind.linear_paths() {
            let _ = cfg.linear_shape(&format!("{prefix}encoder.layer.{layer}.{m}.weight"));
        }
    }
    cfg.linear_shape(&format!("{prefix}pooler.dense.weight"))
        .is_some()
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

/// The pickle of a PyTorch `.bin` state dict alone (its `data.pkl`), read as [`torch_bin`]
/// reads it from an archive that this target builds around it ([`torch_archive`]): the
/// fuzzer's changes all reach the unpickler, where most changes to a whole archive are
/// refused by its zip records first.
pub fn pickle(data: &[u8]) -> bool {
    torch_bin(&torch_archive(data))
}

/// A `torch.save` archive (`archive/`, entries stored) holding `pkl` as its `data.pkl`,
/// `byteorder` little and storages `0` to `15` of 256 bytes each (values whatever their
/// bytes make; a view that fits reads from them). CRCs are left zero: the reader does not
/// check them.
pub fn torch_archive(pkl: &[u8]) -> Vec<u8> {
    let storage: Vec<u8> = (0..=255u8).collect();
    let mut entries: Vec<(String, &[u8])> = vec![
        ("archive/data.pkl".into(), pkl),
        ("archive/byteorder".into(), b"little"),
    ];
    entries.extend((0..16).map(|k| (format!("archive/data/{k}"), &storage[..])));
    let (mut out, mut central) = (Vec::new(), Vec::new());
    let u16le = |v: usize| (v as u16).to_le_bytes();
    let u32le = |v: usize| (v as u32).to_le_bytes();
    for (name, data) in &entries {
        let offset = out.len();
        // The fields both headers share: version 2.0, no flags, stored, no time, CRC 0, sizes.
        let mut common = [20u16, 0, 0, 0, 0].map(u16::to_le_bytes).concat();
        common.extend([0, data.len(), data.len()].map(u32le).concat());
        common.extend(u16le(name.len()));
        common.extend(u16le(0));
        out.extend(0x0403_4b50u32.to_le_bytes());
        out.extend(&common);
        out.extend(name.as_bytes());
        out.extend(*data);
        central.extend(0x0201_4b50u32.to_le_bytes());
        central.extend(u16le(20));
        central.extend(&common);
        // No comment, disk 0, no attributes, then where the local header is.
        central.extend([0u16, 0, 0].map(u16::to_le_bytes).concat());
        central.extend(u32le(0));
        central.extend(u32le(offset));
        central.extend(name.as_bytes());
    }
    let dir = out.len();
    out.extend(&central);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0, 0, entries.len(), entries.len()].map(u16le).concat());
    out.extend(u32le(central.len()));
    out.extend(u32le(dir));
    out.extend(u16le(0));
    out
}
