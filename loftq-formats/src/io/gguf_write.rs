//! Writing GGUF v3 files: metadata entries (carried over byte for byte, or new with their
//! GGUF type), a tensor table, then the data, streamed one tensor at a time.

use std::path::Path;

use super::atomic::AtomicFile;
use super::ggml::GgmlType;
use super::gguf::MetaValue;
use super::stream::Declared;
use crate::Result;

/// Data alignment of every file written here (GGUF's default).
pub const ALIGNMENT: usize = 32;

/// One metadata entry: its key and its bytes after the key (GGUF type, then value).
#[derive(Clone, Debug, PartialEq)]
pub struct KvEntry {
    /// Key.
    pub key: String,
    /// Type tag and value, as a file stores them.
    pub bytes: Vec<u8>,
}

impl KvEntry {
    /// An entry copied as read ([`super::Gguf::raw_metadata`]).
    pub fn raw(key: &str, bytes: &[u8]) -> Self {
        Self {
            key: key.into(),
            bytes: bytes.to_vec(),
        }
    }

    /// A `string` entry.
    pub fn str(key: &str, v: &str) -> Self {
        let mut bytes = 8u32.to_le_bytes().to_vec();
        put_str(&mut bytes, v);
        Self::raw(key, &bytes)
    }

    /// A `uint32` entry.
    pub fn u32(key: &str, v: u32) -> Self {
        Self::raw(key, &[4u32.to_le_bytes(), v.to_le_bytes()].concat())
    }

    /// A `bool` entry.
    pub fn bool(key: &str, v: bool) -> Self {
        Self::raw(
            key,
            &[7u32.to_le_bytes().as_slice(), &[u8::from(v)]].concat(),
        )
    }

    /// An array of `string`s.
    pub fn strs(key: &str, v: &[String]) -> Self {
        let mut bytes = [9u32.to_le_bytes(), 8u32.to_le_bytes()].concat();
        bytes.extend((v.len() as u64).to_le_bytes());
        for s in v {
            put_str(&mut bytes, s);
        }
        Self::raw(key, &bytes)
    }

    /// An array of `int32`s.
    pub fn i32s(key: &str, v: &[i32]) -> Self {
        let mut bytes = [9u32.to_le_bytes(), 5u32.to_le_bytes()].concat();
        bytes.extend((v.len() as u64).to_le_bytes());
        bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        Self::raw(key, &bytes)
    }

    /// A `float32` entry.
    pub fn f32(key: &str, v: f32) -> Self {
        Self::raw(key, &[6u32.to_le_bytes(), v.to_le_bytes()].concat())
    }

    /// An entry from a [`MetaValue`], integers as 64-bit and floats as `f64` (its types are
    /// not kept by the reader; llama.cpp wants the original ones, so copy those raw).
    pub fn value(key: &str, v: &MetaValue) -> Self {
        let mut bytes = type_of(v).to_le_bytes().to_vec();
        put_value(&mut bytes, v);
        Self::raw(key, &bytes)
    }
}

/// A tensor's entry in the table: name, dims fastest-varying first (GGUF order), type and
/// the length of its data.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Name.
    pub name: String,
    /// Dims, GGUF order (`[in, out]` for a PyTorch `[out, in]` matrix).
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Bytes of data.
    pub len: usize,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U64(x) => out.extend(x.to_le_bytes()),
        MetaValue::I64(x) => out.extend(x.to_le_bytes()),
        MetaValue::F64(x) => out.extend(x.to_le_bytes()),
        MetaValue::Bool(b) => out.push(u8::from(*b)),
        MetaValue::Str(s) => put_str(out, s),
        MetaValue::Array(items) => {
            out.extend(items.first().map_or(8, type_of).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
    }
}

fn type_of(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
        MetaValue::Bool(_) => 7,
        MetaValue::Str(_) => 8,
        MetaValue::Array(_) => 9,
    }
}

/// Header, metadata and tensor table, padded to [`ALIGNMENT`]; the data of tensor `i` then
/// starts at the returned offset `i` past the end of these bytes.
fn header(kv: &[KvEntry], tensors: &[TensorInfo]) -> (Vec<u8>, Vec<usize>) {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kv.len() as u64).to_le_bytes());
    for e in kv {
        put_str(&mut out, &e.key);
        out.extend(&e.bytes);
    }
    let mut offset = 0usize;
    let mut offsets = Vec::with_capacity(tensors.len());
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(t.ty.0.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.len).next_multiple_of(ALIGNMENT);
    }
    out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
    (out, offsets)
}

/// A GGUF file written tensor by tensor, in the order of its table, under a temporary name
/// until [`GgufWriter::finish`] renames it into place (dropped before, it removes it).
#[derive(Debug)]
pub struct GgufWriter {
    file: AtomicFile,
    order: Declared,
}

impl GgufWriter {
    /// Starts `path` with its metadata and tensor table.
    ///
    /// # Errors
    /// [`crate::ModelError::Io`] if the temporary file cannot be created or written.
    pub fn create(path: &Path, kv: &[KvEntry], tensors: &[TensorInfo]) -> Result<Self> {
        let mut file = AtomicFile::create(path)?;
        file.write(&header(kv, tensors).0)?;
        let order = tensors.iter().map(|t| (t.name.clone(), t.len)).collect();
        Ok(Self {
            file,
            order: Declared::new(order),
        })
    }

    /// Writes the next tensor's data (and the padding after it).
    ///
    /// # Errors
    /// [`crate::ModelError::Tensor`] if `name` is not the next tensor or its length is wrong;
    /// [`crate::ModelError::Io`].
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.order.advance(self.file.path(), name, bytes.len())?;
        self.file.write(bytes)?;
        let pad = bytes.len().next_multiple_of(ALIGNMENT) - bytes.len();
        self.file.write(&[0u8; ALIGNMENT][..pad])
    }

    /// Syncs and renames the file into place.
    ///
    /// # Errors
    /// [`crate::ModelError::Tensor`] naming the first tensor never written; [`crate::ModelError::Io`].
    pub fn finish(self) -> Result<()> {
        self.order.check_complete(self.file.path())?;
        self.file.finish()
    }
}

/// A tensor held in memory, for [`gguf_bytes`].
pub struct RawTensor {
    /// Name.
    pub name: String,
    /// Dims, fastest-varying first (GGUF order).
    pub dims: Vec<u64>,
    /// Type.
    pub ty: GgmlType,
    /// Data bytes.
    pub bytes: Vec<u8>,
}

/// The bytes of a whole GGUF v3 file held in memory (tests and small files). Integers are
/// written as 64-bit and floats as `f64` ([`KvEntry::value`]).
pub fn gguf_bytes(metadata: &[(&str, MetaValue)], tensors: &[RawTensor]) -> Vec<u8> {
    let kv: Vec<KvEntry> = metadata.iter().map(|(k, v)| KvEntry::value(k, v)).collect();
    let infos: Vec<TensorInfo> = tensors
        .iter()
        .map(|t| TensorInfo {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ty,
            len: t.bytes.len(),
        })
        .collect();
    let (mut out, offsets) = header(&kv, &infos);
    let start = out.len();
    for (t, o) in tensors.iter().zip(offsets) {
        out.resize(start + o, 0);
        out.extend(&t.bytes);
    }
    out
}
