//! The MLP's `silu(gate)·up` as one CubeCL kernel (WGPU, CUDA), and its backward pass as one
//! more.
//!
//! Burn's ops take eight kernels for it forward (its `sigmoid` alone is six: negate, exp, add
//! one, log, negate, exp) and as many backward, each a pass over the `[tokens, intermediate]`
//! activations; a GPU's training step is bound by such launches. On the autodiff device the
//! kernel is recorded as one operation whose backward kernel writes both gradients.
//!
//! [`silu_mul`] exists in every build and returns `None` where the kernel does not apply (no
//! CubeCL back end compiled in, tensors of another back end, Burn's fusion on with `tuned`, or
//! inputs that are not `f32`): the caller then takes Burn's ops.

use burn::tensor::Tensor;

/// `silu(gate)·up` element by element, `silu(x) = x / (1 + e^{-x})`, in one kernel (and one
/// for the backward pass); `None` where the kernel does not apply (see the module
/// documentation) or the shapes differ.
pub fn silu_mul<const D: usize>(gate: &Tensor<D>, up: &Tensor<D>) -> Option<Tensor<D>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        (gate.dims() == up.dims())
            .then(|| kernel::silu_mul(gate, up))
            .flatten()
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (gate, up);
        None
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod kernel {
    use std::any::Any;

    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::{Autodiff, Cube};
    use burn::tensor::{DType, Tensor as BurnTensor};
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;
    use burn_cubecl::cubecl::{CubeDim, calculate_cube_count_elemwise};
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::ops::numeric::empty_device_dtype;
    use burn_cubecl::tensor::CubeTensor;

    /// One thread per value: `g·σ(g)·u`.
    #[cube(launch)]
    fn forward_kernel(g: &Tensor<f32>, u: &Tensor<f32>, out: &mut Tensor<f32>) {
        let i = ABSOLUTE_POS;
        if i >= out.len() {
            terminate!();
        }
        let x = g[i];
        let s = 1.0 / (1.0 + (-x).exp());
        out[i] = x * s * u[i];
    }

    /// One thread per value: `∂/∂u = dy·g·σ(g)`, `∂/∂g = dy·u·σ(g)·(1 + g·(1 − σ(g)))`.
    #[cube(launch)]
    fn backward_kernel(
        g: &Tensor<f32>,
        u: &Tensor<f32>,
        dy: &Tensor<f32>,
        dg: &mut Tensor<f32>,
        du: &mut Tensor<f32>,
    ) {
        let i = ABSOLUTE_POS;
        if i >= dg.len() {
            terminate!();
        }
        let x = g[i];
        let s = 1.0 / (1.0 + (-x).exp());
        du[i] = dy[i] * x * s;
        dg[i] = dy[i] * u[i] * s * (1.0 + x * (1.0 - s));
    }

    /// An empty `f32` tensor shaped as `like`, on its device.
    fn empty_like(like: &CubeTensor) -> CubeTensor {
        empty_device_dtype(
            like.client.clone(),
            like.device.clone(),
            like.meta.shape().clone(),
            DType::F32,
        )
    }

    fn launch_forward(g: &CubeTensor, u: &CubeTensor) -> CubeTensor {
        let out = empty_like(g);
        let n = out.meta.shape().num_elements();
        let cube_dim = CubeDim::new(&g.client, n);
        let cube_count = calculate_cube_count_elemwise(&g.client, n, cube_dim);
        forward_kernel::launch(
            &out.client,
            cube_count,
            cube_dim,
            g.clone().into_tensor_arg(),
            u.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
        );
        out
    }

    fn launch_backward(g: &CubeTensor, u: &CubeTensor, dy: CubeTensor) -> [CubeTensor; 2] {
        let dy = into_contiguous(dy);
        let (dg, du) = (empty_like(g), empty_like(g));
        let n = dg.meta.shape().num_elements();
        let cube_dim = CubeDim::new(&g.client, n);
        let cube_count = calculate_cube_count_elemwise(&g.client, n, cube_dim);
        backward_kernel::launch(
            &dg.client,
            cube_count,
            cube_dim,
            g.clone().into_tensor_arg(),
            u.clone().into_tensor_arg(),
            dy.into_tensor_arg(),
            dg.clone().into_tensor_arg(),
            du.clone().into_tensor_arg(),
        );
        [dg, du]
    }

    /// The recorded operation: its state is the two inputs.
    #[derive(Debug)]
    struct SiluMulBackward;

    impl Backward<Cube, 2> for SiluMulBackward {
        type State = [CubeTensor; 2];

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let dy = as_cube(grads.consume::<Cube>(&ops.node)).expect("recorded on Cube tensors");
            let [g, u] = &ops.state;
            let out = launch_backward(g, u, dy);
            for (parent, grad) in ops.parents.iter().zip(out) {
                if let Some(node) = parent {
                    grads.register::<Cube>(node.id, from_cube(grad).expect("the same type"));
                }
            }
        }
    }

    /// The kernel on plain `Cube` tensors, or recorded on the autodiff device; `None` on any
    /// other back end or dtype.
    pub(super) fn silu_mul<const D: usize>(
        gate: &BurnTensor<D>,
        up: &BurnTensor<D>,
    ) -> Option<BurnTensor<D>> {
        let f32s = |a: &CubeTensor, b: &CubeTensor| a.dtype == DType::F32 && b.dtype == DType::F32;
        if let (Ok(g), Ok(u)) = (
            gate.clone().try_into_primitive::<Cube>(),
            up.clone().try_into_primitive::<Cube>(),
        ) {
            let (g, u) = (into_contiguous(as_cube(g)?), into_contiguous(as_cube(u)?));
            if !f32s(&g, &u) {
                return None;
            }
            return Some(BurnTensor::from_primitive::<Cube>(from_cube(
                launch_forward(&g, &u),
            )?));
        }
        let ga = gate.clone().try_into_primitive::<Autodiff<Cube>>().ok()?;
        let ua = up.clone().try_into_primitive::<Autodiff<Cube>>().ok()?;
        let g = into_contiguous(as_cube(ga.primitive().clone())?);
        let u = into_contiguous(as_cube(ua.primitive().clone())?);
        if !f32s(&g, &u) {
            return None;
        }
        let y = from_cube(launch_forward(&g, &u))?;
        let tensor = match SiluMulBackward
            .prepare::<NoCheckpointing>([ga.node(), ua.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish([g, u], y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Some(BurnTensor::from_primitive::<Autodiff<Cube>>(tensor))
    }

    /// `p` as a [`CubeTensor`] when Burn's `Cube` back end is the unfused one.
    fn as_cube<P: Any>(p: P) -> Option<CubeTensor> {
        let p: Box<dyn Any> = Box::new(p);
        p.downcast::<CubeTensor>().ok().map(|t| *t)
    }

    /// The inverse of [`as_cube`]: a [`CubeTensor`] as the primitive type `P` it is.
    fn from_cube<P: Any>(t: CubeTensor) -> Option<P> {
        let t: Box<dyn Any> = Box::new(t);
        t.downcast::<P>().ok().map(|p| *p)
    }
}
