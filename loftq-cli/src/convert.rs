//! `loftq convert`: a llama.cpp GGUF file to an HF-style directory.

use std::path::PathBuf;

use clap::Args;
use loftq_models::io::{GgufModel, write_dir_atomic};
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
    write_dir_atomic(&args.out, |tmp| model.convert(tmp))
}
