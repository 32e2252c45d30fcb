//! One API for the ways to start a LoRA adapter on a (quantized) base weight.

use burn::tensor::{Device, Tensor};

use crate::dense::frobenius;
use crate::loftq::{LoftqConfig, LoftqError};
use crate::lora::InitScaling;
use crate::lowrank::{Gaussian, SvdMethod, check_rank, truncated_svd};
use crate::quant::{PackedTensor, QuantConfig, Quantizer};
use crate::run::loftq;

/// How to initialize the adapter (and what becomes the frozen base).
#[derive(Clone, Debug, PartialEq)]
pub enum LoraInit {
    /// QLoRA: base `Q(W)`, `A` uniform in `±1/√in` (PEFT's Kaiming default), `B = 0`.
    Zeros {
        /// The base quantizer.
        quant: QuantConfig,
        /// Seed of `A`.
        seed: u64,
    },
    /// LoftQ: alternating quantization and low-rank fitting ([`loftq`]).
    Loftq(LoftqConfig),
    /// PiSSA: the `r` principal components of `W` into the adapter, the rest as the frozen,
    /// unquantized base.
    Pissa {
        /// SVD method.
        svd: SvdMethod,
    },
    /// QPiSSA: as PiSSA, with the residual base quantized.
    QPissa {
        /// The base quantizer.
        quant: QuantConfig,
        /// SVD method.
        svd: SvdMethod,
    },
}

/// A start method by name, without its settings: the kind of a [`LoraInit`]
/// ([`LoraInit::method`]), as `plan.json` and `--method` spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum InitMethod {
    /// Alternating quantization and low-rank fit (LoftQ).
    Loftq,
    /// Plain quantization, `B = 0` (QLoRA).
    Qlora,
    /// Principal components in the adapter, the residual as a dense base (PiSSA).
    Pissa,
    /// PiSSA with the residual quantized.
    Qpissa,
}

impl LoraInit {
    /// The method, without its settings.
    pub fn method(&self) -> InitMethod {
        match self {
            Self::Zeros { .. } => InitMethod::Qlora,
            Self::Loftq(_) => InitMethod::Loftq,
            Self::Pissa { .. } => InitMethod::Pissa,
            Self::QPissa { .. } => InitMethod::Qpissa,
        }
    }
}

/// The frozen base of an initialized layer.
#[derive(Clone, Debug)]
pub enum Base {
    /// Unquantized (PiSSA's residual).
    Dense(Tensor<2>),
    /// Quantized: packed codes and the dequantized matrix.
    Quantized {
        /// Host storage.
        packed: PackedTensor,
        /// Dequantized, on the device.
        dequantized: Tensor<2>,
    },
}

impl Base {
    /// The base as a dense matrix.
    pub fn dense(&self) -> &Tensor<2> {
        match self {
            Base::Dense(t) => t,
            Base::Quantized { dequantized, .. } => dequantized,
        }
    }
}

/// Base plus adapter: the forward pass is `base·x + scale·B·A·x`.
#[derive(Clone, Debug)]
pub struct LoraStart {
    /// The frozen base `[out, in]`.
    pub base: Base,
    /// `lora_A` `[r, in]`.
    pub lora_a: Tensor<2>,
    /// `lora_B` `[out, r]`.
    pub lora_b: Tensor<2>,
    /// `‖W − base − scale·B·A‖ / ‖W‖`.
    pub rel_err: f32,
}

/// Initializes an adapter of rank `rank` and scale `scale` on `w` `[out, in]`.
///
/// `rank` and `scale` are ignored by [`LoraInit::Loftq`], whose configuration carries them.
/// PiSSA and QPiSSA divide both factors by `√scale`, so that `base + scale·B·A ≈ W`.
pub fn init_lora(
    w: &Tensor<2>,
    method: &LoraInit,
    rank: usize,
    scale: f32,
) -> Result<LoraStart, LoftqError> {
    let [out, inp] = w.dims();
    let device = w.device();
    let norm = frobenius(w).max(f32::MIN_POSITIVE);
    let (base, a, b, s) = match method {
        LoraInit::Loftq(cfg) => {
            let r = loftq(w, cfg)?;
            // The forward pass always scales by s; only the Peft convention ignores it at init.
            let s = cfg.lora.scale();
            let base = Base::Quantized {
                packed: r.packed,
                dequantized: r.q,
            };
            (base, r.lora_a, r.lora_b, s)
        }
        LoraInit::Zeros { quant, seed } => {
            let quantizer = Quantizer::new(*quant)?;
            let (codes, q) = quantizer.quantize_dequantize(w)?;
            let (a, b) = qlora_factors([out, inp], rank, *seed, &device);
            let packed = PackedTensor::pack(&codes.into_host(), *quant);
            (
                Base::Quantized {
                    packed,
                    dequantized: q,
                },
                a,
                b,
                scale,
            )
        }
        LoraInit::Pissa { svd } | LoraInit::QPissa { svd, .. } => {
            let lr = truncated_svd(w, rank, svd, None)?;
            let (b, a) = lr.balanced_factors();
            let k = 1.0 / scale.sqrt();
            let (a, b) = (a.mul_scalar(k), b.mul_scalar(k));
            let residual = w.clone() - crate::matmul(&b, &a).mul_scalar(scale);
            let base = match method {
                LoraInit::QPissa { quant, .. } => {
                    let quantizer = Quantizer::new(*quant)?;
                    let (codes, q) = quantizer.quantize_dequantize(&residual)?;
                    Base::Quantized {
                        packed: PackedTensor::pack(&codes.into_host(), *quant),
                        dequantized: q,
                    }
                }
                _ => Base::Dense(residual),
            };
            (base, a, b, scale)
        }
    };
    let recon = base.dense().clone() + crate::matmul(&b, &a).mul_scalar(s);
    let rel_err = frobenius(&(w.clone() - recon)) / norm;
    Ok(LoraStart {
        base,
        lora_a: a,
        lora_b: b,
        rel_err,
    })
}

/// QLoRA's adapter for an `[out, in]` layer: `A` uniform in `±1/√in` (PEFT's Kaiming
/// default) from `seed`, `B = 0`. Returns `(A, B)`.
pub fn qlora_factors(
    [out, inp]: [usize; 2],
    rank: usize,
    seed: u64,
    device: &Device,
) -> (Tensor<2>, Tensor<2>) {
    let bound = 1.0 / (inp as f64).sqrt();
    let mut g = Gaussian::new(seed);
    let a: Vec<f32> = (0..rank * inp)
        .map(|_| ((2.0 * g.uniform() - 1.0) * bound) as f32)
        .collect();
    let a = crate::transfers::upload(a, [rank, inp], device);
    (a, Tensor::zeros([out, rank], device))
}

/// An adapter fitted to a fixed base by [`fit_adapter`].
#[derive(Clone, Debug)]
pub struct AdapterFit {
    /// `lora_A` `[r, in]`.
    pub lora_a: Tensor<2>,
    /// `lora_B` `[out, r]`.
    pub lora_b: Tensor<2>,
    /// `‖W − Q‖ / ‖W‖`: the base alone.
    pub rel_err_base: f32,
    /// `‖W − Q − s·B·A‖ / ‖W‖`.
    pub rel_err: f32,
}

/// The best rank-`rank` adapter for the fixed base `q` of `w` (both `[out, in]`): the
/// truncated SVD of `W − Q`, optimal with [`SvdMethod::Exact`] (Eckart–Young). This is one
/// LoftQ step without re-quantizing, for a base quantized elsewhere (PEFT's
/// `replace_lora_weights_loftq`). `scale` is the forward pass's `s`; `scaling` says whether
/// the factors absorb it ([`InitScaling::Exact`]) or ignore it as PEFT does.
///
/// # Errors
/// A rank that does not fit, shapes that differ, a failed SVD.
pub fn fit_adapter(
    w: &Tensor<2>,
    q: &Tensor<2>,
    rank: usize,
    svd: &SvdMethod,
    scale: f32,
    scaling: InitScaling,
) -> Result<AdapterFit, LoftqError> {
    if w.dims() != q.dims() {
        return Err(LoftqError::Config(format!(
            "the base is {:?}, the weight {:?}",
            q.dims(),
            w.dims()
        )));
    }
    check_rank(w.dims(), rank)?;
    let norm = frobenius(w).max(f32::MIN_POSITIVE);
    let residual = w.clone() - q.clone();
    let rel_err_base = frobenius(&residual) / norm;
    let lr = truncated_svd(&residual, rank, svd, None)?;
    let (b, a) = lr.balanced_factors();
    let factor_scale = scaling.scales(scale).0;
    let (a, b) = (a.mul_scalar(factor_scale), b.mul_scalar(factor_scale));
    let fit = residual - crate::matmul(&b, &a).mul_scalar(scale);
    Ok(AdapterFit {
        lora_a: a,
        lora_b: b,
        rel_err_base,
        rel_err: frobenius(&fit) / norm,
    })
}
