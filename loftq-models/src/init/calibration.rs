//! What `loftq init --calibration` asks for: the text, how much of it, the damping, which
//! layers feed each layer's inputs and how much of the full-precision model's outputs each
//! layer is fitted to; the checks made before any work, and the calibration tokens. The pass
//! over the model is [`calibrate`](super::calibrate)'s.

use std::path::{Path, PathBuf};

use loftq_core::calib::BaseQuantizer;
use serde::{Deserialize, Serialize};

use super::{InitMethod, InitSpec};
use crate::config::Architecture;
use crate::tokenizer::Tokenizer;
use crate::{ModelError, Result};

/// Where the calibration statistics come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Text files, read in order and tokenized with the model's tokenizer.
    pub files: Vec<PathBuf>,
    /// Tokens to use at most (whole sequences of `seq` tokens).
    pub tokens: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// `λ` of the damping `λ·mean(diag H)`.
    pub damping: f64,
    /// Whether layer `l` sees the outputs of the initialized layers below it (GPTQ's way) or
    /// of the full-precision ones.
    pub inputs: CalibInputs,
    /// How much of each layer's target is the full-precision model's output on its own
    /// inputs rather than the layer's output on the quantized model's inputs: `mix` of
    /// [`Weighting::target`](loftq_core::calib::Weighting::target) (0: GPTQ's objective; 1:
    /// GPTAQ's). Above 0 it needs `inputs` [`CalibInputs::Quantized`]; `None`: see
    /// [`Calibration::drift`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<f32>,
    /// Weigh the layers' outputs by the loss's sensitivity to them, measured by a backward
    /// pass through the whole model (`sensitivity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensitivity: Option<Sensitivity>,
}

/// What the loss's sensitivity to the layers' outputs weighs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Sensitivity {
    /// Each matrix's error in the bit budget's scores, by one weight per matrix (the mean
    /// over its outputs); the fits are unchanged. Needs a budget.
    Layers,
    /// Each output row, in the bit budget's scores and in the adapters' fit.
    Rows,
}

impl Calibration {
    /// `files` with the defaults: 16,384 tokens in sequences of 512, damping 0.01, inputs
    /// from the quantized layers, drift correction
    /// [`DEFAULT_DRIFT`](loftq_core::calib::DEFAULT_DRIFT).
    pub fn new(files: Vec<PathBuf>) -> Self {
        Self {
            files,
            tokens: 16_384,
            seq: 512,
            damping: loftq_core::calib::DEFAULT_DAMPING,
            inputs: CalibInputs::Quantized,
            drift: None,
            sensitivity: None,
        }
    }

    /// The drift correction this calibration runs with: the one set, else
    /// [`DEFAULT_DRIFT`](loftq_core::calib::DEFAULT_DRIFT) with quantized inputs and 0 with
    /// the others (which cannot use it).
    pub fn drift(&self) -> f32 {
        match (self.drift, self.inputs) {
            (Some(d), _) => d,
            (None, CalibInputs::Quantized) => loftq_core::calib::DEFAULT_DRIFT,
            (None, _) => 0.0,
        }
    }
}

/// Which layers below produce a layer's calibration inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum CalibInputs {
    /// The initialized layers below (with their adapters), as the model will run; inside the
    /// layer, the full-precision one.
    Quantized,
    /// As `Quantized`, and inside the layer the initialized groups before the one being
    /// initialized (GPTQ's true-sequential order): one pass per layer instead of two.
    Sequential,
    /// The full-precision layers.
    Full,
}

/// Refuses calibration settings that cannot work, before any work starts: a method that
/// does not use the statistics, GPTQ without statistics, unreadable or too short text.
/// Returns the calibration tokens of a calibrated run.
pub(super) fn check(spec: &InitSpec) -> Result<Option<Vec<u32>>> {
    let gptq = matches!(spec.quantizer, BaseQuantizer::Gptq(_));
    match (&spec.calibration, spec.method) {
        (None, _) if gptq => Err(ModelError::Settings(
            "the GPTQ quantizer needs calibration text (its statistics)".into(),
        )),
        (None, _) => Ok(None),
        (Some(_), InitMethod::Pissa | InitMethod::Qpissa) => Err(ModelError::Settings(
            "calibration works with the loftq and qlora methods (qlora with GPTQ)".into(),
        )),
        (Some(_), InitMethod::Qlora) if !gptq => Err(ModelError::Settings(
            "calibration changes nothing for qlora with round to nearest; quantize with GPTQ, \
             or use the loftq method"
                .into(),
        )),
        (Some(c), _) if !(0.0..=1.0).contains(&c.drift()) => Err(ModelError::Settings(format!(
            "drift correction must be between 0 and 1, got {}",
            c.drift()
        ))),
        (Some(c), _) if c.sensitivity == Some(Sensitivity::Layers) && spec.budget.is_none() => {
            Err(ModelError::Settings(
                "sensitivity by layers weighs the bit budget's scores only: give a budget, or \
                 weigh by rows"
                    .into(),
            ))
        }
        (Some(c), _) if c.drift() > 0.0 && c.inputs != CalibInputs::Quantized => {
            Err(ModelError::Settings(match c.inputs {
                CalibInputs::Full => "drift correction needs the quantized layers' inputs: with \
                                      full-precision inputs there is no drift to correct"
                    .into(),
                _ => "drift correction is not implemented for the sequential order (its groups \
                      change one by one inside a layer); set it to 0"
                    .into(),
            }))
        }
        (Some(c), _) => {
            let file = spec.model.join("config.json");
            if file.is_file() && matches!(Architecture::from_file(&file)?, Architecture::Encoder(_))
            {
                return Err(ModelError::Settings(
                    "calibration runs a causal LM over text; this model is an encoder".into(),
                ));
            }
            tokens(&spec.model, c).map(Some)
        }
    }
}

/// The calibration sequences: whole sequences of `seq` tokens from the files, in order.
///
/// # Errors
/// A file that cannot be read, a model without a tokenizer, fewer than `seq` tokens.
pub(super) fn tokens(model: &Path, calib: &Calibration) -> Result<Vec<u32>> {
    if calib.seq < 2 || calib.tokens < calib.seq {
        return Err(ModelError::Settings(format!(
            "calibration sequences of {} tokens out of {}: need 2 ≤ sequence ≤ tokens",
            calib.seq, calib.tokens
        )));
    }
    let tok = Tokenizer::for_model(model)?;
    let mut ids = Vec::new();
    for f in &calib.files {
        let text = std::fs::read_to_string(f).map_err(|e| ModelError::io(f, e))?;
        ids.extend(tok.encode(&text)?);
        if ids.len() >= calib.tokens {
            break;
        }
    }
    let n = ids.len().min(calib.tokens) / calib.seq * calib.seq;
    if n == 0 {
        return Err(ModelError::Data(format!(
            "the calibration files hold {} tokens, fewer than one sequence of {}",
            ids.len(),
            calib.seq
        )));
    }
    ids.truncate(n);
    Ok(ids)
}
