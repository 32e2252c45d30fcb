//! Three of the model's element-wise stretches as single CubeCL kernels (WGPU, CUDA), each
//! with a one-kernel backward pass: the MLP's `silu(gate)·up`, RMSNorm with a frozen weight,
//! and the rotary embedding.
//!
//! In Burn's ops `silu(gate)·up` is eight kernels forward (its `sigmoid` alone is six:
//! negate, exp, add one, log, negate, exp) and fifteen backward, RMSNorm six forward and more
//! backward, each a pass over the activations; a GPU's training step is bound by such
//! launches. On the autodiff device each kernel is recorded as one operation whose backward
//! kernel writes the inputs' gradients. The formulas are the CPU host kernels'.
//!
//! Each function exists in every build and returns `None` where its kernel does not apply
//! (no CubeCL back end compiled in, tensors of another back end, Burn's fusion on with
//! `tuned`, inputs that are not `f32`, a weight that needs a gradient): the caller then takes
//! Burn's ops.

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

/// RMSNorm of `x`'s last dimension scaled by the frozen `weight`,
/// `x · w / √(mean(x²) + ε)`, in one kernel (one thread a row; one more for the backward
/// pass); `None` where the kernel does not apply or the widths differ.
pub fn rms_norm<const D: usize>(x: &Tensor<D>, weight: &Tensor<1>, eps: f64) -> Option<Tensor<D>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        (x.dims()[D - 1] == weight.dims()[0])
            .then(|| kernel::rms_norm(x, weight, eps as f32))
            .flatten()
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (x, weight, eps);
        None
    }
}

/// Rotary embedding of `x` `[batch, seq, heads, width]` (contiguous) with the tables `cos`
/// and `swapped_sin` `[seq, d]`, `d ≤ width` even: on the first `d` values of each head
/// `x·cos + x'·swapped_sin`, `x'` the head's first `d` values with their halves swapped, the
/// rest passed through; one kernel, and one for the backward pass. `None` where the kernel
/// does not apply or the shapes do not fit.
pub fn rotary(x: &Tensor<4>, cos: &Tensor<2>, swapped_sin: &Tensor<2>) -> Option<Tensor<4>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        let [_, s, _, width] = x.dims();
        let [ts, d] = cos.dims();
        let fits = ts == s && swapped_sin.dims() == [ts, d] && d <= width && d % 2 == 0;
        fits.then(|| kernel::rotary(x, cos, swapped_sin)).flatten()
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (x, cos, swapped_sin);
        None
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod kernel {
    use std::any::Any;
    use std::sync::Arc;

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
    fn silu_mul_kernel(g: &Tensor<f32>, u: &Tensor<f32>, out: &mut Tensor<f32>) {
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
    fn silu_mul_backward_kernel(
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

    /// One thread per row of `n` values: `r = 1/√(Σx²/n + ε)`, `y = x·r·w`.
    #[cube(launch)]
    fn rms_norm_kernel(x: &Tensor<f32>, w: &Tensor<f32>, out: &mut Tensor<f32>, eps: f32) {
        let n = w.len();
        let row = ABSOLUTE_POS;
        if row * n >= x.len() {
            terminate!();
        }
        let at = row * n;
        let mut ss = 0.0;
        for j in 0..n {
            let v = x[at + j];
            ss += v * v;
        }
        let r = 1.0 / (ss / f32::cast_from(n) + eps).sqrt();
        for j in 0..n {
            out[at + j] = x[at + j] * r * w[j];
        }
    }

    /// One thread per row: `dx = r·(w·dy − x·r²·Σ(x·dy·w)/n)`.
    #[cube(launch)]
    fn rms_norm_backward_kernel(
        x: &Tensor<f32>,
        w: &Tensor<f32>,
        dy: &Tensor<f32>,
        dx: &mut Tensor<f32>,
        eps: f32,
    ) {
        let n = w.len();
        let row = ABSOLUTE_POS;
        if row * n >= x.len() {
            terminate!();
        }
        let at = row * n;
        let mut ss = 0.0;
        let mut dot = 0.0;
        for j in 0..n {
            let v = x[at + j];
            ss += v * v;
            dot += v * dy[at + j] * w[j];
        }
        let r = 1.0 / (ss / f32::cast_from(n) + eps).sqrt();
        let c = dot * r * r / f32::cast_from(n);
        for j in 0..n {
            dx[at + j] = r * (w[j] * dy[at + j] - x[at + j] * c);
        }
    }

    /// One thread per value of `x` `[b, s, h, width]`: on a head's first `d` values
    /// `x·cos + x[partner]·ssin` (the partner the same place in the other half), the rest
    /// copied. Backward (`back`): `dx = dy·cos + dy[partner]·ssin[partner]`, the rotation's
    /// transpose.
    #[cube(launch)]
    fn rotary_kernel(
        x: &Tensor<f32>,
        cos: &Tensor<f32>,
        ssin: &Tensor<f32>,
        out: &mut Tensor<f32>,
        heads_width: usize,
        width: usize,
        #[comptime] back: bool,
    ) {
        let i = ABSOLUTE_POS;
        if i >= out.len() {
            terminate!();
        }
        let d = cos.shape(1);
        let seq = cos.shape(0);
        let j = i % width;
        if j < d {
            let half = d / 2;
            let partner = if j < half { j + half } else { j - half };
            let pos = (i / heads_width) % seq;
            let other = i - j + partner;
            let (c, t) = (pos * d + j, pos * d + partner);
            if comptime!(back) {
                out[i] = x[i] * cos[c] + x[other] * ssin[t];
            } else {
                out[i] = x[i] * cos[c] + x[other] * ssin[c];
            }
        } else {
            out[i] = x[i];
        }
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

    /// The launch grid for `n` threads.
    fn grid(t: &CubeTensor, n: usize) -> (CubeCount, CubeDim) {
        let dim = CubeDim::new(&t.client, n.max(1));
        (calculate_cube_count_elemwise(&t.client, n.max(1), dim), dim)
    }

    /// Computes a recorded operation's input gradients from its inputs and output gradient.
    type BackwardFn<const N: usize> =
        Arc<dyn Fn(&[CubeTensor; N], CubeTensor) -> [CubeTensor; N] + Send + Sync>;

    /// A recorded operation's state: its inputs, and its backward kernel.
    #[derive(Clone)]
    struct Recorded<const N: usize> {
        inputs: [CubeTensor; N],
        backward: BackwardFn<N>,
    }

    impl<const N: usize> std::fmt::Debug for Recorded<N> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Recorded").finish_non_exhaustive()
        }
    }

    #[derive(Debug)]
    struct KernelBackward<const N: usize>;

    impl<const N: usize> Backward<Cube, N> for KernelBackward<N> {
        type State = Recorded<N>;

        fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
            let dy = as_cube(grads.consume::<Cube>(&ops.node)).expect("recorded on Cube tensors");
            let state = &ops.state;
            let out = (state.backward)(&state.inputs, into_contiguous(dy));
            for (parent, grad) in ops.parents.iter().zip(out) {
                if let Some(node) = parent {
                    grads.register::<Cube>(node.id, from_cube(grad).expect("the same type"));
                }
            }
        }
    }

    /// Runs `forward` on the `f32` values of `inputs`, plain `Cube` tensors or all on the
    /// autodiff device, where it is recorded with `backward`; `None` on any other back end or
    /// dtype.
    fn run<const N: usize, const D: usize>(
        inputs: [&BurnTensor<D>; N],
        forward: impl FnOnce(&[CubeTensor; N]) -> CubeTensor,
        backward: BackwardFn<N>,
    ) -> Option<BurnTensor<D>> {
        let f32s = |ts: &[CubeTensor; N]| ts.iter().all(|t| t.dtype == DType::F32);
        let plain: Option<Vec<CubeTensor>> = (inputs.iter())
            .map(|t| {
                (*t).clone()
                    .try_into_primitive::<Cube>()
                    .ok()
                    .and_then(as_cube)
            })
            .collect();
        if let Some(plain) = plain {
            let plain: [CubeTensor; N] = plain
                .into_iter()
                .map(into_contiguous)
                .collect::<Vec<_>>()
                .try_into()
                .ok()?;
            if !f32s(&plain) {
                return None;
            }
            return Some(BurnTensor::from_primitive::<Cube>(from_cube(forward(
                &plain,
            ))?));
        }
        let mut ads = Vec::with_capacity(N);
        for t in inputs {
            ads.push(t.clone().try_into_primitive::<Autodiff<Cube>>().ok()?);
        }
        let values: Option<Vec<CubeTensor>> = (ads.iter())
            .map(|a| as_cube(a.primitive().clone()).map(into_contiguous))
            .collect();
        let values: [CubeTensor; N] = values?.try_into().ok()?;
        if !f32s(&values) {
            return None;
        }
        let y = from_cube(forward(&values))?;
        let nodes = std::array::from_fn(|i| ads[i].node());
        let tensor = match KernelBackward::<N>
            .prepare::<NoCheckpointing>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                Recorded {
                    inputs: values,
                    backward,
                },
                y,
            ),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Some(BurnTensor::from_primitive::<Autodiff<Cube>>(tensor))
    }

    pub(super) fn silu_mul<const D: usize>(
        gate: &BurnTensor<D>,
        up: &BurnTensor<D>,
    ) -> Option<BurnTensor<D>> {
        let forward = |[g, u]: &[CubeTensor; 2]| {
            let out = empty_like(g);
            let (count, dim) = grid(g, out.meta.shape().num_elements());
            silu_mul_kernel::launch(
                &out.client,
                count,
                dim,
                g.clone().into_tensor_arg(),
                u.clone().into_tensor_arg(),
                out.clone().into_tensor_arg(),
            );
            out
        };
        let backward: BackwardFn<2> = Arc::new(|[g, u]: &[CubeTensor; 2], dy: CubeTensor| {
            let (dg, du) = (empty_like(g), empty_like(g));
            let (count, dim) = grid(g, dg.meta.shape().num_elements());
            silu_mul_backward_kernel::launch(
                &dg.client,
                count,
                dim,
                g.clone().into_tensor_arg(),
                u.clone().into_tensor_arg(),
                dy.into_tensor_arg(),
                dg.clone().into_tensor_arg(),
                du.clone().into_tensor_arg(),
            );
            [dg, du]
        });
        run([gate, up], forward, backward)
    }

    pub(super) fn rms_norm<const D: usize>(
        x: &BurnTensor<D>,
        weight: &BurnTensor<1>,
        eps: f32,
    ) -> Option<BurnTensor<D>> {
        let w = frozen(weight)?;
        let rows = x.dims()[..D - 1].iter().product::<usize>();
        let wf = w.clone();
        let forward = move |[x]: &[CubeTensor; 1]| {
            let out = empty_like(x);
            let (count, dim) = grid(x, rows);
            rms_norm_kernel::launch(
                &out.client,
                count,
                dim,
                x.clone().into_tensor_arg(),
                wf.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                eps,
            );
            out
        };
        let backward: BackwardFn<1> = Arc::new(move |[x]: &[CubeTensor; 1], dy: CubeTensor| {
            let dx = empty_like(x);
            let (count, dim) = grid(x, rows);
            rms_norm_backward_kernel::launch(
                &dx.client,
                count,
                dim,
                x.clone().into_tensor_arg(),
                w.clone().into_tensor_arg(),
                dy.into_tensor_arg(),
                dx.clone().into_tensor_arg(),
                eps,
            );
            [dx]
        });
        run([x], forward, backward)
    }

    pub(super) fn rotary(
        x: &BurnTensor<4>,
        cos: &BurnTensor<2>,
        swapped_sin: &BurnTensor<2>,
    ) -> Option<BurnTensor<4>> {
        let (c, t) = (frozen(cos)?, frozen(swapped_sin)?);
        let [_, _, h, width] = x.dims();
        let launch = move |x: &CubeTensor, c: &CubeTensor, t: &CubeTensor, back: bool| {
            let out = empty_like(x);
            let (count, dim) = grid(x, out.meta.shape().num_elements());
            rotary_kernel::launch(
                &out.client,
                count,
                dim,
                x.clone().into_tensor_arg(),
                c.clone().into_tensor_arg(),
                t.clone().into_tensor_arg(),
                out.clone().into_tensor_arg(),
                h * width,
                width,
                back,
            );
            out
        };
        let (cf, tf) = (c.clone(), t.clone());
        let forward = move |[x]: &[CubeTensor; 1]| launch(x, &cf, &tf, false);
        let backward: BackwardFn<1> =
            Arc::new(move |_: &[CubeTensor; 1], dy: CubeTensor| [launch(&dy, &c, &t, true)]);
        run([x], forward, backward)
    }

    /// A constant's `f32` values when no gradient flows to it (plain, or untracked on the
    /// autodiff device).
    fn frozen<const D: usize>(w: &BurnTensor<D>) -> Option<CubeTensor> {
        let t = match w.clone().try_into_primitive::<Cube>() {
            Ok(p) => as_cube(p)?,
            Err(_) => {
                let a = w.clone().try_into_primitive::<Autodiff<Cube>>().ok()?;
                if a.is_tracked() {
                    return None;
                }
                as_cube(a.primitive().clone())?
            }
        };
        (t.dtype == DType::F32).then(|| into_contiguous(t))
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
