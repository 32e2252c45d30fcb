//! GGUF files: a tiny Llama written as llama.cpp lays it out (permuted q/k rows, GGUF names,
//! f32 and quantized blocks) reads back to transformers' logits; bad files are errors. GGUF
//! output (bases, adapters, merged files, conversion from HF) is in [`output`].

#[path = "../common/mod.rs"]
mod common;
mod output;

use common::*;
use loftq_core::quant::GgmlFormat;
use loftq_core::{QuantConfig, Quantizer};
use loftq_models::io::ggml::GgmlType;
use loftq_models::io::gguf::Gguf;
use loftq_models::io::gguf::MetaValue;
use loftq_models::io::gguf_write::{RawTensor, gguf_bytes};
use loftq_models::io::{
    Adapter, Checkpoint, GgufModel, gguf_name, permute_rows, write_gguf_base, write_lora_gguf,
};
use loftq_models::nn::load_pretrained;

/// Q8_0 blocks of `v`, as llama.cpp quantizes them.
fn q8_0(v: &[f32]) -> Vec<u8> {
    let f = GgmlFormat::Q8_0;
    let q = Quantizer::new(QuantConfig::ggml(f)).unwrap();
    let h = q.quantize_host(v, [1, v.len()]).unwrap();
    f.encode(&h.codes, &h.scales, &h.mins).unwrap()
}

fn meta(k: &str, v: MetaValue) -> (&str, MetaValue) {
    (k, v)
}

/// The tiny-llama fixture as a GGUF file; linear weights in `ty` (F32 or Q8_0).
fn tiny_gguf(ty: GgmlType) -> Vec<u8> {
    tiny_gguf_with(ty, Vec::new(), Vec::new())
}

/// [`tiny_gguf`] with more metadata and tensors.
fn tiny_gguf_with(
    ty: GgmlType,
    extra: Vec<(&str, MetaValue)>,
    extra_tensors: Vec<RawTensor>,
) -> Vec<u8> {
    let ck = Checkpoint::open(&fixture("tiny-llama/model.safetensors")).unwrap();
    let mut tensors = Vec::new();
    for name in ck.names() {
        let t = ck.f32(name).unwrap();
        let mut data = t.data.clone();
        let heads = 4;
        if name.contains("q_proj") || name.contains("k_proj") {
            data = permute_rows(&data, t.shape[0], heads, true);
        }
        let is_linear = name.contains("_proj");
        let (ty, bytes) = if is_linear && ty == GgmlType::Q8_0 {
            (ty, q8_0(&data))
        } else {
            (
                GgmlType::F32,
                data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        };
        tensors.push(RawTensor {
            name: gguf_name(name).unwrap(),
            dims: t.shape.iter().rev().map(|&d| d as u64).collect(),
            ty,
            bytes,
        });
    }
    tensors.extend(extra_tensors);
    let u = MetaValue::U64;
    gguf_bytes(
        &[
            meta("general.architecture", MetaValue::Str("llama".into())),
            meta("llama.block_count", u(2)),
            meta("llama.embedding_length", u(64)),
            meta("llama.feed_forward_length", u(128)),
            meta("llama.attention.head_count", u(4)),
            meta("llama.attention.head_count_kv", u(4)),
            meta("llama.rope.freq_base", MetaValue::F64(10000.0)),
            meta(
                "llama.attention.layer_norm_rms_epsilon",
                MetaValue::F64(1e-6),
            ),
            meta("llama.context_length", u(128)),
            meta("llama.vocab_size", u(256)),
        ]
        .into_iter()
        .chain(extra)
        .collect::<Vec<_>>(),
        &tensors,
    )
}

/// Runs `init` expecting a refusal: no tensor computed, no output left; the message.
fn refused_before_work(spec: &loftq_models::init::InitSpec) -> String {
    let mut computed = 0;
    let err = loftq_models::init::run_init(spec, &[device()], false, &mut |e| {
        if matches!(e, loftq_models::init::Event::Tensor(_)) {
            computed += 1;
        }
    })
    .unwrap_err()
    .to_string();
    assert_eq!(
        computed, 0,
        "tensors were computed before the refusal: {err}"
    );
    assert!(!spec.out.exists(), "{err}");
    err
}

/// A vocabulary `init` could not write as `tokenizer.json` (T5's unigram, not supported)
/// is refused before the first tensor is computed, not after the last.
#[test]
fn init_refuses_an_unsupported_vocabulary_before_the_work() {
    let dir = scratch("gguf-vocab");
    let path = dir.join("sp.gguf");
    let tokens = MetaValue::Array(vec![MetaValue::Str("<unk>".into()); 256]);
    let extra = vec![
        meta("tokenizer.ggml.model", MetaValue::Str("t5".into())),
        meta("tokenizer.ggml.tokens", tokens),
    ];
    std::fs::write(&path, tiny_gguf_with(GgmlType::F32, extra, Vec::new())).unwrap();
    let spec = loftq_models::init::InitSpec::new(path.clone(), dir.join("out"), 4, 1);
    let err = refused_before_work(&spec);
    assert!(err.contains("sp.gguf") && err.contains("`t5`"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tiny_llama_from_gguf_matches_transformers() {
    let dir = scratch("gguf");
    let want = Checkpoint::open(&fixture("tiny-llama/logits.safetensors")).unwrap();
    let (shape, ids_v) = want.i64("input_ids").unwrap();
    let ids_v: Vec<i32> = ids_v.into_iter().map(|x| x as i32).collect();
    let want = want.f32("logits").unwrap().data;
    for (ty, tol) in [(GgmlType::F32, 1e-4), (GgmlType::Q8_0, 0.05)] {
        let path = dir.join(format!("tiny-{}.gguf", ty.name()));
        std::fs::write(&path, tiny_gguf(ty)).unwrap();
        let model = load_pretrained(&path, None, &device()).unwrap();
        assert!(!model.config.tie_word_embeddings);
        let got = logits(&model, ids(ids_v.clone(), shape[0], shape[1]));
        let d = max_abs_diff(&got, &want);
        assert!(d < tol, "{}: max |Δ| = {d}", ty.name());
        // `convert` writes an HF directory that loads to the same logits.
        let out = dir.join(format!("hf-{}", ty.name()));
        GgufModel::open(&path).unwrap().convert(&out).unwrap();
        let back = load_pretrained(&out, None, &device()).unwrap();
        assert_eq!(logits(&back, ids(ids_v.clone(), shape[0], shape[1])), got);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn open_err(bytes: &[u8], name: &str) -> String {
    let dir = scratch(name);
    let path = dir.join("bad.gguf");
    std::fs::write(&path, bytes).unwrap();
    let msg = match GgufModel::open(&path) {
        Ok(m) => match load_pretrained(&path, None, &device()) {
            Ok(_) => panic!("{name}: expected an error ({m:?})"),
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    };
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(msg.contains("bad.gguf"), "{name}: {msg}");
    msg
}

#[test]
fn bad_gguf_files_are_errors() {
    let good = tiny_gguf(GgmlType::F32);
    assert!(open_err(&good[..3], "short").contains("too short"));
    let mut magic = good.clone();
    magic[0] = b'X';
    assert!(open_err(&magic, "magic").contains("magic"));
    let msg = open_err(&good[..good.len() - 64], "truncated");
    assert!(msg.contains("past the end"), "{msg}");
    let mut count = good.clone();
    count[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_err(&count, "count").contains("does not fit"));
    let mut version = good.clone();
    version[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert!(open_err(&version, "version").contains("version 9"));
    // A k-quant tensor: readable table, clear error when the tensor is read.
    let q8k = gguf_bytes(
        &[
            meta("general.architecture", MetaValue::Str("llama".into())),
            meta("llama.block_count", MetaValue::U64(0)),
            meta("llama.embedding_length", MetaValue::U64(256)),
            meta("llama.feed_forward_length", MetaValue::U64(256)),
            meta("llama.attention.head_count", MetaValue::U64(4)),
            meta("llama.vocab_size", MetaValue::U64(256)),
        ],
        &[RawTensor {
            name: "token_embd.weight".into(),
            dims: vec![256, 256],
            ty: GgmlType(15),
            bytes: vec![0; 256 * 292],
        }],
    );
    // Q8_K is llama.cpp's intermediate type, never a stored weight: not decoded.
    let msg = open_err(&q8k, "q8k");
    assert!(
        msg.contains("token_embd.weight") && msg.contains("Q8_K"),
        "{msg}"
    );
    let gpt2 = gguf_bytes(
        &[meta("general.architecture", MetaValue::Str("gpt2".into()))],
        &[],
    );
    assert!(open_err(&gpt2, "arch").contains("gpt2"));
}

/// Every block type the reader decodes, against gguf-py's own dequantization (llama.cpp's
/// Python package), bit for bit: `tests/fixtures/make_ggml_types.py`.
#[test]
fn block_types_decode_as_gguf_py() {
    use loftq_models::io::ggml::dequantize;
    let ck = Checkpoint::open(&fixture("ggml_types.safetensors")).unwrap();
    let types = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
    ];
    for ty in types {
        let name = ty.name();
        let (_, bytes) = ck.bytes(&format!("{name}.bytes")).unwrap();
        let want = ck.f32(&format!("{name}.values")).unwrap().data;
        let got = dequantize(ty, bytes).unwrap_or_else(|| panic!("{name} is not decoded"));
        assert_eq!(got.len(), want.len(), "{name}");
        let differ = got
            .iter()
            .zip(&want)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(differ, None, "{name}: first difference at {differ:?}");
        assert_eq!(
            ty.byte_len(want.len()),
            Some(bytes.len()),
            "{name}: block layout"
        );
    }
}
