//! The dense operations the randomized SVD and LoftQ are written against, so each algorithm
//! exists once: [`DeviceOps`] runs them as Burn tensor ops on any device (the large products
//! stay there); `cpu::HostOps` (with the `flex` feature) runs them on host buffers with faer
//! products, fused element-wise passes and no per-iteration allocation of a full matrix.

use burn::tensor::{Device, Tensor};

use crate::QuantError;
use crate::quant::{Codes, HostQuantized, Quantizer};

/// Row-major `f32` matrices and what the algorithms do with them.
pub(crate) trait Dense {
    /// A `[rows, cols]` matrix.
    type M: Clone;

    /// With `LOFTQ_PROFILE`: charges the time since the last mark to `phase`
    /// ([`crate::profile::mark`]); nothing where the matrices are the host's.
    fn mark(&self, _phase: &'static str) {}
    /// `[rows, cols]`.
    fn dims(&self, m: &Self::M) -> [usize; 2];
    /// `a·b`.
    fn mul(&self, a: &Self::M, b: &Self::M) -> Self::M;
    /// `aᵀ·b`.
    fn tmul(&self, a: &Self::M, b: &Self::M) -> Self::M;
    /// The Gram matrix `aᵀ·a` (symmetric), laid out as `to_rows` reads it fastest.
    fn gram(&self, a: &Self::M) -> Self::M {
        self.tmul(a, a)
    }
    /// `a·b` for a lower-triangular `b` (its upper triangle is zero).
    fn mul_lower(&self, a: &Self::M, b: &Self::M) -> Self::M {
        self.mul(a, b)
    }
    /// [`mul_lower`](Self::mul_lower) into `out` (whose values are not read).
    fn mul_lower_into(&self, a: &Self::M, b: &Self::M, out: &mut Self::M) {
        *out = self.mul_lower(a, b);
    }
    /// Whether reading a matrix waits for a device (not on the host, where the randomized
    /// SVD's final step does not share the last orthonormalisation's read: there it would
    /// trade a product for more `k × k` work on one thread, 4% slower at SmolLM2's shapes).
    fn reads_wait(&self) -> bool {
        true
    }
    /// Whether [`solve_lower_right`](Self::solve_lower_right) runs where the matrices are;
    /// if not, the calibrated alternation multiplies by an uploaded `S⁻¹` instead.
    fn solves_here(&self) -> bool;
    /// `a·b⁻¹` for a lower-triangular, invertible `b`, by triangular solves.
    fn solve_lower_right(&self, a: &Self::M, b: &Self::M) -> Self::M;
    /// A matrix from row-major values.
    fn matrix(&self, v: Vec<f32>, shape: [usize; 2]) -> Self::M;
    /// The row-major values.
    fn to_rows(&self, m: &Self::M) -> Vec<f32>;
    /// A matrix for results to be written into (its values are not read).
    fn buffer(&self, like: &Self::M) -> Self::M;
    /// `[a | b]`.
    fn cat_cols(&self, a: &Self::M, b: &Self::M) -> Self::M;
    /// Columns `0..k`.
    fn first_cols(&self, m: &Self::M, k: usize) -> Self::M;
    /// `m·diag(s)`.
    fn scale_cols(&self, m: &Self::M, s: &[f32]) -> Self::M;
    /// `m ← diag(s)·m`.
    fn scale_rows(&self, m: &mut Self::M, s: &[f32]);
    /// `mᵀ`.
    fn transpose(&self, m: &Self::M) -> Self::M;
    /// `‖m‖_F`, accumulated in `f64`.
    fn norm(&self, m: &Self::M) -> f32;
    /// `out = w − dequant(quant(res))`; returns the codes of `res` (`res` may be `w`).
    /// `finite`: the caller knows `res` is finite, so a device need not check it.
    fn quantize_residual(
        &self,
        quantizer: &Quantizer,
        w: &Self::M,
        res: &Self::M,
        out: &mut Self::M,
        finite: bool,
    ) -> Result<Codes, QuantError>;
    /// `out = w − dequant(codes)` for codes made on the host (GPTQ's).
    fn residual_from(
        &self,
        quantizer: &Quantizer,
        codes: &HostQuantized,
        w: &Self::M,
        out: &mut Self::M,
    );
    /// `next = w − b·a` for `factors = (b, a)`; returns `‖residual − c·b·a‖_F`, and the norm
    /// ([`Dense::norm`]) of each of `also` (on a device in the same read).
    fn fit_error(
        &self,
        w: &Self::M,
        residual: &Self::M,
        factors: (&Self::M, &Self::M),
        c: f32,
        next: &mut Self::M,
        also: &[&Self::M],
    ) -> (f32, Vec<f32>);
    /// The tensor on `device`.
    fn to_tensor(&self, m: Self::M, device: &Device) -> Tensor<2>;
    /// `dequant(codes)` on `device`, where the codes are (no transfer for device codes),
    /// reusing `buffer`'s memory where it can.
    fn dequantized(
        &self,
        quantizer: &Quantizer,
        codes: &Codes,
        buffer: Self::M,
        device: &Device,
    ) -> Tensor<2>;
}

/// [`Dense`] as Burn tensor ops; new matrices go to this device.
pub(crate) struct DeviceOps(pub Device);

impl Dense for DeviceOps {
    type M = Tensor<2>;

    fn mark(&self, phase: &'static str) {
        crate::profile::mark(&self.0, phase);
    }

    fn dims(&self, m: &Tensor<2>) -> [usize; 2] {
        m.dims()
    }

    fn mul(&self, a: &Tensor<2>, b: &Tensor<2>) -> Tensor<2> {
        crate::matmul(a, b)
    }

    fn tmul(&self, a: &Tensor<2>, b: &Tensor<2>) -> Tensor<2> {
        // (bᵀ·a)ᵀ keeps the large `a` a contiguous operand.
        crate::matmul(&b.clone().transpose(), a).transpose()
    }

    fn gram(&self, a: &Tensor<2>) -> Tensor<2> {
        // Symmetric: no transposed view, whose read would first copy it.
        crate::matmul(&a.clone().transpose(), a)
    }

    fn solves_here(&self) -> bool {
        false
    }

    fn solve_lower_right(&self, a: &Tensor<2>, b: &Tensor<2>) -> Tensor<2> {
        // Burn has no triangular solve: through the host.
        let (shape, n) = (a.dims(), b.dims()[0]);
        let mut out = crate::quant::host_f32(a);
        crate::calib::solve_lower_right(&mut out, shape[0], &crate::quant::host_f32(b), n);
        self.matrix(out, shape)
    }

    fn matrix(&self, v: Vec<f32>, shape: [usize; 2]) -> Tensor<2> {
        crate::transfers::upload(v, shape, &self.0)
    }

    fn to_rows(&self, m: &Tensor<2>) -> Vec<f32> {
        crate::quant::host_f32(m)
    }

    fn buffer(&self, like: &Tensor<2>) -> Tensor<2> {
        like.clone()
    }

    fn cat_cols(&self, a: &Tensor<2>, b: &Tensor<2>) -> Tensor<2> {
        Tensor::cat(vec![a.clone(), b.clone()], 1)
    }

    fn first_cols(&self, m: &Tensor<2>, k: usize) -> Tensor<2> {
        let [rows, _] = m.dims();
        m.clone().slice([0..rows, 0..k])
    }

    fn scale_cols(&self, m: &Tensor<2>, s: &[f32]) -> Tensor<2> {
        let row = crate::transfers::upload(s.to_vec(), [s.len()], &m.device());
        m.clone() * row.reshape([1, s.len()])
    }

    fn scale_rows(&self, m: &mut Tensor<2>, s: &[f32]) {
        let col = crate::transfers::upload(s.to_vec(), [s.len()], &m.device());
        *m = m.clone() * col.reshape([s.len(), 1]);
    }

    fn transpose(&self, m: &Tensor<2>) -> Tensor<2> {
        m.clone().transpose()
    }

    fn norm(&self, m: &Tensor<2>) -> f32 {
        frobenius(m)
    }

    fn quantize_residual(
        &self,
        quantizer: &Quantizer,
        w: &Tensor<2>,
        res: &Tensor<2>,
        out: &mut Tensor<2>,
        finite: bool,
    ) -> Result<Codes, QuantError> {
        let (codes, residual) = quantizer.quantize_residual_checked(res, w, !finite)?;
        *out = residual;
        Ok(codes)
    }

    fn residual_from(
        &self,
        quantizer: &Quantizer,
        codes: &HostQuantized,
        w: &Tensor<2>,
        out: &mut Tensor<2>,
    ) {
        let q = quantizer.dequantize_host(codes);
        *out = w.clone() - self.matrix(q, codes.shape);
    }

    fn fit_error(
        &self,
        w: &Tensor<2>,
        residual: &Tensor<2>,
        (b, a): (&Tensor<2>, &Tensor<2>),
        c: f32,
        next: &mut Tensor<2>,
        also: &[&Tensor<2>],
    ) -> (f32, Vec<f32>) {
        let squares;
        (*next, squares) = fit_step(residual, crate::matmul(b, a), w, c);
        let mut squares = vec![squares];
        squares.extend(also.iter().map(|&m| m.clone().powf_scalar(2.0)));
        let mut norms = norms_of_squares(squares);
        let err = norms.remove(0);
        (err, norms)
    }

    fn to_tensor(&self, m: Tensor<2>, device: &Device) -> Tensor<2> {
        m.to_device(device)
    }

    fn dequantized(
        &self,
        quantizer: &Quantizer,
        codes: &Codes,
        _buffer: Tensor<2>,
        device: &Device,
    ) -> Tensor<2> {
        match codes {
            Codes::Device(q) => quantizer.dequantize(q).to_device(device),
            Codes::Host(h) => {
                let v = quantizer.dequantize_host(h);
                crate::transfers::upload(v, h.shape, device)
            }
        }
    }
}

/// `c·t`, no kernel for a `c` of 1 (LoftQ's default scaling).
pub(crate) fn scaled<const D: usize>(t: Tensor<D>, c: f32) -> Tensor<D> {
    match c == 1.0 {
        true => t,
        false => t.mul_scalar(c),
    }
}

/// LoftQ's fit step for `p = B·A`, one matrix or a stack: the next quantization's input
/// `w − p` and the squares of `residual − c·p`, whose sum is the fit error. One kernel on
/// WGPU and CUDA ([`crate::fused::fit_step`]), Burn's ops elsewhere.
pub(crate) fn fit_step<const D: usize>(
    residual: &Tensor<D>,
    p: Tensor<D>,
    w: &Tensor<D>,
    c: f32,
) -> (Tensor<D>, Tensor<D>) {
    if let Some(out) = crate::fused::fit_step(residual, &p, w, c) {
        return out;
    }
    let fit = residual.clone() - scaled(p.clone(), c);
    (w.clone() - p, fit.powf_scalar(2.0))
}

/// Frobenius norm: squared row sums on the device, their total in `f64` on the host.
///
/// A single `f32` sum over millions of squares drifts by up to 1% on large matrices (seen on
/// 4096×11008); row sums are short, and only `rows` values cross to the host.
pub(crate) fn frobenius(t: &Tensor<2>) -> f32 {
    norm_of_squares(t.clone().powf_scalar(2.0))
}

/// The Frobenius norm of a matrix whose squares are `squares`, as [`frobenius`].
fn norm_of_squares(squares: Tensor<2>) -> f32 {
    norms_of_squares(vec![squares])[0]
}

/// [`norm_of_squares`] of each matrix, in one read.
fn norms_of_squares(squares: Vec<Tensor<2>>) -> Vec<f32> {
    let lens: Vec<usize> = squares.iter().map(|s| s.dims()[0]).collect();
    let values = row_sums(squares);
    let mut start = 0;
    lens.iter()
        .map(|&rows| {
            start += rows;
            norm_of_row_sums(&values[start - rows..start])
        })
        .collect()
}

/// The row sums of each matrix of `parts`, in order, in one read.
pub(crate) fn row_sums(parts: Vec<Tensor<2>>) -> Vec<f32> {
    crate::quant::host_f32(&row_sums_tensor(parts))
}

/// The row sums of each matrix of `parts`, in order, as one tensor on their device.
pub(crate) fn row_sums_tensor(parts: Vec<Tensor<2>>) -> Tensor<1> {
    let sums: Vec<Tensor<1>> = parts
        .into_iter()
        .map(|t| {
            let [rows, _] = t.dims();
            t.sum_dim(1).reshape([rows])
        })
        .collect();
    // One part: no concatenation (Burn's `cat` copies even one tensor).
    match sums.len() {
        1 => sums.into_iter().next().expect("one part"),
        _ => Tensor::cat(sums, 0),
    }
}

/// The Frobenius norm from a matrix's squared row sums, totalled in `f64`.
pub(crate) fn norm_of_row_sums(row_sums: &[f32]) -> f32 {
    row_sums.iter().map(|&x| f64::from(x)).sum::<f64>().sqrt() as f32
}

/// `‖other − reference‖ / ‖reference‖` (Frobenius) of two host buffers of one length, summed
/// in `f64` in order.
pub fn rel_dist(reference: &[f32], other: &[f32]) -> f64 {
    debug_assert_eq!(reference.len(), other.len());
    let diff: f64 = reference
        .iter()
        .zip(other)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum();
    let norm: f64 = reference.iter().map(|a| f64::from(*a).powi(2)).sum();
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}
