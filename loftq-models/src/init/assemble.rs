//! The final files, streamed from the pieces.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use safetensors::Dtype;

use super::piece::{Plan, piece_path};
use super::{Backbone, DistillReport, InitSpec, Report, TensorReport, Totals, peak_rss_bytes};
use crate::LlamaConfig;
use crate::io::{
    AdapterConfig, AdapterWriter, Checkpoint, FORMAT, FORMAT_KEY, StreamWriter, bf16_le_bytes,
    copy_side_files, floats_from_le, read_packed, write_atomic,
};
use crate::{ModelError, Result};

fn is_lora(name: &str) -> bool {
    name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight")
}

/// Writes the backbone(s), the adapter, config and tokenizer into `spec.out`.
pub fn write_outputs(
    spec: &InitSpec,
    plan: &Plan,
    gguf_config: Option<&LlamaConfig>,
) -> Result<()> {
    let work = super::work_dir(&spec.out);
    let pieces: Vec<Checkpoint> = (0..plan.items.len())
        .map(|i| Checkpoint::open(&piece_path(&work, i)))
        .collect::<Result<_>>()?;
    let out = &spec.out;
    match spec.backbone {
        Backbone::Packed | Backbone::Gguf => packed_backbone(&pieces, out)?,
        Backbone::Bf16 => bf16_backbone(plan, &pieces, out)?,
        Backbone::Both => {
            packed_backbone(&pieces, out)?;
            bf16_backbone(plan, &pieces, &out.join("bf16"))?;
        }
    }
    let dirs = match spec.backbone {
        Backbone::Both => vec![out.clone(), out.join("bf16")],
        _ => vec![out.clone()],
    };
    for d in &dirs {
        write_config(spec, gguf_config, d)?;
        copy_side_files(&spec.model, d)?;
    }
    adapter(spec, &pieces, &out.join("adapter"))
}

/// After [`write_outputs`] (and the distillation, which replaces the adapter): llama.cpp's
/// files from the final adapter, then `report.json`.
pub fn finish(
    spec: &InitSpec,
    reports: Vec<TensorReport>,
    distill: Option<DistillReport>,
    start: Instant,
    resumed: usize,
) -> Result<Report> {
    let out = &spec.out;
    if spec.backbone == Backbone::Gguf {
        llama_cpp_files(spec, out)?;
    }
    let report = Report {
        totals: totals(spec, &reports, start, resumed),
        tensors: reports,
        distill,
    };
    let json = serde_json::to_string_pretty(&report).expect("report serializes");
    write_atomic(&out.join("report.json"), json.as_bytes())?;
    Ok(report)
}

/// `model.gguf` and `adapter.gguf` from the packed output and the source GGUF (an HF source
/// converted first, in the output's work area).
fn llama_cpp_files(spec: &InitSpec, out: &Path) -> Result<()> {
    let source = crate::io::SourceGguf::open(&spec.model, &out.join(".loftq-source.gguf"))?;
    let ckpt = Checkpoint::open(&out.join("model.safetensors"))?;
    crate::io::write_gguf_base(&source.model, &ckpt, &out.join("model.gguf"))?;
    let adapter = crate::io::Adapter::read(&out.join("adapter"))?;
    crate::io::write_lora_gguf(&adapter, &source.model, &out.join("adapter.gguf"))
}

fn packed_backbone(pieces: &[Checkpoint], dir: &Path) -> Result<()> {
    let mut entries = Vec::new();
    let mut meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (FORMAT_KEY.to_string(), FORMAT.to_string()),
    ]);
    for p in pieces {
        for n in p.names().filter(|n| !is_lora(n)) {
            let e = p.entry(n).expect("listed");
            entries.push((n.to_string(), e.dtype, e.shape.clone()));
        }
        for (k, v) in p.metadata() {
            if k.starts_with(crate::io::HEADER_PREFIX) {
                meta.insert(k.clone(), v.clone());
            }
        }
    }
    let mut w = StreamWriter::create(&dir.join("model.safetensors"), &entries, &meta)?;
    for p in pieces {
        for n in p.names().filter(|n| !is_lora(n)) {
            let written = w.write(n, p.bytes(n)?.1);
            p.release(n);
            written?;
        }
    }
    w.finish()
}

fn bf16_backbone(plan: &Plan, pieces: &[Checkpoint], dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut entries = Vec::new();
    for (item, p) in plan.items.iter().zip(pieces) {
        let name = &item.name;
        let (dtype, shape) = match item.target {
            Some((s, _)) => (Dtype::BF16, s.to_vec()),
            None => {
                let e = p.entry(name).expect("pass-through tensor");
                let float = matches!(e.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64);
                (if float { Dtype::BF16 } else { e.dtype }, e.shape.clone())
            }
        };
        entries.push((name.clone(), dtype, shape));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let mut w = StreamWriter::create(&dir.join("model.safetensors"), &entries, &meta)?;
    for (item, p) in plan.items.iter().zip(pieces) {
        let name = &item.name;
        let bytes = match read_packed(p, name)? {
            Some(packed) => bf16_le_bytes(
                &packed
                    .dequantize()
                    .map_err(|e| ModelError::quant(name, e))?,
            ),
            None => {
                let (e, raw) = p.bytes(name)?;
                match floats_from_le(e.dtype, raw) {
                    Some(v) => bf16_le_bytes(&v),
                    None => raw.to_vec(),
                }
            }
        };
        w.write(name, &bytes)?;
        for n in p.names() {
            p.release(n);
        }
    }
    w.finish()
}

fn write_config(spec: &InitSpec, gguf: Option<&LlamaConfig>, dir: &Path) -> Result<()> {
    let text = match gguf {
        Some(c) => serde_json::to_string_pretty(&c.to_hf_json()).expect("json"),
        None => {
            let src = spec.model.join("config.json");
            if !src.is_file() {
                return Ok(());
            }
            std::fs::read_to_string(&src).map_err(|e| ModelError::io(&src, e))?
        }
    };
    write_atomic(&dir.join("config.json"), text.as_bytes())
}

fn adapter(spec: &InitSpec, pieces: &[Checkpoint], dir: &Path) -> Result<()> {
    let mut entries = Vec::new();
    let mut modules = Vec::new();
    for p in pieces {
        for n in p.names().filter(|n| is_lora(n)) {
            let e = p.entry(n).expect("listed");
            entries.push((n.to_string(), e.dtype, e.shape.clone()));
            if let Some(m) = n.strip_suffix(".lora_A.weight") {
                modules.push(m.to_string());
            }
        }
    }
    let mut w = AdapterWriter::create(dir, &entries)?;
    for p in pieces {
        for n in p.names().filter(|n| is_lora(n)) {
            w.write(n, p.bytes(n)?.1)?;
            p.release(n);
        }
    }
    w.finish(&AdapterConfig::of_lora(&spec.lora, modules, &spec.model))
}

fn totals(spec: &InitSpec, reports: &[TensorReport], start: Instant, resumed: usize) -> Totals {
    let params: u64 = reports
        .iter()
        .map(|r| (r.shape[0] * r.shape[1]) as u64)
        .sum();
    let base_bits: f64 = reports
        .iter()
        .map(|r| r.bits_per_param * (r.shape[0] * r.shape[1]) as f64)
        .sum();
    let adapter_bits: f64 = reports
        .iter()
        .map(|r| 32.0 * (spec.lora.rank * (r.shape[0] + r.shape[1])) as f64)
        .sum();
    let quant: Vec<f64> = reports
        .iter()
        .filter_map(|r| r.rel_err_quant.map(f64::from))
        .collect();
    let n = reports.len().max(1) as f64;
    let mean_of = |f: fn(&TensorReport) -> Option<f32>| {
        let v: Vec<f64> = reports.iter().filter_map(|r| f(r).map(f64::from)).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    Totals {
        mean_weighted_err_quant: mean_of(|r| r.weighted_err_quant),
        mean_weighted_err_init: mean_of(|r| r.weighted_err_init),
        tensors: reports.len(),
        params,
        avg_bits_per_param: (base_bits + adapter_bits) / params.max(1) as f64,
        avg_base_bits_per_param: base_bits / params.max(1) as f64,
        mean_rel_err_quant: (!quant.is_empty())
            .then(|| quant.iter().sum::<f64>() / quant.len() as f64),
        mean_rel_err_init: reports
            .iter()
            .map(|r| f64::from(r.rel_err_init))
            .sum::<f64>()
            / n,
        wall_seconds: start.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
        resumed,
    }
}
