//! Where the time of device work goes: an opt-in split of wall-clock time by phase.
//!
//! A GPU queues work, so a phase's cost is known only once the device has finished it. With
//! `LOFTQ_PROFILE=1` in the environment (or [`enable`]), each [`mark`] waits for the device
//! and charges the time since the thread's previous mark to its phase; the totals of every
//! thread are gathered until [`take`]. Off (the default) a mark is one atomic load. Waiting
//! removes the overlap of host and device work, so a profiled run is a little slower than a
//! plain one: the split is what it is for, not the total.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU8;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use burn::tensor::Device;
use serde::Serialize;

/// 0: not decided yet (read the environment), 1: off, 2: on.
static STATE: AtomicU8 = AtomicU8::new(0);
static TOTALS: Mutex<BTreeMap<&'static str, (Duration, u64, u64)>> = Mutex::new(BTreeMap::new());

thread_local! {
    /// The thread's previous mark, and its count of device reads then.
    static LAST: Cell<Option<(Instant, u64)>> = const { Cell::new(None) };
}

/// This thread's device reads so far ([`crate::transfers`]).
fn reads() -> u64 {
    crate::transfers::transfers().reads
}

/// One phase's share of the profiled time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Phase {
    /// The phase's name.
    pub name: &'static str,
    /// Seconds charged to it, every thread together.
    pub seconds: f64,
    /// Marks that charged it.
    pub count: u64,
    /// Device→host reads made in it (each a wait for the device, beside the marks' own).
    pub reads: u64,
}

/// Turns profiling on or off for the whole process.
pub fn enable(on: bool) {
    STATE.store(if on { 2 } else { 1 }, Relaxed);
}

/// Whether marks are timed: [`enable`]'s choice, else whether `LOFTQ_PROFILE` is set to
/// something other than `0` or empty.
pub fn enabled() -> bool {
    match STATE.load(Relaxed) {
        0 => {
            let on = std::env::var("LOFTQ_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0");
            enable(on);
            on
        }
        s => s == 2,
    }
}

/// Waits for `device`, then starts this thread's clock: what came before is charged to no
/// phase.
pub fn start(device: &Device) {
    if enabled() {
        wait(device);
        LAST.with(|l| l.set(Some((Instant::now(), reads()))));
    }
}

/// Waits for `device`, then charges the time since this thread's previous mark (or
/// [`start`]) to `phase`. Without a previous mark it only starts the clock.
pub fn mark(device: &Device, phase: &'static str) {
    if !enabled() {
        return;
    }
    wait(device);
    let now = (Instant::now(), reads());
    if let Some(before) = LAST.with(|l| l.replace(Some(now))) {
        let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
        let entry = totals.entry(phase).or_default();
        entry.0 += now.0 - before.0;
        entry.1 += 1;
        entry.2 += now.1 - before.1;
    }
}

/// The phases charged since the last call, longest first, and clears them.
pub fn take() -> Vec<Phase> {
    let totals = std::mem::take(&mut *TOTALS.lock().unwrap_or_else(|e| e.into_inner()));
    let mut phases: Vec<Phase> = totals
        .into_iter()
        .map(|(name, (d, count, reads))| Phase {
            name,
            seconds: d.as_secs_f64(),
            count,
            reads,
        })
        .collect();
    phases.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    phases
}

/// With profiling on, [`take`]'s phases as [`markdown`]; `None` when it is off.
pub fn take_markdown() -> Option<String> {
    enabled().then(|| markdown(&take()))
}

/// The phases as a Markdown table with each one's share of their total.
pub fn markdown(phases: &[Phase]) -> String {
    let total: f64 = phases.iter().map(|p| p.seconds).sum();
    let mut s = String::from("| phase | time | share | marks | reads |\n|---|---|---|---|---|\n");
    for p in phases {
        s += &format!(
            "| {} | {:.1} ms | {:.0}% | {} | {} |\n",
            p.name,
            p.seconds * 1e3,
            100.0 * p.seconds / total.max(f64::MIN_POSITIVE),
            p.count,
            p.reads
        );
    }
    s
}

/// A profiling failure to wait is not worth failing the work for: the next read reports it.
fn wait(device: &Device) {
    let _ = device.sync();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_charge_their_phases_in_order() {
        enable(true);
        let device = crate::DeviceSpec::Cpu.device().expect("the CPU");
        start(&device);
        std::thread::sleep(Duration::from_millis(20));
        crate::transfers::count_read(3);
        mark(&device, "test: slow");
        mark(&device, "test: fast");
        let phases: Vec<Phase> = take()
            .into_iter()
            .filter(|p| p.name.starts_with("test:"))
            .collect();
        enable(false);
        assert_eq!(phases.len(), 2, "{phases:?}");
        assert_eq!(phases[0].name, "test: slow");
        assert!(phases[0].seconds >= 0.02, "{phases:?}");
        assert!(phases[1].seconds < phases[0].seconds);
        assert_eq!([phases[0].reads, phases[1].reads], [1, 0], "{phases:?}");
        assert!(markdown(&phases).contains("| test: slow |"));
    }
}
