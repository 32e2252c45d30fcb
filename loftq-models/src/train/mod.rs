//! QLoRA-style fine-tuning: the quantized base stays frozen (and packed), only the LoRA
//! factors train.
//!
//! - [`data`]: tokenized text files as one stream, and the rows drawn from it.
//! - [`step`]: the loss and LoRA gradients of a batch, with layer-wise recomputation so that
//!   one layer's dense weights and activations are alive at a time.
//! - [`optim`]: AdamW, the learning-rate schedule, gradient clipping.
//! - [`distill`]: the distillation objective, the adapters fitted to a full-precision
//!   teacher's outputs.
//! - [`blockwise`]: distillation one decoder layer at a time (ApiQ).
//! - `run`: the loop, checkpoints and exact resume; with several devices, the
//!   micro-batches of a step are spread over one model replica per device ([`parallel`]).
//! - `validate`: the perplexity of held-out text and the teacher–student KL at the same
//!   positions ([`Validation`]).

pub mod blockwise;
pub(crate) mod checkpoint;
pub(crate) mod config;
pub mod data;
pub mod distill;
mod job;
pub mod optim;
pub mod parallel;
mod run;
pub mod step;
mod validate;

pub use blockwise::{
    BLOCKWISE_CHECKPOINT, BlockwiseConfig, BlockwiseEvent, BlockwiseReport, Fitted, LayerFit,
    distill_blockwise, fit_layers,
};
pub use checkpoint::latest_checkpoint;
pub use config::{History, StepRecord, TrainConfig, TrainEvent};
pub use data::{Batch, Sampling, TokenStream};
pub use distill::{DistillLoss, Objective, TeacherOutputs, teacher_outputs};
pub use job::TrainJob;
pub use optim::{AdamW, AdamWConfig, Decay, Schedule, grad_norm};
pub use run::{distill_on, train, train_on};
pub use step::{Recompute, StepGrads, distill_loss_and_grads, loss_and_grads};
pub use validate::{EvalRecord, Validation};
