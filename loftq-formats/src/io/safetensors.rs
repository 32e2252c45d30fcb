//! Reading (memory-mapped, one tensor at a time) and writing (atomically) safetensors files,
//! and Hugging Face checkpoint directories made of them.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::stream::StreamWriter;
use crate::{ModelError, Result};

/// A tensor copied to the host as `f32`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// The shape as a matrix `[rows, cols]`, or `None` if it is not 2-D.
    pub fn matrix_shape(&self) -> Option<[usize; 2]> {
        match self.shape.as_slice() {
            &[r, c] => Some([r, c]),
            _ => None,
        }
    }
}

/// Where a tensor lives inside a [`Checkpoint`].
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// Element type on disk.
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    file: usize,
    start: usize,
    end: usize,
}

impl TensorEntry {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One or more memory-mapped safetensors files seen as one set of named tensors: a single
/// file, or a Hugging Face directory with `model.safetensors` or a sharded
/// `model.safetensors.index.json`. Nothing is read until a tensor is asked for.
pub struct Checkpoint {
    root: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    tensors: BTreeMap<String, TensorEntry>,
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("root", &self.root)
            .field("files", &self.files.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens a `.safetensors` file or a directory holding `model.safetensors` or
    /// `model.safetensors.index.json` (shards).
    ///
    /// # Errors
    /// [`ModelError::Io`] for unreadable files, [`ModelError::Format`] for a bad index,
    /// header or offsets, or a tensor name present in two shards.
    pub fn open(path: &Path) -> Result<Self> {
        let files = if path.is_dir() {
            let single = path.join("model.safetensors");
            let index = path.join("model.safetensors.index.json");
            if index.is_file() {
                shard_files(&index)?
            } else if single.is_file() {
                vec![single]
            } else {
                return Err(ModelError::format(
                    path,
                    "no model.safetensors or model.safetensors.index.json in this directory",
                ));
            }
        } else {
            vec![path.to_path_buf()]
        };
        let mut ckpt = Self {
            root: path.to_path_buf(),
            files: Vec::new(),
            tensors: BTreeMap::new(),
            metadata: HashMap::new(),
        };
        for file in files {
            ckpt.add_file(file)?;
        }
        Ok(ckpt)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<()> {
        let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        // SAFETY: the map is read-only and private to this process. Another process
        // truncating the file while it is mapped would fault; that is the accepted
        // contract of every memory-mapped checkpoint loader.
        #[allow(unsafe_code)]
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
        // Validates the header: offsets contiguous, sizes matching dtype × shape, and the
        // data ending exactly at the end of the file.
        let (header, meta) = SafeTensors::read_metadata(&map)
            .map_err(|e| ModelError::format(&path, format!("not a valid safetensors file: {e}")))?;
        let data_start = 8 + header;
        let index = self.files.len();
        for (name, info) in meta.tensors() {
            let (s, e) = info.data_offsets;
            let entry = TensorEntry {
                dtype: info.dtype,
                shape: info.shape.clone(),
                file: index,
                start: data_start + s,
                end: data_start + e,
            };
            if self.tensors.insert(name.clone(), entry).is_some() {
                return Err(ModelError::tensor(&path, &name, "present in two files"));
            }
        }
        if let Some(m) = meta.metadata() {
            self.metadata.extend(m.clone());
        }
        self.files.push((path, map));
        Ok(())
    }

    /// The file or directory this was opened from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The file that holds tensor `name` (for a directory, the shard), else the root.
    pub fn file_holding(&self, name: &str) -> &Path {
        self.tensors
            .get(name)
            .map_or(&self.root, |e| self.file_of(e))
    }

    /// The entry of `name`, if present.
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// True if `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The `__metadata__` strings of all files, merged.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    fn lookup(&self, name: &str) -> Result<(&TensorEntry, &[u8])> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::tensor(&self.root, name, "not found"))?;
        let bytes = &self.files[entry.file].1[entry.start..entry.end];
        Ok((entry, bytes))
    }

    /// The raw little-endian bytes of `name` and its entry.
    ///
    /// # Errors
    /// [`ModelError::Tensor`] if it is missing.
    pub fn bytes(&self, name: &str) -> Result<(&TensorEntry, &[u8])> {
        self.lookup(name)
    }

    /// Tensor `name` converted to `f32` (from F32, F16, BF16 or F64).
    ///
    /// # Errors
    /// [`ModelError::Tensor`] if it is missing or of another dtype.
    pub fn f32(&self, name: &str) -> Result<HostTensor> {
        let (entry, bytes) = self.lookup(name)?;
        let data = floats_from_le(entry.dtype, bytes).ok_or_else(|| {
            ModelError::tensor(
                self.file_of(entry),
                name,
                format!(
                    "dtype {} is not a float type (F32, F16, BF16, F64)",
                    entry.dtype
                ),
            )
        })?;
        Ok(HostTensor {
            shape: entry.shape.clone(),
            data,
        })
    }

    /// Tensor `name`, which must have exactly `shape`.
    ///
    /// # Errors
    /// As [`Checkpoint::f32`], and [`ModelError::Tensor`] if the shape differs.
    pub fn shaped(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let t = self.f32(name)?;
        if t.shape != shape {
            let (entry, _) = self.lookup(name)?;
            return Err(ModelError::tensor(
                self.file_of(entry),
                name,
                format!("shape {:?}, expected {shape:?}", t.shape),
            ));
        }
        Ok(t)
    }

    /// Tensor `name` as `i64` (from I64, I32, U8, ...).
    ///
    /// # Errors
    /// [`ModelError::Tensor`] if it is missing or not an integer type.
    pub fn i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let (entry, bytes) = self.lookup(name)?;
        let v: Vec<i64> = match entry.dtype {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes(c.try_into().expect("4 bytes"))))
                .collect(),
            Dtype::U8 => bytes.iter().map(|&b| i64::from(b)).collect(),
            other => {
                return Err(ModelError::tensor(
                    self.file_of(entry),
                    name,
                    format!("dtype {other} is not an integer type (I64, I32, U8)"),
                ));
            }
        };
        Ok((entry.shape.clone(), v))
    }

    /// Drops this process's resident copy of tensor `name`'s pages (they are read again
    /// from the file if touched): a streaming pass over a large checkpoint then keeps its
    /// resident memory flat instead of growing with every tensor read.
    pub fn release(&self, name: &str) {
        if let Some(e) = self.tensors.get(name) {
            drop_pages(&self.files[e.file].1, e.start, e.end - e.start);
        }
    }

    /// The path of the file holding `entry`.
    fn file_of(&self, entry: &TensorEntry) -> &Path {
        &self.files[entry.file].0
    }
}

/// `madvise(MADV_DONTNEED)` over `start..start + len` of a read-only file mapping.
pub(crate) fn drop_pages(map: &Mmap, start: usize, len: usize) {
    #[cfg(unix)]
    {
        if len == 0 || start + len > map.len() {
            return;
        }
        // SAFETY: the map is a private, read-only mapping of a file nobody writes through
        // it; DONTNEED only discards our resident copy, and the next access faults the same
        // bytes back in from the file. No reference observes a change.
        #[allow(unsafe_code)]
        let _ =
            unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
    }
    #[cfg(not(unix))]
    let _ = (map, start, len);
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::format(index, format!("bad JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| ModelError::format(index, "no `weight_map` object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| ModelError::format(index, format!("`{name}` maps to a non-string")))?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(ModelError::format(
                index,
                format!("shard name `{file}` is a path"),
            ));
        }
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Decodes little-endian floats; `None` for non-float dtypes.
pub fn floats_from_le(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let v = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        _ => return None,
    };
    Some(v)
}

/// Little-endian `f32` bytes of `data`.
pub fn f32_le_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Little-endian `bf16` bytes of `data` (rounded to nearest even).
pub fn bf16_le_bytes(data: &[f32]) -> Vec<u8> {
    data.iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
        .collect()
}

/// A tensor to write: dtype, shape and little-endian bytes.
#[derive(Clone, Debug)]
pub struct OutTensor {
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Little-endian bytes, `numel × size` long.
    pub bytes: Vec<u8>,
}

impl OutTensor {
    /// `f32` values.
    pub fn f32(shape: Vec<usize>, data: &[f32]) -> Self {
        Self {
            dtype: Dtype::F32,
            shape,
            bytes: f32_le_bytes(data),
        }
    }

    /// `bf16` values (rounded to nearest even).
    pub fn bf16(shape: Vec<usize>, data: &[f32]) -> Self {
        Self {
            dtype: Dtype::BF16,
            shape,
            bytes: bf16_le_bytes(data),
        }
    }

    /// Raw bytes (`U8`), one per element.
    pub fn u8(shape: Vec<usize>, data: Vec<u8>) -> Self {
        Self {
            dtype: Dtype::U8,
            shape,
            bytes: data,
        }
    }
}

/// Writes `tensors` to `path` atomically, through [`StreamWriter`] (the one safetensors
/// writer): a temporary file beside it, then a rename, so a reader never sees a half-written
/// file.
///
/// # Errors
/// [`ModelError::Io`] if writing fails (the temporary file is removed), [`ModelError::Tensor`]
/// if a tensor's byte length does not match its shape.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, OutTensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let declared: Vec<_> = tensors
        .iter()
        .map(|(name, t)| (name.clone(), t.dtype, t.shape.clone()))
        .collect();
    let mut w = StreamWriter::create(path, &declared, &metadata.unwrap_or_default())?;
    for (name, t) in tensors {
        w.write(name, &t.bytes)?;
    }
    w.finish()
}
