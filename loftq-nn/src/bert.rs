//! BERT-family encoders (BERT, MiniLM) with a sequence-classification head, with Hugging Face
//! module names (`bert.encoder.layer.N.attention.self.query`, ...), so that checkpoints and
//! PEFT adapters map by name. Post-norm layers, learned positions, bidirectional attention over
//! the unpadded positions.

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use loftq_core::lowrank::Gaussian;

use super::attention::softmax_attention;
use super::load::{Builder, check_adapter_used};
use super::mlp::activate;
use super::{BaseWeight, FreshLora, LoadOptions, Norm, QLinear, tensor_seed};
use loftq_formats::config::{Activation, ENCODER_LINEAR_PATHS, EncoderConfig};
use loftq_formats::io::open_source;
use loftq_formats::{ModelError, Result};

/// `encoder.layer.N`: self-attention and a GELU MLP, each followed by a residual LayerNorm.
#[derive(Module, Debug)]
pub struct EncoderLayer {
    /// `attention.self.{query, key, value}`, `[hidden, hidden]` each, in that order.
    pub qkv: Vec<QLinear>,
    /// `attention.output.dense`.
    pub attention_output: QLinear,
    /// `attention.output.LayerNorm`.
    pub attention_norm: Norm,
    /// `intermediate.dense` `[intermediate, hidden]`.
    pub intermediate: QLinear,
    /// `output.dense` `[hidden, intermediate]`.
    pub output: QLinear,
    /// `output.LayerNorm`.
    pub output_norm: Norm,
    /// Attention heads.
    pub heads: usize,
}

/// `BertForSequenceClassification` (or a bare `BertModel`: no classifier).
#[derive(Module, Debug)]
pub struct Bert {
    /// `embeddings.word_embeddings` `[vocab, hidden]` (frozen).
    pub word_embeddings: Tensor<2>,
    /// `embeddings.position_embeddings` `[positions, hidden]` (frozen).
    pub position_embeddings: Tensor<2>,
    /// `embeddings.token_type_embeddings` `[types, hidden]` (frozen).
    pub token_type_embeddings: Tensor<2>,
    /// `embeddings.LayerNorm`.
    pub embeddings_norm: Norm,
    /// `encoder.layer`.
    pub layers: Vec<EncoderLayer>,
    /// `pooler.dense`, if the checkpoint has one.
    pub pooler: Option<QLinear>,
    /// `classifier` `[labels, hidden]`, if the checkpoint has one.
    pub classifier: Option<QLinear>,
    /// The architecture.
    #[module(skip)]
    pub config: EncoderConfig,
    /// What the checkpoint puts before `embeddings.`, `encoder.` and `pooler.`: `bert.` for a
    /// classifier, nothing for a bare encoder.
    #[module(skip)]
    pub prefix: String,
}

impl EncoderLayer {
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`; `pad` `[batch, seq]` is true at the
    /// positions no one attends to.
    pub fn forward(
        &self,
        x: Tensor<3>,
        pad: Option<&Tensor<2, Bool>>,
        act: Activation,
    ) -> Tensor<3> {
        let [q, k, v] = [0, 1, 2].map(|i| self.qkv[i].forward(x.clone()));
        let att = attend([q, k, v], self.heads, pad);
        let h = self
            .attention_norm
            .forward(self.attention_output.forward(att) + x);
        let inner = activate(act, self.intermediate.forward(h.clone()));
        self.output_norm.forward(self.output.forward(inner) + h)
    }

    /// The linear layers, in [`ENCODER_LINEAR_PATHS`] order.
    pub fn linears(&self) -> Vec<&QLinear> {
        let tail = [&self.attention_output, &self.intermediate, &self.output];
        self.qkv.iter().chain(tail).collect()
    }
}

/// Bidirectional attention of `q`, `k`, `v` `[b, s, heads·d]`, padded keys hidden.
fn attend([q, k, v]: [Tensor<3>; 3], heads: usize, pad: Option<&Tensor<2, Bool>>) -> Tensor<3> {
    let [b, s, width] = q.dims();
    let d = width / heads;
    let split = |t: Tensor<3>| t.reshape([b, s, heads, d]).swap_dims(1, 2);
    let hidden = pad.map(|p| p.clone().reshape([b, 1, 1, s]).expand([b, heads, s, s]));
    softmax_attention(split(q), split(k), split(v), hidden)
}

impl Bert {
    /// The last hidden states `[batch, seq, hidden]` of token ids and segment types
    /// `[batch, seq]`, with HF's `attention_mask` (1: a token, 0: padding) if any.
    pub fn hidden_states(
        &self,
        ids: Tensor<2, Int>,
        types: Tensor<2, Int>,
        mask: Option<Tensor<2, Int>>,
    ) -> Tensor<3> {
        let [b, s] = ids.dims();
        let h = self.config.hidden_size;
        let rows = |table: &Tensor<2>, ids: Tensor<2, Int>| {
            table
                .clone()
                .select(0, ids.reshape([b * s]))
                .reshape([b, s, h])
        };
        let positions = self.position_embeddings.clone().narrow(0, 0, s).unsqueeze();
        let x = rows(&self.word_embeddings, ids) + rows(&self.token_type_embeddings, types);
        let mut x = self.embeddings_norm.forward(x + positions);
        let pad = mask.map(|m| m.equal_elem(0));
        for layer in &self.layers {
            x = layer.forward(x, pad.as_ref(), self.config.hidden_act);
        }
        x
    }

    /// The pooled output `[batch, hidden]`: `tanh(pooler(h[:, 0]))`, the first token's state.
    ///
    /// # Panics
    /// If the checkpoint has no pooler.
    pub fn pool(&self, h: Tensor<3>) -> Tensor<2> {
        let [b, _, hidden] = h.dims();
        let first = h.narrow(1, 0, 1).reshape([b, hidden]);
        let pooler = self.pooler.as_ref().expect("a pooler");
        pooler
            .forward(first.unsqueeze::<3>())
            .reshape([b, hidden])
            .tanh()
    }

    /// The classifier's logits `[batch, labels]` for the inputs of
    /// [`hidden_states`](Self::hidden_states).
    ///
    /// # Panics
    /// If the checkpoint has no pooler or no classifier.
    pub fn forward(
        &self,
        ids: Tensor<2, Int>,
        types: Tensor<2, Int>,
        mask: Option<Tensor<2, Int>>,
    ) -> Tensor<2> {
        let pooled = self.pool(self.hidden_states(ids, types, mask));
        let [b, hidden] = pooled.dims();
        let classifier = self.classifier.as_ref().expect("a classifier");
        let labels = self.config.num_labels;
        classifier
            .forward(pooled.reshape([b, 1, hidden]))
            .reshape([b, labels])
    }

    /// What a classification fine-tuning trains, in a fixed order: every LoRA factor `[A, B]`
    /// of [`Self::linears`], then the classifier's weight `[labels, hidden]` and bias (as
    /// `[1, labels]`), trained in full.
    ///
    /// # Panics
    /// If the classifier has no dense weight or no bias.
    pub fn trainable(&self) -> Vec<Tensor<2>> {
        let mut v: Vec<Tensor<2>> = (self.linears().into_iter())
            .filter_map(|(_, l)| l.lora.as_ref())
            .flat_map(|l| [l.a.val(), l.b.val()])
            .collect();
        let head = self.classifier.as_ref().expect("a classifier");
        let BaseWeight::Dense(w) = &head.base else {
            panic!("the classifier is dense")
        };
        let bias = head.bias.clone().expect("a classifier bias");
        v.push(w.clone());
        v.push(bias.unsqueeze());
        v
    }

    /// Replaces what [`Self::trainable`] gives, in its order.
    ///
    /// # Panics
    /// If `params` does not hold one tensor of the same shape for each.
    pub fn set_trainable(&mut self, params: Vec<Tensor<2>>) {
        let mut it = params.into_iter();
        let mut next = |dims: [usize; 2]| {
            let t = it.next().expect("one tensor per trainable parameter");
            assert_eq!(t.dims(), dims, "a trainable parameter changed shape");
            t
        };
        let mut set_lora = |lin: &mut QLinear| {
            if let Some(lora) = &mut lin.lora {
                for p in [&mut lora.a, &mut lora.b] {
                    *p = Param::initialized(p.id, next(p.dims()));
                }
            }
        };
        for (_, lin) in self.encoder_linears_mut() {
            set_lora(lin);
        }
        if let Some(head) = self.classifier.as_mut() {
            set_lora(head);
        }
        let head = self.classifier.as_mut().expect("a classifier");
        let labels = head.shape()[0];
        let w = next(head.shape());
        head.base = BaseWeight::Dense(w);
        head.bias = Some(next([1, labels]).reshape([labels]));
    }

    /// Puts a fresh classifier for `labels` classes on the pooled output, replacing any:
    /// weights normal with standard deviation 0.02 (transformers' initialization) drawn from
    /// `seed`, bias 0.
    pub fn new_classifier(&mut self, labels: usize, seed: u64) {
        let h = self.config.hidden_size;
        let device = self.word_embeddings.device();
        let mut g = Gaussian::new(tensor_seed(seed, "classifier"));
        let w: Vec<f32> = (0..labels * h)
            .map(|_| (0.02 * g.normal()) as f32)
            .collect();
        let w = Tensor::from_data(TensorData::new(w, [labels, h]), &device);
        let bias = Tensor::zeros([labels], &device);
        self.classifier = Some(QLinear::new(BaseWeight::Dense(w)).with_bias(Some(bias)));
        self.config.num_labels = labels;
    }

    /// Attaches a fresh adapter to every linear layer of the encoder and the pooler that
    /// `target` accepts (given its module path); the classifier is trained in full instead.
    /// Returns how many layers got one.
    pub fn add_lora(&mut self, lora: &FreshLora, target: impl Fn(&str) -> bool) -> usize {
        let device = self.word_embeddings.device();
        let mut n = 0;
        for (path, lin) in self.encoder_linears_mut() {
            if target(&path) {
                lora.attach(lin, &path, &device);
                n += 1;
            }
        }
        n
    }

    /// The encoder's linear layers and the pooler, mutably, with their module paths, in
    /// [`Self::linears`] order.
    fn encoder_linears_mut(&mut self) -> Vec<(String, &mut QLinear)> {
        let p = self.prefix.clone();
        let mut v = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let tail = [&mut l.attention_output, &mut l.intermediate, &mut l.output];
            for (name, lin) in ENCODER_LINEAR_PATHS
                .iter()
                .zip(l.qkv.iter_mut().chain(tail))
            {
                v.push((format!("{p}encoder.layer.{i}.{name}"), lin));
            }
        }
        v.extend(
            self.pooler
                .as_mut()
                .map(|l| (format!("{p}pooler.dense"), l)),
        );
        v
    }

    /// Every linear layer with its module path, the pooler and classifier last.
    pub fn linears(&self) -> Vec<(String, &QLinear)> {
        let p = &self.prefix;
        let mut v = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (name, lin) in ENCODER_LINEAR_PATHS.iter().zip(l.linears()) {
                v.push((format!("{p}encoder.layer.{i}.{name}"), lin));
            }
        }
        v.extend(self.pooler.iter().map(|l| (format!("{p}pooler.dense"), l)));
        v.extend(
            self.classifier
                .iter()
                .map(|l| ("classifier".to_string(), l)),
        );
        v
    }
}

/// Loads a BERT-family checkpoint directory (`config.json` + safetensors), quantized and
/// adapted as `opts` says; its encoder layers and pooler are quantizable, the classifier is not.
///
/// # Errors
/// As [`EncoderConfig::from_file`] and [`open_source`]; a tensor missing or misshapen; an
/// adapter module the model does not have.
pub fn load_bert(dir: &Path, device: &Device, opts: &LoadOptions) -> Result<Bert> {
    let mut config = EncoderConfig::from_file(&dir.join("config.json"))?;
    // A head the adapter saves whole (a fine-tuned classifier) sets the number of labels.
    let saved_head = opts.adapter.and_then(|a| a.saved.get("classifier.weight"));
    if let Some(t) = saved_head {
        match t.shape[..] {
            [labels, _] if labels > 0 => config.num_labels = labels,
            _ => {
                return Err(ModelError::Mismatch(format!(
                    "the adapter saves `classifier.weight` as {:?}, not [labels, hidden]",
                    t.shape
                )));
            }
        }
    }
    let source = open_source(dir)?;
    let names = source.tensor_names();
    let has = |n: &str| names.iter().any(|x| x == n);
    let prefix = match has("bert.embeddings.word_embeddings.weight") {
        true => "bert.",
        false => "",
    };
    let mut b = Builder::new(source.as_ref(), device, opts);
    let c = &config;
    let (h, eps) = (c.hidden_size, c.layer_norm_eps);
    let e = format!("{prefix}embeddings");
    let word_embeddings = b.dense(&format!("{e}.word_embeddings.weight"), &[c.vocab_size, h])?;
    let position_embeddings = b.dense(
        &format!("{e}.position_embeddings.weight"),
        &[c.max_position_embeddings, h],
    )?;
    let token_type_embeddings = b.dense(
        &format!("{e}.token_type_embeddings.weight"),
        &[c.type_vocab_size, h],
    )?;
    let embeddings_norm = b.layer_norm(&format!("{e}.LayerNorm"), h, eps)?;
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let p = format!("{prefix}encoder.layer.{i}");
        let mut lin = Vec::with_capacity(ENCODER_LINEAR_PATHS.len());
        for path in ENCODER_LINEAR_PATHS {
            let name = format!("{p}.{path}");
            let shape = (c.linear_shape(&format!("{name}.weight")))
                .expect("every encoder linear path has a shape");
            lin.push(b.linear(&name, shape, true, true)?);
        }
        let [q, k, v, attention_output, intermediate, output] =
            <[QLinear; 6]>::try_from(lin).expect("six linear layers");
        layers.push(EncoderLayer {
            qkv: vec![q, k, v],
            attention_output,
            attention_norm: b.layer_norm(&format!("{p}.attention.output.LayerNorm"), h, eps)?,
            intermediate,
            output,
            output_norm: b.layer_norm(&format!("{p}.output.LayerNorm"), h, eps)?,
            heads: c.num_attention_heads,
        });
    }
    let pooler = match has(&format!("{prefix}pooler.dense.weight")) {
        true => Some(b.linear(&format!("{prefix}pooler.dense"), [h, h], true, true)?),
        false => None,
    };
    let classifier = match has("classifier.weight") || saved_head.is_some() {
        true => Some(b.linear("classifier", [c.num_labels, h], true, false)?),
        false => None,
    };
    let used = |k: &str| b.used.contains(k);
    check_adapter_used(opts, used, used)?;
    Ok(Bert {
        word_embeddings,
        position_embeddings,
        token_type_embeddings,
        embeddings_norm,
        layers,
        pooler,
        classifier,
        config,
        prefix: prefix.to_string(),
    })
}
