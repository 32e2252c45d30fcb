//! What a training run reads and where it writes, shared by every kind of run.

use std::path::Path;

use super::validate::Validation;
use crate::io::AdapterConfig;

/// The inputs and output of a training run whose settings are `C` ([`super::TrainConfig`] for
/// [`super::train`], [`super::BlockwiseConfig`] for [`super::distill_blockwise`]).
pub struct TrainJob<'a, C> {
    /// The PEFT configuration written with every checkpoint and with the final adapter.
    pub template: &'a AdapterConfig,
    /// The training tokens, one stream.
    pub stream: &'a [u32],
    /// Held-out text scored during the run, if any.
    pub val: Option<&'a Validation>,
    /// The run's settings.
    pub cfg: &'a C,
    /// The output directory.
    pub out: &'a Path,
}

impl<'a, C> TrainJob<'a, C> {
    /// A run of `cfg` on `stream` into `out`, with no validation.
    pub fn new(template: &'a AdapterConfig, stream: &'a [u32], cfg: &'a C, out: &'a Path) -> Self {
        Self {
            template,
            stream,
            val: None,
            cfg,
            out,
        }
    }

    /// The same run, scoring `val` as it goes.
    pub fn validated(self, val: Option<&'a Validation>) -> Self {
        Self { val, ..self }
    }
}

// Not derived: a derive would ask `C: Clone`, but only references are copied.
impl<C> Clone for TrainJob<'_, C> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<C> Copy for TrainJob<'_, C> {}
