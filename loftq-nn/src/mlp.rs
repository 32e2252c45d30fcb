//! The SiLU-gated MLP: `down_proj(silu(gate_proj(x)) · up_proj(x))`.

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::activation::silu;

use super::Output;
use super::QLinear;
use super::kernels;

/// `mlp.{gate_proj, up_proj, down_proj}`, or Phi-3's `mlp.{gate_up_proj, down_proj}`.
#[derive(Module, Debug)]
pub struct Mlp {
    /// `gate_proj` and `up_proj`, `[intermediate, hidden]` each; or one `gate_up_proj` with
    /// their rows stacked in that order.
    pub gate_up: Vec<QLinear>,
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
        self.down_proj.forward_as(self.activation(x), output)
    }

    /// `silu(gate)·up` for `x [batch, seq, hidden]`: down_proj's input.
    pub fn activation(&self, x: Tensor<3>) -> Tensor<3> {
        let [gate, up] = match self.gate_up.as_slice() {
            [gate, up] => [gate.forward(x.clone()), up.forward(x)],
            [gate_up] => {
                let inter = self.down_proj.shape()[1];
                let y = gate_up.forward(x);
                [y.clone().narrow(2, 0, inter), y.narrow(2, inter, inter)]
            }
            other => unreachable!("{} gate/up projections", other.len()),
        };
        silu_mul(gate, up)
    }
}

/// `silu(gate)·up`: one host kernel on the CPU back end, Burn's ops elsewhere.
pub(crate) fn silu_mul(gate: Tensor<3>, up: Tensor<3>) -> Tensor<3> {
    if let Some(y) = kernels::silu_mul(&gate, &up) {
        return y;
    }
    silu(gate) * up
}
