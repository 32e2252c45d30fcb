//! A base and its LoRA adapter merged into one dense Hugging Face checkpoint.

use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;

use super::{Adapter, HostTensor, StreamWriter, copy_side_files, open_source};
use crate::{ModelError, Result};

/// `w + s·B·A` in place (`w [out, in]`, `A [r, in]`, `B [out, r]`), in `f32` as PEFT's
/// `merge_and_unload` computes it.
fn merge_into(w: &mut HostTensor, a: &HostTensor, b: &HostTensor, s: f32) {
    let (r, cols) = (a.shape[0], a.shape[1]);
    let mut delta = vec![0f32; cols];
    for (row, wr) in w.data.chunks_mut(cols).enumerate() {
        delta.fill(0.0);
        for k in 0..r {
            let bk = b.data[row * r + k];
            for (d, &av) in delta.iter_mut().zip(&a.data[k * cols..(k + 1) * cols]) {
                *d += bk * av;
            }
        }
        for (x, d) in wr.iter_mut().zip(&delta) {
            *x += d * s;
        }
    }
}

/// The bytes of `data` as `dtype` (`F32`, `BF16` or `F16`, rounded to nearest even).
fn encode(data: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => super::bf16_le_bytes(data),
        Dtype::F16 => data
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        _ => super::f32_le_bytes(data),
    }
}

/// Writes `out` (a new directory): `model.safetensors` with every tensor of `model` (an HF
/// directory, dense, packed or bitsandbytes, or a `.gguf` file) in `dtype`, each weight the
/// adapter changes replaced by `W + s·B·A`; `config.json` and the side files (tokenizer). One
/// tensor in memory at a time; the weights file is written atomically.
///
/// # Errors
/// [`ModelError::Tensor`] naming an adapter module the model lacks or whose shape disagrees;
/// [`ModelError::Invalid`] for a dtype other than `F32`, `BF16`, `F16`; I/O errors.
pub fn write_merged(model: &Path, adapter: &Adapter, dtype: Dtype, out: &Path) -> Result<()> {
    if !matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
        return Err(ModelError::Invalid(format!(
            "merged weights are written as f32, bf16 or f16, not {dtype}"
        )));
    }
    let source = open_source(model)?;
    let names = source.tensor_names();
    let mut entries = Vec::with_capacity(names.len());
    for n in &names {
        entries.push((n.clone(), dtype, source.shape(n)?));
    }
    // Every module of the adapter must meet a weight of its shape, checked before writing.
    for (path, w) in &adapter.modules {
        let name = format!("{path}.weight");
        let shape = source.shape(&name).map_err(|_| {
            ModelError::tensor(source.root(), &name, "is adapted but not in the model")
        })?;
        if shape != [w.b.shape[0], w.a.shape[1]] {
            return Err(ModelError::tensor(
                source.root(),
                &name,
                format!(
                    "shape {shape:?}, the adapter's B·A is [{}, {}]",
                    w.b.shape[0], w.a.shape[1]
                ),
            ));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let mut writer = StreamWriter::create(&out.join("model.safetensors"), &entries, &meta)?;
    for n in &names {
        let mut t = source.tensor(n)?;
        if let Some(path) = n.strip_suffix(".weight")
            && let Some(w) = adapter.modules.get(path)
        {
            let s = adapter.scaling(path).expect("listed") as f32;
            merge_into(&mut t, &w.a, &w.b, s);
        }
        source.release(n);
        writer.write(n, &encode(&t.data, dtype))?;
    }
    writer.finish()?;
    let config = match source.llama_config() {
        Some(c) => serde_json::to_string_pretty(&c.to_hf_json()).expect("json"),
        None => {
            let src = model.join("config.json");
            std::fs::read_to_string(&src).map_err(|e| ModelError::io(&src, e))?
        }
    };
    super::write_atomic(&out.join("config.json"), config.as_bytes())?;
    copy_side_files(model, out)?;
    Ok(())
}
