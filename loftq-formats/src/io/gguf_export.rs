//! llama.cpp files out: a GGUF base whose quantized targets are in llama.cpp's own formats,
//! and a LoRA adapter GGUF (`llama-cli -m base.gguf --lora adapter.gguf`).

use std::path::Path;

use loftq_core::quant::{GgmlFormat, PackedTensor, Scheme};

use super::ggml::GgmlType;
use super::gguf::{Gguf, MetaValue};
use super::gguf_llama::{GgufModel, gguf_name, hf_name, permute_rows, rotary_heads};
use super::gguf_write::{GgufWriter, KvEntry, TensorInfo};
use super::{Adapter, Checkpoint, TensorSource, f32_le_bytes, packed_header, read_packed};
use crate::{ModelError, Result};

/// llama.cpp's `LLAMA_FTYPE_MOSTLY_*` of a file mostly in `format` (`general.file_type`).
pub(super) fn file_type(format: GgmlFormat) -> u32 {
    match format {
        GgmlFormat::Q4_0 => 2,
        GgmlFormat::Q4_1 => 3,
        GgmlFormat::Q8_0 => 7,
        GgmlFormat::Q5_0 => 8,
        GgmlFormat::Q5_1 => 9,
        GgmlFormat::Iq4Nl => 25,
        // The `_S` mixes, the closest to one type throughout.
        GgmlFormat::Q4K => 14,
        GgmlFormat::Q5K => 16,
        GgmlFormat::Q6K => 18,
    }
}

/// The table entry of tensor `g` of `source` in a written file: its shape, and its type and
/// size when `written` says how it is re-encoded (`None`: its bytes unchanged).
pub(super) fn tensor_info(
    source: &Gguf,
    g: &str,
    written: Option<(GgmlType, usize)>,
) -> TensorInfo {
    let t = &source.tensors[g];
    let (ty, len) = written.unwrap_or_else(|| (t.ty, source.raw_tensor(g).map_or(0, <[u8]>::len)));
    TensorInfo {
        name: g.to_string(),
        dims: t.shape.iter().rev().map(|&d| d as u64).collect(),
        ty,
        len,
    }
}

/// `source`'s metadata for a written file, every entry raw, but for the alignment (the
/// writer's own) and `general.file_type`, which becomes `file_type` when given.
pub(super) fn carried_metadata(source: &Gguf, file_type: Option<u32>) -> Vec<KvEntry> {
    let mut kv: Vec<KvEntry> = source
        .raw_metadata()
        .filter(|(k, _)| !matches!(*k, "general.alignment" | "general.file_type"))
        .map(|(k, b)| KvEntry::raw(k, b))
        .collect();
    kv.extend(file_type.map(|f| KvEntry::u32("general.file_type", f)));
    kv
}

/// Where a tensor of the written base comes from.
enum Origin {
    /// The source's bytes, unchanged.
    Source,
    /// A packed weight of the checkpoint, encoded in its llama.cpp format.
    Packed(GgmlFormat),
    /// A dense weight of the checkpoint that differs from the source (a PiSSA residual),
    /// as `f32`.
    Dense,
}

/// The GGUF bytes of packed weight `p` (HF row order), rows in llama.cpp's order.
fn encode_packed(
    name: &str,
    p: &PackedTensor,
    format: GgmlFormat,
    heads: Option<usize>,
) -> Result<Vec<u8>> {
    let host = p.unpack().map_err(|e| ModelError::quant(name, e))?;
    let bytes = format
        .encode(&host.codes, &host.scales, &host.mins)
        .map_err(|e| ModelError::quant(name, e))?;
    Ok(match heads {
        Some(h) => permute_rows(&bytes, p.shape[0], h, true),
        None => bytes,
    })
}

/// Writes `out`, a GGUF holding the model of init output `checkpoint` made from `source`:
/// its packed weights encoded in their llama.cpp formats (byte for byte what llama.cpp's
/// quantizer gives for those values), every other tensor and every metadata entry carried
/// over from `source` byte for byte, and `general.file_type` set to the targets' format. A
/// dense weight of the checkpoint that differs from the source's (a PiSSA residual) is
/// written as `f32`.
///
/// # Errors
/// [`ModelError::Tensor`] naming a packed weight in a format llama.cpp does not have
/// (NF4, ...) or a checkpoint tensor the source lacks; I/O errors. Nothing is left at `out`
/// on error.
pub fn write_gguf_base(source: &GgufModel, checkpoint: &Checkpoint, out: &Path) -> Result<()> {
    let config = &source.config;
    let layers = config.num_hidden_layers;
    let mut infos = Vec::new();
    let mut origins = Vec::new();
    // The first target's format names the file's type.
    let mut file_format = None;
    for g in source.gguf.tensor_order() {
        let hf = hf_name(g, layers);
        // The header alone: the codes are read once, when written.
        let packed = match &hf {
            Some(h) => packed_header(checkpoint, h)?,
            None => None,
        };
        let (origin, written) = match (&hf, packed) {
            (Some(h), Some((quant, [rows, cols]))) => {
                let Scheme::Ggml { format } = quant.scheme else {
                    return Err(ModelError::tensor(
                        checkpoint.root(),
                        h,
                        format!(
                            "is quantized as {}, which llama.cpp cannot read; a GGUF base needs \
                             one of llama.cpp's formats ({})",
                            quant.label(),
                            GgmlFormat::NAMES
                        ),
                    ));
                };
                // A K-quant names the file's type over its fallbacks on other shapes.
                if file_format.is_none_or(|f: GgmlFormat| format.is_k() && !f.is_k()) {
                    file_format = Some(format);
                }
                let len = format.byte_len(rows * cols);
                (
                    Origin::Packed(format),
                    Some((GgmlType(format.type_id()), len)),
                )
            }
            (Some(h), None) if checkpoint.entry(h).is_some() => {
                let ours = checkpoint.f32(h)?;
                let theirs = source.tensor(h)?;
                if ours
                    .data
                    .iter()
                    .map(|v| v.to_bits())
                    .eq(theirs.data.iter().map(|v| v.to_bits()))
                {
                    (Origin::Source, None)
                } else {
                    (Origin::Dense, Some((GgmlType::F32, 4 * ours.data.len())))
                }
            }
            _ => (Origin::Source, None),
        };
        infos.push(tensor_info(&source.gguf, g, written));
        origins.push(origin);
    }
    let kv = carried_metadata(&source.gguf, file_format.map(file_type));
    let mut w = GgufWriter::create(out, &kv, &infos)?;
    for (info, origin) in infos.iter().zip(&origins) {
        let g = info.name.as_str();
        let hf = hf_name(g, layers).unwrap_or_default();
        let heads = rotary_heads(config, &hf);
        match origin {
            Origin::Source => w.write(g, source.gguf.raw_tensor(g).expect("listed"))?,
            Origin::Packed(format) => {
                let p = read_packed(checkpoint, &hf)?.expect("read before");
                w.write(g, &encode_packed(&hf, &p, *format, heads)?)?;
            }
            Origin::Dense => {
                let t = checkpoint.f32(&hf)?;
                let rows = t.shape[0];
                let data = match heads {
                    Some(h) => permute_rows(&t.data, rows, h, true),
                    None => t.data,
                };
                w.write(g, &f32_le_bytes(&data))?;
            }
        }
        source.gguf.release(g);
    }
    w.finish()
}

/// Writes `adapter` as a llama.cpp LoRA adapter GGUF for `base` (its `general.architecture`
/// and shapes): `general.type = adapter`,
/// `adapter.type = lora`, `adapter.lora.alpha`, and per module `<base tensor>.lora_a`
/// (`[in, r]` in GGUF order) and `.lora_b` (`[r, out]`), `f32`, `lora_b`'s rows of `q_proj`
/// and `k_proj` in llama.cpp's order.
///
/// llama.cpp scales every module by `alpha / r`; a module whose scaling differs from the
/// first module's (rsLoRA with several ranks, `alpha_pattern`) has the ratio folded into its
/// `lora_b`, so the product is the adapter's `s·B·A` in every case.
///
/// # Errors
/// [`ModelError::Tensor`] naming a module with no llama.cpp counterpart; I/O errors.
pub fn write_lora_gguf(adapter: &Adapter, base: &GgufModel, out: &Path) -> Result<()> {
    let config = &base.config;
    let arch = base
        .gguf
        .meta("general.architecture")
        .and_then(MetaValue::as_str)
        .expect("GgufModel::open checks the architecture");
    let first = adapter
        .modules
        .iter()
        .next()
        .ok_or_else(|| ModelError::Data("the adapter has no modules to write".into()))?;
    let alpha = adapter.scaling(first.0).expect("listed") * first.1.a.shape[0] as f64;
    let kv = [
        KvEntry::str("general.architecture", arch),
        KvEntry::str("general.type", "adapter"),
        KvEntry::str("adapter.type", "lora"),
        KvEntry::f32("adapter.lora.alpha", alpha as f32),
    ];
    let mut infos = Vec::new();
    let mut data = Vec::new();
    for (path, w) in &adapter.modules {
        let weight = format!("{path}.weight");
        let g = gguf_name(&weight).ok_or_else(|| {
            ModelError::tensor(Path::new(path), &weight, "has no llama.cpp counterpart")
        })?;
        let (r, cols) = (w.a.shape[0], w.a.shape[1]);
        let rows = w.b.shape[0];
        let factor = adapter.scaling(path).expect("listed") * r as f64 / alpha;
        let mut b = w.b.data.clone();
        if factor != 1.0 {
            b.iter_mut()
                .for_each(|v| *v = (f64::from(*v) * factor) as f32);
        }
        if let Some(h) = rotary_heads(config, &weight) {
            b = permute_rows(&b, rows, h, true);
        }
        for (suffix, dims, values) in [("lora_a", [cols, r], &w.a.data), ("lora_b", [r, rows], &b)]
        {
            infos.push(TensorInfo {
                name: format!("{g}.{suffix}"),
                dims: dims.iter().map(|&d| d as u64).collect(),
                ty: GgmlType::F32,
                len: 4 * values.len(),
            });
            data.push(f32_le_bytes(values));
        }
    }
    let mut writer = GgufWriter::create(out, &kv, &infos)?;
    for (info, bytes) in infos.iter().zip(&data) {
        writer.write(&info.name, bytes)?;
    }
    writer.finish()
}
