//! Writing and reading back: packed and dense backbones, PEFT adapters; bad files.

mod common;

use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use common::{device, fixture, scratch};
use loftq_core::QuantConfig;
use loftq_models::io::{Adapter, AdapterConfig, Checkpoint, packed_names};
use loftq_models::nn::{BackboneFormat, LoadOptions, load_model, load_pretrained};
use loftq_models::{LlamaConfig, ModelError, nn::Llama};

fn ids() -> Tensor<2, Int> {
    let v: Vec<i32> = (0..32).map(|i| (i * 37 + 5) % 256).collect();
    Tensor::from_data(TensorData::new(v, [2, 16]), &device())
}

fn logits(model: &Llama) -> Vec<f32> {
    common::logits(model, ids())
}

/// PEFT's 4-bit LoftQ model, quantized to `config` on load, with PEFT's adapter.
fn loftq_model(config: QuantConfig) -> (LlamaConfig, Llama) {
    let dir = fixture("tiny-llama-loftq-4bit");
    let cfg = LlamaConfig::from_file(&fixture("tiny-llama/config.json")).unwrap();
    let ckpt = Checkpoint::open(&dir.join("backbone_Q.safetensors")).unwrap();
    let adapter = Adapter::read(&dir.join("adapter")).unwrap();
    let opts = LoadOptions {
        quantize: Some(config),
        adapter: Some(&adapter),
    };
    let model = load_model(&cfg, &ckpt, &device(), &opts).unwrap();
    (cfg, model)
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

#[test]
fn packed_backbone_and_adapter_round_trip_exactly() {
    for config in [
        QuantConfig::nf4(),
        QuantConfig::nf4().with_double_quant(true),
    ] {
        let (_, model) = loftq_model(config);
        let want = logits(&model);
        let dir = scratch(&format!("packed-{}", config.label()));
        model.save_backbone(&dir, BackboneFormat::Packed).unwrap();
        let adapter = model
            .adapter(AdapterConfig::new(8, 8.0, vec![]))
            .expect("adapters present");
        adapter.write(&dir.join("adapter")).unwrap();

        let ckpt = Checkpoint::open(&dir).unwrap();
        assert_eq!(packed_names(&ckpt).len(), 14);
        let back = load_pretrained(&dir, Some(&dir.join("adapter")), &device()).unwrap();
        assert_eq!(logits(&back), want, "{}", config.label());
        let read = Adapter::read(&dir.join("adapter")).unwrap();
        assert_eq!(read.modules, adapter.modules);
        assert_eq!(read.config.target_modules.as_array().unwrap().len(), 7);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A packed header that would make the reader compute sizes from nonsense (0 bits, a shape
/// whose product overflows, no elements) is an error naming the tensor, not a panic.
#[test]
fn bad_packed_headers_are_errors() {
    let (_, model) = loftq_model(QuantConfig::nf4());
    let dir = scratch("bad-packed");
    model.save_backbone(&dir, BackboneFormat::Packed).unwrap();
    let file = dir.join("model.safetensors");
    let ck = Checkpoint::open(&file).unwrap();
    let tensors: std::collections::BTreeMap<String, loftq_models::io::OutTensor> = ck
        .names()
        .map(|n| {
            let (e, b) = ck.bytes(n).unwrap();
            let t = loftq_models::io::OutTensor {
                dtype: e.dtype,
                shape: e.shape.clone(),
                bytes: b.to_vec(),
            };
            (n.to_string(), t)
        })
        .collect();
    let meta = ck.metadata().clone();
    drop(ck);
    let key = "loftq.q.model.layers.0.mlp.up_proj.weight";
    let header: serde_json::Value = serde_json::from_str(&meta[key]).unwrap();
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit); 3] = [
        ("bits 0", |h| set_bits(h, 0)),
        ("overflow", |h| {
            h["shape"] = serde_json::json!([usize::MAX, 2])
        }),
        ("empty", |h| h["shape"] = serde_json::json!([0, 64])),
    ];
    for (what, edit) in edits {
        let mut h = header.clone();
        edit(&mut h);
        let mut m = meta.clone();
        m.insert(key.to_string(), h.to_string());
        loftq_models::io::write_safetensors(&file, &tensors, Some(m)).unwrap();
        let msg = expect_err(load_pretrained(&dir, None, &device()));
        assert!(
            msg.contains("model.layers.0.mlp.up_proj.weight") && msg.contains("bad packed header"),
            "{what}: {msg}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sets every `bits` field in `v` to `bits`.
fn set_bits(v: &mut serde_json::Value, bits: u64) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == "bits" {
                    *x = bits.into();
                } else {
                    set_bits(x, bits);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| set_bits(x, bits)),
        _ => {}
    }
}

#[test]
fn dense_backbones_load_and_packed_is_smaller() {
    let (_, mut model) = loftq_model(QuantConfig::nf(2));
    model.set_adapters_enabled(false);
    let want = logits(&model);
    let dir = scratch("dense");
    let mut sizes = Vec::new();
    for (format, tol) in [
        (BackboneFormat::F32, 1e-5),
        (BackboneFormat::Bf16, 0.1),
        (BackboneFormat::Packed, 0.0),
    ] {
        let out = dir.join(format!("{format:?}"));
        model.save_backbone(&out, format).unwrap();
        sizes.push(file_size(&out.join("model.safetensors")));
        let back = load_pretrained(&out, None, &device()).unwrap();
        let got = logits(&back);
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff <= tol, "{format:?}: {diff}");
    }
    // Embeddings and the LM head stay f32 in all three; the 14 linear weights shrink.
    assert!(sizes[2] < sizes[1] && sizes[1] < sizes[0], "{sizes:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn expect_err(r: Result<Llama, ModelError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_files_are_errors_that_name_the_file_and_tensor() {
    let src = fixture("tiny-llama");
    let dir = scratch("bad");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();

    // Truncated.
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() - 100]).unwrap();
    let msg = expect_err(load_pretrained(&dir, None, &device()));
    assert!(
        msg.contains("model.safetensors") && msg.contains("valid"),
        "{msg}"
    );

    // Header offsets past the end: length field claiming more than the file.
    let mut lying = bytes.clone();
    lying[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(dir.join("model.safetensors"), &lying).unwrap();
    assert!(expect_err(load_pretrained(&dir, None, &device())).contains("model.safetensors"));

    // Missing tensor.
    let ck = Checkpoint::open(&src.join("model.safetensors")).unwrap();
    let mut kept = std::collections::BTreeMap::new();
    for name in ck.names().filter(|n| !n.contains("layers.1.mlp.up_proj")) {
        let t = ck.f32(name).unwrap();
        kept.insert(
            name.to_string(),
            loftq_models::io::OutTensor::f32(t.shape, &t.data),
        );
    }
    loftq_models::io::write_safetensors(&dir.join("model.safetensors"), &kept, None).unwrap();
    let msg = expect_err(load_pretrained(&dir, None, &device()));
    assert!(
        msg.contains("model.layers.1.mlp.up_proj.weight") && msg.contains("not found"),
        "{msg}"
    );

    // Shape mismatch: the config says a wider MLP than the weights have.
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"),
    )
    .unwrap();
    let msg = expect_err(load_pretrained(&dir, None, &device()));
    assert!(
        msg.contains("gate_proj.weight") && msg.contains("[128, 64]"),
        "{msg}"
    );

    // A config claiming far more layers than the file has: the config is named, with the
    // last layer it claims (nothing is sized from the claim).
    std::fs::write(
        dir.join("config.json"),
        cfg.replace(
            "\"num_hidden_layers\": 2",
            "\"num_hidden_layers\": 1000000000000000",
        ),
    )
    .unwrap();
    let msg = expect_err(load_pretrained(&dir, None, &device()));
    assert!(
        msg.contains("config.json") && msg.contains("num_hidden_layers is 1000000000000000"),
        "{msg}"
    );

    // Bad JSON.
    std::fs::write(dir.join("config.json"), "{\"hidden_size\": ").unwrap();
    let msg = expect_err(load_pretrained(&dir, None, &device()));
    assert!(msg.contains("config.json"), "{msg}");

    // No weights at all.
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let msg = expect_err(load_pretrained(&dir, None, &device()));
    assert!(msg.contains("no model.safetensors"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn adapters_that_do_not_fit_are_errors() {
    let src = fixture("tiny-llama");
    let peft = fixture("tiny-llama-loftq-4bit/adapter");
    let dir = scratch("bad-adapter");
    let mut adapter = Adapter::read(&peft).unwrap();

    // A module the model does not have.
    let w = adapter.modules["model.layers.0.mlp.up_proj"].clone();
    adapter
        .modules
        .insert("model.layers.7.mlp.up_proj".into(), w);
    adapter.write(&dir).unwrap();
    let msg = expect_err(load_pretrained(&src, Some(&dir), &device()));
    assert!(msg.contains("model.layers.7.mlp.up_proj"), "{msg}");

    // Factors of the wrong shape.
    let mut adapter = Adapter::read(&peft).unwrap();
    let w = adapter.modules["model.layers.0.mlp.up_proj"].clone();
    adapter
        .modules
        .insert("model.layers.0.mlp.down_proj".into(), w);
    adapter.write(&dir).unwrap();
    let msg = expect_err(load_pretrained(&src, Some(&dir), &device()));
    assert!(msg.contains("down_proj"), "{msg}");

    // Settings no model can run with, refused when the adapter is read (they panicked or were
    // taken before): rank 0, a dropout outside [0, 1), a NaN factor.
    let good = Adapter::read(&peft).unwrap();
    for (field, value, says) in [
        ("r", "0", "rank r is 0"),
        ("lora_dropout", "5", "lora_dropout 5 is outside [0, 1)"),
        ("lora_dropout", "-0.1", "outside [0, 1)"),
    ] {
        good.write(&dir).unwrap();
        let path = dir.join("adapter_config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg[field] = serde_json::from_str(value).unwrap();
        std::fs::write(&path, cfg.to_string()).unwrap();
        let msg = expect_err(load_pretrained(&src, Some(&dir), &device()));
        assert!(
            msg.contains(says) && msg.contains("adapter_config.json"),
            "{msg}"
        );
    }
    let mut nan = good.clone();
    let up = nan.modules.get_mut("model.layers.0.mlp.up_proj").unwrap();
    up.b.data[3] = f32::NAN;
    nan.write(&dir).unwrap();
    let msg = expect_err(load_pretrained(&src, Some(&dir), &device()));
    assert!(
        msg.contains("model.layers.0.mlp.up_proj.lora_B") && msg.contains("NaN"),
        "{msg}"
    );

    // Missing config.
    std::fs::remove_file(dir.join("adapter_config.json")).unwrap();
    let msg = expect_err(load_pretrained(&src, Some(&dir), &device()));
    assert!(msg.contains("adapter_config.json"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// tiny-llama rewritten as two shards with an index, and in f16 and bf16.
#[test]
fn sharded_and_half_precision_checkpoints_load() {
    let src = fixture("tiny-llama");
    let want = logits(&load_pretrained(&src, None, &device()).unwrap());
    let ck = Checkpoint::open(&src.join("model.safetensors")).unwrap();
    let dir = scratch("sharded");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let names: Vec<String> = ck.names().map(str::to_string).collect();
    let mut weight_map = serde_json::Map::new();
    for (k, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", k + 1);
        let mut shard = std::collections::BTreeMap::new();
        for n in part {
            let t = ck.f32(n).unwrap();
            shard.insert(
                n.clone(),
                loftq_models::io::OutTensor::f32(t.shape, &t.data),
            );
            weight_map.insert(n.clone(), file.clone().into());
        }
        loftq_models::io::write_safetensors(&dir.join(&file), &shard, None).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(
        logits(&load_pretrained(&dir, None, &device()).unwrap()),
        want
    );

    // Half precisions: every weight rounded, logits close.
    for half in ["F16", "BF16"] {
        let mut all = std::collections::BTreeMap::new();
        for n in &names {
            let t = ck.f32(n).unwrap();
            let out = if half == "BF16" {
                loftq_models::io::OutTensor::bf16(t.shape, &t.data)
            } else {
                loftq_models::io::OutTensor {
                    dtype: safetensors::Dtype::F16,
                    shape: t.shape,
                    bytes: t
                        .data
                        .iter()
                        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                        .collect(),
                }
            };
            all.insert(n.clone(), out);
        }
        let d = dir.join(half);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
        loftq_models::io::write_safetensors(&d.join("model.safetensors"), &all, None).unwrap();
        let got = logits(&load_pretrained(&d, None, &device()).unwrap());
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff > 0.0 && diff < 0.05, "{half}: {diff}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// LoftQ in memory on the tiny model, written (packed + PEFT adapter) and read back: the
/// logits are identical, and merging each adapter into its base gives the same function.
#[test]
fn loftq_init_write_read_gives_identical_logits() {
    use loftq_core::LoftqConfig;
    use loftq_core::init::LoraInit;
    use loftq_core::lowrank::SvdMethod;
    use loftq_models::nn::BaseWeight;

    let src = fixture("tiny-llama");
    let orig = load_pretrained(&src, None, &device()).unwrap();
    let mut model = orig.clone();
    let mut cfg = LoftqConfig::new(QuantConfig::nf(2), 8, 3);
    cfg.svd = SvdMethod::Exact;
    cfg.lora.alpha = 16.0; // s = 2: the exact convention divides the factors by √2.
    let report = model
        .init_adapters(&LoraInit::Loftq(cfg.clone()), 8, 1.0, |_| true)
        .unwrap();
    assert_eq!(report.len(), 14);
    assert!(
        report.iter().all(|l| l.rel_err > 0.0 && l.rel_err < 0.6),
        "{report:?}"
    );
    let want = logits(&model);

    let dir = scratch("loftq-roundtrip");
    model.save_backbone(&dir, BackboneFormat::Packed).unwrap();
    let mut acfg = AdapterConfig::new(8, 16.0, vec![]);
    acfg.base_model_name_or_path = Some(src.display().to_string());
    model
        .adapter(acfg)
        .unwrap()
        .write(&dir.join("adapter"))
        .unwrap();
    let back = load_pretrained(&dir, Some(&dir.join("adapter")), &device()).unwrap();
    assert_eq!(logits(&back), want);
    let scalings: Vec<f64> = back
        .linears()
        .iter()
        .filter_map(|(_, l)| l.lora.as_ref().map(|a| a.scaling))
        .collect();
    assert_eq!(scalings, vec![2.0; 14]);

    // Merged: W' = Q + s·B·A as a dense base, no adapter.
    let mut merged = model.clone();
    for (_, lin) in merged.decoder_linears_mut() {
        lin.base = BaseWeight::Dense(lin.merged_weight());
        lin.lora = None;
    }
    let d = logits(&merged)
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d < 1e-4, "merged: {d}");
    // LoftQ's start is closer to the original model than the plain quantized base.
    let mut q_only = model.clone();
    q_only.set_adapters_enabled(false);
    let dist = |v: &[f32]| {
        let o = logits(&orig);
        v.iter()
            .zip(&o)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            .sqrt()
    };
    assert!(dist(&want) < dist(&logits(&q_only)));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn stream_writer_checks_order_and_sizes_and_leaves_no_partial_file() {
    use loftq_models::io::StreamWriter;
    use safetensors::Dtype;
    let dir = scratch("stream");
    let path = dir.join("s.safetensors");
    let entries = vec![
        ("a".to_string(), Dtype::F32, vec![2, 2]),
        ("b".to_string(), Dtype::U8, vec![3]),
    ];
    let meta = std::collections::HashMap::from([("k".to_string(), "v".to_string())]);
    let mut w = StreamWriter::create(&path, &entries, &meta).unwrap();
    let a: Vec<u8> = [1f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    assert!(w.write("b", &[1, 2, 3]).is_err(), "out of order");
    assert!(w.write("a", &a[..8]).is_err(), "short");
    w.write("a", &a).unwrap();
    assert!(!path.exists(), "nothing visible before finish");
    w.write("b", &[7, 8, 9]).unwrap();
    w.finish().unwrap();
    let ck = Checkpoint::open(&path).unwrap();
    assert_eq!(ck.f32("a").unwrap().data, vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(ck.i64("b").unwrap().1, vec![7, 8, 9]);
    assert_eq!(ck.metadata().get("k").map(String::as_str), Some("v"));
    // Unfinished: an error, and the temporary file is gone.
    let w = StreamWriter::create(&dir.join("t.safetensors"), &entries, &meta).unwrap();
    assert!(w.finish().is_err());
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("s.safetensors")]);
    std::fs::remove_dir_all(&dir).unwrap();
}
