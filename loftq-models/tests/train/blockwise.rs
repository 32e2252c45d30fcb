//! Block-wise distillation: fitting recovers a teacher's layers, reads one layer at a time,
//! resumes exactly.

use super::distill::{host_kl, tiny_nf2_student, tiny_teacher};
use super::*;

fn blockwise_config() -> BlockwiseConfig {
    BlockwiseConfig {
        rows: 32,
        seq: 16,
        batch: 8,
        steps: 60,
        lr: 1e-2,
        adamw: AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        seed: 1,
        resume: false,
    }
}

/// [`fit_layers`] from scratch, with the fitted layers it hands out.
fn fit_keeping_layers(
    student: &Llama,
    teacher: &Llama,
    text: &[u32],
    val: &Validation,
    cfg: &BlockwiseConfig,
) -> (
    loftq_models::train::BlockwiseReport,
    Vec<loftq_models::nn::DecoderLayer>,
) {
    let mut fitted = Vec::new();
    let done = Fitted::default();
    let report = fit_layers(student, teacher, text, Some(val), cfg, &done, |_, l| {
        fitted.push(l);
        Ok(())
    })
    .unwrap();
    (report, fitted)
}

/// The teacher's own weights under adapters knocked off `B = 0`: fitting layer by layer
/// brings every layer's output back to the teacher's.
#[test]
fn blockwise_fitting_recovers_the_teachers_layers() {
    let teacher = tiny_teacher();
    let mut student = teacher.clone();
    student.add_lora(4, 2.0, 0.0, 0, |_| true);
    let knocked = tiny_nf2_student().lora_params();
    student.set_lora_params(knocked);
    let cfg = blockwise_config();
    let report = fit_layers(
        &student,
        &teacher,
        &stream(),
        None,
        &cfg,
        &Fitted::default(),
        |_, _| Ok(()),
    )
    .unwrap();
    assert_eq!(report.layers.len(), teacher.layers.len());
    assert!(report.evals.is_empty());
    for f in &report.layers {
        assert!(f.mse_before > 1e-6, "layer {}: nothing to fit", f.layer);
        assert!(
            f.mse_after < 0.01 * f.mse_before,
            "layer {}: {} → {}",
            f.layer,
            f.mse_before,
            f.mse_after
        );
    }

    // An NF2 student gets closer to its teacher layer by layer, and in its logits on other
    // text of the same kind as the calibration's (ids spread over the vocabulary).
    let mut nf2 = tiny_nf2_student();
    let batch = batch(6);
    let text: Vec<u32> = (0..4000u32)
        .map(|i| (i.wrapping_mul(2_246_822_519).wrapping_add(7) >> 9) % 256)
        .collect();
    // Windows longer than the 512 positions whose logits are made at once.
    let val = Validation {
        tokens: text[2000..3300].to_vec(),
        window: 700,
        stride: 400,
    };
    let before = host_kl(&nf2, &teacher, &batch);
    let ppl_before = perplexity_windows(&nf2, &val.tokens, val.window, val.stride);
    let (report, fitted) = fit_keeping_layers(&nf2, &teacher, &text, &val, &cfg);
    for f in &report.layers {
        assert!(f.mse_after < f.mse_before, "layer {}", f.layer);
    }
    nf2.layers = fitted;
    let after = host_kl(&nf2, &teacher, &batch);
    assert!(after < 0.7 * before, "KL {before} → {after}");
    // The validation carried through the same pass scores the model before and after as
    // the whole model does.
    let ppl_after = perplexity_windows(&nf2, &val.tokens, val.window, val.stride);
    let [b, a] = [&report.evals[0], &report.evals[1]];
    assert_eq!((b.step, a.step), (0, teacher.layers.len()));
    for (got, want) in [(b.nll, ppl_before.nll), (a.nll, ppl_after.nll)] {
        assert!((got - want).abs() <= 1e-5 * want, "NLL {got} vs {want}");
    }
    assert!(a.kl.unwrap() < b.kl.unwrap(), "{:?}", report.evals);

    // Layers must pair up.
    let mut shallow = tiny_nf2_student();
    shallow.layers.pop();
    shallow.config.num_hidden_layers -= 1;
    let err = fit_layers(
        &shallow,
        &teacher,
        &stream(),
        None,
        &cfg,
        &Fitted::default(),
        |_, _| Ok(()),
    );
    assert!(err.unwrap_err().to_string().contains("layers"));
    // A student without adapters has nothing to fit.
    let err = fit_layers(
        &teacher,
        &teacher,
        &stream(),
        None,
        &cfg,
        &Fitted::default(),
        |_, _| Ok(()),
    );
    assert!(err.unwrap_err().to_string().contains("no LoRA"));
}

/// Read from disk one layer at a time, block-wise distillation does what it does on the
/// models in memory, and writes the adapter the fitted layers hold.
#[test]
fn blockwise_reads_one_layer_at_a_time() {
    let teacher = tiny_teacher();
    let nf2 = tiny_nf2_student();
    let template = AdapterConfig::new(4, 8.0, vec![]);
    let start = nf2.adapter(template.clone()).unwrap();
    let dir = fixture("tiny-llama");
    let opts = LoadOptions {
        quantize: Some(QuantConfig::nf(2)),
        adapter: Some(&start),
    };
    let student_reader = LayerReader::open(&dir, &device(), opts).unwrap();
    let teacher_reader = LayerReader::open(&dir, &device(), LoadOptions::default()).unwrap();
    assert!(student_reader.ends().layers.is_empty());
    let val = Validation {
        tokens: stream()[..50].to_vec(),
        window: 50,
        stride: 25,
    };
    let cfg = BlockwiseConfig {
        steps: 10,
        ..blockwise_config()
    };
    let out = scratch("blockwise-read");
    let stream = stream();
    let job = TrainJob::new(&template, &stream, &cfg, &out).validated(Some(&val));
    let read = distill_blockwise(&student_reader, &teacher_reader, job, |_| {}).unwrap();
    let (held, fitted) = fit_keeping_layers(&nf2, &teacher, &stream, &val, &cfg);
    // Loading order aside the operations are the same; a GPU may order its sums differently.
    let tol = if DeviceSpec::from_env() == DeviceSpec::Cpu {
        0.0
    } else {
        1e-5
    };
    let close = |x: f64, y: f64| (x - y).abs() <= tol * y.abs();
    for (r, h) in read.layers.iter().zip(&held.layers) {
        assert!(close(r.mse_after, h.mse_after), "{r:?} vs {h:?}");
    }
    for (r, h) in read.evals.iter().zip(&held.evals) {
        assert!(
            close(r.nll, h.nll) && close(r.kl.unwrap(), h.kl.unwrap()),
            "{r:?} vs {h:?}"
        );
    }
    let mut nf2 = nf2;
    nf2.layers = fitted;
    let written = Adapter::read(&out.join("adapter")).unwrap();
    let want = nf2.adapter(template).unwrap();
    assert_eq!(written.config.target_modules, want.config.target_modules);
    assert_eq!(written.modules.len(), want.modules.len());
    for (path, w) in &want.modules {
        let g = &written.modules[path];
        let diff =
            g.b.data
                .iter()
                .zip(&w.b.data)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
        assert!(
            diff <= if tol == 0.0 { 0.0 } else { 1e-4 },
            "{path}: {diff}"
        );
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("blockwise.json")).unwrap()).unwrap();
    assert_eq!(
        report["layers"].as_array().unwrap().len(),
        teacher.layers.len()
    );
}

/// A student whose layer `fail_at` cannot be read: a run that stops there.
struct Failing<'a> {
    model: &'a Llama,
    fail_at: usize,
}

impl LayerSource for Failing<'_> {
    fn ends(&self) -> &Llama {
        self.model
    }

    fn layer(&self, l: usize) -> loftq_models::Result<loftq_models::nn::DecoderLayer> {
        if l == self.fail_at {
            return Err(loftq_models::ModelError::Data("the disk went away".into()));
        }
        self.model.layer(l)
    }
}

/// A block-wise run stopped after its first layer and resumed ends as an uninterrupted run:
/// the same adapter bytes, fits and validation.
#[test]
fn blockwise_resumes_exactly() {
    let (teacher, nf2) = (tiny_teacher(), tiny_nf2_student());
    let template = AdapterConfig::new(4, 8.0, vec![]);
    let val = Validation {
        tokens: stream()[..40].to_vec(),
        window: 40,
        stride: 20,
    };
    let cfg = BlockwiseConfig {
        steps: 5,
        ..blockwise_config()
    };
    let run = |student: &dyn LayerSource, cfg: &BlockwiseConfig, out: &std::path::Path| {
        let s = stream();
        let job = TrainJob::new(&template, &s, cfg, out).validated(Some(&val));
        distill_blockwise(student, &teacher, job, |_| {})
    };
    let whole = scratch("blockwise-whole");
    let want = run(&nf2, &cfg, &whole).unwrap();

    let cut = scratch("blockwise-cut");
    let failing = Failing {
        model: &nf2,
        fail_at: 1,
    };
    let err = run(&failing, &cfg, &cut).unwrap_err();
    assert!(err.to_string().contains("went away"), "{err}");
    assert!(!cut.join("adapter").exists() && !cut.join("blockwise.json").exists());
    assert!(cut.join(BLOCKWISE_CHECKPOINT).join("state.json").is_file());
    // Not continued unless asked; not continued with other settings.
    let err = run(&nf2, &cfg, &cut).unwrap_err();
    assert!(err.to_string().contains("checkpoint"), "{err}");
    let other = BlockwiseConfig {
        steps: 6,
        resume: true,
        ..cfg.clone()
    };
    let err = run(&nf2, &other, &cut).unwrap_err();
    assert!(err.to_string().contains("other settings"), "{err}");

    let mut resumed = 0;
    let resume = BlockwiseConfig {
        resume: true,
        ..cfg.clone()
    };
    let s = stream();
    let job = TrainJob::new(&template, &s, &resume, &cut).validated(Some(&val));
    let got = distill_blockwise(&nf2, &teacher, job, |e| {
        if let BlockwiseEvent::Resumed { layers } = e {
            resumed = layers;
        }
    })
    .unwrap();
    assert_eq!(resumed, 1);
    let strip = |r: &loftq_models::train::BlockwiseReport| {
        let fits: Vec<_> = r
            .layers
            .iter()
            .map(|f| (f.layer, f.mse_before, f.mse_after))
            .collect();
        (fits, r.evals.clone())
    };
    // A GPU may order the validation's sums differently; the fitting itself is exact.
    if DeviceSpec::from_env() == DeviceSpec::Cpu {
        assert_eq!(strip(&got), strip(&want));
    }
    assert_eq!(strip(&got).0, strip(&want).0);
    let bytes =
        |d: &std::path::Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(bytes(&whole) == bytes(&cut), "resumed adapter differs");
}
