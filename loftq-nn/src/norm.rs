//! The normalizations: RMSNorm (Llama, Phi-3) and LayerNorm with a bias (Phi, BERT).

use burn::module::Module;
use burn::tensor::{Tensor, TensorData};

use super::kernels;

/// What a [`Norm`] subtracts before scaling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// RMSNorm: `x / √(mean(x²) + ε)`.
    Rms,
    /// LayerNorm: `(x − mean(x)) / √(var(x) + ε)` (the biased variance, as PyTorch).
    Layer,
}

/// A normalization of the last dimension, scaled by `weight` and shifted by `bias` if given.
#[derive(Module, Debug)]
pub struct Norm {
    /// `[hidden]` (frozen).
    pub weight: Tensor<1>,
    /// `[hidden]` (frozen); LayerNorm's shift.
    pub bias: Option<Tensor<1>>,
    /// ε.
    pub eps: f64,
    /// RMSNorm or LayerNorm.
    #[module(skip)]
    pub kind: NormKind,
}

impl Norm {
    /// An RMSNorm with `weight`.
    pub fn rms(weight: Tensor<1>, eps: f64) -> Self {
        Norm {
            weight,
            bias: None,
            eps,
            kind: NormKind::Rms,
        }
    }

    /// Normalizes the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if self.kind == NormKind::Rms && self.bias.is_none() {
            // The CPU's host kernel, else one CubeCL kernel on WGPU and CUDA.
            let fused = kernels::rms_norm(&x, &self.weight, self.eps)
                .or_else(|| loftq_core::fused::rms_norm(&x, &self.weight, self.eps));
            if let Some(y) = fused {
                return y;
            }
        }
        self.forward_generic(x)
    }

    /// [`Self::forward`] in Burn's generic ops (every back end but the CPU's for RMSNorm).
    pub(crate) fn forward_generic<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let x = match self.kind {
            NormKind::Rms => x,
            NormKind::Layer => x.clone() - mean_last(x),
        };
        let scale = mean_last(x.clone().square()).add_scalar(self.eps).sqrt();
        let y = x.div(scale) * self.weight.clone().unsqueeze();
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze(),
            None => y,
        }
    }
}

/// The sums of `x`'s last dimension times `scale`, `[.., 1]`, as a product with a column of
/// `scale` values: the backward pass of Burn's `sum_dim` and `mean_dim` fills a tensor of
/// ones as large as `x` and multiplies it in (three or four kernels on a GPU), a product's
/// is one product. The column is uploaded, not filled by a kernel.
pub(crate) fn sum_last<const D: usize>(x: Tensor<D>, scale: f32) -> Tensor<D> {
    let n = x.dims()[D - 1];
    let mut shape = [1; D];
    shape[D - 2] = n;
    let column = Tensor::from_data(TensorData::new(vec![scale; n], shape), &x.device());
    x.matmul(column)
}

/// The means of `x`'s last dimension, `[.., 1]` ([`sum_last`]).
fn mean_last<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let n = x.dims()[D - 1];
    sum_last(x, 1.0 / n as f32)
}
