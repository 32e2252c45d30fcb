//! GGUF files through the binary: output, generation, a Q4_0 start and its export, GGUF from
//! a Hugging Face directory.

use super::*;

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
