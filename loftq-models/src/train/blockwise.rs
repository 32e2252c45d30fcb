//! Block-wise distillation (ApiQ): the adapters of one decoder layer at a time, fitted so that
//! the layer's output on the student's own inputs matches the teacher layer's output on the
//! teacher's inputs.
//!
//! Calibration rows are drawn once from the text and both models' hidden states on them are
//! kept (`2 × rows × seq × hidden` values). Layer `l`'s adapters are fitted with AdamW on the
//! mean squared error against the teacher's layer `l`; then both hidden states move one layer
//! up, the student's through its fitted layer, so each layer also learns to correct what the
//! layers below it left. The models are [`LayerSource`]s: read from disk one layer at a time,
//! only layer `l` of each is in memory (with the embeddings and heads), and one layer's graph
//! is alive at a time. No logits are computed but the validation's, at the end.
//!
//! After each layer the fitted factors so far and the fits are checkpointed; a resumed run
//! rebuilds the hidden states by running the fitted layers forward (no fitting), then fits the
//! rest, and ends exactly as an uninterrupted run.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::data::{Sampling, draw_batch};
use super::distill::{DistillLoss, check_teacher};
use super::job::TrainJob;
use super::optim::{AdamW, AdamWConfig, Decay, Schedule};
use super::step::{lora_grads, tracked};
use super::validate::{EvalRecord, Scores, Validation};
use crate::config::linear_path;
use crate::eval::token_ids;
use crate::io::{Adapter, AdapterConfig, LoraWeights, write_atomic, write_dir_atomic};
use crate::nn::{DecoderLayer, LayerSource, RopeTables};
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

/// The directory in a block-wise run's output that holds its progress: `adapter/` (the layers
/// fitted so far) and `state.json` (the run's settings and those layers' fits).
pub const BLOCKWISE_CHECKPOINT: &str = "blockwise-checkpoint";

/// [`fit_layers`] on `job.stream` (validating on `job.val`), writing the adapter (PEFT format,
/// `job.template` as its config) to `out/adapter` and the report to `out/blockwise.json`, each
/// atomically, and a checkpoint ([`BLOCKWISE_CHECKPOINT`]) after each layer, `out` being
/// `job.out`. With `cfg.resume`, a checkpoint in `out` is continued. Only one layer of each
/// model is read at a time; the fitted factors are kept on the host.
///
/// # Errors
/// Those of [`fit_layers`]; [`ModelError::Output`] for a checkpoint of other settings, or
/// one found without `cfg.resume`; [`ModelError::Io`] when writing fails.
pub fn distill_blockwise(
    student: &dyn LayerSource,
    teacher: &dyn LayerSource,
    job: TrainJob<'_, BlockwiseConfig>,
    mut on_event: impl FnMut(BlockwiseEvent),
) -> Result<BlockwiseReport> {
    let (cfg, out) = (job.cfg, job.out);
    let ckpt = out.join(BLOCKWISE_CHECKPOINT);
    let done = match ckpt.is_dir() {
        true if !cfg.resume => {
            return Err(ModelError::output(
                &ckpt,
                "holds the checkpoint of a block-wise run: resume it, or write elsewhere",
            ));
        }
        true => read_checkpoint(&ckpt, cfg)?,
        false => Fitted::default(),
    };
    if !done.layers.is_empty() {
        on_event(BlockwiseEvent::Resumed {
            layers: done.layers.len(),
        });
    }
    let (mut modules, mut fits) = (done.modules.clone(), done.layers.clone());
    let report = fit_layers(
        student,
        teacher,
        job.stream,
        job.val,
        cfg,
        &done,
        |fit, layer| {
            for (name, lin) in layer.linear_paths().iter().zip(layer.linears()) {
                if let Some(w) = lin.lora_weights() {
                    modules.insert(linear_path(fit.layer, name), w);
                }
            }
            fits.push(fit.clone());
            write_checkpoint(&ckpt, job.template, &modules, cfg, &fits)?;
            on_event(BlockwiseEvent::Layer(fit));
            Ok(())
        },
    )?;
    for e in &report.evals {
        on_event(BlockwiseEvent::Eval(e));
    }
    // An adapter on the head is carried as it came.
    if let Some(w) = student
        .ends()
        .lm_head
        .as_ref()
        .and_then(|h| h.lora_weights())
    {
        modules.insert("lm_head".into(), w);
    }
    let adapter = Adapter::from_modules(job.template.clone(), modules)
        .expect("fit_layers checked the adapters");
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    write_dir_atomic(&out.join("adapter"), |dir| adapter.write(dir))?;
    let json = serde_json::to_string_pretty(&report).expect("report serializes");
    write_atomic(&out.join("blockwise.json"), json.as_bytes())?;
    Ok(report)
}

/// What [`distill_blockwise`] reports as it goes. Serialized as one JSON object tagged by
/// `event` (`layer`, `eval`, `resumed`), as `loftq train --blockwise --json` prints it.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum BlockwiseEvent<'a> {
    /// The layers below `layers` were fitted by the run resumed.
    Resumed {
        /// Layers already fitted.
        layers: usize,
    },
    /// A layer was fitted.
    Layer(&'a LayerFit),
    /// A validation result, after the last layer (step 0: before fitting; the layer count:
    /// after).
    Eval(&'a EvalRecord),
}

/// How each layer is fitted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    /// Continue the checkpoint in the output directory, if there is one
    /// ([`distill_blockwise`]).
    #[serde(skip)]
    pub resume: bool,
}

/// Layers fitted already (by a run now resumed): their fits and factors by module path.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fitted {
    /// The fits of layers `0..n`.
    pub layers: Vec<LayerFit>,
    /// Their adapters' factors.
    pub modules: BTreeMap<String, LoraWeights>,
}

/// `state.json` of a checkpoint.
#[derive(Serialize, Deserialize)]
struct State {
    config: BlockwiseConfig,
    layers: Vec<LayerFit>,
}

fn write_checkpoint(
    dir: &Path,
    template: &AdapterConfig,
    modules: &BTreeMap<String, LoraWeights>,
    cfg: &BlockwiseConfig,
    fits: &[LayerFit],
) -> Result<()> {
    write_dir_atomic(dir, |tmp| {
        if let Some(a) = Adapter::from_modules(template.clone(), modules.clone()) {
            a.write(&tmp.join("adapter"))?;
        }
        let state = State {
            config: cfg.clone(),
            layers: fits.to_vec(),
        };
        let json = serde_json::to_string_pretty(&state).expect("state serializes");
        write_atomic(&tmp.join("state.json"), json.as_bytes())
    })
}

fn read_checkpoint(dir: &Path, cfg: &BlockwiseConfig) -> Result<Fitted> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let state: State =
        serde_json::from_str(&text).map_err(|e| ModelError::format(&path, e.to_string()))?;
    let same = BlockwiseConfig {
        resume: cfg.resume,
        ..state.config.clone()
    };
    if &same != cfg {
        return Err(ModelError::output(
            dir,
            format!(
                "the checkpoint of a block-wise run with other settings ({:?}, now {:?})",
                state.config, cfg
            ),
        ));
    }
    let adapter = dir.join("adapter");
    let modules = match adapter.is_dir() {
        true => Adapter::read(&adapter)?.modules,
        false => BTreeMap::new(),
    };
    Ok(Fitted {
        layers: state.layers,
        modules,
    })
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

/// One validation window as it climbs the layers: the student's hidden states through its
/// layers as they were and as fitted, and the teacher's.
struct Climb<'v> {
    ids: &'v [u32],
    window: crate::eval::Window,
    rope: RopeTables,
    teacher_rope: RopeTables,
    before: Tensor<3>,
    after: Tensor<3>,
    teacher: Tensor<3>,
}

/// Fits the adapters of `student`'s decoder layers to `teacher`'s, one layer at a time, on
/// rows drawn from `stream` (see the module documentation), and scores `val` before and after
/// in the same pass. The layers `done` holds are not fitted again: their factors are put in
/// and the hidden states run through them. `on_layer` gets each layer it fits (its adapters
/// trained) as it is done; its error stops the run.
///
/// # Errors
/// [`ModelError::Mismatch`] if the models differ in depth, width or vocabulary or `done` does
/// not fit the student; [`ModelError::Settings`] if no layer of the student has adapters or
/// the sizes are zero or inconsistent; [`ModelError::Data`] if the stream is shorter than a
/// row; a layer's read error; `on_layer`'s.
pub fn fit_layers(
    student: &dyn LayerSource,
    teacher: &dyn LayerSource,
    stream: &[u32],
    val: Option<&Validation>,
    cfg: &BlockwiseConfig,
    done: &Fitted,
    mut on_layer: impl FnMut(&LayerFit, DecoderLayer) -> Result<()>,
) -> Result<BlockwiseReport> {
    let (se, te) = (student.ends(), teacher.ends());
    let (s, t) = (&se.config, &te.config);
    if s.num_hidden_layers != t.num_hidden_layers || s.hidden_size != t.hidden_size {
        return Err(ModelError::Mismatch(format!(
            "block-wise distillation pairs the layers: the teacher has {} layers of width {}, \
             the student {} of width {}",
            t.num_hidden_layers, t.hidden_size, s.num_hidden_layers, s.hidden_size
        )));
    }
    check_teacher(se, te, DistillLoss::default())?;
    if cfg.rows == 0 || cfg.batch == 0 || cfg.batch > cfg.rows || cfg.steps == 0 {
        return Err(ModelError::Settings(format!(
            "block-wise distillation needs 1 ≤ batch ({}) ≤ rows ({}) and steps ≥ 1",
            cfg.batch, cfg.rows
        )));
    }
    if cfg.seq < 1 || stream.len() < cfg.seq {
        return Err(ModelError::Data(format!(
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
    let device = se.embed_tokens.device();
    let teacher_device = te.embed_tokens.device();
    let ids = token_ids(&rows.ids, [cfg.rows, cfg.seq], &device);
    let mut xs = se.embed(ids.clone());
    let mut xt = te.embed(ids.to_device(&teacher_device));
    let rope = se.rope(cfg.seq);
    let teacher_rope = te.rope(cfg.seq);
    let mut climbs: Vec<Climb> = val.map_or_else(Vec::new, |v| {
        v.windows()
            .into_iter()
            .map(|w| {
                let ids = &v.tokens[w.begin..w.end];
                let n = ids.len();
                let x = se.embed(token_ids(ids, [1, n], &device));
                Climb {
                    ids,
                    window: w,
                    rope: se.rope(n),
                    teacher_rope: te.rope(n),
                    before: x.clone(),
                    after: x,
                    teacher: te.embed(token_ids(ids, [1, n], &teacher_device)),
                }
            })
            .collect()
    });
    let schedule = Schedule {
        lr: cfg.lr,
        warmup: 0,
        decay: Decay::Cosine,
        total: cfg.steps,
    };
    let mut fits = Vec::with_capacity(s.num_hidden_layers);
    let mut adapted = false;
    for l in 0..s.num_hidden_layers {
        let t0 = Instant::now();
        let (layer, teacher_layer) = (student.layer(l)?, teacher.layer(l)?);
        let yt = teacher_layer.forward(xt, &teacher_rope).to_device(&device);
        let resumed = done.layers.get(l);
        let mse_before = match resumed {
            Some(fit) => fit.mse_before,
            None => mse(layer.forward(xs.clone(), &rope), yt.clone()),
        };
        let mut fitted = layer.clone();
        if fitted.linears().iter().any(|lin| lin.lora.is_some()) {
            adapted = true;
            match resumed {
                Some(_) => put_factors(&mut fitted, l, &done.modules)?,
                None => fit_layer(&mut fitted, &xs, &yt, &rope, cfg, &schedule),
            }
        }
        xs = fitted.forward(xs, &rope);
        for c in &mut climbs {
            c.before = layer.forward(c.before.clone(), &c.rope);
            c.after = fitted.forward(c.after.clone(), &c.rope);
            c.teacher = teacher_layer.forward(c.teacher.clone(), &c.teacher_rope);
        }
        match resumed {
            Some(fit) => fits.push(fit.clone()),
            None => {
                let fit = LayerFit {
                    layer: l,
                    mse_before,
                    mse_after: mse(xs.clone(), yt.clone()),
                    seconds: t0.elapsed().as_secs_f64(),
                };
                on_layer(&fit, fitted)?;
                fits.push(fit);
            }
        }
        xt = yt.to_device(&teacher_device);
    }
    if !adapted {
        return Err(ModelError::Settings(
            "the model has no LoRA adapter to train".into(),
        ));
    }
    let mut evals = Vec::new();
    if !climbs.is_empty() {
        for (step, fitted) in [(0, false), (fits.len(), true)] {
            let mut sums = Scores::default();
            for c in &climbs {
                let h = if fitted { &c.after } else { &c.before };
                let t = te.norm.forward(c.teacher.clone());
                sums.add(
                    c.ids,
                    c.window,
                    se,
                    se.norm.forward(h.clone()),
                    Some((te, t)),
                );
            }
            evals.push(sums.record(step));
        }
    }
    Ok(BlockwiseReport {
        layers: fits,
        evals,
    })
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
        let updated = opt.update(g, schedule.lr(step));
        set_layer_params(layer, updated);
    }
}

/// Puts the factors `modules` holds for layer `l` into its adapters.
fn put_factors(
    layer: &mut DecoderLayer,
    l: usize,
    modules: &BTreeMap<String, LoraWeights>,
) -> Result<()> {
    let paths = layer.linear_paths();
    for (name, lin) in paths.iter().zip(layer.linears_mut()) {
        let path = linear_path(l, name);
        let (Some(lora), Some(w)) = (&mut lin.lora, modules.get(&path)) else {
            continue;
        };
        for (p, t) in [(&mut lora.a, &w.a), (&mut lora.b, &w.b)] {
            if p.dims().as_slice() != t.shape.as_slice() {
                return Err(ModelError::Mismatch(format!(
                    "the checkpoint's factors of `{path}` are {:?}, the adapter's {:?}",
                    t.shape,
                    p.dims()
                )));
            }
            let data = TensorData::new(t.data.clone(), [t.shape[0], t.shape[1]]);
            *p = burn::module::Param::initialized(p.id, Tensor::from_data(data, &p.device()));
        }
    }
    Ok(())
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
