//! Sequence classification on the tiny BERT (and DeBERTa-v3): the loss's gradients against
//! finite differences,
//! a toy task learned (chance to at least 95% held-out accuracy), and the written adapter (LoRA plus the
//! classifier saved whole) giving back the trained model's logits.

use super::*;
use loftq_models::classify::{
    ClassBatch, ClassifyConfig, Labelled, classifier_adapter, evaluate, loss_and_grads,
    train_classifier,
};
use loftq_models::nn::{Encoder, load_encoder};

/// The tiny BERT with PEFT's adapter on every projection and the pooler, its base NF4.
fn tiny_bert() -> Encoder {
    tiny_encoder("tiny-bert")
}

/// A tiny encoder fixture with its PEFT adapter, its base NF4.
fn tiny_encoder(name: &str) -> Encoder {
    let dir = fixture(name);
    let adapter = Adapter::read(&dir.join("adapter")).unwrap();
    let opts = LoadOptions {
        quantize: Some(QuantConfig::nf(4)),
        adapter: Some(&adapter),
    };
    load_encoder(&dir, &device(), &opts).unwrap()
}

/// A WordPiece tokenizer over the words w0..w19.
fn tokenizer(dir: &std::path::Path) -> loftq_models::Tokenizer {
    let words: Vec<String> = (0..20).map(|i| format!("w{i}")).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let json = loftq_models::tokenizer::wordpiece_json(&words);
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    loftq_models::Tokenizer::from_file(&path).unwrap()
}

/// Lines `label<TAB>text`: "even" texts draw 3 to 7 words from w0..w9, "odd" from w10..w19.
fn write_set(path: &std::path::Path, n: usize, seed: usize) {
    let mut lines = Vec::new();
    for i in 0..n {
        let (label, base) = if i % 2 == 0 { ("even", 0) } else { ("odd", 10) };
        let pick = |k: usize| {
            let h = (i * 2_654_435_761 + k * 40_503 + seed * 97).wrapping_mul(0x9E37_79B9);
            base + (h >> 11) % 10
        };
        let words: Vec<String> = (0..3 + (i + seed) % 5)
            .map(|k| format!("W{}", pick(k)))
            .collect();
        lines.push(format!("{label}\t{}", words.join(" ")));
    }
    std::fs::write(path, lines.join("\n")).unwrap();
}

/// Through BERT's attention and DeBERTa's disentangled one (its gathers included).
#[test]
fn classification_gradients_match_finite_differences() {
    for name in ["tiny-bert", "tiny-deberta-v3"] {
        gradients_match(name);
    }
}

fn gradients_match(name: &str) {
    let dir = scratch(&format!("classify-grad-{name}"));
    let tok = tokenizer(&dir);
    write_set(&dir.join("train.tsv"), 6, 0);
    let set = Labelled::read(&dir.join("train.tsv"), &tok, 16, None).unwrap();
    assert_eq!(set.examples[0].ids[0], 2, "[CLS] first");
    let model = tiny_encoder(name);
    let rows: Vec<_> = set.examples.iter().collect();
    let batch = ClassBatch::new(&rows, 0, &device());
    let (loss, grads) = loss_and_grads(&model, &batch);
    let params = model.trainable();
    assert_eq!(params.len(), grads.len());
    let last = params.len() - 1;
    // A LoRA B of the first layer, the pooler's A, the classifier's weight and bias.
    for (factor, index) in [(1usize, 5usize), (24, 3), (last - 1, 7), (last, 1)] {
        let g = host(&grads[factor])[index];
        let at = |delta: f32| {
            let mut m = model.clone();
            let mut p = m.trainable();
            let mut v = host(&p[factor]);
            v[index] += delta;
            let dims = p[factor].dims();
            p[factor] = Tensor::from_data(TensorData::new(v, dims), &device());
            m.set_trainable(p);
            loss_and_grads(&m, &batch).0
        };
        let fd = (at(1e-2) - at(-1e-2)) / 2e-2;
        let tol = 2e-3 + 0.03 * fd.abs();
        assert!(
            (f64::from(g) - fd).abs() < tol,
            "{name} parameter {factor}[{index}]: autodiff {g} vs finite difference {fd} (loss {loss})"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_toy_task_is_learned_and_the_adapter_gives_it_back() {
    let dir = scratch("classify-train");
    let tok = tokenizer(&dir);
    write_set(&dir.join("train.tsv"), 128, 0);
    write_set(&dir.join("test.tsv"), 40, 3);
    let train = Labelled::read(&dir.join("train.tsv"), &tok, 16, None).unwrap();
    let test = Labelled::read(&dir.join("test.tsv"), &tok, 16, Some(&train.labels)).unwrap();
    assert_eq!(train.labels, ["even", "odd"]);
    let mut model = tiny_bert();
    // Two of the fixture's three outputs: a fresh two-way head.
    let head = model.classifier.as_mut().unwrap();
    let w = head.base.dense().narrow(0, 0, 2);
    head.base = loftq_models::nn::BaseWeight::Dense(w);
    head.bias = head.bias.clone().map(|b| b.narrow(0, 0, 2));
    model.config.num_labels = 2;
    let before = evaluate(&model, &test.examples, 8, 0);
    let cfg = ClassifyConfig {
        steps: 40,
        batch: 8,
        schedule: Schedule {
            lr: 1e-2,
            warmup: 4,
            decay: Decay::Linear,
            total: 40,
        },
        adamw: AdamWConfig::default(),
        max_grad_norm: Some(1.0),
        seed: 5,
        eval_every: 20,
        save_every: 0,
        keep_checkpoints: 0,
    };
    let h = train_classifier(&mut model, &train, Some(&test), &cfg, None, &mut |_| {}).unwrap();
    let after = *h.evals.last().unwrap();
    assert_eq!(h.evals.len(), 2);
    assert!(after.loss < before.loss, "{before:?} → {after:?}");
    assert!(after.accuracy >= 0.95, "{before:?} → {after:?}");

    let out = dir.join("adapter");
    classifier_adapter(&model, AdapterConfig::new(4, 8.0, vec![]))
        .write(&out)
        .unwrap();
    let adapter = Adapter::read(&out).unwrap();
    assert_eq!(adapter.saved.len(), 2);
    // The fixture's config with two labels: the saved two-way head replaces the checkpoint's
    // three-way one, which is never read.
    let src = fixture("tiny-bert");
    let staged = dir.join("model");
    std::fs::create_dir_all(&staged).unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        staged.join("model.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(src.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["id2label"] = serde_json::json!({"0": "even", "1": "odd"});
    std::fs::write(staged.join("config.json"), v.to_string()).unwrap();
    let opts = LoadOptions {
        quantize: Some(QuantConfig::nf(4)),
        adapter: Some(&adapter),
    };
    let back = load_encoder(&staged, &device(), &opts).unwrap();
    let again = evaluate(&back, &test.examples, 8, 40);
    assert!(
        (again.loss - after.loss).abs() < 1e-4,
        "{again:?} vs {after:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Malformed labelled files are refused naming the file and line.
#[test]
fn bad_labelled_files_are_refused_by_line() {
    let dir = scratch("classify-bad");
    let tok = tokenizer(&dir);
    let path = dir.join("bad.tsv");
    let known = ["a".to_string(), "b".to_string()];
    let cases: [(&str, Option<&[String]>, &str); 4] = [
        ("a\tw1 w2\nno tab here\n", None, "line 2: no tab"),
        ("a\tw1\n\n\t w3\n", None, "line 3: an empty label"),
        ("a\tw1\nc\tw2\n", Some(&known), "line 2: label `c`"),
        ("\n\n", None, "no example"),
    ];
    for (text, labels, what) in cases {
        std::fs::write(&path, text).unwrap();
        let err = Labelled::read(&path, &tok, 16, labels)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(what) && err.contains("bad.tsv"),
            "{what}: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Examples longer than the model's learned positions (the tiny BERT's 32), and a model without
/// a classification head, are refused before any step.
#[test]
fn examples_the_model_cannot_read_are_refused() {
    use loftq_models::classify::check_examples;
    let dir = scratch("classify-long");
    let tok = tokenizer(&dir);
    let long: Vec<String> = (0..40).map(|i| format!("w{}", i % 20)).collect();
    let path = dir.join("long.tsv");
    std::fs::write(&path, format!("a\t{}\nb\tw1 w2\n", long.join(" "))).unwrap();
    let set = Labelled::read(&path, &tok, 64, None).unwrap();
    let mut model = tiny_bert();
    model.new_classifier(2, 0);
    let cfg = ClassifyConfig {
        steps: 1,
        batch: 2,
        schedule: Schedule {
            lr: 1e-3,
            warmup: 0,
            decay: Decay::Constant,
            total: 1,
        },
        adamw: AdamWConfig::default(),
        max_grad_norm: None,
        seed: 0,
        eval_every: 0,
        save_every: 0,
        keep_checkpoints: 0,
    };
    let err = train_classifier(&mut model, &set, None, &cfg, None, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("an example of 42 tokens"), "{err}");
    model.classifier = None;
    let err = check_examples(&model, &set.examples[1..])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no classification head"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A run resumed from its step-4 checkpoint ends where the whole run ends: the same losses
/// after it, the same factors and head, bit for bit; a checkpoint of other settings is
/// refused.
#[test]
fn a_resumed_classifier_run_ends_where_the_whole_run_does() {
    use loftq_models::classify::ClassifyCheckpoints;
    let dir = scratch("classify-resume");
    let tok = tokenizer(&dir);
    write_set(&dir.join("train.tsv"), 24, 0);
    let train = Labelled::read(&dir.join("train.tsv"), &tok, 16, None).unwrap();
    let fresh = || {
        let mut m = tiny_bert();
        m.new_classifier(2, 3);
        m
    };
    let mut cfg = ClassifyConfig {
        steps: 6,
        batch: 5,
        schedule: Schedule {
            lr: 1e-2,
            warmup: 2,
            decay: Decay::Linear,
            total: 6,
        },
        adamw: AdamWConfig::default(),
        max_grad_norm: Some(1.0),
        seed: 9,
        eval_every: 0,
        save_every: 2,
        keep_checkpoints: 3,
    };
    let template = AdapterConfig::new(4, 8.0, vec![]);
    let (whole_out, part_out) = (dir.join("whole"), dir.join("part"));
    let whole_ck = ClassifyCheckpoints {
        out: &whole_out,
        template: &template,
        labels: &train.labels,
        resume: false,
    };
    let part_ck = ClassifyCheckpoints {
        out: &part_out,
        resume: true,
        ..whole_ck.clone()
    };
    let mut whole = fresh();
    let h = train_classifier(&mut whole, &train, None, &cfg, Some(&whole_ck), &mut |_| {}).unwrap();
    for step in [2, 4, 6] {
        assert!(
            whole_out
                .join(format!("checkpoint-{step}/optimizer.safetensors"))
                .is_file()
        );
    }
    std::fs::create_dir_all(&part_out).unwrap();
    copy_dir(
        &whole_out.join("checkpoint-4"),
        &part_out.join("checkpoint-4"),
    );
    let mut part = fresh();
    let mut resumed = None;
    let hp = train_classifier(&mut part, &train, None, &cfg, Some(&part_ck), &mut |e| {
        if let loftq_models::classify::ClassifyEvent::Resumed { step } = e {
            resumed = Some(step);
        }
    })
    .unwrap();
    assert_eq!(resumed, Some(4));
    assert_eq!(hp.losses, h.losses);
    for (a, b) in part.trainable().iter().zip(whole.trainable()) {
        assert_eq!(host(a), host(&b));
    }
    // Other settings: refused, naming the checkpoint.
    cfg.seed = 10;
    let err = train_classifier(
        &mut fresh(),
        &train,
        None,
        &cfg,
        Some(&part_ck),
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("other training settings") && err.contains("checkpoint-6"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
