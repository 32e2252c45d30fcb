//! [`ModelError`]: everything that can go wrong reading, building or writing a model.

use std::path::{Path, PathBuf};

use loftq_core::{LoftqError, QuantError};

/// Errors of file I/O and model building. Each names the file and, where there is one, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The operating system refused a read or write.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not what its format says it should be (bad header, bad JSON, offsets
    /// past the end, unknown type, ...).
    #[error("{}: {msg}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A tensor is missing, or has the wrong shape or dtype.
    #[error("{}: tensor `{name}`: {msg}", path.display())]
    Tensor {
        /// The file (or directory) it was looked up in.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// A quantizer refused a tensor (NaN/Inf, bad configuration).
    #[error("tensor `{name}`: {source}")]
    Quant {
        /// The tensor's name.
        name: String,
        /// The quantizer's error.
        source: QuantError,
    },
    /// LoftQ refused a tensor (rank too large, NaN/Inf, ...).
    #[error("tensor `{name}`: {source}")]
    Loftq {
        /// The tensor's name.
        name: String,
        /// LoftQ's error.
        source: LoftqError,
    },
    /// A configuration or option that cannot work (unsupported architecture, bad combination).
    #[error("{0}")]
    Invalid(String),
}

/// Results of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A format error in `path`.
    pub fn format(path: &Path, msg: impl Into<String>) -> Self {
        Self::Format {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    /// A quantizer's error on tensor `name`.
    pub fn quant(name: &str, source: QuantError) -> Self {
        Self::Quant {
            name: name.to_string(),
            source,
        }
    }

    /// A problem with tensor `name` in `path`.
    pub fn tensor(path: &Path, name: &str, msg: impl Into<String>) -> Self {
        Self::Tensor {
            path: path.to_path_buf(),
            name: name.to_string(),
            msg: msg.into(),
        }
    }
}
