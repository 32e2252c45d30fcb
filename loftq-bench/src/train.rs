//! Training-step speed and memory: one QLoRA step (forward, backward, AdamW) on a real model,
//! with and without layer recomputation; optionally the distillation step on the same batch
//! (the model itself, unquantized, as the teacher).

use std::path::Path;

use loftq_core::DeviceList;
use loftq_core::quant::parse_bits;
use loftq_core::transfers::transfers_all_threads;
use loftq_models::nn::Llama;
use loftq_models::nn::{LoadOptions, load_pretrained_with};
use loftq_models::train::parallel::{Teachers, micro_batches};
use loftq_models::train::{AdamW, AdamWConfig, Batch, DistillLoss, Recompute};
use serde::Serialize;

use crate::stats::{Memory, Timing, measure};

/// One measured configuration.
#[derive(Debug, Serialize)]
pub struct TrainCase {
    /// `next-token` (the text's own next tokens) or `distill` (KL from the teacher at every
    /// position; the teacher's forward pass is part of the step).
    pub objective: String,
    /// `layers` (recompute each layer in the backward pass) or `none` (whole graph).
    pub recompute: String,
    /// Devices, comma-separated; with several, each step is one micro-batch per device
    /// (data parallelism, `loftq_models::train::parallel`).
    pub devices: String,
    /// Rows per micro-batch.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
    /// Seconds per step (forward, backward, AdamW update).
    pub step: Timing,
    /// Positions per second at the median, over all devices.
    pub tokens_per_s: f64,
    /// Resident memory; the peak is that of this mode's timed steps.
    pub memory: Memory,
    /// Device→host reads of one step, every device together (each read waits for a device).
    pub reads_per_step: u64,
}

/// What [`run`] measures besides the next-token step.
#[derive(Clone, Copy, Debug, Default)]
pub struct Extras {
    /// Also the distillation step.
    pub distill: bool,
    /// The base dequantized once on load (`loftq train --dense-base`).
    pub dense_base: bool,
}

/// Times `repeats` steps in each recompute mode, one micro-batch per device of `devices`;
/// with `extras.distill`, then the distillation steps of the same batches, the teachers
/// loaded only after the next-token steps are measured (so their peak memory excludes the
/// teacher).
pub fn run(
    model: &Path,
    quantize: &str,
    rank: usize,
    [batch, seq]: [usize; 2],
    repeats: usize,
    devices: &DeviceList,
    extras: Extras,
) -> Result<Vec<TrainCase>, String> {
    let distill = extras.distill;
    let devs = devices.open().map_err(|e| e.to_string())?;
    let quantize = match quantize {
        "none" => None,
        q => Some(parse_bits(q, 64, false).map_err(|e| e.to_string())?),
    };
    let opts = LoadOptions {
        quantize,
        adapter: None,
    };
    let mut models = Vec::with_capacity(devs.len());
    for dev in &devs {
        let mut m = load_pretrained_with(model, dev, &opts).map_err(|e| e.to_string())?;
        m.add_lora(rank, 1.0, 0.0, 0, |_| true);
        if extras.dense_base {
            m.dequantize_bases();
        }
        models.push(m);
    }
    let vocab = models[0].config.vocab_size as u32;
    // One micro-batch of distinct ids per device.
    let batches: Vec<_> = (0..devs.len())
        .map(|d| {
            let ids = (0..batch * seq)
                .map(|i| ((i + d * batch * seq) as u32).wrapping_mul(2_654_435_761) % vocab)
                .collect();
            (Batch { ids, batch, seq }, 0)
        })
        .collect();
    let mut cases = Vec::new();
    let mut teachers: Vec<Llama> = Vec::new();
    for objective in ["next-token", "distill"] {
        if objective == "distill" {
            if !distill {
                break;
            }
            for dev in &devs {
                let t = load_pretrained_with(model, dev, &LoadOptions::default())
                    .map_err(|e| e.to_string())?;
                teachers.push(t);
            }
        }
        let with = (!teachers.is_empty()).then(|| Teachers {
            models: &teachers,
            loss: DistillLoss::default(),
        });
        for mode in [Recompute::Layers, Recompute::None] {
            let mut opt = AdamW::new(AdamWConfig::default(), &models[0].lora_params());
            let mut failed = None;
            let mut reads_per_step = 0;
            let (step, memory) = measure(repeats.max(1), || {
                let before = transfers_all_threads();
                let sums = micro_batches(&mut models, &batches, mode, with);
                loftq_core::profile::mark(&devs[0], "train: other");
                let p = opt.update(sums.grads, 1e-4);
                models[0].set_lora_params(p);
                loftq_core::profile::mark(&devs[0], "train: adamw");
                // GPU back ends queue work: the step ends when its updates are computed.
                for dev in &devs {
                    if let Err(e) = dev.sync() {
                        failed = Some(format!("training step on {devices}: {e:?}"));
                    }
                }
                reads_per_step = (transfers_all_threads() - before).reads;
            });
            if let Some(e) = failed {
                return Err(e);
            }
            crate::stats::report_profile(&format!("{objective} step, recompute {mode:?}"));
            let positions = if with.is_some() { seq } else { seq - 1 };
            cases.push(TrainCase {
                objective: objective.to_string(),
                recompute: format!("{mode:?}").to_lowercase(),
                devices: devices.to_string(),
                batch,
                seq,
                tokens_per_s: (devs.len() * batch * positions) as f64 / step.median_s,
                step,
                memory,
                reads_per_step,
            });
        }
    }
    Ok(cases)
}

/// The results as a Markdown table.
pub fn markdown(model: &Path, device: &DeviceList, cases: &[TrainCase]) -> String {
    let mut per = if device.0.len() > 1 {
        "; one micro-batch per device, tokens/s over all"
    } else {
        ""
    }
    .to_string();
    if loftq_core::device::TUNED_KERNELS {
        per += "; Burn's fusion and autotuning";
    }
    let mut s = format!(
        "Training step on {} ({device}{per}): forward, backward and AdamW update of the LoRA \
         factors\n\n\
         | objective | recompute | batch × seq | step (median) | × next-token | min–max | \
         tokens/s | reads | peak RSS |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        model.display()
    );
    for c in cases {
        let plain = cases
            .iter()
            .find(|p| p.objective == "next-token" && p.recompute == c.recompute)
            .map_or(f64::NAN, |p| c.step.median_s / p.step.median_s);
        s += &format!(
            "| {} | {} | {} × {} | {:.2} s | {plain:.2} | {:.2}–{:.2} s | {:.0} | {} | {:.2} GiB |\n",
            c.objective,
            c.recompute,
            c.batch,
            c.seq,
            c.step.median_s,
            c.step.min_s,
            c.step.max_s,
            c.tokens_per_s,
            c.reads_per_step,
            c.memory.peak_rss_bytes as f64 / (1u64 << 30) as f64
        );
    }
    s
}
