//! A GPU that fails during a run (out of memory, a buffer larger than it allocates, a lost
//! device) reports it at the next read from it, which Burn turns into a panic with CubeCL's
//! whole chain of causes. Such a panic becomes [`CliError::Device`]: one line naming the
//! innermost cause, exit code 1. Any other panic is a bug and stays one.

use std::panic::{self, AssertUnwindSafe};
use std::sync::{Mutex, Once};

use crate::error::{CliError, Result};

/// The first device failure of the run.
static FAILURE: Mutex<Option<String>> = Mutex::new(None);

/// Runs `command`, turning a device failure's panic (on this thread or a worker's) into an
/// error; the default panic message is kept for other panics.
pub fn guarded(command: impl FnOnce() -> Result<()>) -> Result<()> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let text = (info.payload().downcast_ref::<String>().map(String::as_str))
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            let mut failure = FAILURE.lock().unwrap_or_else(|e| e.into_inner());
            match device_failure(text) {
                Some(cause) => {
                    failure.get_or_insert(cause);
                }
                // A thread's panic after a worker's device failure says nothing more.
                None if failure.is_some() => {}
                None => {
                    drop(failure);
                    default(info);
                }
            }
        }));
    });
    match panic::catch_unwind(AssertUnwindSafe(command)) {
        Ok(result) => result,
        Err(payload) => {
            let failure = FAILURE.lock().unwrap_or_else(|e| e.into_inner()).take();
            match failure {
                Some(cause) => Err(CliError::Device(cause)),
                None => panic::resume_unwind(payload),
            }
        }
    }
}

/// The innermost cause of a device failure's panic message (`None`: another panic).
fn device_failure(text: &str) -> Option<String> {
    if !text.contains("An error happened during execution") {
        return None;
    }
    let lines: Vec<&str> = text.lines().collect();
    let cause = (lines.windows(2).rev())
        .find(|w| w[0].trim() == "Caused by:")
        .map(|w| w[1].trim());
    Some(cause.unwrap_or("an error during execution").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As lavapipe reported a 151 MB buffer (its limit is 128 MiB).
    const READ_FAILED: &str = "Error while reading data: use `try_into_data` instead to catch \
the error at runtime: An error happened during execution
Caused by:
  Several failures at once
Caused by:
  The bytes were never written (failure #36, still claiming 4 buffer(s))
  skipped `GatherKernel`: it needed memory ManagedMemoryId { value: 139 }, which carried the failure
Caused by:
  An IO error happened
Caused by:
  can't allocate buffer of size: 150994944
No backtrace available
Asked at:
No backtrace available";

    #[test]
    fn a_device_failure_is_its_innermost_cause() {
        assert_eq!(
            device_failure(READ_FAILED).as_deref(),
            Some("can't allocate buffer of size: 150994944")
        );
        assert_eq!(device_failure("index out of bounds: the len is 3"), None);
    }

    #[test]
    fn device_failures_become_errors_and_other_panics_stay() {
        let e = guarded(|| panic!("{READ_FAILED}")).unwrap_err();
        assert!(
            matches!(&e, CliError::Device(c) if c.contains("150994944")),
            "{e}"
        );
        // A worker's failure, then the panic that carries it to this thread.
        let e = guarded(|| {
            std::thread::scope(|s| {
                s.spawn(|| panic!("{READ_FAILED}"));
            });
            Ok(())
        })
        .unwrap_err();
        assert!(matches!(e, CliError::Device(_)), "{e}");
        let other = panic::catch_unwind(|| guarded(|| panic!("a bug")));
        assert!(other.is_err(), "other panics are not errors");
        assert!(guarded(|| Ok(())).is_ok());
    }
}
