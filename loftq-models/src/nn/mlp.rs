//! The SiLU-gated MLP: `down_proj(silu(gate_proj(x)) · up_proj(x))`.

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::activation::silu;

use super::QLinear;

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
        let gate = self.gate_proj.forward(x.clone());
        self.down_proj
            .forward(silu_mul(gate, self.up_proj.forward(x)))
    }

    /// [`forward`](Self::forward) whose output's value is not needed, only its gradient path:
    /// `down_proj`'s product is skipped (see [`QLinear::forward_for_gradient`]).
    pub fn forward_for_gradient(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = self.gate_proj.forward(x.clone());
        self.down_proj
            .forward_for_gradient(silu_mul(gate, self.up_proj.forward(x)))
    }
}

/// `silu(gate)·up`: one host kernel on the CPU back end, Burn's ops elsewhere.
pub(crate) fn silu_mul(gate: Tensor<3>, up: Tensor<3>) -> Tensor<3> {
    #[cfg(feature = "flex")]
    if let Some(y) = super::cpu_fused::silu_mul(&gate, &up) {
        return y;
    }
    silu(gate) * up
}
