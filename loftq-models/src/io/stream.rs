//! [`StreamWriter`]: a safetensors file written one tensor at a time, in bounded memory.
//!
//! The header needs every tensor's dtype and shape up front; the data then follow in that
//! order. The file is written under a temporary name and renamed by [`StreamWriter::finish`],
//! so a reader never sees a partial file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::{Map, Value, json};

use crate::{ModelError, Result};

/// Streams tensors into a safetensors file.
#[derive(Debug)]
pub struct StreamWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
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
        let tmp = super::safetensors::temp_path(path);
        let file = File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let io = |e| ModelError::io(&tmp, e);
        out.write_all(&(bytes.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&bytes).map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            out,
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
                &self.path,
                name,
                "more tensors than declared",
            ));
        };
        if want != name || *len != bytes.len() {
            return Err(ModelError::tensor(
                &self.path,
                name,
                format!(
                    "expected `{want}` of {len} bytes, got {} bytes",
                    bytes.len()
                ),
            ));
        }
        self.out
            .write_all(bytes)
            .map_err(|e| ModelError::io(&self.tmp, e))?;
        self.next += 1;
        Ok(())
    }

    /// Flushes, syncs and renames the file into place.
    ///
    /// # Errors
    /// [`ModelError::Format`] if tensors are missing; [`ModelError::Io`].
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.entries.len() {
            let missing = self.entries[self.next].0.clone();
            let _ = std::fs::remove_file(&self.tmp);
            return Err(ModelError::tensor(&self.path, &missing, "never written"));
        }
        let tmp = self.tmp.clone();
        let done = (|| {
            self.out.flush()?;
            self.out.get_ref().sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        done.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            ModelError::io(&self.path, e)
        })
    }

    /// Abandons the file (removes the temporary).
    pub fn abort(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}
