//! A classifier run's checkpoints, laid out as `loftq train`'s (`out/checkpoint-N/`, the
//! newest found by [`crate::train::latest_checkpoint`]): the SEQ_CLS adapter with its labels,
//! AdamW's moments and the run's state, for an exact resume.

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::{ClassifyConfig, ClassifyHistory, write_classifier};
use crate::io::{Adapter, AdapterConfig, HostTensor};
use crate::nn::Encoder;
use crate::train::checkpoint::{RunState, read_optimizer, read_state, write_checkpoint};
use crate::train::optim::AdamW;
use crate::{ModelError, Result};

/// Where a run checkpoints, and whether it continues from the newest checkpoint there.
#[derive(Clone, Debug)]
pub struct ClassifyCheckpoints<'a> {
    /// The run's output directory.
    pub out: &'a Path,
    /// The adapter configuration written with the factors.
    pub template: &'a AdapterConfig,
    /// The label names, in the order of the classifier's outputs.
    pub labels: &'a [String],
    /// Continue from the newest checkpoint under `out`, if there is one.
    pub resume: bool,
}

#[derive(Serialize, Deserialize)]
pub(super) struct ClassifyState {
    pub(super) step: usize,
    pub(super) config: ClassifyConfig,
    pub(super) history: ClassifyHistory,
}

impl RunState for ClassifyState {
    type Config = ClassifyConfig;
    fn step(&self) -> usize {
        self.step
    }
    fn config(&self) -> &ClassifyConfig {
        &self.config
    }
}

impl ClassifyCheckpoints<'_> {
    /// Writes `checkpoint-{step}` atomically and prunes the older ones.
    pub(super) fn save(
        &self,
        model: &Encoder,
        opt: &AdamW,
        cfg: &ClassifyConfig,
        step: usize,
        history: &ClassifyHistory,
    ) -> Result<PathBuf> {
        let state = ClassifyState {
            step,
            config: cfg.clone(),
            history: history.clone(),
        };
        let adapter = |tmp: &Path| write_classifier(model, self.template.clone(), self.labels, tmp);
        write_checkpoint(self.out, &state, cfg.keep_checkpoints, adapter, opt)
    }
}

/// Puts checkpoint `dir`'s factors, head and optimizer state into `model` and `opt`.
///
/// # Errors
/// [`ModelError`] naming the directory or file: another run's settings, a step that is not
/// the directory's, factors or a head that do not fit the model.
pub(super) fn load(
    dir: &Path,
    model: &mut Encoder,
    opt: &mut AdamW,
    cfg: &ClassifyConfig,
) -> Result<ClassifyState> {
    let state = read_state::<ClassifyState>(dir, |c| c.same_run(cfg), cfg.steps)?;
    let adapter = Adapter::read(dir)?;
    let device = model.word_embeddings.device();
    // The head's bias is saved `[labels]` and trained `[1, labels]`.
    let up = |t: &HostTensor, shape: [usize; 2]| -> Result<Tensor<2>> {
        if t.shape != shape && t.shape != [shape[1]] {
            return Err(ModelError::format(
                dir,
                format!("a tensor of shape {:?} where {shape:?} is trained", t.shape),
            ));
        }
        Ok(Tensor::from_data(
            TensorData::new(t.data.clone(), shape),
            &device,
        ))
    };
    let shapes: Vec<[usize; 2]> = model.trainable().iter().map(|t| t.dims()).collect();
    let mut host = Vec::new();
    for (path, lin) in model.linears() {
        if lin.lora.is_none() {
            continue;
        }
        let w = adapter.modules.get(&path).ok_or_else(|| {
            ModelError::format(dir, format!("the checkpoint has no factors for `{path}`"))
        })?;
        host.extend([&w.a, &w.b]);
    }
    for name in ["classifier.weight", "classifier.bias"] {
        let t = adapter.saved.get(name).ok_or_else(|| {
            ModelError::format(dir, format!("the checkpoint does not save `{name}`"))
        })?;
        host.push(t);
    }
    if host.len() != shapes.len() {
        return Err(ModelError::format(
            dir,
            "the checkpoint's factors do not fit the model",
        ));
    }
    let params = (host.iter().zip(&shapes))
        .map(|(t, &shape)| up(t, shape))
        .collect::<Result<Vec<_>>>()?;
    model.set_trainable(params.clone());
    read_optimizer(dir, opt, params, &device)?;
    Ok(state)
}
