//! Timing and memory helpers: warm-up, repeats, median/min/max, peak resident memory.

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Seconds of repeated runs of one case.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Timing {
    /// Median over the repeats.
    pub median_s: f64,
    /// Fastest repeat.
    pub min_s: f64,
    /// Slowest repeat.
    pub max_s: f64,
    /// Number of timed repeats (after one untimed warm-up; 1 and no warm-up for one-shot cases).
    pub repeats: usize,
}

/// Resident memory around one case (Linux; zeros elsewhere).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Memory {
    /// Resident memory before the case.
    pub rss_before_bytes: u64,
    /// Peak resident memory while the case ran (the peak is reset before it).
    pub peak_rss_bytes: u64,
}

/// With `LOFTQ_PROFILE` set: prints to stderr where the time since the last report went
/// ([`loftq_core::profile`]), under `label`.
pub fn report_profile(label: &str) {
    if let Some(table) = loftq_core::profile::take_markdown() {
        eprintln!("profile of {label}:\n{table}");
    }
}

/// Runs `f` once to warm up, then `repeats` times, timing each run.
pub fn time(repeats: usize, f: impl FnMut()) -> Timing {
    measure(repeats.max(1), f).0
}

/// Like [`time`], with the peak resident memory of the runs; `repeats == 0` means one timed
/// run without a warm-up (for cases that take minutes).
pub fn measure(repeats: usize, mut f: impl FnMut()) -> (Timing, Memory) {
    if repeats > 0 {
        f();
        // The profile (LOFTQ_PROFILE) covers the timed runs only.
        let _ = loftq_core::profile::take();
    }
    let rss_before_bytes = status_bytes("VmRSS:").unwrap_or(0);
    // Writing 5 to clear_refs resets the peak (VmHWM) to the current resident size.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let mut t: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    let timing = Timing {
        median_s: t[t.len() / 2],
        min_s: t[0],
        max_s: t[t.len() - 1],
        repeats: t.len(),
    };
    let memory = Memory {
        rss_before_bytes,
        peak_rss_bytes: status_bytes("VmHWM:").unwrap_or(0),
    };
    (timing, memory)
}

/// A `kB` line of `/proc/self/status`, in bytes.
fn status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
