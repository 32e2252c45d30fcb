//! Starting adapters on a loaded model in memory (QLoRA, LoftQ, PiSSA, QPiSSA), one linear
//! layer at a time. The streaming, resumable whole-checkpoint job is `loftq init`.

use loftq_core::init::{Base, LoraInit, init_lora};

use super::{BaseWeight, Llama, LoraAdapter, PackedWeight, QLinear};
use crate::{ModelError, Result};

/// What [`Llama::init_adapters`] did to one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerInit {
    /// Module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// `‖W − base − s·B·A‖ / ‖W‖` at the start.
    pub rel_err: f32,
}

impl Llama {
    /// Replaces the base of every decoder linear layer accepted by `target` (given its
    /// module path) with the start `method` computes, and attaches the adapter (rank `rank`,
    /// scaling `scale`; LoftQ uses its own config's scaling).
    ///
    /// # Errors
    /// [`ModelError::Loftq`] naming the layer (rank too large, NaN/Inf weights, ...).
    pub fn init_adapters(
        &mut self,
        method: &LoraInit,
        rank: usize,
        scale: f32,
        target: impl Fn(&str) -> bool,
    ) -> Result<Vec<LayerInit>> {
        let scale = match method {
            LoraInit::Loftq(cfg) => cfg.lora_scale(),
            _ => scale,
        };
        let device = self.embed_tokens.device();
        let mut report = Vec::new();
        for (path, lin) in self.decoder_linears_mut() {
            if !target(&path) {
                continue;
            }
            let rel_err = init_one(lin, method, rank, scale, &device).map_err(|source| {
                ModelError::Loftq {
                    name: path.clone(),
                    source,
                }
            })?;
            report.push(LayerInit { path, rel_err });
        }
        Ok(report)
    }
}

fn init_one(
    lin: &mut QLinear,
    method: &LoraInit,
    rank: usize,
    scale: f32,
    device: &burn::tensor::Device,
) -> Result<f32, loftq_core::LoftqError> {
    let w = lin.base.dense();
    let start = init_lora(&w, method, rank, scale)?;
    lin.base = match start.base {
        Base::Dense(t) => BaseWeight::Dense(t),
        Base::Quantized { packed, .. } => BaseWeight::Packed(PackedWeight::new(packed, device)?),
    };
    lin.lora = Some(LoraAdapter::new(
        start.lora_a,
        start.lora_b,
        f64::from(scale),
        0.0,
    ));
    lin.adapter_enabled = true;
    Ok(start.rel_err)
}
