//! GGUF v2/v3 files (llama.cpp): metadata, tensor table, tensor data.
//!
//! Every count, length and offset is checked against the file before it is used, so a
//! truncated or lying file is an error naming the file (and tensor), never a panic or a huge
//! allocation.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::ggml::{GgmlType, dequantize};
use crate::{ModelError, Result};

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    /// Unsigned integers (u8, u16, u32, u64).
    U64(u64),
    /// Signed integers (i8, i16, i32, i64).
    I64(i64),
    /// Floats (f32, f64).
    F64(f64),
    /// `bool`.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array of values.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// As an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U64(v) => Some(v),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// As a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F64(v) => Some(v),
            MetaValue::U64(v) => Some(v as f64),
            MetaValue::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// As an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug)]
pub struct GgufTensor {
    /// Dimensions as PyTorch orders them (outermost first): a GGUF `(in, out)` matrix is
    /// `[out, in]` here.
    pub shape: Vec<usize>,
    /// Element type.
    pub ty: GgmlType,
    start: usize,
    len: usize,
}

/// An open GGUF file.
pub struct Gguf {
    path: PathBuf,
    map: Mmap,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensor table by name.
    pub tensors: BTreeMap<String, GgufTensor>,
    /// Each metadata entry's bytes after its key (type and value), in file order, so a
    /// writer can carry it over exactly, types included.
    raw_metadata: Vec<(String, std::ops::Range<usize>)>,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| format!("truncated: {n} bytes wanted at offset {}", self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    /// A count of items each at least `min_item` bytes long, checked against what is left.
    fn count(&mut self, min_item: usize, what: &str) -> Result<usize, String> {
        let n = self.u64()?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_item as u64) > left {
            return Err(format!("{what} count {n} does not fit in the file"));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.count(1, "string length")?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| format!("string at offset {} is not UTF-8", self.pos - n))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue, String> {
        Ok(match ty {
            0 => MetaValue::U64(u64::from(self.u8()?)),
            1 => MetaValue::I64(i64::from(self.u8()? as i8)),
            2 => MetaValue::U64(u64::from(self.u16()?)),
            3 => MetaValue::I64(i64::from(self.u16()? as i16)),
            4 => MetaValue::U64(u64::from(self.u32()?)),
            5 => MetaValue::I64(i64::from(self.u32()? as i32)),
            6 => MetaValue::F64(f64::from(f32::from_bits(self.u32()?))),
            7 => MetaValue::Bool(match self.u8()? {
                0 => false,
                1 => true,
                b => return Err(format!("bool byte {b}")),
            }),
            8 => MetaValue::Str(self.string()?),
            9 => {
                if depth > 4 {
                    return Err("arrays nested too deeply".into());
                }
                let item = self.u32()?;
                let n = self.count(1, "array")?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(item, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(self.u64()? as i64),
            12 => MetaValue::F64(f64::from_bits(self.u64()?)),
            t => return Err(format!("unknown metadata value type {t}")),
        })
    }
}

impl Gguf {
    /// Opens and checks a GGUF file: header, metadata, tensor table, and that every tensor's
    /// data lies inside the file.
    ///
    /// # Errors
    /// [`ModelError::Io`] if unreadable, [`ModelError::Format`] for anything malformed.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: read-only private map; see `Checkpoint::open`.
        #[allow(unsafe_code)]
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let (version, metadata, tensors, raw_metadata) =
            parse(&map).map_err(|msg| ModelError::format(path, msg))?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            version,
            metadata,
            tensors,
            raw_metadata,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// Every metadata entry as `(key, bytes)`, the bytes being its GGUF type and value as
    /// the file stores them, in file order.
    pub fn raw_metadata(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.raw_metadata
            .iter()
            .map(|(k, r)| (k.as_str(), &self.map[r.clone()]))
    }

    /// Tensor names in the order of their data in the file.
    pub fn tensor_order(&self) -> Vec<&str> {
        let mut v: Vec<(&str, usize)> = self
            .tensors
            .iter()
            .map(|(n, t)| (n.as_str(), t.start))
            .collect();
        v.sort_by_key(|&(_, start)| start);
        v.into_iter().map(|(n, _)| n).collect()
    }

    /// Tensor `name`'s bytes as stored (its [`GgufTensor::ty`]).
    pub fn raw_tensor(&self, name: &str) -> Option<&[u8]> {
        self.tensors
            .get(name)
            .map(|t| &self.map[t.start..t.start + t.len])
    }

    /// Drops this process's resident copy of tensor `name`'s pages (see
    /// [`super::Checkpoint::release`]).
    pub fn release(&self, name: &str) {
        if let Some(t) = self.tensors.get(name) {
            super::safetensors::drop_pages(&self.map, t.start, t.len);
        }
    }

    /// Tensor `name` dequantized to `f32` (row-major in [`GgufTensor::shape`]).
    ///
    /// # Errors
    /// [`ModelError::Tensor`] if missing or of an unsupported type.
    pub fn f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::tensor(&self.path, name, "not found"))?;
        let bytes = &self.map[t.start..t.start + t.len];
        let v = dequantize(t.ty, bytes).ok_or_else(|| {
            ModelError::tensor(
                &self.path,
                name,
                format!(
                    "ggml type {} is not supported yet (F32, F16, BF16, Q8_0, Q4_0, Q4_1 are)",
                    t.ty.name()
                ),
            )
        })?;
        Ok((t.shape.clone(), v))
    }
}

type Parsed = (
    u32,
    BTreeMap<String, MetaValue>,
    BTreeMap<String, GgufTensor>,
    Vec<(String, std::ops::Range<usize>)>,
);

fn parse(buf: &[u8]) -> Result<Parsed, String> {
    let mut c = Cursor { buf, pos: 0 };
    if c.take(4).map_err(|_| "not a GGUF file (too short)")? != b"GGUF" {
        return Err("not a GGUF file (bad magic)".into());
    }
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not supported (2, 3)"));
    }
    let n_tensors = c.count(24, "tensor")?;
    let n_kv = c.count(12, "metadata")?;
    let mut metadata = BTreeMap::new();
    let mut raw = Vec::with_capacity(n_kv);
    for _ in 0..n_kv {
        let key = c.string()?;
        let at = c.pos;
        let ty = c.u32()?;
        let v = c
            .value(ty, 0)
            .map_err(|e| format!("metadata `{key}`: {e}"))?;
        if metadata.insert(key.clone(), v).is_some() {
            return Err(format!("metadata `{key}` is listed twice"));
        }
        raw.push((key, at..c.pos));
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two() && *a <= 1 << 20)
            .ok_or("general.alignment must be a power of two")? as usize,
    };
    let mut infos = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = c.string()?;
        let bad = |m: String| format!("tensor `{name}`: {m}");
        let n_dims = c.u32()? as usize;
        if !(1..=4).contains(&n_dims) {
            return Err(bad(format!("{n_dims} dimensions")));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(usize::try_from(c.u64()?).map_err(|_| bad("dimension too large".into()))?);
        }
        let ty = GgmlType(c.u32()?);
        let offset = c.u64()?;
        infos.push((name, dims, ty, offset));
    }
    let data_start = c.pos.next_multiple_of(alignment);
    let mut tensors = BTreeMap::new();
    for (name, dims, ty, offset) in infos {
        let bad = |m: String| format!("tensor `{name}`: {m}");
        let numel = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad("too many elements".into()))?;
        let len = ty.byte_len(numel).ok_or_else(|| {
            bad(format!(
                "ggml type {} with {numel} elements has no known size",
                ty.name()
            ))
        })?;
        let start = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data_start))
            .filter(|s| s.checked_add(len).is_some_and(|e| e <= buf.len()))
            .ok_or_else(|| {
                bad(format!(
                    "data at offset {offset} (+{len} bytes) is past the end of the file"
                ))
            })?;
        let shape = dims.into_iter().rev().collect();
        if tensors
            .insert(
                name.clone(),
                GgufTensor {
                    shape,
                    ty,
                    start,
                    len,
                },
            )
            .is_some()
        {
            return Err(bad("listed twice".into()));
        }
    }
    Ok((version, metadata, tensors, raw))
}
