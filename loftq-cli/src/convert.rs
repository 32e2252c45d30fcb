//! `loftq convert`: a llama.cpp GGUF file to an HF-style directory, or an HF directory to a
//! GGUF file.

use std::path::PathBuf;

use clap::Args;
use loftq_models::io::{
    GgufModel, is_gguf, require_empty_dir, write_dir_atomic, write_gguf_from_hf,
};

use crate::error::{Result, invalid};

/// Arguments of `loftq convert`.
#[derive(Args)]
pub struct ConvertArgs {
    /// A .gguf file (any type this crate reads), or a Hugging Face Llama-family directory with
    /// a byte-level BPE tokenizer.json (GPT-2's, SmolLM2's, Llama 3's or Qwen2's pre-tokenizer).
    input: PathBuf,
    /// From a .gguf: an output directory (config.json, model.safetensors in f32 with HF names
    /// and row order, tokenizer.json), refused if it exists and is not empty. From a
    /// directory: a .gguf file as llama.cpp's convert_hf_to_gguf.py lays it out (metadata,
    /// vocabulary, chat template; tensors in their own f32/f16/bf16), refused if it exists.
    out: PathBuf,
}

/// Runs `loftq convert`.
pub fn run(args: &ConvertArgs) -> Result<()> {
    if !is_gguf(&args.input) {
        if args.out.exists() || args.out.extension().is_none_or(|e| e != "gguf") {
            return Err(invalid(format!(
                "{}: the output of a directory's conversion is a new .gguf file",
                args.out.display()
            )));
        }
        return Ok(write_gguf_from_hf(&args.input, &args.out)?);
    }
    require_empty_dir(&args.out)?;
    let model = GgufModel::open(&args.input)?;
    Ok(write_dir_atomic(&args.out, |tmp| model.convert(tmp))?)
}
