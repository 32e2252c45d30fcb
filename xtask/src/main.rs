//! `cargo xtask`: project automation, plain `std` so it builds in seconds.
//!
//! - `cargo xtask test [--cpu-only]`: the test suite on the CPU, then the device-generic tests
//!   again on WGPU (`LOFTQ_DEVICE=wgpu`; Mesa's software Vulkan where there is no GPU).
//! - `cargo xtask validate [--cpu-only]`: `cargo fmt --check`, clippy with `-D warnings`, then
//!   `test` (cheapest first).
//! - `cargo xtask bench [--quick] [--backends cpu,wgpu,cuda] [--out DIR]`: the benchmark suites.
//! - `cargo xtask assets`: fetch the real model and text (SmolLM2-135M, Shakespeare) once into
//!   a cache folder, SHA-256 checked; tests that need them skip with a reason without them.
//! - `cargo xtask demo`: `loftq init` at NF2/NF4 with the QLoRA and LoftQ starts on SmolLM2,
//!   perplexity of each start (a synthetic model when the download is impossible).

mod assets;
mod demo;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

/// Features under which the tests build: the CPU back end plus WGPU, in one build.
const TEST_FEATURES: &str = "loftq-core/wgpu";

/// Integration tests whose device comes from `LOFTQ_DEVICE`.
const DEVICE_TESTS: &[&str] = &[
    "quant_reference",
    "loftq_reference",
    "lowrank_and_init",
    "model_reference",
    "files",
    "gguf",
    "init",
    "train",
];

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(what: &str, cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: {what}: {cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

fn test(cpu_only: bool) -> Result<(), String> {
    run(
        "tests on cpu",
        cargo()
            .args(["test", "--workspace", "--features", TEST_FEATURES])
            .env("LOFTQ_DEVICE", "cpu"),
    )?;
    if cpu_only {
        eprintln!("xtask: skipping the wgpu pass (--cpu-only)");
        return Ok(());
    }
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--features", TEST_FEATURES]);
    for t in DEVICE_TESTS {
        cmd.args(["--test", t]);
    }
    run("device tests on wgpu", cmd.env("LOFTQ_DEVICE", "wgpu"))
}

fn validate(cpu_only: bool) -> Result<(), String> {
    run("format", cargo().args(["fmt", "--all", "--check"]))?;
    run(
        "clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    test(cpu_only)
}

fn bench(args: &[String]) -> Result<(), String> {
    let mut backends = vec!["cpu".to_string()];
    let mut quick = false;
    let mut out = PathBuf::from("bench/results");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--full" => quick = false,
            "--backends" => {
                let list = it.next().ok_or("--backends needs a list, e.g. cpu,wgpu")?;
                backends = list.split(',').map(str::to_string).collect();
            }
            "--out" => out = PathBuf::from(it.next().ok_or("--out needs a directory")?),
            other => return Err(format!("bench: unknown argument `{other}`")),
        }
    }
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    for backend in &backends {
        // Build with the test features (one shared build); CUDA only when asked for.
        let feature = match backend.as_str() {
            "cpu" | "wgpu" => "loftq-bench/wgpu",
            b if b.starts_with("cuda") => "loftq-bench/wgpu,loftq-bench/cuda",
            b => return Err(format!("bench: unknown back end `{b}` (cpu, wgpu, cuda)")),
        };
        let json = out.join(format!("quant-{}.json", backend.replace(':', "-")));
        let size = if quick { "2048" } else { "4096" };
        let result = run(
            &format!("quant suite on {backend}"),
            cargo()
                .args(["run", "-p", "loftq-bench", "--features", feature, "--"])
                .args(["quant", "--size", size, "--device", backend, "--json"])
                .arg(&json),
        );
        if let Err(e) = result {
            eprintln!("xtask: {backend} skipped: {e}");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cpu_only = args.iter().any(|a| a == "--cpu-only");
    let result = match args.first().map(String::as_str) {
        Some("test") => test(cpu_only),
        Some("validate") => validate(cpu_only),
        Some("bench") => bench(&args[1..]),
        Some("assets") => assets::fetch(),
        Some("demo") => demo::run(),
        _ => Err(
            "usage: cargo xtask <test|validate|bench|assets|demo> [options]\n\
                  test [--cpu-only]      tests on cpu, then the device tests on wgpu\n\
                  validate [--cpu-only]  fmt --check, clippy -D warnings, test\n\
                  bench [--quick|--full] [--backends cpu,wgpu,cuda] [--out DIR]\n\
                  assets                 fetch SmolLM2-135M and Shakespeare into the cache\n\
                  demo                   the main job end to end: init NF2/NF4 QLoRA/LoftQ, perplexity"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
