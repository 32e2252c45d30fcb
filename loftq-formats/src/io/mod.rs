//! File formats: safetensors checkpoints (HF directories, sharded or not), GGUF files,
//! PEFT adapters (safetensors, or PyTorch `.bin` read only), our packed backbone, and
//! bitsandbytes' 4-bit checkpoints (read only).

mod atomic;
mod bnb;
pub mod ggml;
pub mod gguf;
mod gguf_export;
mod gguf_from_hf;
mod gguf_llama;
mod gguf_rope;
mod gguf_vocab;
pub mod gguf_write;
mod json;
mod merge;
mod packed;
mod peft;
mod peft_weights;
mod pickle;
mod safetensors;
mod source;
pub mod space;
mod stream;
mod torch_pickle;
mod torch_zip;

pub use self::atomic::{is_non_empty_dir, require_empty_dir, write_atomic, write_dir_atomic};
pub use self::bnb::{BnbSummary, bnb_names, bnb_summary, is_bnb_part, read_bnb};
pub use self::gguf::Gguf;
pub use self::gguf_export::{write_gguf_base, write_lora_gguf};
pub use self::gguf_from_hf::{SourceGguf, gguf_metadata, write_gguf_from_hf};
pub use self::gguf_llama::{
    GgufModel, gguf_name, hf_name, permute_rows, rotary_heads, unpermute_rows,
};
pub use self::gguf_vocab::vocabulary_json;
pub use self::json::read_json_if_present;
pub use self::merge::{GgufWeightType, write_merged, write_merged_gguf};
pub use self::packed::{
    FORMAT, FORMAT_KEY, add_packed, dequantize_packed, packed_header, packed_names, read_packed,
};
pub use self::peft::{
    Adapter, AdapterConfig, AdapterWriter, LoraWeights, layer_index, module_matches,
};
pub use self::peft_weights::{
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN, LOFTQ_INIT, adapter_dir,
};
pub use self::safetensors::{
    Checkpoint, HostTensor, OutTensor, TensorEntry, bf16_le_bytes, f32_le_bytes, floats_from_le,
    write_safetensors,
};
pub use self::source::{
    SIDE_FILES, TensorSource, check_finite, check_side_files, copy_side_files, is_gguf, open_source,
};
pub use self::stream::StreamWriter;
pub use self::torch_pickle::TorchState;

pub use self::packed::HEADER_PREFIX;
pub use self::peft::PREFIX as PEFT_PREFIX;
