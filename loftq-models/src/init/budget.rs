//! `--avg-bits`: one quantizer per targeted matrix, chosen to minimise the model's error under
//! an average-bits budget (LQ-LoRA's allocation). Every candidate is scored on every matrix
//! (one LoftQ iteration, activation-weighted on the full-precision model's calibration inputs
//! when there are any), then [`allocate`] picks; the choices land in the work area, so
//! `--resume` does not score again.

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use loftq_core::QuantConfig;
use loftq_core::calib::{Choice, Objective, Weighting, allocate, score};
use loftq_core::init::LoraInit;
use serde::{Deserialize, Serialize};

use super::piece::{self, Loaded, Plan};
use super::sensitivity::{self, Rows};
use super::{Event, InitMethod, InitSpec, calibrate};
use crate::io::{TensorSource, write_atomic};
use crate::nn::tensor_seed;
use crate::{ModelError, Result};
use loftq_core::quant::fit_rows;

/// An average-bits budget and the quantizers to choose from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// Bits per parameter of the targeted bases, scales included, adapters not.
    pub avg_bits: f64,
    /// The quantizers each matrix may get.
    pub candidates: Vec<QuantConfig>,
}

impl Budget {
    /// `avg_bits` over NF2, NF3, NF4 and NF8, each in blocks of 64 and of 128 with
    /// double-quantized scales (2.127 to 8.064 bits per parameter).
    pub fn new(avg_bits: f64) -> Self {
        let candidates = [2, 3, 4, 8]
            .into_iter()
            .flat_map(|bits| {
                [64, 128].map(|block| {
                    QuantConfig::nf(bits)
                        .with_block_size(loftq_core::quant::BlockSize::Elements(block))
                        .with_double_quant(true)
                })
            })
            .collect();
        Self {
            avg_bits,
            candidates,
        }
    }
}

/// What the work area keeps of an allocation.
#[derive(Serialize, Deserialize)]
struct Saved {
    /// Plan items that are targets, in order.
    items: Vec<usize>,
    /// Each one's scores, one per candidate.
    scores: Vec<Vec<Choice>>,
    /// Each one's candidate.
    choice: Vec<usize>,
}

const FILE: &str = "allocation.json";

/// Refuses budgets that cannot work, before any work starts.
///
/// # Errors
/// A method that quantizes nothing or its residual, no candidates, a budget that is not a
/// positive number.
pub(super) fn check(spec: &InitSpec) -> Result<()> {
    let Some(b) = &spec.budget else {
        return Ok(());
    };
    if !matches!(spec.method, InitMethod::Loftq | InitMethod::Qlora) {
        return Err(ModelError::Settings(
            "a bit budget works with the loftq and qlora methods".into(),
        ));
    }
    if b.candidates.is_empty() {
        return Err(ModelError::Settings(
            "a bit budget needs at least one candidate quantizer".into(),
        ));
    }
    if !(b.avg_bits.is_finite() && b.avg_bits > 0.0) {
        return Err(ModelError::Settings(format!(
            "a budget of {} bits per parameter: it must be positive",
            b.avg_bits
        )));
    }
    Ok(())
}

/// Gives every target of `plan` its quantizer under `spec.budget`: read from the work area
/// when an interrupted run got that far, else scored (on the calibration tokens `ids` when
/// there are any, each output row weighted by `rows` when given) and allocated.
///
/// # Errors
/// A budget below the cheapest candidates, and the errors of scoring.
pub(super) fn apply(
    spec: &InitSpec,
    plan: &mut Plan,
    source: &dyn TensorSource,
    work: &Path,
    (ids, rows): (Option<&[u32]>, Option<&Rows>),
    device: &Device,
    events: &mut dyn FnMut(Event),
) -> Result<()> {
    let Some(budget) = &spec.budget else {
        return Ok(());
    };
    let items: Vec<usize> = (0..plan.items.len())
        .filter(|&i| plan.items[i].target.is_some())
        .collect();
    let path = work.join(FILE);
    let saved = match std::fs::read(&path) {
        Ok(bytes) => {
            let s: Saved = serde_json::from_slice(&bytes)
                .map_err(|e| ModelError::format(&path, format!("bad allocation: {e}")))?;
            let fits = s.items == items
                && s.choice.len() == items.len()
                && s.choice.iter().all(|&c| c < budget.candidates.len());
            if !fits {
                return Err(ModelError::format(
                    &path,
                    "the allocation does not fit the plan (damaged work area?)",
                ));
            }
            s
        }
        Err(_) => {
            let scores = scores(spec, plan, source, &items, (ids, rows), device, events)?;
            let params = plan.target_params();
            let total = (budget.avg_bits * params as f64).floor() as u64;
            let a = allocate(&scores, total).map_err(|e| {
                // Every matrix at its cheapest candidate.
                let least: u64 = scores
                    .iter()
                    .map(|o| o.iter().map(|c| c.bits).min().unwrap_or(0))
                    .sum();
                ModelError::Settings(format!(
                    "a budget of {} bits per parameter: {e} (the cheapest candidates need {:.3})",
                    budget.avg_bits,
                    least as f64 / params.max(1) as f64
                ))
            })?;
            let s = Saved {
                items: items.clone(),
                scores,
                choice: a.choice,
            };
            let json = serde_json::to_vec(&s).expect("allocation serializes");
            write_atomic(&path, &json)?;
            s
        }
    };
    for (&i, &c) in saved.items.iter().zip(&saved.choice) {
        if let Some((shape, _)) = plan.items[i].target {
            plan.items[i].target = Some((shape, fit_rows(budget.candidates[c], shape[1])));
        }
    }
    Ok(())
}

/// Every candidate's bits and error on every target (`items`).
fn scores(
    spec: &InitSpec,
    plan: &Plan,
    source: &dyn TensorSource,
    items: &[usize],
    (ids, rows): (Option<&[u32]>, Option<&Rows>),
    device: &Device,
    events: &mut dyn FnMut(Event),
) -> Result<Vec<Vec<Choice>>> {
    let budget = spec.budget.as_ref().expect("called with a budget");
    let mut out: Vec<Option<Vec<Choice>>> = vec![None; plan.items.len()];
    let total = items.len();
    let mut done = 0;
    let mut one = |i: usize, wg: Option<&Weighting>| -> Result<()> {
        let item = &plan.items[i];
        let Loaded::Weight(h) = piece::load(source, item)? else {
            unreachable!("targets load as weights")
        };
        let shape = [h.shape[0], h.shape[1]];
        let w = Tensor::<2>::from_data(TensorData::new(h.data, shape), device);
        // One LoftQ iteration (the quantization, then the adapter for it), or the base alone.
        let fit = match spec.method_for(spec.quant, tensor_seed(spec.seed, &item.name)) {
            LoraInit::Loftq(mut cfg) => {
                cfg.iters = 1;
                Some(cfg)
            }
            _ => None,
        };
        let candidates: Vec<_> = budget
            .candidates
            .iter()
            .map(|&c| fit_rows(c, shape[1]))
            .collect();
        let objective = match wg {
            Some(inputs) => Some(Objective {
                inputs,
                rows: sensitivity::of(rows, &item.name, shape[0])?,
            }),
            None => None,
        };
        let choices = score(&w, objective, &candidates, fit.as_ref()).map_err(|source| {
            ModelError::Loftq {
                name: item.name.clone(),
                source,
            }
        })?;
        out[i] = Some(choices);
        done += 1;
        events(Event::Scoring { done, total });
        Ok(())
    };
    match ids {
        Some(ids) => {
            calibrate::full_precision_pass(spec, plan, source, ids, device, &mut |targets| {
                for &(i, w) in targets {
                    one(i, Some(w))?;
                }
                Ok(())
            })?
        }
        None => {
            for &i in items {
                one(i, None)?;
            }
        }
    }
    Ok(items
        .iter()
        .map(|&i| out[i].take().expect("every target scored"))
        .collect())
}
