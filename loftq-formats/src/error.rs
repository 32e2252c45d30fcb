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
    /// A file or directory that should exist does not.
    #[error("{}: no such file or directory", path.display())]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// An output directory this run cannot use: not empty, too little space, another run's
    /// state in it.
    #[error("{}: {msg}", path.display())]
    Output {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A write under an output failed (a full disk, a quota) after work was done; what was
    /// done is kept in `work` for the run to be resumed.
    #[error(
        "{}: {source} (the work done so far is kept in {}: make room, then resume the run)",
        path.display(),
        work.display()
    )]
    Interrupted {
        /// The file whose write failed.
        path: PathBuf,
        /// The work area that holds what was done.
        work: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `loftq init`'s distillation failed after the start was made; the start is kept in
    /// `work`, so the run can be resumed with other distillation settings, or none.
    #[error(
        "distilling the start: {source} (the start is kept in {}: resume the run, with other \
         distillation settings or none)",
        work.display()
    )]
    Distillation {
        /// The work area that holds the start.
        work: PathBuf,
        /// What failed.
        source: Box<ModelError>,
    },
    /// The tokenizer or a chat template failed.
    #[error("{what}: {msg}")]
    Text {
        /// `tokenizer` or `chat template`.
        what: &'static str,
        /// Its error.
        msg: String,
    },
    /// Two inputs that must agree do not: a model and its adapter, a teacher and its student,
    /// a checkpoint and the run resuming it.
    #[error("{0}")]
    Mismatch(String),
    /// Settings that cannot work, together or with this model (a rank larger than a matrix,
    /// GPTQ without calibration statistics, an unsupported dtype).
    #[error("{0}")]
    Settings(String),
    /// Input data the job cannot use (a text shorter than one sequence, an empty prompt).
    #[error("{0}")]
    Data(String),
    /// Training diverged: the loss of `step` is not finite; nothing of that step was saved.
    #[error("step {step}: the training loss is {loss}; nothing was saved for this step")]
    Diverged {
        /// The step (1-based).
        step: usize,
        /// The loss.
        loss: f64,
    },
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

    /// Output directory `path` cannot be used: `msg` says why.
    pub fn output(path: &Path, msg: impl Into<String>) -> Self {
        Self::Output {
            path: path.to_path_buf(),
            msg: msg.into(),
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
