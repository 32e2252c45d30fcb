//! LoftQ: alternating quantization and low-rank fitting (Li et al., ICLR 2024).

use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::QuantError;
use crate::calib::{BaseQuantizer, GptqConfig, Objective, gptq};
use crate::dense::{self, Dense, DeviceOps};
use crate::lora::LoraSpec;
use crate::lowrank::{LowRankError, SvdMethod, check_rank, svd_with};
use crate::quant::{Codes, PackedTensor, QuantConfig, Quantizer};

/// Configuration of [`loftq`](crate::loftq()).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoftqConfig {
    /// The quantizer of the frozen base.
    pub quant: QuantConfig,
    /// The adapter: rank, alpha, rsLoRA, scaling convention.
    #[serde(flatten)]
    pub lora: LoraSpec,
    /// Alternating iterations `T` (1 = quantize once, then fit the residual).
    pub iters: usize,
    /// Truncated SVD method.
    pub svd: SvdMethod,
    /// Stop when an iteration improves the error by less than this fraction (`None`: run all `T`).
    pub early_stop: Option<f32>,
}

impl LoftqConfig {
    /// LoftQ with `quant`, rank `rank`, `iters` iterations, `alpha = rank` (scale 1),
    /// randomized SVD with its defaults, exact scaling, no early stop.
    pub fn new(quant: QuantConfig, rank: usize, iters: usize) -> Self {
        Self {
            quant,
            lora: LoraSpec::new(rank),
            iters,
            svd: SvdMethod::default(),
            early_stop: None,
        }
    }
}

/// Errors of [`loftq`](crate::loftq()).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoftqError {
    /// The quantizer rejected the weight or its configuration.
    #[error(transparent)]
    Quant(#[from] QuantError),
    /// The low-rank solver failed or the rank does not fit the matrix.
    #[error(transparent)]
    LowRank(#[from] LowRankError),
    /// The calibration statistics are unusable.
    #[error(transparent)]
    Calib(#[from] crate::calib::CalibError),
    /// `iters` is zero or `alpha` is not a positive finite number.
    #[error("invalid LoftQ configuration: {0}")]
    Config(String),
}

/// The initialization LoftQ returns: the frozen base and the adapter.
#[derive(Clone, Debug)]
pub struct LoftqResult {
    /// The quantized base, packed (host).
    pub packed: PackedTensor,
    /// The dequantized base `Q` `[out, in]` on the weight's device.
    pub q: Tensor<2>,
    /// `lora_A` `[r, in]` (PEFT layout).
    pub lora_a: Tensor<2>,
    /// `lora_B` `[out, r]` (PEFT layout).
    pub lora_b: Tensor<2>,
    /// `‖W − Q_t − s·B_t·A_t‖_F / ‖W‖_F` after each iteration `t` that ran.
    pub history: Vec<f32>,
    /// `‖W − Q(W)‖_F / ‖W‖_F`: the error of plain quantization (QLoRA's start).
    pub rel_err_quant: f32,
    /// 1-based iteration whose result is returned (the lowest error).
    pub best_iter: usize,
    /// `lora_a` and `lora_b`'s values, where a device read them with the codes (the batched
    /// path): a caller that writes them needs no read of its own. `None` elsewhere.
    pub host_factors: Option<HostFactors>,
}

/// The values of a [`LoftqResult`]'s factors, row-major.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostFactors {
    /// `lora_A`'s values `[r·in]`.
    pub lora_a: Vec<f32>,
    /// `lora_B`'s values `[out·r]`.
    pub lora_b: Vec<f32>,
}

impl LoftqResult {
    /// The error of the returned initialization.
    pub fn rel_err(&self) -> f32 {
        self.history[self.best_iter - 1]
    }
}

/// Checks `cfg` and runs [`alternate`] on `w`, on host buffers for a CPU tensor and as tensor
/// ops elsewhere; `calib` makes it the calibrated alternation with these statistics.
pub(crate) fn checked_alternation(
    w: &Tensor<2>,
    cfg: &LoftqConfig,
    calib: Option<(Objective<'_>, &BaseQuantizer)>,
) -> Result<(LoftqResult, Option<WeightedErrors>), LoftqError> {
    check_config(cfg)?;
    let quantizer = Quantizer::new(cfg.quant)?;
    check_rank(w.dims(), cfg.lora.rank)?;
    let device = w.device();
    #[cfg(feature = "flex")]
    if let Some(x) = crate::cpu::flex(w) {
        let host = crate::cpu::RowMat::of_flex(&x, w.dims());
        let ops = crate::cpu::HostOps::default();
        // The factors are read where they are (a 7B model's widest are 485 MB each).
        let view = |v, shape| crate::cpu::RowMat::borrowed(v, shape);
        return alternate_with(&ops, &host, cfg, &quantizer, &device, calib, view);
    }
    let ops = DeviceOps(device.clone());
    let upload = |v: &[f32], shape| ops.matrix(v.to_vec(), shape);
    alternate_with(&ops, w, cfg, &quantizer, &device, calib, upload)
}

/// [`alternate`] with the statistics `calib` turned into `ops`' matrices by `matrix`.
fn alternate_with<'w, D: Dense>(
    ops: &D,
    w: &D::M,
    cfg: &LoftqConfig,
    quantizer: &Quantizer,
    device: &Device,
    calib: Option<(Objective<'w>, &BaseQuantizer)>,
    matrix: impl Fn(&'w [f32], [usize; 2]) -> D::M,
) -> Result<(LoftqResult, Option<WeightedErrors>), LoftqError> {
    let weighted = match calib {
        None => None,
        Some((objective, base)) => {
            let weighting = objective.inputs;
            let n = weighting.dim();
            // Weights of mean 1: their scale would otherwise move the split of `B·A` between
            // the factors.
            let rows = objective.rows.map(|d| {
                let mean = d.iter().map(|&v| f64::from(v)).sum::<f64>() / d.len().max(1) as f64;
                let r: Vec<f32> = d
                    .iter()
                    .map(|&v| (f64::from(v) / mean).sqrt() as f32)
                    .collect();
                let inv = r.iter().map(|v| 1.0 / v).collect();
                (r, inv)
            });
            Some(Weighted {
                rows,
                s: matrix(weighting.factor(), [n, n]),
                s_inv: match ops.solves_here() {
                    true => None,
                    false => Some(matrix(weighting.inverse_factor()?, [n, n])),
                },
                gptq: match base {
                    BaseQuantizer::Rtn => None,
                    BaseQuantizer::Gptq(g) => Some((weighting.gptq_factor()?, g)),
                },
            })
        }
    };
    alternate(ops, w, cfg, quantizer, device, weighted.as_ref())
}

/// Checks `iters` and `alpha`.
pub(crate) fn check_config(cfg: &LoftqConfig) -> Result<(), LoftqError> {
    if cfg.iters == 0 {
        return Err(LoftqError::Config("iters must be at least 1".into()));
    }
    if !(cfg.lora.alpha.is_finite() && cfg.lora.alpha > 0.0) {
        return Err(LoftqError::Config(format!(
            "alpha must be positive, got {}",
            cfg.lora.alpha
        )));
    }
    Ok(())
}

/// The weighted objective of a calibrated alternation ([`calibrated`](crate::calib::calibrated)):
/// the factor `S` of the input statistics, its inverse, the row weights, and GPTQ's factor
/// when the base is quantized by GPTQ.
pub(crate) struct Weighted<'g, M> {
    /// `D^{1/2}`'s diagonal and its inverse, when the output rows are weighted.
    rows: Option<(Vec<f32>, Vec<f32>)>,
    /// `S` `[in, in]`.
    s: M,
    /// `S⁻¹` `[in, in]`, where the adapter step multiplies by it instead of solving with `S`.
    s_inv: Option<M>,
    /// The upper Cholesky factor of `H⁻¹` (row-major) and GPTQ's settings.
    gptq: Option<(Vec<f32>, &'g GptqConfig)>,
}

/// The weighted errors of a calibrated alternation.
pub(crate) struct WeightedErrors {
    /// `‖(W − Q_t − s·B_t·A_t)·S‖ / ‖W·S‖` after each iteration.
    pub history: Vec<f32>,
    /// `‖(W − Q(W))·S‖ / ‖W·S‖`.
    pub quant: f32,
}

/// The rule for an iteration's `score` against the best one so far (`prev_best`): whether
/// it is the new best (strictly lower), and whether the alternation stops after it (an
/// `early_stop` fraction not gained).
pub(crate) fn judge(prev_best: Option<f32>, score: f32, early_stop: Option<f32>) -> (bool, bool) {
    let improved = prev_best.is_none_or(|p| score < p);
    let stop = matches!((early_stop, prev_best), (Some(tol), Some(p)) if score > p * (1.0 - tol));
    (improved, stop)
}

/// The alternation of [`loftq`](crate::loftq()) with any [`Dense`] implementation; results go
/// to `device`.
///
/// With `weighted`, each adapter step is the closed form `D^{-1/2}·[D^{1/2}·(W − Q)·S]_r · S⁻¹`
/// (`D = I` unless the rows are weighted), the base is
/// quantized by GPTQ when asked, and the best iterate is the one with the lowest weighted
/// error; the weighted errors come back beside the result.
pub(crate) fn alternate<D: Dense>(
    ops: &D,
    w: &D::M,
    cfg: &LoftqConfig,
    quantizer: &Quantizer,
    device: &Device,
    weighted: Option<&Weighted<'_, D::M>>,
) -> Result<(LoftqResult, Option<WeightedErrors>), LoftqError> {
    crate::profile::start(device);
    let norm = ops.norm(w);
    // A finite norm means finite values: the first quantization need not check them (on a
    // device a read fewer); otherwise it does, and names the first one that is not.
    let finite = norm.is_finite();
    let norm = norm.max(f32::MIN_POSITIVE);
    let wnorm = weighted.map(|x| {
        let mut ws = ops.mul_lower(w, &x.s);
        if let Some((r, _)) = &x.rows {
            ops.scale_rows(&mut ws, r);
        }
        ops.norm(&ws).max(f32::MIN_POSITIVE)
    });
    // The product s_eff·B·A that enters the error under each convention, relative to U·S·Vᵀ.
    let (factor_scale, product_scale) = cfg.lora.scaling.scales(cfg.lora.scale());

    // What gets quantized is W, then `res` = W − B·A; `residual` is W − Q.
    let mut res = ops.buffer(w);
    let mut residual = ops.buffer(w);
    // (W − Q)·S, rewritten each iteration of a weighted run.
    let mut scaled = ops.buffer(w);
    let mut warm: Option<D::M> = None;
    let mut history = Vec::with_capacity(cfg.iters);
    // The errors the best iterate is chosen by: `history`'s, or the weighted ones.
    let mut objective = Vec::with_capacity(cfg.iters);
    let mut best: Option<(usize, Codes, D::M, D::M)> = None;
    let (mut rel_err_quant, mut weighted_quant) = (f32::NAN, f32::NAN);
    for t in 1..=cfg.iters {
        let source = if t == 1 { w } else { &res };
        let codes = match weighted.and_then(|x| x.gptq.as_ref()) {
            // `W − B·A` after the first: finite, as `W` was and the factors are.
            None => ops.quantize_residual(quantizer, w, source, &mut residual, t > 1 || finite)?,
            Some((u, g)) => {
                let host = gptq(quantizer, &ops.to_rows(source), ops.dims(w), u, g)?;
                ops.residual_from(quantizer, &host, w, &mut residual);
                Codes::Host(host)
            }
        };
        crate::profile::mark(device, "loftq: quantize");
        // The weighted problem is the plain one for the scaled residual D^{1/2}·(W − Q)·S.
        let scaled = weighted.map(|x| {
            ops.mul_lower_into(&residual, &x.s, &mut scaled);
            if let Some((r, _)) = &x.rows {
                ops.scale_rows(&mut scaled, r);
            }
            &scaled
        });
        if t == 1 {
            crate::profile::mark(device, "loftq: norms");
        }
        let mut method = cfg.svd;
        if let SvdMethod::Randomized(r) = &mut method {
            r.seed = r.seed.wrapping_add(t as u64);
        }
        let target = scaled.unwrap_or(&residual);
        let (lr, basis) = svd_with(ops, target, cfg.lora.rank, &method, warm.as_ref())?;
        crate::profile::mark(device, "loftq: svd");
        let (mut b, a) = lr.balanced_with(ops);
        let a = match weighted {
            Some(x) => {
                if let Some((_, inv)) = &x.rows {
                    ops.scale_rows(&mut b, inv);
                }
                match &x.s_inv {
                    Some(inv) => ops.mul_lower(&a, inv),
                    None => ops.solve_lower_right(&a, &x.s),
                }
            }
            None => a,
        };
        crate::profile::mark(device, "loftq: factors");
        // In the same read: the first iteration's `‖W − Q‖` (QLoRA's error) and a weighted
        // run's `‖X‖` for `X = (W − Q)·S`.
        let also: Vec<&D::M> = (t == 1)
            .then_some(&residual)
            .into_iter()
            .chain(scaled)
            .collect();
        let (err, norms) = ops.fit_error(w, &residual, (&b, &a), product_scale, &mut res, &also);
        if t == 1 {
            rel_err_quant = norms[0] / norm;
        }
        let err = err / norm;
        // `U·Σ·Vᵀ` is the projection of `X` on `U`'s columns (exact and randomized SVD alike),
        // so `‖X − c·U·Σ·Vᵀ‖² = ‖X‖² − (2c − c²)·Σσ²`: no product with the factors.
        let score = wnorm.map(|wn| {
            let x = f64::from(*norms.last().expect("the weighted norm"));
            if t == 1 {
                weighted_quant = x as f32 / wn;
            }
            let kept: f64 = lr.s.iter().map(|v| f64::from(*v).powi(2)).sum();
            let c = f64::from(product_scale);
            (x.powi(2) - (2.0 * c - c * c) * kept).max(0.0).sqrt() as f32 / wn
        });
        crate::profile::mark(device, "loftq: error");
        history.push(err);
        let score = score.unwrap_or(err);
        objective.push(score);
        let prev_best = best.as_ref().map(|(i, ..)| objective[i - 1]);
        let (improved, stop) = judge(prev_best, score, cfg.early_stop);
        if improved {
            best = Some((t, codes, a, b));
        }
        if stop {
            break;
        }
        warm = Some(basis);
    }
    let (best_iter, codes, a, b) = best.expect("at least one iteration");
    let q = ops.dequantized(quantizer, &codes, residual, device);
    let codes = codes.into_host();
    let result = LoftqResult {
        packed: PackedTensor::pack(&codes, cfg.quant),
        q,
        lora_a: dense::scaled(ops.to_tensor(a, device), factor_scale),
        lora_b: dense::scaled(ops.to_tensor(b, device), factor_scale),
        history,
        rel_err_quant,
        best_iter,
        host_factors: None,
    };
    crate::profile::mark(device, "loftq: results");
    let weighted = weighted.map(|_| WeightedErrors {
        history: objective,
        quant: weighted_quant,
    });
    Ok((result, weighted))
}
