//! AFL++ harness for loftq-rs's file readers (`cargo xtask fuzz` builds and runs it).
//!
//! - `loftq-fuzz TARGET`: one target of `loftq_models::fuzz`, input on stdin, in AFL's
//!   persistent mode.
//! - `loftq-fuzz --seeds DIR`: writes small well-formed seed inputs to `DIR/<target>/`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use loftq_core::quant::{HostQuantized, PackedTensor};
use loftq_core::{QuantConfig, Quantizer};
use loftq_models::LlamaConfig;
use loftq_models::fuzz::{TARGETS, join2, target};
use loftq_models::io::ggml::GgmlType;
use loftq_models::io::gguf::MetaValue;
use loftq_models::io::gguf_write::{RawTensor, gguf_bytes};
use loftq_models::io::{Adapter, AdapterConfig, Checkpoint, HostTensor, LoraWeights, OutTensor};
use loftq_models::io::{add_packed, write_safetensors};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, dir] if flag == "--seeds" => {
            if let Err(e) = write_seeds(Path::new(dir)) {
                eprintln!("loftq-fuzz: {e}");
                std::process::exit(1);
            }
        }
        [name] => {
            let Some(run) = target(name) else {
                eprintln!("loftq-fuzz: no target `{name}`; targets: {}", names());
                std::process::exit(2);
            };
            afl::fuzz!(|data: &[u8]| {
                run(data);
            });
        }
        _ => {
            eprintln!(
                "usage: loftq-fuzz TARGET (input on stdin) | loftq-fuzz --seeds DIR\n\
                 targets: {}",
                names()
            );
            std::process::exit(2);
        }
    }
}

fn names() -> String {
    TARGETS
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

type Seeds = Vec<(&'static str, &'static str, Vec<u8>)>;

fn write_seeds(dir: &Path) -> Result<(), String> {
    let tmp = std::env::temp_dir().join(format!("loftq-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let mut seeds: Seeds = Vec::new();
    safetensors_seeds(&tmp, &mut seeds)?;
    seeds.push(("gguf", "llama-mixed-types", gguf_seed()));
    config_seeds(&mut seeds)?;
    let tok = loftq_models::tokenizer::byte_level_json().to_string();
    seeds.push(("tokenizer", "byte-level", tok.into_bytes()));
    seeds.push(("adapter", "rank-2", adapter_seed(&tmp)?));
    // torch.save's own output (make_torch_bin.py): dtypes, a strided view, shared storage.
    let state = include_bytes!("../../loftq-models/tests/fixtures/torch-bin/state.bin");
    seeds.push(("torch_bin", "state", state.to_vec()));
    let pkl = include_bytes!("../../loftq-models/tests/fixtures/torch-bin/state.pkl");
    seeds.push(("pickle", "state", pkl.to_vec()));
    for (target, name, bytes) in seeds {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        std::fs::write(d.join(name), bytes).map_err(|e| format!("{name}: {e}"))?;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

/// Deterministic values in about [-1, 1).
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

fn saved(
    tmp: &Path,
    tensors: &BTreeMap<String, OutTensor>,
    meta: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, String> {
    let path = tmp.join("seed.safetensors");
    write_safetensors(&path, tensors, meta).map_err(|e| e.to_string())?;
    std::fs::read(&path).map_err(|e| e.to_string())
}

/// Plain tensors of several dtypes, packed weights (NF4 double-quantized, int3 asymmetric),
/// and one bitsandbytes NF4 weight taken from the repository's fixture.
fn safetensors_seeds(tmp: &Path, seeds: &mut Seeds) -> Result<(), String> {
    let mut plain = BTreeMap::new();
    plain.insert(
        "a.weight".into(),
        OutTensor::f32(vec![4, 8], &values(32, 1)),
    );
    plain.insert(
        "b.weight".into(),
        OutTensor::bf16(vec![8, 4], &values(32, 2)),
    );
    plain.insert("c.norm".into(), OutTensor::f32(vec![8], &values(8, 3)));
    plain.insert("d.ids".into(), OutTensor::u8(vec![16], (0..16).collect()));
    seeds.push(("safetensors", "plain", saved(tmp, &plain, None)?));

    let mut packed = BTreeMap::new();
    let mut meta = HashMap::new();
    let configs = [
        ("nf4dq", QuantConfig::nf4().with_double_quant(true)),
        ("int3", QuantConfig::int(3, false)),
    ];
    for (i, (name, cfg)) in configs.into_iter().enumerate() {
        let w = values(8 * 64, 10 + i as u32);
        let q: HostQuantized = Quantizer::new(cfg)
            .and_then(|qz| qz.quantize_host(&w, [8, 64]))
            .map_err(|e| e.to_string())?;
        add_packed(
            &format!("{name}.weight"),
            &PackedTensor::pack(&q, cfg),
            &mut packed,
            &mut meta,
        );
    }
    seeds.push(("safetensors", "packed", saved(tmp, &packed, Some(meta))?));

    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../loftq-models/tests/fixtures/tiny-llama-bnb/model.safetensors");
    let ck = Checkpoint::open(&fixture).map_err(|e| e.to_string())?;
    let prefix = "model.layers.0.self_attn.q_proj.weight";
    let mut bnb = BTreeMap::new();
    for name in ck.names().filter(|n| n.starts_with(prefix)) {
        let (entry, bytes) = ck.bytes(name).map_err(|e| e.to_string())?;
        bnb.insert(
            name.to_string(),
            OutTensor {
                dtype: entry.dtype,
                shape: entry.shape.clone(),
                bytes: bytes.to_vec(),
            },
        );
    }
    seeds.push(("safetensors", "bnb-nf4", saved(tmp, &bnb, None)?));
    Ok(())
}

/// A one-layer Llama (hidden 32) whose tensors use the row-blocked GGUF types, one block of
/// each other type the reader takes beside it, and a small byte-level BPE vocabulary.
fn gguf_seed() -> Vec<u8> {
    let (hidden, ff, vocab) = (32u64, 64u64, 8u64);
    let u = MetaValue::U64;
    let strs =
        |v: &[&str]| MetaValue::Array(v.iter().map(|s| MetaValue::Str(s.to_string())).collect());
    let meta: Vec<(&str, MetaValue)> = vec![
        ("general.architecture", MetaValue::Str("llama".into())),
        ("llama.block_count", u(1)),
        ("llama.embedding_length", u(hidden)),
        ("llama.feed_forward_length", u(ff)),
        ("llama.attention.head_count", u(2)),
        ("llama.attention.head_count_kv", u(1)),
        ("llama.rope.freq_base", MetaValue::F64(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F64(1e-5),
        ),
        ("llama.context_length", u(64)),
        ("llama.vocab_size", u(vocab)),
        ("tokenizer.ggml.model", MetaValue::Str("gpt2".into())),
        ("tokenizer.ggml.pre", MetaValue::Str("smollm".into())),
        (
            "tokenizer.ggml.tokens",
            strs(&["<s>", "a", "b", "Ġ", "ab", "Ġa", "1", "</s>"]),
        ),
        ("tokenizer.ggml.merges", strs(&["a b", "Ġ a"])),
        (
            "tokenizer.ggml.token_type",
            MetaValue::Array([3, 1, 1, 1, 1, 1, 1, 3].map(MetaValue::U64).to_vec()),
        ),
        ("tokenizer.ggml.bos_token_id", u(0)),
        ("tokenizer.ggml.eos_token_id", u(7)),
    ];
    let kv = hidden / 2;
    let shapes: [(&str, [u64; 2], GgmlType); 10] = [
        ("token_embd.weight", [hidden, vocab], GgmlType::F16),
        ("blk.0.attn_q.weight", [hidden, hidden], GgmlType::Q8_0),
        ("blk.0.attn_k.weight", [hidden, kv], GgmlType::Q4_0),
        ("blk.0.attn_v.weight", [hidden, kv], GgmlType::Q4_1),
        ("blk.0.attn_output.weight", [hidden, hidden], GgmlType::BF16),
        ("blk.0.ffn_gate.weight", [hidden, ff], GgmlType::Q8_0),
        ("blk.0.ffn_up.weight", [hidden, ff], GgmlType::Q4_0),
        ("blk.0.ffn_down.weight", [ff, hidden], GgmlType::F32),
        ("blk.0.attn_norm.weight", [hidden, 1], GgmlType::F32),
        ("blk.0.ffn_norm.weight", [hidden, 1], GgmlType::F32),
    ];
    let mut tensors: Vec<RawTensor> = shapes
        .iter()
        .map(|&(name, [cols, rows], ty)| {
            let n = (cols * rows) as usize;
            let len = ty.byte_len(n).expect("row length fits the type's block");
            RawTensor {
                name: name.into(),
                dims: if rows == 1 {
                    vec![cols]
                } else {
                    vec![cols, rows]
                },
                ty,
                // Any bytes are valid block data; small scales keep the values finite.
                bytes: (0..len).map(|i| (i * 37 % 61) as u8).collect(),
            }
        })
        .collect();
    // One block of every other type the reader decodes, outside the model (read by the raw
    // GGUF reader only).
    for ty in [
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::IQ4_NL,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_XS,
    ] {
        let (per, _) = ty.block_layout().expect("a known type");
        let len = ty.byte_len(per).expect("one block");
        tensors.push(RawTensor {
            name: format!("extra.{}", ty.name().to_lowercase()),
            dims: vec![per as u64],
            ty,
            bytes: (0..len).map(|i| (i * 37 % 61) as u8).collect(),
        });
    }
    tensors.push(RawTensor {
        name: "output_norm.weight".into(),
        dims: vec![hidden],
        ty: GgmlType::F32,
        bytes: values(hidden as usize, 5)
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    });
    gguf_bytes(&meta, &tensors)
}

/// The tiny Llama's config in transformers 5's spelling, and variants in the older spelling
/// with grouped-query attention, Qwen2-style biases and a sliding window.
fn config_seeds(seeds: &mut Seeds) -> Result<(), String> {
    let base = include_str!("../../loftq-models/tests/fixtures/tiny-llama/config.json");
    seeds.push(("config", "llama-v5", base.as_bytes().to_vec()));
    let cfg = LlamaConfig::from_json(base).map_err(|e| e.to_string())?;
    let mut v = cfg.to_hf_json();
    v["num_key_value_heads"] = 2.into();
    v["rope_theta"] = 500000.0.into();
    v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
    seeds.push(("config", "llama3-gqa", v.to_string().into_bytes()));
    let mut q = cfg.to_hf_json();
    q["model_type"] = "qwen2".into();
    q["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    q["use_sliding_window"] = false.into();
    q["sliding_window"] = 4096.into();
    q["tie_word_embeddings"] = true.into();
    seeds.push(("config", "qwen2", q.to_string().into_bytes()));
    // The other families' test models as transformers wrote them, encoders too.
    macro_rules! tiny {
        ($name:literal) => {
            (
                $name,
                include_str!(concat!(
                    "../../loftq-models/tests/fixtures/tiny-",
                    $name,
                    "/config.json"
                )),
            )
        };
    }
    let fixtures = [
        tiny!("mistral-sliding"),
        tiny!("phi2"),
        tiny!("phi3"),
        tiny!("phi3-longrope"),
        tiny!("bert"),
        tiny!("deberta-v2"),
        tiny!("deberta-v3"),
    ];
    for (name, text) in fixtures {
        seeds.push(("config", name, text.as_bytes().to_vec()));
    }
    Ok(())
}

/// A rank-2 adapter on two modules (one with its own rank and alpha).
fn adapter_seed(tmp: &Path) -> Result<Vec<u8>, String> {
    let mut config = AdapterConfig::new(2, 4.0, vec!["q_proj".into(), "v_proj".into()]);
    config.rank_pattern.insert("v_proj".into(), 1);
    let mut modules = BTreeMap::new();
    for (i, (m, r)) in [("q_proj", 2usize), ("v_proj", 1)].into_iter().enumerate() {
        let t = |shape: Vec<usize>, s: u32| HostTensor {
            data: values(shape.iter().product(), s),
            shape,
        };
        modules.insert(
            format!("model.layers.0.self_attn.{m}"),
            LoraWeights {
                a: t(vec![r, 8], 20 + i as u32),
                b: t(vec![8, r], 30 + i as u32),
            },
        );
    }
    let dir = tmp.join("adapter");
    let saved = Default::default();
    Adapter {
        config,
        modules,
        saved,
    }
    .write(&dir)
    .map_err(|e| e.to_string())?;
    let read = |f: &str| std::fs::read(dir.join(f)).map_err(|e| format!("{f}: {e}"));
    Ok(join2(
        &read("adapter_config.json")?,
        &read("adapter_model.safetensors")?,
    ))
}
