//! [`ConfigError`]: why a model configuration is refused.

/// Why a model configuration (`config.json`, or a GGUF file's metadata) is refused. Each
/// variant names the field; a file's reader adds the file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON, or a field missing or of the wrong type.
    #[error("bad config: {0}")]
    Json(String),
    /// A setting that changes the computation and is not implemented.
    #[error("{field} `{value}` is not supported ({supported})")]
    Unsupported {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// The values that are.
        supported: &'static str,
    },
    /// A value that cannot describe a model (a zero size, an odd head width, ...).
    #[error("{msg}")]
    Value {
        /// The field.
        field: &'static str,
        /// What is wrong, naming the field and its value.
        msg: String,
    },
}

impl ConfigError {
    /// A [`ConfigError::Value`].
    pub(crate) fn value(field: &'static str, msg: impl Into<String>) -> Self {
        Self::Value {
            field,
            msg: msg.into(),
        }
    }
}
