//! [`StreamWriter`]: a safetensors file written one tensor at a time, in bounded memory.
//!
//! The header needs every tensor's dtype and shape up front; the data then follow in that
//! order. The file is written under a temporary name and renamed by [`StreamWriter::finish`],
//! so a reader never sees a partial file.

use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;
use serde_json::{Map, Value, json};

use super::atomic::AtomicFile;
use crate::{ModelError, Result};

/// The tensors a streamed file declares in its header, `(name, bytes)` in order, and which of
/// them comes next: shared by the safetensors and GGUF writers.
#[derive(Debug)]
pub(crate) struct Declared {
    entries: Vec<(String, usize)>,
    next: usize,
}

impl Declared {
    pub(crate) fn new(entries: Vec<(String, usize)>) -> Self {
        Self { entries, next: 0 }
    }

    /// Checks that `name`, `len` bytes long, is the next tensor of `file`, and moves past it.
    pub(crate) fn advance(&mut self, file: &Path, name: &str, len: usize) -> Result<()> {
        let Some((want, want_len)) = self.entries.get(self.next) else {
            return Err(ModelError::tensor(file, name, "more tensors than declared"));
        };
        if want != name || *want_len != len {
            return Err(ModelError::tensor(
                file,
                name,
                format!("expected `{want}` of {want_len} bytes, got {len} bytes"),
            ));
        }
        self.next += 1;
        Ok(())
    }

    /// An error naming the first tensor of `file` never written, if any.
    pub(crate) fn check_complete(&self, file: &Path) -> Result<()> {
        match self.entries.get(self.next) {
            Some((missing, _)) => Err(ModelError::tensor(file, missing, "never written")),
            None => Ok(()),
        }
    }
}

/// Streams tensors into a safetensors file. Dropped before [`StreamWriter::finish`], it
/// removes its temporary file.
#[derive(Debug)]
pub struct StreamWriter {
    file: AtomicFile,
    order: Declared,
}

impl StreamWriter {
    /// Starts `path` with the given tensors (`name`, dtype, shape), which must then be written
    /// in this order.
    ///
    /// # Errors
    /// [`ModelError::Io`] if the temporary file cannot be created.
    pub fn create(
        path: &Path,
        tensors: &[(String, Dtype, Vec<usize>)],
        metadata: &HashMap<String, String>,
    ) -> Result<Self> {
        let mut header = Map::new();
        if !metadata.is_empty() {
            header.insert("__metadata__".into(), json!(metadata));
        }
        let mut offset = 0usize;
        let mut entries = Vec::with_capacity(tensors.len());
        for (name, dtype, shape) in tensors {
            let len = shape.iter().product::<usize>() * dtype.bitsize() / 8;
            header.insert(
                name.clone(),
                json!({"dtype": dtype.to_string(), "shape": shape, "data_offsets": [offset, offset + len]}),
            );
            entries.push((name.clone(), len));
            offset += len;
        }
        let mut bytes = Value::Object(header).to_string().into_bytes();
        bytes.resize(bytes.len().next_multiple_of(8), b' ');
        let mut file = AtomicFile::create(path)?;
        file.write(&(bytes.len() as u64).to_le_bytes())?;
        file.write(&bytes)?;
        Ok(Self {
            file,
            order: Declared::new(entries),
        })
    }

    /// Writes the next tensor's bytes.
    ///
    /// # Errors
    /// [`ModelError::Tensor`] if `name` is not the next tensor or its size is wrong;
    /// [`ModelError::Io`] on write failure.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.order.advance(self.file.path(), name, bytes.len())?;
        self.file.write(bytes)
    }

    /// Flushes, syncs and renames the file into place.
    ///
    /// # Errors
    /// [`ModelError::Format`] if tensors are missing; [`ModelError::Io`].
    pub fn finish(self) -> Result<()> {
        self.order.check_complete(self.file.path())?;
        self.file.finish()
    }
}
