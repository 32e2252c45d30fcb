//! `loftq init --distill-steps`: the calibrated start's adapters distilled towards the
//! full-precision model before the output is final; the bases unchanged, the held-out KL
//! lower, an interrupted distillation resumed to identical files, a failed one leaving the
//! start to resume from, bad settings refused.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use common::{device, model_and_text, read_files, run_init_here as run, scratch};
use loftq_core::QuantConfig;
use loftq_models::init::{Calibration, Distill, Event, InitSpec, run_init};
use loftq_models::train::TrainEvent;

const ADAPTER: &str = "adapter/adapter_model.safetensors";

fn spec(model: PathBuf, out: PathBuf, text: PathBuf, steps: usize) -> InitSpec {
    let mut spec = InitSpec {
        quant: QuantConfig::nf(2),
        seed: 3,
        calibration: Some(Calibration {
            tokens: 512,
            seq: 64,
            ..Calibration::new(vec![text])
        }),
        distill: Some(Distill {
            lr: 1e-3,
            warmup: 2,
            batch: 2,
            seq: 32,
            ..Distill::new(steps)
        }),
        ..InitSpec::new(model, out, 4, 2)
    };
    spec.lora.alpha = 8.0;
    spec
}

/// Runs `s`, panicking ("killed") when distillation step `at` is reported.
fn kill_at_step(s: &InitSpec, at: usize) {
    let killed = catch_unwind(AssertUnwindSafe(|| {
        run_init(s, &[device()], false, &mut |e| {
            if let Event::Distill(TrainEvent::Step(r)) = e {
                assert!(r.step < at, "killed");
            }
        })
    }));
    assert!(killed.is_err());
}

#[test]
fn distilled_starts_keep_their_bases_lower_the_kl_and_resume() {
    let dir = scratch("init-distill");
    let (model, text) = model_and_text(&dir);
    let a = spec(model.clone(), dir.join("a"), text.clone(), 12);
    let report = run(&a, false).unwrap();
    let d = report.distill.as_ref().expect("a distillation report");
    assert_eq!(d.steps, 12);
    let (before, after) = (d.before.as_ref().unwrap(), d.after.as_ref().unwrap());
    let (kl0, kl1) = (before.kl.unwrap(), after.kl.unwrap());
    assert!(kl1 < kl0, "held-out KL {kl0} -> {kl1}");
    assert!(!a.out.join(".loftq-partial").exists(), "work area left");
    let json = std::fs::read_to_string(a.out.join("report.json")).unwrap();
    assert!(json.contains("\"distill\""), "{json}");

    // The same start undistilled: the same bases, other adapters.
    let plain = InitSpec {
        distill: None,
        ..spec(model.clone(), dir.join("plain"), text.clone(), 12)
    };
    let p = run(&plain, false).unwrap();
    assert!(p.distill.is_none());
    let bytes = |s: &InitSpec, f: &str| read_files(&s.out, &[f]).remove(0);
    assert_eq!(
        bytes(&a, "model.safetensors"),
        bytes(&plain, "model.safetensors")
    );
    assert_ne!(bytes(&a, ADAPTER), bytes(&plain, ADAPTER));

    // A distillation that fails keeps the start: resumed without it, it is the plain run.
    let mut f = spec(model.clone(), dir.join("f"), text.clone(), 12);
    f.distill.as_mut().unwrap().lr = 1e30;
    let err = run(&f, false).unwrap_err().to_string();
    assert!(err.contains("distilling the start"), "{err}");
    assert!(f.out.join(".loftq-partial").is_dir());
    assert!(!f.out.join("report.json").exists());
    f.distill = None;
    let mut remade = 0;
    run_init(&f, &[device()], true, &mut |e| {
        remade += usize::from(matches!(e, Event::Tensor(_)));
    })
    .unwrap();
    assert_eq!(remade, 0, "the start was made again");
    for file in ["model.safetensors", ADAPTER] {
        assert_eq!(bytes(&f, file), bytes(&plain, file), "{file}");
    }

    // Killed after the checkpoint of step 10: resumed from it, to the same files.
    let c = spec(model.clone(), dir.join("c"), text.clone(), 12);
    kill_at_step(&c, 11);
    assert!(c.out.join(".loftq-partial/distill").is_dir());
    let mut resumed_at = None;
    run_init(&c, &[device()], true, &mut |e| {
        if let Event::Distill(TrainEvent::Resumed { step }) = e {
            resumed_at = Some(step);
        }
    })
    .unwrap();
    assert_eq!(resumed_at, Some(10));
    for f in ["model.safetensors", ADAPTER, "adapter/adapter_config.json"] {
        assert_eq!(bytes(&c, f), bytes(&a, f), "{f}");
    }
    // Resumed with another learning rate: the distillation starts again.
    let mut g = spec(model, dir.join("g"), text, 12);
    kill_at_step(&g, 11);
    g.distill.as_mut().unwrap().lr = 2e-3;
    let mut events = Vec::new();
    let report = run_init(&g, &[device()], true, &mut |e| {
        if let Event::Distill(TrainEvent::Resumed { step }) = e {
            events.push(step);
        }
    })
    .unwrap();
    assert!(events.is_empty(), "resumed at {events:?}");
    assert_eq!(report.distill.unwrap().steps, 12);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refuses_distillation_settings_before_any_work() {
    let dir = scratch("init-distill-refuse");
    let (model, text) = model_and_text(&dir);
    let out = dir.join("out");
    let base = spec(model, out.clone(), text, 4);
    let with = |f: &dyn Fn(&mut Distill)| {
        let mut s = base.clone();
        f(s.distill.as_mut().unwrap());
        s
    };
    let cases = [
        (
            InitSpec {
                calibration: None,
                ..base.clone()
            },
            "calibration text",
        ),
        (with(&|d| d.steps = 0), "at least one step"),
        (with(&|d| d.seq = 1), "need at least 2"),
        (with(&|d| d.lr = f64::NAN), "must be positive"),
    ];
    for (s, want) in cases {
        let err = run(&s, false).unwrap_err().to_string();
        assert!(err.contains(want), "{want}: {err}");
        assert!(!out.exists(), "{want}: output left behind");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
