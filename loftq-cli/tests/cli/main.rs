//! The `loftq` binary end to end: eval, init and refine here; training in [`train`]; GGUF
//! output and generation in [`gguf`].

use std::path::PathBuf;
use std::process::Command;

use loftq_models::io::Checkpoint;

#[path = "../common/mod.rs"]
mod common;
mod distill;
mod gguf;
mod train;

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

/// Runs the binary: success and stderr.
fn loftq(args: &[&str]) -> (bool, String) {
    let out = loftq_output(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn loftq_output(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loftq"))
        .args(args)
        .output()
        .unwrap()
}

/// The tiny model with a byte-level tokenizer, and a text to train on.
fn tiny_with_tokenizer(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-llama").join(f), model.join(f)).unwrap();
    }
    let tok = loftq_models::tokenizer::byte_level_json().to_string();
    std::fs::write(model.join("tokenizer.json"), tok).unwrap();
    let text = dir.join("text.txt");
    let line = "To be, or not to be, that is the question. ";
    std::fs::write(&text, line.repeat(40)).unwrap();
    (model, text)
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
    let eval = |model: &std::path::Path, extra: &[&str]| {
        let mut a = vec![
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--logits-for",
            weights.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend(extra);
        loftq(&a)
    };
    let (ok, err) = eval(&model, &[]);
    assert!(!ok);
    assert!(
        err.contains("input_ids") && err.contains("not found"),
        "{err}"
    );
    assert!(!out.exists());
    // A directory that is not a model.
    let (ok, err) = eval(&dir, &[]);
    assert!(!ok);
    assert!(err.contains("config.json"), "{err}");
    assert!(!out.exists());
    // A GPU that is not there: an error naming it, not a panic.
    let (ok, err) = eval(&model, &["--device", "wgpu:7"]);
    assert!(!ok);
    assert!(err.contains("wgpu:7") && !err.contains("panicked"), "{err}");
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn init_then_eval_through_the_binary() {
    let dir = scratch("init");
    let model = fixture("tiny-llama");
    let out = dir.join("out");
    let o = out.to_str().unwrap();
    let m = model.to_str().unwrap();
    let (ok, err) = loftq(&[
        "init",
        "--model",
        m,
        "--out",
        o,
        "--bits",
        "nf2",
        "--rank",
        "4",
        "--iters",
        "2",
        "--layer-bits",
        "0:nf4,*:nf2",
        "--json",
    ]);
    assert!(ok, "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let q: Vec<&str> = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["quantizer"].as_str().unwrap())
        .collect();
    assert_eq!(q.iter().filter(|&&x| x == "nf4-b64").count(), 7);
    assert_eq!(q.iter().filter(|&&x| x == "nf2-b64").count(), 7);
    let ids = model.join("logits.safetensors");
    let logits = dir.join("logits.safetensors");
    let adapter = out.join("adapter");
    let (ok, err) = loftq(&[
        "eval",
        "--model",
        o,
        "--adapter",
        adapter.to_str().unwrap(),
        "--logits-for",
        ids.to_str().unwrap(),
        "--out",
        logits.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    // A second run into the same directory is refused, and --resume of a finished run too.
    let (ok, err) = loftq(&["init", "--model", m, "--out", o]);
    assert!(!ok && err.contains("not empty"), "{err}");
    let (ok, err) = loftq(&["init", "--model", m, "--out", o, "--resume"]);
    assert!(!ok && err.contains("nothing to resume"), "{err}");
    // A relative --out, both backbones.
    let status = Command::new(env!("CARGO_BIN_EXE_loftq"))
        .current_dir(&dir)
        .args([
            "init",
            "--model",
            m,
            "--out",
            "rel",
            "--method",
            "qlora",
            "--backbone",
            "both",
            "--device",
            "cpu,cpu",
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    for f in [
        "rel/config.json",
        "rel/bf16/config.json",
        "rel/adapter/adapter_config.json",
    ] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    // Bad flags name themselves.
    let (ok, err) = loftq(&[
        "init",
        "--model",
        m,
        "--out",
        dir.join("x").to_str().unwrap(),
        "--bits",
        "nf9",
    ]);
    assert!(!ok && err.contains("--bits"), "{err}");
    let x = dir.join("x");
    let (ok, err) = loftq(&[
        "init",
        "--model",
        m,
        "--out",
        x.to_str().unwrap(),
        "--device",
        "cpu,tpu",
    ]);
    assert!(
        !ok && err.contains("--device") && err.contains("tpu"),
        "{err}"
    );
    let sensitivity = ["--bits", "nf2", "--sensitivity", "rows"];
    let (ok, err) = loftq(
        &[
            &["init", "--model", m, "--out", x.to_str().unwrap()],
            &sensitivity[..],
        ]
        .concat(),
    );
    assert!(!ok && err.contains("--calibration"), "{err}");
    let (ok, err) = loftq(&[
        "init",
        "--model",
        m,
        "--out",
        x.to_str().unwrap(),
        "--distill-steps",
        "2",
    ]);
    assert!(!ok && err.contains("--calibration"), "{err}");
    assert!(!x.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refine_a_bitsandbytes_base_through_the_binary() {
    let dir = scratch("refine");
    let (model, text) = tiny_with_tokenizer(&dir);
    let out = dir.join("adapter");
    let base = fixture("tiny-llama-bnb");
    let args = |out: &std::path::Path| {
        [
            "refine",
            "--base",
            base.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--rank",
            "4",
            "--check-text",
            text.to_str().unwrap(),
            "--check-tokens",
            "32",
        ]
        .map(str::to_string)
    };
    let a = args(&out);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let (ok, err) = loftq(&a);
    assert!(ok, "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["tensors"].as_array().unwrap().len(), 14);
    let [before, after] = [0, 1].map(|i| report["logits_err"][i].as_f64().unwrap());
    assert!(after <= before, "{report}");
    // The adapter works with eval on the bitsandbytes base.
    let (ok, err) = loftq(&[
        "eval",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--logits-for",
        fixture("tiny-llama")
            .join("logits.safetensors")
            .to_str()
            .unwrap(),
        "--out",
        dir.join("logits.safetensors").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    // inspect tells the two bitsandbytes layouts apart.
    let o = loftq_output(&["inspect", base.to_str().unwrap()]);
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(
        shown.contains("bnb-nf4-b64 ") && shown.contains("bnb-nf4-b64-dq"),
        "{shown}"
    );
    // Again into the same directory: refused, nothing changed.
    let (ok, err) = loftq(&a);
    assert!(!ok && err.contains("not empty"), "{err}");
    // A bad flag names itself and writes nothing.
    let bad = dir.join("bad");
    let mut b = args(&bad);
    b[12] = "1".into();
    let b: Vec<&str> = b.iter().map(String::as_str).collect();
    let (ok, err) = loftq(&b);
    assert!(!ok && err.contains("--check-tokens"), "{err}");
    assert!(!bad.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn codebook_prints_the_levels_of_a_quantizer_label() {
    let out = loftq_output(&["codebook", "nf4", "--rounding", "bnb"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let levels: Vec<f32> = text
        .lines()
        .skip(1)
        .map(|l| l.split('\t').nth(1).unwrap().parse().unwrap())
        .collect();
    let want = loftq_core::quant::Codebook::normal_float(4);
    assert_eq!(levels.len(), 16);
    for (got, want) in levels.iter().zip(want.levels()) {
        assert!((got - want).abs() < 1e-8, "{got} against {want}");
    }
    // Integer schemes compute their levels per block; a bad label names itself.
    let (ok, err) = loftq(&["codebook", "int4"]);
    assert!(!ok && err.contains("`int4` has no codebook"), "{err}");
    let (ok, err) = loftq(&["codebook", "nf9"]);
    assert!(!ok && err.contains("`nf9`"), "{err}");
}

/// A LoftQ organisation release (bf16 backbone holding Q, the adapter pickled in loftq_init/)
/// is named by its directory alone in eval, train and refine.
#[test]
fn a_loftq_release_runs_in_eval_train_and_refine() {
    let dir = scratch("release");
    let (model, text) = tiny_with_tokenizer(&dir);
    let release = dir.join("release");
    std::fs::create_dir_all(release.join("loftq_init")).unwrap();
    let src = fixture("tiny-llama-loftq-release");
    for f in [
        "config.json",
        "model.safetensors",
        "loftq_init/adapter_config.json",
        "loftq_init/adapter_model.bin",
    ] {
        std::fs::copy(src.join(f), release.join(f)).unwrap();
    }
    std::fs::copy(model.join("tokenizer.json"), release.join("tokenizer.json")).unwrap();
    let p = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (rel, refs, out) = (
        p(&release),
        p(&src.join("logits.safetensors")),
        dir.join("logits.safetensors"),
    );
    let (ok, err) = loftq(&[
        "eval",
        "--model",
        &rel,
        "--adapter",
        &rel,
        "--logits-for",
        &refs,
        "--out",
        &p(&out),
    ]);
    assert!(ok, "{err}");
    let got = Checkpoint::open(&out).unwrap().f32("logits").unwrap().data;
    let want = Checkpoint::open(&src.join("logits.safetensors"))
        .unwrap()
        .f32("logits_lora")
        .unwrap()
        .data;
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-4, "eval of the release: max |Δ logits| = {diff}");

    // QLoRA-style training from the release: NF4 on load, its adapter as the start.
    let trained = dir.join("trained");
    let (ok, err) = loftq(&[
        "train",
        "--model",
        &rel,
        "--adapter",
        &rel,
        "--quantize",
        "nf4",
        "--text",
        &p(&text),
        "--out",
        &p(&trained),
        "--steps",
        "2",
        "--batch",
        "1",
        "--seq",
        "16",
    ]);
    assert!(ok, "{err}");
    assert!(trained.join("adapter/adapter_model.safetensors").is_file());

    // New adapters for the release's Q from the full-precision weights: the quantized modules
    // are the ones loftq_init adapts, each fitted closer than Q alone.
    let refined = dir.join("refined");
    let (ok, err) = loftq(&[
        "refine",
        "--base",
        &rel,
        "--model",
        &p(&model),
        "--out",
        &p(&refined),
        "--rank",
        "8",
    ]);
    assert!(ok, "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(refined.join("report.json")).unwrap())
            .unwrap();
    let tensors = report["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 14);
    for t in tensors {
        assert_eq!(t["quantizer"], "loftq-release-bf16", "{t}");
        assert!(
            t["rel_err_fit"].as_f64() < t["rel_err_base"].as_f64(),
            "{t}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
