//! `loftq-bench suite`: every suite on one device, as one JSON record per back end that
//! `loftq-bench report` compares side by side. `cargo xtask bench` drives it.

use std::path::{Path, PathBuf};

use burn::tensor::Tensor;
use loftq_core::lowrank::{RsvdConfig, SvdMethod, truncated_svd};
use loftq_core::quant::{Kernel, host_f32};
use loftq_core::{DeviceList, DeviceSpec, Quantizer};
use loftq_models::init::{Calibration, InitSpec, run_init};
use serde::{Deserialize, Serialize};

use crate::machine::Machine;
use crate::stats::{Memory, Timing, measure};
use crate::{loftq, synth, train};

/// How much to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Tiny sizes, one repeat: checks that every suite runs (CI, tests).
    Smoke,
    /// Minutes on a laptop CPU: up to 4096², SmolLM2-135M shapes.
    Quick,
    /// Everything the issue lists: 4096×11008, exact SVD on 4096², 1B and 7B shapes.
    Full,
}

/// One measured case; `suite` + `name` identify it across back ends.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Case {
    /// `quant`, `svd`, `loftq`, `init` or `train`.
    pub suite: String,
    /// What was measured, e.g. `4096x4096 nf4 r64 T5 randomized`.
    pub name: String,
    /// Elements of the matrix (or parameters of the model), for plots.
    pub size: f64,
    /// Median, min and max seconds.
    pub timing: Timing,
    /// The error metric's value, if the case has one.
    pub error: Option<f64>,
    /// What `error` is.
    pub metric: String,
    /// Resident memory.
    pub memory: Memory,
}

/// One back end's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    /// `cpu`, `wgpu`, `cuda:0`, or `peft` for the Python reference.
    pub backend: String,
    /// The profile.
    pub profile: Profile,
    /// The machine.
    pub machine: Machine,
    /// `git describe`-style commit of the code measured.
    pub commit: String,
    /// Seconds since the Unix epoch at the start.
    pub started_unix: u64,
    /// The cases.
    pub cases: Vec<Case>,
}

/// A suite: its cases for a profile, the repeats of its quick cases, a device and the
/// scratch folder.
type Suite = fn(Profile, usize, DeviceSpec, &Path) -> Result<Vec<Case>, String>;

/// The suites in the order they run: name, what it measures, the suite.
fn suites() -> [(&'static str, &'static str, Suite); 6] {
    [
        ("quant", "quantizer throughput", |p, r, s, _| {
            quant_cases(p, r, s)
        }),
        ("svd", "truncated SVD", |p, r, s, _| svd_cases(p, r, s)),
        ("loftq", "per-matrix LoftQ", |p, r, s, _| {
            Ok(loftq_cases(p, r, s))
        }),
        ("init", "whole-model init", |p, _, s, d| init_cases(p, s, d)),
        ("calibrated", "calibrated init", |p, _, s, d| {
            calibrated_cases(p, s, d)
        }),
        ("train", "training step", |p, _, s, d| train_cases(p, s, d)),
    ]
}

/// Runs the suites of `profile` named in `only` (all when empty) on `spec`; synthetic
/// checkpoints go under `scratch`.
pub fn run(
    profile: Profile,
    spec: DeviceSpec,
    scratch: &Path,
    only: &[String],
) -> Result<Run, String> {
    let names = suites().map(|(name, ..)| name);
    if let Some(bad) = only.iter().find(|s| !names.contains(&s.as_str())) {
        return Err(format!(
            "--only {bad}: no such suite (the suites: {})",
            names.join(", ")
        ));
    }
    let wanted = |name: &str| only.is_empty() || only.iter().any(|s| s == name);
    let device = spec.device().map_err(|e| e.to_string())?;
    // Fail early, with the back end's own message, if the device does not work.
    let probe: f32 = Tensor::<2>::ones([2, 2], &device).sum().into_scalar();
    if probe != 4.0 {
        return Err(format!("{spec}: a 2×2 sum of ones gave {probe}"));
    }
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut cases = Vec::new();
    let reps = match profile {
        Profile::Smoke => 1,
        _ => 3,
    };
    for (name, what, run) in suites() {
        if wanted(name) {
            eprintln!("[{spec}] {what}");
            cases.extend(run(profile, reps, spec, scratch)?);
        }
    }
    Ok(Run {
        backend: spec.to_string(),
        profile,
        machine: Machine::read(spec),
        commit: crate::machine::commit(),
        started_unix,
        cases,
    })
}

/// Relative Frobenius distance `‖a − b‖/‖a‖`, on the host in `f64`.
fn rel_dist(a: &Tensor<2>, b: &Tensor<2>) -> f64 {
    loftq_core::rel_dist(&host_f32(a), &host_f32(b))
}

fn quant_cases(profile: Profile, reps: usize, spec: DeviceSpec) -> Result<Vec<Case>, String> {
    let n = match profile {
        Profile::Smoke => 256,
        Profile::Quick => 2048,
        Profile::Full => 4096,
    };
    let device = spec.device().map_err(|e| e.to_string())?;
    let w = loftq::gaussian_matrix([n, n], 1, &device);
    let mut out = Vec::new();
    let (t, m) = measure(reps, || {
        let _ = w.to_data();
    });
    out.push(case(
        "quant",
        format!("copy {n}² f32 to host"),
        n * n,
        t,
        m,
        None,
        "",
    ));
    for bits in [4u8, 2] {
        let q = Quantizer::new(loftq_core::QuantConfig::nf(bits)).map_err(|e| e.to_string())?;
        let mut err = 0.0;
        let (t, m) = measure(reps, || {
            let codes = q.quantize_with(&w, Kernel::Auto).expect("finite input");
            let d = q.dequantize(&codes);
            err = rel_dist(&w, &d);
        });
        let name = format!("nf{bits} quantize+dequantize {n}²");
        out.push(case("quant", name, n * n, t, m, Some(err), "‖W−Q(W)‖/‖W‖"));
    }
    Ok(out)
}

fn svd_cases(profile: Profile, reps: usize, spec: DeviceSpec) -> Result<Vec<Case>, String> {
    let (shapes, rank): (&[usize], usize) = match profile {
        Profile::Smoke => (&[128], 8),
        Profile::Quick => (&[1024], 64),
        Profile::Full => (&[1024, 4096], 64),
    };
    let device = spec.device().map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for &n in shapes {
        // A LoftQ residual: what the SVD is used on.
        let w = loftq::gaussian_matrix([n, n], 2, &device);
        let q = Quantizer::new(loftq_core::QuantConfig::nf(2)).map_err(|e| e.to_string())?;
        let a = w.clone() - q.quantize_dequantize(&w).map_err(|e| e.to_string())?.1;
        let mut methods = vec![("exact".to_string(), SvdMethod::Exact)];
        for p in [0, 1, 2, 4] {
            let cfg = RsvdConfig {
                power_iters: p,
                ..RsvdConfig::default()
            };
            methods.push((format!("randomized p{p}"), SvdMethod::Randomized(cfg)));
        }
        for (label, method) in methods {
            let mut err = 0.0;
            let r = if label == "exact" { 0 } else { reps };
            let (t, m) = measure(r, || {
                let lr = truncated_svd(&a, rank, &method, None).expect("svd");
                let (b, at) = lr.balanced_factors();
                err = rel_dist(&a, &loftq_core::matmul(&b, &at));
            });
            let name = format!("{n}x{n} r{rank} {label}");
            out.push(case("svd", name, n * n, t, m, Some(err), "‖A−A_r‖/‖A‖"));
        }
    }
    Ok(out)
}

fn loftq_cases(profile: Profile, reps: usize, spec: DeviceSpec) -> Vec<Case> {
    let (shapes, ranks, exact_max): (Vec<[usize; 2]>, Vec<usize>, usize) = match profile {
        Profile::Smoke => (vec![[128, 128]], vec![8], 128 * 128),
        Profile::Quick => (
            vec![[768, 768], [1024, 1024], [4096, 4096]],
            vec![16, 64],
            1024 * 1024,
        ),
        Profile::Full => (
            vec![[768, 768], [1024, 1024], [4096, 4096], [4096, 11008]],
            vec![16, 64],
            4096 * 4096,
        ),
    };
    let mut out = Vec::new();
    for shape in shapes {
        let args = loftq::LoftqArgs {
            shapes: vec![shape],
            bits: vec![4, 2],
            ranks: ranks.clone(),
            iters: vec![1, 5],
            exact: shape[0] * shape[1] <= exact_max,
            repeats: reps,
            rsvd: RsvdConfig::default(),
            // The smallest shape also as 8 matrices in one batch (what init does on a GPU).
            batch: if shape == [768, 768] { 8 } else { 1 },
        };
        for c in loftq::run(&args, spec) {
            let name = format!(
                "{}x{} {} r{} T{} {}",
                c.shape[0], c.shape[1], c.quantizer, c.rank, c.iters, c.svd
            );
            let err = Some(f64::from(c.rel_err));
            let size = c.shape[0] * c.shape[1];
            out.push(case(
                "loftq",
                name,
                size,
                c.timing,
                c.memory,
                err,
                "‖W−Q−s·BA‖/‖W‖",
            ));
        }
    }
    out
}

fn init_cases(profile: Profile, spec: DeviceSpec, scratch: &Path) -> Result<Vec<Case>, String> {
    let archs: &[(&str, Option<usize>)] = match profile {
        Profile::Smoke => &[("smollm2-135m", Some(1))],
        Profile::Quick => &[("smollm2-135m", None)],
        // A whole 7B checkpoint is 13.5 GB of bf16; 4 of its 32 layers show the per-layer cost.
        Profile::Full => &[("llama-3.2-1b", None), ("llama2-7b", Some(4))],
    };
    let (rank, iters) = match profile {
        Profile::Smoke => (8, 2),
        _ => (64, 5),
    };
    let mut out = Vec::new();
    for &(arch, layers) in archs {
        let (model, layers) = synth_model(arch, layers, scratch)?;
        let init = InitSpec::new(model, scratch.join(format!("init-{arch}")), rank, iters);
        let (r, t, m) = timed_init(&init, spec, 0)?;
        let name = format!("{arch} ({layers} layers) nf4 r{rank} T{iters}");
        crate::stats::report_profile(&format!("init {name}, first run"));
        let err = Some(r.totals.mean_rel_err_init);
        let size = r.totals.params as usize;
        let mut metric = "mean ‖W−Q−s·BA‖/‖W‖".to_string();
        // Off the CPU, targets of one shape run batched: against one at a time, each timed
        // after a run of its own (a GPU compiles and tunes kernels for each new shape).
        if spec != DeviceSpec::Cpu {
            // The run above compiled the batched kernels.
            let (_, batched, _) = timed_init(&init, spec, 0)?;
            crate::stats::report_profile(&format!("init {name}, warm, batched"));
            let one = InitSpec {
                device_batch: 1,
                ..init.clone()
            };
            let (_, alone, _) = timed_init(&one, spec, 1)?;
            crate::stats::report_profile(&format!("init {name}, warm, one tensor at a time"));
            metric += &format!(
                "; warm: {:.1} s batched, {:.1} s one tensor at a time ({:.2}×)",
                batched.median_s,
                alone.median_s,
                alone.median_s / batched.median_s.max(1e-9)
            );
        }
        out.push(case("init", name, size, t, m, err, &metric));
    }
    Ok(out)
}

/// A synthetic architecture and its layer count (`None`: all).
type Arch = (&'static str, Option<usize>);

/// The calibrated start against plain LoftQ in the same run (NF2, rank 16, 5 iterations,
/// 2,048 and 16,384 calibration tokens in sequences of 512): its time as a multiple of
/// LoftQ's, and its peak memory on 4 layers of the 7B shapes.
fn calibrated_cases(
    profile: Profile,
    spec: DeviceSpec,
    scratch: &Path,
) -> Result<Vec<Case>, String> {
    let (archs, tokens, seq): (&[Arch], &[usize], usize) = match profile {
        Profile::Smoke => (&[("smollm2-135m", Some(1))], &[512], 128),
        Profile::Quick => (&[("smollm2-135m", None)], &[2_048, 16_384], 512),
        Profile::Full => (
            &[("smollm2-135m", None), ("llama2-7b", Some(4))],
            &[2_048, 16_384],
            512,
        ),
    };
    // Byte-level tokens: one per character of the calibration text.
    let most = tokens.iter().copied().max().unwrap_or(0);
    let text = scratch.join("calibration.txt");
    let line = "Now is the winter of our discontent made glorious summer by this sun of York. ";
    std::fs::write(&text, line.repeat(most / line.len() + 1))
        .map_err(|e| format!("{}: {e}", text.display()))?;
    let mut out = Vec::new();
    for &(arch, layers) in archs {
        let (model, layers) = synth_model(arch, layers, scratch)?;
        let mut init = InitSpec::new(model, scratch.join(format!("init-calib-{arch}")), 16, 5);
        init.quant = loftq_core::QuantConfig::nf(2);
        let (_, plain_t, _) = timed_init(&init, spec, 0)?;
        for &tokens in tokens {
            init.calibration = Some(Calibration {
                tokens,
                seq,
                ..Calibration::new(vec![text.clone()])
            });
            let (r, t, m) = timed_init(&init, spec, 0)?;
            let name = format!("{arch} ({layers} layers) nf2 r16 T5 calibrated, {tokens} tokens");
            let metric = format!(
                "mean weighted error; {:.1}× plain LoftQ's {:.1} s",
                t.median_s / plain_t.median_s.max(1e-9),
                plain_t.median_s
            );
            let size = r.totals.params as usize;
            let err = r.totals.mean_weighted_err_init;
            out.push(case("init", name, size, t, m, err, &metric));
        }
    }
    Ok(out)
}

/// A synthetic checkpoint of `arch` under `scratch` (written once) and its layer count.
fn synth_model(
    arch: &str,
    layers: Option<usize>,
    scratch: &Path,
) -> Result<(PathBuf, usize), String> {
    let cfg = synth::config(arch, layers)?;
    let model = scratch.join(format!("synth-{arch}-{}", cfg.num_hidden_layers));
    if !model.join("model.safetensors").exists() {
        synth::write(&cfg, &model, 0)?;
    }
    Ok((model, cfg.num_hidden_layers))
}

/// One `loftq init` run of `init` on `spec`, timed (after one untimed run with `warm_up` 1),
/// its output removed.
fn timed_init(
    init: &InitSpec,
    spec: DeviceSpec,
    warm_up: usize,
) -> Result<(loftq_models::init::Report, Timing, Memory), String> {
    let device = spec.device().map_err(|e| e.to_string())?;
    let mut report = None;
    let mut failure = None;
    let (t, m) = measure(warm_up, || {
        let _ = std::fs::remove_dir_all(&init.out);
        match run_init(init, std::slice::from_ref(&device), false, &mut |_| {}) {
            Ok(r) => report = Some(r),
            Err(e) => failure = Some(e.to_string()),
        }
    });
    let _ = std::fs::remove_dir_all(&init.out);
    match (report, failure) {
        (Some(r), _) => Ok((r, t, m)),
        (None, e) => Err(format!(
            "init of {}: {}",
            init.model.display(),
            e.unwrap_or_default()
        )),
    }
}

fn train_cases(profile: Profile, spec: DeviceSpec, scratch: &Path) -> Result<Vec<Case>, String> {
    let (layers, shapes, repeats): (Option<usize>, &[[usize; 2]], usize) = match profile {
        Profile::Smoke => (Some(1), &[[1, 16]], 1),
        Profile::Quick => (None, &[[4, 128]], 2),
        Profile::Full => (None, &[[4, 128], [2, 256]], 3),
    };
    let (model, n_layers) = synth_model("smollm2-135m", layers, scratch)?;
    let mut out = Vec::new();
    for &shape in shapes {
        let devices = DeviceList(vec![spec]);
        for c in train::run(
            &model,
            "nf4",
            16,
            shape,
            repeats,
            &devices,
            Default::default(),
        )? {
            let name = format!(
                "smollm2-135m shapes ({n_layers} layers) nf4 r16 {}×{} recompute={}",
                c.batch, c.seq, c.recompute
            );
            let metric = format!(
                "tokens/s {:.0}, {} reads per step",
                c.tokens_per_s, c.reads_per_step
            );
            out.push(case(
                "train",
                name,
                c.batch * c.seq,
                c.step,
                c.memory,
                None,
                &metric,
            ));
        }
    }
    Ok(out)
}

fn case(
    suite: &str,
    name: String,
    size: usize,
    timing: Timing,
    memory: Memory,
    error: Option<f64>,
    metric: &str,
) -> Case {
    crate::stats::report_profile(&format!("{suite} {name}"));
    Case {
        suite: suite.to_string(),
        name,
        size: size as f64,
        timing,
        error,
        metric: metric.to_string(),
        memory,
    }
}
