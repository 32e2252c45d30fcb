//! `loftq export`: an init output and/or a PEFT adapter as llama.cpp files, or a model and its
//! adapter merged into one dense checkpoint.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use loftq_models::io::{
    Adapter, Checkpoint, GgufModel, write_dir_atomic, write_gguf_base, write_lora_gguf,
    write_merged,
};
use loftq_models::{ModelError, Result};

/// Arguments of `loftq export`.
#[derive(Args)]
pub struct ExportArgs {
    /// The .gguf file the start was made from (`loftq init --model`): its metadata,
    /// vocabulary and every tensor that was not quantized are carried over byte for byte;
    /// its architecture names the adapter's base. Needed for the GGUF files, not for --merge.
    #[arg(long, required_unless_present = "merge")]
    source: Option<PathBuf>,
    /// Merge instead: write OUT as a Hugging Face directory whose weights are --model's with
    /// --adapter's `s·B·A` added (model.safetensors in --dtype, config.json, tokenizer).
    /// --model may be any model `eval` reads (dense, packed, bitsandbytes, .gguf).
    #[arg(long, requires_all = ["model", "adapter"], conflicts_with = "source")]
    merge: bool,
    /// Weight type of the merged checkpoint.
    #[arg(long, value_enum, default_value_t = DtypeArg::Bf16, requires = "merge")]
    dtype: DtypeArg,
    /// A `loftq init` output whose backbone is packed in one of llama.cpp's formats
    /// (--bits q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl): written as OUT/model.gguf.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A PEFT adapter directory (from init or train): written as OUT/adapter.gguf, a
    /// llama.cpp LoRA adapter (`llama-cli -m model.gguf --lora adapter.gguf`).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Output directory (created if needed); files that exist there are refused (with
    /// --merge, a directory that is not empty).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    Bf16,
    F16,
    F32,
}

/// `--merge`: the merged checkpoint, into a temporary directory renamed into place.
fn merge(args: &ExportArgs, model: &std::path::Path, adapter: &std::path::Path) -> Result<()> {
    if std::fs::read_dir(&args.out).is_ok_and(|mut d| d.next().is_some()) {
        return Err(ModelError::Invalid(format!(
            "{} exists and is not empty; choose a new --out",
            args.out.display()
        )));
    }
    let adapter = Adapter::read(adapter)?;
    let dtype = match args.dtype {
        DtypeArg::Bf16 => safetensors::Dtype::BF16,
        DtypeArg::F16 => safetensors::Dtype::F16,
        DtypeArg::F32 => safetensors::Dtype::F32,
    };
    write_dir_atomic(&args.out, |tmp| write_merged(model, &adapter, dtype, tmp))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// Runs `loftq export`.
pub fn run(args: &ExportArgs) -> Result<()> {
    if let (true, Some(m), Some(a)) = (args.merge, &args.model, &args.adapter) {
        return merge(args, m, a);
    }
    if args.model.is_none() && args.adapter.is_none() {
        return Err(ModelError::Invalid(
            "nothing to export: give --model (an init output) and/or --adapter".into(),
        ));
    }
    let source = GgufModel::open(args.source.as_ref().expect("clap requires it"))?;
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
            return Err(ModelError::Invalid(format!(
                "{} exists; choose another --out",
                path.display()
            )));
        }
    }
    let created = !args.out.exists();
    std::fs::create_dir_all(&args.out).map_err(|e| ModelError::io(&args.out, e))?;
    let result = (|| {
        if let Some(ckpt) = &model {
            write_gguf_base(&source, ckpt, &base_out)?;
            eprintln!("wrote {}", base_out.display());
        }
        if let Some(a) = &adapter {
            write_lora_gguf(a, &source, &lora_out)?;
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
