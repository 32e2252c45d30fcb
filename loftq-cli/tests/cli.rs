//! The `loftq` binary end to end.

use std::path::PathBuf;
use std::process::Command;

use loftq_models::io::Checkpoint;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../loftq-models/tests/fixtures")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loftq-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn loftq(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loftq"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn eval_writes_the_logits_transformers_computes() {
    let dir = scratch("eval");
    let model = fixture("tiny-llama");
    let ids = model.join("logits.safetensors");
    let out = dir.join("logits.safetensors");
    let (ok, err) = loftq(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--logits-for",
        ids.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got = Checkpoint::open(&out).unwrap().f32("logits").unwrap();
    let want = Checkpoint::open(&ids).unwrap().f32("logits").unwrap();
    assert_eq!(got.shape, want.shape);
    let diff = got
        .data
        .iter()
        .zip(&want.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-4, "{diff}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn eval_refuses_bad_input_without_writing() {
    let dir = scratch("eval-bad");
    let model = fixture("tiny-llama");
    let out = dir.join("logits.safetensors");
    // The model file is not an ids file: no `input_ids`.
    let weights = model.join("model.safetensors");
    let (ok, err) = loftq(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--logits-for",
        weights.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("input_ids") && err.contains("not found"),
        "{err}"
    );
    assert!(!out.exists());
    // A directory that is not a model.
    let (ok, err) = loftq(&[
        "eval",
        "--model",
        dir.to_str().unwrap(),
        "--logits-for",
        weights.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("config.json"), "{err}");
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
