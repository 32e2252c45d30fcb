//! Quantize a Gaussian matrix with every scheme and print the reconstruction error and the
//! storage cost.
//!
//! ```text
//! cargo run -p loftq-examples --example quantize [-- --device wgpu]
//! ```

use burn::tensor::{Tensor, TensorData};
use loftq_core::quant::{PackedTensor, Scheme};
use loftq_core::{DeviceSpec, QuantConfig, Quantizer};

#[allow(clippy::print_stdout)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let spec: DeviceSpec = match args.iter().position(|a| a == "--device") {
        Some(i) => args.get(i + 1).ok_or("--device needs a name")?.parse()?,
        None => DeviceSpec::Cpu,
    };
    let device = spec.device()?;

    // A weight-like matrix: Gaussian, std 0.02, [out, in] = [1024, 1024].
    let (rows, cols) = (1024, 1024);
    let mut state = 42u64;
    let mut uniform = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let data: Vec<f32> = (0..rows * cols)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos() * 0.02) as f32
        })
        .collect();
    let w = Tensor::<2>::from_data(TensorData::new(data.clone(), [rows, cols]), &device);
    let norm = data
        .iter()
        .map(|x| f64::from(*x).powi(2))
        .sum::<f64>()
        .sqrt();

    println!("{rows}×{cols} Gaussian (std 0.02) on {spec}\n");
    println!("| quantizer | ‖W − Q(W)‖ / ‖W‖ | bits/param |");
    println!("|---|---|---|");
    let configs = [
        QuantConfig::nf(2),
        QuantConfig::nf(3),
        QuantConfig::nf4(),
        QuantConfig::nf4().with_double_quant(true),
        QuantConfig::nf(8),
        QuantConfig::new(Scheme::IntSym { bits: 4 }),
        QuantConfig::new(Scheme::IntAsym { bits: 4 }),
        QuantConfig::new(Scheme::IntAsym { bits: 2 }),
        QuantConfig::int8_rowwise(),
    ];
    for cfg in configs {
        let quantizer = Quantizer::new(cfg)?;
        // Quantize on the device, pack on the host, and measure what the packed form holds
        // (double quantization changes the scales, so measure after packing).
        let q = quantizer.quantize(&w)?;
        let packed = PackedTensor::pack(&q.to_host(), cfg);
        let back = packed.dequantize()?;
        let err: f64 = data
            .iter()
            .zip(&back)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum();
        let rel = err.sqrt() / norm;
        println!(
            "| {} | {rel:.4} | {:.3} |",
            cfg.label(),
            packed.bits_per_param()
        );
    }
    Ok(())
}
