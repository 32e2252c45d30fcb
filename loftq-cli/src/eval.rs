//! `loftq eval`: write a model's logits for given ids, print its perplexity on a text, or (an
//! encoder's classifier) its accuracy on labelled text.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use clap::Args;
use loftq_core::DeviceSpec;
use loftq_core::quant::host_f32;
use loftq_models::classify::{Labelled, check_examples, evaluate, read_labels};
use loftq_models::eval::{perplexity_windows, token_ids};
use loftq_models::io::{Adapter, Checkpoint, OutTensor, write_safetensors};
use loftq_models::nn::{Llama, LoadOptions, load_encoder, load_pretrained};
use loftq_models::{ModelError, Tokenizer};

use crate::error::{CliError, Result, invalid};

/// Arguments of `loftq eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// Model: an HF directory (config.json + safetensors, dense or our packed backbone) or a
    /// llama.cpp .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors or .bin), or a
    /// LoftQ organisation release (its loftq_init/ is read).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// A safetensors file with an integer tensor `input_ids` [batch, seq]; the logits go
    /// to --out.
    #[arg(
        long,
        value_name = "IDS.safetensors",
        requires = "out",
        conflicts_with = "text"
    )]
    logits_for: Option<PathBuf>,
    /// Where to write `logits` (f32 [batch, seq, vocab]) and a copy of `input_ids`.
    #[arg(long, value_name = "LOGITS.safetensors")]
    out: Option<PathBuf>,
    /// A UTF-8 text file: print the perplexity of its first --tokens tokens (no BOS), in one
    /// pass. The tokenizer is the model's tokenizer.json, or the GGUF vocabulary.
    #[arg(long, required_unless_present_any = ["logits_for", "labels"])]
    text: Option<PathBuf>,
    /// An encoder's classifier (BERT, MiniLM; its head in --adapter when fine-tuned by `loftq
    /// train --task classify`): print its accuracy and mean cross-entropy on these labelled
    /// examples, one `label<TAB>text` per line, each cut to --seq tokens. The label order is
    /// the adapter's labels.json when there is one, else the file's labels sorted.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["text", "logits_for"])]
    labels: Option<PathBuf>,
    /// Tokens per example of --labels.
    #[arg(long, default_value_t = 128, requires = "labels")]
    seq: usize,
    /// Tokens of --text to score.
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    /// Sliding window for --text: score in windows of this many tokens (default: all
    /// --tokens in one pass).
    #[arg(long, requires = "text")]
    window: Option<usize>,
    /// Stride between windows (default: half the window); each window scores only the
    /// tokens the ones before it did not.
    #[arg(long, requires = "window")]
    stride: Option<usize>,
    /// A full-precision model to compare with on --text: its perplexity, and the relative
    /// error of this model's logits against its logits on the first window.
    #[arg(long, requires = "text")]
    reference: Option<PathBuf>,
    /// Read only the first CHARS characters of --text.
    #[arg(long)]
    chars: Option<usize>,
    /// Device: cpu, wgpu[:N] or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

/// Runs `loftq eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    crate::args::note_release(&args.model, args.adapter.as_deref());
    let device = args
        .device
        .open()
        .map_err(|e| invalid(format!("--device {}: {e}", args.device)))?;
    if let Some(labels) = &args.labels {
        return print_accuracy(args, labels, &device);
    }
    let model = load_pretrained(&args.model, args.adapter.as_deref(), &device)?;
    match (&args.logits_for, &args.out, &args.text) {
        (Some(ids), Some(out), _) => write_logits(&model, ids, out, &device),
        (_, _, Some(text)) => print_perplexity(&model, args, text),
        _ => Err(invalid(
            "give --logits-for IDS --out LOGITS, or --text FILE",
        )),
    }
}

#[allow(clippy::print_stdout)]
fn print_accuracy(args: &EvalArgs, path: &Path, device: &Device) -> Result<()> {
    let adapter = args.adapter.as_deref().map(Adapter::read).transpose()?;
    let opts = LoadOptions {
        quantize: None,
        adapter: adapter.as_ref(),
    };
    let model = load_encoder(&args.model, device, &opts)?;
    let names = args
        .adapter
        .as_deref()
        .map(read_labels)
        .transpose()?
        .flatten();
    let tok = Tokenizer::for_model(&args.model)?;
    let set = Labelled::read(path, &tok, args.seq, names.as_deref())?;
    check_examples(&model, &set.examples)?;
    if set.labels.len() != model.config.num_labels {
        return Err(invalid(format!(
            "--labels has {} labels ({:?}); the classifier has {} outputs",
            set.labels.len(),
            set.labels,
            model.config.num_labels
        )));
    }
    let e = evaluate(&model, &set.examples, 16, 0);
    println!(
        "accuracy {:.4} ({} examples), cross-entropy {:.4}",
        e.accuracy,
        set.examples.len(),
        e.loss
    );
    Ok(())
}

#[allow(clippy::print_stdout)]
fn print_perplexity(model: &Llama, args: &EvalArgs, text: &Path) -> Result<()> {
    let tok = Tokenizer::for_model(&args.model)?;
    let content = std::fs::read_to_string(text).map_err(|e| ModelError::io(text, e))?;
    let content: String = match args.chars {
        Some(n) => content.chars().take(n).collect(),
        None => content,
    };
    let mut ids = tok.encode(&content)?;
    if ids.len() < 2 {
        return Err(ModelError::format(text, "fewer than two tokens").into());
    }
    ids.truncate(args.tokens.max(2));
    let window = args.window.unwrap_or(ids.len()).max(2);
    let stride = args.stride.unwrap_or(window / 2).max(1);
    if stride > window {
        return Err(invalid(format!(
            "--stride {stride} is larger than --window {window}"
        )));
    }
    let p = perplexity_windows(model, &ids, window, stride);
    let how = match window >= ids.len() {
        true => "one pass".to_string(),
        false => format!("window {window}, stride {stride}"),
    };
    println!(
        "{}: {} tokens ({how}), mean NLL {:.4} nats, perplexity {:.3}",
        text.display(),
        p.tokens + 1,
        p.nll,
        p.ppl
    );
    if let Some(path) = &args.reference {
        let device = model.embed_tokens.device();
        let reference = load_pretrained(path, None, &device)?;
        let r = perplexity_windows(&reference, &ids, window, stride);
        let first = &ids[..window.min(ids.len())];
        let n = first.len();
        let input = || token_ids(first, [1, n], &device);
        let vocab = model.config.vocab_size;
        let ours = host_f32(&model.forward(input()).reshape([n, vocab]));
        let theirs = host_f32(&reference.forward(input()).reshape([n, vocab]));
        let max = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!(
            "reference {}: mean NLL {:.4} nats, perplexity {:.3}; logits error ‖Δ‖/‖ref‖ {:.4}, \
             max |Δ| {max:.4} (first {n} tokens)",
            path.display(),
            r.nll,
            r.ppl,
            loftq_core::rel_dist(&theirs, &ours)
        );
    }
    Ok(())
}

fn write_logits(model: &Llama, ids_path: &Path, out: &Path, device: &Device) -> Result<()> {
    let inputs = Checkpoint::open(ids_path)?;
    let (shape, ids) = inputs.i64("input_ids")?;
    let bad = |msg: String| CliError::from(ModelError::tensor(ids_path, "input_ids", msg));
    let &[batch, seq] = shape.as_slice() else {
        return Err(bad(format!("shape {shape:?}, expected [batch, seq]")));
    };
    if batch == 0 || seq == 0 {
        return Err(bad("empty".into()));
    }
    let vocab = model.config.vocab_size;
    if let Some(&id) = ids.iter().find(|&&i| i < 0 || i as usize >= vocab) {
        return Err(bad(format!(
            "token id {id} outside the vocabulary 0..{vocab}"
        )));
    }
    let ids32: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let ids_t: Tensor<2, Int> = Tensor::from_data(TensorData::new(ids32, [batch, seq]), device);
    let logits = loftq_models::eval::host_logits(model, ids_t);
    let mut tensors = BTreeMap::new();
    tensors.insert(
        "logits".to_string(),
        OutTensor::f32(vec![batch, seq, vocab], &logits),
    );
    tensors.insert(
        "input_ids".to_string(),
        OutTensor {
            dtype: safetensors::Dtype::I64,
            shape: vec![batch, seq],
            bytes: ids.iter().flat_map(|x| x.to_le_bytes()).collect(),
        },
    );
    Ok(write_safetensors(out, &tensors, None)?)
}
