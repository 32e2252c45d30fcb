//! `loftq init --calibration`: the layer-by-layer pass on a tiny model, its weighted errors,
//! resume after a kill, and the settings it refuses before any work.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use common::{device, model_and_text, scratch};
use loftq_core::QuantConfig;
use loftq_core::calib::{BaseQuantizer, GptqConfig};
use loftq_models::init::{
    CalibInputs, Calibration, Event, InitMethod, InitSpec, Report, Sensitivity, run_init,
};

fn spec(model: PathBuf, out: PathBuf, text: PathBuf) -> InitSpec {
    let mut spec = InitSpec {
        quant: QuantConfig::nf(2),
        seed: 3,
        calibration: Some(Calibration {
            tokens: 512,
            seq: 64,
            ..Calibration::new(vec![text])
        }),
        ..InitSpec::new(model, out, 4, 3)
    };
    spec.lora.alpha = 8.0;
    spec
}

use common::run_init_here as run;

fn files(dir: &Path) -> Vec<Vec<u8>> {
    common::read_files(
        dir,
        &["model.safetensors", "adapter/adapter_model.safetensors"],
    )
}

/// Runs `s` until its `n`-th finished tensor, where a panic "kills" it.
fn kill_at_tensor(s: &InitSpec, n: usize) {
    let mut done = 0;
    let killed = catch_unwind(AssertUnwindSafe(|| {
        run_init(s, &[device()], false, &mut |e| {
            if let Event::Tensor(_) = e {
                done += 1;
                assert!(done < n, "killed");
            }
        })
    }));
    assert!(killed.is_err());
}

/// Resumes `s` to the end; returns how many of its events `count` accepted.
fn resume_counting(s: &InitSpec, count: impl Fn(&Event) -> bool) -> usize {
    let mut n = 0;
    run_init(s, &[device()], true, &mut |e| n += usize::from(count(&e))).unwrap();
    n
}

#[test]
fn calibrated_starts_lower_the_weighted_error() {
    let dir = scratch("calib-basic");
    let (model, text) = model_and_text(&dir);
    let mut layers_seen = Vec::new();
    let s = spec(model.clone(), dir.join("rtn"), text.clone());
    let rtn = run_init(&s, &[device()], false, &mut |e| {
        if let Event::Calibrating { layer, layers } = e {
            layers_seen.push((layer, layers));
        }
    })
    .unwrap();
    assert_eq!(layers_seen, vec![(0, 2), (1, 2)]);
    assert_eq!(rtn.tensors.len(), 14);
    for r in &rtn.tensors {
        let (q, i) = (r.weighted_err_quant.unwrap(), r.weighted_err_init.unwrap());
        assert!(i < q, "{}: {i} vs {q}", r.name);
    }
    let t = &rtn.totals;
    assert!(t.mean_weighted_err_init.unwrap() < t.mean_weighted_err_quant.unwrap());

    let mut g = spec(model.clone(), dir.join("gptq"), text.clone());
    g.quantizer = BaseQuantizer::Gptq(GptqConfig::default());
    let gptq = run(&g, false).unwrap();
    let mean = |r: &Report| r.totals.mean_weighted_err_init.unwrap();
    assert!(
        mean(&gptq) < mean(&rtn),
        "{} vs {}",
        mean(&gptq),
        mean(&rtn)
    );

    let other_inputs = |out: &str, inputs: CalibInputs| {
        let mut s = spec(model.clone(), dir.join(out), text.clone());
        let c = s.calibration.as_mut().unwrap();
        (c.inputs, c.drift) = (inputs, Some(0.0));
        s
    };
    let no_drift = run(&other_inputs("no-drift", CalibInputs::Quantized), false).unwrap();

    // A GPTQ base with QLoRA's zero adapter: the base alone beats round to nearest. Without
    // drift correction both runs fit the same weights (with it, each its own target).
    let mut q = g.clone();
    q.out = dir.join("gptq-qlora");
    q.method = InitMethod::Qlora;
    q.calibration.as_mut().unwrap().drift = Some(0.0);
    let base = run(&q, false).unwrap();
    for (r, plain) in base.tensors.iter().zip(&no_drift.tensors) {
        assert!(r.weighted_err_init.unwrap() <= r.weighted_err_quant.unwrap() * 1.0001);
        // Both starts report round to nearest's error as the QLoRA start (the same value,
        // summed in another order).
        let (a, b) = (r.rel_err_quant.unwrap(), plain.rel_err_quant.unwrap());
        assert!((a - b).abs() <= 1e-5 * b, "{}: {a} vs {b}", r.name);
    }

    // Other inputs: different (valid) runs. Full-precision ones change nothing in layer 0 and
    // what layer 1 sees. In the true-sequential order layer 0's q/k/v still read the
    // embeddings, but its down_proj reads the outputs of the initialized gate/up.
    let err = |r: &Report, name: &str| {
        let t = r.tensors.iter().find(|t| t.name == name).unwrap();
        t.weighted_err_init.unwrap()
    };
    let (q0, down0, q1) = (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    );
    let full = run(&other_inputs("full", CalibInputs::Full), false).unwrap();
    assert_eq!(err(&full, down0), err(&rtn, down0));
    assert_ne!(err(&full, q1), err(&rtn, q1));
    // Drift correction (on by default) changes nothing where the two models' inputs are the
    // same (layer 0), and only the targets of the layers above.
    assert_eq!(err(&no_drift, down0), err(&rtn, down0));
    assert_eq!(err(&no_drift, q0), err(&rtn, q0));
    assert_ne!(err(&no_drift, q1), err(&rtn, q1));
    let sq = other_inputs("sequential", CalibInputs::Sequential);
    let seq = run(&sq, false).unwrap();
    assert_eq!(err(&seq, q0), err(&rtn, q0));
    assert_ne!(err(&seq, down0), err(&rtn, down0));
    let t = &seq.totals;
    assert!(t.mean_weighted_err_init.unwrap() < t.mean_weighted_err_quant.unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn calibrated_runs_resume_to_identical_files() {
    for inputs in [CalibInputs::Quantized, CalibInputs::Sequential] {
        resume_calibrated(inputs);
    }
}

fn resume_calibrated(inputs: CalibInputs) {
    let dir = scratch(&format!("calib-resume-{inputs:?}"));
    let (model, text) = model_and_text(&dir);
    // Each order with its default drift correction: in the two-pass order the work area also
    // holds the full-precision model's hidden states; the sequential order has none.
    let with_inputs = |out: PathBuf| {
        let mut s = spec(model.clone(), out, text.clone());
        s.calibration.as_mut().unwrap().inputs = inputs;
        s
    };
    let a = with_inputs(dir.join("a"));
    run(&a, false).unwrap();
    let want = files(&a.out);
    // Killed in layer 1's tensors, so the hidden states after layer 0 are on disk.
    let c = with_inputs(dir.join("c"));
    kill_at_tensor(&c, 10);
    let work = c.out.join(".loftq-partial");
    assert!(work.join("calibration-hidden.safetensors").is_file());
    let report = run(&c, true).unwrap();
    // The tenth piece was written before its event "killed" the run. In the two-pass order
    // all of layer 1's tensors share one pool, whose tasks may finish the rest of the layer
    // before the caller sees that event; the sequential order stops after q/k/v.
    let resumed = report.totals.resumed;
    let most = match inputs {
        CalibInputs::Sequential => 10,
        _ => 14,
    };
    assert!((10..=most).contains(&resumed), "{inputs:?}: {resumed}");
    assert_eq!(files(&c.out), want, "{inputs:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refuses_settings_before_any_work() {
    let dir = scratch("calib-refuse");
    let (model, text) = model_and_text(&dir);
    let out = dir.join("out");
    let base = spec(model.clone(), out.clone(), text.clone());
    let cases: Vec<(InitSpec, &str)> = vec![
        (
            InitSpec {
                calibration: None,
                quantizer: BaseQuantizer::Gptq(GptqConfig::default()),
                ..base.clone()
            },
            "needs calibration text",
        ),
        (
            InitSpec {
                method: InitMethod::Qlora,
                ..base.clone()
            },
            "changes nothing",
        ),
        (
            InitSpec {
                method: InitMethod::Pissa,
                ..base.clone()
            },
            "the loftq and qlora methods",
        ),
        (
            InitSpec {
                calibration: Some(Calibration::new(vec![dir.join("missing.txt")])),
                ..base.clone()
            },
            "missing.txt",
        ),
        (
            InitSpec {
                calibration: Some(Calibration {
                    tokens: 100_000,
                    seq: 10_000,
                    ..Calibration::new(vec![text])
                }),
                ..base.clone()
            },
            "fewer than one sequence",
        ),
    ];
    let mut cases = cases;
    for (inputs, drift, want) in [
        (CalibInputs::Quantized, 1.5, "between 0 and 1"),
        (CalibInputs::Quantized, f32::NAN, "between 0 and 1"),
        (CalibInputs::Full, 0.25, "no drift to correct"),
        (CalibInputs::Sequential, 0.25, "sequential order"),
    ] {
        let mut s = base.clone();
        let c = s.calibration.as_mut().unwrap();
        (c.inputs, c.drift) = (inputs, Some(drift));
        cases.push((s, want));
    }
    for (s, want) in cases {
        let err = run(&s, false).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
        assert!(!out.exists(), "{want}: output left behind");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--avg-bits`: the budget holds, the extremes take one quantizer everywhere, the calibrated
/// allocation resumes to identical files, and what cannot work is refused.
#[test]
fn bit_budgets_are_met_and_resume() {
    use loftq_core::quant::parse_quantizer;
    use loftq_models::init::Budget;
    let dir = scratch("calib-budget");
    let (model, text) = model_and_text(&dir);
    let candidates: Vec<QuantConfig> = ["nf2-b64", "nf3-b64", "nf4-b64"]
        .iter()
        .map(|c| parse_quantizer(c, 64, false).unwrap())
        .collect();
    let budget = |out: &str, avg: f64, calibrated: bool, sensitivity: Option<Sensitivity>| {
        let mut s = spec(model.clone(), dir.join(out), text.clone());
        s.budget = Some(Budget {
            avg_bits: avg,
            candidates: candidates.clone(),
        });
        // Without calibration there is no sensitivity to ask for.
        match calibrated {
            true => s.calibration.as_mut().expect("calibrated").sensitivity = sensitivity,
            false => s.calibration = None,
        }
        s
    };
    let with_budget = |out: &str, avg: f64, calibrated: bool| budget(out, avg, calibrated, None);
    let labels = |r: &Report| -> Vec<String> {
        let mut l: Vec<String> = r.tensors.iter().map(|t| t.quantizer.clone()).collect();
        l.sort();
        l.dedup();
        l
    };
    for calibrated in [false, true] {
        let name = |x: &str| format!("{x}-{calibrated}");
        let low = run(&with_budget(&name("low"), 2.5, calibrated), false).unwrap();
        assert_eq!(labels(&low), ["nf2-b64"]);
        let high = run(&with_budget(&name("high"), 4.5, calibrated), false).unwrap();
        assert_eq!(labels(&high), ["nf4-b64"]);
        let mid = run(&with_budget(&name("mid"), 3.0, calibrated), false).unwrap();
        let bits = mid.totals.avg_base_bits_per_param;
        assert!((2.9..=3.0).contains(&bits), "{bits} bits per parameter");
        assert!(labels(&mid).len() >= 2, "{:?}", labels(&mid));
        let err = |r: &Report| r.totals.mean_rel_err_init;
        assert!(err(&high) < err(&mid) && err(&mid) < err(&low));
    }
    // Weighed by the loss's sensitivity, by layers or by rows: the same budget, met with more
    // than one quantizer.
    for by in [Sensitivity::Layers, Sensitivity::Rows] {
        let weighed = run(&budget(&format!("{by:?}"), 3.0, true, Some(by)), false).unwrap();
        let bits = weighed.totals.avg_base_bits_per_param;
        assert!(
            (2.9..=3.0).contains(&bits),
            "{by:?}: {bits} bits per parameter"
        );
        assert!(
            labels(&weighed).len() >= 2,
            "{by:?}: {:?}",
            labels(&weighed)
        );
    }
    // By layers, a sensitivity without a budget weighs nothing: refused.
    let mut uniform = budget("uniform", 3.0, true, Some(Sensitivity::Layers));
    uniform.budget = None;
    let e = run(&uniform, false).unwrap_err();
    assert!(e.to_string().contains("give a budget"), "{e}");
    assert!(!uniform.out.exists());
    // Killed after the sensitivities were measured, resumed without measuring them again:
    // identical files.
    let w = budget("w", 3.0, true, Some(Sensitivity::Rows));
    kill_at_tensor(&w, 5);
    assert!(w.out.join(".loftq-partial/sensitivity.json").is_file());
    let measured = resume_counting(&w, |e| matches!(e, Event::Sensitivity { .. }));
    assert_eq!(measured, 0);
    assert_eq!(files(&w.out), files(&dir.join("Rows")));

    // Killed after the allocation, resumed without scoring again: identical files.
    let a = with_budget("a", 3.0, true);
    run(&a, false).unwrap();
    let want = files(&a.out);
    let c = with_budget("c", 3.0, true);
    kill_at_tensor(&c, 5);
    assert!(c.out.join(".loftq-partial/allocation.json").is_file());
    let scored = resume_counting(&c, |e| matches!(e, Event::Scoring { .. }));
    assert_eq!(scored, 0);
    assert_eq!(files(&c.out), want);

    // Below the cheapest candidate, or with a method that has no quantized base to choose.
    let e = run(&with_budget("poor", 2.0, false), false).unwrap_err();
    // The candidates cost 2.5 bits per parameter at least (NF2, blocks of 64, f32 scales).
    assert!(
        e.to_string().contains("a budget of 2 bits") && e.to_string().contains("need 2.500)"),
        "{e}"
    );
    assert!(!dir.join("poor").exists());
    let mut p = with_budget("pissa", 3.0, false);
    p.method = InitMethod::Pissa;
    let e = run(&p, false).unwrap_err();
    assert!(e.to_string().contains("the loftq and qlora methods"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
