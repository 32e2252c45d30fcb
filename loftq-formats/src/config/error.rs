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

/// The first of `sizes` that is 0, as an error naming it.
pub(crate) fn nonzero(sizes: &[(&'static str, usize)]) -> Result<(), ConfigError> {
    match sizes.iter().find(|(_, v)| *v == 0) {
        Some((name, _)) => Err(ConfigError::value(name, format!("{name} is 0"))),
        None => Ok(()),
    }
}

/// An error on `field` saying `msg` unless every product, at 4 bytes an element, fits a
/// `usize`.
pub(crate) fn fits(
    products: &[Option<usize>],
    field: &'static str,
    msg: impl FnOnce() -> String,
) -> Result<(), ConfigError> {
    match products
        .iter()
        .all(|p| p.and_then(|n| n.checked_mul(4)).is_some())
    {
        true => Ok(()),
        false => Err(ConfigError::value(field, msg())),
    }
}

/// An error on `field` unless `value` is a finite positive number.
pub(crate) fn positive(field: &'static str, value: f64) -> Result<(), ConfigError> {
    match value.is_finite() && value > 0.0 {
        true => Ok(()),
        false => Err(ConfigError::value(
            field,
            format!("{field} {value} must be a positive number"),
        )),
    }
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
