//! Timing helpers: warm-up, repeats, median/min/max.

use std::time::Instant;

use serde::Serialize;

/// Seconds of repeated runs of one case.
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    /// Median over the repeats.
    pub median_s: f64,
    /// Fastest repeat.
    pub min_s: f64,
    /// Slowest repeat.
    pub max_s: f64,
    /// Number of timed repeats (after one untimed warm-up).
    pub repeats: usize,
}

/// Runs `f` once to warm up, then `repeats` times, timing each run.
pub fn time(repeats: usize, mut f: impl FnMut()) -> Timing {
    f();
    let mut t: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    Timing {
        median_s: t[t.len() / 2],
        min_s: t[0],
        max_s: t[t.len() - 1],
        repeats: t.len(),
    }
}
