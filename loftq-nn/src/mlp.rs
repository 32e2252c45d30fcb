//! The MLP: SiLU-gated, `down_proj(silu(gate_proj(x)) · up_proj(x))`, or Phi's
//! `fc2(gelu_new(fc1(x)))`.

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::activation::{gelu, silu};

use super::Output;
use super::QLinear;
use super::kernels;
use loftq_formats::config::Activation;

/// `mlp.{gate_proj, up_proj, down_proj}`, Phi-3's `mlp.{gate_up_proj, down_proj}` or Phi's
/// `mlp.{fc1, fc2}`.
#[derive(Module, Debug)]
pub struct Mlp {
    /// The input projections: `gate_proj` and `up_proj`, `[intermediate, hidden]` each; one
    /// `gate_up_proj` with their rows stacked in that order; or Phi's `fc1`.
    pub gate_up: Vec<QLinear>,
    /// The output projection `[hidden, intermediate]` (Phi's `fc2`).
    pub down_proj: QLinear,
    /// What joins the input projections.
    #[module(skip)]
    pub act: Activation,
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

    /// `silu(gate)·up` (or `gelu_new(fc1)`) for `x [batch, seq, hidden]`: down_proj's input.
    pub fn activation(&self, x: Tensor<3>) -> Tensor<3> {
        if self.act != Activation::SiluGated {
            let [fc1] = self.gate_up.as_slice() else {
                unreachable!("{} fc1 projections", self.gate_up.len())
            };
            return activate(self.act, fc1.forward(x));
        }
        // On WGPU and CUDA, gate and up side by side in one product where they can be (one
        // `gate_up_proj`, or both merged over packed codebook bases), read there by one kernel.
        let stacked = match self.gate_up.as_slice() {
            [gate_up] => Some(gate_up.forward(x.clone())),
            layers if loftq_core::fused::applies(&x) => QLinear::forward_group(layers, &x),
            _ => None,
        };
        if let Some(y) = stacked
            .as_ref()
            .and_then(loftq_core::fused::silu_mul_packed)
        {
            return y;
        }
        let inter = self.down_proj.shape()[1];
        let [gate, up] = match (stacked, self.gate_up.as_slice()) {
            (Some(y), _) => [y.clone().narrow(2, 0, inter), y.narrow(2, inter, inter)],
            (None, [gate, up]) => [gate.forward(x.clone()), up.forward(x)],
            (None, other) => unreachable!("{} gate/up projections", other.len()),
        };
        silu_mul(gate, up)
    }
}

/// `silu(gate)·up`: one host kernel on the CPU back end, one CubeCL kernel on WGPU and CUDA,
/// Burn's ops elsewhere.
pub(crate) fn silu_mul(gate: Tensor<3>, up: Tensor<3>) -> Tensor<3> {
    if let Some(y) = kernels::silu_mul(&gate, &up) {
        return y;
    }
    if let Some(y) = loftq_core::fused::silu_mul(&gate, &up) {
        return y;
    }
    silu(gate) * up
}

/// A single-input activation of `x`: GELU, exact or in its tanh form.
///
/// # Panics
/// For the gated SiLU, which takes two inputs.
pub(crate) fn activate(act: Activation, x: Tensor<3>) -> Tensor<3> {
    match act {
        Activation::GeluTanh => gelu_tanh(x),
        Activation::Gelu => gelu(x),
        Activation::Tanh => x.tanh(),
        Activation::SiluGated => unreachable!("the gated SiLU takes two inputs"),
    }
}

/// GELU's tanh form, transformers' `gelu_new`: `x/2 · (1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
/// The cube is a product: a float power of a negative base is NaN on some back ends.
pub(crate) fn gelu_tanh(x: Tensor<3>) -> Tensor<3> {
    const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
    let cube = x.clone() * x.clone() * x.clone();
    let inner = (x.clone() + cube.mul_scalar(0.044715)).mul_scalar(SQRT_2_OVER_PI);
    (x * (inner.tanh() + 1.0)).mul_scalar(0.5)
}
