//! [`Host`]: the elements of a flex tensor as the host kernels and faer read them.

use burn::backend::flex::FlexTensor;
use burn::tensor::{Tensor, TensorData};
use faer::MatRef;

use super::{flex, flex_autodiff};

/// The `f32` elements of a flex tensor, shared with it (cloning copies no element): row-major,
/// or, for a matrix stored transposed and read through [`Host::view`], column-major.
#[derive(Clone, Debug)]
pub struct Host {
    t: FlexTensor,
    column_major: bool,
}

impl Host {
    /// `t` row-major: its storage when it is contiguous `f32`, a contiguous copy otherwise.
    pub fn rows(t: FlexTensor) -> Self {
        let t = match t.as_slice::<f32>() {
            Some(_) => t,
            None => FlexTensor::from_data(t.to_contiguous().into_data().convert::<f32>()),
        };
        Self {
            t,
            column_major: false,
        }
    }

    /// `t` for a product: a transposed contiguous matrix is also read as it is
    /// (column-major), without the copy [`Host::rows`] makes.
    pub fn matrix(t: FlexTensor) -> Self {
        let layout = t.layout();
        let dims = layout.shape();
        let transposed = t.as_slice::<f32>().is_none()
            && dims.num_dims() == 2
            && layout.strides() == [1, dims[0] as isize]
            && layout.start_offset() + dims[0] * dims[1] <= t.storage::<f32>().len();
        match transposed {
            true => Self {
                t,
                column_major: true,
            },
            false => Self::rows(t),
        }
    }

    /// Values computed on the host (a dequantized weight, say), `shape` row-major.
    pub fn owned(v: Vec<f32>, shape: &[usize]) -> Self {
        Self::rows(FlexTensor::from_data(TensorData::new(v, shape.to_vec())))
    }

    /// A contiguous `f32` flex tensor outside autodiff, shared without a copy; `None`
    /// otherwise (the caller then leaves the work to Burn).
    pub fn of_plain(t: &Tensor<2>) -> Option<Self> {
        let t = flex(t)?;
        t.as_slice::<f32>().is_some().then(|| Self::rows(t))
    }

    /// A constant operand (a frozen weight, a table) on the CPU back end, with or without
    /// autodiff, row-major; `None` off the CPU back end.
    pub fn of<const D: usize>(t: &Tensor<D>) -> Option<Self> {
        if let Some(p) = flex(t) {
            return Some(Self::rows(p));
        }
        Some(Self::rows(flex_autodiff(t)?.primitive().clone()))
    }

    /// The elements, row-major.
    ///
    /// # Panics
    /// For a transposed matrix held by [`Host::matrix`] (read it through [`Host::view`]).
    pub fn slice(&self) -> &[f32] {
        assert!(
            !self.column_major,
            "a transposed matrix has no row-major slice"
        );
        self.t
            .as_slice::<f32>()
            .expect("contiguous f32 by construction")
    }

    /// The elements as the matrix `[rows, cols]`.
    pub fn view(&self, rows: usize, cols: usize) -> MatRef<'_, f32> {
        if self.column_major {
            let start = self.t.layout().start_offset();
            let data = &self.t.storage::<f32>()[start..start + rows * cols];
            MatRef::from_column_major_slice(data, rows, cols)
        } else {
            MatRef::from_row_major_slice(self.slice(), rows, cols)
        }
    }
}
