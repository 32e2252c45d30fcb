//! `loftq train --task classify`: an encoder's LoRA adapters and classification head on
//! labelled text.

use loftq_models::Tokenizer;
use loftq_models::classify::{
    ClassifyCheckpoints, ClassifyConfig, ClassifyEvent, Labelled, train_classifier,
    write_classifier,
};
use loftq_models::io::write_atomic;
use loftq_models::nn::{LoadOptions, load_encoder};

use super::TrainArgs;
use super::inputs::Fresh;
use crate::error::{Result, invalid};
use crate::progress::{Progress, done, json_line};

/// The options of `loftq train` that only next-token training and distillation use.
fn refuse_lm_flags(a: &TrainArgs) -> Result<()> {
    let lm_only = [
        ("--distill-from", a.distill_from.is_some()),
        ("--blockwise", a.blockwise),
        ("--val-text", a.val_text.is_some()),
        ("--text", !a.text.is_empty()),
        ("--no-recompute", a.no_recompute),
        ("--dense-base", a.dense_base),
    ];
    if let Some((flag, _)) = lm_only.iter().find(|(_, set)| *set) {
        return Err(invalid(format!(
            "{flag} is for --task lm; --task classify reads --labels and --val-labels"
        )));
    }
    if a.accum != 1 {
        return Err(invalid(
            "--task classify takes one batch per step (--accum 1)",
        ));
    }
    Ok(())
}

/// Runs `loftq train --task classify`.
#[allow(clippy::print_stdout)]
pub(super) fn run(a: &TrainArgs, opts: LoadOptions, device: &burn::tensor::Device) -> Result<()> {
    refuse_lm_flags(a)?;
    let Some(labels_path) = &a.labels else {
        return Err(invalid(
            "--task classify needs --labels FILE (label<TAB>text lines)",
        ));
    };
    let tok = Tokenizer::for_model(&a.model)?;
    let train = Labelled::read(labels_path, &tok, a.seq, None)?;
    let held_out = (a.val_labels.as_ref())
        .map(|p| Labelled::read(p, &tok, a.seq, Some(&train.labels)))
        .transpose()?;
    let mut model = load_encoder(&a.model, device, &opts)?;
    let template = match opts.adapter {
        Some(ad) => ad.config.clone(),
        None => {
            let fresh = Fresh::of(a);
            if model.add_lora(&fresh.lora, |p| fresh.picks(p)) == 0 {
                return Err(fresh.no_match(a));
            }
            fresh.config
        }
    };
    // A head for these labels, unless the model (or its adapter) has one of that size.
    let n = train.labels.len();
    if model
        .classifier
        .as_ref()
        .is_none_or(|_| model.config.num_labels != n)
    {
        model.new_classifier(n, a.seed);
    }
    eprintln!(
        "{} training examples, {} held out, labels {:?}; {} trainable parameters",
        train.examples.len(),
        held_out.as_ref().map_or(0, |h| h.examples.len()),
        train.labels,
        model
            .trainable()
            .iter()
            .map(|t| t.dims().iter().product::<usize>())
            .sum::<usize>()
    );
    let cfg = ClassifyConfig {
        steps: a.steps,
        batch: a.batch,
        schedule: a.schedule(),
        adamw: a.adamw(),
        max_grad_norm: a.max_grad_norm(),
        seed: a.seed,
        eval_every: a.eval_every,
        save_every: a.save_every,
        keep_checkpoints: a.keep_checkpoints,
    };
    let checkpoints = ClassifyCheckpoints {
        out: &a.out,
        template: &template,
        labels: &train.labels,
        resume: a.resume,
    };
    let mut bar = (!a.json).then(|| Progress::new(a.steps as u64));
    let held = held_out.as_ref();
    let history = train_classifier(
        &mut model,
        &train,
        held,
        &cfg,
        Some(&checkpoints),
        &mut |e| {
            if a.json {
                json_line(&e);
                return;
            }
            let bar = bar.as_mut().expect("not json");
            match e {
                ClassifyEvent::Step {
                    step,
                    loss,
                    lr,
                    examples_per_s,
                } => bar.inc(
                    1,
                    &format!(
                        "step {step} loss {loss:.4} lr {lr:.2e} {examples_per_s:.1} examples/s"
                    ),
                ),
                ClassifyEvent::Eval(e) => bar.note(&format!(
                    "step {}: held-out accuracy {:.4}, loss {:.4}",
                    e.step, e.accuracy, e.loss
                )),
                ClassifyEvent::Resumed { step } => {
                    bar.inc(step as u64, &format!("resumed after step {step}"));
                }
                ClassifyEvent::Saved { step, path } => {
                    bar.note(&format!("step {step}: checkpoint {}", path.display()));
                }
            }
        },
    )?;
    let out = a.out.join("adapter");
    write_classifier(&model, template, &train.labels, &out)?;
    let json = serde_json::to_string_pretty(&history).expect("history serializes");
    write_atomic(&a.out.join("history.json"), json.as_bytes())?;
    let acc = history.evals.last().map_or(String::new(), |e| {
        format!(", held-out accuracy {:.4}", e.accuracy)
    });
    done(
        bar.as_mut(),
        &format!("done{acc}; adapter in {}", out.display()),
    );
    Ok(())
}
