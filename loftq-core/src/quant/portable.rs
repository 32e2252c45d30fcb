//! [`Kernel::Portable`](super::Kernel::Portable)'s quantizers in Burn's tensor ops, for any
//! back end: blocks of codebook, integer and llama.cpp schemes, and their dequantization.

use burn::tensor::{Int, Tensor};

use super::quantizer::qmax;
use super::tensor::{host_f32, join};
use super::{GgmlFormat, Quantized, Quantizer, Rounding, Scheme, round_f16};

impl Quantizer {
    /// Quantizes rows of equal-length blocks `[nb, len]`: flat codes, scales, minimums.
    pub(super) fn portable_blocks(
        &self,
        x: Tensor<2>,
    ) -> (Tensor<1, Int>, Tensor<1>, Option<Tensor<1>>) {
        let [nb, len] = x.dims();
        let normalize = |num: Tensor<2>, scale: &Tensor<2>| {
            // A zero scale only happens where the numerator is zero too: use 1 to get v = 0.
            let safe = scale.clone().mask_fill(scale.clone().equal_elem(0.0), 1.0);
            match self.config.rounding {
                Rounding::Peft => num / safe,
                Rounding::Bnb => num * safe.recip(),
            }
        };
        match self.config.scheme {
            Scheme::Ggml { format } => portable_ggml(x, format),
            Scheme::IntAsym { bits } => {
                let top = ((1u32 << bits) - 1) as f32;
                let min = x.clone().min_dim(1);
                let step = (x.clone().max_dim(1) - min.clone()).div_scalar(top);
                let v = normalize(x - min.clone(), &step);
                let codes = v.round().clamp(0.0, top).int();
                (
                    codes.reshape([nb * len]),
                    step.reshape([nb]),
                    Some(min.reshape([nb])),
                )
            }
            scheme => {
                let absmax = x.clone().abs().max_dim(1);
                let v = normalize(x, &absmax);
                let codes = match scheme {
                    Scheme::IntSym { bits } => {
                        let q = qmax(bits) as f32;
                        v.mul_scalar(q).round().clamp(-q, q).add_scalar(q).int()
                    }
                    _ => self.portable_codebook_codes(v),
                };
                (codes.reshape([nb * len]), absmax.reshape([nb]), None)
            }
        }
    }

    fn portable_codebook_codes(&self, v: Tensor<2>) -> Tensor<2, Int> {
        let [nb, len] = v.dims();
        let device = v.device();
        if self.thresholds.len() <= 15 {
            let mut codes: Tensor<2, Int> = Tensor::zeros([nb, len], &device);
            for &t in &self.thresholds {
                codes = codes + v.clone().greater_equal_elem(t).int();
            }
            return codes;
        }
        // Binary search: one gather of thresholds per bit.
        let table = crate::transfers::upload(self.search.clone(), [self.search.len()], &device);
        let flat = v.reshape([nb * len]);
        let mut codes: Tensor<1, Int> = Tensor::zeros([nb * len], &device);
        let mut step = self.search.len().div_ceil(2);
        while step > 0 {
            let t = table
                .clone()
                .select(0, codes.clone().add_scalar(step as i32 - 1));
            codes = codes + flat.clone().greater_equal(t).int().mul_scalar(step as i32);
            step /= 2;
        }
        codes.reshape([nb, len])
    }

    pub(super) fn dequantize_portable(&self, q: &Quantized) -> Tensor<2> {
        let n = q.shape[0] * q.shape[1];
        let full = n / q.block;
        let mut parts = Vec::new();
        if full > 0 {
            parts.push(self.portable_dequant_blocks(q, 0, full, q.block));
        }
        if !n.is_multiple_of(q.block) {
            parts.push(self.portable_dequant_blocks(q, full, 1, n - full * q.block));
        }
        join(parts).reshape(q.shape)
    }

    /// Dequantizes `count` blocks of `len` elements starting at block `first`; flat output.
    fn portable_dequant_blocks(
        &self,
        q: &Quantized,
        first: usize,
        count: usize,
        len: usize,
    ) -> Tensor<1> {
        let start = first * q.block;
        let codes = q.codes.clone().slice(start..start + count * len);
        let scales = q
            .scales
            .clone()
            .slice(first..first + count)
            .reshape([count, 1]);
        let values: Tensor<2> = match self.config.scheme {
            Scheme::IntSym { bits } => {
                let qm = qmax(bits);
                codes
                    .sub_scalar(qm)
                    .float()
                    .reshape([count, len])
                    .mul(scales)
                    .div_scalar(qm as f32)
            }
            Scheme::Ggml { format } if format.levels().is_some() => {
                let levels = format.levels().expect("checked").to_vec();
                let levels = crate::transfers::upload(levels, [16], &q.device());
                levels.select(0, codes).reshape([count, len]).mul(scales)
            }
            Scheme::Ggml { format } if !format.has_min() => codes
                .sub_scalar(format.offset())
                .float()
                .reshape([count, len])
                .mul(scales),
            Scheme::IntAsym { .. } | Scheme::Ggml { .. } => {
                let mins = q
                    .mins
                    .clone()
                    .expect("asymmetric minimums")
                    .slice(first..first + count);
                codes
                    .float()
                    .reshape([count, len])
                    .mul(scales)
                    .add(mins.reshape([count, 1]))
            }
            _ => {
                let levels =
                    crate::transfers::upload(self.levels.clone(), [self.levels.len()], &q.device());
                levels.select(0, codes).reshape([count, len]).mul(scales)
            }
        };
        values.reshape([count * len])
    }
}

/// llama.cpp's formats with tensor ops, in the order of [`GgmlFormat::quantize_run`]: codes
/// from the `f32` scale, the stored scales rounded to `f16` (on the host: one value per block).
fn portable_ggml(
    x: Tensor<2>,
    format: GgmlFormat,
) -> (Tensor<1, Int>, Tensor<1>, Option<Tensor<1>>) {
    let [nb, len] = x.dims();
    let device = x.device();
    let top = ((1u32 << format.bits()) - 1) as f32;
    let inverse = |d: &Tensor<2>| {
        let zero = d.clone().equal_elem(0.0);
        d.clone()
            .mask_fill(zero.clone(), 1.0)
            .recip()
            .mask_fill(zero, 0.0)
    };
    let to_f16 = |t: Tensor<2>| {
        let v: Vec<f32> = host_f32(&t.reshape([nb]))
            .into_iter()
            .map(round_f16)
            .collect();
        crate::transfers::upload(v, [nb], &device)
    };
    match format {
        GgmlFormat::Q4_0 | GgmlFormat::Q5_0 => {
            // The first value of largest magnitude, with its sign.
            let half = format.offset() as f32;
            let abs = x.clone().abs();
            let not_max = abs.clone().not_equal(abs.max_dim(1).expand([nb, len]));
            let first = Tensor::<1, Int>::arange(0..len as i64, &device)
                .reshape([1, len])
                .expand([nb, len])
                .mask_fill(not_max, len as i32)
                .min_dim(1);
            let d = x.clone().gather(1, first).div_scalar(-half);
            let codes = (x * inverse(&d))
                .add_scalar(half + 0.5)
                .floor()
                .clamp(0.0, top);
            (codes.int().reshape([nb * len]), to_f16(d), None)
        }
        GgmlFormat::Q4_1 | GgmlFormat::Q5_1 => {
            let min = x.clone().min_dim(1);
            let d = (x.clone().max_dim(1) - min.clone()).div_scalar(top);
            let codes = ((x - min.clone()) * inverse(&d))
                .add_scalar(0.5)
                .floor()
                .clamp(0.0, top);
            (
                codes.int().reshape([nb * len]),
                to_f16(d),
                Some(to_f16(min)),
            )
        }
        GgmlFormat::Q8_0 => {
            let d = x.clone().abs().max_dim(1).div_scalar(127.0);
            let v = x * inverse(&d);
            // Half away from zero: floor(a) + floor(2·(a − floor(a))), exact in f32.
            let a = v.clone().abs();
            let fl = a.clone().floor();
            let r = fl.clone() + (a - fl).mul_scalar(2.0).floor();
            let codes = (r * v.sign()).clamp(-127.0, 127.0).add_scalar(128.0);
            (codes.int().reshape([nb * len]), to_f16(d), None)
        }
        GgmlFormat::Iq4Nl | GgmlFormat::Q4K | GgmlFormat::Q5K | GgmlFormat::Q6K => {
            unreachable!("quantized on the host")
        }
    }
}
