//! GGUF output: a Q4_0 start as a GGUF base and LoRA adapter, llama.cpp rope factors, merged
//! files, refusals before the work, HF directories converted.

use super::*;

/// A LoftQ start in Q4_0 written back as GGUF: the base holds the packed codes byte for byte
/// (and loads to the same logits as the packed output), every other tensor and metadata
/// entry is the source's, and the LoRA GGUF holds the adapter in llama.cpp's layout.
#[test]
fn q4_0_start_writes_a_gguf_base_and_lora_adapter() {
    let dir = scratch("gguf-export");
    let src = dir.join("tiny.gguf");
    std::fs::write(&src, tiny_gguf(GgmlType::F32)).unwrap();
    let out = dir.join("out");
    let mut spec = loftq_models::init::InitSpec::new(src.clone(), out.clone(), 4, 2);
    spec.quant = QuantConfig::ggml(GgmlFormat::Q4_0);
    spec.backbone = loftq_models::init::Backbone::Gguf;
    spec.lora.alpha = 16.0;
    run_init_here(&spec, false).unwrap();
    // `loftq export` from the packed output writes the same two files.
    let source = GgufModel::open(&src).unwrap();
    let ckpt = Checkpoint::open(&out.join("model.safetensors")).unwrap();
    write_gguf_base(&source, &ckpt, &dir.join("model.gguf")).unwrap();
    let adapter = Adapter::read(&out.join("adapter")).unwrap();
    write_lora_gguf(&adapter, &source, &dir.join("adapter.gguf")).unwrap();
    for f in ["model.gguf", "adapter.gguf"] {
        let (a, b) = (
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(dir.join(f)).unwrap(),
        );
        assert!(a == b, "{f}: init and export differ");
    }

    let base = Gguf::open(&out.join("model.gguf")).unwrap();
    let mut want_meta = source.gguf.metadata.clone();
    want_meta.insert("general.file_type".into(), MetaValue::U64(2));
    assert_eq!(base.metadata, want_meta);
    for (g, t) in &source.gguf.tensors {
        let got = &base.tensors[g];
        assert_eq!(got.shape, t.shape, "{g}");
        if g.contains("attn_") && !g.contains("norm") || g.contains("ffn_") && !g.contains("norm") {
            assert_eq!(got.ty.name(), "Q4_0", "{g}");
        } else {
            assert_eq!(base.raw_tensor(g), source.gguf.raw_tensor(g), "{g}");
        }
    }
    // The base in GGUF runs as the packed output does.
    let shape = [1, 12];
    let tokens: Vec<i32> = (0..12).map(|i| i * 37 % 256).collect();
    let packed = load_pretrained(&out, None, &device()).unwrap();
    let gguf = load_pretrained(&out.join("model.gguf"), None, &device()).unwrap();
    let (a, b) = (
        logits(&packed, ids(tokens.clone(), shape[0], shape[1])),
        logits(&gguf, ids(tokens, shape[0], shape[1])),
    );
    assert!(max_abs_diff(&a, &b) < 1e-5, "{}", max_abs_diff(&a, &b));

    let lora = Gguf::open(&out.join("adapter.gguf")).unwrap();
    let s = |k: &str| lora.meta(k).and_then(MetaValue::as_str).map(str::to_string);
    assert_eq!(s("general.type").as_deref(), Some("adapter"));
    assert_eq!(s("adapter.type").as_deref(), Some("lora"));
    // alpha / r = 16 / 4, llama.cpp's scale.
    assert_eq!(
        lora.meta("adapter.lora.alpha").and_then(MetaValue::as_f64),
        Some(16.0)
    );
    assert_eq!(lora.tensors.len(), 2 * adapter.modules.len());
    let q = &adapter.modules["model.layers.1.self_attn.q_proj"];
    let (sa, a) = lora.f32("blk.1.attn_q.weight.lora_a").unwrap();
    assert_eq!((sa, a), (q.a.shape.clone(), q.a.data.clone()));
    let (sb, b) = lora.f32("blk.1.attn_q.weight.lora_b").unwrap();
    assert_eq!(sb, q.b.shape);
    assert_eq!(permute_rows(&b, sb[0], 4, false), q.b.data);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Llama 3.1's `rope_freqs.weight` (divisors as llama.cpp's converter writes them) reads as
/// the Llama 3 scaling it came from: the logits of the HF directory with that `rope_scaling`.
#[test]
fn rope_freqs_read_as_llama3_scaling() {
    use loftq_models::config::RopeScaling;
    let dir = scratch("gguf-rope-freqs");
    // head_dim 16, θ = 10⁴; a short original context so that every kind of frequency occurs.
    let (factor, orig) = (8.0f64, 64.0f64);
    let factors: Vec<f32> = (0..8)
        .map(|i| {
            let freq = 1.0 / 10_000f32.powf((2 * i) as f32 / 16.0);
            let wavelen = 2.0 * std::f64::consts::PI / f64::from(freq);
            let ff = if wavelen < orig / 4.0 {
                1.0
            } else if wavelen > orig {
                factor
            } else {
                let s = (orig / wavelen - 1.0) / 3.0;
                1.0 / ((1.0 - s) / factor + s)
            };
            ff as f32
        })
        .collect();
    let t = RawTensor {
        name: "rope_freqs.weight".into(),
        dims: vec![8],
        ty: GgmlType::F32,
        bytes: factors.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    let path = dir.join("tiny-3.1.gguf");
    std::fs::write(&path, tiny_gguf_with(GgmlType::F32, Vec::new(), vec![t])).unwrap();
    let m = GgufModel::open(&path).unwrap();
    let want = RopeScaling::Llama3 {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: orig,
    };
    assert_eq!(m.config.rope.scaling, want);
    // The same weights as an HF directory with that scaling give the same logits.
    let hf = dir.join("hf");
    m.convert(&hf).unwrap();
    let config = loftq_models::LlamaConfig::from_file(&hf.join("config.json")).unwrap();
    assert_eq!(config.rope.scaling, want);
    let tokens: Vec<i32> = (0..40).map(|i| i * 37 % 256).collect();
    let a = logits(
        &load_pretrained(&path, None, &device()).unwrap(),
        ids(tokens.clone(), 1, 40),
    );
    let b = logits(
        &load_pretrained(&hf, None, &device()).unwrap(),
        ids(tokens.clone(), 1, 40),
    );
    assert!(max_abs_diff(&a, &b) < 1e-5);
    let plain = load_pretrained(&fixture("tiny-llama"), None, &device()).unwrap();
    assert!(
        max_abs_diff(&a, &logits(&plain, ids(tokens, 1, 40))) > 1e-3,
        "scaling unused"
    );
    // Back to GGUF from the directory (with a vocabulary): the converter's divisors.
    let (with_vocab, _) = hf_with_vocabulary(&dir, "gpt-2");
    std::fs::copy(with_vocab.join("tokenizer.json"), hf.join("tokenizer.json")).unwrap();
    let back = dir.join("back.gguf");
    loftq_models::io::write_gguf_from_hf(&hf, &back).unwrap();
    assert_eq!(
        Gguf::open(&back)
            .unwrap()
            .f32("rope_freqs.weight")
            .unwrap()
            .1,
        factors
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A merged GGUF: the packed Q4_0 start plus its adapter as one file, whose logits are the
/// start's with the adapter; in Q8_0, the same within Q8_0's error; the norms carried.
#[test]
fn merged_gguf_runs_as_base_plus_adapter() {
    use loftq_models::io::{GgufWeightType, write_merged_gguf};
    let dir = scratch("gguf-merged");
    let src = dir.join("tiny.gguf");
    std::fs::write(&src, tiny_gguf(GgmlType::F32)).unwrap();
    let out = dir.join("out");
    let mut spec = loftq_models::init::InitSpec::new(src.clone(), out.clone(), 4, 2);
    spec.quant = QuantConfig::ggml(GgmlFormat::Q4_0);
    run_init_here(&spec, false).unwrap();
    let source = GgufModel::open(&src).unwrap();
    let ckpt = Checkpoint::open(&out.join("model.safetensors")).unwrap();
    let adapter = Adapter::read(&out.join("adapter")).unwrap();
    let tokens: Vec<i32> = (0..12).map(|i| i * 37 % 256).collect();
    let start = load_pretrained(&out, Some(&out.join("adapter")), &device()).unwrap();
    let want = logits(&start, ids(tokens.clone(), 1, 12));
    let mut got = Vec::new();
    let ty_id = |ty| match ty {
        GgufWeightType::Ggml(f) => f.fallback().type_id(),
        _ => 0,
    };
    // Q4_K on rows of 64 and 128 values (not whole super-blocks): Q5_0, as llama-quantize.
    for ty in [
        GgufWeightType::F32,
        GgufWeightType::Ggml(GgmlFormat::Q8_0),
        GgufWeightType::Ggml(GgmlFormat::Q4K),
    ] {
        let path = dir.join(format!("merged-{ty:?}.gguf"));
        write_merged_gguf(&source, &ckpt, &adapter, ty, &path).unwrap();
        let merged = Gguf::open(&path).unwrap();
        for (g, t) in &source.gguf.tensors {
            let linear = (g.contains("attn_") || g.contains("ffn_")) && !g.contains("norm")
                || g == "output.weight"
                || g == "token_embd.weight";
            if linear {
                assert_eq!(merged.tensors[g].ty, GgmlType(ty_id(ty)), "{g}");
                continue;
            }
            assert!(merged.raw_tensor(g) == source.gguf.raw_tensor(g), "{g}");
            assert_eq!(merged.tensors[g].ty, t.ty, "{g}");
        }
        let m = load_pretrained(&path, None, &device()).unwrap();
        got.push(logits(&m, ids(tokens.clone(), 1, 12)));
    }
    let d = max_abs_diff(&got[0], &want);
    assert!(d < 1e-4, "f32 merge: {d}");
    let d8 = max_abs_diff(&got[1], &want);
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    assert!(
        d8 > 0.0 && d8 < 0.02 * scale,
        "q8_0 merge: {d8} (logits up to {scale})"
    );

    // An adapter module the model lacks: refused, nothing written.
    let mut bad = adapter.clone();
    let (k, v) = bad.modules.pop_first().unwrap();
    bad.modules.insert(k.replace("layers.0", "layers.9"), v);
    let path = dir.join("refused.gguf");
    let e = write_merged_gguf(&source, &ckpt, &bad, GgufWeightType::F16, &path).unwrap_err();
    assert!(e.to_string().contains("not in the model"), "{e}");
    assert!(!path.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--backbone gguf` that cannot be written is refused before any tensor is computed.
#[test]
fn gguf_output_is_refused_before_the_work() {
    let dir = scratch("gguf-out-refused");
    let src = dir.join("tiny.gguf");
    std::fs::write(&src, tiny_gguf(GgmlType::F32)).unwrap();
    let cases = [
        (src.clone(), QuantConfig::nf4(), "nf4-b64 is not one"),
        // An HF directory without a vocabulary to convert.
        (
            fixture("tiny-llama"),
            QuantConfig::ggml(GgmlFormat::Q4_0),
            "tokenizer.json",
        ),
    ];
    for (model, quant, want) in cases {
        let mut spec = loftq_models::init::InitSpec::new(model, dir.join("out"), 4, 1);
        spec.quant = quant;
        spec.backbone = loftq_models::init::Backbone::Gguf;
        let err = refused_before_work(&spec);
        assert!(err.contains(want), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An HF directory of tiny-llama's weights with the vocabulary of llama.cpp's file `name`
/// (`fixtures/vocab`) as its `tokenizer.json`; returns it and that file.
fn hf_with_vocabulary(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, Gguf) {
    let vocab = Gguf::open(&vocab_gguf(name, dir)).unwrap();
    let hf = dir.join(format!("{name}-hf"));
    std::fs::create_dir_all(&hf).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-llama").join(f), hf.join(f)).unwrap();
    }
    let tok = loftq_models::io::vocabulary_json(&vocab).unwrap();
    std::fs::write(hf.join("tokenizer.json"), tok.to_string()).unwrap();
    (hf, vocab)
}

/// `loftq convert DIR out.gguf`: the vocabulary entries equal llama.cpp's own files for GPT-2's,
/// Llama 3's and Qwen2's byte-level BPE; the GGUF tokenizes and computes as the directory.
#[test]
fn hf_directory_converts_to_gguf() {
    use loftq_models::io::write_gguf_from_hf;
    use loftq_models::tokenizer::Tokenizer;
    let dir = scratch("hf-to-gguf");
    for name in ["gpt-2", "llama-bpe", "qwen2"] {
        let (hf, vocab) = hf_with_vocabulary(&dir, name);
        let out = dir.join(format!("{name}-out.gguf"));
        write_gguf_from_hf(&hf, &out).unwrap();
        let g = Gguf::open(&out).unwrap();
        for key in [
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges",
        ] {
            assert!(g.meta(key) == vocab.meta(key), "{name}: {key}");
        }
        let text = "Hello world, 12345 tokens — naïve 日本語\n\n  end";
        let (a, b) = (
            Tokenizer::from_file(&hf.join("tokenizer.json")).unwrap(),
            Tokenizer::for_model(&out).unwrap(),
        );
        assert_eq!(a.encode(text).unwrap(), b.encode(text).unwrap(), "{name}");
        let tokens: Vec<i32> = (0..12).map(|i| i * 37 % 256).collect();
        let (m1, m2) = (
            load_pretrained(&hf, None, &device()).unwrap(),
            load_pretrained(&out, None, &device()).unwrap(),
        );
        let (l1, l2) = (
            logits(&m1, ids(tokens.clone(), 1, 12)),
            logits(&m2, ids(tokens, 1, 12)),
        );
        assert!(max_abs_diff(&l1, &l2) < 1e-5, "{name}: logits");
    }
    // A SentencePiece vocabulary is refused by name, and nothing is written.
    let (hf, _) = hf_with_vocabulary(&dir, "llama-spm");
    let out = dir.join("spm.gguf");
    let err = write_gguf_from_hf(&hf, &out).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("byte-level"),
        "{err}"
    );
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `init --backbone gguf` from an HF directory: the source is converted first (then removed),
/// and the base GGUF computes as the packed output.
#[test]
fn gguf_output_from_an_hf_directory() {
    let dir = scratch("gguf-from-hf-init");
    let (hf, _) = hf_with_vocabulary(&dir, "gpt-2");
    let out = dir.join("out");
    let mut spec = loftq_models::init::InitSpec::new(hf, out.clone(), 4, 2);
    spec.quant = QuantConfig::ggml(GgmlFormat::Q4_0);
    spec.backbone = loftq_models::init::Backbone::Gguf;
    run_init_here(&spec, false).unwrap();
    assert!(!out.join(".loftq-source.gguf").exists());
    let base = Gguf::open(&out.join("model.gguf")).unwrap();
    assert_eq!(base.tensors["blk.0.attn_q.weight"].ty.name(), "Q4_0");
    let tokens: Vec<i32> = (0..12).map(|i| i * 37 % 256).collect();
    let packed = load_pretrained(&out, None, &device()).unwrap();
    let gguf = load_pretrained(&out.join("model.gguf"), None, &device()).unwrap();
    let (a, b) = (
        logits(&packed, ids(tokens.clone(), 1, 12)),
        logits(&gguf, ids(tokens, 1, 12)),
    );
    assert!(max_abs_diff(&a, &b) < 1e-5, "{}", max_abs_diff(&a, &b));
    assert!(out.join("adapter.gguf").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}
