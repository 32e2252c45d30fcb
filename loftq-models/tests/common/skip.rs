//! [`skip`]: a test that cannot run says so where `cargo xtask test` counts it. Also used by
//! `loftq-cli`'s tests (included by path).

use std::path::PathBuf;

/// Says that the calling test skipped and why: on stderr, and as a line in the file
/// `$LOFTQ_SKIP_LOG` when set, which `cargo xtask test` counts and names in its summary
/// (libtest itself reports a skipped test as passed).
pub fn skip(reason: &str) {
    use std::io::Write;
    let exe = std::env::current_exe().ok();
    let binary = exe
        .as_deref()
        .and_then(|p| p.file_stem())
        .and_then(|s| s.to_str())
        .map(|s| s.split('-').next().unwrap_or(s).to_string())
        .unwrap_or_default();
    let thread = std::thread::current();
    let name = format!("{binary}::{}", thread.name().unwrap_or("?"));
    eprintln!("SKIPPED {name}: {reason}");
    if let Some(log) = std::env::var_os("LOFTQ_SKIP_LOG") {
        // One short append per line: concurrent test processes do not interleave.
        let line = format!("{name}: {reason}\n");
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            eprintln!(
                "cannot record the skip in {}: {e}",
                PathBuf::from(log).display()
            );
        }
    }
}
