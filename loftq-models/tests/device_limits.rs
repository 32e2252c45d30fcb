//! Work larger than one buffer of the device (lavapipe's are 128 MiB): passes split
//! themselves to fit, and a model whose tensors cannot fit is refused when it is loaded.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use common::*;
use loftq_core::DeviceSpec;
use loftq_core::device::max_buffer_bytes;
use loftq_core::quant::host_f32;
use loftq_models::LlamaConfig;
use loftq_models::eval::{perplexity, token_ids};
use loftq_models::init::{InitSpec, run_init};
use loftq_models::io::{Checkpoint, HostTensor, TensorSource};
use loftq_models::nn::{KvCache, Llama, LoadOptions, load_model, load_pretrained};

/// The test device's buffer limit; `None` (after checking that it is the CPU, which has none)
/// where there is nothing to test.
fn limit() -> Option<u64> {
    let limit = max_buffer_bytes(&device());
    if limit.is_none() {
        assert!(
            matches!(DeviceSpec::from_env(), DeviceSpec::Cpu),
            "a GPU sets a limit"
        );
    }
    limit
}

/// An input whose attention scores exceed the device's largest buffer (lavapipe's 128 MiB:
/// tiny-llama's 4 heads over 3,072 positions need 151 MB) is scored in blocks of queries: its
/// perplexity, and the last logits of a prefill through the cache, equal the CPU's. The CPU
/// sets no limit; there the whole input is one block.
#[test]
fn inputs_whose_scores_exceed_a_device_buffer_run_in_blocks() {
    let dir = fixture("tiny-llama");
    let model = load_pretrained(&dir, None, &device()).unwrap();
    let Some(limit) = limit() else { return };
    let heads = model.config.num_attention_heads as u64;
    let Some(n) = (1..=16u64)
        .map(|i| i * 512)
        .find(|&n| heads * n * n * 4 > limit)
    else {
        eprintln!("the device's buffers hold 8,192 positions' scores: nothing to split");
        return;
    };
    let n = n as usize;
    let tokens: Vec<u32> = (0..n as u32)
        .map(|i| i.wrapping_mul(2_654_435_761) >> 24)
        .collect();
    let cpu = load_pretrained(&dir, None, &Device::flex()).unwrap();
    let (got, want) = (perplexity(&model, &tokens), perplexity(&cpu, &tokens));
    assert!(
        (got.nll - want.nll).abs() < 1e-4,
        "{n} positions: NLL {} on the device, {} on the CPU",
        got.nll,
        want.nll
    );
    let prefill = |m: &Llama| {
        let ids = token_ids(&tokens, [1, n], &m.embed_tokens.device());
        host_f32(&m.forward_cached(ids, &mut KvCache::new()))
    };
    let d = max_abs_diff(&prefill(&model), &prefill(&cpu));
    assert!(d < 1e-4, "{n} positions, prefill: max |Δlogit| {d}");
}

/// A checkpoint's tensors by shape, all zeros, made only when read.
struct Zeros {
    shapes: HashMap<String, Vec<usize>>,
    root: PathBuf,
}

impl TensorSource for Zeros {
    fn root(&self) -> &Path {
        &self.root
    }

    fn tensor_names(&self) -> Vec<String> {
        self.shapes.keys().cloned().collect()
    }

    fn tensor(&self, name: &str) -> loftq_models::Result<HostTensor> {
        let shape = self.shape(name)?;
        Ok(HostTensor {
            data: vec![0.0; shape.iter().product()],
            shape,
        })
    }

    fn shape(&self, name: &str) -> loftq_models::Result<Vec<usize>> {
        let shape = self.shapes.get(name).cloned();
        shape.ok_or_else(|| loftq_models::ModelError::tensor(&self.root, name, "missing"))
    }
}

/// tiny-llama with a vocabulary whose embedding and head outgrow one buffer of the device is
/// refused at load, naming the tensor, before any of it is read or uploaded.
#[test]
fn tensors_larger_than_a_device_buffer_are_refused_at_load() {
    let Some(limit) = limit() else { return };
    let mut config = LlamaConfig::from_file(&fixture("tiny-llama/config.json")).unwrap();
    let h = config.hidden_size;
    config.vocab_size = 2 * limit as usize / (4 * h);
    let tiny = Checkpoint::open(&fixture("tiny-llama/model.safetensors")).unwrap();
    let shapes = (tiny.tensor_names().into_iter())
        .map(|name| {
            let shape = match name.as_str() {
                "model.embed_tokens.weight" | "lm_head.weight" => vec![config.vocab_size, h],
                _ => tiny.shape(&name).unwrap(),
            };
            (name, shape)
        })
        .collect();
    let source = Zeros {
        shapes,
        root: PathBuf::from("zeros"),
    };
    let e = load_model(&config, &source, &device(), &LoadOptions::default()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("model.embed_tokens.weight") && msg.contains("one buffer of the device"),
        "{msg}"
    );
}

/// tiny-llama with MLP matrices larger than one buffer of the device, as a sparse file (its
/// values are never read): `loftq init` refuses it before any work, naming the matrix, and
/// leaves no output.
#[test]
fn init_refuses_matrices_larger_than_a_device_buffer() {
    let Some(limit) = limit() else { return };
    let dir = scratch("init-limit");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("tiny-llama/config.json")).unwrap()).unwrap();
    let h = config["hidden_size"].as_u64().unwrap() as usize;
    let wide = limit as usize / (4 * h) + 1;
    config["intermediate_size"] = wide.into();
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let tiny = Checkpoint::open(&fixture("tiny-llama/model.safetensors")).unwrap();
    let mut header = serde_json::Map::new();
    let mut end = 0;
    let mut names = tiny.tensor_names();
    names.sort();
    for name in names {
        let shape = match name.rsplit('.').nth(1) {
            Some("gate_proj" | "up_proj") => vec![wide, h],
            Some("down_proj") => vec![h, wide],
            _ => tiny.shape(&name).unwrap(),
        };
        let bytes = 4 * shape.iter().product::<usize>();
        let entry =
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [end, end + bytes]});
        header.insert(name, entry);
        end += bytes;
    }
    let header = serde_json::Value::Object(header).to_string().into_bytes();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header);
    let path = model.join("model.safetensors");
    std::fs::write(&path, &file).unwrap();
    // The data as a hole: nothing is written to disk.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len((file.len() + end) as u64).unwrap();

    let out = dir.join("out");
    let spec = InitSpec::new(model, out.clone(), 4, 1);
    let e = run_init(&spec, &[device()], false, &mut |_| {}).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("mlp.down_proj.weight") || msg.contains("mlp.gate_proj.weight"),
        "{msg}"
    );
    assert!(msg.contains("one buffer of the device"), "{msg}");
    assert!(!out.exists(), "no output is left");
}
