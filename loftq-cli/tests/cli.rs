//! The `loftq` binary end to end.

use std::path::PathBuf;
use std::process::Command;

use loftq_models::io::Checkpoint;

mod common;

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
fn train_checkpoints_resumes_and_refuses_bad_input() {
    let dir = scratch("train");
    let (model, text) = tiny_with_tokenizer(&dir);
    let out = dir.join("run");
    let (m, t, o) = (
        model.to_str().unwrap(),
        text.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let args = [
        "train",
        "--model",
        m,
        "--quantize",
        "nf4",
        "--rank",
        "4",
        "--text",
        t,
        "--out",
        o,
        "--steps",
        "4",
        "--batch",
        "2",
        "--seq",
        "16",
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--val-tokens",
        "64",
        "--dropout",
        "0.05",
        "--json",
    ];
    let run = loftq_output(&args);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&run.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let count = |kind: &str| events.iter().filter(|e| e["event"] == kind).count();
    assert_eq!(count("step"), 4);
    assert_eq!(count("eval"), 3, "steps 0, 2 and 4");
    assert_eq!(count("saved"), 2);
    let adapter = out.join("adapter");
    assert!(adapter.join("adapter_model.safetensors").is_file());
    assert!(out.join("history.json").is_file());

    // Again without --resume: refused; with it: nothing left to do, same adapter.
    let before = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let (ok, err) = loftq(&args);
    assert!(!ok && err.contains("--resume"), "{err}");
    let mut resumed = args.to_vec();
    resumed.push("--resume");
    let (ok, err) = loftq(&resumed);
    assert!(ok, "{err}");
    assert_eq!(
        before,
        std::fs::read(adapter.join("adapter_model.safetensors")).unwrap()
    );

    // The trained adapter evaluates.
    let (ok, err) = loftq(&[
        "eval",
        "--model",
        m,
        "--adapter",
        adapter.to_str().unwrap(),
        "--text",
        t,
        "--tokens",
        "64",
        "--window",
        "32",
        "--stride",
        "16",
        "--reference",
        m,
    ]);
    assert!(ok, "{err}");
    assert!(err.is_empty() || !err.contains("error"), "{err}");

    // Data-parallel on two CPU "devices": the adapter of one device, byte for byte.
    let adapter_of = |devices: &str, name: &str| {
        let out = dir.join(name);
        let mut a = args[..args.len() - 1].to_vec();
        let o = out.to_str().unwrap();
        let at = a.iter().position(|x| *x == "--out").unwrap() + 1;
        a[at] = o;
        a.extend(["--accum", "2", "--device", devices]);
        let (ok, err) = loftq(&a);
        assert!(ok, "{devices}: {err}");
        std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap()
    };
    assert!(adapter_of("cpu", "one") == adapter_of("cpu,cpu", "two"));

    // Bad input names the flag or file and writes nothing.
    let fresh = dir.join("fresh");
    let f = fresh.to_str().unwrap();
    for (extra, needle) in [
        (["--device", "cpu,cpu"], "--accum"),
        (["--dropout", "1.5"], "--dropout"),
        (["--quantize", "nf9"], "--quantize"),
        (["--lr", "0"], "--lr"),
    ] {
        let mut a = vec!["train", "--model", m, "--text", t, "--out", f];
        a.extend(extra);
        let (ok, err) = loftq(&a);
        assert!(!ok && err.contains(needle), "{extra:?}: {err}");
        assert!(!fresh.exists(), "{extra:?} left {f}");
    }
    let (ok, err) = loftq(&["train", "--model", m, "--text", "/no/such.txt", "--out", f]);
    assert!(!ok && err.contains("/no/such.txt"), "{err}");
    assert!(!fresh.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_distills_from_a_teacher() {
    let dir = scratch("distill");
    let (model, text) = tiny_with_tokenizer(&dir);
    let (m, t) = (model.to_str().unwrap(), text.to_str().unwrap());
    let out = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let (kl, bw, bad) = (out("kl"), out("blockwise"), out("bad"));
    let base = [
        "train",
        "--model",
        m,
        "--quantize",
        "nf2",
        "--rank",
        "4",
        "--text",
        t,
        "--steps",
        "3",
        "--batch",
        "2",
        "--seq",
        "16",
        "--val-tokens",
        "64",
        "--lr",
        "1e-3",
        "--json",
        "--distill-from",
        m,
    ];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend(extra);
        let run = loftq_output(&a);
        let stderr = String::from_utf8_lossy(&run.stderr).to_string();
        let events: Vec<serde_json::Value> = String::from_utf8_lossy(&run.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (run.status.success(), events, stderr)
    };

    // The KL objective: validation reports it, and it falls.
    let (ok, events, err) = with(&["--out", &kl, "--hidden-weight", "0.1", "--eval-every", "3"]);
    assert!(ok, "{err}");
    let kls: Vec<f64> = events
        .iter()
        .filter(|e| e["event"] == "eval")
        .map(|e| e["kl"].as_f64().unwrap())
        .collect();
    assert_eq!(kls.len(), 2, "before and after");
    assert!(kls[1] < kls[0], "KL {kls:?}");
    assert!(dir.join("kl/adapter/adapter_model.safetensors").is_file());

    // Block-wise: one event per layer, each layer's error lower, the report written.
    let (ok, events, err) = with(&["--out", &bw, "--blockwise", "--blockwise-rows", "4"]);
    assert!(ok, "{err}");
    let layers: Vec<_> = events.iter().filter(|e| e["event"] == "layer").collect();
    assert_eq!(layers.len(), 2, "{events:?} {err}");
    for l in layers {
        assert!(l["mse_after"].as_f64() < l["mse_before"].as_f64(), "{l}");
    }
    let evals: Vec<_> = events.iter().filter(|e| e["event"] == "eval").collect();
    assert_eq!(evals.len(), 2, "before and after: {events:?}");
    assert!(
        evals[1]["kl"].as_f64() < evals[0]["kl"].as_f64(),
        "{evals:?}"
    );
    assert!(dir.join("blockwise/blockwise.json").is_file());
    assert!(dir.join("blockwise/adapter/adapter_config.json").is_file());
    // Its checkpoint is not overwritten without --resume; with it, the fitted layers are
    // taken as they are and the same adapter is written.
    let adapter = std::fs::read(dir.join("blockwise/adapter/adapter_model.safetensors")).unwrap();
    let (ok, _, err) = with(&["--out", &bw, "--blockwise", "--blockwise-rows", "4"]);
    assert!(!ok && err.contains("--resume"), "{err}");
    let again = [
        "--out",
        &bw,
        "--blockwise",
        "--blockwise-rows",
        "4",
        "--resume",
    ];
    let (ok, events, err) = with(&again);
    assert!(ok, "{err}");
    assert_eq!(events[0]["event"], "resumed", "{events:?}");
    assert_eq!(events[0]["layers"], 2);
    let rewritten = std::fs::read(dir.join("blockwise/adapter/adapter_model.safetensors")).unwrap();
    assert!(adapter == rewritten, "the resumed adapter differs");

    // Bad input names the flag or file and writes nothing.
    for (extra, needle) in [
        (
            vec!["--blockwise", "--device", "cpu,cpu", "--accum", "2"],
            "--blockwise",
        ),
        (vec!["--hidden-weight=-1"], "--hidden-weight"),
        (vec!["--blockwise", "--target", "no_such_proj"], "--target"),
    ] {
        let mut extra = extra;
        extra.extend(["--out", &bad]);
        let (ok, _, err) = with(&extra);
        assert!(!ok && err.contains(needle), "{extra:?}: {err}");
        assert!(!dir.join("bad").exists(), "{extra:?} wrote output");
    }
    let mut a = base.to_vec();
    let teacher = a.len() - 1;
    a[teacher] = "/no/such/teacher";
    a.extend(["--out", &bad]);
    let (ok, err) = loftq(&a);
    assert!(!ok && err.contains("/no/such/teacher"), "{err}");
    assert!(!dir.join("bad").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn logs_follow_loftq_log() {
    let dir = scratch("logs");
    let model = fixture("tiny-llama");
    let run = |out: &str, level: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_loftq"));
        cmd.args(["init", "--model", model.to_str().unwrap(), "--out"])
            .arg(dir.join(out))
            .env_remove("LOFTQ_LOG");
        if let Some(l) = level {
            cmd.env("LOFTQ_LOG", l);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // Quiet by default; one line per tensor at info, with its errors.
    assert!(!run("quiet", None).contains("INFO"));
    let log = run("info", Some("info"));
    let lines = log
        .lines()
        .filter(|l| l.contains("INFO") && l.contains(" initialized "));
    assert_eq!(lines.count(), 14, "{log}");
    assert!(
        log.contains("rel_err_init=") && log.contains("planned"),
        "{log}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `init --backbone gguf` and `export` write llama.cpp's files; what cannot be written is
/// refused, naming the flag or tensor, with nothing left behind.
#[test]
fn gguf_output_through_the_binary() {
    let dir = scratch("gguf-out");
    let src = dir.join("tiny.gguf");
    std::fs::write(&src, common::tiny_gguf()).unwrap();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    q4_0_start_and_export(&dir, &p("tiny.gguf"));
    let (ok, err) = loftq(&[
        "init",
        "--model",
        &p("tiny.gguf"),
        "--out",
        &p("nf4"),
        "--rank",
        "4",
    ]);
    assert!(ok, "{err}");
    let refusals: [(&[&str], &str); 4] = [
        (
            &["--model", &p("nf4")],
            "nf4-b64, which llama.cpp cannot read",
        ),
        (
            &["--adapter", &p("q40/adapter")],
            "exists; choose another --out",
        ),
        (&[], "nothing to export"),
        (&["--model", &p("missing")], "missing"),
    ];
    for (extra, want) in refusals {
        let out = if want.contains("exists") {
            p("exported")
        } else {
            p("refused")
        };
        let mut args = vec!["export", "--source", src.to_str().unwrap(), "--out", &out];
        args.extend_from_slice(extra);
        let (ok, err) = loftq(&args);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
        assert!(
            std::fs::read_dir(dir.join("refused")).map_or(true, |mut d| d.next().is_none()),
            "{args:?} left files"
        );
    }
    // --merge: one dense checkpoint that eval reads; a non-empty --out is refused.
    let merge = |out: &str| {
        loftq(&[
            "export",
            "--merge",
            "--model",
            &p("q40"),
            "--adapter",
            &p("q40/adapter"),
            "--out",
            out,
        ])
    };
    let (ok, err) = merge(&p("merged"));
    assert!(ok, "{err}");
    let merged = Checkpoint::open(&dir.join("merged/model.safetensors")).unwrap();
    let e = merged
        .entry("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(e.dtype, safetensors::Dtype::BF16);
    assert!(dir.join("merged/config.json").is_file());
    let (ok, err) = merge(&p("q40"));
    assert!(!ok && err.contains("not empty"), "{err}");
    let (ok, err) = loftq(&[
        "init",
        "--model",
        &p("tiny.gguf"),
        "--out",
        &p("bad"),
        "--backbone",
        "gguf",
    ]);
    assert!(!ok && err.contains("llama.cpp's formats"), "{err}");
    assert!(!dir.join("bad").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `generate`: the streamed text is the JSON report's text; greedy runs repeat; a chat
/// template (from tokenizer_config.json) wraps the prompt; bad flags are refused up front.
#[test]
fn generate_streams_text_and_reports_ids() {
    let dir = scratch("generate");
    let model = common::tiny_model(&dir);
    let m = common::s(&model);
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            m,
            "--prompt",
            "To be",
            "--max-tokens",
            "12",
        ];
        args.extend_from_slice(extra);
        loftq_output(&args)
    };
    let json = |extra: &[&str]| {
        let mut a = extra.to_vec();
        a.push("--json");
        let out = run(&a);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let greedy = json(&["--ignore-eos"]);
    // The byte-level tokenizer: one token per byte, no BOS for a raw prompt.
    assert_eq!(
        greedy["prompt_ids"],
        serde_json::json!([84, 111, 32, 98, 101])
    );
    assert_eq!(greedy["ids"].as_array().unwrap().len(), 12);
    assert_eq!(json(&["--ignore-eos"])["ids"], greedy["ids"]);
    let streamed = run(&["--ignore-eos"]);
    assert!(streamed.status.success());
    let text = String::from_utf8_lossy(&streamed.stdout);
    assert_eq!(
        text.trim_end_matches('\n'),
        greedy["text"].as_str().unwrap()
    );
    let stats = String::from_utf8_lossy(&streamed.stderr);
    assert!(stats.contains("new tokens at"), "{stats}");

    let sampling = [
        "--temperature",
        "1.0",
        "--top-k",
        "50",
        "--top-p",
        "0.9",
        "--seed",
        "3",
    ];
    assert_eq!(json(&sampling)["ids"], json(&sampling)["ids"]);

    // No template yet: --chat is refused; with one, the prompt is the rendered turn.
    let out = run(&["--chat"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no chat template"));
    let template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}";
    let config = serde_json::json!({ "chat_template": template });
    std::fs::write(model.join("tokenizer_config.json"), config.to_string()).unwrap();
    let chat = json(&["--chat", "--system", "S"]);
    let want: Vec<u32> = "<system>S<user>To be<a>".bytes().map(u32::from).collect();
    assert_eq!(chat["prompt_ids"], serde_json::json!(want));

    for (flag, value, want) in [
        ("--temperature", "-1", "--temperature"),
        ("--top-p", "1.5", "--top-p"),
        ("--top-k", "0", "--top-k"),
    ] {
        let out = run(&[flag, value]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{flag}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `init --bits q4_0 --backbone gguf --out DIR/q40` from `source`, then `export --source
/// source` of that output into `DIR/exported`: init's llama.cpp files, and the same bytes from
/// export.
fn q4_0_start_and_export(dir: &std::path::Path, source: &str) {
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let (ok, err) = loftq(&[
        "init",
        "--model",
        source,
        "--out",
        &p("q40"),
        "--bits",
        "q4_0",
        "--rank",
        "4",
        "--backbone",
        "gguf",
    ]);
    assert!(ok, "{err}");
    for f in [
        "model.gguf",
        "adapter.gguf",
        "model.safetensors",
        "adapter/adapter_config.json",
    ] {
        assert!(dir.join("q40").join(f).is_file(), "{f}");
    }
    let (ok, err) = loftq(&[
        "export",
        "--source",
        source,
        "--model",
        &p("q40"),
        "--adapter",
        &p("q40/adapter"),
        "--out",
        &p("exported"),
    ]);
    assert!(ok, "{err}");
    for f in ["model.gguf", "adapter.gguf"] {
        let a = std::fs::read(dir.join("q40").join(f)).unwrap();
        assert!(
            a == std::fs::read(dir.join("exported").join(f)).unwrap(),
            "{f}"
        );
    }
}

/// A Hugging Face directory in the llama.cpp world: `convert DIR F.gguf`, `init --backbone
/// gguf` from it, and `export --source DIR` writing the same files as init (the converted
/// source removed in both).
#[test]
fn gguf_files_from_a_hugging_face_directory() {
    let dir = scratch("gguf-from-hf");
    let (model, _) = tiny_with_tokenizer(&dir);
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let m = model.to_string_lossy().into_owned();
    let (ok, err) = loftq(&["convert", &m, &p("tiny.gguf")]);
    assert!(ok, "{err}");
    let (ok, err) = loftq(&["convert", &m, &p("tiny.gguf")]);
    assert!(!ok && err.contains("new .gguf file"), "{err}");
    q4_0_start_and_export(&dir, &m);
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .chain(std::fs::read_dir(dir.join("q40")).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("loftq-source"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
