//! `loftq eval`: run a model and write its logits.

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::tensor::{Int, Tensor, TensorData};
use clap::Args;
use loftq_core::DeviceSpec;
use loftq_core::quant::host_f32;
use loftq_models::io::{Checkpoint, OutTensor, write_safetensors};
use loftq_models::nn::load_model_dir;
use loftq_models::{ModelError, Result};

/// Arguments of `loftq eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// Model directory: config.json + model.safetensors (or sharded), dense or packed.
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// A safetensors file with an integer tensor `input_ids` [batch, seq].
    #[arg(long, value_name = "IDS.safetensors")]
    logits_for: PathBuf,
    /// Where to write `logits` (f32 [batch, seq, vocab]) and a copy of `input_ids`.
    #[arg(long, value_name = "LOGITS.safetensors")]
    out: PathBuf,
    /// Device: cpu, wgpu, or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

/// Runs `loftq eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    let device = args
        .device
        .device()
        .map_err(|e| ModelError::Invalid(format!("--device {}: {e}", args.device)))?;
    let model = load_model_dir(&args.model, args.adapter.as_deref(), &device)?;
    let inputs = Checkpoint::open(&args.logits_for)?;
    let (shape, ids) = inputs.i64("input_ids")?;
    let bad = |msg: String| ModelError::tensor(&args.logits_for, "input_ids", msg);
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
    let ids_t: Tensor<2, Int> = Tensor::from_data(TensorData::new(ids32, [batch, seq]), &device);
    let logits = model.forward(ids_t).reshape([batch * seq, vocab]);
    let mut tensors = BTreeMap::new();
    tensors.insert(
        "logits".to_string(),
        OutTensor::f32(vec![batch, seq, vocab], &host_f32(&logits)),
    );
    tensors.insert(
        "input_ids".to_string(),
        OutTensor {
            dtype: safetensors::Dtype::I64,
            shape: vec![batch, seq],
            bytes: ids.iter().flat_map(|x| x.to_le_bytes()).collect(),
        },
    );
    write_safetensors(&args.out, &tensors, None)
}
