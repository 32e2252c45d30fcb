//! Block-wise distillation (ApiQ): the adapters of one decoder layer at a time, fitted so that
//! the layer's output on the student's own inputs matches the teacher layer's output on the
//! teacher's inputs.
//!
//! Calibration rows are drawn once from the text and both models' hidden states on them are
//! kept (`2 × rows × seq × hidden` values). Layer `l`'s adapters are fitted with AdamW on the
//! mean squared error against the teacher's layer `l`; then both hidden states move one layer
//! up, the student's through its fitted layer, so each layer also learns to correct what the
//! layers below it left. One layer's graph is alive at a time, and no logits are computed.

use std::path::Path;
use std::time::Instant;

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::data::{Sampling, draw_batch};
use super::distill::mean_kl;
use super::optim::{AdamW, AdamWConfig, Decay, Schedule};
use super::run::{EvalRecord, Validation, write_dir_atomic};
use super::step::{lora_grads, tracked};
use crate::eval::{perplexity_windows, token_ids};
use crate::io::{AdapterConfig, write_atomic};
use crate::nn::{DecoderLayer, Llama, RopeTables};
use crate::{ModelError, Result};

/// What a block-wise run did: `blockwise.json` in its output directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockwiseReport {
    /// Each layer's fit.
    pub layers: Vec<LayerFit>,
    /// Validation before and after (perplexity and the teacher-student KL), if a validation
    /// text was given.
    pub evals: Vec<EvalRecord>,
}

/// [`fit_layers`], with validation before and after, writing the adapter (PEFT format,
/// `adapter_template` as its config) to `out/adapter` and the report to `out/blockwise.json`,
/// each atomically.
///
/// # Errors
/// Those of [`fit_layers`]; [`ModelError::Io`] when writing fails.
#[allow(clippy::too_many_arguments)]
pub fn distill_blockwise(
    student: &mut Llama,
    teacher: &Llama,
    adapter_template: &AdapterConfig,
    stream: &[u32],
    val: Option<&Validation>,
    cfg: &BlockwiseConfig,
    out: &Path,
    mut on_event: impl FnMut(BlockwiseEvent),
) -> Result<BlockwiseReport> {
    let validate = |model: &Llama, step: usize| {
        val.map(|v| {
            let p = perplexity_windows(model, &v.tokens, v.window, v.stride);
            EvalRecord {
                step,
                nll: p.nll,
                ppl: p.ppl,
                kl: mean_kl(model, teacher, &v.tokens, v.window),
            }
        })
    };
    let mut evals = Vec::new();
    if let Some(e) = validate(student, 0) {
        on_event(BlockwiseEvent::Eval(&e));
        evals.push(e);
    }
    let layers = fit_layers(student, teacher, stream, cfg, |f| {
        on_event(BlockwiseEvent::Layer(f))
    })?;
    if let Some(e) = validate(student, student.layers.len()) {
        on_event(BlockwiseEvent::Eval(&e));
        evals.push(e);
    }
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let adapter = student
        .adapter(adapter_template.clone())
        .expect("fit_layers checked the adapters");
    write_dir_atomic(&out.join("adapter"), |dir| adapter.write(dir))?;
    let report = BlockwiseReport { layers, evals };
    let json = serde_json::to_string_pretty(&report).expect("report serializes");
    write_atomic(&out.join("blockwise.json"), json.as_bytes())?;
    Ok(report)
}

/// What [`distill_blockwise`] reports as it goes.
#[derive(Clone, Copy, Debug)]
pub enum BlockwiseEvent<'a> {
    /// A layer was fitted.
    Layer(&'a LayerFit),
    /// A validation finished (step 0: before; the layer count: after).
    Eval(&'a EvalRecord),
}

/// How each layer is fitted.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockwiseConfig {
    /// Calibration rows drawn from the text.
    pub rows: usize,
    /// Tokens per row.
    pub seq: usize,
    /// Rows per optimizer step.
    pub batch: usize,
    /// Optimizer steps per layer.
    pub steps: usize,
    /// Peak learning rate (cosine decay over each layer's steps).
    pub lr: f64,
    /// AdamW.
    pub adamw: AdamWConfig,
    /// Seed of the rows.
    pub seed: u64,
}

/// One fitted layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerFit {
    /// Layer index.
    pub layer: usize,
    /// Mean squared error of the layer's output against the teacher's, before fitting.
    pub mse_before: f64,
    /// The same after fitting.
    pub mse_after: f64,
    /// Wall seconds.
    pub seconds: f64,
}

/// Fits the adapters of `student`'s decoder layers to `teacher`'s, one layer at a time, on
/// rows drawn from `stream` (see the module documentation). `on_layer` hears of each layer as
/// it is done.
///
/// # Errors
/// [`ModelError::Invalid`] if the models differ in depth or width, the student has no
/// adapters, the stream is shorter than a row, or the sizes are zero or inconsistent.
pub fn fit_layers(
    student: &mut Llama,
    teacher: &Llama,
    stream: &[u32],
    cfg: &BlockwiseConfig,
    mut on_layer: impl FnMut(&LayerFit),
) -> Result<Vec<LayerFit>> {
    let (s, t) = (&student.config, &teacher.config);
    if s.num_hidden_layers != t.num_hidden_layers || s.hidden_size != t.hidden_size {
        return Err(ModelError::Invalid(format!(
            "block-wise distillation pairs the layers: the teacher has {} layers of width {}, \
             the student {} of width {}",
            t.num_hidden_layers, t.hidden_size, s.num_hidden_layers, s.hidden_size
        )));
    }
    if student.lora_params().is_empty() {
        return Err(ModelError::Invalid(
            "the model has no LoRA adapter to train".into(),
        ));
    }
    if cfg.rows == 0 || cfg.batch == 0 || cfg.batch > cfg.rows || cfg.steps == 0 {
        return Err(ModelError::Invalid(format!(
            "block-wise distillation needs 1 ≤ batch ({}) ≤ rows ({}) and steps ≥ 1",
            cfg.batch, cfg.rows
        )));
    }
    if cfg.seq < 1 || stream.len() < cfg.seq {
        return Err(ModelError::Invalid(format!(
            "the text has {} tokens, fewer than one row of {}",
            stream.len(),
            cfg.seq
        )));
    }
    let rows = draw_batch(
        stream,
        Sampling::Random,
        cfg.rows,
        cfg.seq,
        cfg.seed,
        (0, 0, 1),
    );
    let device = student.embed_tokens.device();
    let ids = token_ids(&rows.ids, [cfg.rows, cfg.seq], &device);
    let mut xs = student.embed(ids.clone());
    let mut xt = teacher.embed(ids.to_device(&teacher.embed_tokens.device()));
    let rope = student.rope(cfg.seq);
    let teacher_rope = teacher.rope(cfg.seq);
    let schedule = Schedule {
        lr: cfg.lr,
        warmup: 0,
        decay: Decay::Cosine,
        total: cfg.steps,
    };
    let mut fits = Vec::with_capacity(student.layers.len());
    for l in 0..student.layers.len() {
        let t0 = Instant::now();
        let yt = teacher.layers[l]
            .forward(xt, &teacher_rope)
            .to_device(&device);
        let layer = &mut student.layers[l];
        let mse_before = mse(layer.forward(xs.clone(), &rope), yt.clone());
        if layer.linears().iter().any(|lin| lin.lora.is_some()) {
            fit_layer(layer, &xs, &yt, &rope, cfg, &schedule);
        }
        xs = layer.forward(xs, &rope);
        let fit = LayerFit {
            layer: l,
            mse_before,
            mse_after: mse(xs.clone(), yt.clone()),
            seconds: t0.elapsed().as_secs_f64(),
        };
        on_layer(&fit);
        fits.push(fit);
        xt = yt.to_device(&teacher.embed_tokens.device());
    }
    Ok(fits)
}

/// `cfg.steps` AdamW steps on one layer's adapters against the targets `yt`.
fn fit_layer(
    layer: &mut DecoderLayer,
    xs: &Tensor<3>,
    yt: &Tensor<3>,
    rope: &RopeTables,
    cfg: &BlockwiseConfig,
    schedule: &Schedule,
) {
    let params = layer_params(layer);
    let mut opt = AdamW::new(cfg.adamw, &params);
    for step in 0..cfg.steps {
        // Consecutive blocks of rows, wrapping around.
        let start = ((step * cfg.batch) % cfg.rows).min(cfg.rows - cfg.batch);
        let x = xs.clone().narrow(0, start, cfg.batch).autodiff();
        let y = yt.clone().narrow(0, start, cfg.batch);
        let mut fitted = layer.clone();
        for lin in fitted.linears_mut() {
            *lin = tracked(lin);
        }
        let loss = (fitted.forward(x, rope) - y).powi_scalar(2).mean();
        let grads = loss.backward();
        let device = xs.device();
        let g: Vec<Tensor<2>> = fitted
            .linears()
            .iter()
            .flat_map(|lin| lora_grads(lin, &grads, &device))
            .collect();
        let updated = opt.update(layer_params(layer), g, schedule.lr(step));
        set_layer_params(layer, updated);
    }
}

/// The mean squared difference of two hidden states.
fn mse(a: Tensor<3>, b: Tensor<3>) -> f64 {
    f64::from((a - b).powi_scalar(2).mean().into_scalar::<f32>())
}

/// `[A, B]` of each adapted linear layer of `layer`, in [`DecoderLayer::linears`] order.
fn layer_params(layer: &DecoderLayer) -> Vec<Tensor<2>> {
    layer
        .linears()
        .iter()
        .filter_map(|lin| lin.lora.as_ref())
        .flat_map(|l| [l.a.val(), l.b.val()])
        .collect()
}

fn set_layer_params(layer: &mut DecoderLayer, params: Vec<Tensor<2>>) {
    let mut it = params.into_iter();
    for lin in layer.linears_mut() {
        let Some(lora) = &mut lin.lora else { continue };
        for p in [&mut lora.a, &mut lora.b] {
            *p = burn::module::Param::initialized(p.id, it.next().expect("one per factor"));
        }
    }
}
