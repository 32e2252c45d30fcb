//! `loftq init`: LoftQ (or QLoRA, PiSSA, QPiSSA) on every targeted weight of a checkpoint.

use std::path::PathBuf;

use clap::Args;
use loftq_core::DeviceList;
use loftq_core::args::SvdArgs;
use loftq_core::calib::BaseQuantizer;
use loftq_core::quant::{parse_bits, parse_quantizer};
use loftq_models::init::plan::{parse_layer_bits, split_list};
use loftq_models::init::{
    Backbone, Budget, CalibInputs, Calibration, DEFAULT_DEVICE_BATCH, Distill, Event, InitMethod,
    InitSpec, Sensitivity, run_init,
};
use loftq_models::train::{EvalRecord, TrainEvent};

use crate::args::{LoraArgs, TargetArgs};
use crate::error::{Result, invalid};
use crate::progress::Progress;

/// Arguments of `loftq init`.
#[derive(Args)]
pub struct InitArgs {
    /// Full-precision model: an HF directory (safetensors, sharded or not) or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Output directory (must not exist or be empty, unless --resume): model.safetensors,
    /// config.json, tokenizer files, adapter/ (PEFT), report.json.
    #[arg(long)]
    out: PathBuf,
    /// How the adapter starts: loftq (alternating quantization and low-rank fit), qlora
    /// (plain quantization, B = 0), pissa (top-r components in the adapter, dense residual),
    /// qpissa (pissa with the residual quantized).
    #[arg(long, value_enum, default_value_t = InitMethod::Loftq)]
    method: InitMethod,
    /// Quantizer: nf4, nf3, nf2, int8, int4, int2 (symmetric), int4-asym, uniform4, ...; or
    /// llama.cpp's q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl (blocks of 32, f16 scales) and
    /// K-quants q4_k, q5_k, q6_k (super-blocks of 256), byte for byte as llama.cpp quantizes
    /// (--block-size and --double-quant do not apply). A K-quant on a matrix whose rows are not
    /// whole super-blocks takes llama-quantize's fallback: q4_k → q5_0, q5_k → q5_1,
    /// q6_k → q8_0.
    #[arg(long, default_value = "nf4")]
    bits: String,
    /// Elements per quantization block (0: one block per row).
    #[arg(long, default_value_t = 64)]
    block_size: usize,
    /// Quantize the block scales too (bitsandbytes' double quantization).
    #[arg(long)]
    double_quant: bool,
    /// Per-layer quantizers, first match wins, e.g. "0-3:nf4,*:nf2". The LoftQ reference's
    /// mixed precision for an average of b bits over L layers is "0-K:nf4,*:nf2" with
    /// K + 1 = ⌊L·(b−2)/2⌋ (SmolLM2's 30 layers at 2.5 bits: "0-6:nf4,*:nf2").
    #[arg(long, conflicts_with = "avg_bits")]
    layer_bits: Option<String>,
    /// Average bits per parameter of the quantized weights, scales included (adapters not):
    /// every matrix gets the --candidates quantizer that minimises the model's total error
    /// within this budget (with --calibration, the error of its outputs). Scores every
    /// candidate on every matrix first (one LoftQ iteration each, on the full-precision model
    /// with --calibration: about one more calibration pass). Overrides --bits.
    #[arg(long)]
    avg_bits: Option<f64>,
    /// The quantizers --avg-bits chooses from, comma-separated: nf2..nf8, int.., optionally
    /// with a block size and double quantization as in nf3-b128-dq (a bare name takes
    /// --block-size and --double-quant).
    #[arg(
        long,
        default_value = "nf2-b64-dq,nf2-b128-dq,nf3-b64-dq,nf3-b128-dq,nf4-b64-dq,nf4-b128-dq,\
                         nf8-b64-dq,nf8-b128-dq",
        requires = "avg_bits"
    )]
    candidates: String,
    /// With --calibration: weigh the layers' outputs by how much the loss on the calibration
    /// text cares about them, measured first by one backward pass per calibration sequence
    /// through the whole model (its linear layers held in NF8: ~1 byte a parameter). "layers":
    /// one weight per matrix, in the --avg-bits scores only (errors in the first layers pass
    /// through every later one); "rows": one weight per output row, in the scores and in the
    /// adapters' fit (measured on SmolLM2: better at NF2, a few percent worse at NF3).
    #[arg(long, value_enum, requires = "calibration")]
    sensitivity: Option<Sensitivity>,
    #[command(flatten)]
    lora: LoraArgs,
    /// LoftQ iterations (the best iterate is kept).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    #[command(flatten)]
    svd: SvdArgs,
    #[command(flatten)]
    targets: TargetArgs,
    /// Backbones to write: packed (ours), bf16 (dense, loads anywhere), both (bf16 in bf16/),
    /// gguf (packed, plus model.gguf and adapter.gguf for llama.cpp: one of llama.cpp's
    /// formats in --bits; from a .gguf --model its metadata and other tensors are carried
    /// over, an HF directory is converted as `loftq convert DIR F.gguf` does).
    #[arg(long, value_enum, default_value_t = Backbone::Packed)]
    backbone: Backbone,
    /// Device: cpu, wgpu[:N], cuda[:N]; several, comma-separated (cuda:0,cuda:1), each taking whole
    /// tensors. With one kind of device the output is the same as on one of them. On a CPU,
    /// cpu,cpu runs two tensors at once, overlapping one's serial parts with the other's
    /// products (17% faster for a 7B model on 2 cores, 1.5× the memory).
    #[arg(long, default_value = "cpu")]
    device: DeviceList,
    /// CPU threads (default: all).
    #[arg(long)]
    threads: Option<usize>,
    /// LoftQ on a GPU: up to N targets of one shape and quantizer (a layer's q_proj and
    /// o_proj, one projection across layers) run as one batched problem, so the device
    /// waits on the host once per step for all of them instead of once each; N times one
    /// matrix's memory, 64 MB of weights per group at most (1: one at a time). The CPU runs
    /// one at a time whatever N.
    #[arg(long, default_value_t = DEFAULT_DEVICE_BATCH, value_name = "N")]
    device_batch: usize,
    /// Seed of the random sketches and of QLoRA's A.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Calibration text (plain files, read in order, tokenized with the model's tokenizer):
    /// every targeted layer's adapter is fitted to its outputs on this text instead of to its
    /// weights, layer by layer as GPTQ runs (one decoder layer in memory at a time). Costs a
    /// forward pass of the text and one extra product per LoftQ iteration; with --method
    /// loftq (calibrated adapters) or --method qlora --quantizer gptq (a GPTQ base).
    #[arg(long, num_args = 1.., value_name = "FILE")]
    calibration: Vec<PathBuf>,
    /// Calibration tokens to use at most (whole sequences).
    #[arg(long, default_value_t = 16_384)]
    calibration_tokens: usize,
    /// Tokens per calibration sequence.
    #[arg(long, default_value_t = 512)]
    calibration_seq: usize,
    /// Which layers feed a layer's calibration inputs: quantized (the initialized layers
    /// below it, as the model will run), sequential (also, inside the layer, the initialized
    /// groups before the one being initialized: q/k/v, o, gate/up, down, GPTQ's
    /// true-sequential order; one pass per layer instead of two, ~10% faster at 2,048 tokens,
    /// measured worse on SmolLM2, much at NF2), or full (the full-precision layers).
    #[arg(long, value_enum, default_value_t = CalibInputs::Quantized)]
    calibration_inputs: CalibInputs,
    /// Drift correction F, 0 to 1 (default: 0.3 with quantized inputs, else 0). Each layer
    /// is fitted to two objectives mixed: its own outputs on the inputs the initialized
    /// layers below give it (weight 1 − F, GPTQ's), and the full-precision model's outputs
    /// on the full-precision inputs (weight F, GPTAQ's), so that it also undoes part of the
    /// drift the layers below caused. Costs one more forward pass of the full-precision
    /// model, a second in×in sum per input and one solve per matrix (about 1.5× the
    /// calibrated time); F = 1 over-fits the calibration text (see docs/calibration.md).
    #[arg(long, value_name = "F")]
    drift_correction: Option<f32>,
    /// Damping λ of the statistics: H + λ·mean(diag H)·I (GPTQ's 0.01). Larger values move
    /// the objective towards the plain weight error.
    #[arg(long, default_value_t = loftq_core::calib::DEFAULT_DAMPING)]
    damping: f64,
    /// How bases are quantized: rtn (round to nearest, block by block) or gptq (column by
    /// column, each column's error compensated through the calibration statistics; needs
    /// --calibration; about the cost of one more LoftQ iteration per quantization).
    #[arg(long, value_enum, default_value = "rtn")]
    quantizer: BaseQuantizer,
    /// With --calibration: after the start, distill its adapters for N steps towards the
    /// full-precision model (--model itself): the KL divergence of the next-token
    /// distributions at every position of random windows of the calibration files (all of
    /// them, less a held-out 5% that validation scores before and after), as `loftq train
    /// --distill-from` does. The bases do not change. Costs the full-precision model in
    /// memory and one forward and backward pass per step (SmolLM2, 60 steps: ~5 minutes on 2
    /// cores); measured on SmolLM2: 3–12% lower start perplexity at 3.0 bits, a third lower
    /// at NF2 (docs/calibration.md). Checkpoints go to the work area, so --resume continues
    /// it. 0: none.
    #[arg(long, default_value_t = 0, value_name = "N", requires = "calibration")]
    distill_steps: usize,
    /// Peak learning rate of --distill-steps (10 warm-up steps, cosine decay).
    #[arg(long, default_value_t = 5e-4, value_name = "LR")]
    distill_lr: f64,
    /// Rows per step of --distill-steps.
    #[arg(long, default_value_t = 4, value_name = "N")]
    distill_batch: usize,
    /// Tokens per row of --distill-steps.
    #[arg(long, default_value_t = 128, value_name = "N")]
    distill_seq: usize,
    /// Continue an interrupted run in --out (same options); the result is byte-identical.
    #[arg(long)]
    resume: bool,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn spec(a: &InitArgs) -> Result<InitSpec> {
    let quant = parse_bits(&a.bits, a.block_size, a.double_quant)
        .map_err(|e| invalid(format!("--bits: {e}")))?;
    let layer_rules = match &a.layer_bits {
        Some(s) => parse_layer_bits(s, a.block_size, a.double_quant)
            .map_err(|e| invalid(format!("--layer-bits: {e}")))?,
        None => Vec::new(),
    };
    let budget = match a.avg_bits {
        Some(avg) => Some(Budget {
            avg_bits: avg,
            candidates: split_list(&a.candidates)
                .iter()
                .map(|c| parse_quantizer(c, a.block_size, a.double_quant))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| invalid(format!("--candidates: {e}")))?,
        }),
        None => None,
    };
    if a.iters == 0 {
        return Err(invalid("--iters must be at least 1"));
    }
    if a.device_batch == 0 {
        return Err(invalid("--device-batch must be at least 1"));
    }
    let svd = a.svd.method(a.seed);
    Ok(InitSpec {
        model: a.model.clone(),
        out: a.out.clone(),
        method: a.method,
        quant,
        layer_rules,
        budget,
        lora: a.lora.spec()?,
        iters: a.iters,
        svd,
        target: a.targets.target(),
        exclude: a.targets.exclude(),
        backbone: a.backbone,
        seed: a.seed,
        calibration: (!a.calibration.is_empty()).then(|| Calibration {
            files: a.calibration.clone(),
            tokens: a.calibration_tokens,
            seq: a.calibration_seq,
            damping: a.damping,
            inputs: a.calibration_inputs,
            drift: a.drift_correction,
            sensitivity: a.sensitivity,
        }),
        quantizer: a.quantizer,
        distill: (a.distill_steps > 0).then(|| Distill {
            lr: a.distill_lr,
            batch: a.distill_batch,
            seq: a.distill_seq,
            ..Distill::new(a.distill_steps)
        }),
        device_batch: a.device_batch,
    })
}

/// Runs `loftq init`.
#[allow(clippy::print_stdout)]
pub fn run(a: &InitArgs) -> Result<()> {
    let spec = spec(a)?;
    if let Some(n) = a.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .map_err(|e| invalid(format!("--threads: {e}")))?;
    }
    let devices = a
        .device
        .open()
        .map_err(|e| invalid(format!("--device {}: {e}", a.device)))?;
    let mut bar: Option<Progress> = None;
    let (mut n, mut sum) = (0usize, 0f64);
    let mut on_event = |e: Event| match e {
        Event::Planned {
            targets,
            target_params,
            done,
        } => {
            let mut p = Progress::new(target_params);
            p.note(&format!(
                "{targets} weight matrices to initialize ({target_params} parameters){}",
                if done > 0 {
                    format!("; resuming, {done} already done")
                } else {
                    String::new()
                }
            ));
            bar = Some(p);
        }
        Event::Tensor(r) => {
            n += 1;
            sum += f64::from(r.rel_err_init);
            if let Some(p) = bar.as_mut() {
                let msg = format!(
                    "{} err {:.4} (mean {:.4})",
                    r.name,
                    r.rel_err_init,
                    sum / n as f64
                );
                p.inc((r.shape[0] * r.shape[1]) as u64, &msg);
            }
        }
        Event::Calibrating { layer, layers } => {
            if let Some(p) = bar.as_mut() {
                p.note(&format!(
                    "calibration: decoder layer {} of {layers}",
                    layer + 1
                ));
            }
        }
        Event::Scoring { done, total } => {
            if let Some(p) = bar.as_mut()
                && (done == 1 || done == total || done % 10 == 0)
            {
                p.note(&format!(
                    "--avg-bits: scored the candidates on {done} of {total} matrices"
                ));
            }
        }
        Event::Sensitivity { done, total } => {
            if let Some(p) = bar.as_mut()
                && (done == 1 || done == total || done % 8 == 0)
            {
                p.note(&format!(
                    "--sensitivity: backward pass over {done} of {total} calibration sequences"
                ));
            }
        }
        Event::Assembling => {
            if let Some(p) = bar.as_mut() {
                p.note("writing the output files");
            }
        }
        Event::Distill(e) => {
            if let (Some(p), Some(msg)) = (bar.as_mut(), distill_note(&e, a.distill_steps)) {
                p.note(&msg);
            }
        }
    };
    let result = run_init(&spec, &devices, a.resume, &mut on_event);
    let Some(report) = crate::progress::finish(bar, result, a.json)? else {
        return Ok(());
    };
    println!(
        "{:<48} {:>14} {:>12} {:>12} {:>9} {:>6} {:>8}",
        "tensor", "quantizer", "quant err", "init err", "bits", "iters", "seconds"
    );
    for r in &report.tensors {
        let q = r
            .rel_err_quant
            .map_or("-".to_string(), |e| format!("{e:.4}"));
        println!(
            "{:<48} {:>14} {q:>12} {:>12.4} {:>9.3} {:>6} {:>8.2}",
            r.name, r.quantizer, r.rel_err_init, r.bits_per_param, r.iters_used, r.seconds
        );
    }
    let t = &report.totals;
    let q = t
        .mean_rel_err_quant
        .map_or("-".to_string(), |e| format!("{e:.4}"));
    println!(
        "{} tensors, {} parameters: mean error {q} (quantized only) → {:.4} (this start); \
         {:.3} bits/param with the adapter ({:.3} base); {:.1} s; peak RSS {}",
        t.tensors,
        t.params,
        t.mean_rel_err_init,
        t.avg_bits_per_param,
        t.avg_base_bits_per_param,
        t.wall_seconds,
        t.peak_rss_bytes.map_or("-".to_string(), |b| format!(
            "{:.2} GiB",
            b as f64 / (1u64 << 30) as f64
        ))
    );
    if let (Some(q), Some(i)) = (t.mean_weighted_err_quant, t.mean_weighted_err_init) {
        println!(
            "on the calibration inputs, ‖(W − W')·S‖/‖W·S‖: mean {q:.4} (round to nearest) → \
             {i:.4} (this start)"
        );
    }
    let mut chosen: std::collections::BTreeMap<&str, (usize, u64)> = Default::default();
    for r in &report.tensors {
        let e = chosen.entry(r.quantizer.as_str()).or_default();
        e.0 += 1;
        e.1 += (r.shape[0] * r.shape[1]) as u64;
    }
    let list: Vec<String> = chosen
        .iter()
        .map(|(q, (n, p))| {
            format!(
                "{q} ×{n} ({:.1}%)",
                100.0 * *p as f64 / t.params.max(1) as f64
            )
        })
        .collect();
    if let Some(b) = &spec.budget {
        println!(
            "--avg-bits {}: {:.4} bits/param reached; {}",
            b.avg_bits,
            t.avg_base_bits_per_param,
            list.join(", ")
        );
    } else if chosen.len() > 1 {
        // --layer-bits, or a K-quant's fallback on rows that are not whole super-blocks.
        println!("quantizers: {}", list.join(", "));
    }
    if let Some(d) = &report.distill {
        let eval = |e: &Option<EvalRecord>| e.as_ref().map_or("-".to_string(), held_out);
        println!(
            "distilled {} steps on {} tokens in {:.0} s; held-out calibration text: {} → {}",
            d.steps,
            d.train_tokens,
            d.seconds,
            eval(&d.before),
            eval(&d.after)
        );
    }
    println!("wrote {}", spec.out.display());
    Ok(())
}

/// A progress line for a distillation event: every tenth step, validations, resumption.
fn distill_note(e: &TrainEvent, steps: usize) -> Option<String> {
    match e {
        TrainEvent::Resumed { step } => Some(format!("distillation: resumed after step {step}")),
        TrainEvent::Step(r) if r.step == 1 || r.step % 10 == 0 || r.step == steps => Some(format!(
            "distillation: step {} of {steps}, KL {:.4}, {:.1} s",
            r.step, r.loss, r.seconds
        )),
        TrainEvent::Eval(r) => Some(format!(
            "distillation: after {} steps, held-out {}",
            r.step,
            held_out(r)
        )),
        _ => None,
    }
}

/// A validation of the distillation: perplexity and the KL from the full-precision model.
fn held_out(r: &EvalRecord) -> String {
    format!(
        "perplexity {:.3}, KL {:.4}",
        r.ppl,
        r.kl.unwrap_or(f64::NAN)
    )
}
