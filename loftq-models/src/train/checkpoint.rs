//! `loftq train`'s checkpoints: `out/checkpoint-N/` with the adapter, AdamW's moments and the
//! trainer state, written atomically; the newest is found and read back for an exact resume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use loftq_core::quant::host_f32;
use serde::{Deserialize, Serialize};

use super::config::{History, TrainConfig};
use super::optim::AdamW;
use crate::io::{
    AdapterConfig, Checkpoint, OutTensor, write_atomic, write_dir_atomic, write_safetensors,
};
use crate::nn::Llama;
use crate::{ModelError, Result};

#[derive(Serialize, Deserialize)]
pub(super) struct TrainerState {
    pub(super) step: usize,
    pub(super) config: TrainConfig,
    pub(super) history: History,
}

/// The run's state in a checkpoint (step, settings, history): also what marks a directory as
/// a complete checkpoint.
const STATE: &str = "trainer_state.json";
const OPTIMIZER: &str = "optimizer.safetensors";

/// The checkpoint directory with the most steps under `out`, if any.
///
/// # Errors
/// [`ModelError::Io`] if `out` cannot be listed.
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>> {
    let found = match checkpoints(out) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ModelError::io(out, e)),
    };
    Ok(found
        .into_iter()
        .rev()
        .map(|(_, p)| p)
        .find(|p| p.join(STATE).is_file()))
}

/// The `checkpoint-N` directories under `out`, by ascending `N`.
fn checkpoints(out: &Path) -> std::io::Result<Vec<(usize, PathBuf)>> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(out)?
        .flatten()
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

pub(super) fn save_checkpoint(
    out: &Path,
    model: &Llama,
    template: &AdapterConfig,
    opt: &AdamW,
    cfg: &TrainConfig,
    step: usize,
    history: &History,
) -> Result<PathBuf> {
    let state = TrainerState {
        step,
        config: cfg.clone(),
        history: history.clone(),
    };
    let adapter = |tmp: &Path| {
        model
            .adapter(template.clone())
            .expect("has adapters")
            .write(tmp)
    };
    write_checkpoint(out, &state, cfg.keep_checkpoints, adapter, opt)
}

/// Writes `out/checkpoint-{step}` atomically (the adapter by `adapter`, AdamW's state, the
/// run's `state`) and prunes all but the newest `keep` (at least one).
pub(crate) fn write_checkpoint<S: RunState + Serialize>(
    out: &Path,
    state: &S,
    keep: usize,
    adapter: impl FnOnce(&Path) -> Result<()>,
    opt: &AdamW,
) -> Result<PathBuf> {
    let dir = out.join(format!("checkpoint-{}", state.step()));
    write_dir_atomic(&dir, |tmp| {
        adapter(tmp)?;
        write_optimizer(tmp, opt)?;
        let json = serde_json::to_string_pretty(state).expect("state serializes");
        write_atomic(&tmp.join(STATE), json.as_bytes())
    })?;
    prune_checkpoints(out, keep.max(1));
    Ok(dir)
}

pub(super) fn load_checkpoint(
    dir: &Path,
    model: &mut Llama,
    opt: &mut AdamW,
    cfg: &TrainConfig,
) -> Result<TrainerState> {
    let state = read_state::<TrainerState>(dir, |c| c.same_run(cfg), cfg.steps)?;
    let adapter = crate::io::Adapter::read(dir)?;
    let device = model.embed_tokens.device();
    let mut params = Vec::new();
    for (p, lin) in model.linears() {
        if lin.lora.is_none() {
            continue;
        }
        let w = adapter.modules.get(&p).ok_or_else(|| {
            ModelError::format(dir, format!("the checkpoint has no factors for `{p}`"))
        })?;
        for t in [&w.a, &w.b] {
            params.push(Tensor::<2>::from_data(
                TensorData::new(t.data.clone(), t.shape.clone()),
                &device,
            ));
        }
    }
    let shapes: Vec<[usize; 2]> = model.lora_params().iter().map(|t| t.dims()).collect();
    if params.iter().map(|t| t.dims()).ne(shapes.iter().copied()) {
        return Err(ModelError::format(
            dir,
            "the checkpoint's factors do not fit the model",
        ));
    }
    model.set_lora_params(params.clone());
    read_optimizer(dir, opt, params, &device)?;
    Ok(state)
}

/// What a checkpoint's [`STATE`] file holds: the step it was written after and the run's
/// settings.
pub(crate) trait RunState: serde::de::DeserializeOwned {
    /// The run's settings.
    type Config: std::fmt::Debug;
    /// Steps done.
    fn step(&self) -> usize;
    /// The settings it was written with.
    fn config(&self) -> &Self::Config;
}

impl RunState for TrainerState {
    type Config = TrainConfig;
    fn step(&self) -> usize {
        self.step
    }
    fn config(&self) -> &TrainConfig {
        &self.config
    }
}

/// Checkpoint `dir`'s [`STATE`], refused when written with settings `same` rejects, or when
/// its step is not its directory's own (`checkpoint-N`) or lies past the run's `steps`.
pub(crate) fn read_state<S: RunState>(
    dir: &Path,
    same: impl FnOnce(&S::Config) -> bool,
    steps: usize,
) -> Result<S> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let state: S = serde_json::from_str(&text)
        .map_err(|e| ModelError::format(&path, format!("bad trainer state: {e}")))?;
    if !same(state.config()) {
        return Err(ModelError::output(
            dir,
            format!(
                "written with other training settings ({:?}); resume with the same ones or \
                 write elsewhere",
                state.config()
            ),
        ));
    }
    let named = dir.file_name().and_then(|n| {
        n.to_str()?
            .strip_prefix("checkpoint-")?
            .parse::<usize>()
            .ok()
    });
    let step = state.step();
    if named != Some(step) || step > steps {
        return Err(ModelError::format(
            &path,
            format!(
                "step {step} does not match the directory or lies past the run's {steps} steps"
            ),
        ));
    }
    Ok(state)
}

/// Writes AdamW's moments (`m.i`, `v.i`) and step into `dir`.
fn write_optimizer(dir: &Path, opt: &AdamW) -> Result<()> {
    let mut tensors = BTreeMap::new();
    for (i, (m, v)) in opt.moments().iter().enumerate() {
        tensors.insert(
            format!("m.{i}"),
            OutTensor::f32(m.dims().to_vec(), &host_f32(m)),
        );
        tensors.insert(
            format!("v.{i}"),
            OutTensor::f32(v.dims().to_vec(), &host_f32(v)),
        );
    }
    let meta = [("adamw_step".to_string(), opt.step.to_string())].into();
    write_safetensors(&dir.join(OPTIMIZER), &tensors, Some(meta))
}

/// Restores `opt` from checkpoint `dir`: the checkpoint's parameters `params` (read and
/// checked by the caller), and the moments and step [`write_optimizer`] wrote for them.
pub(crate) fn read_optimizer(
    dir: &Path,
    opt: &mut AdamW,
    params: Vec<Tensor<2>>,
    device: &burn::tensor::Device,
) -> Result<()> {
    let shapes: Vec<[usize; 2]> = params.iter().map(|t| t.dims()).collect();
    opt.set_params(params);
    let opath = dir.join(OPTIMIZER);
    let ck = Checkpoint::open(&opath)?;
    let load = |name: String, shape: [usize; 2]| -> Result<Tensor<2>> {
        let t = ck.shaped(&name, &shape)?;
        Ok(Tensor::from_data(TensorData::new(t.data, t.shape), device))
    };
    let moments = (shapes.iter().enumerate())
        .map(|(i, &shape)| {
            Ok((
                load(format!("m.{i}"), shape)?,
                load(format!("v.{i}"), shape)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    opt.set_moments(moments);
    opt.step = ck
        .metadata()
        .get("adamw_step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ModelError::format(&opath, "no adamw_step in the metadata"))?;
    Ok(())
}

/// Removes all but the newest `keep` checkpoints under `out`.
fn prune_checkpoints(out: &Path, keep: usize) {
    let Ok(found) = checkpoints(out) else {
        return;
    };
    let drop = found.len().saturating_sub(keep);
    for (_, p) in found.into_iter().take(drop) {
        let _ = std::fs::remove_dir_all(p);
    }
}
