//! Writes that a reader (or a crash) never sees half done: a file or a directory is written
//! under a temporary sibling name and renamed into place.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::{ModelError, Result};

/// The temporary name `path` is written under before the rename into place.
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    hidden_sibling(path, "tmp")
}

/// `.<name>.<tag>-<pid>` beside `path`: this process's own scratch name for it.
fn hidden_sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(
        ".{}.{tag}-{}",
        name.unwrap_or_default(),
        std::process::id()
    ))
}

/// A file written under its temporary name ([`temp_path`]) and renamed into place by
/// [`AtomicFile::finish`], so a reader never sees it half-written. Dropped unfinished (an
/// error, a panic), it removes its temporary. Errors name the final path.
#[derive(Debug)]
pub(crate) struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    out: std::io::BufWriter<File>,
    renamed: bool,
}

impl AtomicFile {
    /// Creates the temporary file of `path`.
    pub(crate) fn create(path: &Path) -> Result<Self> {
        let tmp = temp_path(path);
        let file = File::create(&tmp).map_err(|e| ModelError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            out: std::io::BufWriter::with_capacity(1 << 20, file),
            renamed: false,
        })
    }

    /// The final path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `bytes`.
    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        self.out
            .write_all(bytes)
            .map_err(|e| ModelError::io(&self.path, e))
    }

    /// Flushes, syncs and renames the file into place.
    pub(crate) fn finish(mut self) -> Result<()> {
        use std::io::Write;
        self.out
            .flush()
            .map_err(|e| ModelError::io(&self.path, e))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(|e| ModelError::io(&self.path, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| ModelError::io(&self.path, e))?;
        self.renamed = true;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
///
/// # Errors
/// [`ModelError::Io`]; the temporary file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write(bytes)?;
    f.finish()
}

/// Whether `dir` is a directory with something in it.
pub fn is_non_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

/// Refuses an output directory that holds anything: a command that writes a new directory
/// never mixes its files with other files, nor replaces them.
///
/// # Errors
/// [`ModelError::Output`] naming `out` when it is a directory that is not empty.
pub fn require_empty_dir(out: &Path) -> Result<()> {
    match is_non_empty_dir(out) {
        true => Err(ModelError::output(
            out,
            "exists and is not empty; write elsewhere",
        )),
        false => Ok(()),
    }
}

/// Fills directory `out` through `fill`, which is given a fresh temporary sibling, then puts it
/// in place. An existing `out` is replaced: on Linux the two are swapped in one step
/// (`renameat2` with `RENAME_EXCHANGE`), elsewhere, or where the file system refuses the swap,
/// the old one is first renamed aside. A crash leaves `out` old or new, and at worst a hidden
/// temporary beside it; a failure of `fill` leaves `out` as it was.
///
/// # Errors
/// Those of `fill`, and [`ModelError::Io`] for the directories; the temporary is removed.
pub fn write_dir_atomic(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(out);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let result =
        fill(&tmp).and_then(|()| replace_dir(&tmp, out).map_err(|e| ModelError::io(out, e)));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Moves directory `new` to `out`, replacing what is there; `new` is gone afterwards.
fn replace_dir(new: &Path, out: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(out).is_err() {
        return std::fs::rename(new, out);
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::fs::{CWD, RenameFlags, renameat_with};
        if renameat_with(CWD, new, CWD, out, RenameFlags::EXCHANGE).is_ok() {
            // `new` now holds the old directory.
            let _ = std::fs::remove_dir_all(new);
            return Ok(());
        }
    }
    let old = hidden_sibling(out, "old");
    let _ = std::fs::remove_dir_all(&old);
    std::fs::rename(out, &old)?;
    if let Err(e) = std::fs::rename(new, out) {
        let _ = std::fs::rename(&old, out);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_replaced_whole_or_left_alone() {
        let root = std::env::temp_dir().join(format!("loftq-atomic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let out = root.join("adapter");
        let fill = |text: &'static str| {
            move |dir: &Path| {
                std::fs::write(dir.join("f"), text).map_err(|e| ModelError::io(dir, e))
            }
        };
        write_dir_atomic(&out, fill("one")).unwrap();
        write_dir_atomic(&out, fill("two")).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("f")).unwrap(), "two");
        let failed = write_dir_atomic(&out, |_| Err(ModelError::Data("no".into())));
        assert!(failed.is_err());
        assert_eq!(std::fs::read_to_string(out.join("f")).unwrap(), "two");
        // Nothing is left beside it: no temporary, no old copy.
        let names: Vec<_> = std::fs::read_dir(&root).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
