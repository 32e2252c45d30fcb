//! The model against transformers and PEFT: logits of the tiny Llama fixtures; packed weights
//! against the host's dequantization.

mod common;

use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use common::{device, fixture, max_abs_diff};
use loftq_core::QuantConfig;
use loftq_models::io::{Adapter, Checkpoint};
use loftq_models::nn::{BaseWeight, LoadOptions, load_model, load_pretrained};
use loftq_models::{LlamaConfig, nn::Llama};

/// `input_ids` and the named logits of a fixture file.
fn reference(file: &Path, key: &str) -> (Tensor<2, Int>, Vec<f32>) {
    reference_of(file, "input_ids", key)
}

/// The inputs `ids_key` and the logits `key` of a fixture file.
fn reference_of(file: &Path, ids_key: &str, key: &str) -> (Tensor<2, Int>, Vec<f32>) {
    let ck = Checkpoint::open(file).unwrap();
    let (shape, ids) = ck.i64(ids_key).unwrap();
    let ids: Vec<i32> = ids.into_iter().map(|x| x as i32).collect();
    let ids = Tensor::from_data(TensorData::new(ids, [shape[0], shape[1]]), &device());
    (ids, ck.f32(key).unwrap().data)
}

fn logits(model: &Llama, ids: Tensor<2, Int>) -> Vec<f32> {
    common::logits(model, ids)
}

#[test]
fn tiny_llama_matches_transformers() {
    let dir = fixture("tiny-llama");
    let model = load_pretrained(&dir, None, &device()).unwrap();
    let (ids, want) = reference(&dir.join("logits.safetensors"), "logits");
    let got = logits(&model, ids);
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "max |Δlogit| = {diff}");
}

/// Sliding-window attention shorter than the input (Mistral on every layer, Qwen2 from its
/// `max_window_layers` on), against transformers; the same weights with full attention give
/// other logits, so the window is what the test checks.
#[test]
fn sliding_windows_match_transformers() {
    for (name, window) in [("tiny-mistral-sliding", 5), ("tiny-qwen2-sliding", 3)] {
        let dir = fixture(name);
        let mut model = load_pretrained(&dir, None, &device()).unwrap();
        let windows: Vec<_> = model.layers.iter().map(|l| l.self_attn.window).collect();
        let first = usize::from(name.contains("qwen2"));
        assert_eq!(windows[first..], vec![Some(window); 2 - first], "{name}");
        let (ids, want) = reference(&dir.join("logits.safetensors"), "logits");
        let diff = max_abs_diff(&logits(&model, ids.clone()), &want);
        assert!(diff < 1e-4, "{name}: max |Δlogit| = {diff}");
        for l in &mut model.layers {
            l.self_attn.window = None;
        }
        let full = max_abs_diff(&logits(&model, ids), &want);
        assert!(full > 1e-2, "{name}: full attention is as close ({full})");
    }
}

/// The fixture `name` against transformers' logits, and with its PEFT adapter (on `adapted`
/// linear layers, changing the logits) against PEFT's: both within 1e-4. Gives the model
/// without the adapter, the input ids and its logits.
fn matches_transformers_and_peft(name: &str, adapted: usize) -> (Llama, Tensor<2, Int>, Vec<f32>) {
    let dir = fixture(name);
    let refs = dir.join("logits.safetensors");
    let (ids, want) = reference(&refs, "logits");
    let (_, want_lora) = reference(&refs, "logits_lora");
    assert!(
        max_abs_diff(&want, &want_lora) > 1e-2,
        "{name}: the adapter changes nothing"
    );
    let with = load_pretrained(&dir, Some(&dir.join("adapter")), &device()).unwrap();
    let n = with
        .linears()
        .iter()
        .filter(|(_, l)| l.lora.is_some())
        .count();
    assert_eq!(n, adapted, "{name}");
    let diff = max_abs_diff(&logits(&with, ids.clone()), &want_lora);
    assert!(
        diff < 1e-4,
        "{name} with the adapter: max |Δlogit| = {diff}"
    );
    let model = load_pretrained(&dir, None, &device()).unwrap();
    let got = logits(&model, ids.clone());
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "{name}: max |Δlogit| = {diff}");
    (model, ids, got)
}

/// Phi-3 (q/k/v fused in `qkv_proj`, gate/up in `gate_up_proj`, a sliding window of 5) against
/// transformers, and with a PEFT adapter on the fused layers against PEFT.
#[test]
fn phi3_matches_transformers_and_peft() {
    let (model, _, _) = matches_transformers_and_peft("tiny-phi3", 8);
    let layout = |l: &loftq_models::nn::DecoderLayer| (l.linear_paths().len(), l.self_attn.window);
    assert!(model.layers.iter().all(|l| layout(l) == (4, Some(5))));
}

/// Phi-2 (LayerNorms with biases, attention and MLP in parallel, rotary embeddings on 4 of 10
/// dimensions per head, biases on every linear layer and the head, `gelu_new`) against
/// transformers, with a PEFT adapter on its six linear layers against PEFT, and decoded a few
/// tokens at a time through the KV cache.
#[test]
fn phi2_matches_transformers_and_peft() {
    use loftq_models::nn::KvCache;
    let (model, ids, got) = matches_transformers_and_peft("tiny-phi2", 12);
    assert_eq!(model.config.rotary_dim(), 4);
    let parallel = |l: &loftq_models::nn::DecoderLayer| l.post_attention_layernorm.is_none();
    assert!(model.layers.iter().all(parallel));
    // Positions 0..7, then 7..11, then 11..16 through the cache: the last logits of each row.
    let (b, s) = (2, 16);
    let vocab = model.config.vocab_size;
    let mut cache = KvCache::new();
    let mut last = Vec::new();
    for (start, end) in [(0, 7), (7, 11), (11, s)] {
        let piece = ids.clone().narrow(1, start, end - start);
        last = model
            .forward_cached(piece, &mut cache)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
    }
    let want_last: Vec<f32> = (0..b)
        .flat_map(|r| got[(r * s + s - 1) * vocab..(r * s + s) * vocab].to_vec())
        .collect();
    let diff = max_abs_diff(&last, &want_last);
    assert!(diff < 1e-4, "cached: max |Δlogit| = {diff}");
}

/// LongRoPE (the scaling of Phi-3's long-context variants) against transformers: 16 positions
/// take the short factors, 48 (past the original 32) the long ones; plain RoPE gives other
/// logits in both cases.
#[test]
fn phi3_longrope_matches_transformers() {
    let dir = fixture("tiny-phi3-longrope");
    let refs = dir.join("logits.safetensors");
    let mut model = load_pretrained(&dir, None, &device()).unwrap();
    let cases = [
        ("input_ids", "logits_short"),
        ("input_ids_long", "logits_long"),
    ];
    for (ids_key, key) in cases {
        let (ids, want) = reference_of(&refs, ids_key, key);
        let diff = max_abs_diff(&logits(&model, ids), &want);
        assert!(diff < 1e-4, "{key}: max |Δlogit| = {diff}");
    }
    model.config.rope.scaling = loftq_models::config::RopeScaling::None;
    for (ids_key, key) in cases {
        let (ids, want) = reference_of(&refs, ids_key, key);
        let plain = max_abs_diff(&logits(&model, ids), &want);
        assert!(plain > 1e-3, "{key}: plain RoPE is as close ({plain})");
    }
}

/// PEFT's LoftQ backbone (dequantized Q) and adapter: with and without the adapter, and with
/// the backbone re-quantized and held packed (lossless: Q already lies on the grid).
fn peft_loftq(name: &str, bits: u8) {
    let dir = fixture(name);
    let config = LlamaConfig::from_file(&fixture("tiny-llama/config.json")).unwrap();
    let ckpt = Checkpoint::open(&dir.join("backbone_Q.safetensors")).unwrap();
    let adapter = Adapter::read(&dir.join("adapter")).unwrap();
    assert_eq!(adapter.modules.len(), 14);
    let refs = dir.join("logits.safetensors");
    let (ids, want_lora) = reference(&refs, "logits_lora");
    let (_, want_q) = reference(&refs, "logits_q_only");
    for quantize in [None, Some(QuantConfig::nf(bits))] {
        let opts = LoadOptions {
            quantize,
            adapter: Some(&adapter),
        };
        let mut model = load_model(&config, &ckpt, &device(), &opts).unwrap();
        let packed = model
            .linears()
            .iter()
            .filter(|(_, l)| matches!(l.base, BaseWeight::Packed(_)))
            .count();
        assert_eq!(packed, if quantize.is_some() { 14 } else { 0 });
        let d_lora = max_abs_diff(&logits(&model, ids.clone()), &want_lora);
        model.set_adapters_enabled(false);
        let d_q = max_abs_diff(&logits(&model, ids.clone()), &want_q);
        assert!(
            d_lora < 1e-4,
            "{name} {quantize:?}: max |Δ logits_lora| = {d_lora}"
        );
        assert!(
            d_q < 1e-4,
            "{name} {quantize:?}: max |Δ logits_q_only| = {d_q}"
        );
    }
}

#[test]
fn peft_loftq_4bit_matches_peft() {
    peft_loftq("tiny-llama-loftq-4bit", 4);
}

#[test]
fn peft_loftq_2bit_matches_peft() {
    peft_loftq("tiny-llama-loftq-2bit", 2);
}

#[test]
fn packed_bases_dequantize_exactly_to_peft_q() {
    // Packed NF2 codes of PEFT's Q give back Q bit for bit on this device.
    let dir = fixture("tiny-llama-loftq-2bit");
    let config = LlamaConfig::from_file(&fixture("tiny-llama/config.json")).unwrap();
    let ckpt = Checkpoint::open(&dir.join("backbone_Q.safetensors")).unwrap();
    let opts = LoadOptions {
        quantize: Some(QuantConfig::nf(2)),
        adapter: None,
    };
    let model = load_model(&config, &ckpt, &device(), &opts).unwrap();
    for (path, lin) in model.linears() {
        if path == "lm_head" {
            continue;
        }
        let want = ckpt.f32(&format!("{path}.weight")).unwrap().data;
        let got = lin
            .base
            .dense()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(got, want, "{path}");
    }
}

/// The calibration pass's observing forwards (with and without the output) and its
/// group-by-group steps see the same inputs, and give the layer's output; in parallel (Phi-2)
/// the MLP's group sees the attention's input.
#[test]
fn observing_a_layer_sees_what_its_forward_computes() {
    for name in ["tiny-llama", "tiny-phi2"] {
        observe_layer(name);
    }
}

fn observe_layer(name: &str) {
    use loftq_models::nn::{RopeTables, load_layer};
    let dir = fixture(name);
    let config = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(&dir.join("model.safetensors")).unwrap();
    let layer = load_layer(&config, &ckpt, 1, &device(), &Default::default()).unwrap();
    let (b, s, h) = (2, 5, config.hidden_size);
    let rope = RopeTables::new(&config.rope, config.rotary_dim(), s, &device());
    let x: Vec<f32> = (0..b * s * h)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
        .collect();
    let x = Tensor::<3>::from_data(TensorData::new(x, [b, s, h]), &device());
    let values = |t: Tensor<3>| t.into_data().try_to_vec::<f32>().unwrap();
    let mut full = Vec::new();
    let y = layer.forward_observed(x.clone(), &rope, &mut |g, t| {
        full.push((g, t.into_data().try_to_vec::<f32>().unwrap()));
    });
    let mut only = Vec::new();
    layer.observe_inputs(x.clone(), &rope, &mut |g, t| {
        only.push((g, t.into_data().try_to_vec::<f32>().unwrap()));
    });
    assert_eq!(full.iter().map(|o| o.0).collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert_eq!(full, only);
    // The steps of the true-sequential pass, one group at a time.
    let xn = layer.attention_input(x.clone());
    let att = layer.attention_heads(xn.clone(), &rope);
    let after = layer.after_attention(x.clone(), att.clone());
    let hn = layer.mlp_input(after.clone(), xn.clone());
    let act = layer.mlp.activation(hn.clone());
    let steps = layer.after_mlp(after, act.clone());
    for (g, t) in [xn, att, hn, act].into_iter().enumerate() {
        assert_eq!(full[g].1, values(t), "{name}: group {g}'s input");
    }
    if config.family.parallel() {
        assert_eq!(
            full[0].1, full[2].1,
            "{name}: the MLP reads the attention's input"
        );
    }
    let plain = values(layer.forward(x, &rope));
    let (y, steps) = (values(y), values(steps));
    assert!(max_abs_diff(&y, &plain) < 1e-6);
    assert_eq!(
        y, steps,
        "{name}: the steps give the observed forward's output"
    );
}

/// PEFT's LoftQ start merged into one dense checkpoint (`W + s·B·A`) gives PEFT's logits with
/// the adapter (made by transformers + PEFT); in bf16 within bf16's rounding.
#[test]
fn merged_adapter_matches_peft() {
    use loftq_models::io::write_merged;
    let dir = common::scratch("merge");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let src = fixture("tiny-llama-loftq-4bit");
    std::fs::copy(
        src.join("backbone_Q.safetensors"),
        model.join("model.safetensors"),
    )
    .unwrap();
    std::fs::copy(fixture("tiny-llama/config.json"), model.join("config.json")).unwrap();
    let adapter = Adapter::read(&src.join("adapter")).unwrap();
    let (ids, want) = reference(&src.join("logits.safetensors"), "logits_lora");
    for (dtype, tol) in [
        (safetensors::Dtype::F32, 1e-4),
        (safetensors::Dtype::BF16, 0.05),
    ] {
        let out = dir.join(format!("merged-{dtype}"));
        write_merged(&model, &adapter, dtype, &out).unwrap();
        let merged = load_pretrained(&out, None, &device()).unwrap();
        let d = max_abs_diff(&logits(&merged, ids.clone()), &want);
        assert!(d < tol, "{dtype}: max |Δ logits| = {d}");
    }
    // An adapter whose module the model lacks is refused before anything is written.
    let mut bad = adapter.clone();
    let w = bad.modules.values().next().unwrap().clone();
    bad.modules.insert("model.layers.9.mlp.up_proj".into(), w);
    let err = write_merged(&model, &bad, safetensors::Dtype::F32, &dir.join("bad"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layers.9") && !dir.join("bad").exists(),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An adapter module that is not one of the model's linear layers, or a tensor saved whole that
/// no layer reads, is refused by name; a layer norm saved whole is read in place of the
/// checkpoint's.
#[test]
fn adapter_parts_the_model_lacks_are_refused() {
    use loftq_models::io::HostTensor;
    let dir = fixture("tiny-llama");
    let config = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(&dir.join("model.safetensors")).unwrap();
    let adapter = Adapter::read(&fixture("tiny-llama-loftq-4bit/adapter")).unwrap();
    let load = |adapter: &Adapter| {
        let opts = LoadOptions {
            quantize: None,
            adapter: Some(adapter),
        };
        load_model(&config, &ckpt, &device(), &opts)
    };
    let mut bogus = adapter.clone();
    let w = bogus
        .modules
        .remove("model.layers.0.self_attn.q_proj")
        .unwrap();
    bogus
        .modules
        .insert("model.layers.0.self_attn.bogus".into(), w);
    let err = load(&bogus).unwrap_err().to_string();
    assert!(err.contains("`model.layers.0.self_attn.bogus`"), "{err}");

    let h = config.hidden_size;
    let norm = HostTensor {
        shape: vec![h],
        data: vec![0.5; h],
    };
    let mut saved = adapter.clone();
    saved
        .saved
        .insert("model.layers.1.bogus.weight".into(), norm.clone());
    let err = load(&saved).unwrap_err().to_string();
    assert!(err.contains("`model.layers.1.bogus.weight` whole"), "{err}");
    let mut saved = adapter.clone();
    let name = "model.layers.1.input_layernorm.weight";
    saved.saved.insert(name.into(), norm);
    let model = load(&saved).unwrap();
    let got = model.layers[1].input_layernorm.weight.clone().into_data();
    assert_eq!(got.try_to_vec::<f32>().unwrap(), vec![0.5; h]);
}
/// A LoftQ organisation release, laid out as on the Hub: the bf16 backbone holding PEFT's `Q`,
/// and the adapter pickled (`adapter_model.bin`) in `loftq_init/`. The release directory alone
/// names both, as PEFT's `subfolder="loftq_init"` does.
#[test]
fn loftq_release_matches_peft() {
    let dir = fixture("tiny-llama-loftq-release");
    let refs = dir.join("logits.safetensors");
    let (ids, want_lora) = reference(&refs, "logits_lora");
    let (_, want_q) = reference(&refs, "logits_q");
    let adapter = Adapter::read(&dir).unwrap();
    let safetensors = Adapter::read(&fixture("tiny-llama-loftq-4bit/adapter")).unwrap();
    assert_eq!(adapter.modules, safetensors.modules);
    let mut model = load_pretrained(&dir, Some(&dir), &device()).unwrap();
    let d_lora = max_abs_diff(&logits(&model, ids.clone()), &want_lora);
    model.set_adapters_enabled(false);
    let d_q = max_abs_diff(&logits(&model, ids), &want_q);
    assert!(
        d_lora < 1e-4 && d_q < 1e-4,
        "max |Δ logits| {d_lora}, {d_q}"
    );

    // NF4 on load, as bitsandbytes does to a release: every code of PEFT's Q comes back (a
    // wrong one is a grid step, ≥ 5% of the block's scale, off); the scales carry bf16's
    // rounding.
    let config = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(&dir.join("model.safetensors")).unwrap();
    let opts = LoadOptions {
        quantize: Some(QuantConfig::nf(4)),
        adapter: None,
    };
    let model = load_model(&config, &ckpt, &device(), &opts).unwrap();
    let q = Checkpoint::open(&fixture("tiny-llama-loftq-4bit/backbone_Q.safetensors")).unwrap();
    for (path, lin) in model.linears() {
        if path == "lm_head" {
            continue;
        }
        let want = q.f32(&format!("{path}.weight")).unwrap().data;
        let got = lin.base.dense().into_data().try_to_vec::<f32>().unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= w.abs() / 128.0 + 1e-7,
                "{path}: {g} against {w}"
            );
        }
    }
}

/// A packed weight dequantized on the device under test (on a GPU back end, codebooks in one
/// CubeCL kernel) holds exactly the host's values: every codebook width, a uniform codebook,
/// an integer format (Burn's ops), double quantization, and a last block cut short.
#[test]
fn packed_weights_dequantize_on_the_device_as_on_the_host() {
    use loftq_core::quant::{BlockSize, PackedTensor, Scheme};
    use loftq_core::{Quantizer, lowrank::Gaussian};
    let mut configs: Vec<QuantConfig> = (1..=8).map(QuantConfig::nf).collect();
    configs.extend([
        QuantConfig::new(Scheme::UniformCodebook { bits: 3 }),
        QuantConfig::int(4, true),
        QuantConfig::nf(3).with_double_quant(true),
        QuantConfig::nf4().with_block_size(BlockSize::Elements(32)),
    ]);
    let mut rng = Gaussian::new(7);
    for (shape, config) in [[48, 64], [7, 37]]
        .into_iter()
        .flat_map(|s| configs.iter().map(move |c| (s, *c)))
    {
        let w: Vec<f32> = (0..shape[0] * shape[1])
            .map(|_| rng.normal() as f32)
            .collect();
        let q = Quantizer::new(config)
            .unwrap()
            .quantize_host(&w, shape)
            .unwrap();
        let packed = PackedTensor::pack(&q, config);
        let want = packed.dequantize().unwrap();
        let weight = loftq_models::nn::PackedWeight::new(packed, &device()).unwrap();
        let got = loftq_core::quant::host_f32(&weight.dequantize());
        assert_eq!(got, want, "{} {shape:?}", config.label());
    }
}
