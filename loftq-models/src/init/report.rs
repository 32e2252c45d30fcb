//! What `loftq init` tells: progress events, and the report (`report.json`) per tensor and in
//! total.

use serde::{Deserialize, Serialize};

/// One line of `report.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorReport {
    /// Weight name.
    pub name: String,
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// Quantizer label (`nf4-b64`), or `dense` for PiSSA.
    pub quantizer: String,
    /// Bits per parameter of the base.
    pub bits_per_param: f64,
    /// `‖W − Q(W)‖/‖W‖`: the QLoRA start (`null` for PiSSA, which does not quantize).
    pub rel_err_quant: Option<f32>,
    /// `‖W − base − s·B·A‖/‖W‖`: this start.
    pub rel_err_init: f32,
    /// `‖(W − Q(W))·S‖/‖W·S‖`, the QLoRA start on the calibration inputs (calibrated runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weighted_err_quant: Option<f32>,
    /// `‖(W − base − s·B·A)·S‖/‖W·S‖`: this start on the calibration inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weighted_err_init: Option<f32>,
    /// LoftQ iterations run (the best iterate is kept).
    pub iters_used: usize,
    /// Compute time.
    pub seconds: f64,
}

/// What happened, for progress displays.
#[derive(Clone, Debug)]
pub enum Event {
    /// The plan is ready.
    Planned {
        /// Tensors to quantize.
        targets: usize,
        /// Their parameters.
        target_params: u64,
        /// Tensors already done (resume).
        done: usize,
    },
    /// The bit budget's candidates are scored on one more matrix.
    Scoring {
        /// Matrices scored.
        done: usize,
        /// Matrices to score.
        total: usize,
    },
    /// The loss's sensitivity to the layers' outputs ([`Calibration::sensitivity`]) is
    /// measured on one more calibration sequence.
    ///
    /// [`Calibration::sensitivity`]: super::Calibration::sensitivity
    Sensitivity {
        /// Sequences done.
        done: usize,
        /// Sequences in all.
        total: usize,
    },
    /// A targeted tensor is done.
    Tensor(TensorReport),
    /// The calibration pass enters a decoder layer (its statistics, then its tensors).
    Calibrating {
        /// The layer, from 0.
        layer: usize,
        /// Decoder layers in all.
        layers: usize,
    },
    /// Writing the final files.
    Assembling,
    /// The distillation after the start ([`InitSpec::distill`](super::InitSpec::distill))
    /// made progress.
    Distill(crate::train::TrainEvent),
}

/// The whole job's result (also `report.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// One entry per targeted tensor, in file order.
    pub tensors: Vec<TensorReport>,
    /// Totals.
    pub totals: Totals,
    /// The distillation after the start, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<super::DistillReport>,
}

/// Totals of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Totals {
    /// Targeted tensors.
    pub tensors: usize,
    /// Parameters of the targeted tensors.
    pub params: u64,
    /// Bits per parameter of the targeted weights, adapter (f32) included.
    pub avg_bits_per_param: f64,
    /// Bits per parameter of the bases alone.
    pub avg_base_bits_per_param: f64,
    /// Mean of `rel_err_quant` over tensors that have one.
    pub mean_rel_err_quant: Option<f64>,
    /// Mean of `rel_err_init`.
    pub mean_rel_err_init: f64,
    /// Mean of `weighted_err_quant` (calibrated runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_weighted_err_quant: Option<f64>,
    /// Mean of `weighted_err_init` (calibrated runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_weighted_err_init: Option<f64>,
    /// Wall time of this invocation.
    pub wall_seconds: f64,
    /// Peak resident memory of the process (Linux), bytes.
    pub peak_rss_bytes: Option<u64>,
    /// Tensors taken from a previous, interrupted run.
    pub resumed: usize,
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
