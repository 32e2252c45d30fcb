//! LoftQ on one weight matrix: the error of plain quantization (QLoRA's start) against LoftQ
//! after T = 1..5 iterations, with the exact and the randomized SVD.
//!
//! ```text
//! cargo run -p loftq-examples --features wgpu --example loftq [-- --size 512 --bits 2 --rank 16 --device cpu]
//! ```

use std::time::Instant;

use burn::tensor::Tensor;
use loftq_core::lowrank::{Gaussian, RsvdConfig, SvdMethod};
use loftq_core::{DeviceSpec, LoftqConfig, QuantConfig, loftq};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T, String> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs a valid value")),
        None => Ok(default),
    }
}

#[allow(clippy::print_stdout)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let size: usize = arg(&args, "--size", 512)?;
    let bits: u8 = arg(&args, "--bits", 2)?;
    let rank: usize = arg(&args, "--rank", 16)?;
    let spec: DeviceSpec = arg(&args, "--device", DeviceSpec::Cpu)?;
    let device = spec.device()?;

    // A weight-like matrix: Gaussian with std 0.02, [out, in] = [size, size].
    let mut g = Gaussian::new(7);
    let data: Vec<f32> = (0..size * size).map(|_| g.normal() as f32 * 0.02).collect();
    let w = Tensor::<2>::from_data(burn::tensor::TensorData::new(data, [size, size]), &device);

    println!("{size}×{size} Gaussian, NF{bits}, rank {rank}, on {spec}\n");
    println!("| T | exact SVD: ‖W−Q−BA‖/‖W‖ | time | randomized: ‖W−Q−BA‖/‖W‖ | time |");
    println!("|---|---|---|---|---|");
    let quant = QuantConfig::nf(bits);
    let mut quant_only = f32::NAN;
    for iters in 1..=5 {
        let mut row = format!("| {iters} |");
        for svd in [
            SvdMethod::Exact,
            SvdMethod::Randomized(RsvdConfig::default()),
        ] {
            let cfg = LoftqConfig {
                svd,
                ..LoftqConfig::new(quant, rank, iters)
            };
            let start = Instant::now();
            let r = loftq(&w, &cfg)?;
            let secs = start.elapsed().as_secs_f64();
            quant_only = r.rel_err_quant;
            row.push_str(&format!(
                " {:.4} (best at t = {}) | {secs:.2} s |",
                r.rel_err(),
                r.best_iter
            ));
        }
        println!("{row}");
    }
    println!("\nquantization only (QLoRA's start): ‖W−Q(W)‖/‖W‖ = {quant_only:.4}");
    Ok(())
}
