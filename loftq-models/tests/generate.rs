//! Incremental decoding and generation: the KV cache gives the logits of the full forward
//! pass, and generated tokens are what the full pass would choose.

mod common;

use common::*;
use loftq_core::QuantConfig;
use loftq_core::quant::host_f32;
use loftq_models::LlamaConfig;
use loftq_models::generate::{GenerateParams, SamplingParams, generate};
use loftq_models::io::{Adapter, Checkpoint};
use loftq_models::nn::{KvCache, Llama, LoadOptions, load_model, load_pretrained};

const IDS: [i32; 12] = [3, 17, 42, 5, 9, 60, 11, 2, 33, 48, 7, 21];

/// Feeds `IDS` in pieces of `steps` tokens and compares each piece's last logits with the
/// full pass's logits at that position.
fn check_cached(model: &Llama, steps: &[usize]) {
    let vocab = model.config.vocab_size;
    let full = logits(model, ids(IDS.to_vec(), 1, IDS.len()));
    let mut cache = KvCache::new();
    let mut at = 0;
    for &n in steps {
        let piece = IDS[at..at + n].to_vec();
        let got = host_f32(&model.forward_cached(ids(piece, 1, n), &mut cache));
        at += n;
        let want = &full[(at - 1) * vocab..at * vocab];
        let d = max_abs_diff(&got, want);
        assert!(d < 1e-4, "position {}: max difference {d}", at - 1);
        assert_eq!(cache.len(), at);
    }
}

#[test]
fn cached_decoding_gives_the_full_forward_logits() {
    let model = load_pretrained(&fixture("tiny-llama"), None, &device()).unwrap();
    check_cached(&model, &[4, 3, 1, 1, 1, 1, 1]);
    check_cached(&model, &[12]);
}

#[test]
fn cached_decoding_keeps_the_sliding_window_and_grouped_heads() {
    // Window 5, two query heads per key/value head; prefills longer than the window too.
    let model = load_pretrained(&fixture("tiny-mistral-sliding"), None, &device()).unwrap();
    assert_eq!(model.config.sliding_window.map(|w| w.size), Some(5));
    check_cached(&model, &[7, 1, 1, 1, 2]);
    check_cached(&model, &[1; 12]);
}

#[test]
fn cached_decoding_with_a_packed_base_and_adapter() {
    // PEFT's LoftQ start: NF2 codes held packed, rank-8 adapters on every layer.
    let dir = fixture("tiny-llama-loftq-2bit");
    let config = LlamaConfig::from_file(&fixture("tiny-llama/config.json")).unwrap();
    let ckpt = Checkpoint::open(&dir.join("backbone_Q.safetensors")).unwrap();
    let adapter = Adapter::read(&dir.join("adapter")).unwrap();
    let opts = LoadOptions {
        quantize: Some(QuantConfig::nf(2)),
        adapter: Some(&adapter),
    };
    let model = load_model(&config, &ckpt, &device(), &opts).unwrap();
    check_cached(&model, &[5, 1, 1, 2, 3]);
}

/// Greedy generation picks, at every step, the argmax of the full pass over the prompt and
/// the tokens so far; the same seed gives the same sampled text.
#[test]
fn generated_tokens_are_the_full_pass_choices() {
    let model = load_pretrained(&fixture("tiny-llama"), None, &device()).unwrap();
    let vocab = model.config.vocab_size;
    let prompt: Vec<u32> = IDS[..5].iter().map(|&i| i as u32).collect();
    let params = GenerateParams {
        max_new_tokens: 10,
        ..GenerateParams::default()
    };
    let mut streamed = Vec::new();
    let g = generate(&model, &prompt, &params, &mut |t| streamed.push(t)).unwrap();
    assert_eq!(g.ids.len(), 10);
    assert_eq!(streamed, g.ids);
    let all: Vec<i32> = prompt.iter().chain(&g.ids).map(|&i| i as i32).collect();
    let n = all.len();
    let full = logits(&model, ids(all.clone(), 1, n));
    for (k, &t) in g.ids.iter().enumerate() {
        let pos = prompt.len() - 1 + k;
        let row = &full[pos * vocab..(pos + 1) * vocab];
        let best = row
            .iter()
            .enumerate()
            .fold(0, |b, (i, &x)| if x > row[b] { i } else { b });
        assert_eq!(t as usize, best, "token {k}");
    }

    // A stop token ends the text and is not part of it.
    let stop = GenerateParams {
        stop: vec![g.ids[3]],
        ..params.clone()
    };
    let s = generate(&model, &prompt, &stop, &mut |_| {}).unwrap();
    assert!(s.stopped);
    let first = g.ids.iter().position(|&t| t == g.ids[3]).unwrap();
    assert_eq!(s.ids, g.ids[..first]);

    let sampled = |seed| {
        let p = GenerateParams {
            sampling: SamplingParams {
                temperature: 1.5,
                top_k: Some(40),
                top_p: Some(0.95),
                seed,
            },
            ..params.clone()
        };
        generate(&model, &prompt, &p, &mut |_| {}).unwrap().ids
    };
    assert_eq!(sampled(1), sampled(1));
    assert_ne!(sampled(1), sampled(2));
}

#[test]
fn generation_refuses_an_empty_or_overlong_prompt() {
    let model = load_pretrained(&fixture("tiny-llama"), None, &device()).unwrap();
    let params = GenerateParams {
        max_new_tokens: 4,
        ..GenerateParams::default()
    };
    let e = generate(&model, &[], &params, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("no token"), "{e}");
    let long = vec![1u32; model.config.max_position_embeddings];
    let e = generate(&model, &long, &params, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("context"), "{e}");
    // Generation stops at the end of the context.
    let near = vec![1u32; model.config.max_position_embeddings - 3];
    let g = generate(&model, &near, &params, &mut |_| {}).unwrap();
    assert_eq!(g.ids.len(), 3, "prompt and new tokens fill the context");
}
