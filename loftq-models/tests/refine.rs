//! bitsandbytes 4-bit checkpoints read as bitsandbytes dequantizes them, and `loftq refine`:
//! optimal adapters for a fixed base, the accept/reject check, bad input.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use common::{device, fixture, scratch};
use loftq_core::lowrank::{RsvdConfig, SvdMethod, exact_svd};
use loftq_core::quant::{Rounding, host_f32};
use loftq_core::{LoftqConfig, LoraSpec, QuantConfig, Quantizer, loftq};
use loftq_models::init::{InitMethod, InitSpec, Target, run_init};
use loftq_models::io::{Adapter, Checkpoint, OutTensor, open_source, write_safetensors};
use loftq_models::nn::load_pretrained;
use loftq_models::refine::{Check, RefineReport, RefineSpec, run_refine};

const LINEARS: usize = 14;

fn bnb() -> PathBuf {
    fixture("tiny-llama-bnb")
}

fn spec(base: PathBuf, out: PathBuf) -> RefineSpec {
    RefineSpec {
        base,
        model: fixture("tiny-llama"),
        out,
        lora: LoraSpec {
            alpha: 16.0,
            ..LoraSpec::new(8)
        },
        svd: SvdMethod::Exact,
        target: Target::AllLinear,
        exclude: Vec::new(),
        seed: 3,
        check: None,
    }
}

fn refine(s: &RefineSpec) -> loftq_models::Result<RefineReport> {
    run_refine(s, &device(), &mut |_| {})
}

fn matrix(data: Vec<f32>, shape: [usize; 2]) -> Tensor<2> {
    Tensor::from_data(TensorData::new(data, shape), &device())
}

fn bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

#[test]
fn bitsandbytes_weights_read_as_bitsandbytes_dequantizes_them() {
    let src = open_source(&bnb()).unwrap();
    let expected = Checkpoint::open(&fixture("tiny-llama-bnb.expected.safetensors")).unwrap();
    let fp = Checkpoint::open(&fixture("tiny-llama/model.safetensors")).unwrap();
    // The parts (absmax, quant_map, ...) are not listed; the weights are, with their shapes.
    let names = src.tensor_names();
    assert_eq!(names.len(), fp.names().count(), "{names:?}");
    let mut seen = 0;
    for name in expected.names() {
        let want = expected.f32(name).unwrap();
        assert!(src.quantized(name).unwrap(), "{name}");
        assert_eq!(src.shape(name).unwrap(), want.shape);
        let got = src.tensor(name).unwrap();
        assert_eq!(got, want, "{name}");
        // Layer 0 has plain f32 absmax: our NF4 quantizer with bitsandbytes' rounding on the
        // bf16 weight gives the same values (two implementations of one rule).
        if name.contains("layers.0.") {
            let w = fp.f32(name).unwrap();
            let x: Vec<f32> = w.data.iter().map(|&v| bf16(v)).collect();
            let q = Quantizer::new(QuantConfig::nf4().with_rounding(Rounding::Bnb)).unwrap();
            let [r, c] = w.matrix_shape().unwrap();
            let (_, deq) = q.quantize_dequantize(&matrix(x, [r, c])).unwrap();
            let ours: Vec<f32> = host_f32(&deq).into_iter().map(bf16).collect();
            assert_eq!(ours, want.data, "{name}");
        }
        seen += 1;
    }
    assert_eq!(seen, LINEARS);
    // Unquantized tensors read as stored (bf16 here), and the model loads and runs close to
    // the full-precision one.
    assert!(!src.quantized("model.norm.weight").unwrap());
    let m = load_pretrained(&bnb(), None, &device()).unwrap();
    let f = load_pretrained(&fixture("tiny-llama"), None, &device()).unwrap();
    let ids = loftq_models::eval::token_ids(&[1, 5, 9, 200, 17, 3], [1, 6], &device());
    let (a, b) = (
        host_f32_3(m.forward(ids.clone())),
        host_f32_3(f.forward(ids)),
    );
    assert!(rel(&a, &b) < 0.2, "{}", rel(&a, &b));
}

fn host_f32_3(t: Tensor<3>) -> Vec<f32> {
    let [b, s, v] = t.dims();
    host_f32(&t.reshape([b * s, v]))
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let n: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (d / n).sqrt()
}

#[test]
fn damaged_bitsandbytes_weights_are_named() {
    let dir = scratch("bnb-damaged");
    let ck = Checkpoint::open(&bnb().join("model.safetensors")).unwrap();
    let victim = "model.layers.1.mlp.up_proj.weight.nested_absmax";
    let mut all = BTreeMap::new();
    for n in ck.names() {
        let (e, b) = ck.bytes(n).unwrap();
        let (shape, bytes) = match n == victim {
            true => (vec![e.shape[0] - 1], b[..b.len() - 4].to_vec()),
            false => (e.shape.clone(), b.to_vec()),
        };
        all.insert(
            n.to_string(),
            OutTensor {
                dtype: e.dtype,
                shape,
                bytes,
            },
        );
    }
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(bnb().join("config.json"), model.join("config.json")).unwrap();
    write_safetensors(&model.join("model.safetensors"), &all, None).unwrap();
    let err = open_source(&model)
        .unwrap()
        .tensor("model.layers.1.mlp.up_proj.weight")
        .unwrap_err()
        .to_string();
    assert!(err.contains(victim), "{err}");
    let s = spec(model, dir.join("out"));
    assert!(refine(&s).unwrap_err().to_string().contains(victim));
    assert!(!s.out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `‖W − Q − s·B·A‖/‖W‖` of the optimum: the tail of `W − Q`'s singular values.
fn optimum(w: &[f32], q: &[f32], shape: [usize; 2], rank: usize) -> f32 {
    let r: Vec<f32> = w.iter().zip(q).map(|(a, b)| a - b).collect();
    let full = exact_svd(&matrix(r, shape), shape[0].min(shape[1])).unwrap();
    let tail: f64 = full.s[rank..].iter().map(|&x| f64::from(x).powi(2)).sum();
    let norm: f64 = w.iter().map(|&x| f64::from(x).powi(2)).sum();
    (tail / norm).sqrt() as f32
}

#[test]
fn exact_refine_reaches_the_optimum_and_loads() {
    let dir = scratch("refine-optimum");
    let s = spec(bnb(), dir.join("out"));
    let report = refine(&s).unwrap();
    assert_eq!(report.tensors.len(), LINEARS);
    let base = open_source(&bnb()).unwrap();
    let fp = Checkpoint::open(&fixture("tiny-llama/model.safetensors")).unwrap();
    for t in &report.tensors {
        assert_eq!(t.quantizer, "bitsandbytes");
        assert!(t.accepted.is_none());
        let (w, q) = (fp.f32(&t.name).unwrap(), base.tensor(&t.name).unwrap());
        let best = optimum(&w.data, &q.data, t.shape, s.lora.rank);
        assert!((t.rel_err_fit - best).abs() < 2e-4, "{t:?} vs {best}");
        assert!(t.rel_err_fit < t.rel_err_base);
    }
    // The adapter is PEFT's, loads on the base, and base + s·B·A is the fitted weight.
    let adapter = Adapter::read(&s.out).unwrap();
    assert_eq!(adapter.config.r, 8);
    assert_eq!(adapter.modules.len(), LINEARS);
    let m = load_pretrained(&bnb(), Some(&s.out), &device()).unwrap();
    for (path, lin) in m.linears() {
        let Some(t) = report
            .tensors
            .iter()
            .find(|t| t.name == format!("{path}.weight"))
        else {
            continue;
        };
        assert_eq!(lin.lora.as_ref().unwrap().scaling, 2.0);
        let w = fp.f32(&t.name).unwrap();
        let merged = host_f32(&lin.merged_weight());
        let err = rel(&merged, &w.data) as f32;
        assert!((err - t.rel_err_fit).abs() < 1e-4, "{path}: {err} vs {t:?}");
    }
    // The randomized SVD lands within 1% of the optimum; the output is refused when present.
    let mut r = spec(bnb(), dir.join("rand"));
    r.svd = SvdMethod::Randomized(RsvdConfig::default());
    let fast = refine(&r).unwrap();
    assert!(fast.mean_rel_err_final < report.mean_rel_err_final * 1.01);
    let err = refine(&s).unwrap_err().to_string();
    assert!(err.contains("not empty"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refining_a_qlora_base_is_loftq_with_one_iteration() {
    let dir = scratch("refine-qlora");
    let init = InitSpec {
        method: InitMethod::Qlora,
        quant: QuantConfig::nf(2),
        svd: SvdMethod::Exact,
        ..InitSpec::new(fixture("tiny-llama"), dir.join("qlora"), 8, 1)
    };
    run_init(&init, &[device()], false, &mut |_| {}).unwrap();
    let mut s = spec(init.out.clone(), dir.join("out"));
    s.lora.alpha = 8.0;
    let report = refine(&s).unwrap();
    let fp = Checkpoint::open(&fixture("tiny-llama/model.safetensors")).unwrap();
    for t in &report.tensors {
        assert_eq!(t.quantizer, "nf2-b64");
        let w = fp.f32(&t.name).unwrap();
        let mut cfg = LoftqConfig::new(QuantConfig::nf(2), 8, 1);
        cfg.svd = SvdMethod::Exact;
        let l = loftq(&matrix(w.data, t.shape), &cfg).unwrap();
        assert!((l.rel_err_quant - t.rel_err_base).abs() < 1e-5, "{t:?}");
        assert!((l.rel_err() - t.rel_err_fit).abs() < 1e-4, "{t:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A copy of the full-precision fixture with a byte-level tokenizer, and a text.
fn model_with_tokenizer(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("fp");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-llama").join(f), model.join(f)).unwrap();
    }
    let tok = loftq_models::tokenizer::byte_level_json().to_string();
    std::fs::write(model.join("tokenizer.json"), tok).unwrap();
    let text = dir.join("text.txt");
    std::fs::write(&text, "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune").unwrap();
    (model, text)
}

#[test]
fn the_check_keeps_only_layers_that_bring_the_logits_closer() {
    let dir = scratch("refine-check");
    let (model, text) = model_with_tokenizer(&dir);
    let mut s = spec(bnb(), dir.join("out"));
    s.model = model.clone();
    s.lora.rank = 2;
    s.check = Some(Check { text, tokens: 64 });
    let report = refine(&s).unwrap();
    let [before, after] = report.logits_err.unwrap();
    assert!(after <= before);
    let mut last = before;
    let adapter = Adapter::read(&s.out).unwrap();
    for t in &report.tensors {
        let now = t.logits_err.unwrap();
        let module = t.name.strip_suffix(".weight").unwrap();
        let b = &adapter.modules[module].b;
        match t.accepted.unwrap() {
            true => assert!(now < last && b.data.iter().any(|&x| x != 0.0)),
            // A refused layer keeps QLoRA's start: B = 0, A nonzero (trainable).
            false => {
                assert_eq!(now, last);
                assert!(b.data.iter().all(|&x| x == 0.0));
                assert!(adapter.modules[module].a.data.iter().any(|&x| x != 0.0));
            }
        }
        last = now;
    }
    assert_eq!(last, after);
    assert_eq!(
        report.accepted.unwrap(),
        report
            .tensors
            .iter()
            .filter(|t| t.accepted == Some(true))
            .count()
    );
    // The written adapter reproduces the final logits error.
    let m = load_pretrained(&bnb(), Some(&s.out), &device()).unwrap();
    let f = load_pretrained(&model, None, &device()).unwrap();
    let tok = loftq_models::Tokenizer::for_model(&model).unwrap();
    let content = std::fs::read_to_string(&s.check.as_ref().unwrap().text).unwrap();
    let mut ids = tok.encode(&content).unwrap();
    ids.truncate(64);
    let input = loftq_models::eval::token_ids(&ids, [1, ids.len()], &device());
    let e = rel(
        &host_f32_3(m.forward(input.clone())),
        &host_f32_3(f.forward(input)),
    ) as f32;
    assert!((e - after).abs() < 1e-4, "{e} vs {after}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_refine_input_is_refused() {
    let dir = scratch("refine-bad");
    // A base with nothing quantized.
    let s = spec(fixture("tiny-llama"), dir.join("plain"));
    let err = refine(&s).unwrap_err().to_string();
    assert!(err.contains("no quantized weight"), "{err}");
    // A rank larger than a matrix names the tensor.
    let mut big = spec(bnb(), dir.join("big"));
    big.lora.rank = 65;
    let err = refine(&big).unwrap_err().to_string();
    assert!(err.contains("model.layers.0"), "{err}");
    // A model whose tensor has another shape.
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let ck = Checkpoint::open(&fixture("tiny-llama/model.safetensors")).unwrap();
    let mut all = BTreeMap::new();
    for n in ck.names() {
        let t = ck.f32(n).unwrap();
        let t = match n == "model.layers.0.self_attn.q_proj.weight" {
            true => OutTensor::f32(vec![32, 64], &t.data[..32 * 64]),
            false => OutTensor::f32(t.shape, &t.data),
        };
        all.insert(n.to_string(), t);
    }
    write_safetensors(&other.join("model.safetensors"), &all, None).unwrap();
    let mut mismatch = spec(bnb(), dir.join("mismatch"));
    mismatch.model = other;
    let err = refine(&mismatch).unwrap_err().to_string();
    assert!(
        err.contains("model.layers.0.self_attn.q_proj.weight"),
        "{err}"
    );
    for o in [&s.out, &big.out, &mismatch.out] {
        assert!(!o.exists(), "{}", o.display());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
