//! The kernels of [`super::kernel`] as Burn operations: on plain `Cube` tensors, or recorded
//! on the autodiff device with their backward kernel.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Cube};
use burn::tensor::{BackendPrimitive, DType, Float, Tensor as BurnTensor};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::kernel::matmul::{MatmulStrategy, matmul};
use burn_cubecl::ops::permute;
use burn_cubecl::tensor::CubeTensor;

use super::kernel;
use crate::cube::{as_cube, empty, from_cube, grid, plain};

/// An empty `f32` tensor shaped as `like`, on its device.
pub(super) fn empty_like(like: &CubeTensor) -> CubeTensor {
    empty(like, like.meta.shape().clone(), DType::F32)
}

/// Computes a recorded operation's input gradients from what its forward pass saved and its
/// output gradient: those of the inputs that need one (`needed`), `None` for the others.
pub(super) type BackwardFn<const N: usize> =
    Arc<dyn Fn(&[CubeTensor], CubeTensor, [bool; N]) -> [Option<CubeTensor>; N] + Send + Sync>;

/// A recorded operation's state: what its forward pass saved, and its backward kernels.
#[derive(Clone)]
struct Recorded<const N: usize> {
    saved: Vec<CubeTensor>,
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
        let needed = std::array::from_fn(|i| ops.parents[i].is_some());
        let out = (state.backward)(&state.saved, into_contiguous(dy), needed);
        for (parent, grad) in ops.parents.iter().zip(out) {
            if let (Some(node), Some(grad)) = (parent, grad) {
                grads.register::<Cube>(node.id, from_cube(grad).expect("the same type"));
            }
        }
    }
}

/// Runs `forward` on the `f32` values of `inputs`, plain `Cube` tensors or all on the
/// autodiff device, where it is recorded with `backward`, which gets the inputs; `None` on
/// any other back end or dtype.
pub(super) fn run<const N: usize, const D: usize>(
    inputs: [&BurnTensor<D>; N],
    forward: impl FnOnce(&[CubeTensor; N]) -> CubeTensor,
    backward: impl Fn(&[CubeTensor; N], CubeTensor) -> [CubeTensor; N] + Send + Sync + 'static,
) -> Option<BurnTensor<D>> {
    let backward: BackwardFn<N> = Arc::new(move |saved: &[CubeTensor], dy, _| {
        backward(saved.try_into().expect("the inputs, saved"), dy).map(Some)
    });
    run_saving(inputs, |x| (forward(x), x.to_vec()), backward)
}

/// [`run`] where `forward` also returns what `backward` needs (instead of the inputs).
pub(super) fn run_saving<const N: usize, const D: usize>(
    inputs: [&BurnTensor<D>; N],
    forward: impl FnOnce(&[CubeTensor; N]) -> (CubeTensor, Vec<CubeTensor>),
    backward: BackwardFn<N>,
) -> Option<BurnTensor<D>> {
    if let Some(plain) = inputs.iter().map(|t| plain(t)).collect() {
        let values = f32_values(plain)?;
        return Some(BurnTensor::from_primitive::<Cube>(from_cube(
            forward(&values).0,
        )?));
    }
    // A plain input beside tracked ones is a constant on the autodiff device (the first
    // layer's input, from frozen embeddings).
    let lift = |t: &BurnTensor<D>| {
        on_autodiff(t).or_else(|| plain(t).and_then(|_| on_autodiff(&t.clone().autodiff())))
    };
    let ads: Vec<_> = inputs.iter().map(|t| lift(t)).collect::<Option<_>>()?;
    let values = (ads.iter()).map(|a| as_cube(a.primitive().clone()));
    let values: [CubeTensor; N] = f32_values(values.collect::<Option<_>>()?)?;
    let (y, saved) = forward(&values);
    let y = from_cube(y)?;
    let nodes = std::array::from_fn(|i| ads[i].node());
    let tensor = match KernelBackward::<N>
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(Recorded { saved, backward }, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Some(BurnTensor::from_primitive::<Autodiff<Cube>>(tensor))
}

pub(super) fn rms_norm<const D: usize>(
    x: &BurnTensor<D>,
    weight: &BurnTensor<1>,
    eps: f32,
) -> Option<BurnTensor<D>> {
    let w = frozen(weight)?;
    let rows = x.dims()[..D - 1].iter().product::<usize>();
    let launch = move |x: &CubeTensor, w: &CubeTensor, dy: Option<CubeTensor>| {
        let out = empty_like(x);
        let (count, dim) = grid(x, rows);
        let back = dy.is_some();
        kernel::rms_norm_kernel::launch(
            &out.client,
            count,
            dim,
            x.clone().into_tensor_arg(),
            w.clone().into_tensor_arg(),
            dy.unwrap_or_else(|| x.clone()).into_tensor_arg(),
            out.clone().into_tensor_arg(),
            eps,
            back,
        );
        out
    };
    let wf = w.clone();
    let forward = move |[x]: &[CubeTensor; 1]| launch(x, &wf, None);
    let backward = move |[x]: &[CubeTensor; 1], dy: CubeTensor| [launch(x, &w, Some(dy))];
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
        super::heads::rotary_kernel::launch(
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
    let backward = move |_: &[CubeTensor; 1], dy: CubeTensor| [launch(&dy, &c, &t, true)];
    run([x], forward, backward)
}

pub(super) fn applies<const D: usize>(t: &BurnTensor<D>) -> bool {
    crate::cube::values(t).is_some()
}

pub(super) fn causal_softmax(scores: &BurnTensor<4>, scale: f32) -> Option<BurnTensor<4>> {
    let n = scores.dims()[2];
    let forward = move |[s]: &[CubeTensor; 1]| {
        let p = softmax_kernel(s, n, scale);
        (p.clone(), vec![p])
    };
    let backward: BackwardFn<1> = Arc::new(move |saved, dy, _| {
        let [p] = saved else {
            unreachable!("the probabilities saved")
        };
        [Some(softmax_backward(p, &dy, scale))]
    });
    run_saving([scores], forward, backward)
}

/// The causal softmax kernel on the rows of `s` (`t` scores each, `n` queries per run of
/// rows).
pub(super) fn softmax_kernel(s: &CubeTensor, n: usize, scale: f32) -> CubeTensor {
    let t = s.meta.shape()[s.meta.num_dims() - 1];
    let out = empty_like(s);
    let (count, dim) = grid(s, s.meta.shape().num_elements() / t);
    kernel::causal_softmax_kernel::launch(
        &out.client,
        count,
        dim,
        s.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        n,
        t,
        scale,
    );
    out
}

/// The softmax's backward pass from its output `p` (scores scaled by `scale` on the way in)
/// and the output's gradient `dp`: `scale·p·(dp − Σ dp·p)` row by row.
pub(super) fn softmax_backward(p: &CubeTensor, dp: &CubeTensor, scale: f32) -> CubeTensor {
    let t = p.meta.shape()[p.meta.num_dims() - 1];
    let out = empty_like(p);
    let (count, dim) = grid(p, p.meta.shape().num_elements() / t);
    kernel::softmax_backward_kernel::launch(
        &out.client,
        count,
        dim,
        p.clone().into_tensor_arg(),
        dp.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        t,
        scale,
    );
    out
}

/// `a·b` over the last two dimensions (batched over the others).
pub(super) fn product(a: CubeTensor, b: CubeTensor) -> CubeTensor {
    matmul(a, b, None, MatmulStrategy::default(), DType::F32).expect("an f32 product launches")
}

/// `x` with its last two dimensions swapped (a view).
pub(super) fn transposed(x: CubeTensor) -> CubeTensor {
    let rank = x.meta.num_dims();
    let mut axes: Vec<usize> = (0..rank).collect();
    axes.swap(rank - 2, rank - 1);
    permute(x, &axes)
}

/// A constant's `f32` values when no gradient flows to it (plain, or untracked on the
/// autodiff device).
pub(super) fn frozen<const D: usize>(w: &BurnTensor<D>) -> Option<CubeTensor> {
    let t = match plain(w) {
        Some(t) => t,
        None => {
            let a = on_autodiff(w)?;
            if a.is_tracked() {
                return None;
            }
            as_cube(a.primitive().clone())?
        }
    };
    f32_values::<1>(vec![t]).map(|[t]| t)
}

/// `t` when it lives on the autodiff device over `Cube`.
fn on_autodiff<const D: usize>(
    t: &BurnTensor<D>,
) -> Option<<Float as BackendPrimitive<Autodiff<Cube>>>::Primitive> {
    t.clone().try_into_primitive::<Autodiff<Cube>>().ok()
}

/// `values` made contiguous, when every one is `f32` (checked before any copy is made).
fn f32_values<const N: usize>(values: Vec<CubeTensor>) -> Option<[CubeTensor; N]> {
    if !values.iter().all(|t| t.dtype == DType::F32) {
        return None;
    }
    values
        .into_iter()
        .map(into_contiguous)
        .collect::<Vec<_>>()
        .try_into()
        .ok()
}

/// `parts` (plain `f32` vectors) end to end, eight to a launch where Burn's `cat` launches
/// one copy per part. `None` when a part is of another back end or dtype, or the device binds
/// fewer than ten buffers.
pub(super) fn concat(parts: &[BurnTensor<1>]) -> Option<BurnTensor<1>> {
    const GROUP: usize = 8;
    let parts: Vec<CubeTensor> = parts.iter().map(plain).collect::<Option<_>>()?;
    let first = parts.first()?;
    let binds = first.client.properties().hardware.max_bindings as usize;
    if binds < GROUP + 2 || parts.iter().any(|p| p.dtype != DType::F32) {
        return None;
    }
    let len = |p: &CubeTensor| p.meta.shape().num_elements();
    let total: usize = parts.iter().map(len).sum();
    let out = empty(first, burn::tensor::Shape::new([total]), DType::F32);
    let mut start = 0;
    for chunk in parts.chunks(GROUP) {
        let mut ends = [0; GROUP];
        let mut end = 0;
        for (k, e) in ends.iter_mut().enumerate() {
            end += chunk.get(k).map_or(0, len);
            *e = end;
        }
        // Unused slots are bound to the first part (read-only, never read there).
        let arg = |k: usize| match chunk.get(k) {
            Some(p) => into_contiguous(p.clone()).into_tensor_arg(),
            None => first.clone().into_tensor_arg(),
        };
        let (count, dim) = grid(first, end);
        kernel::concat8_kernel::launch(
            &out.client,
            count,
            dim,
            arg(0),
            arg(1),
            arg(2),
            arg(3),
            arg(4),
            arg(5),
            arg(6),
            arg(7),
            out.clone().into_tensor_arg(),
            start,
            ends[0],
            ends[1],
            ends[2],
            ends[3],
            ends[4],
            ends[5],
            ends[6],
            ends[7],
        );
        start += end;
    }
    from_cube(out).map(BurnTensor::from_primitive::<Cube>)
}

/// LoftQ's fit step on plain `f32` tensors of one shape, `p = B·A`: `(w − p, (residual − c·p)²)`
/// in one kernel. `None` for another back end or dtype, or shapes that differ.
pub(super) fn fit_step<const D: usize>(
    residual: &BurnTensor<D>,
    p: &BurnTensor<D>,
    w: &BurnTensor<D>,
    c: f32,
) -> Option<(BurnTensor<D>, BurnTensor<D>)> {
    let shape = w.shape();
    if residual.shape() != shape || p.shape() != shape {
        return None;
    }
    let [residual, p, w] = f32_values(
        [residual, p, w]
            .map(plain)
            .into_iter()
            .collect::<Option<_>>()?,
    )?;
    let (next, sq) = (empty_like(&w), empty_like(&w));
    let (count, dim) = grid(&w, w.meta.shape().num_elements());
    let client = w.client.clone();
    kernel::fit_step_kernel::launch(
        &client,
        count,
        dim,
        residual.into_tensor_arg(),
        p.into_tensor_arg(),
        w.into_tensor_arg(),
        next.clone().into_tensor_arg(),
        sq.clone().into_tensor_arg(),
        c,
    );
    let tensor = |t| from_cube(t).map(BurnTensor::from_primitive::<Cube>);
    Some((tensor(next)?, tensor(sq)?))
}

/// AdamW's update of plain flat `f32` tensors of one length in one kernel, with the scalars
/// `[β₁, 1 − β₁, β₂, 1 − β₂, decay, bias2, ε, step]` of [`kernel::adamw_kernel`]. `None` for
/// another back end or dtype, or lengths that differ.
pub(super) fn adamw(
    [g, m, v, p]: [&BurnTensor<1>; 4],
    [beta1, rest1, beta2, rest2, decay, bias2, eps, step]: [f32; 8],
) -> Option<[BurnTensor<1>; 3]> {
    let n = p.dims()[0];
    if [g, m, v].iter().any(|t| t.dims()[0] != n) {
        return None;
    }
    let [g, m, v, p] = f32_values([g, m, v, p].map(plain).into_iter().collect::<Option<_>>()?)?;
    let outs = [empty_like(&p), empty_like(&p), empty_like(&p)];
    let (count, dim) = grid(&p, n);
    let client = p.client.clone();
    kernel::adamw_kernel::launch(
        &client,
        count,
        dim,
        g.into_tensor_arg(),
        m.into_tensor_arg(),
        v.into_tensor_arg(),
        p.into_tensor_arg(),
        outs[0].clone().into_tensor_arg(),
        outs[1].clone().into_tensor_arg(),
        outs[2].clone().into_tensor_arg(),
        beta1,
        rest1,
        beta2,
        rest2,
        decay,
        bias2,
        eps,
        step,
    );
    let [m, v, p] = outs;
    let tensor = |t| from_cube(t).map(BurnTensor::from_primitive::<Cube>);
    Some([tensor(m)?, tensor(v)?, tensor(p)?])
}
