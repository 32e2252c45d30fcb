//! Building a [`Llama`] from a checkpoint: dense or packed bases, optional quantization on
//! load, optional PEFT adapter.

use std::collections::BTreeSet;
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use loftq_core::device::exceeds_buffer;
use loftq_core::quant::PackedTensor;
use loftq_core::{QuantConfig, Quantizer};

use super::{
    Attention, BaseWeight, DecoderLayer, Llama, LoraAdapter, Mlp, Norm, NormKind, PackedWeight,
    QLinear,
};
use loftq_formats::config::{LlamaConfig, decoder_linear_paths};
use loftq_formats::io::{Adapter, HostTensor, TensorSource, is_gguf, open_source};
use loftq_formats::{ModelError, Result};

/// The linear layers of a decoder block, as PEFT's `target_modules` names them.
pub const LINEAR_NAMES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// How to build the model.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions<'a> {
    /// Quantize every dense decoder linear weight with this configuration and hold it packed
    /// (weights already packed in the checkpoint are used as they are).
    pub quantize: Option<QuantConfig>,
    /// The adapter to attach; every module it names must exist in the model.
    pub adapter: Option<&'a Adapter>,
}

/// Builds the model described by `config` from `source` on `device`.
///
/// # Errors
/// [`ModelError`] naming the file and tensor when a tensor is missing, has the wrong shape,
/// or an adapter module does not match a linear layer of the model.
pub fn load_model(
    config: &LlamaConfig,
    source: &dyn TensorSource,
    device: &Device,
    opts: &LoadOptions,
) -> Result<Llama> {
    let mut model = load_ends(config, source, device, opts)?;
    // Not sized from the file: a config may claim more layers than it has tensors for.
    for i in 0..config.num_hidden_layers {
        model
            .layers
            .push(load_layer(config, source, i, device, opts)?);
    }
    Ok(model)
}

/// Builds the ends of the model alone: the embedding, final norm and head, with no decoder
/// layer; [`load_layer`] reads those one at a time. Every module the adapter names must be the
/// head or a decoder linear layer of `config`.
///
/// # Errors
/// As [`load_model`].
pub fn load_ends(
    config: &LlamaConfig,
    source: &dyn TensorSource,
    device: &Device,
    opts: &LoadOptions,
) -> Result<Llama> {
    let mut b = Builder::new(source, device, opts);
    let model = b.ends(config)?;
    // The layers are read later: an adapter module must be one of their linear layers, and a
    // tensor it saves whole must belong to one of those or to a layer's norm.
    let layers: BTreeSet<String> =
        decoder_linear_paths(config.family, config.num_hidden_layers).collect();
    let mut norms = vec!["input_layernorm"];
    if !config.family.parallel() {
        norms.push("post_attention_layernorm");
    }
    let layer_norms: BTreeSet<String> = (0..config.num_hidden_layers)
        .flat_map(|i| norms.iter().map(move |n| format!("model.layers.{i}.{n}")))
        .collect();
    let layer_tensor = |k: &str| {
        k.rsplit_once('.')
            .is_some_and(|(m, _)| layers.contains(m) || layer_norms.contains(m))
    };
    check_adapter_used(
        opts,
        |k| b.used.contains(k) || layers.contains(k),
        |k| b.used.contains(k) || layer_tensor(k),
    )?;
    Ok(model)
}

/// Builds decoder layer `i` alone (dense or packed bases as stored, quantized and adapted as
/// `opts` says): the layer-by-layer passes hold one layer at a time.
///
/// # Errors
/// As [`load_model`].
pub fn load_layer(
    config: &LlamaConfig,
    source: &dyn TensorSource,
    i: usize,
    device: &Device,
    opts: &LoadOptions,
) -> Result<DecoderLayer> {
    let mut b = Builder::new(source, device, opts);
    b.layer(config, i)
}

/// An adapter module that `module` does not accept, or a tensor it saves whole that `tensor`
/// does not, is an error.
pub(crate) fn check_adapter_used(
    opts: &LoadOptions,
    module: impl Fn(&str) -> bool,
    tensor: impl Fn(&str) -> bool,
) -> Result<()> {
    let Some(adapter) = opts.adapter else {
        return Ok(());
    };
    if let Some(extra) = adapter.modules.keys().find(|k| !module(k)) {
        return Err(ModelError::Mismatch(format!(
            "the adapter has factors for `{extra}`, which is not a linear layer of this model"
        )));
    }
    if let Some(extra) = adapter.saved.keys().find(|k| !tensor(k)) {
        return Err(ModelError::Mismatch(format!(
            "the adapter saves `{extra}` whole, which is not a tensor of this model"
        )));
    }
    Ok(())
}

/// Loads a pretrained model: an HF-style directory (`config.json` + safetensors, dense or
/// our packed format) or a llama.cpp `.gguf` file, and, if given, the PEFT adapter
/// directory `adapter`.
///
/// # Errors
/// As [`load_pretrained_with`] and [`Adapter::read`].
pub fn load_pretrained(path: &Path, adapter: Option<&Path>, device: &Device) -> Result<Llama> {
    let adapter = adapter.map(Adapter::read).transpose()?;
    let opts = LoadOptions {
        quantize: None,
        adapter: adapter.as_ref(),
    };
    load_pretrained_with(path, device, &opts)
}

/// Loads a pretrained model (an HF-style directory or a `.gguf` file, as
/// [`load_pretrained`]) built as `opts` says.
///
/// # Errors
/// As [`load_model`], [`LlamaConfig::from_file`] and [`open_source`].
pub fn load_pretrained_with(path: &Path, device: &Device, opts: &LoadOptions) -> Result<Llama> {
    let (config, source) = open_pretrained(path)?;
    load_model(&config, source.as_ref(), device, opts)
}

/// The architecture and tensors of a pretrained model (an HF-style directory or a `.gguf`
/// file), checked against each other, nothing loaded yet.
///
/// # Errors
/// As [`LlamaConfig::from_file`] and [`open_source`]; a config that claims more layers than
/// the checkpoint has.
pub fn open_pretrained(path: &Path) -> Result<(LlamaConfig, Box<dyn TensorSource>)> {
    // An HF directory's config.json is read before its weights: its error is the clearer
    // one for a directory that is not a model.
    let hf_config = match is_gguf(path) {
        true => None,
        false => Some(LlamaConfig::from_file(&path.join("config.json"))?),
    };
    let source = open_source(path)?;
    let config = match (hf_config, source.llama_config()) {
        (Some(c), _) => {
            // A layer count beyond the checkpoint's is the config's error, said as such.
            if let Some(name) = c.last_layer_tensor()
                && source.shape(&name).is_err()
            {
                return Err(ModelError::format(
                    &path.join("config.json"),
                    format!(
                        "num_hidden_layers is {}, but the checkpoint has no `{name}`",
                        c.num_hidden_layers
                    ),
                ));
            }
            c
        }
        (None, Some(c)) => c.clone(),
        (None, None) => unreachable!("GGUF sources carry their architecture"),
    };
    Ok((config, source))
}

/// Builds modules from a checkpoint's tensors, quantized and adapted as its options say,
/// remembering which adapter modules it used.
pub(crate) struct Builder<'a> {
    source: &'a dyn TensorSource,
    device: &'a Device,
    opts: &'a LoadOptions<'a>,
    pub(crate) used: BTreeSet<String>,
}

impl<'a> Builder<'a> {
    pub(crate) fn new(
        source: &'a dyn TensorSource,
        device: &'a Device,
        opts: &'a LoadOptions<'a>,
    ) -> Self {
        Builder {
            source,
            device,
            opts,
            used: BTreeSet::new(),
        }
    }

    /// Refuses tensor `name` of `shape` when its `f32` values (a packed weight's too, which a
    /// GPU dequantizes whole for its products) would not fit one buffer of the device: an error
    /// naming it now, where the device would fail at the first read after its upload.
    fn fits(&self, name: &str, shape: &[usize]) -> Result<()> {
        match exceeds_buffer(self.device, shape) {
            Some(why) => Err(ModelError::tensor(
                self.source.root(),
                name,
                format!(
                    "{why}; run this model on the CPU (--device cpu) or a GPU with larger buffers"
                ),
            )),
            None => Ok(()),
        }
    }

    /// The model without its decoder layers.
    fn ends(&mut self, c: &LlamaConfig) -> Result<Llama> {
        let h = c.hidden_size;
        let embed_tokens = self.dense("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(self.linear("lm_head", [c.vocab_size, h], c.family.parallel(), false)?)
        };
        let norm = self.norm(c, c.family.final_norm())?;
        Ok(Llama {
            embed_tokens,
            layers: Vec::new(),
            norm,
            lm_head,
            config: c.clone(),
        })
    }

    fn layer(&mut self, c: &LlamaConfig, i: usize) -> Result<DecoderLayer> {
        let p = format!("model.layers.{i}");
        // The family's linear layers by input group (q/k/v, o_proj, gate/up, down_proj; Phi-3
        // fuses the first and the third into one matrix each), shaped as the config says.
        let (paths, groups) = (c.family.linear_paths(), c.family.input_groups());
        let biases = [c.qkv_bias, c.o_bias, c.mlp_bias, c.mlp_bias];
        let mut by_group: [Vec<QLinear>; 4] = Default::default();
        for (path, &g) in paths.iter().zip(groups) {
            let name = format!("{p}.{path}");
            let shape = (c.linear_shape(&format!("{name}.weight")))
                .expect("every linear path of the family has a shape");
            by_group[g].push(self.linear(&name, shape, biases[g], true)?);
        }
        let [qkv, mut o, gate_up, mut down] = by_group;
        let post_attention_layernorm = match c.family.parallel() {
            true => None,
            false => Some(self.norm(c, &format!("{p}.post_attention_layernorm"))?),
        };
        Ok(DecoderLayer {
            input_layernorm: self.norm(c, &format!("{p}.input_layernorm"))?,
            self_attn: Attention {
                qkv,
                o_proj: o.pop().expect("one o_proj"),
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                window: c.window(i),
            },
            post_attention_layernorm,
            mlp: Mlp {
                gate_up,
                down_proj: down.pop().expect("one down_proj"),
                act: c.family.activation(),
            },
        })
    }

    fn upload<const D: usize>(&self, t: HostTensor) -> Tensor<D> {
        Tensor::from_data(TensorData::new(t.data, t.shape), self.device)
    }

    /// Tensor `name` of `shape`: the adapter's whole copy if it saves one (a module trained in
    /// full), the checkpoint's otherwise.
    pub(crate) fn dense<const D: usize>(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> Result<Tensor<D>> {
        self.fits(name, shape)?;
        if let Some(t) = self.saved(name) {
            if t.shape != shape {
                return Err(ModelError::Mismatch(format!(
                    "the adapter saves `{name}` as {:?}, the model has {shape:?}",
                    t.shape
                )));
            }
            self.used.insert(name.to_string());
            return Ok(self.upload(t.clone()));
        }
        let t = self.source.shaped(name, shape)?;
        // Copied out: the mapped pages need not stay resident (the 7B shapes' layer in bf16:
        // 405 MB).
        self.source.release(name);
        Ok(self.upload(t))
    }

    /// The adapter's whole copy of tensor `name`, if it saves one.
    fn saved(&self, name: &str) -> Option<&'a HostTensor> {
        self.opts.adapter?.saved.get(name)
    }

    /// The norm at `path`: an RMSNorm, or (Phi) a LayerNorm with its bias.
    fn norm(&mut self, c: &LlamaConfig, path: &str) -> Result<Norm> {
        let (h, eps) = (c.hidden_size, c.rms_norm_eps);
        match c.family.parallel() {
            true => self.layer_norm(path, h, eps),
            false => Ok(Norm::rms(self.dense(&format!("{path}.weight"), &[h])?, eps)),
        }
    }

    /// The LayerNorm at `path` (`weight` and `bias`, `[hidden]` each).
    pub(crate) fn layer_norm(&mut self, path: &str, hidden: usize, eps: f64) -> Result<Norm> {
        Ok(Norm {
            weight: self.dense(&format!("{path}.weight"), &[hidden])?,
            bias: Some(self.dense(&format!("{path}.bias"), &[hidden])?),
            eps,
            kind: NormKind::Layer,
        })
    }

    /// The linear layer at `path` (`weight` `[out, in]`, and `bias` if asked): packed as
    /// stored, or quantized when `quantizable` and the options say so; with the adapter's
    /// factors for `path` if it has them.
    pub(crate) fn linear(
        &mut self,
        path: &str,
        shape: [usize; 2],
        bias: bool,
        quantizable: bool,
    ) -> Result<QLinear> {
        let wname = format!("{path}.weight");
        self.fits(&wname, &shape)?;
        let root = self.source.root();
        // A weight the adapter saves whole is dense, whatever the checkpoint holds.
        let packed = match self.source.packed(&wname)? {
            _ if self.saved(&wname).is_some() => None,
            Some(p) => Some(p),
            None => match self.opts.quantize.filter(|_| quantizable) {
                Some(cfg) => {
                    let w = self.source.shaped(&wname, &shape)?;
                    self.source.release(&wname);
                    let quant = |e| ModelError::quant(&wname, e);
                    let q = Quantizer::new(cfg).map_err(quant)?;
                    let host = q.quantize_host(&w.data, shape).map_err(quant)?;
                    Some(PackedTensor::pack(&host, cfg))
                }
                None => None,
            },
        };
        let base = match packed {
            Some(p) => {
                if p.shape != shape {
                    return Err(ModelError::tensor(
                        root,
                        &wname,
                        format!("packed shape {:?}, expected {shape:?}", p.shape),
                    ));
                }
                let w =
                    PackedWeight::new(p, self.device).map_err(|e| ModelError::quant(&wname, e))?;
                BaseWeight::Packed(w)
            }
            None => BaseWeight::Dense(self.dense(&wname, &shape)?),
        };
        let bias = if bias {
            Some(self.dense(&format!("{path}.bias"), &[shape[0]])?)
        } else {
            None
        };
        let lora = match self
            .opts
            .adapter
            .and_then(|a| Some((a, a.modules.get(path)?)))
        {
            Some((adapter, w)) => {
                let r = w.a.shape[0];
                if w.a.shape != [r, shape[1]] || w.b.shape != [shape[0], r] {
                    return Err(ModelError::Mismatch(format!(
                        "adapter factors of `{path}` are {:?} and {:?}, the layer is {shape:?}",
                        w.a.shape, w.b.shape
                    )));
                }
                self.used.insert(path.to_string());
                let scaling = adapter.config.scaling(path, r);
                Some(LoraAdapter::new(
                    self.upload(w.a.clone()),
                    self.upload(w.b.clone()),
                    scaling,
                    adapter.config.lora_dropout,
                ))
            }
            None => None,
        };
        Ok(QLinear::new(base).with_bias(bias).with_lora(lora))
    }
}
