//! [`TensorSource`]: where a model's weights come from (safetensors or GGUF), by HF name.

use std::path::{Path, PathBuf};

use loftq_core::quant::PackedTensor;

use super::bnb::{bnb_shape, is_bnb_part, read_bnb};
use super::{Checkpoint, HostTensor, dequantize_packed, read_packed};
use crate::{ModelError, Result};

/// Named tensors under their Hugging Face names, read one at a time.
pub trait TensorSource: Send + Sync {
    /// The file or directory, for messages.
    fn root(&self) -> &Path;

    /// The file that holds tensor `name` (a directory's shard), for messages.
    fn file_of(&self, _name: &str) -> PathBuf {
        self.root().to_path_buf()
    }

    /// Every tensor name (a packed weight `X` is listed as `X`).
    fn tensor_names(&self) -> Vec<String>;

    /// Tensor `name` as `f32`.
    ///
    /// # Errors
    /// [`ModelError::Tensor`] if missing or unreadable.
    fn tensor(&self, name: &str) -> Result<HostTensor>;

    /// Shape of tensor `name` without reading its data.
    ///
    /// # Errors
    /// [`ModelError::Tensor`] if missing.
    fn shape(&self, name: &str) -> Result<Vec<usize>>;

    /// The stored dtype and little-endian bytes of `name`, when the source can hand them
    /// over unchanged (safetensors); `None` otherwise (GGUF blocks are decoded instead).
    ///
    /// # Errors
    /// [`ModelError::Tensor`] if missing.
    fn raw(&self, _name: &str) -> Result<Option<(safetensors::Dtype, Vec<u8>)>> {
        Ok(None)
    }

    /// Bytes per value [`raw`](Self::raw) would hand over for `name`, read from the header
    /// alone; 4 (`f32`) where the source decodes instead.
    fn stored_value_bytes(&self, _name: &str) -> usize {
        4
    }

    /// The architecture, when the file itself carries it (GGUF metadata); `None` for
    /// safetensors, whose architecture is in `config.json`.
    fn llama_config(&self) -> Option<&crate::LlamaConfig> {
        None
    }

    /// Tells the source that `name` will not be read again soon, so that memory-mapped pages
    /// can leave the resident set.
    fn release(&self, _name: &str) {}

    /// Packed weight `name`, if the source stores it packed.
    ///
    /// # Errors
    /// [`ModelError`] if the packed data are inconsistent.
    fn packed(&self, _name: &str) -> Result<Option<PackedTensor>> {
        Ok(None)
    }

    /// True if `name` is stored quantized (our packed format, or bitsandbytes 4-bit).
    ///
    /// # Errors
    /// [`ModelError`] if its quantization data are inconsistent.
    fn quantized(&self, name: &str) -> Result<bool> {
        Ok(self.packed(name)?.is_some())
    }

    /// Tensor `name`, which must have exactly `shape`.
    ///
    /// # Errors
    /// As [`TensorSource::tensor`], and [`ModelError::Tensor`] if the shape differs.
    fn shaped(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let t = self.tensor(name)?;
        if t.shape != shape {
            return Err(ModelError::tensor(
                self.root(),
                name,
                format!("shape {:?}, expected {shape:?}", t.shape),
            ));
        }
        Ok(t)
    }
}

impl TensorSource for Checkpoint {
    fn root(&self) -> &Path {
        Checkpoint::root(self)
    }

    fn file_of(&self, name: &str) -> PathBuf {
        self.file_holding(name).to_path_buf()
    }

    fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.names().map(str::to_string).collect();
        v.extend(super::packed_names(self));
        v.retain(|n| !is_packed_part(n) && !is_bnb_part(n));
        v.sort();
        v
    }

    fn tensor(&self, name: &str) -> Result<HostTensor> {
        if let Some(p) = read_packed(self, name)? {
            return dequantize_packed(self.root(), name, &p);
        }
        match read_bnb(self, name)? {
            Some(t) => Ok(t),
            None => self.f32(name),
        }
    }

    fn shaped(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        match bnb_shape(self, name)? {
            Some(s) if s != shape => Err(ModelError::tensor(
                self.root(),
                name,
                format!("shape {s:?}, expected {shape:?}"),
            )),
            Some(_) => self.tensor(name),
            None => Checkpoint::shaped(self, name, shape),
        }
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        if let Some(p) = read_packed(self, name)? {
            return Ok(p.shape.to_vec());
        }
        if let Some(s) = bnb_shape(self, name)? {
            return Ok(s);
        }
        Ok(self.bytes(name)?.0.shape.clone())
    }

    fn raw(&self, name: &str) -> Result<Option<(safetensors::Dtype, Vec<u8>)>> {
        if bnb_shape(self, name)?.is_some() {
            return Ok(None);
        }
        let (e, b) = self.bytes(name)?;
        Ok(Some((e.dtype, b.to_vec())))
    }

    fn packed(&self, name: &str) -> Result<Option<PackedTensor>> {
        read_packed(self, name)
    }

    fn stored_value_bytes(&self, name: &str) -> usize {
        match self.entry(name) {
            Some(e) if !matches!(bnb_shape(self, name), Ok(Some(_))) => e.dtype.bitsize() / 8,
            _ => 4,
        }
    }

    fn quantized(&self, name: &str) -> Result<bool> {
        Ok(read_packed(self, name)?.is_some() || bnb_shape(self, name)?.is_some())
    }

    fn release(&self, name: &str) {
        Checkpoint::release(self, name);
    }
}

fn is_packed_part(name: &str) -> bool {
    [
        ".qcodes",
        ".qscales",
        ".qscales_codes",
        ".qscales_absmax",
        ".qmins",
    ]
    .iter()
    .any(|s| name.ends_with(s))
}

/// True if `path` is a llama.cpp `.gguf` file.
pub fn is_gguf(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e == "gguf")
}

/// `t`, if all its values are finite; else an error naming the file, tensor and position.
pub fn check_finite(source: &dyn TensorSource, name: &str, t: HostTensor) -> Result<HostTensor> {
    match t.data.iter().position(|v| !v.is_finite()) {
        None => Ok(t),
        Some(i) => {
            let cols = t.shape.last().copied().unwrap_or(1).max(1);
            Err(ModelError::tensor(
                &source.file_of(name),
                name,
                format!(
                    "non-finite weight {} at row {}, column {}",
                    t.data[i],
                    i / cols,
                    i % cols
                ),
            ))
        }
    }
}

/// The weights at `path`: a `.gguf` file, or a safetensors file or HF directory.
///
/// # Errors
/// [`ModelError::NotFound`] if `path` does not exist; the opener's errors.
pub fn open_source(path: &Path) -> Result<Box<dyn TensorSource>> {
    if is_gguf(path) {
        Ok(Box::new(super::GgufModel::open(path)?))
    } else if path.exists() {
        Ok(Box::new(Checkpoint::open(path)?))
    } else {
        Err(ModelError::NotFound {
            path: path.to_path_buf(),
        })
    }
}

/// Files that travel with a model's weights: the tokenizer and generation settings.
pub const SIDE_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// Checks that [`copy_side_files`] will be able to write what it should for `src`: the
/// vocabulary of a GGUF file as `tokenizer.json`, the side files of a directory readable. Run
/// before any work, so that a job does not fail at its very end.
///
/// # Errors
/// As [`GgufModel::tokenizer_json`](super::GgufModel::tokenizer_json), or an I/O error
/// naming the side file.
pub fn check_side_files(src: &Path) -> Result<()> {
    if is_gguf(src) {
        let model = super::GgufModel::open(src)?;
        if model.gguf.meta("tokenizer.ggml.model").is_some() {
            model.tokenizer_json()?;
        }
        return Ok(());
    }
    for name in SIDE_FILES {
        let from = src.join(name);
        if from.exists() {
            std::fs::File::open(&from).map_err(|e| ModelError::io(&from, e))?;
        }
    }
    Ok(())
}

/// Copies the tokenizer (and generation settings) of the model at `src` (an HF directory,
/// or a `.gguf` file whose vocabulary becomes `tokenizer.json`) into `dir`. Returns the
/// names written; a model without a tokenizer writes none.
///
/// # Errors
/// [`ModelError::Io`] if a copy fails; GGUF tokenizer errors.
pub fn copy_side_files(src: &Path, dir: &Path) -> Result<Vec<String>> {
    let mut written = Vec::new();
    if is_gguf(src) {
        let model = super::GgufModel::open(src)?;
        if model.gguf.meta("tokenizer.ggml.model").is_some() {
            let json = model.tokenizer_json()?.to_string();
            super::write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
            written.push("tokenizer.json".to_string());
        }
        if let Some(t) = model
            .gguf
            .meta("tokenizer.chat_template")
            .and_then(super::gguf::MetaValue::as_str)
        {
            super::write_atomic(&dir.join("chat_template.jinja"), t.as_bytes())?;
            written.push("chat_template.jinja".to_string());
        }
        return Ok(written);
    }
    for name in SIDE_FILES {
        let from = src.join(name);
        if from.is_file() {
            let bytes = std::fs::read(&from).map_err(|e| ModelError::io(&from, e))?;
            super::write_atomic(&dir.join(name), &bytes)?;
            written.push(name.to_string());
        }
    }
    Ok(written)
}
