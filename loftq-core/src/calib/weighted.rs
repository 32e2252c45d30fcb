//! The calibrated start: LoftQ's alternation with the adapter fitted to the layer's outputs
//! (`‖(W − Q − s·B·A)·S‖`, QERA / CLoQ / EoRA's closed form) and, optionally, a GPTQ base.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::{GptqConfig, Weighting, gptq};
use crate::LoftqConfig;
use crate::dense::{Dense, DeviceOps};
use crate::loftq::{LoftqError, LoftqResult, checked_alternation};
use crate::lora::InitScaling;
use crate::lowrank::{SvdMethod, check_rank, svd_with};
use crate::quant::{PackedTensor, Quantizer};

/// How the base is quantized inside the calibrated alternation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BaseQuantizer {
    /// Round to nearest, block by block (what LoftQ and QLoRA do).
    #[default]
    Rtn,
    /// GPTQ: errors compensated through the input statistics ([`gptq`]).
    Gptq(GptqConfig),
}

/// Configuration of [`calibrated`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibratedConfig {
    /// Quantizer, rank, iterations, SVD, scaling: as LoftQ.
    pub loftq: LoftqConfig,
    /// Round to nearest or GPTQ.
    pub base: BaseQuantizer,
}

/// What [`calibrated`] returns: LoftQ's result (its `history` and `rel_err_quant` plain, its
/// `best_iter` chosen by the weighted error) and the activation-weighted errors.
#[derive(Clone, Debug)]
pub struct CalibratedResult {
    /// Base, factors and plain errors.
    pub start: LoftqResult,
    /// `‖(W − Q_t − s·B_t·A_t)·S‖ / ‖W·S‖` after each iteration.
    pub weighted_history: Vec<f32>,
    /// `‖(W − Q(W))·S‖ / ‖W·S‖`: round to nearest's weighted error (QLoRA's start).
    pub weighted_err_quant: f32,
}

impl CalibratedResult {
    /// The weighted error of the returned start.
    pub fn weighted_err(&self) -> f32 {
        self.weighted_history[self.start.best_iter - 1]
    }
}

/// What a calibrated fit minimises: `‖D^{1/2}·(W − W')·S‖_F`, `S` the factor of the inputs'
/// statistics and `D` an optional positive weight per output row (the loss's sensitivity to
/// each output, `loftq init --sensitivity`). Without `D` every output counts alike; a
/// `&Weighting` is that objective. The weights' scale does not change the fit.
#[derive(Clone, Copy, Debug)]
pub struct Objective<'a> {
    /// The inputs' statistics.
    pub inputs: &'a Weighting,
    /// `D`'s diagonal, one weight per output row.
    pub rows: Option<&'a [f32]>,
}

impl<'a> From<&'a Weighting> for Objective<'a> {
    fn from(inputs: &'a Weighting) -> Self {
        Self { inputs, rows: None }
    }
}

impl Objective<'_> {
    /// Checks the objective against a matrix of `shape`.
    ///
    /// # Errors
    /// [`LoftqError::Config`] if the statistics' width differs, or the row weights are not one
    /// finite positive number per row.
    pub(crate) fn check(&self, [out, inp]: [usize; 2]) -> Result<(), LoftqError> {
        if self.inputs.dim() != inp {
            return Err(LoftqError::Config(format!(
                "statistics of width {} for a matrix with {inp} columns",
                self.inputs.dim()
            )));
        }
        match self.rows {
            Some(r) if r.len() != out => Err(LoftqError::Config(format!(
                "{} row weights for a matrix with {out} rows",
                r.len()
            ))),
            Some(r) if !r.iter().all(|v| v.is_finite() && *v > 0.0) => Err(LoftqError::Config(
                "row weights must be finite and positive".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The objective on `ops`' device, to measure `‖D^{1/2}·M·S‖` with.
    pub(crate) fn measure(&self, ops: &DeviceOps) -> Measure {
        let n = self.inputs.dim();
        Measure {
            s: ops.matrix(self.inputs.factor().to_vec(), [n, n]),
            roots: self.rows.map(|r| r.iter().map(|v| v.sqrt()).collect()),
        }
    }
}

/// An [`Objective`] uploaded once: `S` on the device and `D^{1/2}`'s diagonal.
pub(crate) struct Measure {
    s: Tensor<2>,
    roots: Option<Vec<f32>>,
}

impl Measure {
    /// `‖D^{1/2}·m·S‖_F`.
    pub(crate) fn norm(&self, ops: &DeviceOps, m: &Tensor<2>) -> f32 {
        let mut m = ops.mul(m, &self.s);
        if let Some(r) = &self.roots {
            ops.scale_rows(&mut m, r);
        }
        ops.norm(&m)
    }
}

/// The calibrated start of `w` `[out, in]` for the `objective` (inputs' statistics, and
/// optionally a weight per output row).
///
/// # Algorithm
/// With `res = W`, for `t = 1..=T`: `Q_t` = the quantization of `res` (round to nearest, or
/// GPTQ with `H`); `(B_t, A_t)` = the rank-`r` minimiser of `‖D^{1/2}·(W − Q_t − B·A)·S‖_F`,
/// in closed form `B·A = D^{-1/2}·[D^{1/2}·(W − Q_t)·S]_r · S⁻¹` (truncated SVD of the scaled
/// residual, then unscaled); `res = W − B_t·A_t`. GPTQ is the same with or without `D`: its
/// rows are independent. The iterate with the lowest weighted error is returned;
/// scaling as [`loftq`](crate::loftq()).
///
/// # Shapes
/// `w: [out, in]`, `weighting` of width `in` → as [`loftq`](crate::loftq()).
///
/// # Numerical behaviour
/// With `H = I` and round to nearest this is LoftQ (same codes, same errors). With the exact
/// SVD each adapter step is the optimum for its `Q_t`.
///
/// # Errors
/// As [`loftq`](crate::loftq()); [`LoftqError::Config`] if the widths differ.
pub fn calibrated<'a>(
    w: &Tensor<2>,
    objective: impl Into<Objective<'a>>,
    cfg: &CalibratedConfig,
) -> Result<CalibratedResult, LoftqError> {
    let objective = objective.into();
    objective.check(w.dims())?;
    let (start, errors) = checked_alternation(w, &cfg.loftq, Some((objective, &cfg.base)))?;
    let errors = errors.expect("a weighted run returns weighted errors");
    Ok(CalibratedResult {
        start,
        weighted_history: errors.history,
        weighted_err_quant: errors.quant,
    })
}

/// `‖W − Q‖/‖W‖` and the `objective`'s `‖D^{1/2}·(W − Q)·S‖/‖D^{1/2}·W·S‖` of a base `q`
/// for `w` (both `[out, in]`).
///
/// # Errors
/// [`LoftqError::Config`] if the shapes differ or the objective does not fit them.
pub fn base_errors<'a>(
    w: &Tensor<2>,
    q: &Tensor<2>,
    objective: impl Into<Objective<'a>>,
) -> Result<(f32, f32), LoftqError> {
    let objective = objective.into();
    let weighting = objective.inputs;
    check_widths(w, q, weighting)?;
    objective.check(w.dims())?;
    let ops = DeviceOps(w.device());
    let measure = objective.measure(&ops);
    let residual = w.clone() - q.clone();
    let plain = ops.norm(&residual) / ops.norm(w).max(f32::MIN_POSITIVE);
    let weighted = measure.norm(&ops, &residual) / measure.norm(&ops, w).max(f32::MIN_POSITIVE);
    Ok((plain, weighted))
}

fn check_widths(w: &Tensor<2>, q: &Tensor<2>, weighting: &Weighting) -> Result<(), LoftqError> {
    if w.dims() != q.dims() || weighting.dim() != w.dims()[1] {
        return Err(LoftqError::Config(format!(
            "the base is {:?}, the weight {:?}, the statistics {} wide",
            q.dims(),
            w.dims(),
            weighting.dim()
        )));
    }
    Ok(())
}

/// The base alone, quantized by GPTQ with the statistics of `weighting` (QLoRA's start on a
/// GPTQ base): the packed codes and the dequantized matrix on `w`'s device.
///
/// # Errors
/// As [`gptq`]; [`LoftqError::Config`] if the widths differ.
pub fn gptq_base(
    w: &Tensor<2>,
    weighting: &Weighting,
    quant: crate::QuantConfig,
    g: &GptqConfig,
) -> Result<(PackedTensor, Tensor<2>), LoftqError> {
    let shape = w.dims();
    if weighting.dim() != shape[1] {
        return Err(LoftqError::Config(format!(
            "statistics of width {} for a matrix with {} columns",
            weighting.dim(),
            shape[1]
        )));
    }
    let quantizer = Quantizer::new(quant)?;
    let u = weighting.gptq_factor()?;
    let host = gptq(&quantizer, &crate::quant::host_f32(w), shape, &u, g)?;
    let q = quantizer.dequantize_host(&host);
    let q = crate::transfers::upload(q, shape, &w.device());
    Ok((PackedTensor::pack(&host, quant), q))
}

/// An adapter fitted by [`fit_weighted`].
#[derive(Clone, Debug)]
pub struct WeightedFit {
    /// Factors and plain errors.
    pub fit: crate::init::AdapterFit,
    /// `‖(W − Q)·S‖ / ‖W·S‖`.
    pub weighted_err_base: f32,
    /// `‖(W − Q − s·B·A)·S‖ / ‖W·S‖`.
    pub weighted_err: f32,
}

/// The rank-`rank` adapter that minimises `‖(W − Q − s·B·A)·S‖_F` for a fixed base `q`: the
/// closed form `B·A = [(W − Q)·S]_r · S⁻¹`, optimal with [`SvdMethod::Exact`]. Scaling as
/// [`fit_adapter`](crate::init::fit_adapter).
///
/// # Errors
/// Shapes or widths that differ, a rank that does not fit, a failed SVD.
pub fn fit_weighted(
    w: &Tensor<2>,
    q: &Tensor<2>,
    weighting: &Weighting,
    rank: usize,
    svd: &SvdMethod,
    scale: f32,
    scaling: InitScaling,
) -> Result<WeightedFit, LoftqError> {
    check_widths(w, q, weighting)?;
    check_rank(w.dims(), rank)?;
    let ops = DeviceOps(w.device());
    let n = weighting.dim();
    let s = ops.matrix(weighting.factor().to_vec(), [n, n]);
    let s_inv = ops.matrix(weighting.inverse_factor()?.to_vec(), [n, n]);
    let norm = ops.norm(w).max(f32::MIN_POSITIVE);
    let wnorm = ops.norm(&ops.mul(w, &s)).max(f32::MIN_POSITIVE);
    let residual = w.clone() - q.clone();
    let rs = ops.mul(&residual, &s);
    let (lr, _) = svd_with(&ops, &rs, rank, svd, None)?;
    let (b, a_scaled) = lr.balanced_with(&ops);
    let a = ops.mul(&a_scaled, &s_inv);
    let factor_scale = scaling.scales(scale).0;
    let (a, b) = (a.mul_scalar(factor_scale), b.mul_scalar(factor_scale));
    let delta = crate::matmul(&b, &a).mul_scalar(scale);
    let fit = residual.clone() - delta;
    Ok(WeightedFit {
        weighted_err_base: ops.norm(&rs) / wnorm,
        weighted_err: ops.norm(&ops.mul(&fit, &s)) / wnorm,
        fit: crate::init::AdapterFit {
            lora_a: a,
            lora_b: b,
            rel_err_base: ops.norm(&residual) / norm,
            rel_err: ops.norm(&fit) / norm,
        },
    })
}
