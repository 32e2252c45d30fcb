//! Kernel launches of a GPU training step, counted by cubecl's profiler (`CUBECL_DEBUG_OPTION
//! =profile` logs a table per device synchronization, ending `| Total | time | kernels |`).
//! The bound holds only while the model's own kernels (`loftq_core::fused`, the packed
//! weights' dequantization) apply: a step that fell back to Burn's ops for any of them would
//! launch dozens more per layer. On the CPU a step launches no CubeCL kernel: nothing to count.

use std::path::PathBuf;
use std::process::Command;

/// Runs `loftq-bench` with `args` (and `env`), asserting that it succeeded.
fn bench(args: &[&str], env: &[(&str, &PathBuf)]) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loftq-bench"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loftq-bench {args:?}: {err}");
}

#[test]
fn a_training_step_launches_few_kernels() {
    let device = std::env::var("LOFTQ_DEVICE").unwrap_or_else(|_| "cpu".into());
    if device == "cpu" {
        return;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("launches-{device}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("model");
    let log = dir.join("cubecl.log");
    let m = model.to_str().unwrap();
    bench(
        &[
            "synth",
            "--arch",
            "smollm2-135m",
            "--layers",
            "2",
            "--out",
            m,
        ],
        &[],
    );
    let flag = PathBuf::from("profile");
    bench(
        &[
            "train",
            "--model",
            m,
            "--batch",
            "1",
            "--seq",
            "16",
            "--repeats",
            "1",
            "--device",
            &device,
        ],
        &[("CUBECL_DEBUG_LOG", &log), ("CUBECL_DEBUG_OPTION", &flag)],
    );
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    // `| Total | 1.2s | 381 | 100 % |`: the kernels are the third field.
    let totals: Vec<usize> = text
        .lines()
        .filter(|l| l.starts_with("| Total"))
        .map(|l| l.split('|').nth(3).unwrap().trim().parse().unwrap())
        .collect();
    // Each mode's warm-up step, then its timed step: layers recomputed, then not.
    let [_, recompute, _, plain] = totals[..] else {
        panic!("four steps, got the totals {totals:?}")
    };
    // Measured 188 and 131 (2 layers of SmolLM2's shapes, LoRA on all seven projections,
    // each a merged weight over NF4 codes made by one kernel, q/k/v and gate/up each one
    // product over their stacked weights and their factors' gradients from stacked factors,
    // q/k/v moved to heads and back in one kernel each way; the loss's NLL one kernel each
    // way; AdamW one kernel). Without the NLL kernels: 207 and 150; without the one heads
    // kernel too: 219 and 158.
    assert!(
        recompute <= 194,
        "{recompute} kernels in a step with recomputation"
    );
    assert!(
        plain <= 136,
        "{plain} kernels in a step without recomputation"
    );
}
