//! Our packed backbone format: a safetensors file in which every quantized weight `X` is
//! stored as its packed codes and scales, the other tensors as they were.
//!
//! For a quantized `X` (e.g. `model.layers.0.mlp.up_proj.weight`):
//! - `X.qcodes` (`U8`): codes packed as [`loftq_core::quant::pack_codes`] describes;
//! - `X.qscales` (`F32`, one per block), or double-quantized `X.qscales_codes` (`U8`) and
//!   `X.qscales_absmax` (`F32`, one per 256 blocks);
//! - `X.qmins` (`F32`, asymmetric integers only);
//! - in `__metadata__`, `loftq.q.X` = `{"shape": [out, in], "config": <QuantConfig>,
//!   "scales_offset": <f32, double quantization only>}`, and `loftq.format` = `packed-1`.
//!
//! Reading gives back the exact [`PackedTensor`] that was written (tested).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use loftq_core::QuantConfig;
use loftq_core::quant::{DoubleQuant, PackedTensor, Scales};
use serde::{Deserialize, Serialize};

use super::safetensors::{Checkpoint, HostTensor, OutTensor, floats_from_le};
use crate::{ModelError, Result};

/// Value of the `loftq.format` metadata key.
pub const FORMAT: &str = "packed-1";
/// Metadata key naming the format.
pub const FORMAT_KEY: &str = "loftq.format";

#[derive(Serialize, Deserialize)]
struct Header {
    shape: [usize; 2],
    config: QuantConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scales_offset: Option<f32>,
}

/// Prefix of the metadata key holding a packed weight's header (`loftq.q.<name>`).
pub const HEADER_PREFIX: &str = "loftq.q.";

fn meta_key(name: &str) -> String {
    format!("{HEADER_PREFIX}{name}")
}

/// Adds the tensors and metadata of packed weight `name` to a file being assembled.
pub fn add_packed(
    name: &str,
    p: &PackedTensor,
    tensors: &mut BTreeMap<String, OutTensor>,
    metadata: &mut HashMap<String, String>,
) {
    tensors.insert(
        format!("{name}.qcodes"),
        OutTensor::u8(vec![p.data.len()], p.data.clone()),
    );
    let mut offset = None;
    match &p.scales {
        Scales::F32(v) => {
            tensors.insert(format!("{name}.qscales"), OutTensor::f32(vec![v.len()], v));
        }
        Scales::Double(dq) => {
            tensors.insert(
                format!("{name}.qscales_codes"),
                OutTensor::u8(vec![dq.codes.len()], dq.codes.clone()),
            );
            tensors.insert(
                format!("{name}.qscales_absmax"),
                OutTensor::f32(vec![dq.absmax.len()], &dq.absmax),
            );
            offset = Some(dq.offset);
        }
    }
    if !p.mins.is_empty() {
        tensors.insert(
            format!("{name}.qmins"),
            OutTensor::f32(vec![p.mins.len()], &p.mins),
        );
    }
    let header = Header {
        shape: p.shape,
        config: p.config,
        scales_offset: offset,
    };
    metadata.insert(
        meta_key(name),
        serde_json::to_string(&header).expect("header serializes"),
    );
    metadata.insert(FORMAT_KEY.into(), FORMAT.into());
}

/// Names of the packed weights in `ckpt` (the `X` of `loftq.q.X`).
pub fn packed_names(ckpt: &Checkpoint) -> Vec<String> {
    let mut v: Vec<String> = ckpt
        .metadata()
        .keys()
        .filter_map(|k| k.strip_prefix(HEADER_PREFIX).map(str::to_string))
        .collect();
    v.sort();
    v
}

/// The quantizer and shape of packed weight `name`, from its header alone (checked), or
/// `None` if `ckpt` holds no packed weight of that name.
///
/// # Errors
/// [`ModelError`] naming the tensor if the header is malformed.
pub fn packed_header(ckpt: &Checkpoint, name: &str) -> Result<Option<(QuantConfig, [usize; 2])>> {
    Ok(header(ckpt, name)?.map(|h| (h.config, h.shape)))
}

/// The checked header of packed weight `name`.
fn header(ckpt: &Checkpoint, name: &str) -> Result<Option<Header>> {
    let Some(header) = ckpt.metadata().get(&meta_key(name)) else {
        return Ok(None);
    };
    // The header lives in the metadata of the file that holds the codes.
    let root = ckpt.file_holding(&format!("{name}.qcodes"));
    let header: Header = serde_json::from_str(header)
        .map_err(|e| ModelError::tensor(root, name, format!("bad packed header: {e}")))?;
    // The header is checked before any size is computed from it.
    header
        .config
        .validate()
        .map_err(|e| ModelError::tensor(root, name, format!("bad packed header: {e}")))?;
    let [rows, cols] = header.shape;
    if rows.checked_mul(cols).is_none_or(|n| n == 0) {
        return Err(ModelError::tensor(
            root,
            name,
            format!("bad packed header: shape {:?}", header.shape),
        ));
    }
    Ok(Some(header))
}

/// Reads packed weight `name`, or `None` if `ckpt` holds no packed weight of that name.
///
/// # Errors
/// [`ModelError`] naming the tensor if the header or the buffers are inconsistent.
pub fn read_packed(ckpt: &Checkpoint, name: &str) -> Result<Option<PackedTensor>> {
    let Some(header) = header(ckpt, name)? else {
        return Ok(None);
    };
    let root = ckpt.file_holding(&format!("{name}.qcodes"));
    let bytes_u8 = |suffix: &str| -> Result<Vec<u8>> {
        let key = format!("{name}.{suffix}");
        let (e, b) = ckpt.bytes(&key)?;
        if e.dtype != safetensors::Dtype::U8 {
            return Err(ModelError::tensor(
                root,
                &key,
                format!("dtype {}, expected U8", e.dtype),
            ));
        }
        Ok(b.to_vec())
    };
    let floats = |suffix: &str| -> Result<Vec<f32>> {
        let key = format!("{name}.{suffix}");
        let (e, b) = ckpt.bytes(&key)?;
        floats_from_le(e.dtype, b).ok_or_else(|| {
            ModelError::tensor(root, &key, format!("dtype {} is not a float", e.dtype))
        })
    };
    let scales = match header.scales_offset {
        None => Scales::F32(floats("qscales")?),
        Some(offset) => Scales::Double(DoubleQuant {
            offset,
            codes: bytes_u8("qscales_codes")?,
            absmax: floats("qscales_absmax")?,
        }),
    };
    let mins = if ckpt.contains(&format!("{name}.qmins")) {
        floats("qmins")?
    } else {
        Vec::new()
    };
    let p = PackedTensor {
        shape: header.shape,
        config: header.config,
        data: bytes_u8("qcodes")?,
        scales,
        mins,
    };
    // Checks every size against the shape and configuration.
    p.unpack()
        .map_err(|e| ModelError::tensor(root, name, e.to_string()))?;
    Ok(Some(p))
}

/// Packed weight `name` (read from `root`) dequantized to `f32`.
///
/// # Errors
/// [`ModelError::Tensor`] if its codes or scales are inconsistent.
pub fn dequantize_packed(root: &Path, name: &str, p: &PackedTensor) -> Result<HostTensor> {
    let data = p
        .dequantize()
        .map_err(|e| ModelError::tensor(root, name, e.to_string()))?;
    Ok(HostTensor {
        shape: p.shape.to_vec(),
        data,
    })
}
