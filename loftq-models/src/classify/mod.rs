//! Sequence classification with an encoder: LoRA on the quantized encoder and the classifier
//! head trained in full (PEFT's `modules_to_save`), cross-entropy on labelled text, accuracy
//! on held-out text.
//!
//! - [`data`]: the labelled TSV files and padded batches.
//! - [`checkpoint`]: checkpoints and an exact resume.

pub mod checkpoint;
pub mod data;

use std::path::Path;
use std::time::Instant;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

pub use checkpoint::ClassifyCheckpoints;
pub use data::{ClassBatch, Example, Labelled};

use crate::io::{Adapter, AdapterConfig, read_json_if_present, write_atomic};
use crate::nn::{Encoder, adapter_of, host_tensor};
use crate::train::config::due;
use crate::train::data::{mix, permutation};
use crate::train::optim::{AdamW, AdamWConfig, Schedule};
use crate::{ModelError, Result};

/// How a classifier is fine-tuned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassifyConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per step.
    pub batch: usize,
    /// Learning rate over the steps.
    pub schedule: Schedule,
    /// AdamW.
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this.
    pub max_grad_norm: Option<f64>,
    /// Seed of the example order.
    pub seed: u64,
    /// Evaluate the held-out set every this many steps (and after the last); 0: only after
    /// the last.
    pub eval_every: usize,
    /// With [`ClassifyCheckpoints`]: checkpoint every this many steps (and after the last);
    /// 0: only after the last.
    #[serde(default)]
    pub save_every: usize,
    /// Checkpoints kept (at least one).
    #[serde(default)]
    pub keep_checkpoints: usize,
}

impl ClassifyConfig {
    /// Whether a checkpoint of `other` continues this run: the same settings but how often it
    /// evaluates and checkpoints.
    pub fn same_run(&self, other: &ClassifyConfig) -> bool {
        let plain = |c: &ClassifyConfig| ClassifyConfig {
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 0,
            ..c.clone()
        };
        plain(self) == plain(other)
    }
}

/// Accuracy and mean cross-entropy on a labelled set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassEval {
    /// Steps done when measured.
    pub step: usize,
    /// Share of examples whose highest logit is their label.
    pub accuracy: f64,
    /// Mean cross-entropy (nats).
    pub loss: f64,
}

/// What a run tells while it runs.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ClassifyEvent {
    /// A step finished.
    Step {
        /// Steps done.
        step: usize,
        /// The batch's mean cross-entropy.
        loss: f64,
        /// Its learning rate.
        lr: f64,
        /// Examples per second.
        examples_per_s: f64,
    },
    /// The held-out set was evaluated.
    Eval(ClassEval),
    /// The run continues from a checkpoint.
    Resumed {
        /// Steps done before.
        step: usize,
    },
    /// A checkpoint was written.
    Saved {
        /// Steps done.
        step: usize,
        /// Its directory.
        path: std::path::PathBuf,
    },
}

/// What a run leaves: the loss of every step and every evaluation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassifyHistory {
    /// Mean cross-entropy of each step's batch.
    pub losses: Vec<f64>,
    /// The held-out evaluations.
    pub evals: Vec<ClassEval>,
}

/// Mean cross-entropy of `logits [b, labels]` against `labels`.
fn cross_entropy(logits: Tensor<2>, labels: &[usize]) -> Tensor<1> {
    let b = labels.len();
    let ids: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    let ids: Tensor<2, Int> = Tensor::from_data(TensorData::new(ids, [b, 1]), &logits.device());
    log_softmax(logits, 1).gather(1, ids).mean().neg()
}

/// The batch's mean cross-entropy and its gradient for every parameter of
/// [`Encoder::trainable`], in that order.
pub fn loss_and_grads(model: &Encoder, batch: &ClassBatch) -> (f64, Vec<Tensor<2>>) {
    let mut m = model.clone();
    let params: Vec<Tensor<2>> = (m.trainable().into_iter())
        .map(|p| p.autodiff().require_grad())
        .collect();
    m.set_trainable(params.clone());
    let logits = m.forward(
        batch.ids.clone(),
        batch.types.clone(),
        Some(batch.mask.clone()),
    );
    let loss = cross_entropy(logits, &batch.labels);
    let value = f64::from(loss.clone().into_scalar::<f32>());
    let grads = loss.backward();
    let g = params
        .iter()
        .map(|p| p.grad(&grads).expect("a tracked parameter"))
        .collect();
    (value, g)
}

/// Accuracy and mean cross-entropy of `model` on `examples`, `batch` at a time.
///
/// # Panics
/// If `examples` is empty, `batch` is 0, or [`check_examples`] refuses them.
pub fn evaluate(model: &Encoder, examples: &[Example], batch: usize, step: usize) -> ClassEval {
    let device = model.word_embeddings.device();
    let pad = model.config.pad_token_id;
    let (mut right, mut loss) = (0usize, 0f64);
    for chunk in examples.chunks(batch) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let b = ClassBatch::new(&refs, pad, &device);
        let logits = model.forward(b.ids, b.types, Some(b.mask));
        let labels = model.config.num_labels;
        let values = logits.clone().into_data().convert::<f32>();
        let values = values.try_to_vec::<f32>().expect("f32 logits");
        for (row, &want) in values.chunks(labels).zip(&b.labels) {
            let best = (0..labels).fold(0, |i, j| if row[j] > row[i] { j } else { i });
            right += usize::from(best == want);
        }
        let ce = f64::from(cross_entropy(logits, &b.labels).into_scalar::<f32>());
        loss += ce * chunk.len() as f64;
    }
    ClassEval {
        step,
        accuracy: right as f64 / examples.len() as f64,
        loss: loss / examples.len() as f64,
    }
}

/// Checks that `model` can classify `examples`: it has a pooler and a classifier, and no
/// example is longer than its learned positions.
///
/// # Errors
/// [`ModelError::Settings`] saying which.
pub fn check_examples(model: &Encoder, examples: &[Example]) -> Result<()> {
    if model.pooler.is_none() || model.classifier.is_none() {
        return Err(ModelError::Settings(
            "the model has no classification head (pooler.dense and classifier)".into(),
        ));
    }
    let positions = model.config.max_position_embeddings;
    match examples.iter().map(|e| e.ids.len()).max() {
        Some(longest) if longest > positions => Err(ModelError::Settings(format!(
            "an example of {longest} tokens; the model reads at most {positions}"
        ))),
        _ => Ok(()),
    }
}

/// Fine-tunes `model`'s adapters and classifier on `train`, evaluating on `held_out` if
/// given. Each step takes the next `batch` examples of an order drawn afresh each epoch (so a
/// resumed run takes the batches the whole run would have). With `checkpoints`, writes them
/// and continues from the newest when asked.
///
/// # Errors
/// [`ModelError::Settings`] for zero steps or batch, labels that are not the classifier's
/// outputs, or examples the model cannot read ([`check_examples`]);
/// [`ModelError::Diverged`] when the loss is not finite; a checkpoint that cannot be written,
/// or read back ([`checkpoint`]).
pub fn train_classifier(
    model: &mut Encoder,
    train: &Labelled,
    held_out: Option<&Labelled>,
    cfg: &ClassifyConfig,
    checkpoints: Option<&ClassifyCheckpoints>,
    events: &mut dyn FnMut(ClassifyEvent),
) -> Result<ClassifyHistory> {
    if cfg.steps == 0 || cfg.batch == 0 {
        return Err(ModelError::Settings(
            "steps and batch must be positive".into(),
        ));
    }
    check_examples(model, &train.examples)?;
    if let Some(set) = held_out {
        check_examples(model, &set.examples)?;
    }
    let labels = model.config.num_labels;
    if train.labels.len() != labels {
        return Err(ModelError::Settings(format!(
            "the data has {} labels ({:?}); the classifier has {labels} outputs",
            train.labels.len(),
            train.labels
        )));
    }
    let device = model.word_embeddings.device();
    let pad = model.config.pad_token_id;
    let mut opt = AdamW::new(cfg.adamw, &model.trainable());
    let mut history = ClassifyHistory::default();
    let mut begin = 0;
    if let Some(c) = checkpoints.filter(|c| c.resume)
        && let Some(dir) = crate::train::latest_checkpoint(c.out)?
    {
        let state = checkpoint::load(&dir, model, &mut opt, cfg)?;
        (begin, history) = (state.step, state.history);
        events(ClassifyEvent::Resumed { step: begin });
    }
    let n = train.examples.len();
    let mut order: Option<(usize, Vec<usize>)> = None;
    for step in begin..cfg.steps {
        let start = Instant::now();
        let rows: Vec<&Example> = (step * cfg.batch..(step + 1) * cfg.batch)
            .map(|k| {
                let epoch = k / n;
                if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    order = Some((epoch, permutation(n, mix(cfg.seed, &[epoch as u64]))));
                }
                &train.examples[order.as_ref().expect("set").1[k % n]]
            })
            .collect();
        let batch = ClassBatch::new(&rows, pad, &device);
        let (loss, grads) = loss_and_grads(model, &batch);
        if !loss.is_finite() {
            return Err(ModelError::Diverged {
                step: step + 1,
                loss,
            });
        }
        let lr = cfg.schedule.lr(step);
        let (params, _) = opt.update_clipped(grads, lr, cfg.max_grad_norm);
        model.set_trainable(params);
        history.losses.push(loss);
        events(ClassifyEvent::Step {
            step: step + 1,
            loss,
            lr,
            examples_per_s: cfg.batch as f64 / start.elapsed().as_secs_f64(),
        });
        let done = step + 1;
        if let Some(set) = held_out.filter(|_| due(done, cfg.steps, cfg.eval_every)) {
            let e = evaluate(model, &set.examples, cfg.batch, done);
            events(ClassifyEvent::Eval(e));
            history.evals.push(e);
        }
        if let Some(c) = checkpoints.filter(|_| due(done, cfg.steps, cfg.save_every)) {
            let path = c.save(model, &opt, cfg, done, &history)?;
            events(ClassifyEvent::Saved { step: done, path });
        }
    }
    Ok(history)
}

/// The model's adapter as PEFT's sequence-classification adapter: the LoRA factors, and the
/// classifier saved whole (`modules_to_save`). `config` is the template.
///
/// # Panics
/// If the model has no adapted layer or no classifier.
pub fn classifier_adapter(model: &Encoder, mut config: AdapterConfig) -> Adapter {
    config.task_type = Some("SEQ_CLS".into());
    config.modules_to_save = Some(vec!["classifier".into()]);
    let mut adapter = adapter_of(config, model.linears()).expect("an adapted layer");
    let head = model.classifier.as_ref().expect("a classifier");
    let bias = head.bias.as_ref().expect("a classifier bias");
    let saved = [
        ("classifier.weight", host_tensor(&head.base.dense())),
        ("classifier.bias", host_tensor(bias)),
    ];
    adapter
        .saved
        .extend(saved.map(|(name, t)| (name.to_string(), t)));
    adapter
}

/// The file beside a classifier's adapter that names its labels, in the order of its outputs.
pub const LABELS_FILE: &str = "labels.json";

/// Writes [`classifier_adapter`] into `dir`, and `labels` into its [`LABELS_FILE`], each file
/// atomically.
///
/// # Errors
/// [`ModelError::Io`] if writing fails.
///
/// # Panics
/// As [`classifier_adapter`].
pub fn write_classifier(
    model: &Encoder,
    config: AdapterConfig,
    labels: &[String],
    dir: &Path,
) -> Result<()> {
    classifier_adapter(model, config).write(dir)?;
    let json = serde_json::to_string_pretty(labels).expect("labels serialize");
    write_atomic(&dir.join(LABELS_FILE), json.as_bytes())
}

/// The label names of the classifier adapter in `dir` ([`LABELS_FILE`]), `None` without one.
///
/// # Errors
/// [`ModelError::Io`] if it cannot be read, [`ModelError::Format`] if it is not a list of names.
pub fn read_labels(dir: &Path) -> Result<Option<Vec<String>>> {
    read_json_if_present(&dir.join(LABELS_FILE), "not a list of labels")
}
