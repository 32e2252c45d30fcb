//! QLoRA-style fine-tuning: the quantized base stays frozen (and packed), only the LoRA
//! factors train.
//!
//! - [`data`]: tokenized text files as one stream, and the rows drawn from it.
//! - [`step`]: the loss and LoRA gradients of a batch, with layer-wise recomputation so that
//!   one layer's dense weights and activations are alive at a time.
//! - [`optim`]: AdamW, the learning-rate schedule, gradient clipping.
//! - [`run`]: the loop, validation, checkpoints and exact resume; with several devices, the
//!   micro-batches of a step are spread over one model replica per device ([`parallel`]).

pub mod data;
pub mod optim;
pub mod parallel;
mod run;
pub mod step;

pub use data::{Sampling, TokenStream};
pub use optim::{AdamW, AdamWConfig, Decay, Schedule};
pub use run::{
    EvalRecord, History, StepRecord, TrainConfig, TrainEvent, Validation, latest_checkpoint, train,
    train_on,
};
pub use step::{Batch, Recompute, StepGrads, loss_and_grads};
