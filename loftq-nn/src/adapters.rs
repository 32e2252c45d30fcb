//! Starting adapters on a loaded model in memory (QLoRA, LoftQ, PiSSA, QPiSSA), one linear
//! layer at a time. The streaming, resumable whole-checkpoint job is `loftq init`.

use burn::tensor::{Tensor, TensorData};
use loftq_core::init::{Base, LoraInit, init_lora};
use loftq_core::lowrank::Gaussian;

use super::{BaseWeight, DecoderLayer, Llama, LoraAdapter, PackedWeight, QLinear};
use loftq_formats::config::linear_path;
use loftq_formats::{ModelError, Result};

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
            LoraInit::Loftq(cfg) => cfg.lora.scale(),
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

    /// Attaches a fresh adapter (PEFT's default: `A` uniform in `±1/√in`, `B = 0`) to every
    /// decoder linear layer accepted by `target`, leaving the bases as they are: plain LoRA on
    /// a dense model, QLoRA on a quantized one. Returns how many layers got one.
    pub fn add_lora(
        &mut self,
        rank: usize,
        scaling: f64,
        dropout: f64,
        seed: u64,
        target: impl Fn(&str) -> bool,
    ) -> usize {
        let lora = FreshLora {
            rank,
            scaling,
            dropout,
            seed,
        };
        let mut n = 0;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            n += layer.add_lora(i, &lora, &target);
        }
        n
    }
}

/// A fresh adapter's settings (see [`Llama::add_lora`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FreshLora {
    /// Rank.
    pub rank: usize,
    /// `alpha / r` (or `alpha / √r`).
    pub scaling: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
    /// Seed; each layer's `A` is drawn from it and the module path, so a layer gets the same
    /// start whether the model is built whole or one layer at a time.
    pub seed: u64,
}

impl DecoderLayer {
    /// [`Llama::add_lora`] for decoder layer `index` alone.
    pub fn add_lora(
        &mut self,
        index: usize,
        lora: &FreshLora,
        target: impl Fn(&str) -> bool,
    ) -> usize {
        let device = self.input_layernorm.weight.device();
        let mut n = 0;
        let paths = self.linear_paths();
        for (name, lin) in paths.iter().zip(self.linears_mut()) {
            let path = linear_path(index, name);
            if target(&path) {
                lora.attach(lin, &path, &device);
                n += 1;
            }
        }
        n
    }
}

impl FreshLora {
    /// Attaches this fresh adapter to `lin`, the layer at module path `path`.
    pub fn attach(&self, lin: &mut QLinear, path: &str, device: &burn::tensor::Device) {
        let [out, inp] = lin.shape();
        let bound = 1.0 / (inp as f64).sqrt();
        let mut g = Gaussian::new(tensor_seed(self.seed, path));
        let a: Vec<f32> = (0..self.rank * inp)
            .map(|_| ((2.0 * g.uniform() - 1.0) * bound) as f32)
            .collect();
        let a = Tensor::from_data(TensorData::new(a, [self.rank, inp]), device);
        let b = Tensor::zeros([out, self.rank], device);
        lin.lora = Some(LoraAdapter::new(a, b, self.scaling, self.dropout));
        lin.adapter_enabled = true;
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

/// FNV-1a of the seed and a name: each tensor's random stream, independent of order.
pub fn tensor_seed(seed: u64, name: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
