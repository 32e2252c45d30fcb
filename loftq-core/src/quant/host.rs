//! Host (CPU) kernels: block-wise quantize and dequantize over plain slices.
//!
//! These are the fast path of the `flex` back end and the reference the portable tensor-op path
//! is tested against. They are written so the compiler vectorises them: one pass for the block
//! statistics, one branch-free pass for the codes, no per-element search.

use super::quantizer::qmax;
use super::{Quantizer, Rounding, Scheme};
use crate::QuantError;

/// Codes and scales of one matrix, unpacked, on the host.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostQuantized {
    /// `[rows, cols]` of the original matrix.
    pub shape: [usize; 2],
    /// Elements per block (the last block may be shorter).
    pub block: usize,
    /// One code per element, row-major.
    pub codes: Vec<u8>,
    /// One scale per block: the absmax, or the step for [`Scheme::IntAsym`].
    pub scales: Vec<f32>,
    /// One minimum per block for [`Scheme::IntAsym`], empty otherwise.
    pub mins: Vec<f32>,
}

impl HostQuantized {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    /// Number of blocks, tail block included.
    pub fn num_blocks(&self) -> usize {
        self.numel().div_ceil(self.block)
    }
}

/// The error for the first NaN/±inf of a row-major matrix with `cols` columns.
///
/// # Panics
/// If every value is finite.
pub(super) fn non_finite_error(x: &[f32], cols: usize) -> QuantError {
    let i = x
        .iter()
        .position(|v| !v.is_finite())
        .expect("a non-finite value");
    QuantError::NonFinite {
        row: i / cols.max(1),
        col: i % cols.max(1),
        value: x[i],
    }
}

/// Below this many elements the kernels stay on the calling thread.
const PARALLEL_MIN: usize = 1 << 16;

impl Quantizer {
    /// Quantizes a row-major `[rows, cols]` matrix held in `x`.
    ///
    /// # Errors
    /// [`QuantError::NonFinite`] naming the first NaN/±inf; [`QuantError::InvalidConfig`] when
    /// `x.len()` does not match `shape`.
    pub fn quantize_host(&self, x: &[f32], shape: [usize; 2]) -> Result<HostQuantized, QuantError> {
        let mut out = HostQuantized::default();
        self.quantize_host_into(x, shape, &mut out)?;
        Ok(out)
    }

    /// Like [`Quantizer::quantize_host`], reusing the buffers of `out`.
    pub fn quantize_host_into(
        &self,
        x: &[f32],
        shape: [usize; 2],
        out: &mut HostQuantized,
    ) -> Result<(), QuantError> {
        let n = shape[0] * shape[1];
        if x.len() != n {
            return Err(QuantError::InvalidConfig(format!(
                "{} values for a {shape:?} matrix",
                x.len()
            )));
        }
        let block = self.block_len(shape)?;
        let nb = n.div_ceil(block);
        let asym = self.config.scheme.has_mins();
        out.shape = shape;
        out.block = block;
        out.codes.resize(n, 0);
        out.scales.resize(nb, 0.0);
        out.mins.resize(if asym { nb } else { 0 }, 0.0);

        // Runs are whole super-blocks for the formats quantized a super-block at a time.
        let unit = match self.config.scheme {
            Scheme::Ggml { format } => format.super_block(),
            _ => block,
        };
        let ok = split_blocks(
            x,
            block,
            unit,
            &mut out.codes,
            &mut out.scales,
            &mut out.mins,
            |x, codes, scales, mins| quantize_range(self, x, block, codes, scales, mins),
        );
        if !ok {
            return Err(non_finite_error(x, shape[1]));
        }
        Ok(())
    }
}

impl Quantizer {
    /// Absmax-scaled schemes (codebooks and symmetric integers); returns the absmax.
    #[inline(always)]
    fn quantize_absmax(&self, x: &[f32], absmax: f32, codes: &mut [u8]) -> f32 {
        if absmax == 0.0 || !absmax.is_finite() {
            codes.fill(self.zero_code);
            return absmax;
        }
        match self.config.scheme {
            Scheme::IntSym { bits } => {
                let q = qmax(bits) as f32;
                normalized(x, absmax, 0.0, self.config.rounding, codes, |v| {
                    ((v * q).round_ties_even().clamp(-q, q) + q) as u8
                })
            }
            _ if (self.table16.as_ref())
                .is_some_and(|t| t.codes(x, absmax, self.config.rounding, codes)) => {}
            _ => match self.thresholds.len() {
                1 => self.codes_linear::<1>(x, absmax, codes),
                3 => self.codes_linear::<3>(x, absmax, codes),
                7 => self.codes_linear::<7>(x, absmax, codes),
                15 => self.codes_linear::<15>(x, absmax, codes),
                _ => {
                    let t = &self.search;
                    let top = t.len().div_ceil(2);
                    normalized(x, absmax, 0.0, self.config.rounding, codes, |v| {
                        let mut c = 0usize;
                        let mut step = top;
                        while step > 0 {
                            c |= step & 0usize.wrapping_sub(usize::from(v >= t[c | (step - 1)]));
                            step /= 2;
                        }
                        c as u8
                    })
                }
            },
        }
        absmax
    }

    /// Codes by counting thresholds, 64 values at a time with the threshold loop outside, so
    /// each comparison is one vector instruction over many values.
    #[inline(always)]
    fn codes_linear<const T: usize>(&self, x: &[f32], absmax: f32, codes: &mut [u8]) {
        const W: usize = 64;
        let t: [f32; T] = self.thresholds[..].try_into().expect("threshold count");
        let mut v = [0f32; W];
        for (xc, cc) in x.chunks(W).zip(codes.chunks_mut(W)) {
            let n = xc.len();
            match self.config.rounding {
                Rounding::Peft => v.iter_mut().zip(xc).for_each(|(o, &x)| *o = x / absmax),
                Rounding::Bnb => {
                    let inv = 1.0 / absmax;
                    v.iter_mut().zip(xc).for_each(|(o, &x)| *o = x * inv);
                }
            }
            // Lanes past `n` hold stale values; their counts are never stored.
            let mut acc = [0u32; W];
            for &tk in &t {
                for (a, &vi) in acc.iter_mut().zip(&v) {
                    *a = a.wrapping_add(u32::from(vi >= tk));
                }
            }
            for (c, &a) in cc.iter_mut().zip(&acc[..n]) {
                *c = a as u8;
            }
        }
    }

    /// Asymmetric integers; returns `(step, min)`.
    #[inline(always)]
    fn quantize_affine(&self, x: &[f32], codes: &mut [u8], bits: u8) -> (f32, f32) {
        let (min, max) = x
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let top = ((1u32 << bits) - 1) as f32;
        let step = (max - min) / top;
        if step == 0.0 || !step.is_finite() {
            codes.fill(0);
            return (step, min);
        }
        normalized(x, step, min, self.config.rounding, codes, |v| {
            v.round_ties_even().clamp(0.0, top) as u8
        });
        (step, min)
    }

    /// Dequantizes into a new row-major buffer.
    pub fn dequantize_host(&self, q: &HostQuantized) -> Vec<f32> {
        let mut out = vec![0.0; q.numel()];
        self.dequantize_host_into(q, &mut out);
        out
    }

    /// Dequantizes into `out` (`q.numel()` values, row-major).
    ///
    /// # Panics
    /// If `out` or the buffers of `q` have the wrong length.
    pub fn dequantize_host_into(&self, q: &HostQuantized, out: &mut [f32]) {
        assert_eq!(out.len(), q.numel(), "output length");
        assert_eq!(q.codes.len(), q.numel(), "code count");
        assert_eq!(q.scales.len(), q.num_blocks(), "scale count");
        let block = q.block;
        let per = blocks_per_thread(q.numel(), block);
        if per * block >= q.numel() {
            return dequantize_range(self, &q.codes, &q.scales, &q.mins, block, out);
        }
        std::thread::scope(|s| {
            for (i, (o, c)) in out
                .chunks_mut(per * block)
                .zip(q.codes.chunks(per * block))
                .enumerate()
            {
                let scales = &q.scales[i * per..];
                let mins = if q.mins.is_empty() {
                    &[][..]
                } else {
                    &q.mins[i * per..]
                };
                s.spawn(move || dequantize_range(self, c, scales, mins, block, o));
            }
        });
    }

    /// `out = w − dequant(q)` in one pass: each thread dequantizes a cache-sized run of
    /// blocks and subtracts it from `w` while it is still in cache (LoftQ's residual).
    ///
    /// # Panics
    /// If `w`, `out` or the buffers of `q` have the wrong length.
    pub fn residual_host_into(&self, q: &HostQuantized, w: &[f32], out: &mut [f32]) {
        assert_eq!(w.len(), q.numel(), "weight length");
        assert_eq!(out.len(), q.numel(), "output length");
        assert_eq!(q.codes.len(), q.numel(), "code count");
        assert_eq!(q.scales.len(), q.num_blocks(), "scale count");
        let block = q.block;
        // About 64 KiB of output per run.
        let run_blocks = (16_384 / block).max(1);
        let per = blocks_per_thread(q.numel(), block).div_ceil(run_blocks) * run_blocks;
        let work = |first_block: usize, o: &mut [f32], c: &[u8], w: &[f32]| {
            let runs = o
                .chunks_mut(run_blocks * block)
                .zip(c.chunks(run_blocks * block))
                .zip(w.chunks(run_blocks * block));
            for (r, ((o, c), w)) in runs.enumerate() {
                let b = first_block + r * run_blocks;
                let mins = if q.mins.is_empty() {
                    &[][..]
                } else {
                    &q.mins[b..]
                };
                dequantize_range(self, c, &q.scales[b..], mins, block, o);
                o.iter_mut().zip(w).for_each(|(o, w)| *o = w - *o);
            }
        };
        std::thread::scope(|s| {
            let chunks = out
                .chunks_mut(per * block)
                .zip(q.codes.chunks(per * block))
                .zip(w.chunks(per * block));
            for (i, ((o, c), w)) in chunks.enumerate() {
                s.spawn(move || work(i * per, o, c, w));
            }
        });
    }
}

/// Applies `code(v)` to every normalised `v = (x − offset) / scale` of a block, with the
/// division of `rounding` (true division, or a multiply by the reciprocal).
#[inline(always)]
fn normalized(
    x: &[f32],
    scale: f32,
    offset: f32,
    rounding: Rounding,
    codes: &mut [u8],
    code: impl Fn(f32) -> u8,
) {
    match rounding {
        Rounding::Peft => {
            for (c, &v) in codes.iter_mut().zip(x) {
                *c = code((v - offset) / scale);
            }
        }
        Rounding::Bnb => {
            let inv = 1.0 / scale;
            for (c, &v) in codes.iter_mut().zip(x) {
                *c = code((v - offset) * inv);
            }
        }
    }
}

/// Blocks per worker so that every available core gets an equal share of large inputs.
fn blocks_per_thread(n: usize, block: usize) -> usize {
    let nb = n.div_ceil(block).max(1);
    let threads = if n < PARALLEL_MIN {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |t| t.get())
    };
    nb.div_ceil(threads)
}

/// Runs `f` on disjoint runs of whole units (`unit` a multiple of `block`) in parallel; true if
/// every run returned true.
fn split_blocks(
    x: &[f32],
    block: usize,
    unit: usize,
    codes: &mut [u8],
    scales: &mut [f32],
    mins: &mut [f32],
    f: impl Fn(&[f32], &mut [u8], &mut [f32], &mut [f32]) -> bool + Sync,
) -> bool {
    let per = blocks_per_thread(x.len(), unit) * unit / block;
    if per * block >= x.len() {
        return f(x, codes, scales, mins);
    }
    let f = &f;
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        let (mut x, mut codes, mut scales, mut mins) = (x, codes, scales, mins);
        while !x.is_empty() {
            let take = (per * block).min(x.len());
            let nb = take.div_ceil(block);
            let (xh, xt) = x.split_at(take);
            let (ch, ct) = std::mem::take(&mut codes).split_at_mut(take);
            let (sh, st) = std::mem::take(&mut scales).split_at_mut(nb);
            let m = nb.min(mins.len());
            let (mh, mt) = std::mem::take(&mut mins).split_at_mut(m);
            handles.push(s.spawn(move || f(xh, ch, sh, mh)));
            (x, codes, scales, mins) = (xt, ct, st, mt);
        }
        handles
            .into_iter()
            .all(|h| h.join().expect("quantizer worker panicked"))
    })
}

/// True if no value is NaN or infinite.
#[inline(always)]
fn all_finite(x: &[f32]) -> bool {
    x.iter().fold(true, |ok, v| ok & v.is_finite())
}

crate::multiversion! {
    /// Quantizes consecutive blocks of `x` with `quantizer`; returns false if a value was not
    /// finite.
    pub(super) fn quantize_range(
        quantizer: &Quantizer,
        x: &[f32],
        block: usize,
        codes: &mut [u8],
        scales: &mut [f32],
        mins: &mut [f32],
    ) -> bool {
        if let Scheme::Ggml { format } = quantizer.config.scheme {
            let ok = all_finite(x);
            if ok {
                format.quantize_run(x, codes, scales, mins);
            }
            return ok;
        }
        let mut ok = true;
        for (b, (xb, cb)) in x.chunks(block).zip(codes.chunks_mut(block)).enumerate() {
            match quantizer.config.scheme {
                Scheme::IntAsym { bits } => {
                    ok &= all_finite(xb);
                    let (step, min) = quantizer.quantize_affine(xb, cb, bits);
                    scales[b] = step;
                    mins[b] = min;
                }
                _ => {
                    let bits = crate::quant::simd::absmax_bits(xb);
                    // NaN and ±inf have the largest magnitude bit patterns.
                    ok &= bits < f32::INFINITY.to_bits();
                    scales[b] = quantizer.quantize_absmax(xb, f32::from_bits(bits), cb);
                }
            }
        }
        ok
    }
}

crate::multiversion! {
    /// Dequantizes consecutive blocks with `quantizer` into `out`.
    pub(super) fn dequantize_range(
        quantizer: &Quantizer,
        codes: &[u8],
        scales: &[f32],
        mins: &[f32],
        block: usize,
        out: &mut [f32],
    ) {
        for (b, (cb, ob)) in codes.chunks(block).zip(out.chunks_mut(block)).enumerate() {
            let s = scales[b];
            match quantizer.config.scheme {
                Scheme::IntSym { bits } => {
                    let q = qmax(bits);
                    let qf = q as f32;
                    for (o, &c) in ob.iter_mut().zip(cb) {
                        *o = (i32::from(c).wrapping_sub(q) as f32 * s) / qf;
                    }
                }
                Scheme::IntAsym { .. } => {
                    let m = mins[b];
                    for (o, &c) in ob.iter_mut().zip(cb) {
                        *o = f32::from(c) * s + m;
                    }
                }
                Scheme::Ggml { format } => {
                    let m = mins.get(b).copied().unwrap_or(0.0);
                    for (o, &c) in ob.iter_mut().zip(cb) {
                        *o = format.value(c, s, m);
                    }
                }
                _ if quantizer
                    .levels16
                    .is_some_and(|t| crate::quant::simd::dequant16(cb, &t, s, ob)) => {}
                _ => {
                    let levels = &quantizer.levels;
                    for (o, &c) in ob.iter_mut().zip(cb) {
                        *o = levels[usize::from(c) & (levels.len() - 1)] * s;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::QuantConfig;
    use crate::quant::GgmlFormat;

    type Quantize = fn(&Quantizer, &[f32], usize, &mut [u8], &mut [f32], &mut [f32]) -> bool;

    /// The copies `multiversion!` compiles for this CPU give the portable copy's codes, scales
    /// and values, for every kind of scheme (codebook, integers, llama.cpp's blocks).
    #[test]
    fn vector_copies_give_the_portable_bits() {
        let x: Vec<f32> = (0..4096)
            .map(|i| ((i as f32 * 0.37).sin() * 3.0) / (1.0 + (i % 7) as f32))
            .collect();
        for config in [
            QuantConfig::nf(4),
            QuantConfig::nf(2),
            QuantConfig::int(4, true),
            QuantConfig::int(3, false),
            QuantConfig::ggml(GgmlFormat::Q4_1),
        ] {
            let q = Quantizer::new(config).unwrap();
            let block = 32;
            let n = x.len() / block;
            let run = |f: Quantize| {
                let (mut c, mut s, mut m) = (vec![0u8; x.len()], vec![0f32; n], vec![0f32; n]);
                assert!(f(&q, &x, block, &mut c, &mut s, &mut m));
                (c, s, m)
            };
            let (c, s, m) = run(quantize_range);
            assert_eq!(
                (c.clone(), s.clone(), m.clone()),
                run(quantize_range::portable)
            );
            let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            dequantize_range(&q, &c, &s, &m, block, &mut a);
            dequantize_range::portable(&q, &c, &s, &m, block, &mut b);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "{config}");
        }
    }
}
