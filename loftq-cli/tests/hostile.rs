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
use loftq_models::io::gguf::write::{RawTensor, gguf_bytes};
use serde_json::{Value, json};

mod common;
use common::{fixture, gguf_meta, gguf_tensors, s, tiny_gguf, tiny_model};

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

// Editing helpers.

/// The header of a safetensors file and the offset of its data.
fn st_header(bytes: &[u8]) -> (serde_json::Map<String, Value>, usize) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header.as_object().unwrap().clone(), 8 + n)
}

/// Rewrites the header of the safetensors file `path` with `edit`, the data unchanged.
fn st_edit(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let (mut header, start) = st_header(&bytes);
    edit(&mut header);
    let h = Value::Object(header).to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(&h);
    out.extend(&bytes[start..]);
    std::fs::write(path, out).unwrap();
}

/// The first tensor entry of a header whose name contains `part`.
fn entry<'a>(h: &'a mut serde_json::Map<String, Value>, part: &str) -> &'a mut Value {
    let key = h
        .keys()
        .find(|k| k.contains(part) && *k != "__metadata__")
        .unwrap_or_else(|| panic!("no tensor with `{part}`"))
        .clone();
    h.get_mut(&key).unwrap()
}

/// Overwrites the first `f32` of the tensor named with `part` in `path` with `v`.
fn st_poke(path: &Path, part: &str, v: f32) {
    let mut bytes = std::fs::read(path).unwrap();
    let (mut header, start) = st_header(&bytes);
    let begin = entry(&mut header, part)["data_offsets"][0]
        .as_u64()
        .unwrap() as usize;
    bytes[start + begin..start + begin + 4].copy_from_slice(&v.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

fn json_edit(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn truncate(path: &Path, keep: impl FnOnce(usize) -> usize) {
    let bytes = std::fs::read(path).unwrap();
    let n = keep(bytes.len());
    std::fs::write(path, &bytes[..n]).unwrap();
}

/// The byte-level damage every safetensors file gets: `(label, damage)`.
fn safetensors_damage(tensor: &'static str) -> Vec<(&'static str, Damage)> {
    vec![
        ("empty", Box::new(|p| truncate(p, |_| 0))),
        ("short", Box::new(|p| truncate(p, |_| 5))),
        ("cut-header", Box::new(|p| truncate(p, |_| 40))),
        ("cut-data", Box::new(|p| truncate(p, |n| n - 100))),
        (
            "huge-header-len",
            Box::new(|p| {
                let mut b = std::fs::read(p).unwrap();
                b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                std::fs::write(p, b).unwrap();
            }),
        ),
        (
            "garbage-header",
            Box::new(|p| {
                let mut b = std::fs::read(p).unwrap();
                for x in &mut b[8..40] {
                    *x = b'#';
                }
                std::fs::write(p, b).unwrap();
            }),
        ),
        (
            "dtype",
            Box::new(move |p| st_edit(p, |h| entry(h, tensor)["dtype"] = json!("Q99"))),
        ),
        (
            "shape-overflow",
            Box::new(move |p| {
                st_edit(p, |h| {
                    entry(h, tensor)["shape"] = json!([u64::MAX / 2, u64::MAX / 2]);
                })
            }),
        ),
        (
            "offsets-past-end",
            Box::new(move |p| {
                st_edit(p, |h| {
                    entry(h, tensor)["data_offsets"] = json!([0, 1u64 << 40]);
                })
            }),
        ),
        (
            "offsets-reversed",
            Box::new(move |p| {
                st_edit(p, |h| {
                    let e = entry(h, tensor);
                    let o = e["data_offsets"].clone();
                    e["data_offsets"] = json!([o[1], o[0]]);
                })
            }),
        ),
        (
            "shape-size-mismatch",
            Box::new(move |p| {
                st_edit(p, |h| {
                    let e = entry(h, tensor);
                    let mut shape = e["shape"].as_array().unwrap().clone();
                    shape[0] = json!(shape[0].as_u64().unwrap() + 1);
                    e["shape"] = Value::Array(shape);
                })
            }),
        ),
        (
            "not-an-object",
            Box::new(|p| {
                let mut out = 2u64.to_le_bytes().to_vec();
                out.extend(b"[]");
                std::fs::write(p, out).unwrap();
            }),
        ),
    ]
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

fn corpus(base: &Base) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut add = |name: String, what: &str, file: &str, role: Role, damage: &dyn Fn(&Path)| {
        // Damage that only the model's use reveals (values, sizes that disagree, settings):
        // `inspect` shows such files as they are.
        let semantic = !SYNTACTIC.iter().any(|l| name.ends_with(l));
        let dir = base.case(&name, what);
        let path = if file.is_empty() {
            dir.clone()
        } else {
            dir.join(file)
        };
        damage(&path);
        let (out, resume) = match role {
            Role::Checkpoint => (dir.clone(), true),
            _ => (dir.parent().unwrap().join("out"), false),
        };
        let target = match role {
            Role::Gguf | Role::Text => path.clone(),
            Role::Adapter => dir.join("adapter"),
            _ => dir.clone(),
        };
        let mut runs = commands(base, role, &target, &out);
        if semantic {
            runs.retain(|r| r[0] != "inspect");
        }
        if role == Role::Checkpoint {
            for r in &mut runs {
                let i = r.iter().position(|x| x == "--out").unwrap();
                r[i + 1] = s(&dir).into();
            }
        }
        // A missing shard is named by its own name.
        let path = match name.as_str() {
            "index-missing-shard" => dir.join("model-00002-of-00002.safetensors"),
            _ => path,
        };
        cases.push(Case {
            name,
            file: path,
            runs,
            out,
            resume,
        });
    };
    // Safetensors damage, in each kind of safetensors file.
    let st_files = [
        (
            "model",
            "model.safetensors",
            Role::Model,
            "layers.0.self_attn.q_proj",
        ),
        (
            "init",
            "model.safetensors",
            Role::Packed,
            "layers.0.self_attn.q_proj",
        ),
        (
            "init",
            "adapter/adapter_model.safetensors",
            Role::Adapter,
            "q_proj.lora_A",
        ),
        (
            "bnb",
            "model.safetensors",
            Role::Bnb,
            "q_proj.weight.absmax",
        ),
    ];
    for (what, file, role, tensor) in st_files {
        for (label, damage) in safetensors_damage(tensor) {
            let name = format!("{what}-{}-{label}", file.replace(['/', '.'], "_"));
            add(name, what, file, role, &*damage);
        }
    }
    let st = |p: &Path, part: &'static str, v: f32| st_poke(p, part, v);
    add(
        "model-nan-weight".into(),
        "model",
        "model.safetensors",
        Role::Values,
        &|p| st(p, "layers.1.mlp.down_proj", f32::NAN),
    );
    add(
        "model-inf-weight".into(),
        "model",
        "model.safetensors",
        Role::Values,
        &|p| st(p, "layers.0.self_attn.v_proj", f32::INFINITY),
    );
    add(
        "model-missing-tensor".into(),
        "model",
        "model.safetensors",
        Role::Model,
        &|p| {
            st_edit(p, |h| {
                h.remove("model.layers.1.self_attn.o_proj.weight");
            })
        },
    );
    add(
        "model-wrong-shape".into(),
        "model",
        "model.safetensors",
        Role::Model,
        &|p| {
            st_edit(p, |h| {
                entry(h, "layers.0.mlp.gate_proj")["shape"] = json!([64, 128]);
            })
        },
    );
    add(
        "model-int-weight".into(),
        "model",
        "model.safetensors",
        Role::Model,
        &|p| {
            st_edit(p, |h| {
                let e = entry(h, "layers.0.mlp.up_proj");
                e["dtype"] = json!("I32");
            })
        },
    );
    add(
        "adapter-nan-factor".into(),
        "init",
        "adapter/adapter_model.safetensors",
        Role::Adapter,
        &|p| st(p, "lora_B", f32::NAN),
    );
    add(
        "init-packed-bits-0".into(),
        "init",
        "model.safetensors",
        Role::Packed,
        &|p| packed_header(p, "q_proj", |h| set_bits(h, 0)),
    );
    add(
        "init-packed-shape-overflow".into(),
        "init",
        "model.safetensors",
        Role::Packed,
        &|p| packed_header(p, "k_proj", |h| h["shape"] = json!([u64::MAX / 3, 7])),
    );
    add(
        "init-packed-no-metadata".into(),
        "init",
        "model.safetensors",
        Role::Packed,
        &|p| {
            st_edit(p, |h| {
                let m = h["__metadata__"].as_object_mut().unwrap();
                let key = m.keys().find(|k| k.contains("v_proj")).unwrap().clone();
                m[&key] = json!("{not json");
            })
        },
    );
    add(
        "bnb-shape-overflow".into(),
        "bnb",
        "model.safetensors",
        Role::Bnb,
        &|p| {
            bnb_state(p, |st| st["shape"] = json!([u64::MAX / 2, 3]));
        },
    );
    add(
        "bnb-blocksize-0".into(),
        "bnb",
        "model.safetensors",
        Role::Bnb,
        &|p| {
            bnb_state(p, |st| st["blocksize"] = json!(0));
        },
    );
    add(
        "bnb-quant-type".into(),
        "bnb",
        "model.safetensors",
        Role::Bnb,
        &|p| {
            bnb_state(p, |st| st["quant_type"] = json!("int3"));
        },
    );
    // config.json.
    let config_edits: Vec<(&str, JsonEdit)> = vec![
        ("zero-hidden", Box::new(|c| c["hidden_size"] = json!(0))),
        (
            "huge-layers",
            Box::new(|c| c["num_hidden_layers"] = json!(1u64 << 50)),
        ),
        (
            "heads-not-dividing",
            Box::new(|c| c["num_attention_heads"] = json!(3)),
        ),
        (
            "kv-heads-not-grouping",
            Box::new(|c| c["num_key_value_heads"] = json!(3)),
        ),
        ("odd-head-dim", Box::new(|c| c["head_dim"] = json!(7))),
        (
            "negative-eps",
            Box::new(|c| c["rms_norm_eps"] = json!(-1.0)),
        ),
        (
            "zero-rope-theta",
            Box::new(|c| c["rope_parameters"]["rope_theta"] = json!(0.0)),
        ),
        ("hidden-act", Box::new(|c| c["hidden_act"] = json!("gelu"))),
        (
            "string-hidden",
            Box::new(|c| c["hidden_size"] = json!("sixty-four")),
        ),
        (
            "missing-vocab",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("vocab_size");
            }),
        ),
        (
            "rope-scaling",
            Box::new(|c| c["rope_parameters"]["rope_type"] = json!("warp9")),
        ),
        (
            "sliding-window-0",
            Box::new(|c| {
                c["model_type"] = json!("mistral");
                c["sliding_window"] = json!(0);
            }),
        ),
        (
            "architecture",
            Box::new(|c| c["model_type"] = json!("gpt2")),
        ),
        (
            "overflow-product",
            Box::new(|c| {
                c["intermediate_size"] = json!(u64::MAX / 4);
            }),
        ),
    ];
    for (label, edit) in config_edits {
        add(
            format!("config-{label}"),
            "model",
            "config.json",
            Role::Model,
            &|p| json_edit(p, &*edit),
        );
    }
    add(
        "config-not-json".into(),
        "model",
        "config.json",
        Role::Model,
        &|p| std::fs::write(p, "{\"hidden_size\": 64,").unwrap(),
    );
    add(
        "config-empty".into(),
        "model",
        "config.json",
        Role::Model,
        &|p| std::fs::write(p, "").unwrap(),
    );
    // Sharded checkpoints.
    let shard = |index: &Path, map: Value| {
        let dir = index.parent().unwrap();
        std::fs::rename(
            dir.join("model.safetensors"),
            dir.join("model-00001-of-00001.safetensors"),
        )
        .unwrap();
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            json!({"metadata": {}, "weight_map": map}).to_string(),
        )
        .unwrap();
    };
    let index = "model.safetensors.index.json";
    add(
        "index-missing-shard".into(),
        "model",
        index,
        Role::Model,
        &|p| {
            shard(
                p,
                json!({"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}),
            );
        },
    );
    add("index-not-json".into(), "model", index, Role::Model, &|p| {
        shard(p, json!({}));
        std::fs::write(p, "[1, 2").unwrap();
    });
    add("index-escapes".into(), "model", index, Role::Model, &|p| {
        shard(
            p,
            json!({"model.embed_tokens.weight": "../../../../etc/passwd"}),
        );
    });
    // Tokenizers.
    let tok_edits: Vec<(&str, Damage)> = vec![
        (
            "not-json",
            Box::new(|p| std::fs::write(p, "{\"model\":").unwrap()),
        ),
        (
            "unigram",
            Box::new(|p| json_edit(p, |t| t["model"]["type"] = json!("Unigram"))),
        ),
        (
            "no-vocab",
            Box::new(|p| {
                json_edit(p, |t| {
                    t["model"].as_object_mut().unwrap().remove("vocab");
                })
            }),
        ),
        (
            "bad-merge",
            Box::new(|p| json_edit(p, |t| t["model"]["merges"] = json!(["a"]))),
        ),
        (
            // A syntax error inside `decoder` made the tokenizers crate panic (fuzzing).
            "decoder-syntax",
            Box::new(|p| {
                let text = std::fs::read_to_string(p).unwrap();
                assert!(text.contains("\"decoder\":{\""));
                let broken = text.replacen("\"decoder\":{\"", "\"decoder\":{", 1);
                std::fs::write(p, broken).unwrap();
            }),
        ),
    ];
    for (label, damage) in tok_edits {
        add(
            format!("tokenizer-{label}"),
            "model",
            "tokenizer.json",
            Role::Tokenizer,
            &*damage,
        );
    }
    // PEFT adapter configs.
    let adapter_edits: Vec<(&str, JsonEdit)> = vec![
        ("rank-0", Box::new(|c| c["r"] = json!(0))),
        ("dropout-5", Box::new(|c| c["lora_dropout"] = json!(5.0))),
        (
            "targets-nothing",
            Box::new(|c| c["target_modules"] = json!(["no_such_proj"])),
        ),
        ("rank-mismatch", Box::new(|c| c["r"] = json!(8))),
        ("rank-string", Box::new(|c| c["r"] = json!("four"))),
    ];
    for (label, edit) in adapter_edits {
        add(
            format!("adapter-config-{label}"),
            "init",
            "adapter/adapter_config.json",
            Role::Adapter,
            &|p| json_edit(p, &*edit),
        );
    }
    add(
        "adapter-config-not-json".into(),
        "init",
        "adapter/adapter_config.json",
        Role::Adapter,
        &|p| std::fs::write(p, "r: 4").unwrap(),
    );
    // GGUF files.
    let gguf_damage: Vec<(&str, Damage)> = vec![
        ("short", Box::new(|p| truncate(p, |_| 3))),
        ("magic", Box::new(|p| poke(p, 0, b"GGUX"))),
        ("version", Box::new(|p| poke(p, 4, &9u32.to_le_bytes()))),
        (
            "tensor-count",
            Box::new(|p| poke(p, 8, &u64::MAX.to_le_bytes())),
        ),
        (
            "kv-count",
            Box::new(|p| poke(p, 16, &(1u64 << 60).to_le_bytes())),
        ),
        (
            "first-key-length",
            Box::new(|p| poke(p, 24, &(1u64 << 62).to_le_bytes())),
        ),
        ("cut-metadata", Box::new(|p| truncate(p, |_| 200))),
        ("cut-data", Box::new(|p| truncate(p, |n| n - 64))),
        (
            "arch",
            Box::new(|p| {
                rewrite_gguf(
                    p,
                    &[("general.architecture", MetaValue::Str("mamba".into()))],
                )
            }),
        ),
        (
            "nan-rope",
            Box::new(|p| rewrite_gguf(p, &[("llama.rope.freq_base", MetaValue::F64(f64::NAN))])),
        ),
        (
            "odd-rotary",
            Box::new(|p| rewrite_gguf(p, &[("llama.attention.head_count", MetaValue::U64(64))])),
        ),
        (
            "zero-eps",
            Box::new(|p| {
                rewrite_gguf(
                    p,
                    &[(
                        "llama.attention.layer_norm_rms_epsilon",
                        MetaValue::F64(0.0),
                    )],
                )
            }),
        ),
        ("huge-array", Box::new(huge_gguf_array)),
        (
            "wrong-dims",
            Box::new(|p| {
                gguf_with(p, |t| {
                    if t.name == "blk.0.ffn_up.weight" {
                        t.dims = vec![128, 64];
                    }
                })
            }),
        ),
        (
            "unknown-type",
            Box::new(|p| {
                gguf_with(p, |t| {
                    if t.name == "blk.1.attn_k.weight" {
                        t.ty = GgmlType(99);
                    }
                })
            }),
        ),
        (
            "dims-overflow",
            Box::new(|p| {
                gguf_with(p, |t| {
                    if t.name == "blk.1.attn_q.weight" {
                        t.dims = vec![u64::MAX / 2, 4];
                    }
                })
            }),
        ),
    ];
    for (label, damage) in gguf_damage {
        add(
            format!("gguf-{label}"),
            "tiny.gguf",
            "",
            Role::Gguf,
            &*damage,
        );
    }
    // Training checkpoints.
    add(
        "checkpoint-state-not-json".into(),
        "run",
        "checkpoint-1/trainer_state.json",
        Role::Checkpoint,
        &|p| std::fs::write(p, "{\"step\": ").unwrap(),
    );
    add(
        "checkpoint-optimizer-cut".into(),
        "run",
        "checkpoint-1/optimizer.safetensors",
        Role::Checkpoint,
        &|p| truncate(p, |n| n / 2),
    );
    add(
        "checkpoint-optimizer-shape".into(),
        "run",
        "checkpoint-1/optimizer.safetensors",
        Role::Checkpoint,
        &|p| {
            st_edit(p, |h| {
                let e = entry(h, "m.0");
                e["shape"] = json!([1, 1]);
                let b = e["data_offsets"][0].as_u64().unwrap();
                e["data_offsets"] = json!([b, b + 4]);
            })
        },
    );
    add(
        "checkpoint-adapter-cut".into(),
        "run",
        "checkpoint-1/adapter_model.safetensors",
        Role::Checkpoint,
        &|p| truncate(p, |n| n - 10),
    );
    add(
        "checkpoint-step-huge".into(),
        "run",
        "checkpoint-1/trainer_state.json",
        Role::Checkpoint,
        &|p| json_edit(p, |s| s["step"] = json!(u64::MAX)),
    );
    // Texts.
    add("text-not-utf8".into(), "text.txt", "", Role::Text, &|p| {
        std::fs::write(p, [0x66, 0x6f, 0xff, 0xfe, 0x00, 0xc3]).unwrap()
    });
    add("text-empty".into(), "text.txt", "", Role::Text, &|p| {
        std::fs::write(p, "").unwrap()
    });
    cases
}

/// Edits the packed header (JSON in the metadata) of the first weight named with `part`.
fn packed_header(p: &Path, part: &str, edit: impl FnOnce(&mut Value)) {
    st_edit(p, |h| {
        let m = h["__metadata__"].as_object_mut().unwrap();
        let key = m.keys().find(|k| k.contains(part)).unwrap().clone();
        let mut q: Value = serde_json::from_str(m[&key].as_str().unwrap()).unwrap();
        edit(&mut q);
        m[&key] = json!(q.to_string());
    })
}

fn set_bits(q: &mut Value, bits: u64) {
    match q {
        Value::Object(m) => {
            for (k, v) in m.iter_mut() {
                if k == "bits" {
                    *v = json!(bits);
                } else {
                    set_bits(v, bits);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|v| set_bits(v, bits)),
        _ => {}
    }
}

/// Edits the JSON quantization state of the bitsandbytes q_proj of layer 0.
fn bnb_state(p: &Path, edit: impl FnOnce(&mut Value)) {
    let mut bytes = std::fs::read(p).unwrap();
    let (mut header, start) = st_header(&bytes);
    let key = header
        .keys()
        .find(|k| k.contains("layers.0.self_attn.q_proj") && k.contains("quant_state"))
        .expect("a quant_state tensor")
        .clone();
    let e = header.get_mut(&key).unwrap();
    let [b, end] = [0, 1].map(|i| e["data_offsets"][i].as_u64().unwrap() as usize);
    let mut st: Value = serde_json::from_slice(&bytes[start + b..start + end]).unwrap();
    edit(&mut st);
    // The new state replaces the old one at the end of the data; the old bytes stay unused.
    let new = st.to_string().into_bytes();
    let data_len = (bytes.len() - start) as u64;
    e["data_offsets"] = json!([data_len, data_len + new.len() as u64]);
    e["shape"] = json!([new.len()]);
    bytes.extend(&new);
    let h = Value::Object(header).to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(&h);
    out.extend(&bytes[start..]);
    std::fs::write(p, out).unwrap();
}

fn poke(p: &Path, at: usize, v: &[u8]) {
    let mut b = std::fs::read(p).unwrap();
    b[at..at + v.len()].copy_from_slice(v);
    std::fs::write(p, b).unwrap();
}

fn rewrite_gguf(p: &Path, over: &[(&'static str, MetaValue)]) {
    std::fs::write(p, gguf_bytes(&gguf_meta(over), &gguf_tensors())).unwrap();
}

fn gguf_with(p: &Path, edit: impl Fn(&mut RawTensor)) {
    let mut t = gguf_tensors();
    t.iter_mut().for_each(edit);
    std::fs::write(p, gguf_bytes(&gguf_meta(&[]), &t)).unwrap();
}

/// A GGUF file whose vocabulary array claims 2^40 strings in a few bytes.
fn huge_gguf_array(p: &Path) {
    let marker = 0x5a5a_5a5a_5a5a_5a5au64;
    let arr = MetaValue::Array(vec![MetaValue::U64(marker)]);
    let bytes = gguf_bytes(
        &gguf_meta(&[("tokenizer.ggml.tokens", arr)]),
        &gguf_tensors(),
    );
    // Array layout: element type (u32), count (u64), elements: the count precedes the marker.
    let at = bytes
        .windows(8)
        .position(|w| w == marker.to_le_bytes())
        .unwrap();
    let mut bytes = bytes;
    bytes[at - 8..at].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(p, bytes).unwrap();
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
