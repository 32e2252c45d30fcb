//! Quantizer throughput: NF4 quantize + dequantize of a square matrix against a plain copy of
//! the same bytes, measured in the same run.

use std::hint::black_box;

use burn::tensor::{Tensor, TensorData};
use loftq_core::quant::{HostQuantized, Kernel};
use loftq_core::{DeviceSpec, QuantConfig, Quantizer};
use serde::Serialize;

use crate::stats::{Timing, time};

/// Results of the quantizer suite.
#[derive(Debug, Serialize)]
pub struct QuantReport {
    /// Matrix side.
    pub size: usize,
    /// Quantizer label.
    pub quantizer: String,
    /// `dst.copy_from_slice(src)` of the `f32` matrix, one thread.
    pub copy_1t: Timing,
    /// The same copy split across all cores.
    pub copy_mt: Timing,
    /// Host kernel, quantize (codes + absmax).
    pub quantize: Timing,
    /// Host kernel, dequantize back to `f32`.
    pub dequantize: Timing,
    /// Quantize + dequantize through `Tensor`s on the chosen device (includes its copies).
    pub device_roundtrip: Timing,
    /// Device used for `device_roundtrip`.
    pub device: String,
    /// Elements per second of quantize + dequantize (host kernel, medians).
    pub elements_per_s: f64,
    /// (quantize + dequantize) / fastest copy, medians: 4 or less means memory-bound.
    pub ratio_to_copy: f64,
}

/// Runs the suite on a `size × size` Gaussian matrix.
pub fn run(size: usize, repeats: usize, spec: DeviceSpec) -> QuantReport {
    let n = size * size;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i as f32) * 0.618_034).sin() * 0.02)
        .collect();
    let cfg = QuantConfig::nf4();
    let quantizer = Quantizer::new(cfg).expect("valid config");

    let mut dst = vec![0f32; n];
    let copy_1t = time(repeats, || dst.copy_from_slice(black_box(&x)));
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let chunk = n.div_ceil(threads);
    let copy_mt = time(repeats, || {
        std::thread::scope(|s| {
            for (d, src) in dst.chunks_mut(chunk).zip(x.chunks(chunk)) {
                s.spawn(move || d.copy_from_slice(src));
            }
        })
    });

    let mut q = HostQuantized::default();
    let quantize = time(repeats, || {
        quantizer
            .quantize_host_into(black_box(&x), [size, size], &mut q)
            .expect("finite input")
    });
    let dequantize = time(repeats, || {
        quantizer.dequantize_host_into(black_box(&q), &mut dst)
    });

    let device = spec.device().expect("device");
    let w = Tensor::<2>::from_data(TensorData::new(x.clone(), [size, size]), &device);
    let device_roundtrip = time(repeats, || {
        let q = quantizer
            .quantize_with(&w, Kernel::Auto)
            .expect("finite input");
        let y = quantizer.dequantize(&q);
        black_box(y.into_data());
    });

    let kernel_s = quantize.median_s + dequantize.median_s;
    QuantReport {
        size,
        quantizer: cfg.label(),
        elements_per_s: n as f64 / kernel_s,
        ratio_to_copy: kernel_s / copy_1t.median_s.min(copy_mt.median_s),
        copy_1t,
        copy_mt,
        quantize,
        dequantize,
        device_roundtrip,
        device: spec.to_string(),
    }
}

/// Markdown summary.
pub fn markdown(r: &QuantReport) -> String {
    let row = |case: String, t: &Timing| {
        format!(
            "| {case} | {:.1} ms | {:.1}–{:.1} ms |\n",
            t.median_s * 1e3,
            t.min_s * 1e3,
            t.max_s * 1e3
        )
    };
    let (n, q) = (r.size, &r.quantizer);
    [
        "| case | median | min–max |\n|---|---|---|\n".to_string(),
        row(format!("copy {n}² f32, 1 thread"), &r.copy_1t),
        row(format!("copy {n}² f32, all cores"), &r.copy_mt),
        row(format!("{q} quantize (host kernel)"), &r.quantize),
        row(format!("{q} dequantize (host kernel)"), &r.dequantize),
        row(
            format!("{q} quantize+dequantize via Tensor on {}", r.device),
            &r.device_roundtrip,
        ),
        format!(
            "\nquantize+dequantize: {:.0} M elements/s, {:.2}× the fastest copy\n",
            r.elements_per_s / 1e6,
            r.ratio_to_copy
        ),
    ]
    .concat()
}
