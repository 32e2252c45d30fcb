//! `loftq init` as a library call: outputs load and reproduce the in-memory start, runs are
//! deterministic, interrupted runs resume to byte-identical files, bad input leaves nothing.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use common::{device, fixture, scratch};
use loftq_core::QuantConfig;
use loftq_models::init::{Backbone, Event, InitMethod, InitSpec, Target, run_init};
use loftq_models::io::{Adapter, Checkpoint, OutTensor, write_safetensors};
use loftq_models::nn::load_pretrained;

fn spec(model: PathBuf, out: PathBuf) -> InitSpec {
    let mut spec = InitSpec {
        quant: QuantConfig::nf(2),
        backbone: Backbone::Both,
        seed: 7,
        ..InitSpec::new(model, out, 8, 3)
    };
    spec.lora.alpha = 16.0;
    spec
}

use common::run_init_here as run;

const FILES: [&str; 5] = [
    "model.safetensors",
    "adapter/adapter_model.safetensors",
    "adapter/adapter_config.json",
    "bf16/model.safetensors",
    "config.json",
];

fn read_all(dir: &Path) -> Vec<Vec<u8>> {
    common::read_files(dir, &FILES)
}

#[test]
fn init_outputs_load_and_report() {
    let dir = scratch("init-basic");
    let s = spec(fixture("tiny-llama"), dir.join("out"));
    let report = run(&s, false).unwrap();
    assert_eq!(report.tensors.len(), 14);
    for t in &report.tensors {
        let q = t.rel_err_quant.unwrap();
        assert!(t.rel_err_init < q && q < 0.7, "{t:?}");
        assert_eq!(t.quantizer, "nf2-b64");
        assert_eq!(t.bits_per_param, 2.5);
    }
    assert!((report.totals.avg_base_bits_per_param - 2.5).abs() < 1e-12);
    assert!(!s.out.join(".loftq-partial").exists());
    // The packed model with its adapter, and the bf16 one, load; the adapter is PEFT's.
    let m = load_pretrained(&s.out, Some(&s.out.join("adapter")), &device()).unwrap();
    assert_eq!(
        m.linears().iter().filter(|(_, l)| l.lora.is_some()).count(),
        14
    );
    assert!(
        m.linears()
            .iter()
            .all(|(_, l)| l.lora.as_ref().is_none_or(|a| a.scaling == 2.0))
    );
    let a = Adapter::read(&s.out.join("adapter")).unwrap();
    assert_eq!(a.config.init_lora_weights, serde_json::Value::Bool(true));
    assert_eq!(a.config.r, 8);
    load_pretrained(&s.out.join("bf16"), None, &device()).unwrap();
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.out.join("report.json")).unwrap()).unwrap();
    assert_eq!(rep["tensors"].as_array().unwrap().len(), 14);
    assert!(rep["totals"]["peak_rss_bytes"].as_u64().is_some());
    // A non-empty --out is refused without --resume.
    let err = run(&s, false).unwrap_err().to_string();
    assert!(err.contains("not empty"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn interrupted_runs_resume_to_identical_files() {
    let dir = scratch("init-resume");
    let a = spec(fixture("tiny-llama"), dir.join("a"));
    run(&a, false).unwrap();
    let want = read_all(&a.out);
    // Same seed, another directory, two workers on the device: byte-identical.
    let b = spec(fixture("tiny-llama"), dir.join("b"));
    run_init(&b, &[device(), device()], false, &mut |_| {}).unwrap();
    assert_eq!(read_all(&b.out), want);

    // "Kill" after 5 tensors, and again while assembling, then resume.
    for kill_at in [5usize, usize::MAX] {
        let c = spec(fixture("tiny-llama"), dir.join(format!("c{kill_at}")));
        let mut n = 0;
        let killed = catch_unwind(AssertUnwindSafe(|| {
            run_init(&c, &[device()], false, &mut |e| match e {
                Event::Tensor(_) => {
                    n += 1;
                    assert!(n < kill_at, "killed");
                }
                Event::Assembling => assert!(kill_at != usize::MAX, "killed"),
                Event::Planned { .. }
                | Event::Calibrating { .. }
                | Event::Scoring { .. }
                | Event::Sensitivity { .. }
                | Event::Distill(_) => {}
            })
        }));
        assert!(killed.is_err());
        assert!(c.out.join(".loftq-partial").is_dir());
        // Without resuming, the leftovers are refused; with other options too.
        assert!(run(&c, false).is_err());
        let mut other = c.clone();
        other.lora.rank = 4;
        let err = run(&other, true).unwrap_err().to_string();
        assert!(err.contains("other settings"), "{err}");
        let report = run(&c, true).unwrap();
        assert!(report.totals.resumed > 0);
        assert_eq!(read_all(&c.out), want, "kill at {kill_at}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// On a GPU, LoftQ runs targets of one shape as one batched problem (`device_batch`): the
/// starts are those of one at a time up to rounding. On the CPU both run one at a time.
#[test]
fn device_batches_give_the_starts_of_one_at_a_time() {
    let dir = scratch("init-batch");
    let one = InitSpec {
        device_batch: 1,
        ..spec(fixture("tiny-llama"), dir.join("one"))
    };
    let batched = spec(fixture("tiny-llama"), dir.join("batched"));
    let (want, got) = (run(&one, false).unwrap(), run(&batched, false).unwrap());
    assert_eq!(got.tensors.len(), 14);
    for (w, g) in want.tensors.iter().zip(&got.tensors) {
        assert_eq!((&w.name, w.iters_used), (&g.name, g.iters_used));
        let (wq, gq) = (w.rel_err_quant.unwrap(), g.rel_err_quant.unwrap());
        assert!((wq - gq).abs() <= 1e-5, "{}: {wq} vs {gq}", w.name);
        let (wi, gi) = (w.rel_err_init, g.rel_err_init);
        assert!((wi - gi).abs() <= 0.01 * wi, "{}: {wi} vs {gi}", w.name);
    }
    load_pretrained(&batched.out, Some(&batched.out.join("adapter")), &device()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_leaves_nothing_behind() {
    let dir = scratch("init-bad");
    // A NaN weight.
    let src = fixture("tiny-llama");
    let ck = Checkpoint::open(&src.join("model.safetensors")).unwrap();
    let model = dir.join("nan-model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(src.join("config.json"), model.join("config.json")).unwrap();
    let mut all = std::collections::BTreeMap::new();
    for n in ck.names() {
        let mut t = ck.f32(n).unwrap();
        if n == "model.layers.1.mlp.up_proj.weight" {
            t.data[77] = f32::NAN;
        }
        all.insert(n.to_string(), OutTensor::f32(t.shape, &t.data));
    }
    write_safetensors(&model.join("model.safetensors"), &all, None).unwrap();
    let s = spec(model, dir.join("out-nan"));
    let err = run(&s, false).unwrap_err().to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
    assert!(!s.out.exists());
    // The same with three workers: the others stop, nothing is left.
    let three = [device(), device(), device()];
    let err = run_init(&s, &three, false, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
    assert!(!s.out.exists());

    // A rank larger than a matrix; a target that matches nothing; a missing model.
    let mut big = spec(src.clone(), dir.join("out-rank"));
    big.lora.rank = 65;
    assert!(
        run(&big, false)
            .unwrap_err()
            .to_string()
            .contains("rank 65 does not fit")
    );
    assert!(!big.out.exists());
    let mut none = spec(src.clone(), dir.join("out-none"));
    none.target = Target::Names(vec!["c_attn".into()]);
    assert!(
        run(&none, false)
            .unwrap_err()
            .to_string()
            .contains("matches the targets")
    );
    let missing = spec(dir.join("no-such-model"), dir.join("out-missing"));
    assert!(
        run(&missing, false)
            .unwrap_err()
            .to_string()
            .contains("no-such-model")
    );
    assert!(!none.out.exists() && !missing.out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn methods_targets_and_layer_rules() {
    use loftq_models::init::plan::parse_layer_bits;
    let dir = scratch("init-methods");
    let src = fixture("tiny-llama");
    for method in [InitMethod::Qlora, InitMethod::Pissa, InitMethod::Qpissa] {
        let mut s = spec(src.clone(), dir.join(format!("{method:?}")));
        s.method = method;
        s.backbone = Backbone::Packed;
        s.target = Target::Names(vec!["q_proj".into(), "v_proj".into()]);
        s.exclude = vec!["model.layers.1.self_attn.v_proj".into()];
        s.layer_rules = parse_layer_bits("1:nf4", 64, false).unwrap();
        let r = run(&s, false).unwrap();
        let names: Vec<&str> = r.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.self_attn.v_proj.weight",
                "model.layers.1.self_attn.q_proj.weight"
            ]
        );
        let q: Vec<&str> = r.tensors.iter().map(|t| t.quantizer.as_str()).collect();
        match method {
            InitMethod::Pissa => assert!(q.iter().all(|&x| x == "dense")),
            _ => assert_eq!(q, ["nf2-b64", "nf2-b64", "nf4-b64"]),
        }
        if method == InitMethod::Qlora {
            assert!(
                r.tensors
                    .iter()
                    .all(|t| Some(t.rel_err_init) == t.rel_err_quant)
            );
        }
        load_pretrained(&s.out, Some(&s.out.join("adapter")), &device()).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn llama_cpp_formats_start_lower_than_plain_quantization() {
    use loftq_core::quant::GgmlFormat;
    let dir = scratch("init-ggml");
    // Q6_K on rows of 64 and 128 values (not whole super-blocks): Q8_0, as llama-quantize.
    for (asked, format, bpw) in [
        (GgmlFormat::Q4_0, GgmlFormat::Q4_0, 4.5),
        (GgmlFormat::Q5_1, GgmlFormat::Q5_1, 6.0),
        (GgmlFormat::Q6K, GgmlFormat::Q8_0, 8.5),
    ] {
        let mut s = spec(fixture("tiny-llama"), dir.join(asked.name()));
        s.quant = QuantConfig::ggml(asked);
        s.backbone = Backbone::Packed;
        let r = run(&s, false).unwrap();
        assert_eq!(r.tensors.len(), 14);
        for t in &r.tensors {
            assert_eq!(t.quantizer, format.name());
            assert_eq!(t.bits_per_param, bpw);
            assert!(t.rel_err_init < t.rel_err_quant.unwrap(), "{t:?}");
        }
        // The packed backbone keeps the format and loads with its adapter.
        let m = load_pretrained(&s.out, Some(&s.out.join("adapter")), &device()).unwrap();
        let adapted = m.linears().iter().filter(|(_, l)| l.lora.is_some()).count();
        assert_eq!(adapted, 14);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Phi-3's fused `qkv_proj` and `gate_up_proj` are started as one matrix each, as PEFT
/// adapts them: LoftQ's start gives logits closer to the model's than plain quantization,
/// and a calibrated start lowers every matrix's weighted error.
#[test]
fn phi3_fused_layers_are_started_whole() {
    let fused = [
        "model.layers.1.self_attn.qkv_proj.weight",
        "model.layers.1.mlp.gate_up_proj.weight",
    ];
    family_is_started("tiny-phi3", 8, &fused);
}

/// Phi-2's six linear layers (`dense`, `fc1`, `fc2` among them) are started, its biases and
/// LayerNorms kept: the same properties as Phi-3's.
#[test]
fn phi2_layers_are_started() {
    let names = [
        "model.layers.1.self_attn.dense.weight",
        "model.layers.0.mlp.fc1.weight",
    ];
    family_is_started("tiny-phi2", 12, &names);
}

/// Encoders (the tiny BERT and DeBERTa-v3 classifiers) are started too: their encoder
/// projections and pooler at 2 bits, the classifier left whole (it is trained in full), the
/// relative embeddings too; the written start loads with its adapter, LoftQ's logits closer to
/// the model's than QLoRA's. Calibration is refused by name.
#[test]
fn encoders_are_started() {
    encoder_is_started("tiny-bert", "bert.pooler.dense.weight");
    encoder_is_started("tiny-deberta-v3", "pooler.dense.weight");
}

fn encoder_is_started(name: &str, pooler: &str) {
    use loftq_models::nn::{LoadOptions, load_encoder};
    let dir = scratch(&format!("init-{name}"));
    let model = fixture(name);
    let refs = Checkpoint::open(&model.join("outputs.safetensors")).unwrap();
    let want = refs.f32("logits").unwrap().data;
    let int = |key: &str| {
        let (shape, v) = refs.i64(key).unwrap();
        let v: Vec<i32> = v.into_iter().map(|x| x as i32).collect();
        let data = burn::tensor::TensorData::new(v, [shape[0], shape[1]]);
        burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(data, &device())
    };
    let mut dist = Vec::new();
    for method in [InitMethod::Loftq, InitMethod::Qlora] {
        let mut s = spec(model.clone(), dir.join(format!("{method:?}")));
        (s.method, s.backbone) = (method, Backbone::Packed);
        s.quant = QuantConfig::nf(2);
        let r = run(&s, false).unwrap();
        let got: Vec<_> = r.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(r.tensors.len(), 13, "{got:?}");
        assert!(got.contains(&pooler), "{got:?}");
        assert!(
            !got.iter()
                .any(|n| n.starts_with("classifier") || n.contains("rel_emb"))
        );
        let adapter = Adapter::read(&s.out.join("adapter")).unwrap();
        let opts = LoadOptions {
            quantize: None,
            adapter: Some(&adapter),
        };
        let m = load_encoder(&s.out, &device(), &opts).unwrap();
        let logits = m.forward(
            int("input_ids"),
            int("token_type_ids"),
            Some(int("attention_mask")),
        );
        let logits = logits.into_data().try_to_vec::<f32>().unwrap();
        dist.push(loftq_core::rel_dist(&want, &logits));
    }
    assert!(
        dist[0] < dist[1],
        "LoftQ {} against QLoRA {}",
        dist[0],
        dist[1]
    );

    let text = dir.join("text.txt");
    std::fs::write(&text, "To be, or not to be. ".repeat(40)).unwrap();
    let mut s = spec(model, dir.join("calibrated"));
    s.calibration = Some(loftq_models::init::Calibration::new(vec![text]));
    let err = run(&s, false).unwrap_err().to_string();
    assert!(err.contains("encoder"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Inits the fixture `name` with LoftQ, QLoRA and calibrated adapters: `count` tensors,
/// `names` among them, LoftQ's logits closer to the model's than QLoRA's, the calibrated
/// start lowering every weighted error.
fn family_is_started(name: &str, count: usize, names: &[&str]) {
    use loftq_models::init::Calibration;
    let dir = scratch(&format!("init-{name}"));
    let model = fixture(name);
    let refs = Checkpoint::open(&model.join("logits.safetensors")).unwrap();
    let want = refs.f32("logits").unwrap().data;
    let (shape, ids) = refs.i64("input_ids").unwrap();
    let ids: Vec<i32> = ids.into_iter().map(|x| x as i32).collect();
    let ids = burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(ids, [shape[0], shape[1]]),
        &device(),
    );
    let mut dist = Vec::new();
    for method in [InitMethod::Loftq, InitMethod::Qlora] {
        let mut s = spec(model.clone(), dir.join(format!("{method:?}")));
        (s.method, s.backbone) = (method, Backbone::Packed);
        let r = run(&s, false).unwrap();
        let got: Vec<_> = r.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(r.tensors.len(), count, "{got:?}");
        assert!(names.iter().all(|n| got.contains(n)), "{got:?}");
        let m = load_pretrained(&s.out, Some(&s.out.join("adapter")), &device()).unwrap();
        dist.push(loftq_core::rel_dist(
            &want,
            &common::logits(&m, ids.clone()),
        ));
    }
    assert!(
        dist[0] < dist[1],
        "LoftQ {} against QLoRA {}",
        dist[0],
        dist[1]
    );

    let calibrated = dir.join("calibrated-model");
    std::fs::create_dir_all(&calibrated).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model.join(f), calibrated.join(f)).unwrap();
    }
    let tok = loftq_models::tokenizer::byte_level_json();
    std::fs::write(calibrated.join("tokenizer.json"), tok.to_string()).unwrap();
    let text = dir.join("text.txt");
    std::fs::write(&text, "Now is the winter of our discontent. ".repeat(40)).unwrap();
    let mut s = spec(calibrated, dir.join("calibrated"));
    s.backbone = Backbone::Packed;
    s.calibration = Some(Calibration {
        tokens: 512,
        seq: 64,
        ..Calibration::new(vec![text])
    });
    let r = run(&s, false).unwrap();
    assert_eq!(r.tensors.len(), count);
    for t in &r.tensors {
        let (q, i) = (t.weighted_err_quant.unwrap(), t.weighted_err_init.unwrap());
        assert!(i < q, "{}: {i} vs {q}", t.name);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
