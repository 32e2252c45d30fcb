//! `loftq-bench`: measurements of loftq-rs. Not tests: every figure is a ratio or a time
//! measured in the same run, printed as Markdown and optionally written as JSON.

mod quant;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use loftq_core::DeviceSpec;

#[derive(Parser)]
#[command(
    version,
    about = "Benchmarks of loftq-rs (ratios measured in the same run)"
)]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Subcommand)]
enum Suite {
    /// NF4 quantize + dequantize throughput against a plain copy of the same bytes.
    Quant {
        /// Side of the square f32 matrix.
        #[arg(long, default_value_t = 4096)]
        size: usize,
        /// Timed repeats after one warm-up.
        #[arg(long, default_value_t = 9)]
        repeats: usize,
        /// Device for the Tensor round trip: cpu, wgpu, cuda[:N].
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.suite {
        Suite::Quant {
            size,
            repeats,
            device,
            json,
        } => {
            if let Err(e) = device.device() {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            let report = quant::run(size, repeats, device);
            println!("{}", quant::markdown(&report));
            if let Some(path) = json {
                let text = serde_json::to_string_pretty(&report).expect("serializable");
                if let Err(e) = std::fs::write(&path, text) {
                    eprintln!("error: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::SUCCESS
}
