//! What the CubeCL kernels (`fused`, `quant::cube`) share: taking a Burn tensor's `CubeTensor`
//! and giving one back, empty outputs and launch grids.

use std::any::Any;

use burn::backend::{Autodiff, Cube, DispatchDevice};
use burn::tensor::kind::Basic;
use burn::tensor::{BackendPrimitive, DType, Device, Shape, Tensor};
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{CubeDim, calculate_cube_count_elemwise};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;

/// `p` as a [`CubeTensor`] when Burn's `Cube` back end is the unfused one.
pub(crate) fn as_cube<P: Any>(p: P) -> Option<CubeTensor> {
    let p: Box<dyn Any> = Box::new(p);
    p.downcast::<CubeTensor>().ok().map(|t| *t)
}

/// The inverse of [`as_cube`]: a [`CubeTensor`] as the primitive type `P` it is.
pub(crate) fn from_cube<P: Any>(t: CubeTensor) -> Option<P> {
    let t: Box<dyn Any> = Box::new(t);
    t.downcast::<P>().ok().map(|p| *p)
}

/// `t`'s values when it is a plain tensor (not on the autodiff device) of the unfused `Cube`
/// back end.
pub(crate) fn plain<const D: usize, K>(t: &Tensor<D, K>) -> Option<CubeTensor>
where
    K: BackendPrimitive<Cube> + Basic,
    <K as BackendPrimitive<Cube>>::Primitive: Any,
{
    t.clone()
        .try_into_primitive::<Cube>()
        .ok()
        .and_then(as_cube)
}

/// `t`'s values when it is a float tensor of the unfused `Cube` back end, plain or on the
/// autodiff device.
pub(crate) fn values<const D: usize>(t: &Tensor<D>) -> Option<CubeTensor> {
    plain(t).or_else(|| {
        let tracked = t.clone().try_into_primitive::<Autodiff<Cube>>().ok()?;
        as_cube(tracked.primitive().clone())
    })
}

/// The largest buffer `device` allocates, in bytes (a page of CubeCL's memory pool), when it
/// is a CubeCL device, with or without autodiff, fused or not.
pub(crate) fn max_buffer(device: &Device) -> Option<u64> {
    match device.clone().inner().as_dispatch() {
        DispatchDevice::Cube(d) => Some(d.client().properties().memory.max_page_size),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// A [`CubeTensor`] as a Burn tensor of kind `K`.
pub(crate) fn to_tensor<const D: usize, K>(t: CubeTensor) -> Option<Tensor<D, K>>
where
    K: BackendPrimitive<Cube> + Basic,
    <K as BackendPrimitive<Cube>>::Primitive: Any,
{
    Some(Tensor::from_primitive::<Cube>(from_cube(t)?))
}

/// An empty tensor of `shape` and `dtype` on `like`'s device.
pub(crate) fn empty(like: &CubeTensor, shape: Shape, dtype: DType) -> CubeTensor {
    empty_device_dtype(like.client.clone(), like.device.clone(), shape, dtype)
}

/// The launch grid for `n` threads.
pub(crate) fn grid(t: &CubeTensor, n: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(&t.client, n.max(1));
    (calculate_cube_count_elemwise(&t.client, n.max(1), dim), dim)
}
