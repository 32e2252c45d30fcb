//! [`Dense`] on host buffers for the CPU back end: faer products, fused multi-threaded
//! element-wise passes, and results written into the caller's buffers, so a LoftQ iteration
//! on a 4096² matrix allocates no new full-size matrix (fresh 64 MiB buffers cost more in page
//! faults than the passes themselves).

use std::borrow::Cow;
use std::cell::RefCell;
use std::marker::PhantomData;

use burn::backend::flex::FlexTensor;
use burn::tensor::{Device, Tensor, TensorData};
use faer::{MatMut, MatRef};
use rayon::prelude::*;

use crate::QuantError;
use crate::dense::Dense;
use crate::quant::{Codes, HostQuantized, Quantizer};

/// Elements per task of the element-wise passes.
const CHUNK: usize = 1 << 16;

/// Buffers of at least this many elements are kept for reuse when a matrix is dropped: a fresh
/// 64 MiB buffer costs 16,384 page faults on first touch, more than the pass that fills it, and
/// `loftq init` runs LoftQ on hundreds of same-sized matrices in a row.
const POOLED_MIN: usize = 1 << 20;
/// At most this many buffers are kept (per thread): LoftQ holds two between matrices.
const POOL_MAX: usize = 2;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A zeroed buffer of `len` values, reusing a pooled allocation when one is large enough.
fn pooled(len: usize) -> Vec<f32> {
    let reused = (len >= POOLED_MIN)
        .then(|| {
            POOL.with(|p| {
                let mut p = p.borrow_mut();
                let i = (0..p.len())
                    .filter(|&i| p[i].capacity() >= len)
                    .min_by_key(|&i| p[i].capacity())?;
                Some(p.swap_remove(i))
            })
        })
        .flatten();
    let mut v = reused.unwrap_or_default();
    v.clear();
    v.resize(len, 0.0);
    v
}

/// Frees the buffers kept for reuse, on this thread and on every thread of rayon's pool: a
/// caller done with large matrices for a while gives their memory back (up to
/// `POOL_MAX` per thread: the 7B shapes' 4096 × 11,008 take 180 MB each).
pub fn release_buffers() {
    let clear = || POOL.with(|p| p.borrow_mut().clear());
    clear();
    rayon::broadcast(|_| clear());
}

/// A row-major `f32` matrix on the host, owned or borrowed from a flex tensor.
#[derive(Clone, Debug, Default)]
pub(crate) struct RowMat<'a> {
    data: Cow<'a, [f32]>,
    rows: usize,
    cols: usize,
}

impl<'a> RowMat<'a> {
    /// The `[rows, cols]` matrix of the flex tensor `t`: its storage when it is contiguous
    /// row-major `f32`, a copy otherwise.
    pub(crate) fn of_flex(t: &'a FlexTensor, [rows, cols]: [usize; 2]) -> Self {
        let data = match t.as_slice::<f32>() {
            Some(s) => Cow::Borrowed(s),
            None => Cow::Owned(
                t.to_contiguous()
                    .into_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .expect("f32 data"),
            ),
        };
        Self { data, rows, cols }
    }

    /// A row-major `[rows, cols]` view of `data`, without a copy.
    pub(crate) fn borrowed(data: &'a [f32], [rows, cols]: [usize; 2]) -> Self {
        assert_eq!(data.len(), rows * cols, "values for a {rows}×{cols} matrix");
        Self {
            data: Cow::Borrowed(data),
            rows,
            cols,
        }
    }

    fn view(&self) -> MatRef<'_, f32> {
        MatRef::from_row_major_slice(&self.data, self.rows, self.cols)
    }

    /// Resizes to `[rows, cols]` and gives write access, keeping an owned allocation when it
    /// is large enough (the values are then stale, not zero).
    fn reshape(&mut self, rows: usize, cols: usize) -> &mut [f32] {
        let n = rows * cols;
        self.rows = rows;
        self.cols = cols;
        if !matches!(&self.data, Cow::Owned(v) if v.capacity() >= n) {
            self.data = Cow::Owned(pooled(n));
        }
        let data = self.data.to_mut();
        data.resize(n, 0.0);
        data
    }
}

impl Drop for RowMat<'_> {
    fn drop(&mut self) {
        if let Cow::Owned(v) = std::mem::take(&mut self.data)
            && v.capacity() >= POOLED_MIN
        {
            POOL.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_MAX {
                    p.push(v);
                }
            });
        }
    }
}

/// `Σ x²` in `f64`, over eight independent lanes so that the loop vectorises (a single
/// running sum is a dependency chain the compiler may not reorder).
fn sum_squares(x: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += f64::from(*v) * f64::from(*v);
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum();
    lanes.iter().sum::<f64>() + tail
}

/// `out = a·b`, overwriting `out`'s values.
fn product_into(a: MatRef<'_, f32>, b: MatRef<'_, f32>, out: &mut RowMat<'_>) {
    let data = out.reshape(a.nrows(), b.ncols());
    super::gemm(
        MatMut::from_row_major_slice_mut(data, a.nrows(), b.ncols()),
        a,
        b,
        1.0,
    );
}

fn product<'a>(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> RowMat<'a> {
    let mut out = RowMat::default();
    product_into(a, b, &mut out);
    out
}

/// [`Dense`] on host buffers; `'a` is the lifetime of borrowed inputs.
#[derive(Default)]
pub(crate) struct HostOps<'a>(PhantomData<&'a ()>);

impl<'a> Dense for HostOps<'a> {
    type M = RowMat<'a>;

    fn dims(&self, m: &RowMat<'a>) -> [usize; 2] {
        [m.rows, m.cols]
    }

    fn mul(&self, a: &RowMat<'a>, b: &RowMat<'a>) -> RowMat<'a> {
        product(a.view(), b.view())
    }

    fn mul_lower(&self, a: &RowMat<'a>, b: &RowMat<'a>) -> RowMat<'a> {
        let mut out = RowMat::default();
        self.mul_lower_into(a, b, &mut out);
        out
    }

    fn mul_lower_into(&self, a: &RowMat<'a>, b: &RowMat<'a>, out: &mut RowMat<'a>) {
        // Half the products of a general one: the calibrated alternation multiplies by `S`
        // and `S⁻¹` every iteration.
        let data = out.reshape(a.rows, b.cols);
        super::gemm_lower(
            MatMut::from_row_major_slice_mut(data, a.rows, b.cols),
            a.view(),
            b.view(),
        );
    }

    fn reads_wait(&self) -> bool {
        false
    }

    fn solves_here(&self) -> bool {
        true
    }

    fn solve_lower_right(&self, a: &RowMat<'a>, b: &RowMat<'a>) -> RowMat<'a> {
        let mut out = a.data.to_vec();
        crate::calib::solve_lower_right(&mut out, a.rows, &b.data, a.cols);
        self.matrix(out, [a.rows, a.cols])
    }

    fn tmul(&self, a: &RowMat<'a>, b: &RowMat<'a>) -> RowMat<'a> {
        // (bᵀ·a)ᵀ: with the large `a` as the row-major right operand and a row-major result,
        // faer runs 3× faster than with `aᵀ` on the left; the transpose is of a small matrix.
        self.transpose(&product(b.view().transpose(), a.view()))
    }

    fn matrix(&self, data: Vec<f32>, [rows, cols]: [usize; 2]) -> RowMat<'a> {
        assert_eq!(data.len(), rows * cols, "values for a {rows}×{cols} matrix");
        RowMat {
            data: Cow::Owned(data),
            rows,
            cols,
        }
    }

    fn to_rows(&self, m: &RowMat<'a>) -> Vec<f32> {
        m.data.to_vec()
    }

    fn buffer(&self, _like: &RowMat<'a>) -> RowMat<'a> {
        RowMat::default()
    }

    fn cat_cols(&self, a: &RowMat<'a>, b: &RowMat<'a>) -> RowMat<'a> {
        assert_eq!(a.rows, b.rows, "row counts");
        let data = a
            .data
            .chunks(a.cols.max(1))
            .zip(b.data.chunks(b.cols.max(1)))
            .flat_map(|(x, y)| x.iter().chain(y).copied())
            .collect();
        self.matrix(data, [a.rows, a.cols + b.cols])
    }

    fn first_cols(&self, m: &RowMat<'a>, k: usize) -> RowMat<'a> {
        let data = m
            .data
            .chunks(m.cols.max(1))
            .flat_map(|row| row[..k].iter().copied())
            .collect();
        self.matrix(data, [m.rows, k])
    }

    fn scale_cols(&self, m: &RowMat<'a>, s: &[f32]) -> RowMat<'a> {
        let mut out = m.clone();
        for row in out.data.to_mut().chunks_mut(m.cols.max(1)) {
            row.iter_mut().zip(s).for_each(|(x, s)| *x *= s);
        }
        out
    }

    fn scale_rows(&self, m: &mut RowMat<'a>, s: &[f32]) {
        let cols = m.cols.max(1);
        for (row, s) in m.data.to_mut().chunks_mut(cols).zip(s) {
            row.iter_mut().for_each(|x| *x *= s);
        }
    }

    fn transpose(&self, m: &RowMat<'a>) -> RowMat<'a> {
        let data = (0..m.cols * m.rows)
            .map(|i| m.data[(i % m.rows) * m.cols + i / m.rows])
            .collect();
        self.matrix(data, [m.cols, m.rows])
    }

    fn norm(&self, m: &RowMat<'a>) -> f32 {
        m.data
            .par_chunks(CHUNK)
            .map(sum_squares)
            .sum::<f64>()
            .sqrt() as f32
    }

    fn quantize_residual(
        &self,
        quantizer: &Quantizer,
        w: &RowMat<'a>,
        res: &RowMat<'a>,
        out: &mut RowMat<'a>,
        _finite: bool,
    ) -> Result<Codes, QuantError> {
        let codes = quantizer.quantize_host(&res.data, [res.rows, res.cols])?;
        quantizer.residual_host_into(&codes, &w.data, out.reshape(res.rows, res.cols));
        Ok(Codes::Host(codes))
    }

    fn residual_from(
        &self,
        quantizer: &Quantizer,
        codes: &HostQuantized,
        w: &RowMat<'a>,
        out: &mut RowMat<'a>,
    ) {
        let [rows, cols] = codes.shape;
        quantizer.residual_host_into(codes, &w.data, out.reshape(rows, cols));
    }

    fn fit_error(
        &self,
        w: &RowMat<'a>,
        residual: &RowMat<'a>,
        (b, a): (&RowMat<'a>, &RowMat<'a>),
        c: f32,
        next: &mut RowMat<'a>,
        also: &[&RowMat<'a>],
    ) -> (f32, Vec<f32>) {
        product_into(b.view(), a.view(), next);
        let err = next
            .data
            .to_mut()
            .par_chunks_mut(CHUNK)
            .zip(residual.data.par_chunks(CHUNK))
            .zip(w.data.par_chunks(CHUNK))
            .map(|((ba, r), w)| {
                // e = residual − c·BA into a small stack buffer, then its squares; BA becomes
                // W − BA in place.
                let mut sum = 0f64;
                let mut e = [0f32; 1024];
                for ((ba, r), w) in ba.chunks_mut(1024).zip(r.chunks(1024)).zip(w.chunks(1024)) {
                    let e = &mut e[..ba.len()];
                    for ((e, ba), (r, w)) in e.iter_mut().zip(ba.iter_mut()).zip(r.iter().zip(w)) {
                        *e = r - c * *ba;
                        *ba = w - *ba;
                    }
                    sum += sum_squares(e);
                }
                sum
            })
            .sum::<f64>()
            .sqrt() as f32;
        (err, also.iter().map(|m| self.norm(m)).collect())
    }

    fn dequantized(
        &self,
        quantizer: &Quantizer,
        codes: &Codes,
        mut buffer: RowMat<'a>,
        device: &Device,
    ) -> Tensor<2> {
        let downloaded;
        let host = match codes {
            Codes::Host(h) => h,
            Codes::Device(q) => {
                downloaded = q.to_host();
                &downloaded
            }
        };
        let [rows, cols] = host.shape;
        quantizer.dequantize_host_into(host, buffer.reshape(rows, cols));
        self.to_tensor(buffer, device)
    }

    fn to_tensor(&self, mut m: RowMat<'a>, device: &Device) -> Tensor<2> {
        let data = std::mem::take(&mut m.data).into_owned();
        Tensor::from_data(TensorData::new(data, [m.rows, m.cols]), device)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;

    use super::*;
    use crate::dense::DeviceOps;
    use crate::lowrank::{Gaussian, RsvdConfig, SvdMethod, rsvd::rsvd};
    use crate::quant::QuantConfig;
    use crate::{LoftqConfig, loftq::alternate};

    fn gaussian(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        Gaussian::new(seed).values(rows * cols)
    }

    fn close(a: f32, b: f32, rel: f32) -> bool {
        (a - b).abs() <= rel * a.abs().max(b.abs())
    }

    /// The host implementation runs the same algorithm as the tensor one: same singular
    /// values, same warm-start behaviour, same LoftQ history, nearly all codes equal.
    #[test]
    fn host_ops_match_tensor_ops() {
        let (m, n) = (120, 96);
        let x = gaussian(m, n, 4);
        let device = Device::flex();
        let t = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, n]), &device);
        let host = HostOps::default().matrix(x, [m, n]);
        let cfg = RsvdConfig::default();
        let (h, hb) = rsvd(&HostOps::default(), &host, 8, &cfg, None).unwrap();
        let (d, db) = rsvd(&DeviceOps(device.clone()), &t, 8, &cfg, None).unwrap();
        for (a, b) in h.s.iter().zip(&d.s) {
            assert!(close(*a, *b, 1e-4), "σ {a} vs {b}");
        }
        let (h2, _) = rsvd(&HostOps::default(), &host, 8, &cfg, Some(&hb)).unwrap();
        let (d2, _) = rsvd(&DeviceOps(device.clone()), &t, 8, &cfg, Some(&db)).unwrap();
        for (a, b) in h2.s.iter().zip(&d2.s) {
            assert!(close(*a, *b, 1e-4), "warm σ {a} vs {b}");
        }

        let quantizer = Quantizer::new(QuantConfig::nf(2)).unwrap();
        let lcfg = LoftqConfig {
            svd: SvdMethod::Randomized(cfg),
            ..LoftqConfig::new(QuantConfig::nf(2), 8, 4)
        };
        let rh = alternate(&HostOps::default(), &host, &lcfg, &quantizer, &device, None)
            .unwrap()
            .0;
        let rd = alternate(
            &DeviceOps(device.clone()),
            &t,
            &lcfg,
            &quantizer,
            &device,
            None,
        )
        .unwrap()
        .0;
        for (a, b) in rh.history.iter().zip(&rd.history) {
            assert!(close(*a, *b, 1e-4), "history {a} vs {b}");
        }
        assert!(close(rh.rel_err_quant, rd.rel_err_quant, 1e-5));
        let (ch, cd) = (
            rh.packed.unpack().unwrap().codes,
            rd.packed.unpack().unwrap().codes,
        );
        let differ = ch.iter().zip(&cd).filter(|(a, b)| a != b).count();
        assert!(differ * 1000 <= ch.len(), "{differ} codes differ");
    }

    /// `a·S⁻¹` by the host's triangular solve and by the device's way through the host, each
    /// times `S`, is `a` again.
    #[test]
    fn both_solve_with_a_lower_factor() {
        let (r, n) = (3, 40);
        // A well-conditioned lower triangle: a dominant diagonal.
        let mut s = gaussian(n, n, 6);
        for i in 0..n {
            s[i * n + i] = 4.0 + s[i * n + i].abs();
            s[i * n + i + 1..(i + 1) * n].fill(0.0);
        }
        let a = gaussian(r, n, 7);
        let host = HostOps::default();
        let x = host.solve_lower_right(
            &host.matrix(a.clone(), [r, n]),
            &host.matrix(s.clone(), [n, n]),
        );
        let device = DeviceOps(Device::flex());
        let y = device.solve_lower_right(
            &device.matrix(a.clone(), [r, n]),
            &device.matrix(s.clone(), [n, n]),
        );
        for got in [host.to_rows(&x), device.to_rows(&y)] {
            let back =
                host.to_rows(&host.mul(&host.matrix(got, [r, n]), &host.matrix(s.clone(), [n, n])));
            for (g, w) in back.iter().zip(&a) {
                assert!(close(*g, *w, 1e-4), "{g} vs {w}");
            }
        }
    }

    #[test]
    fn small_host_helpers() {
        let ops = HostOps::default();
        let a = ops.matrix((0..6).map(|v| v as f32).collect(), [2, 3]);
        let b = ops.matrix(vec![10.0, 20.0], [2, 1]);
        assert_eq!(
            ops.cat_cols(&a, &b).data.as_ref(),
            &[0., 1., 2., 10., 3., 4., 5., 20.]
        );
        assert_eq!(ops.first_cols(&a, 2).data.as_ref(), &[0., 1., 3., 4.]);
        assert_eq!(ops.transpose(&a).data.as_ref(), &[0., 3., 1., 4., 2., 5.]);
        assert_eq!(
            ops.scale_cols(&a, &[1., 0., 2.]).data.as_ref(),
            &[0., 0., 4., 3., 0., 10.]
        );
        // aᵀ·a through the transposed product.
        let g = ops.tmul(&a, &a);
        assert_eq!(
            g.data.as_ref(),
            &[9., 12., 15., 12., 17., 22., 15., 22., 29.]
        );
        assert!((ops.norm(&a) - 55f32.sqrt()).abs() < 1e-6);
    }
}
