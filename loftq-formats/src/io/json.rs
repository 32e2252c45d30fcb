//! Optional JSON side files (a tokenizer's config, a classifier's labels).

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::{ModelError, Result};

/// The JSON file `path` parsed, or `None` when there is no such file.
///
/// # Errors
/// [`ModelError::Io`] if it cannot be read; [`ModelError::Format`] naming it, `what` and the
/// parser's message, if it does not parse as a `T`.
pub fn read_json_if_present<T: DeserializeOwned>(path: &Path, what: &str) -> Result<Option<T>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::format(path, format!("{what}: {e}")))
}
