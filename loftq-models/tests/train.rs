//! Training: the checkpointed gradients against plain autodiff and finite differences, the
//! loop lowering the loss, exact resume, and data parallelism over two devices; distillation:
//! its loss against a host computation, its gradients against finite differences, a student
//! equal to its teacher at zero, the loop lowering the KL, exact resume.

mod common;

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
    Fitted, Objective, Recompute, Sampling, Schedule, TrainConfig, TrainEvent, Validation,
    distill_blockwise, distill_loss_and_grads, distill_on, fit_layers, loss_and_grads,
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
    for mode in [Recompute::Layers, Recompute::None] {
        check_grads(&model, &batch, mode, loss, &want);
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
    assert_eq!(want.len(), 28);
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
    let history = train(&mut model, &cfg, &stream(), None, &config(30), &out, |_| {}).unwrap();
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
    train(&mut model, &adapter, &stream(), None, cfg, out, |_| {}).unwrap();
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
    let history = train(&mut model, &cfg, &stream(), None, &resume, &cut, |e| {
        if let TrainEvent::Resumed { step } = e {
            resumed_at = Some(*step);
        }
    })
    .unwrap();
    assert_eq!(resumed_at, Some(3));
    assert_eq!(history.steps.len(), steps);
    let bytes =
        |d: &std::path::Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(bytes(&whole) == bytes(&cut), "resumed adapter differs");

    // Other options are refused.
    let (mut model, cfg) = tiny_qlora();
    let other = TrainConfig { seed: 4, ..resume };
    let err = train(&mut model, &cfg, &stream(), None, &other, &cut, |_| {}).unwrap_err();
    assert!(err.to_string().contains("other training options"), "{err}");
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
    let single = train(
        &mut one,
        &adapter,
        &stream(),
        None,
        &cfg,
        &scratch("train-dp1"),
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
    let parallel = train_on(&mut models, &adapter, &stream(), None, &cfg, &out, |_| {}).unwrap();

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
    let err = train_on(
        &mut models,
        &adapter,
        &stream(),
        None,
        &few,
        &scratch("train-dp3"),
        |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("--accum 1"), "{err}");
}

/// The tiny model itself, full precision, without adapters: the teacher.
fn tiny_teacher() -> Llama {
    let config = LlamaConfig::from_file(&fixture("tiny-llama/config.json")).unwrap();
    let ckpt = Checkpoint::open(&fixture("tiny-llama/model.safetensors")).unwrap();
    load_model(&config, &ckpt, &device(), &LoadOptions::default()).unwrap()
}

/// `KL(teacher ‖ student)` per position, averaged, in `f64` on the host from both models'
/// logits.
fn host_kl(student: &Llama, teacher: &Llama, batch: &Batch) -> f64 {
    let ids: Vec<i32> = batch.ids.iter().map(|&i| i as i32).collect();
    let logits = |m: &Llama| common::logits(m, common::ids(ids.clone(), batch.batch, batch.seq));
    let (s, t) = (logits(student), logits(teacher));
    let vocab = s.len() / batch.ids.len();
    let log_softmax = |row: &[f32]| {
        let max = row.iter().fold(f64::MIN, |m, &x| m.max(f64::from(x)));
        let lse = max
            + row
                .iter()
                .map(|&x| (f64::from(x) - max).exp())
                .sum::<f64>()
                .ln();
        row.iter().map(|&x| f64::from(x) - lse).collect::<Vec<_>>()
    };
    let total: f64 = s
        .chunks(vocab)
        .zip(t.chunks(vocab))
        .map(|(s, t)| {
            let (ls, lt) = (log_softmax(s), log_softmax(t));
            lt.iter()
                .zip(&ls)
                .map(|(a, b)| a.exp() * (a - b))
                .sum::<f64>()
        })
        .sum();
    total / batch.ids.len() as f64
}

/// The tiny model at NF2 with a rank-4 adapter whose `B` is small and non-zero (so that every
/// factor has a gradient); no dropout seed is set, so no dropout.
fn tiny_nf2_student() -> Llama {
    let (mut model, _) = tiny_qlora_bits(2, &device());
    let params = model
        .lora_params()
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            if i % 2 == 0 {
                return p;
            }
            let dims = p.dims();
            let v = (0..dims[0] * dims[1])
                .map(|j| {
                    ((j as u32)
                        .wrapping_mul(2_654_435_761)
                        .wrapping_add(i as u32)
                        >> 20) as f32
                        / 4096.0
                        - 0.5
                })
                .map(|x| 0.1 * x)
                .collect();
            Tensor::from_data(TensorData::new(v, dims), &device())
        })
        .collect();
    model.set_lora_params(params);
    model
}

#[test]
fn distillation_loss_and_gradients_are_right() {
    let (student, teacher) = (tiny_nf2_student(), tiny_teacher());
    let batch = batch(3);
    let kl_only = DistillLoss::default();
    let t = teacher_outputs(&teacher, &batch, kl_only);
    let got = distill_loss_and_grads(&student, &batch, Recompute::Layers, &t);
    let want = host_kl(&student, &teacher, &batch);
    assert!(
        want > 1e-4,
        "the quantized student differs from its teacher: {want}"
    );
    assert!(
        (got.loss - want).abs() < 1e-5 + 1e-3 * want,
        "KL {} vs host {want}",
        got.loss
    );
    assert_eq!(got.tokens, 24, "every position counts");

    // With the hidden-state term: both recompute modes agree, and finite differences agree.
    let loss = DistillLoss { hidden_weight: 0.5 };
    let t = teacher_outputs(&teacher, &batch, loss);
    let layers = distill_loss_and_grads(&student, &batch, Recompute::Layers, &t);
    let whole = distill_loss_and_grads(&student, &batch, Recompute::None, &t);
    assert!(layers.loss > got.loss, "the hidden term adds");
    assert!((layers.loss - whole.loss).abs() < 1e-6);
    for (i, (a, b)) in layers.grads.iter().zip(&whole.grads).enumerate() {
        let (a, b) = (host(a), host(b));
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0, "factor {i} has a zero gradient");
        assert!(common::max_abs_diff(&a, &b) <= 1e-4 * scale, "factor {i}");
    }
    // In each checked factor, its largest gradient: the loss's `f32` rounding stays far below
    // the difference the step makes.
    for factor in [0usize, 1, 12, 27] {
        let row = host(&layers.grads[factor]);
        let index = (0..row.len())
            .max_by(|&i, &j| row[i].abs().total_cmp(&row[j].abs()))
            .unwrap();
        let g = f64::from(row[index]);
        let fd = central_difference(&student, factor, index, |m| {
            distill_loss_and_grads(m, &batch, Recompute::Layers, &t).loss
        });
        let tol = 0.03 * fd.abs().max(g.abs());
        assert!(
            (g - fd).abs() < tol,
            "factor {factor}[{index}]: autodiff {g} vs finite difference {fd}"
        );
    }
}

/// A student whose base is its teacher's own weights and whose adapters start at `B = 0`
/// has nothing to learn: zero loss and zero gradients.
#[test]
fn a_student_equal_to_its_teacher_has_zero_loss() {
    let teacher = tiny_teacher();
    let mut student = teacher.clone();
    assert_eq!(student.add_lora(4, 2.0, 0.0, 0, |_| true), 14);
    let (batch, elsewhere) = (batch(4), batch(5));
    let t = teacher_outputs(&teacher, &batch, DistillLoss { hidden_weight: 1.0 });
    let got = distill_loss_and_grads(&student, &batch, Recompute::Layers, &t);
    assert!(got.loss.abs() < 1e-6, "loss {}", got.loss);
    // The same student off its teacher (another batch's teacher outputs) has gradients of
    // this size.
    let other = teacher_outputs(&teacher, &elsewhere, DistillLoss { hidden_weight: 1.0 });
    let off = distill_loss_and_grads(&student, &batch, Recompute::Layers, &other);
    let biggest = |g: &[Tensor<2>]| g.iter().flat_map(host).fold(0f32, |m, x| m.max(x.abs()));
    let (zero, some) = (biggest(&got.grads), biggest(&off.grads));
    assert!(some > 1e-3, "off-teacher gradient {some}");
    assert!(
        zero < 1e-5 * some.max(1.0),
        "gradient {zero} at the teacher"
    );
}

fn distill_config(steps: usize) -> TrainConfig {
    let plain = config(steps);
    TrainConfig {
        objective: Objective::Distill(DistillLoss { hidden_weight: 0.1 }),
        eval_every: 3,
        schedule: Schedule {
            lr: 3e-3,
            ..plain.schedule
        },
        ..plain
    }
}

fn distill_run(cfg: &TrainConfig, out: &std::path::Path) -> loftq_models::train::History {
    let (model, adapter) = tiny_qlora_bits(2, &device());
    let val = Validation {
        tokens: stream()[..64].to_vec(),
        window: 32,
        stride: 16,
    };
    let mut models = [model];
    distill_on(
        &mut models,
        &[tiny_teacher()],
        &adapter,
        &stream(),
        Some(&val),
        cfg,
        out,
        |_| {},
    )
    .unwrap()
}

#[test]
fn distillation_lowers_the_kl_and_resumes_exactly() {
    let steps = 7;
    let whole = scratch("distill-whole");
    let history = distill_run(&distill_config(steps), &whole);
    let kl: Vec<f64> = history.evals.iter().map(|e| e.kl.unwrap()).collect();
    assert_eq!(kl.len(), 4, "steps 0, 3, 6 and 7");
    assert!(kl[3] < 0.8 * kl[0], "validation KL {kl:?}");
    assert_eq!(history.tokens_per_step, 2 * 2 * 16);

    let cut = scratch("distill-cut");
    distill_run(&distill_config(steps), &cut);
    for p in ["checkpoint-6", "checkpoint-7", "adapter", "history.json"] {
        let p = cut.join(p);
        let _ = std::fs::remove_dir_all(&p);
        let _ = std::fs::remove_file(&p);
    }
    let resume = TrainConfig {
        resume: true,
        ..distill_config(steps)
    };
    let again = distill_run(&resume, &cut);
    let losses =
        |h: &loftq_models::train::History| h.steps.iter().map(|s| s.loss).collect::<Vec<_>>();
    // The loss and the validation KL are large sums over the vocabulary, which a GPU may order
    // differently from run to run (lavapipe did, in the last bit); on the CPU they are exact.
    let tol = if DeviceSpec::from_env() == DeviceSpec::Cpu {
        0.0
    } else {
        1e-6
    };
    let close = |x: f64, y: f64| (x - y).abs() <= tol * y.abs();
    let (a, b) = (losses(&again), losses(&history));
    assert_eq!(a.len(), b.len());
    assert!(
        a.iter().zip(&b).all(|(x, y)| close(*x, *y)),
        "{a:?} vs {b:?}"
    );
    assert_eq!(again.evals.len(), history.evals.len());
    for (a, b) in again.evals.iter().zip(&history.evals) {
        assert_eq!((a.step, a.nll, a.ppl), (b.step, b.nll, b.ppl));
        let (x, y) = (a.kl.unwrap(), b.kl.unwrap());
        assert!(close(x, y), "step {}: KL {x} vs {y}", a.step);
    }
    let bytes =
        |d: &std::path::Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(bytes(&whole) == bytes(&cut), "resumed adapter differs");

    // A next-token checkpoint does not continue as distillation, nor the reverse.
    let (mut model, adapter) = tiny_qlora();
    let plain = TrainConfig {
        objective: Objective::NextToken,
        ..resume.clone()
    };
    let err = train(&mut model, &adapter, &stream(), None, &plain, &cut, |_| {}).unwrap_err();
    assert!(err.to_string().contains("other training options"), "{err}");
    // Distillation without a teacher, or a teacher for next-token training: refused.
    let err = train(&mut model, &adapter, &stream(), None, &resume, &cut, |_| {}).unwrap_err();
    assert!(err.to_string().contains("teacher"), "{err}");
    let mut models = [model];
    let err = distill_on(
        &mut models,
        &[tiny_teacher()],
        &adapter,
        &stream(),
        None,
        &plain,
        &cut,
        |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("distillation objective"), "{err}");
}

fn blockwise_config() -> BlockwiseConfig {
    BlockwiseConfig {
        rows: 32,
        seq: 16,
        batch: 8,
        steps: 60,
        lr: 1e-2,
        adamw: AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        seed: 1,
        resume: false,
    }
}

/// [`fit_layers`] from scratch, with the fitted layers it hands out.
fn fit_keeping_layers(
    student: &Llama,
    teacher: &Llama,
    text: &[u32],
    val: &Validation,
    cfg: &BlockwiseConfig,
) -> (
    loftq_models::train::BlockwiseReport,
    Vec<loftq_models::nn::DecoderLayer>,
) {
    let mut fitted = Vec::new();
    let done = Fitted::default();
    let report = fit_layers(student, teacher, text, Some(val), cfg, &done, |_, l| {
        fitted.push(l);
        Ok(())
    })
    .unwrap();
    (report, fitted)
}

/// The teacher's own weights under adapters knocked off `B = 0`: fitting layer by layer
/// brings every layer's output back to the teacher's.
#[test]
fn blockwise_fitting_recovers_the_teachers_layers() {
    let teacher = tiny_teacher();
    let mut student = teacher.clone();
    student.add_lora(4, 2.0, 0.0, 0, |_| true);
    let knocked = tiny_nf2_student().lora_params();
    student.set_lora_params(knocked);
    let cfg = blockwise_config();
    let report = fit_layers(
        &student,
        &teacher,
        &stream(),
        None,
        &cfg,
        &Fitted::default(),
        |_, _| Ok(()),
    )
    .unwrap();
    assert_eq!(report.layers.len(), teacher.layers.len());
    assert!(report.evals.is_empty());
    for f in &report.layers {
        assert!(f.mse_before > 1e-6, "layer {}: nothing to fit", f.layer);
        assert!(
            f.mse_after < 0.01 * f.mse_before,
            "layer {}: {} → {}",
            f.layer,
            f.mse_before,
            f.mse_after
        );
    }

    // An NF2 student gets closer to its teacher layer by layer, and in its logits on other
    // text of the same kind as the calibration's (ids spread over the vocabulary).
    let mut nf2 = tiny_nf2_student();
    let batch = batch(6);
    let text: Vec<u32> = (0..4000u32)
        .map(|i| (i.wrapping_mul(2_246_822_519).wrapping_add(7) >> 9) % 256)
        .collect();
    // Windows longer than the 512 positions whose logits are made at once.
    let val = Validation {
        tokens: text[2000..3300].to_vec(),
        window: 700,
        stride: 400,
    };
    let before = host_kl(&nf2, &teacher, &batch);
    let ppl_before = perplexity_windows(&nf2, &val.tokens, val.window, val.stride);
    let (report, fitted) = fit_keeping_layers(&nf2, &teacher, &text, &val, &cfg);
    for f in &report.layers {
        assert!(f.mse_after < f.mse_before, "layer {}", f.layer);
    }
    nf2.layers = fitted;
    let after = host_kl(&nf2, &teacher, &batch);
    assert!(after < 0.7 * before, "KL {before} → {after}");
    // The validation carried through the same pass scores the model before and after as
    // the whole model does.
    let ppl_after = perplexity_windows(&nf2, &val.tokens, val.window, val.stride);
    let [b, a] = [&report.evals[0], &report.evals[1]];
    assert_eq!((b.step, a.step), (0, teacher.layers.len()));
    for (got, want) in [(b.nll, ppl_before.nll), (a.nll, ppl_after.nll)] {
        assert!((got - want).abs() <= 1e-5 * want, "NLL {got} vs {want}");
    }
    assert!(a.kl.unwrap() < b.kl.unwrap(), "{:?}", report.evals);

    // Layers must pair up.
    let mut shallow = tiny_nf2_student();
    shallow.layers.pop();
    shallow.config.num_hidden_layers -= 1;
    let err = fit_layers(
        &shallow,
        &teacher,
        &stream(),
        None,
        &cfg,
        &Fitted::default(),
        |_, _| Ok(()),
    );
    assert!(err.unwrap_err().to_string().contains("layers"));
    // A student without adapters has nothing to fit.
    let err = fit_layers(
        &teacher,
        &teacher,
        &stream(),
        None,
        &cfg,
        &Fitted::default(),
        |_, _| Ok(()),
    );
    assert!(err.unwrap_err().to_string().contains("no LoRA"));
}

/// Read from disk one layer at a time, block-wise distillation does what it does on the
/// models in memory, and writes the adapter the fitted layers hold.
#[test]
fn blockwise_reads_one_layer_at_a_time() {
    let teacher = tiny_teacher();
    let nf2 = tiny_nf2_student();
    let template = AdapterConfig::new(4, 8.0, vec![]);
    let start = nf2.adapter(template.clone()).unwrap();
    let dir = fixture("tiny-llama");
    let opts = LoadOptions {
        quantize: Some(QuantConfig::nf(2)),
        adapter: Some(&start),
    };
    let student_reader = LayerReader::open(&dir, &device(), opts).unwrap();
    let teacher_reader = LayerReader::open(&dir, &device(), LoadOptions::default()).unwrap();
    assert!(student_reader.ends().layers.is_empty());
    let val = Validation {
        tokens: stream()[..50].to_vec(),
        window: 50,
        stride: 25,
    };
    let cfg = BlockwiseConfig {
        steps: 10,
        ..blockwise_config()
    };
    let out = scratch("blockwise-read");
    let read = distill_blockwise(
        &student_reader,
        &teacher_reader,
        &template,
        &stream(),
        Some(&val),
        &cfg,
        &out,
        |_| {},
    )
    .unwrap();
    let (held, fitted) = fit_keeping_layers(&nf2, &teacher, &stream(), &val, &cfg);
    // Loading order aside the operations are the same; a GPU may order its sums differently.
    let tol = if DeviceSpec::from_env() == DeviceSpec::Cpu {
        0.0
    } else {
        1e-5
    };
    let close = |x: f64, y: f64| (x - y).abs() <= tol * y.abs();
    for (r, h) in read.layers.iter().zip(&held.layers) {
        assert!(close(r.mse_after, h.mse_after), "{r:?} vs {h:?}");
    }
    for (r, h) in read.evals.iter().zip(&held.evals) {
        assert!(
            close(r.nll, h.nll) && close(r.kl.unwrap(), h.kl.unwrap()),
            "{r:?} vs {h:?}"
        );
    }
    let mut nf2 = nf2;
    nf2.layers = fitted;
    let written = Adapter::read(&out.join("adapter")).unwrap();
    let want = nf2.adapter(template).unwrap();
    assert_eq!(written.config.target_modules, want.config.target_modules);
    assert_eq!(written.modules.len(), want.modules.len());
    for (path, w) in &want.modules {
        let g = &written.modules[path];
        let diff =
            g.b.data
                .iter()
                .zip(&w.b.data)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
        assert!(
            diff <= if tol == 0.0 { 0.0 } else { 1e-4 },
            "{path}: {diff}"
        );
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("blockwise.json")).unwrap()).unwrap();
    assert_eq!(
        report["layers"].as_array().unwrap().len(),
        teacher.layers.len()
    );
}

/// A student whose layer `fail_at` cannot be read: a run that stops there.
struct Failing<'a> {
    model: &'a Llama,
    fail_at: usize,
}

impl LayerSource for Failing<'_> {
    fn ends(&self) -> &Llama {
        self.model
    }

    fn layer(&self, l: usize) -> loftq_models::Result<loftq_models::nn::DecoderLayer> {
        if l == self.fail_at {
            return Err(loftq_models::ModelError::Invalid(
                "the disk went away".into(),
            ));
        }
        self.model.layer(l)
    }
}

/// A block-wise run stopped after its first layer and resumed ends as an uninterrupted run:
/// the same adapter bytes, fits and validation.
#[test]
fn blockwise_resumes_exactly() {
    let (teacher, nf2) = (tiny_teacher(), tiny_nf2_student());
    let template = AdapterConfig::new(4, 8.0, vec![]);
    let val = Validation {
        tokens: stream()[..40].to_vec(),
        window: 40,
        stride: 20,
    };
    let cfg = BlockwiseConfig {
        steps: 5,
        ..blockwise_config()
    };
    let run = |student: &dyn LayerSource, cfg: &BlockwiseConfig, out: &std::path::Path| {
        let (s, v) = (&stream(), Some(&val));
        distill_blockwise(student, &teacher, &template, s, v, cfg, out, |_| {})
    };
    let whole = scratch("blockwise-whole");
    let want = run(&nf2, &cfg, &whole).unwrap();

    let cut = scratch("blockwise-cut");
    let failing = Failing {
        model: &nf2,
        fail_at: 1,
    };
    let err = run(&failing, &cfg, &cut).unwrap_err();
    assert!(err.to_string().contains("went away"), "{err}");
    assert!(!cut.join("adapter").exists() && !cut.join("blockwise.json").exists());
    assert!(cut.join(BLOCKWISE_CHECKPOINT).join("state.json").is_file());
    // Not continued unless asked; not continued with other settings.
    let err = run(&nf2, &cfg, &cut).unwrap_err();
    assert!(err.to_string().contains("checkpoint"), "{err}");
    let other = BlockwiseConfig {
        steps: 6,
        resume: true,
        ..cfg.clone()
    };
    let err = run(&nf2, &other, &cut).unwrap_err();
    assert!(err.to_string().contains("other settings"), "{err}");

    let mut resumed = 0;
    let resume = BlockwiseConfig {
        resume: true,
        ..cfg.clone()
    };
    let (s, v) = (&stream(), Some(&val));
    let got = distill_blockwise(&nf2, &teacher, &template, s, v, &resume, &cut, |e| {
        if let BlockwiseEvent::Resumed { layers } = e {
            resumed = layers;
        }
    })
    .unwrap();
    assert_eq!(resumed, 1);
    let strip = |r: &loftq_models::train::BlockwiseReport| {
        let fits: Vec<_> = r
            .layers
            .iter()
            .map(|f| (f.layer, f.mse_before, f.mse_after))
            .collect();
        (fits, r.evals.clone())
    };
    // A GPU may order the validation's sums differently; the fitting itself is exact.
    if DeviceSpec::from_env() == DeviceSpec::Cpu {
        assert_eq!(strip(&got), strip(&want));
    }
    assert_eq!(strip(&got).0, strip(&want).0);
    let bytes =
        |d: &std::path::Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(bytes(&whole) == bytes(&cut), "resumed adapter differs");
}
