//! Choosing a Burn device by name (`cpu`, `wgpu`, `cuda:1`), for the CLI, benchmarks and tests.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// A back end and device index, as written on a command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// Burn's pure-Rust CPU back end (`flex`).
    Cpu,
    /// WGPU's default adapter (Vulkan, Metal, DirectX 12; Mesa's lavapipe without a GPU).
    Wgpu,
    /// WGPU's discrete GPU `N` (`wgpu:N`), in the order the graphics API lists them: one of
    /// several GPUs, e.g. for `loftq train --device wgpu:0,wgpu:1`.
    WgpuGpu(usize),
    /// CUDA device `N`.
    Cuda(usize),
}

/// A device name that is unknown or whose back end is not compiled in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Not `cpu`, `wgpu`, `wgpu:N`, `cuda` or `cuda:N`.
    #[error("unknown device `{0}` (expected cpu, wgpu, wgpu:N, cuda or cuda:N)")]
    Unknown(String),
    /// The back end exists but this binary was built without its Cargo feature.
    #[error("device `{0}` needs the `{1}` Cargo feature (rebuild with `--features {1}`)")]
    NotCompiled(DeviceSpec, &'static str),
    /// The back end is compiled in, but the device does not answer (no such GPU, no driver).
    #[error("device `{0}` is not available: {1}")]
    Unavailable(DeviceSpec, String),
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" | "flex" => Ok(DeviceSpec::Cpu),
            "wgpu" | "vulkan" | "metal" => Ok(DeviceSpec::Wgpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => {
                let index = |prefix: &str| other.strip_prefix(prefix)?.parse().ok();
                index("cuda:")
                    .map(DeviceSpec::Cuda)
                    .or_else(|| index("wgpu:").map(DeviceSpec::WgpuGpu))
                    .ok_or_else(|| DeviceError::Unknown(s.to_string()))
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Wgpu => write!(f, "wgpu"),
            DeviceSpec::WgpuGpu(i) => write!(f, "wgpu:{i}"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Whether this build has Burn's operation fusion and kernel autotuning on the GPU back ends
/// (the `tuned` feature): benchmarks record it beside their figures.
pub const TUNED_KERNELS: bool = cfg!(feature = "tuned");

impl DeviceSpec {
    /// The Cargo feature that compiles this back end in.
    pub fn feature(self) -> &'static str {
        match self {
            DeviceSpec::Cpu => "flex",
            DeviceSpec::Wgpu | DeviceSpec::WgpuGpu(_) => "wgpu",
            DeviceSpec::Cuda(_) => "cuda",
        }
    }

    /// Opens the device. Creating it does not touch the hardware yet; the first operation does.
    pub fn device(self) -> Result<Device, DeviceError> {
        match self {
            #[cfg(feature = "flex")]
            DeviceSpec::Cpu => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            DeviceSpec::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(feature = "wgpu")]
            DeviceSpec::WgpuGpu(i) => Ok(Device::wgpu(burn::tensor::DeviceKind::DiscreteGpu(i))),
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(i) => Ok(Device::cuda(i)),
            #[allow(unreachable_patterns)]
            spec => Err(DeviceError::NotCompiled(spec, spec.feature())),
        }
    }

    /// Opens the device and runs one tiny operation on it, so that a GPU that is missing or
    /// has no driver is an error here instead of a panic at the first real operation. For
    /// programs (it replaces the panic hook while it probes); the CPU is not probed.
    ///
    /// # Errors
    /// [`DeviceError::NotCompiled`], or [`DeviceError::Unavailable`] with the back end's
    /// message.
    pub fn open(self) -> Result<Device, DeviceError> {
        let device = self.device()?;
        if self == DeviceSpec::Cpu {
            return Ok(device);
        }
        // The back end panics, often on its own thread first: keep the first message quiet
        // and return it.
        let message = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let seen = message.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let mut m = seen.lock().unwrap_or_else(|e| e.into_inner());
            m.get_or_insert_with(|| match info.payload().downcast_ref::<String>() {
                Some(s) => s.clone(),
                None => info
                    .payload()
                    .downcast_ref::<&str>()
                    .map_or_else(|| info.to_string(), |s| s.to_string()),
            });
        }));
        let probe = std::panic::catch_unwind(|| {
            burn::tensor::Tensor::<1>::zeros([1], &device)
                .into_data()
                .try_to_vec::<f32>()
                .map(|_| ())
                .map_err(|e| format!("{e:?}"))
        });
        std::panic::set_hook(previous);
        let failure = match probe {
            Ok(Ok(())) => return Ok(device),
            Ok(Err(e)) => e,
            Err(_) => message
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .unwrap_or_else(|| "the back end panicked".into()),
        };
        Err(DeviceError::Unavailable(self, failure))
    }

    /// The device named by the `LOFTQ_DEVICE` environment variable, `cpu` when unset.
    ///
    /// # Panics
    /// If the variable names an unknown or not-compiled back end (meant for tests and benches).
    pub fn from_env() -> DeviceSpec {
        let name = std::env::var("LOFTQ_DEVICE").unwrap_or_else(|_| "cpu".into());
        let spec: DeviceSpec = name.parse().unwrap_or_else(|e| panic!("LOFTQ_DEVICE: {e}"));
        spec.device()
            .unwrap_or_else(|e| panic!("LOFTQ_DEVICE: {e}"));
        spec
    }
}

/// The largest single buffer `device` allocates, in bytes, where its back end has such a
/// limit: on WGPU the storage-binding limit (128 MiB on Mesa's lavapipe, far more on most
/// GPUs), on CUDA the memory pool's largest page; `None` on the CPU. A larger tensor is not an
/// error when it is made, only at the next read, so work whose intermediates grow with the
/// input (attention's scores, logits) splits itself to fit ([`rows_per_buffer`]), and a weight
/// that cannot is refused ([`exceeds_buffer`]).
pub fn max_buffer_bytes(device: &Device) -> Option<u64> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        crate::cube::max_buffer(device)
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = device;
        None
    }
}

/// Rows of `width` `f32` values that one buffer of `device` holds, at least 1 (`usize::MAX`
/// where it sets no limit).
pub fn rows_per_buffer(device: &Device, width: usize) -> usize {
    let row = (width * std::mem::size_of::<f32>()).max(1) as u64;
    max_buffer_bytes(device).map_or(usize::MAX, |limit| ((limit / row) as usize).max(1))
}

/// Why `f32` values of `shape` cannot be one buffer of `device`, when they cannot: their size
/// and the limit, for an error that also names the tensor.
pub fn exceeds_buffer(device: &Device, shape: &[usize]) -> Option<String> {
    let bytes = shape.iter().product::<usize>() as u64 * 4;
    let limit = max_buffer_bytes(device).filter(|&limit| bytes > limit)?;
    Some(format!(
        "{shape:?} takes {bytes} bytes as f32, more than one buffer of the device holds \
         ({limit} bytes, {:.0} MiB)",
        limit as f64 / (1u64 << 20) as f64
    ))
}

/// Several devices, comma-separated on a command line (`cuda:0,cuda:1`, `cpu,wgpu`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceList(pub Vec<DeviceSpec>);

impl FromStr for DeviceList {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .map(str::parse)
            .collect::<Result<Vec<_>, _>>()
            .map(DeviceList)
    }
}

impl fmt::Display for DeviceList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl DeviceList {
    /// Opens and probes every device ([`DeviceSpec::open`]).
    ///
    /// # Errors
    /// The first device that is not compiled in or does not answer.
    pub fn open(&self) -> Result<Vec<Device>, DeviceError> {
        self.0.iter().map(|d| d.open()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA:2".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(2));
        assert_eq!("wgpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Wgpu);
        assert_eq!(
            "wgpu:1".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::WgpuGpu(1)
        );
        assert_eq!(DeviceSpec::WgpuGpu(1).to_string(), "wgpu:1");
        assert!("wgpu:".parse::<DeviceSpec>().is_err());
        assert!(matches!(
            "tpu".parse::<DeviceSpec>(),
            Err(DeviceError::Unknown(_))
        ));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn parses_lists() {
        let list: DeviceList = "cuda:0, cuda:1".parse().unwrap();
        assert_eq!(list.0, vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)]);
        assert_eq!(list.to_string(), "cuda:0,cuda:1");
        assert!("cpu,".parse::<DeviceList>().is_err());
    }
}
