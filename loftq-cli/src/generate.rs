//! `loftq generate`: text from a prompt, streamed, with tokens/s.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use loftq_core::DeviceSpec;
use loftq_models::chat::PromptFormat;
use loftq_models::generate::{GenerateParams, SamplingParams, generate};
use loftq_models::nn::load_pretrained;
use loftq_models::{ModelError, Tokenizer};

use crate::error::{Result, invalid};

/// Arguments of `loftq generate`.
#[derive(Args)]
pub struct GenerateArgs {
    /// Model: an HF directory (dense, packed or merged) or a llama.cpp .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter directory (a `loftq init` or `loftq train` output, any PEFT adapter, or a
    /// LoftQ organisation release: its loftq_init/).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The prompt.
    #[arg(long, required_unless_present = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from a file instead.
    #[arg(long, conflicts_with = "prompt")]
    prompt_file: Option<PathBuf>,
    /// Wrap the prompt in the model's chat template as one user turn (with --system before
    /// it) and generate the assistant's reply; refused for a model without a template.
    #[arg(long)]
    chat: bool,
    /// A system message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// New tokens at most (fewer when an end-of-sequence or end-of-turn token comes).
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy (the most likely token every time).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f64,
    /// Draw only among the K most likely tokens.
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Draw only among the most likely tokens whose probabilities sum to P (0 < P ≤ 1).
    #[arg(long, value_name = "P")]
    top_p: Option<f64>,
    /// Seed of the draws (the same seed gives the same text).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep going past end-of-sequence tokens (for benchmarks: always --max-tokens tokens).
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object (prompt and new token ids, text, tokens/s) instead of streaming.
    #[arg(long)]
    json: bool,
    /// Device: cpu, wgpu[:N] or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

/// Runs `loftq generate`.
#[allow(clippy::print_stdout)]
pub fn run(args: &GenerateArgs) -> Result<()> {
    crate::args::note_release(&args.model, args.adapter.as_deref());
    let sampling = sampling(args)?;
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| ModelError::io(f, e))?,
        (None, None) => unreachable!("clap requires one"),
    };
    // Everything that can be refused is read before the weights.
    let tok = Tokenizer::for_model(&args.model)?;
    let format = PromptFormat::for_model(&args.model, &tok)?;
    let ids = format.encode(&tok, &prompt, args.chat, args.system.as_deref())?;
    let device = args
        .device
        .open()
        .map_err(|e| invalid(format!("--device {}: {e}", args.device)))?;
    let model = load_pretrained(&args.model, args.adapter.as_deref(), &device)?;
    let params = GenerateParams {
        max_new_tokens: args.max_tokens,
        sampling,
        stop: if args.ignore_eos {
            Vec::new()
        } else {
            format.stop.clone()
        },
    };
    let mut stream = TextStream::default();
    let mut stdout = std::io::stdout().lock();
    let g = generate(&model, &ids, &params, &mut |id| {
        if !args.json {
            let piece = stream.push(&tok, id);
            // A closed pipe ends the output, not the run.
            let _ = stdout
                .write_all(piece.as_bytes())
                .and_then(|()| stdout.flush());
        }
    })?;
    let text = tok.decode(&g.ids)?;
    if !args.json {
        // What was held back (an unfinished character at the very end) goes out now.
        let _ = stdout.write_all(text.get(stream.printed..).unwrap_or_default().as_bytes());
    }
    if args.json {
        let report = Report {
            prompt_ids: &ids,
            ids: &g.ids,
            text: &text,
            stopped: g.stopped,
            prefill_tokens_per_s: g.prefill_tokens_per_second(),
            decode_tokens_per_s: g.decode_tokens_per_second(),
        };
        println!(
            "{}",
            serde_json::to_string(&report).expect("a report serializes")
        );
    } else {
        println!();
        eprintln!(
            "{} prompt tokens at {:.1} tok/s, {} new tokens at {:.1} tok/s{}",
            g.prompt_tokens,
            g.prefill_tokens_per_second(),
            g.ids.len(),
            g.decode_tokens_per_second(),
            if g.stopped { " (end of turn)" } else { "" }
        );
    }
    Ok(())
}

fn sampling(args: &GenerateArgs) -> Result<SamplingParams> {
    let bad = |flag: &str, why: &str| Err(invalid(format!("{flag}: {why}")));
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        return bad("--temperature", "must be finite and at least 0");
    }
    if args.top_k == Some(0) {
        return bad("--top-k", "must be at least 1");
    }
    if args.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return bad("--top-p", "must be in (0, 1]");
    }
    Ok(SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    })
}

/// Turns tokens into text as they come: a token that ends inside a UTF-8 character (byte
/// fallback, byte-level BPE) is held until the character is whole.
#[derive(Default)]
struct TextStream {
    ids: Vec<u32>,
    printed: usize,
}

impl TextStream {
    fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let Ok(text) = tok.decode(&self.ids) else {
            return String::new();
        };
        // Held: an unfinished character, or a decoder that rewrote what was printed.
        let Some(piece) = text
            .get(self.printed..)
            .filter(|_| !text.ends_with('\u{FFFD}'))
        else {
            return String::new();
        };
        let piece = piece.to_string();
        self.printed = text.len();
        piece
    }
}

/// What `loftq generate --json` prints: the token ids, the text and both speeds.
#[derive(serde::Serialize)]
struct Report<'a> {
    prompt_ids: &'a [u32],
    ids: &'a [u32],
    text: &'a str,
    stopped: bool,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
}
