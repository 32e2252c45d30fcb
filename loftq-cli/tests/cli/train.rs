//! `loftq train` through the binary: checkpoints, resume, distillation, logs.

use super::*;

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

    // The base dequantized once: the same losses.
    let dense_out = dir.join("dense");
    let mut dense = args.to_vec();
    let at = dense.iter().position(|a| *a == o).unwrap();
    dense[at] = dense_out.to_str().unwrap();
    dense.push("--dense-base");
    let run = loftq_output(&dense);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let losses = |stdout: &[u8]| -> Vec<f64> {
        (String::from_utf8_lossy(stdout).lines())
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|e| e["event"] == "step")
            .map(|e| e["loss"].as_f64().unwrap())
            .collect()
    };
    let packed: Vec<f64> = (events.iter().filter(|e| e["event"] == "step"))
        .map(|e| e["loss"].as_f64().unwrap())
        .collect();
    let dense_losses = losses(&run.stdout);
    assert_eq!(dense_losses.len(), packed.len());
    for (d, p) in dense_losses.iter().zip(&packed) {
        assert!((d - p).abs() <= 1e-5 * p.abs(), "{d} vs {p}");
    }

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

/// `loftq train --task classify` on the tiny BERT started by `loftq init` (NF2), with a
/// WordPiece tokenizer and a two-label task; `loftq eval --labels` scores the written head;
/// the flags of the other task, and labels the head does not have, are refused by name.
#[test]
fn classify_trains_an_encoder_and_eval_scores_it() {
    use common::s;
    let dir = scratch("classify");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-bert").join(f), model.join(f)).unwrap();
    }
    let words: Vec<String> = (0..20).map(|i| format!("w{i}")).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let tok = loftq_models::tokenizer::wordpiece_json(&words).to_string();
    std::fs::write(model.join("tokenizer.json"), tok).unwrap();
    let lines: Vec<String> = (0..24)
        .map(|i| match i % 2 {
            0 => format!("low\tw{} w{} w{}", i % 10, (i + 3) % 10, (i + 7) % 10),
            _ => format!("high\tw{} w{}", 10 + i % 10, 10 + (i + 5) % 10),
        })
        .collect();
    let (train, test) = (dir.join("train.tsv"), dir.join("test.tsv"));
    std::fs::write(&train, lines.join("\n")).unwrap();
    std::fs::write(&test, lines[..8].join("\n")).unwrap();
    let (init, out) = (dir.join("init"), dir.join("run"));
    let (ok, err) = loftq(&[
        "init",
        "--model",
        s(&model),
        "--out",
        s(&init),
        "--bits",
        "nf2",
        "--rank",
        "4",
    ]);
    assert!(ok, "{err}");
    let adapter = init.join("adapter");
    let mut args = vec![
        "train",
        "--task",
        "classify",
        "--model",
        s(&init),
        "--adapter",
        s(&adapter),
        "--labels",
        s(&train),
        "--val-labels",
        s(&test),
        "--steps",
        "6",
        "--batch",
        "4",
        "--seq",
        "16",
        "--lr",
        "1e-2",
        "--eval-every",
        "3",
        "--save-every",
        "3",
        "--out",
        s(&out),
    ];
    let (ok, err) = loftq(&args);
    assert!(ok, "{err}");
    assert!(err.contains("held-out accuracy"), "{err}");
    // Checkpoints: a second run into the same --out is refused; with --resume, a run whose
    // last checkpoint is lost continues after step 3 and ends with the same adapter.
    let (ok, err) = loftq(&args);
    assert!(!ok && err.contains("pass --resume"), "{err}");
    let first = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    std::fs::remove_dir_all(out.join("checkpoint-6")).unwrap();
    let mut resume = args.clone();
    resume.extend(["--resume", "--json"]);
    let o = loftq_output(&resume);
    let events = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(events.contains(r#""event":"resumed","step":3"#), "{events}");
    let again = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(first == again, "the resumed run ends elsewhere");
    let labels = std::fs::read_to_string(out.join("adapter/labels.json")).unwrap();
    assert_eq!(
        serde_json::from_str::<Vec<String>>(&labels).unwrap(),
        ["high", "low"]
    );
    let history = std::fs::read_to_string(out.join("history.json")).unwrap();
    let history: serde_json::Value = serde_json::from_str(&history).unwrap();
    assert_eq!(history["losses"].as_array().unwrap().len(), 6);
    assert_eq!(history["evals"].as_array().unwrap().len(), 2);
    let trained = out.join("adapter");
    let scored = loftq_output(&[
        "eval",
        "--model",
        s(&init),
        "--adapter",
        s(&trained),
        "--labels",
        s(&test),
    ]);
    let stdout = String::from_utf8_lossy(&scored.stdout);
    assert!(
        scored.status.success() && stdout.contains("accuracy"),
        "{stdout}"
    );

    // The other task's flags, and a task without its data, are refused by name.
    let again = dir.join("again");
    let last = args.len() - 1;
    args[last] = s(&again);
    let mut with_text = args.clone();
    with_text.extend(["--text", s(&train)]);
    let (ok, err) = loftq(&with_text);
    assert!(!ok && err.contains("--text is for --task lm"), "{err}");
    let mut blockwise = args.clone();
    blockwise.extend(["--distill-from", s(&model), "--blockwise"]);
    let (ok, err) = loftq(&blockwise);
    assert!(
        !ok && err.contains("--distill-from is for --task lm"),
        "{err}"
    );
    let lm = [
        "train",
        "--model",
        s(&init),
        "--labels",
        s(&train),
        "--out",
        s(&again),
    ];
    let (ok, err) = loftq(&lm);
    assert!(
        !ok && err.contains("--labels is for --task classify"),
        "{err}"
    );
    // The checkpoint's own head has three outputs, the labels two.
    let (ok, err) = loftq(&["eval", "--model", s(&model), "--labels", s(&test)]);
    assert!(!ok && err.contains("3 outputs"), "{err}");
    assert!(!again.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
