//! `loftq`: the command-line tool of loftq-rs.
//!
//! This release has `codebook`; `init`, `eval`, `train`, `inspect` and `convert` come with the
//! model, LoftQ and training work (see README.md).

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use loftq_core::quant::{Codebook, Rounding};

#[derive(Parser)]
#[command(
    version,
    about = "LoftQ: quantization-aware LoRA initialisation and fine-tuning"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a codebook's levels and decision thresholds.
    Codebook {
        /// nf (NormalFloat, as bitsandbytes/PEFT) or uniform (PEFT's linspace(-1, 1, 2^bits)).
        #[arg(value_enum)]
        kind: Kind,
        /// Bits per code, 1 to 8.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=8))]
        bits: u8,
        /// Threshold rule: peft (nearest level, lower on ties) or bnb (midpoints).
        #[arg(long, value_enum, default_value_t = RoundingArg::Peft)]
        rounding: RoundingArg,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Nf,
    Uniform,
}

#[derive(Clone, Copy, ValueEnum)]
enum RoundingArg {
    Peft,
    Bnb,
}

#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Codebook {
            kind,
            bits,
            rounding,
        } => {
            let cb = match kind {
                Kind::Nf => Codebook::normal_float(bits),
                Kind::Uniform => Codebook::uniform(bits),
            };
            let rounding = match rounding {
                RoundingArg::Peft => Rounding::Peft,
                RoundingArg::Bnb => Rounding::Bnb,
            };
            let thresholds = cb.thresholds(rounding);
            println!("code\tlevel\tgoes up at (>=)");
            for (i, level) in cb.levels().iter().enumerate() {
                let t = thresholds
                    .get(i)
                    .map_or(String::new(), |t| format!("{t:.9e}"));
                println!("{i}\t{level:.9}\t{t}");
            }
        }
    }
    ExitCode::SUCCESS
}
