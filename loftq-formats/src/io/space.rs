//! Free disk space, checked before a job writes: a job that cannot fit is refused at its start,
//! not when its first large file is half written.

use std::path::Path;

use crate::{ModelError, Result};

/// Bytes free to this user on the file system that holds `path` (or its nearest existing
/// ancestor); `None` where that cannot be asked.
pub fn available(path: &Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    #[cfg(unix)]
    {
        let st = rustix::fs::statvfs(existing).ok()?;
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }
    #[cfg(not(unix))]
    {
        let _ = existing;
        None
    }
}

/// Refuses writing about `need` bytes under `out` when the file system holding it has less
/// free; `what` says what the bytes are, for the message.
///
/// # Errors
/// [`ModelError::Output`] naming the directory, the space free and what needs more.
pub fn check_free(out: &Path, need: u64, what: &str) -> Result<()> {
    let Some(free) = available(out) else {
        return Ok(());
    };
    if need > free {
        return Err(ModelError::output(
            out,
            format!(
                "{} free, and this run writes {what}; free some space or write elsewhere",
                human(free)
            ),
        ));
    }
    Ok(())
}

/// Bytes in kB, MB or GB.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}
