//! `silu(gate)·up` as a Burn operation: the gate and the up projection apart, or side by
//! side in one tensor.

use burn::tensor::{DType, Shape, Tensor as BurnTensor};
use burn_cubecl::tensor::CubeTensor;

use super::kernel;
use super::ops::{empty_like, run};
use crate::cube::{empty, grid};

pub(super) fn silu_mul<const D: usize>(
    gate: &BurnTensor<D>,
    up: &BurnTensor<D>,
) -> Option<BurnTensor<D>> {
    let inter = gate.dims()[D - 1];
    let forward =
        move |[g, u]: &[CubeTensor; 2]| launch_silu_mul(g, u, empty_like(g), inter, [inter, 0]);
    let backward = move |[g, u]: &[CubeTensor; 2], dy: CubeTensor| {
        let (dg, du) = (empty_like(g), empty_like(g));
        launch_silu_mul_backward(g, u, dy, (&dg, Some(&du)), inter, [inter, 0]);
        [dg, du]
    };
    run([gate, up], forward, backward)
}

/// [`silu_mul`] of `gate_up` `[.., 2·inter]`, the gate's values then the up projection's in
/// each row: no copies to split them, and one gradient of the same layout.
pub(super) fn silu_mul_packed<const D: usize>(gate_up: &BurnTensor<D>) -> Option<BurnTensor<D>> {
    let inter = gate_up.dims()[D - 1] / 2;
    let forward = move |[x]: &[CubeTensor; 1]| {
        let mut shape = x.meta.shape().clone();
        shape[D - 1] = inter;
        launch_silu_mul(x, x, empty(x, shape, DType::F32), inter, [2 * inter, inter])
    };
    let backward = move |[x]: &[CubeTensor; 1], dy: CubeTensor| {
        let d = empty_like(x);
        launch_silu_mul_backward(x, x, dy, (&d, None), inter, [2 * inter, inter]);
        [d]
    };
    run([gate_up], forward, backward)
}

/// `silu(g)·u` into `out` `[.., inter]` (`[row, u_at]` as the kernel takes them).
fn launch_silu_mul(
    g: &CubeTensor,
    u: &CubeTensor,
    out: CubeTensor,
    inter: usize,
    [row, u_at]: [usize; 2],
) -> CubeTensor {
    let (count, dim) = grid(g, out.meta.shape().num_elements());
    kernel::silu_mul_kernel::launch(
        &out.client,
        count,
        dim,
        g.clone().into_tensor_arg(),
        u.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        inter,
        row,
        u_at,
    );
    out
}

/// The gradients of `silu(g)·u` for `dy`, into `dg` and `du`, or both into `dg` without `du`
/// (the packed form, where a one-value stand-in takes the kernel's unused second output).
fn launch_silu_mul_backward(
    g: &CubeTensor,
    u: &CubeTensor,
    dy: CubeTensor,
    (dg, du): (&CubeTensor, Option<&CubeTensor>),
    inter: usize,
    [row, u_at]: [usize; 2],
) {
    let one = du.is_none();
    let du = du
        .cloned()
        .unwrap_or_else(|| empty(dg, Shape::new([1]), DType::F32));
    let (count, dim) = grid(g, dy.meta.shape().num_elements());
    kernel::silu_mul_backward_kernel::launch(
        &dg.client,
        count,
        dim,
        g.clone().into_tensor_arg(),
        u.clone().into_tensor_arg(),
        dy.into_tensor_arg(),
        dg.clone().into_tensor_arg(),
        du.into_tensor_arg(),
        inter,
        row,
        u_at,
        one,
    );
}
