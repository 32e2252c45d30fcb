//! The device path: quantize and dequantize [`Tensor`]s on any Burn back end.
//!
//! Two implementations give identical results (tests compare them):
//! - [`Kernel::Host`]: the vectorised, multi-threaded host kernels of this module's parent,
//!   used on the CPU (`flex`), where device memory is host memory;
//! - [`Kernel::Portable`]: ordinary tensor ops, so it runs wherever Burn runs (wgpu, CUDA).
//!   It decides codes with `bits` (or `2^bits − 1` for ≤ 16 levels) comparisons against the
//!   thresholds, never with a `numel × levels` distance tensor.

use burn::tensor::kind::Basic;
use burn::tensor::{Device, Int, Tensor, TensorData, Transaction};

use super::host::non_finite_error;
use super::{GgmlFormat, HostQuantized, Quantizer, Scheme};
use crate::QuantError;

/// Which implementation runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernel {
    /// [`Kernel::Host`] on CPU back ends, [`Kernel::Portable`] elsewhere.
    #[default]
    Auto,
    /// Ordinary tensor ops on the tensor's device.
    Portable,
    /// Copy to the host, run the host kernel, copy back.
    Host,
}

impl Kernel {
    fn resolve(self, device: &Device) -> Kernel {
        match self {
            Kernel::Auto if is_host_device(device) => Kernel::Host,
            Kernel::Auto => Kernel::Portable,
            k => k,
        }
    }
}

/// True for back ends whose tensors live in host memory.
pub fn is_host_device(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    {
        use burn::backend::DispatchDevice;
        matches!(device.as_dispatch(), DispatchDevice::Flex(_))
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = device;
        false
    }
}

/// A quantized matrix on a device: one code per element (unpacked) and the block scales.
#[derive(Clone, Debug)]
pub struct Quantized {
    /// Shape of the original matrix.
    pub shape: [usize; 2],
    /// Elements per block.
    pub block: usize,
    /// One code per element, row-major, as integers.
    pub codes: Tensor<1, Int>,
    /// Bits per code: every code is below `2^bits`.
    pub bits: u8,
    /// One scale per block.
    pub scales: Tensor<1>,
    /// One minimum per block (schemes with [`Scheme::has_mins`] only).
    pub mins: Option<Tensor<1>>,
}

impl Quantized {
    /// Copies to the host in one read (a [`Transaction`] of the codes, scales and minimums).
    /// The codes travel packed, `⌊31/bits⌋` to an `i32` word (packed on the device: a 4096²
    /// NF4 matrix reads 9.6 MB, not 67).
    pub fn to_host(&self) -> HostQuantized {
        self.to_host_with(Vec::new()).0
    }

    /// [`Quantized::to_host`], and the values of `extra` in the same read.
    pub fn to_host_with(&self, extra: Vec<Tensor<1>>) -> (HostQuantized, Vec<Vec<f32>>) {
        let words = super::pack::device_words(&self.codes, self.bits);
        let mut read = Transaction::default()
            .register(words)
            .register(self.scales.clone());
        if let Some(mins) = &self.mins {
            read = read.register(mins.clone());
        }
        let extras = extra.len();
        for t in extra {
            read = read.register(t);
        }
        let mut data = read.execute().into_iter();
        let mut next = || data.next().expect("one datum per tensor");
        let words: Vec<i32> = next().convert::<i32>().try_into_vec().expect("i32 words");
        let f32s = |d: TensorData| d.convert::<f32>().try_into_vec::<f32>().expect("f32 data");
        let scales = f32s(next());
        let mins = self.mins.as_ref().map(|_| f32s(next())).unwrap_or_default();
        let extra: Vec<Vec<f32>> = (0..extras).map(|_| f32s(next())).collect();
        let values = words.len() + scales.len() + mins.len();
        crate::transfers::count_read(values + extra.iter().map(Vec::len).sum::<usize>());
        let host = HostQuantized {
            shape: self.shape,
            block: self.block,
            codes: super::pack::unpack_words(&words, self.bits, self.codes.dims()[0]),
            scales,
            mins,
        };
        (host, extra)
    }

    /// Uploads host codes and scales to `device`.
    pub fn from_host(q: &HostQuantized, device: &Device) -> Self {
        let n = q.numel();
        let codes: Vec<i32> = q.codes.iter().map(|&c| i32::from(c)).collect();
        let top = q.codes.iter().copied().max().unwrap_or(0);
        crate::transfers::count_upload(n);
        Self {
            shape: q.shape,
            block: q.block,
            codes: Tensor::from_data(TensorData::new(codes, [n]), device),
            bits: (u8::BITS - top.leading_zeros()).max(1) as u8,
            scales: crate::transfers::upload(q.scales.clone(), [q.scales.len()], device),
            mins: (!q.mins.is_empty())
                .then(|| crate::transfers::upload(q.mins.clone(), [q.mins.len()], device)),
        }
    }

    /// The device the tensors live on.
    pub fn device(&self) -> Device {
        self.scales.device()
    }
}

/// `parts` end to end; a lone part as it is (Burn's `cat` copies even one tensor: a kernel
/// per quantization and per dequantization of every layer).
pub(super) fn join<K: Basic>(mut parts: Vec<Tensor<1, K>>) -> Tensor<1, K> {
    match parts.len() {
        1 => parts.pop().expect("one part"),
        _ => Tensor::cat(parts, 0),
    }
}

/// Whether `w` holds a NaN or an infinity (one read from the device).
fn non_finite(w: &Tensor<2>) -> bool {
    let bad = w
        .clone()
        .is_nan()
        .bool_or(w.clone().is_inf())
        .any()
        .into_scalar::<bool>();
    crate::transfers::count_read(1);
    bad
}

/// A tensor's values as host `f32`s, row-major: a read, counted as one
/// ([`transfers`](crate::transfers)) on every device, the CPU too, so that tests on the CPU
/// count the reads a GPU would wait for.
pub fn host_f32<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    let v = values_f32(t);
    crate::transfers::count_read(v.len());
    v
}

/// [`host_f32`] where a host tensor's copy is not counted as a read: for values already moved
/// to the host (a device's results read there in one read), whose copies wait for nothing.
pub fn host_values<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    match is_host_device(&t.device()) {
        true => values_f32(t),
        false => host_f32(t),
    }
}

fn values_f32<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.to_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 data")
}

/// Codes wherever the kernel that made them left them.
#[derive(Clone, Debug)]
pub enum Codes {
    /// On the host (host kernel).
    Host(HostQuantized),
    /// On the device (portable kernel).
    Device(Box<Quantized>),
}

impl Codes {
    /// The codes on the host.
    pub fn into_host(self) -> HostQuantized {
        match self {
            Codes::Host(h) => h,
            Codes::Device(q) => q.to_host(),
        }
    }
}

impl Quantizer {
    /// Quantizes and dequantizes in one step (the inner step of LoftQ): only the dequantized
    /// matrix comes back to the device; with the host kernel the codes stay on the host.
    pub fn quantize_dequantize(&self, w: &Tensor<2>) -> Result<(Codes, Tensor<2>), QuantError> {
        self.quantize_dequantize_checked(w, true)
    }

    /// [`Self::quantize_dequantize`]; with `check` false the caller vouches that `w` is
    /// finite, and the device kernel skips the check (a read that waits for the device).
    pub(crate) fn quantize_dequantize_checked(
        &self,
        w: &Tensor<2>,
        check: bool,
    ) -> Result<(Codes, Tensor<2>), QuantError> {
        let device = w.device();
        let shape: [usize; 2] = w.dims();
        match Kernel::Auto.resolve(&device) {
            Kernel::Host => {
                let q = self.quantize_host(&host_f32(w), shape)?;
                let v = self.dequantize_host(&q);
                Ok((Codes::Host(q), crate::transfers::upload(v, shape, &device)))
            }
            _ => {
                let (q, deq) = self.quantize_dequantize_portable(w, check)?;
                Ok((Codes::Device(Box::new(q)), deq))
            }
        }
    }

    /// Quantizes and dequantizes with tensor ops on any back end, the codes left on the
    /// device; `check` as in [`Self::quantize_dequantize_checked`].
    pub(crate) fn quantize_dequantize_portable(
        &self,
        w: &Tensor<2>,
        check: bool,
    ) -> Result<(Quantized, Tensor<2>), QuantError> {
        let (q, deq) = self.quantize_portable(w, w.dims(), check, None)?;
        let deq = deq.unwrap_or_else(|| self.dequantize_portable(&q));
        Ok((q, deq))
    }

    /// Quantizes `x` and returns the codes with LoftQ's residual `w − dequantized`;
    /// `check` as in [`Self::quantize_dequantize_checked`].
    pub(crate) fn quantize_residual_checked(
        &self,
        x: &Tensor<2>,
        w: &Tensor<2>,
        check: bool,
    ) -> Result<(Codes, Tensor<2>), QuantError> {
        if Kernel::Auto.resolve(&x.device()) == Kernel::Host {
            let (codes, q) = self.quantize_dequantize_checked(x, check)?;
            return Ok((codes, w.clone() - q));
        }
        let (q, residual) = self.quantize_residual_portable(x, w, check)?;
        Ok((Codes::Device(Box::new(q)), residual))
    }

    /// [`Self::quantize_residual_checked`] with tensor ops on any back end: one pass for
    /// codebook schemes on WGPU and CUDA, which reads `x` and `w` once and writes codes,
    /// scales and the residual once.
    pub(crate) fn quantize_residual_portable(
        &self,
        x: &Tensor<2>,
        w: &Tensor<2>,
        check: bool,
    ) -> Result<(Quantized, Tensor<2>), QuantError> {
        let (q, residual) = self.quantize_portable(x, x.dims(), check, Some(w))?;
        let residual = residual.unwrap_or_else(|| w.clone() - self.dequantize_portable(&q));
        Ok((q, residual))
    }

    /// Whether `b` matrices of `shape` stacked as one `[b·rows, cols]` matrix get each
    /// matrix's own blocks (whole blocks per matrix), with the portable kernel's tensor ops
    /// (not llama.cpp's k-quants or IQ4_NL, which search scales on the host).
    pub(crate) fn stacks(&self, shape: [usize; 2]) -> bool {
        let host_search = matches!(self.config.scheme,
            Scheme::Ggml { format } if format.is_k() || format == GgmlFormat::Iq4Nl);
        self.block_len(shape)
            .is_ok_and(|block| (shape[0] * shape[1]).is_multiple_of(block))
            && !host_search
    }

    /// Quantizes a `[rows, cols]` matrix on its device (see [`Kernel::Auto`]).
    ///
    /// # Errors
    /// [`QuantError::NonFinite`] for a NaN/±inf weight, naming its row and column.
    pub fn quantize(&self, w: &Tensor<2>) -> Result<Quantized, QuantError> {
        self.quantize_with(w, Kernel::Auto)
    }

    /// Quantizes with a chosen implementation.
    pub fn quantize_with(&self, w: &Tensor<2>, kernel: Kernel) -> Result<Quantized, QuantError> {
        let device = w.device();
        let shape: [usize; 2] = w.dims();
        match kernel.resolve(&device) {
            Kernel::Host => {
                let q = self.quantize_host(&host_f32(w), shape)?;
                Ok(Quantized::from_host(&q, &device))
            }
            _ => Ok(self.quantize_portable(w, shape, true, None)?.0),
        }
    }

    /// Dequantizes on the device of `q` (see [`Kernel::Auto`]).
    pub fn dequantize(&self, q: &Quantized) -> Tensor<2> {
        self.dequantize_with(q, Kernel::Auto)
    }

    /// Dequantizes with a chosen implementation.
    pub fn dequantize_with(&self, q: &Quantized, kernel: Kernel) -> Tensor<2> {
        let device = q.device();
        match kernel.resolve(&device) {
            Kernel::Host => {
                let v = self.dequantize_host(&q.to_host());
                crate::transfers::upload(v, q.shape, &device)
            }
            _ => self.dequantize_portable(q),
        }
    }

    /// The codes, and where one kernel made both (codebook schemes on WGPU and CUDA) the
    /// dequantized values, or `minus` less them.
    fn quantize_portable(
        &self,
        w: &Tensor<2>,
        shape: [usize; 2],
        check: bool,
        minus: Option<&Tensor<2>>,
    ) -> Result<(Quantized, Option<Tensor<2>>), QuantError> {
        let n = shape[0] * shape[1];
        let block = self.block_len(shape)?;
        if let Scheme::Ggml { format } = self.config.scheme
            && (format.is_k() || format == GgmlFormat::Iq4Nl)
        {
            // A search over trial scales per block: the host kernel, on every back end.
            let q = self.quantize_host(&host_f32(w), shape)?;
            return Ok((Quantized::from_host(&q, &w.device()), None));
        }
        if check && non_finite(w) {
            // Rare path: find the position on the host for the message.
            return Err(non_finite_error(&host_f32(w), shape[1]));
        }
        if matches!(
            self.config.scheme,
            Scheme::Nf { .. } | Scheme::UniformCodebook { .. }
        ) && let Some((codes, scales, values)) = super::cube::quantize_codebook(
            w,
            &self.thresholds,
            &self.levels,
            block,
            self.config.rounding,
            minus,
        ) {
            let bits = self.config.scheme.bits();
            let q = Quantized {
                shape,
                block,
                bits,
                codes,
                scales,
                mins: None,
            };
            return Ok((q, Some(values)));
        }
        let flat = w.clone().reshape([n]);
        let full = n / block;
        let mut parts = Vec::new();
        if full > 0 {
            parts.push(
                self.portable_blocks(flat.clone().slice(0..full * block).reshape([full, block])),
            );
        }
        if !n.is_multiple_of(block) {
            let tail = n - full * block;
            parts.push(self.portable_blocks(flat.slice(full * block..n).reshape([1, tail])));
        }
        let codes = join(parts.iter().map(|p| p.0.clone()).collect());
        let scales = join(parts.iter().map(|p| p.1.clone()).collect());
        let mins = parts[0]
            .2
            .as_ref()
            .map(|_| join(parts.iter().map(|p| p.2.clone().expect("mins")).collect()));
        let q = Quantized {
            shape,
            block,
            bits: self.config.scheme.bits(),
            codes,
            scales,
            mins,
        };
        Ok((q, None))
    }
}
