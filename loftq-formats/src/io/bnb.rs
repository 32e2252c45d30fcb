//! bitsandbytes' 4-bit checkpoints (what transformers' `save_pretrained` writes for a model
//! loaded with `load_in_4bit`): NF4 or FP4 weights, with or without double quantization.
//!
//! A quantized weight `X` is stored as `X` (packed `u8`, two codes per byte, the first in the
//! high nibble), `X.absmax`, `X.quant_map` (the 16 levels), and `X.quant_state.bitsandbytes__nf4`
//! (the JSON of the rest, as `u8` bytes). Double quantization stores `X.absmax` as `u8`
//! codes of `X.nested_quant_map`, scaled by `X.nested_absmax` per `nested_blocksize` block,
//! plus `nested_offset`. A weight reads back as `quant_map[code]·absmax[block]` in `f32`,
//! rounded to the stored `dtype` as bitsandbytes' dequantization does.

use serde::Deserialize;

use super::{Checkpoint, HostTensor, floats_from_le};
use crate::{ModelError, Result};

const STATE_PREFIX: &str = ".quant_state.bitsandbytes__";

/// The non-tensor part of a bitsandbytes quantization state.
#[derive(Clone, Debug, Deserialize)]
struct State {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Vec<usize>,
    nested_blocksize: Option<usize>,
    nested_offset: Option<f32>,
}

/// Suffixes of the tensors that belong to a bitsandbytes weight.
pub fn is_bnb_part(name: &str) -> bool {
    name.contains(STATE_PREFIX)
        || [
            ".absmax",
            ".quant_map",
            ".nested_absmax",
            ".nested_quant_map",
        ]
        .iter()
        .any(|s| name.ends_with(s))
}

/// Names of the bitsandbytes 4-bit weights in `ckpt`, sorted.
pub fn bnb_names(ckpt: &Checkpoint) -> Vec<String> {
    let mut v: Vec<String> = ckpt
        .names()
        .filter_map(|n| n.split_once(STATE_PREFIX).map(|(w, _)| w.to_string()))
        .collect();
    v.sort();
    v
}

/// Shape of bitsandbytes weight `name`, or `None` if `name` is not one.
///
/// # Errors
/// [`ModelError::Tensor`] if its state is unreadable.
pub fn bnb_shape(ckpt: &Checkpoint, name: &str) -> Result<Option<Vec<usize>>> {
    Ok(state(ckpt, name)?.map(|s| s.shape))
}

/// What [`bnb_summary`] reports of a weight.
#[derive(Clone, Debug, PartialEq)]
pub struct BnbSummary {
    /// `bnb-nf4-b64`, with `-dq` for double quantization.
    pub label: String,
    /// The weight's shape.
    pub shape: Vec<usize>,
    /// Bytes of the weight and all its parts.
    pub bytes: usize,
}

/// Label, shape and storage of bitsandbytes weight `name`, or `None` if it is not one.
///
/// # Errors
/// [`ModelError::Tensor`] if its state is unreadable.
pub fn bnb_summary(ckpt: &Checkpoint, name: &str) -> Result<Option<BnbSummary>> {
    let Some(s) = state(ckpt, name)? else {
        return Ok(None);
    };
    let dq = if s.nested_offset.is_some() { "-dq" } else { "" };
    let bytes = ckpt
        .names()
        .filter(|n| *n == name || (n.starts_with(name) && is_bnb_part(n)))
        .filter_map(|n| ckpt.entry(n))
        .map(|e| e.numel() * e.dtype.bitsize() / 8)
        .sum();
    Ok(Some(BnbSummary {
        label: format!("bnb-{}-b{}{dq}", s.quant_type, s.blocksize),
        shape: s.shape,
        bytes,
    }))
}

fn state(ckpt: &Checkpoint, name: &str) -> Result<Option<State>> {
    let Some(key) = ["nf4", "fp4"]
        .map(|t| format!("{name}{STATE_PREFIX}{t}"))
        .into_iter()
        .find(|k| ckpt.contains(k))
    else {
        return Ok(None);
    };
    let (_, bytes) = ckpt.bytes(&key)?;
    let s: State = serde_json::from_slice(bytes).map_err(|e| {
        ModelError::tensor(ckpt.root(), &key, format!("bad bitsandbytes state: {e}"))
    })?;
    Ok(Some(s))
}

/// Weight `name` dequantized, or `None` if `ckpt` holds no bitsandbytes weight of that name.
///
/// # Errors
/// [`ModelError::Tensor`] naming the tensor if a part is missing, has the wrong size or
/// dtype, or the state names an unsupported type.
pub fn read_bnb(ckpt: &Checkpoint, name: &str) -> Result<Option<HostTensor>> {
    let Some(s) = state(ckpt, name)? else {
        return Ok(None);
    };
    let root = ckpt.root();
    let bad = |key: &str, msg: String| ModelError::tensor(root, key, msg);
    if !matches!(s.quant_type.as_str(), "nf4" | "fp4") {
        return Err(bad(
            name,
            format!(
                "bitsandbytes type `{}` (nf4 and fp4 are read)",
                s.quant_type
            ),
        ));
    }
    let numel: usize = s.shape.iter().product();
    if s.blocksize == 0 || numel == 0 {
        return Err(bad(
            name,
            format!("block size {}, shape {:?}", s.blocksize, s.shape),
        ));
    }
    let blocks = numel.div_ceil(s.blocksize);
    let floats = |suffix: &str, len: usize| -> Result<Vec<f32>> {
        let key = format!("{name}.{suffix}");
        let (e, b) = ckpt.bytes(&key)?;
        let v = floats_from_le(e.dtype, b)
            .ok_or_else(|| bad(&key, format!("dtype {}, expected a float", e.dtype)))?;
        if v.len() != len {
            return Err(bad(&key, format!("{} values, expected {len}", v.len())));
        }
        Ok(v)
    };
    let bytes = |key: &str, len: usize| -> Result<&[u8]> {
        let (e, b) = ckpt.bytes(key)?;
        if e.dtype != safetensors::Dtype::U8 || b.len() != len {
            return Err(bad(
                key,
                format!("{} {} bytes, expected {len} U8", b.len(), e.dtype),
            ));
        }
        Ok(b)
    };
    let levels = floats("quant_map", 16)?;
    let absmax = match (s.nested_blocksize, s.nested_offset) {
        (Some(nb), Some(offset)) if nb > 0 => {
            let codes = bytes(&format!("{name}.absmax"), blocks)?;
            let map = floats("nested_quant_map", 256)?;
            let scales = floats("nested_absmax", blocks.div_ceil(nb))?;
            codes
                .iter()
                .enumerate()
                .map(|(i, &c)| map[usize::from(c)] * scales[i / nb] + offset)
                .collect()
        }
        _ => floats("absmax", blocks)?,
    };
    let packed = bytes(name, numel.div_ceil(2))?;
    let round: fn(f32) -> f32 = match s.dtype.as_str() {
        "bfloat16" => |x| half::bf16::from_f32(x).to_f32(),
        "float16" => |x| half::f16::from_f32(x).to_f32(),
        "float32" => |x| x,
        other => return Err(bad(name, format!("unsupported dtype `{other}`"))),
    };
    let data = (0..numel)
        .map(|k| {
            let byte = packed[k / 2];
            let code = if k % 2 == 0 { byte >> 4 } else { byte & 0xF };
            round(levels[usize::from(code)] * absmax[k / s.blocksize])
        })
        .collect();
    Ok(Some(HostTensor {
        shape: s.shape,
        data,
    }))
}
