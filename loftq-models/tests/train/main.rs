//! Training: the checkpointed gradients against plain autodiff and finite differences, the
//! loop lowering the loss, exact resume, and data parallelism over two devices; distillation
//! ([`distill`]) and block-wise distillation ([`blockwise`]); the GPU's fused SiLU ([`fused`]).

mod blockwise;
mod classify;
#[path = "../common/mod.rs"]
mod common;
mod distill;
mod fused;
mod fused_packed;

use burn::module::Param;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use common::{device, fixture, scratch};
use loftq_core::{DeviceSpec, QuantConfig};
use loftq_models::LlamaConfig;
use loftq_models::eval::perplexity_windows;
use loftq_models::io::{Adapter, AdapterConfig, Checkpoint};
use loftq_models::nn::{LayerReader, LayerSource, Llama, LoadOptions, load_model};
use loftq_models::train::{
    AdamWConfig, BLOCKWISE_CHECKPOINT, Batch, BlockwiseConfig, BlockwiseEvent, Decay, DistillLoss,
    Fitted, Objective, Recompute, Sampling, Schedule, TrainConfig, TrainEvent, TrainJob,
    Validation, distill_blockwise, distill_loss_and_grads, distill_on, fit_layers, loss_and_grads,
    teacher_outputs, train, train_on,
};

/// The tiny model with PEFT's 4-bit LoftQ adapter, its base re-quantized and held packed.
fn tiny_loftq() -> Llama {
    let config = LlamaConfig::from_file(&fixture("tiny-llama/config.json")).unwrap();
    let dir = fixture("tiny-llama-loftq-4bit");
    let ckpt = Checkpoint::open(&dir.join("backbone_Q.safetensors")).unwrap();
    let adapter = Adapter::read(&dir.join("adapter")).unwrap();
    let opts = LoadOptions {
        quantize: Some(QuantConfig::nf(4)),
        adapter: Some(&adapter),
    };
    load_model(&config, &ckpt, &device(), &opts).unwrap()
}

fn batch(seed: u32) -> Batch {
    let (b, s) = (2usize, 12usize);
    let ids = (0..(b * s) as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97) >> 7) % 256)
        .collect();
    Batch {
        ids,
        batch: b,
        seq: s,
    }
}

/// The same loss with every LoRA factor tracked and one ordinary backward pass.
fn plain_loss_and_grads(model: &Llama, batch: &Batch) -> (f64, Vec<Vec<f32>>) {
    let mut m = model.clone();
    let mut params = Vec::new();
    for lin in m.layers.iter_mut().flat_map(|l| l.linears_mut()) {
        if let Some(lora) = &mut lin.lora {
            lora.a = Param::from_tensor(lora.a.val().autodiff().require_grad());
            lora.b = Param::from_tensor(lora.b.val().autodiff().require_grad());
            params.push(lora.a.val());
            params.push(lora.b.val());
        }
    }
    let (b, s) = (batch.batch, batch.seq);
    let ids: Vec<i32> = batch.ids.iter().map(|&i| i as i32).collect();
    let ids: Tensor<2, Int> = Tensor::from_data(TensorData::new(ids, [b, s]), &device());
    let logits = m.forward(ids);
    let vocab = logits.dims()[2];
    let targets: Vec<i32> = (0..b)
        .flat_map(|r| batch.ids[r * s + 1..(r + 1) * s].iter().map(|&i| i as i32))
        .collect();
    let targets: Tensor<2, Int> =
        Tensor::from_data(TensorData::new(targets, [b * (s - 1), 1]), &device());
    let logp = log_softmax(logits.narrow(1, 0, s - 1).reshape([b * (s - 1), vocab]), 1);
    let loss = logp.gather(1, targets).mean().neg();
    let value = f64::from(loss.clone().into_scalar::<f32>());
    let grads = loss.backward();
    let g = params
        .iter()
        .map(|p| host(&p.grad(&grads).expect("tracked")))
        .collect();
    (value, g)
}

fn host(t: &Tensor<2>) -> Vec<f32> {
    t.to_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

#[test]
fn checkpointed_gradients_match_plain_autodiff() {
    let model = tiny_loftq();
    let batch = batch(1);
    let (loss, want) = plain_loss_and_grads(&model, &batch);
    assert_eq!(want.len(), 28);
    // The base dequantized once (`loftq train --dense-base`): the same loss and gradients.
    let mut dense = model.clone();
    assert_eq!(dense.dequantize_bases(), 14);
    for mode in [Recompute::Layers, Recompute::None] {
        check_grads(&model, &batch, mode, loss, &want);
        check_grads(&dense, &batch, mode, loss, &want);
    }
}

/// Phi-2 (LayerNorms, parallel blocks, partial rotary embeddings in the host attention's
/// backward, `gelu_new`, a biased head) with PEFT's adapter on an NF4 base: the same.
#[test]
fn phi2_gradients_match_plain_autodiff() {
    let dir = fixture("tiny-phi2");
    let adapter = Adapter::read(&dir.join("adapter")).unwrap();
    let opts = LoadOptions {
        quantize: Some(QuantConfig::nf(4)),
        adapter: Some(&adapter),
    };
    let model = loftq_models::nn::load_pretrained_with(&dir, &device(), &opts).unwrap();
    let batch = batch(3);
    let (loss, want) = plain_loss_and_grads(&model, &batch);
    assert_eq!(want.len(), 24);
    for mode in [Recompute::Layers, Recompute::None] {
        check_grads(&model, &batch, mode, loss, &want);
    }
}

/// A training step's reads from the device: one (the loss, read once the backward pass is
/// issued, so the device is not drained between the two passes) whatever the depth, and one
/// more for the gradients' global norm.
#[test]
fn a_training_step_reads_the_device_twice_whatever_the_depth() {
    use loftq_core::transfers::transfers;
    use loftq_models::train::grad_norm;
    let model = tiny_loftq();
    let mut shallow = model.clone();
    shallow.layers.truncate(1);
    for mode in [Recompute::Layers, Recompute::None] {
        for m in [&model, &shallow] {
            let before = transfers();
            let step = loss_and_grads(m, &batch(2), mode);
            let norm = grad_norm(&step.grads);
            let reads = (transfers() - before).reads;
            assert!(step.loss.is_finite() && norm > 0.0);
            assert_eq!(reads, 2, "{mode:?}, {} layers", m.layers.len());
        }
    }
}

fn check_grads(model: &Llama, batch: &Batch, mode: Recompute, loss: f64, want: &[Vec<f32>]) {
    let got = loss_and_grads(model, batch, mode);
    assert!(
        (got.loss - loss).abs() < 1e-5,
        "loss {} vs {loss}",
        got.loss
    );
    assert_eq!(got.tokens, 22);
    assert_eq!(got.grads.len(), want.len());
    for (i, (g, w)) in got.grads.iter().zip(want).enumerate() {
        let g = host(g);
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0, "factor {i} has a zero gradient");
        let d = common::max_abs_diff(&g, w);
        assert!(
            d <= 1e-4 * scale.max(1e-3),
            "{mode:?} factor {i}: max |Δ| {d}, scale {scale}"
        );
    }
}

/// `(loss(+h) − loss(−h)) / 2h` with entry `index` of LoRA factor `factor` moved by `±h`,
/// `h = 1e-2`.
fn central_difference(
    model: &Llama,
    factor: usize,
    index: usize,
    loss: impl Fn(&Llama) -> f64,
) -> f64 {
    let loss_at = |delta: f32| {
        let mut m = model.clone();
        let mut params = m.lora_params();
        let mut v = host(&params[factor]);
        v[index] += delta;
        let dims = params[factor].dims();
        params[factor] = Tensor::from_data(TensorData::new(v, dims), &device());
        m.set_lora_params(params);
        loss(&m)
    };
    let h = 1e-2;
    (loss_at(h) - loss_at(-h)) / (2.0 * f64::from(h))
}

#[test]
fn gradients_match_finite_differences() {
    let model = tiny_loftq();
    let batch = batch(2);
    let got = loss_and_grads(&model, &batch, Recompute::Layers);
    // A few entries of the first layer's q_proj B (factor 1) and down_proj A (factor 12).
    for (factor, index) in [(1usize, 3usize), (1, 40), (12, 7), (12, 300)] {
        let g = host(&got.grads[factor])[index];
        let fd = central_difference(&model, factor, index, |m| {
            loss_and_grads(m, &batch, Recompute::Layers).loss
        });
        let tol = 2e-3 + 0.03 * fd.abs();
        assert!(
            (f64::from(g) - fd).abs() < tol,
            "factor {factor}[{index}]: autodiff {g} vs finite difference {fd}"
        );
    }
}

fn config(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch: 2,
        seq: 16,
        accum: 2,
        schedule: Schedule {
            lr: 3e-2,
            warmup: 2,
            decay: Decay::Cosine,
            total: steps,
        },
        adamw: AdamWConfig::default(),
        max_grad_norm: Some(1.0),
        sampling: Sampling::Random,
        seed: 3,
        recompute: Recompute::Layers,
        objective: Objective::NextToken,
        eval_every: 0,
        save_every: 3,
        keep_checkpoints: 10,
        resume: false,
    }
}

/// A fresh QLoRA adapter (dropout 0.1) on the tiny model's NF4-quantized weights.
fn tiny_qlora() -> (Llama, AdapterConfig) {
    tiny_qlora_on(&device())
}

fn tiny_qlora_on(device: &burn::tensor::Device) -> (Llama, AdapterConfig) {
    tiny_qlora_bits(4, device)
}

fn tiny_qlora_bits(bits: u8, device: &burn::tensor::Device) -> (Llama, AdapterConfig) {
    let config = LlamaConfig::from_file(&fixture("tiny-llama/config.json")).unwrap();
    let ckpt = Checkpoint::open(&fixture("tiny-llama/model.safetensors")).unwrap();
    let opts = LoadOptions {
        quantize: Some(QuantConfig::nf(bits)),
        adapter: None,
    };
    let mut model = load_model(&config, &ckpt, device, &opts).unwrap();
    assert_eq!(model.add_lora(4, 2.0, 0.1, 0, |_| true), 14);
    let mut cfg = AdapterConfig::new(4, 8.0, vec![]);
    cfg.lora_dropout = 0.1;
    (model, cfg)
}

/// A text the tiny model can learn: a short repeating pattern.
fn stream() -> Vec<u32> {
    (0..2000u32)
        .map(|i| [5, 17, 42, 99, 7, 200, 31][i as usize % 7])
        .collect()
}

#[test]
fn training_lowers_the_loss() {
    let (mut model, cfg) = tiny_qlora();
    let out = scratch("train-loss");
    let history = train(
        &mut model,
        TrainJob::new(&cfg, &stream(), &config(30), &out),
        |_| {},
    )
    .unwrap();
    let first = history.steps[0].loss;
    let last = history.steps.last().unwrap().loss;
    // The tiny model's weights are random and small, so even a perfect adapter moves its
    // logits slowly; half a nat in 30 steps is far beyond noise.
    assert!(last < first - 0.5, "loss {first} → {last}");
    assert!(out.join("adapter/adapter_model.safetensors").is_file());
    let back = Adapter::read(&out.join("adapter")).unwrap();
    assert_eq!(back.modules.len(), 14);
    assert!(out.join("checkpoint-30/optimizer.safetensors").is_file());
}

/// A whole run of the tiny QLoRA model into `out`.
fn fresh_run(cfg: &TrainConfig, out: &std::path::Path) {
    let (mut model, adapter) = tiny_qlora();
    train(
        &mut model,
        TrainJob::new(&adapter, &stream(), cfg, out),
        |_| {},
    )
    .unwrap();
}

#[test]
fn resume_gives_identical_results() {
    let steps = 7;
    let whole = scratch("train-whole");
    fresh_run(&config(steps), &whole);

    // The same run "killed" after the checkpoint of step 3: later outputs removed.
    let cut = scratch("train-cut");
    fresh_run(&config(steps), &cut);
    for p in ["checkpoint-6", "checkpoint-7", "adapter", "history.json"] {
        let p = cut.join(p);
        let _ = std::fs::remove_dir_all(&p);
        let _ = std::fs::remove_file(&p);
    }
    let (mut model, cfg) = tiny_qlora();
    let mut resumed_at = None;
    let resume = TrainConfig {
        resume: true,
        ..config(steps)
    };
    let history = train(
        &mut model,
        TrainJob::new(&cfg, &stream(), &resume, &cut),
        |e| {
            if let TrainEvent::Resumed { step } = e {
                resumed_at = Some(*step);
            }
        },
    )
    .unwrap();
    assert_eq!(resumed_at, Some(3));
    assert_eq!(history.steps.len(), steps);
    let bytes =
        |d: &std::path::Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(bytes(&whole) == bytes(&cut), "resumed adapter differs");

    // Other options are refused.
    let (mut model, cfg) = tiny_qlora();
    let other = TrainConfig { seed: 4, ..resume };
    let err = train(
        &mut model,
        TrainJob::new(&cfg, &stream(), &other, &cut),
        |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("other training settings"), "{err}");
}

/// Two replicas (the device under test, and the CPU) taking the micro-batches of each step in
/// turn give the run of one device: the same losses and the same final adapter.
#[test]
fn data_parallel_equals_one_device() {
    let cfg = TrainConfig {
        accum: 4,
        save_every: 0,
        ..config(5)
    };
    let (mut one, adapter) = tiny_qlora();
    let out = scratch("train-dp1");
    let single = train(
        &mut one,
        TrainJob::new(&adapter, &stream(), &cfg, &out),
        |_| {},
    )
    .unwrap();

    let cpu = burn::tensor::Device::flex();
    let mut models = [tiny_qlora().0, tiny_qlora_on(&cpu).0];
    // The replica starts elsewhere: the main replica's factors must reach it every step.
    let zeros: Vec<_> = models[1]
        .lora_params()
        .iter()
        .map(|t| Tensor::zeros(t.dims(), &cpu))
        .collect();
    models[1].set_lora_params(zeros);
    let out = scratch("train-dp2");
    let parallel = train_on(
        &mut models,
        TrainJob::new(&adapter, &stream(), &cfg, &out),
        |_| {},
    )
    .unwrap();

    // Each replica sums its own micro-batches, so the sums' order differs from one device's;
    // across devices their rounding differs too. AdamW magnifies such differences where the
    // second moment is small.
    let tol = if device() == cpu { 1e-5 } else { 1e-4 };
    for (a, b) in single.steps.iter().zip(&parallel.steps) {
        assert!(
            (a.loss - b.loss).abs() <= tol * a.loss.abs(),
            "step {}: {} vs {}",
            a.step,
            a.loss,
            b.loss
        );
    }
    assert_eq!(single.steps.len(), parallel.steps.len());
    for (a, b) in one.lora_params().iter().zip(models[0].lora_params().iter()) {
        let (a, b) = (host(a), host(b));
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= tol as f32 * scale.max(1e-3), "{x} vs {y}");
        }
    }
    assert!(out.join("adapter/adapter_model.safetensors").is_file());

    // Each device takes whole micro-batches.
    let few = TrainConfig { accum: 1, ..cfg };
    let (stream, out) = (stream(), scratch("train-dp3"));
    let job = TrainJob::new(&adapter, &stream, &few, &out);
    let err = train_on(&mut models, job, |_| {}).unwrap_err();
    assert!(
        matches!(err, loftq_models::ModelError::Settings(ref m) if m.contains("1 micro-batches per step for 2 devices")),
        "{err}"
    );
}
