//! Distillation: its loss against a host computation, its gradients against finite
//! differences, a student equal to its teacher at zero, the loop lowering the KL, exact resume.

use super::*;

/// The tiny model itself, full precision, without adapters: the teacher.
pub(super) fn tiny_teacher() -> Llama {
    let config = LlamaConfig::from_file(&fixture("tiny-llama/config.json")).unwrap();
    let ckpt = Checkpoint::open(&fixture("tiny-llama/model.safetensors")).unwrap();
    load_model(&config, &ckpt, &device(), &LoadOptions::default()).unwrap()
}

/// `KL(teacher ‖ student)` per position, averaged, in `f64` on the host from both models'
/// logits.
pub(super) fn host_kl(student: &Llama, teacher: &Llama, batch: &Batch) -> f64 {
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
pub(super) fn tiny_nf2_student() -> Llama {
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
    let stream = stream();
    let job = TrainJob::new(&adapter, &stream, cfg, out).validated(Some(&val));
    distill_on(&mut models, &[tiny_teacher()], job, |_| {}).unwrap()
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
    let err = train(
        &mut model,
        TrainJob::new(&adapter, &stream(), &plain, &cut),
        |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("other training settings"), "{err}");
    // Distillation without a teacher, or a teacher for next-token training: refused.
    let err = train(
        &mut model,
        TrainJob::new(&adapter, &stream(), &resume, &cut),
        |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("teacher"), "{err}");
    let mut models = [model];
    let stream = stream();
    let job = TrainJob::new(&adapter, &stream, &plain, &cut);
    let err = distill_on(&mut models, &[tiny_teacher()], job, |_| {}).unwrap_err();
    assert!(err.to_string().contains("distillation objective"), "{err}");
}
