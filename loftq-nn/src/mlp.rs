//! The SiLU-gated MLP: `down_proj(silu(gate_proj(x)) · up_proj(x))`.

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::activation::silu;

use super::Output;
use super::QLinear;
use super::kernels;

/// `mlp.{gate_proj, up_proj, down_proj}`.
#[derive(Module, Debug)]
pub struct Mlp {
    /// `[intermediate, hidden]`.
    pub gate_proj: QLinear,
    /// `[intermediate, hidden]`.
    pub up_proj: QLinear,
    /// `[hidden, intermediate]`.
    pub down_proj: QLinear,
}

impl Mlp {
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_as(x, Output::Value)
    }

    /// [`forward`](Self::forward), `down_proj` for `output` (see [`Output::GradientOnly`]).
    pub(crate) fn forward_as(&self, x: Tensor<3>, output: Output) -> Tensor<3> {
        let gate = self.gate_proj.forward(x.clone());
        self.down_proj
            .forward_as(silu_mul(gate, self.up_proj.forward(x)), output)
    }
}

/// `silu(gate)·up`: one host kernel on the CPU back end, Burn's ops elsewhere.
pub(crate) fn silu_mul(gate: Tensor<3>, up: Tensor<3>) -> Tensor<3> {
    if let Some(y) = kernels::silu_mul(&gate, &up) {
        return y;
    }
    silu(gate) * up
}
