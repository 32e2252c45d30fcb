//! What crosses between the host and the device, counted per thread and for the whole
//! process ([`transfers_all_threads`]). On a GPU each read is a synchronization (the queue
//! drains before the values come back), so the number of reads per LoftQ iteration bounds its
//! latency whatever the arithmetic costs; counting them needs no GPU. The same calls on CPU
//! tensors are counted too (as copies); the `cpu` module's host path, which keeps its matrices
//! on the host, moves nothing and counts nothing.

use std::cell::Cell;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

use burn::tensor::{Device, Tensor, TensorData};

use serde::Serialize;

/// Reads (device → host) and uploads (host → device), and how many values each moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Transfers {
    /// Reads: each waits for the device.
    pub reads: u64,
    /// Values read.
    pub read_values: u64,
    /// Uploads.
    pub uploads: u64,
    /// Values uploaded.
    pub upload_values: u64,
}

impl std::ops::Sub for Transfers {
    type Output = Transfers;

    /// What was counted between two snapshots (`later − earlier`).
    fn sub(self, earlier: Transfers) -> Transfers {
        Transfers {
            reads: self.reads - earlier.reads,
            read_values: self.read_values - earlier.read_values,
            uploads: self.uploads - earlier.uploads,
            upload_values: self.upload_values - earlier.upload_values,
        }
    }
}

thread_local! {
    static COUNTS: Cell<Transfers> = const { Cell::new(Transfers {
        reads: 0,
        read_values: 0,
        uploads: 0,
        upload_values: 0,
    }) };
}

/// The process's counts, every thread together (`[reads, read values, uploads, upload values]`).
static ALL: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// The counts of this thread so far; subtract two snapshots to count a piece of work.
pub fn transfers() -> Transfers {
    COUNTS.with(Cell::get)
}

/// The counts of every thread of the process so far, for work spread over threads (a training
/// step with one thread per device, `loftq init`'s workers). Tests, which run in parallel in
/// one process, want [`transfers`].
pub fn transfers_all_threads() -> Transfers {
    let [reads, read_values, uploads, upload_values] = ALL.each_ref().map(|a| a.load(Relaxed));
    Transfers {
        reads,
        read_values,
        uploads,
        upload_values,
    }
}

/// Counts one read of `values` values.
pub(crate) fn count_read(values: usize) {
    COUNTS.with(|c| {
        let mut t = c.get();
        t.reads += 1;
        t.read_values += values as u64;
        c.set(t);
    });
    ALL[0].fetch_add(1, Relaxed);
    ALL[1].fetch_add(values as u64, Relaxed);
}

/// Counts one upload of `values` values.
pub(crate) fn count_upload(values: usize) {
    COUNTS.with(|c| {
        let mut t = c.get();
        t.uploads += 1;
        t.upload_values += values as u64;
        c.set(t);
    });
    ALL[2].fetch_add(1, Relaxed);
    ALL[3].fetch_add(values as u64, Relaxed);
}

/// Uploads `values` as a tensor of `shape` to `device`, counted: every `f32` upload of the
/// core goes through here.
pub(crate) fn upload<const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &Device,
) -> Tensor<D> {
    count_upload(values.len());
    Tensor::from_data(TensorData::new(values, shape), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_threads_count_in_the_totals_only() {
        let (mine, all) = (transfers(), transfers_all_threads());
        std::thread::spawn(|| count_read(7)).join().unwrap();
        assert_eq!(transfers() - mine, Transfers::default());
        // Other tests may count at the same time: at least this thread's read.
        let moved = transfers_all_threads() - all;
        assert!(moved.reads >= 1 && moved.read_values >= 7, "{moved:?}");
    }
}
