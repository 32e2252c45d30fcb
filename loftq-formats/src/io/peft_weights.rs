//! Where an adapter's weights are: `adapter_model.safetensors`, or PyTorch's pickled
//! `adapter_model.bin`; and the adapter folder of a LoftQ organisation release.

use std::path::{Path, PathBuf};

use super::safetensors::{Checkpoint, HostTensor};
use super::torch_pickle::TorchState;
use crate::{ModelError, Result};

/// File name of the adapter configuration.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// File name of the adapter weights.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// File name of adapter weights pickled by PyTorch (PEFT with `safe_serialization=False`).
pub const ADAPTER_WEIGHTS_BIN: &str = "adapter_model.bin";
/// The folder of a LoftQ organisation release (a backbone holding the quantized `Q`,
/// dequantized to bf16) that holds its LoftQ adapter.
pub const LOFTQ_INIT: &str = "loftq_init";

/// The adapter directory `dir` names: `dir` itself, or, when `dir` has no
/// `adapter_config.json` but a `loftq_init/` that has one, that folder (a LoftQ organisation
/// release, whose backbone is `dir`).
pub fn adapter_dir(dir: &Path) -> PathBuf {
    let release = dir.join(LOFTQ_INIT);
    if !dir.join(ADAPTER_CONFIG).exists() && release.join(ADAPTER_CONFIG).is_file() {
        release
    } else {
        dir.to_path_buf()
    }
}

/// An adapter's weights file: safetensors, or else PyTorch's pickle.
pub(super) enum Weights {
    Safetensors(Checkpoint),
    Torch(TorchState),
}

impl Weights {
    pub(super) fn open(dir: &Path) -> Result<(PathBuf, Self)> {
        let (safe, bin) = (dir.join(ADAPTER_WEIGHTS), dir.join(ADAPTER_WEIGHTS_BIN));
        if !safe.exists() && bin.exists() {
            return Ok((bin.clone(), Self::Torch(TorchState::open(&bin)?)));
        }
        if !safe.exists() {
            return Err(ModelError::format(
                dir,
                format!("no {ADAPTER_WEIGHTS} (nor {ADAPTER_WEIGHTS_BIN}): not an adapter"),
            ));
        }
        Ok((safe.clone(), Self::Safetensors(Checkpoint::open(&safe)?)))
    }

    pub(super) fn names(&self) -> Vec<String> {
        match self {
            Self::Safetensors(c) => c.names().map(String::from).collect(),
            Self::Torch(t) => t.names().map(String::from).collect(),
        }
    }

    pub(super) fn f32(&self, name: &str) -> Result<HostTensor> {
        match self {
            Self::Safetensors(c) => c.f32(name),
            Self::Torch(t) => t.f32(name),
        }
    }
}
