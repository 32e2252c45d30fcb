//! Tensors spread over devices: one reader thread, one worker thread per device with a
//! writer thread of its own, and the results handed back to the caller's thread in the order
//! they finish.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel, sync_channel};
use std::sync::{Arc, Mutex};

use burn::tensor::Device;

use super::batch::{self, Computed};
use super::piece::{self, Loaded, Plan};
use super::{InitSpec, TensorReport};
use crate::Result;
use crate::io::TensorSource;

/// Computes `tensors` of `plan` but those `done`, each group (see [`batch::groups`]) on
/// whichever device is free next, and calls `on_done` for every targeted tensor finished
/// (pass-through tensors are written silently).
///
/// The reader stays one group ahead of each device and a writer writes one group behind it,
/// so reading and writing overlap computing; at most four groups per device are in memory
/// (read, computing, waiting to be written, being written). After the first error no new
/// tensor starts; the tensors being computed finish, and the error is returned.
pub(super) fn run(
    spec: &InitSpec,
    plan: &Plan,
    (tensors, done): (&[usize], &HashSet<usize>),
    source: &dyn TensorSource,
    work: &Path,
    devices: &[Device],
    on_done: &mut dyn FnMut(usize, TensorReport),
) -> Result<()> {
    let stop = AtomicBool::new(false);
    let stop = &stop;
    let groups = batch::groups(spec, plan, tensors, devices);
    // A group is computed whole, its done members included, so that every tensor is computed
    // in the same company as in an uninterrupted run: a resumed run's files are identical.
    let groups: Vec<Vec<usize>> = groups
        .into_iter()
        .filter(|g| g.iter().any(|i| !done.contains(i)))
        .collect();
    std::thread::scope(|scope| {
        let (to_workers, from_reader) = sync_channel::<Vec<(usize, Result<Loaded>)>>(devices.len());
        let (to_caller, finished) = channel();
        scope.spawn(move || {
            for group in groups {
                let loaded = group
                    .into_iter()
                    .map(|i| (i, piece::load(source, &plan.items[i])))
                    .collect();
                if stop.load(Ordering::Relaxed) || to_workers.send(loaded).is_err() {
                    return;
                }
            }
        });
        // Workers share the receiver; when the last one leaves, the reader's `send` fails.
        let from_reader = Arc::new(Mutex::new(from_reader));
        for (worker, device) in devices.iter().enumerate() {
            let from_reader = Arc::clone(&from_reader);
            let to_caller = to_caller.clone();
            // Each worker's writer writes one group's pieces while the worker computes the
            // next: the device does not wait for the disk.
            let (to_writer, from_worker) = sync_channel::<Computed>(1);
            let writer_to_caller = to_caller.clone();
            scope.spawn(move || {
                for computed in from_worker {
                    let results = match computed {
                        Computed::Written(results) => results,
                        Computed::Starts(starts, seconds) => {
                            batch::write(plan, work, starts, seconds)
                        }
                    };
                    for (i, result) in results {
                        log(&plan.items[i].name, worker, &result);
                        if writer_to_caller.send((i, result)).is_err() {
                            return;
                        }
                    }
                }
            });
            scope.spawn(move || {
                loop {
                    let next = from_reader
                        .lock()
                        .expect("no worker panics holding it")
                        .recv();
                    let Ok(group) = next else { return };
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let computed = batch::compute(spec, plan, group, done, work, device);
                    if to_writer.send(computed).is_err() {
                        return;
                    }
                }
            });
        }
        drop((from_reader, to_caller));
        reports(finished, stop, on_done)
    })
}

/// Hands the reports of the tensors `finished` sends to `on_done` until the first error, then
/// raises `stop` and keeps draining (the running tensors finish); returns that error.
pub(super) fn reports(
    finished: Receiver<(usize, Result<Option<TensorReport>>)>,
    stop: &AtomicBool,
    on_done: &mut dyn FnMut(usize, TensorReport),
) -> Result<()> {
    let mut first_error = None;
    for (i, result) in finished {
        match result {
            Ok(Some(report)) if first_error.is_none() => on_done(i, report),
            Ok(_) => {}
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn log(name: &str, worker: usize, result: &Result<Option<TensorReport>>) {
    match result {
        Ok(Some(r)) => tracing::info!(
            tensor = name,
            worker,
            shape = ?r.shape,
            quantizer = %r.quantizer,
            rel_err_quant = ?r.rel_err_quant,
            rel_err_init = r.rel_err_init,
            iters = r.iters_used,
            seconds = r.seconds,
            "initialized"
        ),
        Ok(None) => tracing::debug!(tensor = name, worker, "copied"),
        Err(e) => tracing::warn!(tensor = name, worker, error = %e, "failed; no new tensor starts"),
    }
}
