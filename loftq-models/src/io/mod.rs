//! File formats: safetensors checkpoints (HF directories, sharded or not), PEFT adapters,
//! and our packed backbone.

mod packed;
mod peft;
mod safetensors;

pub use self::packed::{FORMAT, FORMAT_KEY, add_packed, packed_names, read_packed};
pub use self::peft::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter, AdapterConfig, LoraWeights};
pub use self::safetensors::{
    Checkpoint, HostTensor, OutTensor, TensorEntry, floats_from_le, write_atomic, write_safetensors,
};
