//! A base and its LoRA adapter merged into one dense Hugging Face checkpoint.

use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;

use loftq_core::quant::GgmlFormat;
use loftq_core::{QuantConfig, QuantError, Quantizer};

use super::ggml::GgmlType;
use super::gguf_export::{carried_metadata, tensor_info};
use super::gguf_llama::{GgufModel, hf_name, permute_rows, rotary_heads};
use super::gguf_write::GgufWriter;
use super::{Adapter, HostTensor, StreamWriter, TensorSource, copy_side_files, open_source};
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

/// Tensor `name` of `source` with the adapter's `s·B·A` added when it adapts it.
fn merged_tensor(source: &dyn TensorSource, adapter: &Adapter, name: &str) -> Result<HostTensor> {
    let mut t = source.tensor(name)?;
    if let Some(path) = name.strip_suffix(".weight")
        && let Some(w) = adapter.modules.get(path)
    {
        let s = adapter.scaling(path).expect("listed") as f32;
        merge_into(&mut t, &w.a, &w.b, s);
    }
    source.release(name);
    Ok(t)
}

/// Every module of the adapter must meet a weight of its shape: checked before writing.
fn check_adapter(source: &dyn TensorSource, adapter: &Adapter) -> Result<()> {
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
    Ok(())
}

/// The type of a merged GGUF's linear weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufWeightType {
    /// `F32`.
    F32,
    /// `F16`, rounded to nearest even.
    F16,
    /// `BF16`, rounded to nearest even.
    Bf16,
    /// One of llama.cpp's block formats, quantized as llama.cpp's reference quantizer does.
    Ggml(GgmlFormat),
}

impl GgufWeightType {
    /// `f32`, `f16`, `bf16` or a llama.cpp format name (`q8_0`, `q4_0`, ...).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "f32" => Some(Self::F32),
            "f16" => Some(Self::F16),
            "bf16" => Some(Self::Bf16),
            _ => GgmlFormat::from_name(name).map(Self::Ggml),
        }
    }

    /// The type a matrix with rows of `cols` values gets ([`GgmlFormat::for_rows`]: a
    /// K-quant's fallback where the rows are not whole super-blocks, as `llama-quantize`).
    fn for_rows(self, cols: usize) -> Self {
        match self {
            Self::Ggml(f) => Self::Ggml(f.for_rows(cols)),
            t => t,
        }
    }

    fn ggml_type(self) -> GgmlType {
        match self {
            Self::F32 => GgmlType::F32,
            Self::F16 => GgmlType::F16,
            Self::Bf16 => GgmlType::BF16,
            Self::Ggml(f) => GgmlType(f.type_id()),
        }
    }

    /// llama.cpp's `general.file_type` of a file mostly of this type.
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Bf16 => 32,
            Self::Ggml(f) => super::gguf_export::file_type(f),
        }
    }

    /// The bytes of `data` `[rows, cols]`.
    ///
    /// # Errors
    /// A llama.cpp format's quantizer refuses a value that is not finite.
    fn encode(self, data: &[f32], shape: [usize; 2]) -> std::result::Result<Vec<u8>, QuantError> {
        Ok(match self {
            Self::F32 => encode(data, Dtype::F32),
            Self::F16 => encode(data, Dtype::F16),
            Self::Bf16 => encode(data, Dtype::BF16),
            Self::Ggml(f) => {
                let q = Quantizer::new(QuantConfig::ggml(f))?.quantize_host(data, shape)?;
                f.encode(&q.codes, &q.scales, &q.mins)?
            }
        })
    }

    fn len(self, values: usize) -> usize {
        match self {
            Self::F32 => 4 * values,
            Self::F16 | Self::Bf16 => 2 * values,
            Self::Ggml(f) => f.byte_len(values),
        }
    }
}

/// Writes `out`, a GGUF file: `source` (metadata, vocabulary and norms carried over byte for
/// byte) whose linear weights are `model`'s with `adapter`'s `s·B·A` added, in `ty`, q/k rows
/// in llama.cpp's order; the token embeddings are `model`'s in `ty` too (tied, they are the LM
/// head, and a GGUF mostly of one type is what llama.cpp's own tools write). `model` is any model `eval` reads (`source` itself,
/// a `loftq init` output, ...). One tensor in memory at a time; written atomically.
///
/// # Errors
/// [`ModelError::Tensor`] naming an adapter module the model lacks or whose shape disagrees,
/// or a weight whose rows are not whole blocks of `ty`; I/O errors.
pub fn write_merged_gguf(
    source: &GgufModel,
    model: &dyn TensorSource,
    adapter: &Adapter,
    ty: GgufWeightType,
    out: &Path,
) -> Result<()> {
    check_adapter(model, adapter)?;
    let config = &source.config;
    let layers = config.num_hidden_layers;
    // The linear weights by GGUF name, with their HF names.
    let mut linear = HashMap::new();
    let mut infos = Vec::new();
    for g in source.gguf.tensor_order() {
        let t = &source.gguf.tensors[g];
        // The embeddings too: tied, they are the LM head.
        let hf =
            hf_name(g, layers).filter(|h| is_linear_weight(h) || h == "model.embed_tokens.weight");
        let written = match &hf {
            Some(h) => {
                let shape = model.shape(h)?;
                if shape.len() != 2 || shape.as_slice() != t.shape.as_slice() {
                    return Err(ModelError::tensor(
                        model.root(),
                        h,
                        format!("shape {shape:?}, the GGUF's is {:?}", t.shape),
                    ));
                }
                let ty = ty.for_rows(shape[1]);
                if let GgufWeightType::Ggml(f) = ty
                    && !shape[1].is_multiple_of(f.super_block())
                {
                    return Err(ModelError::tensor(
                        model.root(),
                        h,
                        format!(
                            "rows of {} values are not whole {} blocks of {}",
                            shape[1],
                            f.name(),
                            f.super_block()
                        ),
                    ));
                }
                linear.insert(g.to_string(), (h.clone(), ty));
                Some((ty.ggml_type(), ty.len(shape[0] * shape[1])))
            }
            None => None,
        };
        infos.push(tensor_info(&source.gguf, g, written));
    }
    let kv = carried_metadata(&source.gguf, Some(ty.file_type()));
    let mut w = GgufWriter::create(out, &kv, &infos)?;
    for info in &infos {
        let g = info.name.as_str();
        match linear.get(g) {
            Some((h, ty)) => {
                let t = merged_tensor(model, adapter, h)?;
                let [rows, cols] = [t.shape[0], t.shape[1]];
                let data = match rotary_heads(config, h) {
                    Some(heads) => permute_rows(&t.data, rows, heads, true),
                    None => t.data,
                };
                let bytes = ty
                    .encode(&data, [rows, cols])
                    .map_err(|e| ModelError::quant(h, e))?;
                w.write(g, &bytes)?;
            }
            None => w.write(g, source.gguf.raw_tensor(g).expect("listed"))?,
        }
        source.gguf.release(g);
    }
    w.finish()
}

/// Whether HF tensor `name` is the weight of a linear layer (decoder or LM head).
fn is_linear_weight(name: &str) -> bool {
    name == "lm_head.weight"
        || (crate::config::LINEAR_PATHS.iter())
            .chain(&crate::config::FUSED_LINEAR_PATHS)
            .any(|p| name.strip_suffix(".weight").is_some_and(|m| m.ends_with(p)))
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
/// [`ModelError::Settings`] for a dtype other than `F32`, `BF16`, `F16`; I/O errors.
pub fn write_merged(model: &Path, adapter: &Adapter, dtype: Dtype, out: &Path) -> Result<()> {
    if !matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
        return Err(ModelError::Settings(format!(
            "merged weights are written as f32, bf16 or f16, not {dtype}"
        )));
    }
    let source = open_source(model)?;
    let names = source.tensor_names();
    let mut entries = Vec::with_capacity(names.len());
    for n in &names {
        entries.push((n.clone(), dtype, source.shape(n)?));
    }
    check_adapter(source.as_ref(), adapter)?;
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let mut writer = StreamWriter::create(&out.join("model.safetensors"), &entries, &meta)?;
    for n in &names {
        let t = merged_tensor(source.as_ref(), adapter, n)?;
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
