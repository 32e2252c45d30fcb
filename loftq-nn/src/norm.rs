//! The normalizations: RMSNorm (Llama, Phi-3) and LayerNorm with a bias (Phi, BERT).

use burn::module::Module;
use burn::tensor::Tensor;

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
        if self.kind == NormKind::Rms
            && self.bias.is_none()
            && let Some(y) = kernels::rms_norm(&x, &self.weight, self.eps)
        {
            return y;
        }
        self.forward_generic(x)
    }

    /// [`Self::forward`] in Burn's generic ops (every back end but the CPU's for RMSNorm).
    pub(crate) fn forward_generic<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let x = match self.kind {
            NormKind::Rms => x,
            NormKind::Layer => x.clone() - x.mean_dim(D - 1),
        };
        let scale = x
            .clone()
            .square()
            .mean_dim(D - 1)
            .add_scalar(self.eps)
            .sqrt();
        let y = x.div(scale) * self.weight.clone().unsqueeze();
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze(),
            None => y,
        }
    }
}
