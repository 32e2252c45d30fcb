//! `loftq train`: fine-tune the LoRA factors on a frozen (quantized) base, on the text's next
//! tokens or, with `--distill-from`, on a full-precision teacher's outputs.

use std::path::PathBuf;

use clap::Args;
use loftq_core::DeviceList;
use loftq_core::quant::parse_bits;
use loftq_models::io::Adapter;
use loftq_models::nn::{LoadOptions, load_pretrained_with};
use loftq_models::train::{
    AdamWConfig, BLOCKWISE_CHECKPOINT, Decay, DistillLoss, Objective, Recompute, Sampling,
    Schedule, TrainConfig, TrainEvent, TrainJob, distill_on, latest_checkpoint,
};

use crate::error::{Result, invalid};
use crate::progress::{Progress, done, json_line};

mod blockwise;
mod classify;
mod inputs;

use inputs::{Fresh, build_model, read_text};

/// Arguments of `loftq train`.
#[derive(Args)]
pub struct TrainArgs {
    /// The frozen model: an HF directory (dense, or the packed backbone `loftq init` writes)
    /// or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// The PEFT adapter to start from (e.g. `<init out>/adapter`, or a LoftQ organisation
    /// release, whose loftq_init/ is read). Without it, a fresh adapter is attached (A random,
    /// B = 0): plain LoRA, or QLoRA with --quantize.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// What to train: `lm`, a causal LM on --text (next-token prediction, or distillation);
    /// or `classify`, an encoder (BERT, MiniLM) as a sequence classifier on --labels: its
    /// adapters, and the classification head trained in full (saved whole in the adapter, as
    /// PEFT's modules_to_save). A model without a head gets a fresh one for the labels.
    #[arg(long, value_enum, default_value_t = Task::Lm)]
    task: Task,
    /// Training text files (UTF-8), tokenized whole and joined, each followed by EOS.
    #[arg(long, num_args = 1.., required_unless_present = "labels", value_name = "FILE")]
    text: Vec<PathBuf>,
    /// With --task classify: labelled examples, one `label<TAB>text` per line, each cut to
    /// --seq tokens. The labels are the file's, sorted (written to adapter/labels.json).
    #[arg(long, value_name = "FILE")]
    labels: Option<PathBuf>,
    /// With --task classify: held-out examples (same format), scored by accuracy every
    /// --eval-every steps and after the last.
    #[arg(long, value_name = "FILE", requires = "labels")]
    val_labels: Option<PathBuf>,
    /// Where checkpoints (checkpoint-N/), the final adapter (adapter/) and history.json go.
    #[arg(long)]
    out: PathBuf,
    /// Continue from the latest checkpoint in --out (same options required).
    #[arg(long)]
    resume: bool,

    /// Distill instead of fine-tuning: fit the adapters so that the model's next-token
    /// distributions match this full-precision teacher's (HF directory or .gguf; the model
    /// --model was quantized from) on the text, by their KL divergence at every position. No
    /// labels are used, so any text in the model's language will do. Costs one extra forward
    /// pass of the teacher per micro-batch and the teacher's weights in memory (one copy per
    /// --device). Validation reports the teacher-student KL beside the perplexity.
    #[arg(long, value_name = "MODEL")]
    distill_from: Option<PathBuf>,
    /// With --distill-from: add this weight times the mean squared difference of the final
    /// normalized hidden states to the KL divergence (RILQ's model-level loss; 0: KL alone).
    #[arg(long, default_value_t = 0.0, requires = "distill_from")]
    hidden_weight: f64,
    /// With --distill-from: fit block-wise instead (ApiQ): one decoder layer's adapters at a
    /// time, to the teacher layer's output (mean squared error), the student's inputs coming
    /// from its layers fitted already. --steps steps of --batch rows per layer, from
    /// --blockwise-rows rows of --seq tokens drawn once; lr --lr with cosine decay per layer.
    /// Both models are read from disk one layer at a time, so only one layer of each is in
    /// memory (with the embeddings and heads, and both models' hidden states of the rows); no
    /// logits but the validation's. Validation before and after comes from the same pass.
    /// Writes adapter/ and blockwise.json, and blockwise-checkpoint/ after each layer
    /// (--resume continues it).
    #[arg(long, requires = "distill_from", conflicts_with = "hidden_weight")]
    blockwise: bool,
    /// Rows of --blockwise.
    #[arg(long, default_value_t = 64, requires = "blockwise")]
    blockwise_rows: usize,

    /// Fresh adapter: rank.
    #[arg(long, default_value_t = 16, conflicts_with = "adapter")]
    rank: usize,
    /// Fresh adapter: lora_alpha (default: the rank, so scaling 1).
    #[arg(long, conflicts_with = "adapter")]
    alpha: Option<f64>,
    /// Fresh adapter: rsLoRA scaling alpha/√r.
    #[arg(long, conflicts_with = "adapter")]
    rslora: bool,
    /// Fresh adapter: `all-linear` or comma-separated module names (PEFT's rule).
    #[arg(long, default_value = "all-linear", conflicts_with = "adapter")]
    target: String,
    /// Fresh adapter: modules to leave out (same rule).
    #[arg(long, default_value = "", conflicts_with = "adapter")]
    exclude: String,
    /// Quantize every dense decoder linear weight on load (QLoRA): nf4, nf3, nf2, int8, int4,
    /// int2. Weights already packed stay as they are.
    #[arg(long)]
    quantize: Option<String>,
    /// Block size of --quantize.
    #[arg(long, default_value_t = 64)]
    block_size: usize,
    /// LoRA dropout (default: the adapter's own, 0 for a fresh one).
    #[arg(long)]
    dropout: Option<f64>,

    /// Optimizer steps.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// Warm-up steps: lr·min(1, (step+1)/warmup).
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// After the warm-up.
    #[arg(long, value_enum, default_value_t = Decay::Cosine)]
    decay: Decay,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the global gradient norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// How rows are cut from the text: random windows, or consecutive rows shuffled each
    /// epoch.
    #[arg(long, value_enum, default_value_t = Sampling::Random)]
    sampling: Sampling,
    /// Seed of the batches, dropout and a fresh adapter.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep the whole autodiff graph instead of recomputing each layer in the backward pass:
    /// faster, but every layer's activations and dequantized weights stay in memory.
    #[arg(long)]
    no_recompute: bool,
    /// Dequantize the frozen base once, on load, and keep it dense on the device instead of
    /// dequantizing each packed weight in every forward pass: the same result, one kernel
    /// fewer per linear layer and pass on a GPU, at 4 bytes a parameter of device memory
    /// (SmolLM2-135M: 0.4 GB; a 7B model: 27 GB). Checkpoints and the adapter are unchanged.
    #[arg(long, conflicts_with = "blockwise")]
    dense_base: bool,

    /// Validation text (scored from its start). Without it, the last --val-fraction of the
    /// training tokens is held out.
    #[arg(long)]
    val_text: Option<PathBuf>,
    /// Fraction of the training tokens held out when there is no --val-text (0: none).
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    /// Validation tokens scored.
    #[arg(long, default_value_t = 2048)]
    val_tokens: usize,
    /// Sliding-window length for validation (default: --val-tokens, one pass).
    #[arg(long)]
    val_window: Option<usize>,
    /// Stride of the validation window (default: half the window).
    #[arg(long)]
    val_stride: Option<usize>,
    /// Validate every N steps, and before the first (0: only at the end).
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    save_every: usize,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 2)]
    keep_checkpoints: usize,

    /// Device: cpu, wgpu[:N] or cuda[:N]. Several, comma-separated (`wgpu:0,wgpu:1`, the
    /// discrete GPUs 0 and 1), train data-parallel: one copy of the model per device, the
    /// --accum micro-batches of each step spread over them, the gradients summed and the
    /// update made on the first. The result is that of the first device alone with the same
    /// options (up to rounding); --accum must be at least the number of devices. Copies on
    /// one CPU (`cpu,cpu`) share its cores, so they are a check, not a speed-up.
    #[arg(long, default_value = "cpu")]
    device: DeviceList,
    /// Print every step and validation as a JSON line on stdout instead of the progress bar.
    #[arg(long)]
    json: bool,
}

impl TrainArgs {
    /// --lr, --warmup and --decay over --steps.
    fn schedule(&self) -> Schedule {
        Schedule {
            lr: self.lr,
            warmup: self.warmup,
            decay: self.decay,
            total: self.steps,
        }
    }

    /// AdamW with --weight-decay.
    fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            weight_decay: self.weight_decay,
            ..AdamWConfig::default()
        }
    }

    /// --max-grad-norm, 0 meaning none.
    fn max_grad_norm(&self) -> Option<f64> {
        (self.max_grad_norm > 0.0).then_some(self.max_grad_norm)
    }
}

/// What `loftq train` fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Task {
    /// A causal LM on text.
    Lm,
    /// An encoder's sequence classifier on labelled text.
    Classify,
}

/// Runs `loftq train`.
#[allow(clippy::print_stdout)]
pub fn run(a: &TrainArgs) -> Result<()> {
    crate::args::note_release(&a.model, a.adapter.as_deref());
    if a.steps == 0 || a.batch == 0 || a.accum == 0 {
        return Err(invalid("--steps, --batch and --accum must be at least 1"));
    }
    if a.seq < 2 {
        return Err(invalid("--seq must be at least 2"));
    }
    if !(a.lr.is_finite() && a.lr > 0.0) {
        return Err(invalid(format!("--lr {} must be positive", a.lr)));
    }
    if !(a.hidden_weight.is_finite() && a.hidden_weight >= 0.0) {
        return Err(invalid(format!(
            "--hidden-weight {} must be a finite number ≥ 0",
            a.hidden_weight
        )));
    }
    if let Some(p) = a.dropout
        && !(0.0..1.0).contains(&p)
    {
        return Err(invalid(format!("--dropout {p} must be in [0, 1)")));
    }
    let held = a.out.is_dir()
        && (latest_checkpoint(&a.out)?.is_some() || a.out.join(BLOCKWISE_CHECKPOINT).is_dir());
    if !a.resume && held {
        return Err(invalid(format!(
            "{} already holds checkpoints; pass --resume to continue, or choose another --out",
            a.out.display()
        )));
    }
    let devices = a
        .device
        .open()
        .map_err(|e| invalid(format!("--device {}: {e}", a.device)))?;
    let cfg = TrainConfig {
        steps: a.steps,
        batch: a.batch,
        seq: a.seq,
        accum: a.accum,
        schedule: a.schedule(),
        adamw: a.adamw(),
        max_grad_norm: a.max_grad_norm(),
        sampling: a.sampling,
        seed: a.seed,
        recompute: if a.no_recompute {
            Recompute::None
        } else {
            Recompute::Layers
        },
        objective: match a.distill_from {
            Some(_) => Objective::Distill(DistillLoss {
                hidden_weight: a.hidden_weight,
            }),
            None => Objective::NextToken,
        },
        eval_every: a.eval_every,
        save_every: a.save_every,
        keep_checkpoints: a.keep_checkpoints,
        resume: a.resume,
    };
    // Before any model is loaded.
    if a.blockwise && devices.len() > 1 {
        return Err(invalid(format!(
            "--blockwise runs on one device; --device {} names {}",
            a.device,
            devices.len()
        )));
    }
    cfg.check_devices(devices.len()).map_err(|e| {
        invalid(format!(
            "--accum {} for --device {}: {e}",
            a.accum, a.device
        ))
    })?;

    // The model and its adapter, once per device.
    let adapter = a.adapter.as_deref().map(Adapter::read).transpose()?;
    let quantize = a
        .quantize
        .as_deref()
        .map(|s| parse_bits(s, a.block_size, false))
        .transpose()
        .map_err(|e| invalid(format!("--quantize: {e}")))?;
    let opts = LoadOptions {
        quantize,
        adapter: adapter.as_ref(),
    };
    match (a.task, &a.labels) {
        (Task::Classify, _) if devices.len() > 1 => {
            return Err(invalid("--task classify runs on one --device"));
        }
        // It refuses the flags of next-token training and distillation (--blockwise too).
        (Task::Classify, _) => return classify::run(a, opts, &devices[0]),
        (Task::Lm, Some(_)) => return Err(invalid("--labels is for --task classify")),
        (Task::Lm, None) => {}
    }
    if a.blockwise {
        return blockwise::run(a, &cfg, opts, &devices[0]);
    }
    let (model, template) = build_model(a, &opts, adapter.as_ref(), &devices[0])?;
    let mut models = vec![model];
    for device in &devices[1..] {
        models.push(build_model(a, &opts, adapter.as_ref(), device)?.0);
    }
    if a.dense_base {
        let n: usize = models.iter_mut().map(|m| m.dequantize_bases()).sum();
        eprintln!("--dense-base: {n} packed base weights dequantized once");
    }
    // The teacher, once per device, full precision and without adapters.
    let mut teachers = Vec::new();
    if let Some(path) = &a.distill_from {
        for device in &devices {
            teachers.push(load_pretrained_with(path, device, &LoadOptions::default())?);
        }
    }
    let model = &models[0];

    let (stream, val) = read_text(a, model.config.eos_token_id)?;
    let trainable: usize = model
        .lora_params()
        .iter()
        .map(|t| t.dims().iter().product::<usize>())
        .sum();
    eprintln!(
        "{} training tokens from {} file(s); {} validation tokens; {} trainable parameters",
        stream.tokens.len(),
        stream.files.len(),
        val.as_ref().map_or(0, |v| v.tokens.len()),
        trainable
    );

    let positions = if teachers.is_empty() {
        a.seq - 1
    } else {
        a.seq
    };
    let tokens_per_step = (a.batch * a.accum * positions) as f64;
    let mut bar = (!a.json).then(|| Progress::new(a.steps as u64));
    let mut loss_ema: Option<f64> = None;
    let on_event = |e: &TrainEvent| {
        if a.json {
            json_line(e);
            return;
        }
        let bar = bar.as_mut().expect("not json");
        match e {
            TrainEvent::Resumed { step } => {
                bar.inc(*step as u64, "");
                bar.note(&format!("resumed after step {step}"));
            }
            TrainEvent::Step(r) => {
                let ema = loss_ema.map_or(r.loss, |m| 0.9 * m + 0.1 * r.loss);
                loss_ema = Some(ema);
                bar.inc(
                    1,
                    &format!(
                        "step {} loss {:.3} (avg {ema:.3}) lr {:.2e} {:.0} tok/s",
                        r.step,
                        r.loss,
                        r.lr,
                        tokens_per_step / r.seconds
                    ),
                );
            }
            TrainEvent::Eval(r) => bar.note(&format!(
                "step {}: validation NLL {:.4}, perplexity {:.3}{}",
                r.step,
                r.nll,
                r.ppl,
                r.kl.map_or(String::new(), |kl| format!(", KL from the teacher {kl:.4}"))
            )),
            TrainEvent::Saved { step, path } => {
                bar.note(&format!("step {step}: checkpoint {}", path.display()))
            }
        }
    };
    let job = TrainJob::new(&template, &stream.tokens, &cfg, &a.out).validated(val.as_ref());
    // With no teachers this is plain training (`train_on`).
    let history = distill_on(&mut models, &teachers, job, on_event)?;
    let secs: f64 = history.steps.iter().map(|s| s.seconds).sum();
    let msg = format!(
        "done: {} steps, {:.0} tokens/s; adapter in {}",
        history.steps.len(),
        history.steps.len() as f64 * tokens_per_step / secs.max(1e-9),
        a.out.join("adapter").display()
    );
    done(bar.as_mut(), &msg);
    Ok(())
}
