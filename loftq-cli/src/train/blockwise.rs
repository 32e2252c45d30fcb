//! `loftq train --blockwise`: the adapters fitted one decoder layer at a time, both models
//! read from disk one layer at a time.

use crate::error::Result;
use burn::tensor::Device;
use loftq_models::config::decoder_linear_paths;
use loftq_models::nn::{LayerReader, LayerSource, LoadOptions};
use loftq_models::train::{
    BlockwiseConfig, BlockwiseEvent, TrainConfig, TrainJob, distill_blockwise,
};

use super::{Fresh, TrainArgs, read_text};
use crate::progress::{Progress, done, json_line};

/// Runs `loftq train --blockwise` on `device`, the student built as `opts` says (with a fresh
/// adapter when `opts` has none).
#[allow(clippy::print_stdout)]
pub(super) fn run(
    a: &TrainArgs,
    cfg: &TrainConfig,
    opts: LoadOptions,
    device: &Device,
) -> Result<()> {
    let teacher_path = a
        .distill_from
        .as_ref()
        .expect("clap: --blockwise requires it");
    let mut template = opts.adapter.map(|ad| ad.config.clone());
    let mut student = LayerReader::open(&a.model, device, opts)?;
    if template.is_none() {
        let fresh = Fresh::of(a);
        let c = &student.ends().config;
        let any = decoder_linear_paths(c.family, c.num_hidden_layers).any(|p| fresh.picks(&p));
        if !any {
            return Err(fresh.no_match(a));
        }
        template = Some(fresh.config.clone());
        student = student.with_hook(move |i, layer| {
            layer.add_lora(i, &fresh.lora, |p| fresh.picks(p));
        });
    }
    let mut template = template.expect("read or fresh");
    if let Some(p) = a.dropout {
        template.lora_dropout = p;
    }
    let teacher = LayerReader::open(teacher_path, device, LoadOptions::default())?;
    let config = &student.ends().config;
    let (stream, val) = read_text(a, config.eos_token_id)?;
    eprintln!(
        "{} training tokens from {} file(s); {} validation tokens; {} layers, read one at a time",
        stream.tokens.len(),
        stream.files.len(),
        val.as_ref().map_or(0, |v| v.tokens.len()),
        config.num_hidden_layers
    );
    let bw = BlockwiseConfig {
        rows: a.blockwise_rows,
        seq: a.seq,
        batch: a.batch,
        steps: a.steps,
        lr: a.lr,
        adamw: cfg.adamw,
        seed: a.seed,
        resume: a.resume,
    };
    let mut bar = (!a.json).then(|| Progress::new(config.num_hidden_layers as u64));
    let job = TrainJob::new(&template, &stream.tokens, &bw, &a.out).validated(val.as_ref());
    let report = distill_blockwise(&student, &teacher, job, |e| {
        if a.json {
            json_line(&e);
            return;
        }
        let bar = bar.as_mut().expect("not json");
        match e {
            BlockwiseEvent::Resumed { layers } => {
                bar.inc(layers as u64, "");
                bar.note(&format!("resumed after {layers} layers"));
            }
            BlockwiseEvent::Layer(f) => bar.inc(
                1,
                &format!(
                    "layer {}: output error {:.3e} → {:.3e}",
                    f.layer, f.mse_before, f.mse_after
                ),
            ),
            BlockwiseEvent::Eval(r) => bar.note(&format!(
                "{}: validation perplexity {:.3}, KL from the teacher {:.4}",
                if r.step == 0 { "before" } else { "after" },
                r.ppl,
                r.kl.unwrap_or(f64::NAN)
            )),
        }
    })?;
    let secs: f64 = report.layers.iter().map(|l| l.seconds).sum();
    let msg = format!(
        "done: {} layers in {secs:.1} s; adapter in {}",
        report.layers.len(),
        a.out.join("adapter").display()
    );
    done(bar.as_mut(), &msg);
    Ok(())
}
