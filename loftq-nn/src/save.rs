//! Writing a [`Llama`] back to disk: the backbone (dense or packed) with its `config.json`,
//! and the adapter as a PEFT directory.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::tensor::Tensor;
use loftq_core::quant::host_f32;

use super::{BaseWeight, Llama, Norm, QLinear};
use loftq_formats::io::HostTensor;
use loftq_formats::io::{
    Adapter, AdapterConfig, LoraWeights, OutTensor, add_packed, write_atomic, write_safetensors,
};
use loftq_formats::{ModelError, Result};

/// How a backbone is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackboneFormat {
    /// Quantized weights as packed codes and scales (our format, lossless, 4–8× smaller than
    /// bf16); other tensors `f32`.
    Packed,
    /// Every tensor dense in `f32`, quantized weights dequantized (loads anywhere).
    F32,
    /// Every tensor dense in `bf16` (what transformers + bitsandbytes NF4 load).
    Bf16,
}

impl Llama {
    /// Writes `config.json` and `model.safetensors` into `dir` (created if needed), each file
    /// atomically. The adapters are not part of the backbone: see [`Llama::adapter`].
    ///
    /// # Errors
    /// [`ModelError::Io`] if writing fails.
    pub fn save_backbone(&self, dir: &Path, format: BackboneFormat) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let dense = |shape: Vec<usize>, v: &[f32]| match format {
            BackboneFormat::Bf16 => OutTensor::bf16(shape, v),
            _ => OutTensor::f32(shape, v),
        };
        let mut tensors = BTreeMap::new();
        let mut meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let mut put_norm = |path: String, norm: &Norm| {
            let parts = [("weight", Some(&norm.weight)), ("bias", norm.bias.as_ref())];
            for (part, t) in parts {
                if let Some(t) = t {
                    let v = host_f32(t);
                    tensors.insert(format!("{path}.{part}"), dense(vec![v.len()], &v));
                }
            }
        };
        put_norm(self.config.family.final_norm().into(), &self.norm);
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            put_norm(format!("{p}.input_layernorm"), &l.input_layernorm);
            if let Some(norm) = &l.post_attention_layernorm {
                put_norm(format!("{p}.post_attention_layernorm"), norm);
            }
        }
        let embed = &self.embed_tokens;
        tensors.insert(
            "model.embed_tokens.weight".into(),
            dense(embed.dims().to_vec(), &host_f32(embed)),
        );
        for (path, lin) in self.linears() {
            let name = format!("{path}.weight");
            match (&lin.base, format) {
                (BaseWeight::Packed(p), BackboneFormat::Packed) => {
                    add_packed(&name, p.packed(), &mut tensors, &mut meta);
                }
                (base, _) => {
                    let w = base.dense();
                    tensors.insert(name, dense(w.dims().to_vec(), &host_f32(&w)));
                }
            }
            if let Some(bias) = &lin.bias {
                let v = host_f32(bias);
                tensors.insert(format!("{path}.bias"), dense(vec![v.len()], &v));
            }
        }
        write_safetensors(&dir.join("model.safetensors"), &tensors, Some(meta))?;
        let mut config = self.config.to_hf_json();
        if format == BackboneFormat::Bf16 {
            config["torch_dtype"] = "bfloat16".into();
        }
        let json = serde_json::to_string_pretty(&config).expect("config serializes");
        write_atomic(&dir.join("config.json"), json.as_bytes())
    }

    /// The adapters of the model as a PEFT adapter, with `config` as the template
    /// (`target_modules` set to the adapted modules' names). `None` if no layer has one.
    pub fn adapter(&self, config: AdapterConfig) -> Option<Adapter> {
        adapter_of(config, self.linears())
    }
}

/// The adapters of `linears` (module path, layer) as a PEFT adapter, with `config` as the
/// template (`target_modules` set to the adapted modules' names). `None` if none has one.
pub fn adapter_of<'a>(
    config: AdapterConfig,
    linears: impl IntoIterator<Item = (String, &'a QLinear)>,
) -> Option<Adapter> {
    let modules = linears
        .into_iter()
        .filter_map(|(path, lin)| Some((path, lin.lora_weights()?)))
        .collect();
    Adapter::from_modules(config, modules)
}

impl QLinear {
    /// The adapter's factors on the host, if the layer has one.
    pub fn lora_weights(&self) -> Option<LoraWeights> {
        let lora = self.lora.as_ref()?;
        Some(LoraWeights {
            a: host_tensor(&lora.a.val()),
            b: host_tensor(&lora.b.val()),
        })
    }
}

/// A tensor's values and shape on the host, as the file writers take them.
pub fn host_tensor<const D: usize>(t: &Tensor<D>) -> HostTensor {
    HostTensor {
        shape: t.dims().to_vec(),
        data: host_f32(t),
    }
}
