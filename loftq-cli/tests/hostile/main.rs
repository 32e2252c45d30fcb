//! The hostile corpus: malformed files of every format the tool reads, each handed to every
//! command that reads it. Each run must end in a clean error: an exit code from 1 to 100 (Rust
//! panics exit with 101), a message naming the file, no panic, nothing written under `--out`,
//! within 5 seconds.
//!
//! The corpus is generated here, from the tiny Llama fixture, so the test is its own script:
//! `cargo test -p loftq-cli --test hostile` (it prints one line per file).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use loftq_models::io::ggml::GgmlType;
use loftq_models::io::gguf::MetaValue;
use loftq_models::io::gguf_write::{RawTensor, gguf_bytes};
use serde_json::{Value, json};

mod cases;
#[path = "../common/mod.rs"]
mod common;
mod damage;
mod more_cases;

use cases::corpus;
use common::{fixture, gguf_meta, gguf_tensors, s, tiny_gguf, tiny_model};
use damage::*;

const LIMIT: Duration = Duration::from_secs(5);

/// Damage done to a file in place.
type Damage = Box<dyn Fn(&Path)>;
/// An edit of a JSON file's value.
type JsonEdit = Box<dyn Fn(&mut Value)>;

/// Case names ending so are damage to a file's syntax, which `inspect` must report too.
const SYNTACTIC: &[&str] = &[
    "empty",
    "short",
    "cut-header",
    "cut-data",
    "huge-header-len",
    "garbage-header",
    "dtype",
    "shape-overflow",
    "offsets-past-end",
    "offsets-reversed",
    "shape-size-mismatch",
    "not-an-object",
    "not-json",
    "magic",
    "version",
    "tensor-count",
    "kv-count",
    "first-key-length",
    "cut-metadata",
    "huge-array",
    "unknown-type",
    "dims-overflow",
    "bits-0",
    "no-metadata",
    "nan-factor",
    "rank-0",
    "dropout-5",
    "rank-mismatch",
    "rank-string",
    "missing-shard",
    "escapes",
    "config-empty",
    "blocksize-0",
    "quant-type",
];

/// What a malformed file is handed to.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    /// A model directory's file (config, weights, tokenizer, index): inspect, eval, init,
    /// train.
    Model,
    /// A model directory's tokenizer: eval and train on text.
    Tokenizer,
    /// A weight whose values are bad: the commands that compute with weights.
    Values,
    /// A `loftq init` output's file: inspect, eval, refine's base, train.
    Packed,
    /// A PEFT adapter's file: inspect, eval, train from it.
    Adapter,
    /// A bitsandbytes checkpoint's file: inspect, refine's base.
    Bnb,
    /// A `.gguf` file: inspect, convert, eval, init.
    Gguf,
    /// A training checkpoint's file: `train --resume`.
    Checkpoint,
    /// A text: eval and train on it.
    Text,
}

/// The well-formed inputs every case starts from.
struct Base {
    root: PathBuf,
}

impl Base {
    fn new(root: &Path) -> Self {
        let _ = std::fs::remove_dir_all(root);
        std::fs::create_dir_all(root).unwrap();
        let model = tiny_model(root);
        let tok = loftq_models::tokenizer::byte_level_json().to_string();
        let init = root.join("init");
        run_ok(&[
            "init",
            "--model",
            s(&model),
            "--out",
            s(&init),
            "--rank",
            "4",
            "--bits",
            "nf4",
        ]);
        std::fs::write(init.join("tokenizer.json"), &tok).unwrap();
        let run = root.join("run");
        let mut train = train_args(root, &init, &run);
        train.extend(["--adapter".into(), s(&init.join("adapter")).into()]);
        train.extend(["--save-every".into(), "1".into()]);
        run_ok(&train.iter().map(String::as_str).collect::<Vec<_>>());
        std::fs::write(root.join("tiny.gguf"), tiny_gguf()).unwrap();
        Self {
            root: root.to_path_buf(),
        }
    }

    fn model(&self) -> PathBuf {
        self.root.join("model")
    }
    fn init(&self) -> PathBuf {
        self.root.join("init")
    }
    fn text(&self) -> PathBuf {
        self.root.join("text.txt")
    }

    /// A fresh case directory holding copies of `what` (`model`, `init`, `run`, `bnb`,
    /// `tiny.gguf`, `text.txt`).
    fn case(&self, name: &str, what: &str) -> PathBuf {
        let dir = self.root.join("cases").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let from = match what {
            "bnb" => fixture("tiny-llama-bnb"),
            _ => self.root.join(what),
        };
        copy_tree(&from, &dir.join(what));
        dir.join(what)
    }
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap();
    }
}

fn run_ok(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_loftq"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A one-step training run of `model` on the base text (its adapter or quantization added by
/// the caller).
fn train_args(root: &Path, model: &Path, out: &Path) -> Vec<String> {
    [
        "train",
        "--model",
        s(model),
        "--text",
        s(&root.join("text.txt")),
        "--out",
        s(out),
        "--steps",
        "1",
        "--batch",
        "1",
        "--seq",
        "16",
    ]
    .map(String::from)
    .to_vec()
}

/// One malformed file and the commands that must refuse it.
struct Case {
    name: String,
    /// The malformed file (its name must be in the message).
    file: PathBuf,
    runs: Vec<Vec<String>>,
    /// `--out` of the runs (must not exist afterwards), or the run directory that a resumed
    /// run must leave as it was.
    out: PathBuf,
    resume: bool,
}

fn commands(base: &Base, role: Role, dir: &Path, out: &Path) -> Vec<Vec<String>> {
    let text = s(&base.text()).to_string();
    let o = s(out).to_string();
    let d = s(dir).to_string();
    let v = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let eval = |model: &str, extra: &[&str]| {
        let mut a = v(&["eval", "--model", model, "--text", &text, "--tokens", "16"]);
        a.extend(v(extra));
        a
    };
    let init = |model: &str| v(&["init", "--model", model, "--out", &o, "--rank", "4"]);
    let train = |model: &Path, adapter: Option<&Path>| {
        let mut a = train_args(&base.root, model, out);
        if let Some(ad) = adapter {
            a.extend(["--adapter".into(), s(ad).into()]);
        } else {
            a.extend(v(&["--quantize", "nf4", "--rank", "4"]));
        }
        a
    };
    let refine = |b: &str, m: &str| v(&["refine", "--base", b, "--model", m, "--out", &o]);
    let generate = |model: &str, extra: &[&str]| {
        let mut a = v(&[
            "generate",
            "--model",
            model,
            "--prompt",
            "To be",
            "--max-tokens",
            "2",
        ]);
        a.extend(v(extra));
        a
    };
    let model = s(&base.model()).to_string();
    match role {
        Role::Model => vec![
            v(&["inspect", &d]),
            eval(&d, &[]),
            generate(&d, &[]),
            init(&d),
            train(dir, None),
            v(&["convert", &d, &format!("{o}.gguf")]),
        ],
        Role::Tokenizer => vec![eval(&d, &[]), generate(&d, &[]), train(dir, None)],
        Role::Values => vec![
            init(&d),
            refine(s(&base.init()), &d),
            v(&["convert", &d, &format!("{o}.gguf")]),
        ],
        Role::Packed => vec![
            v(&["inspect", &d]),
            eval(&d, &[]),
            generate(&d, &[]),
            refine(&d, &model),
            train(dir, Some(&base.init().join("adapter"))),
        ],
        Role::Adapter => vec![
            v(&["inspect", &d]),
            eval(&model, &["--adapter", &d]),
            generate(&model, &["--adapter", &d]),
            train(&base.init(), Some(dir)),
            v(&[
                "export",
                "--source",
                s(&base.root.join("tiny.gguf")),
                "--adapter",
                &d,
                "--out",
                &o,
            ]),
        ],
        Role::Bnb => vec![v(&["inspect", &d]), refine(&d, &model)],
        Role::Gguf => {
            let ids = fixture("tiny-llama/logits.safetensors");
            let logits = v(&["eval", "--model", &d, "--logits-for", s(&ids), "--out", &o]);
            let adapter = base.init().join("adapter");
            vec![
                v(&["inspect", &d]),
                v(&["convert", &d, &o]),
                logits,
                generate(&d, &[]),
                init(&d),
                v(&[
                    "export",
                    "--source",
                    &d,
                    "--adapter",
                    s(&adapter),
                    "--out",
                    &o,
                ]),
            ]
        }
        Role::Checkpoint => {
            let mut a = train(&base.init(), Some(&base.init().join("adapter")));
            a.extend(["--save-every".into(), "1".into(), "--resume".into()]);
            vec![a]
        }
        Role::Text => vec![
            v(&["eval", "--model", &model, "--text", &d, "--tokens", "16"]),
            train_args(&base.root, &base.model(), out)
                .into_iter()
                .map(|x| if x == text { d.clone() } else { x })
                .chain(v(&["--quantize", "nf4", "--rank", "4"]))
                .collect(),
        ],
    }
}

/// What a directory holds: relative paths and sizes.
fn listing(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.push((p.strip_prefix(dir).unwrap().to_path_buf(), len));
            }
        }
    }
    out.sort();
    out
}

/// Runs `args` with a deadline: exit code (None if killed), stderr, time.
fn run(args: &[String]) -> (Option<i32>, String, Duration) {
    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_loftq"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut { stderr }, &mut s).ok();
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if t.elapsed() > LIMIT * 6 {
            child.kill().ok();
            child.wait().ok();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    (status, reader.join().unwrap(), t.elapsed())
}

#[test]
#[allow(clippy::print_stdout)] // the corpus's table, seen with --nocapture
fn every_malformed_file_is_a_clean_error() {
    let root = std::env::temp_dir().join(format!("loftq-hostile-{}", std::process::id()));
    let base = Base::new(&root);
    let cases = corpus(&base);
    assert!(cases.len() >= 60, "{} files", cases.len());
    let mut failures = Vec::new();
    let mut runs = 0;
    for case in &cases {
        let file = case
            .file
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let before = listing(&case.out);
        for args in &case.runs {
            runs += 1;
            if !case.resume {
                let _ = std::fs::remove_dir_all(&case.out);
                let _ = std::fs::remove_file(&case.out);
            }
            let (code, err, took) = run(args);
            let cmd = &args[0];
            let mut bad = Vec::new();
            if !matches!(code, Some(1..=100)) {
                bad.push(format!("exit {code:?}"));
            }
            if err.contains("panicked") {
                bad.push("panicked".into());
            }
            if !err.contains(&file) {
                bad.push(format!("message does not name {file}"));
            }
            if took > LIMIT {
                bad.push(format!("{:.1} s", took.as_secs_f64()));
            }
            let left = if case.resume {
                listing(&case.out) != before
            } else {
                case.out.exists()
            };
            if left {
                bad.push("left output behind".into());
            }
            let first = err
                .lines()
                .last()
                .unwrap_or("")
                .chars()
                .take(160)
                .collect::<String>();
            println!("{:<44} {cmd:<8} {code:?} {first}", case.name);
            if !bad.is_empty() {
                failures.push(format!(
                    "{} / {cmd}: {} — {first}",
                    case.name,
                    bad.join(", ")
                ));
            }
        }
    }
    println!(
        "{} files, {runs} runs, {} failures",
        cases.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    std::fs::remove_dir_all(&root).unwrap();
}
