//! `loftq convert`: a llama.cpp GGUF file to an HF-style directory.

use std::path::PathBuf;

use clap::Args;
use loftq_models::io::GgufModel;
use loftq_models::{ModelError, Result};

/// Arguments of `loftq convert`.
#[derive(Args)]
pub struct ConvertArgs {
    /// The .gguf file (F32, F16, BF16, Q8_0, Q4_0, Q4_1 tensors).
    input: PathBuf,
    /// Output directory: config.json, model.safetensors (f32, HF names and row order),
    /// tokenizer.json. Refused if it exists and is not empty.
    out: PathBuf,
}

/// Runs `loftq convert`.
pub fn run(args: &ConvertArgs) -> Result<()> {
    if std::fs::read_dir(&args.out).is_ok_and(|mut d| d.next().is_some()) {
        return Err(ModelError::Invalid(format!(
            "{} exists and is not empty; choose a new directory",
            args.out.display()
        )));
    }
    let model = GgufModel::open(&args.input)?;
    // Write beside the target, then rename: a failure leaves no half-written directory.
    let tmp = args
        .out
        .with_extension(format!("tmp-{}", std::process::id()));
    let result = model.convert(&tmp).and_then(|()| {
        if args.out.exists() {
            std::fs::remove_dir(&args.out).map_err(|e| ModelError::io(&args.out, e))?;
        }
        std::fs::rename(&tmp, &args.out).map_err(|e| ModelError::io(&args.out, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
