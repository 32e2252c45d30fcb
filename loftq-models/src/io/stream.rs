//! [`StreamWriter`]: a safetensors file written one tensor at a time, in bounded memory.
//!
//! The header needs every tensor's dtype and shape up front; the data then follow in that
//! order. The file is written under a temporary name and renamed by [`StreamWriter::finish`],
//! so a reader never sees a partial file.

use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;
use serde_json::{Map, Value, json};

use super::safetensors::AtomicFile;
use crate::{ModelError, Result};

/// Streams tensors into a safetensors file.
#[derive(Debug)]
pub struct StreamWriter {
    file: AtomicFile,
    entries: Vec<(String, usize)>,
    next: usize,
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
            entries,
            next: 0,
        })
    }

    /// Writes the next tensor's bytes.
    ///
    /// # Errors
    /// [`ModelError::Tensor`] if `name` is not the next tensor or its size is wrong;
    /// [`ModelError::Io`] on write failure.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let Some((want, len)) = self.entries.get(self.next) else {
            return Err(ModelError::tensor(
                self.file.path(),
                name,
                "more tensors than declared",
            ));
        };
        if want != name || *len != bytes.len() {
            return Err(ModelError::tensor(
                self.file.path(),
                name,
                format!(
                    "expected `{want}` of {len} bytes, got {} bytes",
                    bytes.len()
                ),
            ));
        }
        self.file.write(bytes)?;
        self.next += 1;
        Ok(())
    }

    /// Flushes, syncs and renames the file into place.
    ///
    /// # Errors
    /// [`ModelError::Format`] if tensors are missing; [`ModelError::Io`].
    pub fn finish(self) -> Result<()> {
        if let Some((missing, _)) = self.entries.get(self.next) {
            let (path, name) = (self.file.path().to_path_buf(), missing.clone());
            self.file.abort();
            return Err(ModelError::tensor(&path, &name, "never written"));
        }
        self.file.finish()
    }

    /// Abandons the file (removes the temporary).
    pub fn abort(self) {
        self.file.abort();
    }
}
