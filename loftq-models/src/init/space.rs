//! Room, checked before the work: free space (`init` holds its pieces and the assembled output
//! at once, so it needs about twice the output's size under `--out`), and a device buffer for
//! each target matrix.

use std::path::Path;

use burn::tensor::Device;
use loftq_core::QuantConfig;
use loftq_core::device::exceeds_buffer;

use super::piece::Plan;
use super::{Backbone, InitSpec};
use crate::io::TensorSource;
use crate::io::space::{check_free, human};
use crate::{ModelError, Result};

/// Bytes of one matrix `[rows, cols]` packed with `cfg`: codes, scales (or their double
/// quantization) and minimums.
fn packed_bytes(cfg: &QuantConfig, [rows, cols]: [usize; 2]) -> u64 {
    let numel = (rows * cols) as u64;
    let block = cfg.block_size.len(cols).max(1) as u64;
    let blocks = numel.div_ceil(block);
    let codes = (numel * u64::from(cfg.scheme.bits())).div_ceil(8);
    let scales = if cfg.double_quant {
        blocks + 4 * blocks.div_ceil(256) + 4
    } else {
        4 * blocks
    };
    let mins = if cfg.scheme.has_mins() { 4 * blocks } else { 0 };
    codes + scales + mins
}

/// About the bytes the finished output holds: each target packed (and in bf16 with
/// `--backbone bf16|both`) with its `f32` factors, every other tensor as the source stores
/// it; `--backbone gguf` holds all of it twice (the GGUF base and adapter besides the packed
/// output), and from an HF source once more for the source converted to GGUF while the base is
/// written. An estimate from below: headers, metadata and side files are left out.
pub fn output_bytes(spec: &InitSpec, plan: &Plan, source: &dyn TensorSource) -> Result<u64> {
    let mut total = 0u64;
    let mut source_bytes = 0u64;
    let copies = if spec.backbone == Backbone::Gguf {
        2
    } else {
        1
    };
    for item in &plan.items {
        match &item.target {
            Some(([rows, cols], cfg)) => {
                source_bytes += ((rows * cols) * source.stored_value_bytes(&item.name)) as u64;
                let dense = 2 * (rows * cols) as u64;
                total += match spec.backbone {
                    Backbone::Packed | Backbone::Gguf => packed_bytes(cfg, [*rows, *cols]),
                    Backbone::Bf16 => dense,
                    Backbone::Both => packed_bytes(cfg, [*rows, *cols]) + dense,
                };
                total += 4 * (spec.lora.rank * (rows + cols)) as u64;
            }
            None => {
                let numel: usize = source.shape(&item.name)?.iter().product();
                let bytes = (numel * source.stored_value_bytes(&item.name)) as u64;
                total += bytes;
                source_bytes += bytes;
            }
        }
    }
    let converted = spec.backbone == Backbone::Gguf && !crate::io::is_gguf(&spec.model);
    Ok(total * copies + if converted { source_bytes } else { 0 })
}

/// Refuses a run whose output and work area (about twice [`output_bytes`], less the work
/// already done under `work`) would not fit in the space free under `out`.
///
/// # Errors
/// As [`check_free`].
pub fn check(out: &Path, work: &Path, output: u64) -> Result<()> {
    let need = (2 * output).saturating_sub(dir_bytes(work));
    let what = format!(
        "about {} (the output, {}, and its work area at once)",
        human(need),
        human(output)
    );
    check_free(out, need, &what)
}

/// Bytes of the files directly in `dir` (the work area is flat).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Refuses a target matrix whose `f32` values would not fit one buffer of a device in
/// `devices` (LoftQ holds each matrix whole on the device that takes it: a 7B model's
/// `[11008, 4096]` are 180 MB, lavapipe's buffers 128 MiB), before any work is done.
///
/// # Errors
/// [`ModelError::Settings`] naming the first such tensor and the limit.
pub(super) fn check_buffers(plan: &Plan, devices: &[Device]) -> Result<()> {
    let too_large = plan.items.iter().find_map(|item| {
        let (shape, _) = item.target?;
        let why = devices.iter().find_map(|d| exceeds_buffer(d, &shape))?;
        Some((item, why))
    });
    match too_large {
        Some((item, why)) => Err(ModelError::Settings(format!(
            "tensor `{}`: {why}, and LoftQ holds each matrix whole on its device; run on the \
             CPU (--device cpu) or a GPU with larger buffers",
            item.name
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelError;

    #[test]
    fn packed_sizes_follow_the_format() {
        // NF4 in blocks of 64: half a byte per value, one f32 per 64 values.
        assert_eq!(packed_bytes(&QuantConfig::nf4(), [64, 64]), 2048 + 4 * 64);
        // Double-quantized: one byte per block, an f32 per 256 blocks, the offset.
        let dq = QuantConfig::nf4().with_double_quant(true);
        assert_eq!(packed_bytes(&dq, [64, 64]), 2048 + 64 + 4 + 4);
        // int3 asymmetric: 3 bits a value, a step and a minimum per block.
        assert_eq!(
            packed_bytes(&QuantConfig::int(3, false), [8, 64]),
            192 + 8 * 8
        );
    }

    /// The estimate against what `init` writes on the tiny Llama: from below, and close.
    #[test]
    fn the_estimate_is_close_to_the_output() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let out = std::env::temp_dir().join(format!("loftq-space-out-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        for backbone in [Backbone::Packed, Backbone::Both] {
            let mut spec = InitSpec::new(fixtures.join("tiny-llama"), out.clone(), 4, 1);
            spec.backbone = backbone;
            let source = crate::io::open_source(&spec.model).unwrap();
            let plan = Plan::new(&spec, source.as_ref()).unwrap();
            let estimate = output_bytes(&spec, &plan, source.as_ref()).unwrap();
            let device = burn::tensor::Device::default();
            super::super::run_init(&spec, &[device], false, &mut |_| {}).unwrap();
            let written: u64 = ["model.safetensors", "bf16/model.safetensors"]
                .iter()
                .chain(&["adapter/adapter_model.safetensors"])
                .filter_map(|f| std::fs::metadata(out.join(f)).ok())
                .map(|m| m.len())
                .sum();
            let ratio = estimate as f64 / written as f64;
            assert!(
                (0.8..=1.0).contains(&ratio),
                "{backbone:?}: {estimate} vs {written}"
            );
            std::fs::remove_dir_all(&out).unwrap();
        }
    }

    #[test]
    fn a_run_that_does_not_fit_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("loftq-space-{}", std::process::id()));
        let out = dir.join("out");
        assert!(check(&out, &out.join(".loftq-partial"), 1 << 20).is_ok());
        if let Some(free) = crate::io::space::available(&out) {
            let err = check(&out, &out.join(".loftq-partial"), free).unwrap_err();
            assert!(
                matches!(&err, ModelError::Output { path, .. } if path == &out),
                "{err}"
            );
            assert!(err.to_string().contains("free"), "{err}");
        }
    }
}
