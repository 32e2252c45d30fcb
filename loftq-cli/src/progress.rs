//! A one-line progress bar on stderr (redrawn in place on a terminal, a line per tenth of the
//! work otherwise), with ETA. Small on purpose: `indicatif` would change the features of a crate
//! Burn's GPU stack shares and cost a rebuild of that stack.

use std::io::{IsTerminal, Write};
use std::time::Instant;

/// Progress over a known amount of work.
pub struct Progress {
    total: u64,
    done: u64,
    start: Instant,
    tty: bool,
    last_len: usize,
    last_decile: u64,
}

impl Progress {
    /// Starts at zero out of `total` units.
    pub fn new(total: u64) -> Self {
        Self {
            total: total.max(1),
            done: 0,
            start: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            last_len: 0,
            last_decile: 0,
        }
    }

    /// Adds `units` and shows `msg`.
    pub fn inc(&mut self, units: u64, msg: &str) {
        self.done = (self.done + units).min(self.total);
        let frac = self.done as f64 / self.total as f64;
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = if frac > 0.0 {
            format_secs(elapsed / frac - elapsed)
        } else {
            "?".into()
        };
        let filled = (frac * 24.0).round() as usize;
        let line = format!(
            "[{}{}] {:>3.0}% {} elapsed, eta {eta}  {msg}",
            "#".repeat(filled),
            "-".repeat(24 - filled),
            100.0 * frac,
            format_secs(elapsed),
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let pad = self.last_len.saturating_sub(line.len());
            let _ = write!(err, "\r{line}{}", " ".repeat(pad));
            self.last_len = line.len();
        } else {
            // In a log, one line per tenth of the work.
            let decile = self.done * 10 / self.total;
            if decile > self.last_decile {
                self.last_decile = decile;
                let _ = writeln!(err, "{line}");
            }
        }
        let _ = err.flush();
    }

    /// Prints a note on its own line.
    pub fn note(&mut self, msg: &str) {
        self.clear();
        eprintln!("{msg}");
    }

    /// Removes the bar from a terminal.
    pub fn clear(&mut self) {
        if self.tty && self.last_len > 0 {
            eprint!("\r{}\r", " ".repeat(self.last_len));
            self.last_len = 0;
        }
    }
}

/// One event of a run as a JSON line on stdout (`--json`).
#[allow(clippy::print_stdout)]
pub fn json_line<E: serde::Serialize>(event: &E) {
    println!(
        "{}",
        serde_json::to_string(event).expect("an event serializes")
    );
}

/// The end of a run that printed its own events: clears the bar, then prints `msg`.
pub fn done(bar: Option<&mut Progress>, msg: &str) {
    if let Some(p) = bar {
        p.clear();
    }
    eprintln!("{msg}");
}

/// The end of a long run: clears the bar, then gives the report back, or with `json` prints it
/// as JSON on stdout and gives `None` (nothing more to print).
#[allow(clippy::print_stdout)]
pub fn finish<R: serde::Serialize>(
    bar: Option<Progress>,
    result: loftq_models::Result<R>,
    json: bool,
) -> loftq_models::Result<Option<R>> {
    if let Some(mut p) = bar {
        p.clear();
    }
    let report = result?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
        return Ok(None);
    }
    Ok(Some(report))
}

fn format_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}
