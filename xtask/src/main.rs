//! `cargo xtask`: project automation, plain `std` so it builds in seconds.
//!
//! - `cargo xtask test [--cpu-only]`: the test suite on the CPU, then the device-generic tests
//!   again on WGPU (`LOFTQ_DEVICE=wgpu`; Mesa's software Vulkan where there is no GPU).
//! - `cargo xtask validate [--cpu-only]`: `cargo fmt --check`, clippy with `-D warnings`, then
//!   `test` (cheapest first).
//! - `cargo xtask bench [--smoke|--quick|--full] [--backends cpu,wgpu,cuda] [--out DIR]
//!   [--compare-peft]`: every benchmark suite on each available back end, then a side-by-side
//!   report (`DIR/<profile>/bench.md`, SVG plots, one JSON per back end).
//! - `cargo xtask assets`: fetch the real model and text (SmolLM2-135M, Shakespeare) once into
//!   a cache folder, SHA-256 checked; tests that need them skip with a reason without them.
//! - `cargo xtask fuzz [--seconds N] [--targets a,b]`: AFL++ on the file readers (see
//!   [`fuzz`]).
//! - `cargo xtask demo`: `loftq init` at NF2/NF4 with the QLoRA and LoftQ starts on SmolLM2,
//!   perplexity of each start (a synthetic model when the download is impossible).
//! - `cargo xtask layout`: the source layout rules of `docs/architecture.md` (see [`layout`]).

mod assets;
mod demo;
mod fuzz;
mod layout;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

/// Features under which the tests build: the CPU back end plus WGPU, in one build.
const TEST_FEATURES: &str = "loftq-core/wgpu";

/// Integration tests whose device comes from `LOFTQ_DEVICE`.
const DEVICE_TESTS: &[&str] = &[
    "quant_reference",
    "ggml_quant",
    "loftq_reference",
    "calibrated",
    "lowrank_and_init",
    "batched",
    "model_reference",
    "encoder_reference",
    "files",
    "gguf",
    "generate",
    "device_limits",
    "refine",
    "init",
    "calibrate",
    "train",
    "suite",
    "launches",
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
    // Tests that cannot run append a line here (tests/common `skip`); libtest counts them as
    // passed, so the summary below names them.
    let log = std::env::temp_dir().join(format!("loftq-skips-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let result = test_passes(cpu_only, &log);
    report_skips(&log);
    let _ = std::fs::remove_file(&log);
    result
}

fn test_passes(cpu_only: bool, log: &std::path::Path) -> Result<(), String> {
    run(
        "tests on cpu",
        cargo()
            .args(["test", "--workspace", "--features", TEST_FEATURES])
            .env("LOFTQ_DEVICE", "cpu")
            .env("LOFTQ_SKIP_LOG", log),
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
    run(
        "device tests on wgpu",
        cmd.env("LOFTQ_DEVICE", "wgpu").env("LOFTQ_SKIP_LOG", log),
    )
}

/// Prints the tests that skipped, each once with its first reason.
fn report_skips(log: &std::path::Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for line in text.lines() {
        let (name, reason) = line.split_once(": ").unwrap_or((line, ""));
        if !seen.iter().any(|(n, _)| *n == name) {
            seen.push((name, reason));
        }
    }
    if seen.is_empty() {
        eprintln!("xtask: no test skipped");
        return;
    }
    eprintln!(
        "xtask: {} test(s) SKIPPED (cargo counts them as passed):",
        seen.len()
    );
    for (name, reason) in seen {
        eprintln!("  {name}: {reason}");
    }
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
    let mut backends: Vec<String> = vec!["cpu".into(), "wgpu".into(), "cuda".into()];
    let mut profile = "quick";
    let mut out = PathBuf::from("bench/results");
    let mut peft = false;
    let mut python = "python3".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--smoke" => profile = "smoke",
            "--quick" => profile = "quick",
            "--full" => profile = "full",
            "--compare-peft" => peft = true,
            "--python" => python = it.next().ok_or("--python needs an interpreter")?.clone(),
            "--backends" => {
                let list = it.next().ok_or("--backends needs a list, e.g. cpu,wgpu")?;
                backends = list
                    .split(',')
                    .map(|b| b.trim().replace("flex", "cpu"))
                    .collect();
            }
            "--out" => out = PathBuf::from(it.next().ok_or("--out needs a directory")?),
            other => return Err(format!("bench: unknown argument `{other}`\n{BENCH_USAGE}")),
        }
    }
    let dir = out.join(profile);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let scratch = target_dir().join("bench-scratch");
    let mut inputs = Vec::new();
    let mut skipped = Vec::new();
    let mut built: Vec<String> = Vec::new();
    for backend in &backends {
        let features = match backend.as_str() {
            "cpu" | "wgpu" => TEST_FEATURES.to_string(),
            b if b == "cuda" || b.starts_with("cuda:") => {
                if Command::new("nvidia-smi")
                    .arg("-L")
                    .output()
                    .map_or(true, |o| !o.status.success())
                {
                    skipped.push(format!(
                        "{backend}: no NVIDIA driver (`nvidia-smi -L` fails)"
                    ));
                    continue;
                }
                format!("{TEST_FEATURES},loftq-core/cuda")
            }
            b => {
                return Err(format!(
                    "bench: unknown back end `{b}` (cpu, wgpu, cuda[:N])"
                ));
            }
        };
        // The tests' build (one shared compilation, once per feature set); CUDA only when it
        // can run.
        if !built.contains(&features) {
            let build = run(
                &format!("build for {backend}"),
                cargo().args(["build", "--workspace", "--features", &features]),
            );
            match build {
                Ok(()) => built.push(features),
                // Burn's CUDA back end downloads an LLVM bundle from GitHub when it is first
                // built: offline, that build fails, and the other back ends still run.
                Err(e) if features != TEST_FEATURES => {
                    skipped.push(format!(
                        "{backend}: {e}; its first build downloads an LLVM bundle from GitHub"
                    ));
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        let json = dir.join(format!("suite-{}.json", backend.replace(':', "-")));
        let mut cmd = Command::new(target_dir().join("debug/loftq-bench"));
        cmd.args([
            "suite",
            "--profile",
            profile,
            "--device",
            backend,
            "--scratch",
        ])
        .arg(&scratch)
        .arg("--json")
        .arg(&json)
        .stderr(Stdio::piped());
        match run_logged(&format!("{profile} suites on {backend}"), &mut cmd) {
            Ok(()) => inputs.push(json),
            Err(reason) => {
                eprintln!("xtask: {backend} skipped: {reason}");
                skipped.push(format!("{backend}: {reason}"));
            }
        }
    }
    if peft {
        let json = dir.join("suite-peft.json");
        let script = PathBuf::from("bench/peft_loftq.py");
        let mut cmd = Command::new(&python);
        cmd.arg(&script)
            .args(["--profile", profile, "--json"])
            .arg(&json)
            .stderr(Stdio::piped());
        match run_logged("PEFT's loftq_init", &mut cmd) {
            Ok(()) => inputs.push(json),
            Err(reason) => skipped.push(format!("peft: {reason} (see bench/peft_loftq.py)")),
        }
    }
    if inputs.is_empty() {
        return Err(format!("no back end ran: {}", skipped.join("; ")));
    }
    let mut command = format!(
        "cargo xtask bench --{profile} --backends {}",
        backends.join(",")
    );
    if peft {
        command += " --compare-peft";
    }
    let mut report = Command::new(target_dir().join("debug/loftq-bench"));
    report
        .args(["report", "--out"])
        .arg(&dir)
        .args(["--command", &command]);
    for i in &inputs {
        report.arg("--input").arg(i);
    }
    for s in &skipped {
        report.args(["--skipped", s]);
    }
    run("report", &mut report)
}

const BENCH_USAGE: &str = "usage: cargo xtask bench [--smoke|--quick|--full] [--backends cpu,wgpu,cuda] \
    [--out DIR] [--compare-peft [--python PYTHON]]";

/// The cargo target directory (`CARGO_TARGET_DIR`, or `target/`).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from)
}

/// Runs `cmd`, passing its stderr through; on failure the error is its last stderr line.
fn run_logged(what: &str, cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: {what}: {cmd:?}");
    let mut child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
    let mut last = String::new();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if !line.trim().is_empty() {
                last = line;
            }
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("failed ({status}): {}", last.trim()))
    }
}

/// `cargo xtask layout`: the source layout rules ([`layout`]), each breach on a line.
fn check_layout() -> Result<(), String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no repository root")?;
    let problems = layout::check(root);
    for p in &problems {
        eprintln!("{p}");
    }
    if problems.is_empty() {
        eprintln!(
            "xtask: layout: no circles, no file over {} lines",
            layout::MAX_LINES
        );
        Ok(())
    } else {
        Err(format!("layout: {} problems", problems.len()))
    }
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
        Some("fuzz") => fuzz::run(&args[1..]),
        Some("layout") => check_layout(),
        _ => Err(
            "usage: cargo xtask <test|validate|bench|assets|demo|fuzz|layout> [options]\n\
                  test [--cpu-only]      tests on cpu, then the device tests on wgpu\n\
                  validate [--cpu-only]  fmt --check, clippy -D warnings, test\n\
                  bench [--smoke|--quick|--full] [--backends cpu,wgpu,cuda] [--out DIR] [--compare-peft]\n\
                  assets                 fetch SmolLM2-135M and Shakespeare into the cache\n\
                  demo                   the main job end to end: init NF2/NF4 QLoRA/LoftQ, perplexity\n\
                  fuzz [--seconds N] [--targets a,b] [--jobs J]  AFL++ on every file reader\n\
                  layout                 no circles of imports between files, no file over 500 lines"
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
