//! The cases over shards, tokenizers, adapters, GGUF files, training checkpoints and texts.

use super::cases::Corpus;
use super::*;

/// Sharded checkpoints.
pub(super) fn shard_cases(c: &mut Corpus) {
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
    c.add(
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
    c.add("index-not-json".into(), "model", index, Role::Model, &|p| {
        shard(p, json!({}));
        std::fs::write(p, "[1, 2").unwrap();
    });
    c.add("index-escapes".into(), "model", index, Role::Model, &|p| {
        shard(
            p,
            json!({"model.embed_tokens.weight": "../../../../etc/passwd"}),
        );
    });
}

/// Tokenizers.
pub(super) fn tokenizer_cases(c: &mut Corpus) {
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
        c.add(
            format!("tokenizer-{label}"),
            "model",
            "tokenizer.json",
            Role::Tokenizer,
            &*damage,
        );
    }
}

/// PEFT adapter configs.
pub(super) fn adapter_cases(c: &mut Corpus) {
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
        c.add(
            format!("adapter-config-{label}"),
            "init",
            "adapter/adapter_config.json",
            Role::Adapter,
            &|p| json_edit(p, &*edit),
        );
    }
    c.add(
        "adapter-config-not-json".into(),
        "init",
        "adapter/adapter_config.json",
        Role::Adapter,
        &|p| std::fs::write(p, "r: 4").unwrap(),
    );
}

/// GGUF files.
pub(super) fn gguf_cases(c: &mut Corpus) {
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
        c.add(
            format!("gguf-{label}"),
            "tiny.gguf",
            "",
            Role::Gguf,
            &*damage,
        );
    }
}

/// Training checkpoints.
pub(super) fn checkpoint_cases(c: &mut Corpus) {
    c.add(
        "checkpoint-state-not-json".into(),
        "run",
        "checkpoint-1/trainer_state.json",
        Role::Checkpoint,
        &|p| std::fs::write(p, "{\"step\": ").unwrap(),
    );
    c.add(
        "checkpoint-optimizer-cut".into(),
        "run",
        "checkpoint-1/optimizer.safetensors",
        Role::Checkpoint,
        &|p| truncate(p, |n| n / 2),
    );
    c.add(
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
    c.add(
        "checkpoint-adapter-cut".into(),
        "run",
        "checkpoint-1/adapter_model.safetensors",
        Role::Checkpoint,
        &|p| truncate(p, |n| n - 10),
    );
    c.add(
        "checkpoint-step-huge".into(),
        "run",
        "checkpoint-1/trainer_state.json",
        Role::Checkpoint,
        &|p| json_edit(p, |s| s["step"] = json!(u64::MAX)),
    );
}

/// Texts.
pub(super) fn text_cases(c: &mut Corpus) {
    c.add("text-not-utf8".into(), "text.txt", "", Role::Text, &|p| {
        std::fs::write(p, [0x66, 0x6f, 0xff, 0xfe, 0x00, 0xc3]).unwrap()
    });
    c.add("text-empty".into(), "text.txt", "", Role::Text, &|p| {
        std::fs::write(p, "").unwrap()
    });
}
