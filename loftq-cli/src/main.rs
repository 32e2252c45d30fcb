//! `loftq`: the command-line tool of loftq-rs.
//!
//! Commands: `init` (the main job), `refine` (adapters for a base quantized elsewhere),
//! `eval` (logits, perplexity), `generate` (text), `convert` (GGUF to HF), `export` (llama.cpp
//! files, merged checkpoints), `train` (fine-tune the adapter), `inspect`, `codebook`.

mod args;
mod convert;
mod error;
mod eval;
mod export;
mod failure;
mod generate;
mod init;
mod inspect;
mod progress;
mod refine;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use loftq_core::QuantConfig;
use loftq_core::quant::{Codebook, Rounding};

#[derive(Parser)]
#[command(
    version,
    about = "LoftQ: quantization-aware LoRA initialisation and fine-tuning"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a codebook's levels and decision thresholds.
    Codebook {
        /// A quantizer with a codebook: nf1..nf8 (NormalFloat, as bitsandbytes and PEFT) or
        /// uniform1..uniform8 (PEFT's linspace(-1, 1, 2^bits)).
        quantizer: QuantConfig,
        /// Threshold rule.
        #[arg(long, value_enum, default_value_t = Rounding::Peft)]
        rounding: Rounding,
    },
    /// Quantize every targeted weight of a checkpoint and start its LoRA adapter (LoftQ,
    /// QLoRA, PiSSA, QPiSSA): writes the backbone, a PEFT adapter and report.json.
    Init(Box<init::InitArgs>),
    /// Fit new LoRA adapters to a backbone that is already quantized (a `loftq init` output
    /// or a bitsandbytes 4-bit checkpoint), from the full-precision weights; optionally keep
    /// a layer's adapter only if it brings the logits on a text closer to the original's.
    Refine(Box<refine::RefineArgs>),
    /// Run a model (HF directory, dense or packed, or a .gguf file) with an optional PEFT
    /// adapter: write its logits for given token ids, or print its perplexity on a text.
    Eval(eval::EvalArgs),
    /// Fine-tune the LoRA factors on a frozen (quantized) base: AdamW, warm-up and decay,
    /// clipping, accumulation, validation perplexity, checkpoints and --resume; the result
    /// is a PEFT adapter.
    Train(Box<train::TrainArgs>),
    /// Convert a llama.cpp .gguf file into an HF-style directory (config.json,
    /// model.safetensors, tokenizer.json), or an HF directory into a .gguf file.
    Convert(convert::ConvertArgs),
    /// Write llama.cpp files: an init output in one of llama.cpp's formats as a GGUF base
    /// (metadata, vocabulary and other tensors carried over from the source GGUF), and a PEFT
    /// adapter as a llama.cpp LoRA adapter GGUF; or, with --merge, a model and its adapter as
    /// one dense Hugging Face checkpoint.
    Export(export::ExportArgs),
    /// Generate text from a prompt (raw, or as a chat turn in the model's template) with a KV
    /// cache: greedy or sampled (temperature, top-k, top-p, seed), streamed, with tokens/s.
    Generate(Box<generate::GenerateArgs>),
    /// Show what a checkpoint, GGUF file, packed or bitsandbytes backbone or PEFT adapter holds:
    /// tensors, dtypes or quantizers, bits per parameter.
    Inspect(inspect::InspectArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging();
    let result = failure::guarded(|| match cli.command {
        Command::Codebook {
            quantizer,
            rounding,
        } => codebook(quantizer, rounding),
        Command::Init(args) => init::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Convert(args) => convert::run(&args),
        Command::Export(args) => export::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Refine(args) => refine::run(&args),
    });
    // With LOFTQ_PROFILE set: where the device's time went (`loftq_core::profile`).
    if let Some(table) = loftq_core::profile::take_markdown() {
        let t = loftq_core::transfers::transfers_all_threads();
        eprintln!("time by phase (LOFTQ_PROFILE):\n{table}");
        eprintln!(
            "host reads: {} ({} values); uploads: {} ({} values)",
            t.reads, t.read_values, t.uploads, t.upload_values
        );
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            if let Some(hint) = e.hint() {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

/// `tracing` logs on stderr, filtered by `LOFTQ_LOG` (e.g. `info`, `loftq_models=debug`);
/// only warnings and errors when it is unset.
fn logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOFTQ_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[allow(clippy::print_stdout)]
fn codebook(quantizer: QuantConfig, rounding: Rounding) -> error::Result<()> {
    let Some(cb) = Codebook::of(quantizer.scheme) else {
        return Err(error::invalid(format!(
            "`{}` has no codebook (its levels are computed per block); \
             nf1..nf8 and uniform1..uniform8 have one",
            quantizer.scheme.name()
        )));
    };
    let thresholds = cb.thresholds(rounding);
    println!("code\tlevel\tgoes up at (>=)");
    for (i, level) in cb.levels().iter().enumerate() {
        let t = thresholds
            .get(i)
            .map_or(String::new(), |t| format!("{t:.9e}"));
        println!("{i}\t{level:.9}\t{t}");
    }
    Ok(())
}
