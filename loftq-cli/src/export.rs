//! `loftq export`: an init output and/or a PEFT adapter as llama.cpp files, or a model and its
//! adapter merged into one dense checkpoint.

use std::path::{Path, PathBuf};

use clap::Args;
use loftq_models::ModelError;
use loftq_models::io::{
    Adapter, Checkpoint, GgufWeightType, SourceGguf, TensorSource, open_source, require_empty_dir,
    write_dir_atomic, write_gguf_base, write_lora_gguf, write_merged, write_merged_gguf,
};

use crate::error::{Result, invalid};

/// Arguments of `loftq export`.
#[derive(Args)]
pub struct ExportArgs {
    /// The model the start was made from (`loftq init --model`): a .gguf file, whose
    /// metadata, vocabulary and every tensor that was not quantized are carried over byte for
    /// byte, or a Hugging Face directory, converted as `loftq convert DIR F.gguf` does (into a
    /// temporary file beside OUT); its architecture names the adapter's base. With --merge:
    /// write a merged GGUF.
    #[arg(long, required_unless_present = "merge")]
    source: Option<PathBuf>,
    /// Merge --adapter's `s·B·A` into --model's weights (--model: any model `eval` reads,
    /// dense, packed, bitsandbytes or .gguf; with --source, the source by default). Without
    /// --source, OUT is a Hugging Face directory (model.safetensors, config.json, tokenizer);
    /// with --source, OUT/model.gguf is the source (metadata, vocabulary, norms) with the
    /// merged linear weights and the embeddings in --dtype.
    #[arg(long, requires = "adapter")]
    merge: bool,
    /// Weight type of the merge: bf16, f16, f32, or (a GGUF only) one of llama.cpp's
    /// formats q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k, iq4_nl, quantized from the
    /// merged weights (a K-quant on rows that are not whole super-blocks of 256 takes
    /// llama-quantize's fallback: q4_k → q5_0, q5_k → q5_1, q6_k → q8_0).
    #[arg(long, default_value = "bf16", requires = "merge", value_parser = parse_dtype)]
    dtype: GgufWeightType,
    /// A `loftq init` output whose backbone is packed in one of llama.cpp's formats
    /// (--bits q4_0 ... q8_0, q4_k, q5_k, q6_k, iq4_nl): written as OUT/model.gguf.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A PEFT adapter directory (from init or train): written as OUT/adapter.gguf, a
    /// llama.cpp LoRA adapter (`llama-cli -m model.gguf --lora adapter.gguf`).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Output directory (created if needed); files that exist there are refused (with
    /// --merge into a Hugging Face directory, a directory that is not empty).
    #[arg(long)]
    out: PathBuf,
}

fn parse_dtype(s: &str) -> std::result::Result<GgufWeightType, String> {
    GgufWeightType::from_name(s).ok_or_else(|| {
        format!(
            "unknown type {s:?}: bf16, f16, f32 or one of {}",
            loftq_core::quant::GgmlFormat::NAMES
        )
    })
}

/// `--merge` without --source: the merged Hugging Face checkpoint, into a temporary directory
/// renamed into place.
fn merge(args: &ExportArgs, model: &Path, adapter: &Adapter) -> Result<()> {
    require_empty_dir(&args.out)?;
    let dtype = match args.dtype {
        GgufWeightType::Bf16 => safetensors::Dtype::BF16,
        GgufWeightType::F16 => safetensors::Dtype::F16,
        GgufWeightType::F32 => safetensors::Dtype::F32,
        GgufWeightType::Ggml(f) => {
            return Err(invalid(format!(
                "--dtype {}: a Hugging Face checkpoint holds bf16, f16 or f32; give --source \
                 M.gguf for a merged GGUF in a llama.cpp format",
                f.name()
            )));
        }
    };
    write_dir_atomic(&args.out, |tmp| write_merged(model, adapter, dtype, tmp))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// `--merge --source`: OUT/model.gguf, the source with its linear weights merged.
fn merge_gguf(args: &ExportArgs, source: &Path, adapter: &Adapter) -> Result<()> {
    let out = args.out.join("model.gguf");
    if out.exists() {
        return Err(invalid(format!(
            "{} exists; choose another --out",
            out.display()
        )));
    }
    let source = open_source_gguf(source, &args.out)?;
    let gguf = &source.model;
    let model = match &args.model {
        Some(m) => Some(open_source(m)?),
        None => None,
    };
    let model: &dyn TensorSource = model.as_deref().unwrap_or(gguf);
    let created = !args.out.exists();
    std::fs::create_dir_all(&args.out).map_err(|e| ModelError::io(&args.out, e))?;
    let result = write_merged_gguf(gguf, model, adapter, args.dtype, &out);
    match &result {
        Ok(()) => eprintln!("wrote {}", out.display()),
        Err(_) if created => {
            let _ = std::fs::remove_dir(&args.out);
        }
        Err(_) => {}
    }
    Ok(result?)
}

/// The GGUF of `--source`; an HF directory is converted into a temporary file beside `out`.
fn open_source_gguf(path: &Path, out: &Path) -> Result<SourceGguf> {
    let name = out
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy());
    Ok(SourceGguf::open(
        path,
        &out.with_file_name(format!(".{name}.loftq-source.gguf")),
    )?)
}

/// Runs `loftq export`.
pub fn run(args: &ExportArgs) -> Result<()> {
    if args.merge {
        let adapter = Adapter::read(args.adapter.as_ref().expect("clap requires it"))?;
        return match (&args.source, &args.model) {
            (Some(source), _) => merge_gguf(args, source, &adapter),
            (None, Some(model)) => merge(args, model, &adapter),
            (None, None) => Err(invalid(
                "--merge needs --model (a Hugging Face merge) or --source (a GGUF merge)",
            )),
        };
    }
    if args.model.is_none() && args.adapter.is_none() {
        return Err(invalid(
            "nothing to export: give --model (an init output) and/or --adapter",
        ));
    }
    let source = open_source_gguf(args.source.as_ref().expect("clap requires it"), &args.out)?;
    let source = &source.model;
    // Everything is read and checked before the first file is written.
    let model = args
        .model
        .as_ref()
        .map(|d| Checkpoint::open(&d.join("model.safetensors")))
        .transpose()?;
    let adapter = args
        .adapter
        .as_ref()
        .map(|d| Adapter::read(d))
        .transpose()?;
    let (base_out, lora_out) = (args.out.join("model.gguf"), args.out.join("adapter.gguf"));
    for (given, path) in [(model.is_some(), &base_out), (adapter.is_some(), &lora_out)] {
        if given && path.exists() {
            return Err(invalid(format!(
                "{} exists; choose another --out",
                path.display()
            )));
        }
    }
    let created = !args.out.exists();
    std::fs::create_dir_all(&args.out).map_err(|e| ModelError::io(&args.out, e))?;
    let result = (|| {
        if let Some(ckpt) = &model {
            write_gguf_base(source, ckpt, &base_out)?;
            eprintln!("wrote {}", base_out.display());
        }
        if let Some(a) = &adapter {
            write_lora_gguf(a, source, &lora_out)?;
            eprintln!("wrote {}", lora_out.display());
        }
        Ok(())
    })();
    if result.is_err() {
        // What this run wrote goes; a directory it made goes with it.
        for (given, path) in [(model.is_some(), &base_out), (adapter.is_some(), &lora_out)] {
            if given {
                let _ = std::fs::remove_file(path);
            }
        }
        if created {
            let _ = std::fs::remove_dir(&args.out);
        }
    }
    result
}
