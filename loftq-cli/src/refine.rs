//! `loftq refine`: new adapters for a backbone quantized elsewhere (ours or bitsandbytes).

use std::path::PathBuf;

use clap::Args;
use loftq_core::DeviceSpec;
use loftq_core::args::SvdArgs;
use loftq_models::refine::{Check, RefineEvent, RefineSpec, run_refine};

use crate::args::{LoraArgs, TargetArgs};
use crate::error::{Result, invalid};
use crate::progress::Progress;

/// Arguments of `loftq refine`.
#[derive(Args)]
pub struct RefineArgs {
    /// The quantized backbone: an HF directory with our packed weights (a `loftq init`
    /// output), bitsandbytes 4-bit weights (NF4/FP4, double quantization or not), or a LoftQ
    /// organisation release (bf16 weights holding Q dequantized; the modules its loftq_init/
    /// adapts are the quantized ones).
    #[arg(long)]
    base: PathBuf,
    /// The full-precision model it was quantized from: an HF directory or a .gguf file.
    /// Its weights are read one at a time.
    #[arg(long)]
    model: PathBuf,
    /// Output: a PEFT adapter directory (adapter_config.json, adapter_model.safetensors)
    /// and report.json. Must not exist or be empty.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    lora: LoraArgs,
    #[command(flatten)]
    svd: SvdArgs,
    #[command(flatten)]
    targets: TargetArgs,
    /// Keep a layer's new adapter only if the logits on this UTF-8 text get closer to the
    /// full-precision model's (layers visited in order; a refused layer gets QLoRA's B = 0).
    /// Needs a Llama-architecture model.
    #[arg(long)]
    check_text: Option<PathBuf>,
    /// Tokens of --check-text, in one pass.
    #[arg(long, default_value_t = 128, requires = "check_text")]
    check_tokens: usize,
    /// Device: cpu, wgpu[:N], cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Seed of the randomized SVD and of the QLoRA start of refused layers.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `loftq refine`.
#[allow(clippy::print_stdout)]
pub fn run(a: &RefineArgs) -> Result<()> {
    if a.check_tokens < 2 {
        return Err(invalid("--check-tokens must be at least 2"));
    }
    let spec = RefineSpec {
        base: a.base.clone(),
        model: a.model.clone(),
        out: a.out.clone(),
        lora: a.lora.spec()?,
        svd: a.svd.method(a.seed),
        target: a.targets.target(),
        exclude: a.targets.exclude(),
        seed: a.seed,
        check: a.check_text.clone().map(|text| Check {
            text,
            tokens: a.check_tokens,
        }),
    };
    let device = a
        .device
        .open()
        .map_err(|e| invalid(format!("--device {}: {e}", a.device)))?;
    let mut bar: Option<Progress> = None;
    let mut on_event = |e: RefineEvent| match e {
        RefineEvent::Planned { targets, params } => {
            let mut p = Progress::new(params);
            p.note(&format!(
                "{targets} quantized weights to fit ({params} parameters)"
            ));
            bar = Some(p);
        }
        RefineEvent::Fitted(r) => {
            if let Some(p) = bar.as_mut() {
                let msg = format!(
                    "{} err {:.4} → {:.4}",
                    r.name, r.rel_err_base, r.rel_err_fit
                );
                p.inc((r.shape[0] * r.shape[1]) as u64, &msg);
            }
        }
        RefineEvent::Checking(err) => {
            if let Some(p) = bar.as_mut() {
                p.clear();
                p.note(&format!(
                    "checking layer by layer; logits error of the base alone {err:.4}"
                ));
            }
        }
        RefineEvent::Decided(name, keep, err) => {
            if let Some(p) = bar.as_mut() {
                let verdict = if keep { "kept" } else { "refused" };
                p.note(&format!("{name}: {verdict}, logits error {err:.4}"));
            }
        }
    };
    let result = run_refine(&spec, &device, &mut on_event);
    let Some(report) = crate::progress::finish(bar, result, a.json)? else {
        return Ok(());
    };
    println!(
        "{:<48} {:>14} {:>10} {:>10} {:>9}",
        "tensor", "base", "base err", "fit err", "check"
    );
    for r in &report.tensors {
        let check = match (r.accepted, r.logits_err) {
            (Some(true), Some(e)) => format!("kept {e:.4}"),
            (Some(false), Some(e)) => format!("refused {e:.4}"),
            _ => "-".into(),
        };
        println!(
            "{:<48} {:>14} {:>10.4} {:>10.4} {check:>9}",
            r.name, r.quantizer, r.rel_err_base, r.rel_err_fit
        );
    }
    println!(
        "{} weights: mean error {:.4} (base alone) → {:.4} (with the adapter); {:.1} s",
        report.tensors.len(),
        report.mean_rel_err_base,
        report.mean_rel_err_final,
        report.wall_seconds
    );
    if let (Some([before, after]), Some(kept)) = (report.logits_err, report.accepted) {
        println!(
            "check: logits error {before:.4} → {after:.4}; {kept} of {} layers kept their new adapter",
            report.tensors.len()
        );
    }
    println!("wrote {}", spec.out.display());
    Ok(())
}
