//! What crosses between the host and the device, counted per thread. On a GPU each read is a
//! synchronization (the queue drains before the values come back), so the number of reads per
//! LoftQ iteration bounds its latency whatever the arithmetic costs; counting them needs no
//! GPU. The same calls on CPU tensors are counted too (as copies); the `cpu` module's host
//! path, which keeps its matrices on the host, moves nothing and counts nothing.

use std::cell::Cell;

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

/// The counts of this thread so far; subtract two snapshots to count a piece of work.
pub fn transfers() -> Transfers {
    COUNTS.with(Cell::get)
}

/// Counts one read of `values` values.
pub(crate) fn count_read(values: usize) {
    COUNTS.with(|c| {
        let mut t = c.get();
        t.reads += 1;
        t.read_values += values as u64;
        c.set(t);
    });
}

/// Counts one upload of `values` values.
pub(crate) fn count_upload(values: usize) {
    COUNTS.with(|c| {
        let mut t = c.get();
        t.uploads += 1;
        t.upload_values += values as u64;
        c.set(t);
    });
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
