//! The cases over safetensors files and `config.json`.

use super::more_cases::*;
use super::*;

/// The cases made so far, from one set of well-formed inputs.
pub(super) struct Corpus<'a> {
    base: &'a Base,
    cases: Vec<Case>,
}

impl Corpus<'_> {
    /// A case: a copy of `what` whose `file` gets `damage`, and the commands that must refuse
    /// it in `role`.
    pub(super) fn add(
        &mut self,
        name: String,
        what: &str,
        file: &str,
        role: Role,
        damage: &dyn Fn(&Path),
    ) {
        // Damage that only the model's use reveals (values, sizes that disagree, settings):
        // `inspect` shows such files as they are.
        let semantic = !SYNTACTIC.iter().any(|l| name.ends_with(l));
        let dir = self.base.case(&name, what);
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
        let mut runs = commands(self.base, role, &target, &out);
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
        self.cases.push(Case {
            name,
            file: path,
            runs,
            out,
            resume,
        });
    }
}

/// Every case, from the well-formed inputs of `base`.
pub(super) fn corpus(base: &Base) -> Vec<Case> {
    let mut c = Corpus {
        base,
        cases: Vec::new(),
    };
    safetensors_cases(&mut c);
    config_cases(&mut c);
    shard_cases(&mut c);
    tokenizer_cases(&mut c);
    adapter_cases(&mut c);
    gguf_cases(&mut c);
    checkpoint_cases(&mut c);
    text_cases(&mut c);
    c.cases
}

/// Safetensors damage, in each kind of safetensors file.
fn safetensors_cases(c: &mut Corpus) {
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
            c.add(name, what, file, role, &*damage);
        }
    }
    let st = |p: &Path, part: &'static str, v: f32| st_poke(p, part, v);
    c.add(
        "model-nan-weight".into(),
        "model",
        "model.safetensors",
        Role::Values,
        &|p| st(p, "layers.1.mlp.down_proj", f32::NAN),
    );
    c.add(
        "model-inf-weight".into(),
        "model",
        "model.safetensors",
        Role::Values,
        &|p| st(p, "layers.0.self_attn.v_proj", f32::INFINITY),
    );
    c.add(
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
    c.add(
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
    c.add(
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
    c.add(
        "adapter-nan-factor".into(),
        "init",
        "adapter/adapter_model.safetensors",
        Role::Adapter,
        &|p| st(p, "lora_B", f32::NAN),
    );
    c.add(
        "init-packed-bits-0".into(),
        "init",
        "model.safetensors",
        Role::Packed,
        &|p| packed_header(p, "q_proj", |h| set_bits(h, 0)),
    );
    c.add(
        "init-packed-shape-overflow".into(),
        "init",
        "model.safetensors",
        Role::Packed,
        &|p| packed_header(p, "k_proj", |h| h["shape"] = json!([u64::MAX / 3, 7])),
    );
    c.add(
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
    c.add(
        "bnb-shape-overflow".into(),
        "bnb",
        "model.safetensors",
        Role::Bnb,
        &|p| {
            bnb_state(p, |st| st["shape"] = json!([u64::MAX / 2, 3]));
        },
    );
    c.add(
        "bnb-blocksize-0".into(),
        "bnb",
        "model.safetensors",
        Role::Bnb,
        &|p| {
            bnb_state(p, |st| st["blocksize"] = json!(0));
        },
    );
    c.add(
        "bnb-quant-type".into(),
        "bnb",
        "model.safetensors",
        Role::Bnb,
        &|p| {
            bnb_state(p, |st| st["quant_type"] = json!("int3"));
        },
    );
}

/// config.json.
fn config_cases(c: &mut Corpus) {
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
        c.add(
            format!("config-{label}"),
            "model",
            "config.json",
            Role::Model,
            &|p| json_edit(p, &*edit),
        );
    }
    c.add(
        "config-not-json".into(),
        "model",
        "config.json",
        Role::Model,
        &|p| std::fs::write(p, "{\"hidden_size\": 64,").unwrap(),
    );
    c.add(
        "config-empty".into(),
        "model",
        "config.json",
        Role::Model,
        &|p| std::fs::write(p, "").unwrap(),
    );
}
