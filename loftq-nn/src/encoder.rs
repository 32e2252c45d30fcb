//! Encoders with a sequence-classification head: BERT-family (BERT, MiniLM) and DeBERTa-v2/v3,
//! with Hugging Face module names (`bert.encoder.layer.N.attention.self.query`,
//! `deberta.encoder.layer.N.attention.self.query_proj`, ...), so that checkpoints and PEFT
//! adapters map by name. Post-norm layers and bidirectional attention over the unpadded
//! positions; learned absolute positions (BERT) or disentangled relative attention (DeBERTa,
//! [`super::deberta`]).

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use loftq_core::lowrank::Gaussian;

use super::attention::biased_attention;
use super::deberta::{RelativeEmbeddings, RelativeInputs, disentangled_bias, scale};
use super::load::{Builder, check_adapter_used};
use super::mlp::activate;
use super::{BaseWeight, FreshLora, LoadOptions, Norm, QLinear, tensor_seed};
use loftq_formats::config::{Activation, EncoderConfig, EncoderKind};
use loftq_formats::io::open_source;
use loftq_formats::{ModelError, Result};

/// `encoder.layer.N`: self-attention and a GELU MLP, each followed by a residual LayerNorm.
#[derive(Module, Debug)]
pub struct EncoderLayer {
    /// `attention.self.{query, key, value}` (DeBERTa: `{query,key,value}_proj`),
    /// `[hidden, hidden]` each, in that order.
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

/// `BertForSequenceClassification` or `DebertaV2ForSequenceClassification` (or a bare
/// `BertModel`, `DebertaV2Model`: no classifier).
#[derive(Module, Debug)]
pub struct Encoder {
    /// `embeddings.word_embeddings` `[vocab, hidden]` (frozen).
    pub word_embeddings: Tensor<2>,
    /// `embeddings.position_embeddings` `[positions, hidden]` (frozen), when absolute
    /// positions are added to the input.
    pub position_embeddings: Option<Tensor<2>>,
    /// `embeddings.token_type_embeddings` `[types, hidden]` (frozen), unless there are no
    /// types (DeBERTa-v3).
    pub token_type_embeddings: Option<Tensor<2>>,
    /// `embeddings.LayerNorm`.
    pub embeddings_norm: Norm,
    /// `encoder.layer`.
    pub layers: Vec<EncoderLayer>,
    /// DeBERTa's `encoder.rel_embeddings` (frozen) and its LayerNorm.
    pub relative: Option<RelativeEmbeddings>,
    /// `pooler.dense`, if the checkpoint has one.
    pub pooler: Option<QLinear>,
    /// `classifier` `[labels, hidden]`, if the checkpoint has one.
    pub classifier: Option<QLinear>,
    /// The architecture.
    #[module(skip)]
    pub config: EncoderConfig,
    /// What the checkpoint puts before `embeddings.` and `encoder.`: `bert.` or `deberta.` for
    /// a classifier, nothing for a bare encoder.
    #[module(skip)]
    pub prefix: String,
}

impl EncoderLayer {
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`; `pad` `[batch, seq]` is true at the
    /// positions no one attends to.
    /// With DeBERTa's relative attention, `rel` and `scale` are its inputs and score scale
    /// (`√d` without).
    pub fn forward(
        &self,
        x: Tensor<3>,
        pad: Option<&Tensor<2, Bool>>,
        act: Activation,
        rel: Option<&RelativeInputs>,
        scale: f64,
    ) -> Tensor<3> {
        let [b, s, width] = x.dims();
        let d = width / self.heads;
        let split = |t: Tensor<3>| t.reshape([b, s, self.heads, d]).swap_dims(1, 2);
        let [q, k, v] = [0, 1, 2].map(|i| split(self.qkv[i].forward(x.clone())));
        let bias =
            rel.and_then(|r| disentangled_bias(&q, &k, &self.qkv[0], &self.qkv[1], r, scale));
        let hidden = pad.map(|p| {
            p.clone()
                .reshape([b, 1, 1, s])
                .expand([b, self.heads, s, s])
        });
        let att = biased_attention(q, k, v, scale, bias, hidden);
        let h = self
            .attention_norm
            .forward(self.attention_output.forward(att) + x);
        let inner = activate(act, self.intermediate.forward(h.clone()));
        self.output_norm.forward(self.output.forward(inner) + h)
    }

    /// The linear layers, in [`EncoderKind::linear_paths`] order.
    pub fn linears(&self) -> Vec<&QLinear> {
        let tail = [&self.attention_output, &self.intermediate, &self.output];
        self.qkv.iter().chain(tail).collect()
    }

    /// [`Self::linears`], mutably.
    fn linears_mut(&mut self) -> Vec<&mut QLinear> {
        let tail = [
            &mut self.attention_output,
            &mut self.intermediate,
            &mut self.output,
        ];
        self.qkv.iter_mut().chain(tail).collect()
    }
}

impl Encoder {
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
        let mut x = rows(&self.word_embeddings, ids);
        if let Some(t) = &self.token_type_embeddings {
            x = x + rows(t, types);
        }
        if let Some(p) = &self.position_embeddings {
            x = x + p.clone().narrow(0, 0, s).unsqueeze();
        }
        // DeBERTa also zeroes the padded positions here; no unpadded position attends to
        // them, so nothing else changes.
        let mut x = self.embeddings_norm.forward(x);
        let pad = mask.map(|m| m.equal_elem(0));
        let c = &self.config;
        let rel = c.relative.as_ref();
        let inputs = (self.relative.as_ref())
            .zip(rel)
            .map(|(t, r)| t.inputs(r, s));
        let scale = scale(c.hidden_size / c.num_attention_heads, rel);
        for layer in &self.layers {
            x = layer.forward(x, pad.as_ref(), c.hidden_act, inputs.as_ref(), scale);
        }
        x
    }

    /// The pooled output `[batch, hidden]`: `act(pooler(h[:, 0]))`, the first token's state
    /// (tanh for BERT, `pooler_hidden_act` for DeBERTa).
    ///
    /// # Panics
    /// If the checkpoint has no pooler.
    pub fn pool(&self, h: Tensor<3>) -> Tensor<2> {
        let [b, _, hidden] = h.dims();
        let first = h.narrow(1, 0, 1).reshape([b, 1, hidden]);
        let pooler = self.pooler.as_ref().expect("a pooler");
        activate(self.config.pooler_act, pooler.forward(first)).reshape([b, hidden])
    }

    /// The pooler's module path: `[bert.]pooler.dense`, or DeBERTa's `pooler.dense` beside
    /// the encoder.
    pub fn pooler_path(&self) -> String {
        pooler_path(self.config.kind, &self.prefix)
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

    /// The module paths of the encoder's linear layers and the pooler, in [`Self::linears`]
    /// order.
    fn encoder_paths(&self) -> Vec<String> {
        let p = &self.prefix;
        let paths = self.config.kind.linear_paths();
        let mut v: Vec<String> = (0..self.layers.len())
            .flat_map(|i| {
                paths
                    .iter()
                    .map(move |name| format!("{p}encoder.layer.{i}.{name}"))
            })
            .collect();
        v.extend(self.pooler.as_ref().map(|_| self.pooler_path()));
        v
    }

    /// The encoder's linear layers and the pooler, mutably, with their module paths, in
    /// [`Self::linears`] order.
    fn encoder_linears_mut(&mut self) -> Vec<(String, &mut QLinear)> {
        let paths = self.encoder_paths();
        let layers = self.layers.iter_mut().flat_map(EncoderLayer::linears_mut);
        paths
            .into_iter()
            .zip(layers.chain(self.pooler.as_mut()))
            .collect()
    }

    /// Every linear layer with its module path, the pooler and classifier last.
    pub fn linears(&self) -> Vec<(String, &QLinear)> {
        let layers = self.layers.iter().flat_map(EncoderLayer::linears);
        let mut v: Vec<_> = (self.encoder_paths().into_iter())
            .zip(layers.chain(self.pooler.as_ref()))
            .collect();
        v.extend(
            self.classifier
                .iter()
                .map(|l| ("classifier".to_string(), l)),
        );
        v
    }
}

fn pooler_path(kind: EncoderKind, prefix: &str) -> String {
    match kind {
        EncoderKind::Bert => format!("{prefix}pooler.dense"),
        EncoderKind::DebertaV2 => "pooler.dense".into(),
    }
}

/// Loads an encoder checkpoint directory (`config.json` + safetensors: BERT-family or
/// DeBERTa-v2), quantized and adapted as `opts` says; its encoder layers and pooler are
/// quantizable, the classifier is not.
///
/// # Errors
/// As [`EncoderConfig::from_file`] and [`open_source`]; a tensor missing or misshapen; an
/// adapter module the model does not have.
pub fn load_encoder(dir: &Path, device: &Device, opts: &LoadOptions) -> Result<Encoder> {
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
    let kind = config.kind;
    let prefix = match has(&format!(
        "{}embeddings.word_embeddings.weight",
        kind.prefix()
    )) {
        true => kind.prefix(),
        false => "",
    };
    let mut b = Builder::new(source.as_ref(), device, opts);
    let c = &config;
    let (h, eps) = (c.hidden_size, c.layer_norm_eps);
    let e = format!("{prefix}embeddings");
    let word_embeddings = b.dense(&format!("{e}.word_embeddings.weight"), &[c.vocab_size, h])?;
    let position_embeddings = match c.absolute_positions {
        true => Some(b.dense(
            &format!("{e}.position_embeddings.weight"),
            &[c.max_position_embeddings, h],
        )?),
        false => None,
    };
    let token_type_embeddings = match c.type_vocab_size {
        0 => None,
        types => Some(b.dense(&format!("{e}.token_type_embeddings.weight"), &[types, h])?),
    };
    let embeddings_norm = b.layer_norm(&format!("{e}.LayerNorm"), h, eps)?;
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let p = format!("{prefix}encoder.layer.{i}");
        let mut lin = Vec::with_capacity(6);
        for path in kind.linear_paths() {
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
    let relative = match &c.relative {
        Some(r) => Some(RelativeEmbeddings {
            table: b.dense(
                &format!("{prefix}encoder.rel_embeddings.weight"),
                &[2 * r.span(), h],
            )?,
            norm: match r.norm {
                true => Some(b.layer_norm(&format!("{prefix}encoder.LayerNorm"), h, eps)?),
                false => None,
            },
        }),
        None => None,
    };
    let pooler_path = pooler_path(kind, prefix);
    let pooler = match has(&format!("{pooler_path}.weight")) {
        true => Some(b.linear(&pooler_path, [h, h], true, true)?),
        false => None,
    };
    let classifier = match has("classifier.weight") || saved_head.is_some() {
        true => Some(b.linear("classifier", [c.num_labels, h], true, false)?),
        false => None,
    };
    let used = |k: &str| b.used.contains(k);
    check_adapter_used(opts, used, used)?;
    Ok(Encoder {
        word_embeddings,
        position_embeddings,
        token_type_embeddings,
        embeddings_norm,
        layers,
        relative,
        pooler,
        classifier,
        config,
        prefix: prefix.to_string(),
    })
}
