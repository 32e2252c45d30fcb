//! `loftq inspect`: what a checkpoint, GGUF file, packed or bitsandbytes backbone or adapter
//! holds.

use std::path::{Path, PathBuf};

use clap::Args;
use loftq_models::io::{
    ADAPTER_CONFIG, Adapter, Checkpoint, Gguf, LOFTQ_INIT, bnb_summary, is_bnb_part, is_gguf,
    read_packed,
};
use loftq_models::{LlamaConfig, ModelError};

use crate::error::Result;

/// Arguments of `loftq inspect`.
#[derive(Args)]
pub struct InspectArgs {
    /// An HF directory, a .safetensors or .gguf file, or a PEFT adapter directory.
    path: PathBuf,
    /// List every tensor (default: a summary by kind).
    #[arg(long)]
    tensors: bool,
}

struct Row {
    name: String,
    kind: String,
    shape: Vec<usize>,
    bytes: usize,
}

/// Runs `loftq inspect`.
#[allow(clippy::print_stdout)]
pub fn run(args: &InspectArgs) -> Result<()> {
    let path = &args.path;
    if path.is_dir() && path.join(ADAPTER_CONFIG).is_file() {
        return adapter(path);
    }
    // A model directory's config: a file that is not JSON is an error; one that is JSON but
    // not an architecture this tool runs is shown as such.
    let config = path.join("config.json");
    let arch = if path.is_dir() && config.is_file() {
        let text = std::fs::read_to_string(&config).map_err(|e| ModelError::io(&config, e))?;
        serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| ModelError::format(&config, format!("not JSON: {e}")))?;
        Some(match LlamaConfig::from_json(&text) {
            Ok(c) => format!(
                "{:?}, {} layers, hidden {}, {} heads",
                c.family, c.num_hidden_layers, c.hidden_size, c.num_attention_heads
            ),
            Err(e) => format!("not runnable here: {e}"),
        })
    } else {
        None
    };
    let rows = if is_gguf(path) {
        gguf_rows(path)?
    } else {
        safetensors_rows(path)?
    };
    if rows.is_empty() {
        return Err(ModelError::format(path, "no tensors").into());
    }
    println!("{}", path.display());
    if let Some(a) = arch {
        println!("  config.json: {a}");
    }
    if args.tensors {
        for r in &rows {
            let n: usize = r.shape.iter().product();
            println!(
                "  {:<56} {:<14} {:>16} {:>7.3} bits/param",
                r.name,
                r.kind,
                format!("{:?}", r.shape),
                8.0 * r.bytes as f64 / n.max(1) as f64
            );
        }
    }
    let mut kinds: Vec<&str> = rows.iter().map(|r| r.kind.as_str()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    println!(
        "  {:<22} {:>8} {:>14} {:>14} {:>10}",
        "kind", "tensors", "params", "bytes", "bits/param"
    );
    let line = |kind: &str, sel: &[&Row]| {
        let params: usize = sel.iter().map(|r| r.shape.iter().product::<usize>()).sum();
        let bytes: usize = sel.iter().map(|r| r.bytes).sum();
        println!(
            "  {kind:<22} {:>8} {params:>14} {bytes:>14} {:>10.3}",
            sel.len(),
            8.0 * bytes as f64 / params.max(1) as f64
        );
    };
    for k in &kinds {
        let sel: Vec<&Row> = rows.iter().filter(|r| r.kind == *k).collect();
        line(k, &sel);
    }
    line("total", &rows.iter().collect::<Vec<_>>());
    // A `loftq init` output or a LoftQ organisation release: its adapter (and report) too.
    for sub in ["adapter", LOFTQ_INIT] {
        if path.join(sub).join(ADAPTER_CONFIG).is_file() {
            adapter(&path.join(sub))?;
        }
    }
    let report = path.join("report.json");
    if let Ok(text) = std::fs::read_to_string(&report) {
        let r: loftq_models::init::Report = serde_json::from_str(&text)
            .map_err(|e| ModelError::format(&report, format!("bad report: {e}")))?;
        let t = &r.totals;
        println!(
            "{}: {} tensors, mean error {} → {:.4}, {:.3} bits/param with the adapter",
            report.display(),
            t.tensors,
            t.mean_rel_err_quant
                .map_or("-".to_string(), |e| format!("{e:.4}")),
            t.mean_rel_err_init,
            t.avg_bits_per_param
        );
    }
    Ok(())
}

fn safetensors_rows(path: &Path) -> Result<Vec<Row>> {
    let ck = Checkpoint::open(path)?;
    let mut rows = Vec::new();
    let packed = loftq_models::io::packed_names(&ck);
    for name in &packed {
        let p = read_packed(&ck, name)?.expect("listed");
        rows.push(Row {
            name: name.clone(),
            kind: p.config.label(),
            shape: p.shape.to_vec(),
            bytes: p.storage_bits() / 8,
        });
    }
    let bnb = loftq_models::io::bnb_names(&ck);
    for name in &bnb {
        let b = bnb_summary(&ck, name)?.expect("listed");
        rows.push(Row {
            name: name.clone(),
            kind: b.label,
            shape: b.shape,
            bytes: b.bytes,
        });
    }
    for name in ck.names() {
        if packed.iter().any(|p| name.starts_with(&format!("{p}.q")))
            || bnb.iter().any(|b| b == name)
            || is_bnb_part(name)
        {
            continue;
        }
        let e = ck.entry(name).expect("listed");
        rows.push(Row {
            name: name.to_string(),
            kind: e.dtype.to_string(),
            shape: e.shape.clone(),
            bytes: e.numel() * e.dtype.bitsize() / 8,
        });
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(rows)
}

fn gguf_rows(path: &Path) -> Result<Vec<Row>> {
    let g = Gguf::open(path)?;
    Ok(g.tensors
        .iter()
        .map(|(name, t)| {
            let n: usize = t.shape.iter().product();
            Row {
                name: name.clone(),
                kind: t.ty.name(),
                shape: t.shape.clone(),
                bytes: t.ty.byte_len(n).unwrap_or(0),
            }
        })
        .collect())
}

#[allow(clippy::print_stdout)]
fn adapter(path: &Path) -> Result<()> {
    let a = Adapter::read(path)?;
    let c = &a.config;
    println!("{} (PEFT {} adapter)", path.display(), c.peft_type);
    println!(
        "  r {}, lora_alpha {}, rslora {}, dropout {}, init_lora_weights {}",
        c.r, c.lora_alpha, c.use_rslora, c.lora_dropout, c.init_lora_weights
    );
    match c.target_modules.as_array() {
        Some(list) if list.len() > 8 => {
            let mut kinds: Vec<&str> = list
                .iter()
                .filter_map(|v| v.as_str()?.rsplit('.').next())
                .collect();
            kinds.sort_unstable();
            kinds.dedup();
            println!(
                "  target_modules: {} paths ({})",
                list.len(),
                kinds.join(", ")
            );
        }
        _ => println!("  target_modules {}", c.target_modules),
    }
    if let Some(base) = &c.base_model_name_or_path {
        println!("  base model {base}");
    }
    let params: usize = a
        .modules
        .values()
        .map(|w| w.a.data.len() + w.b.data.len())
        .sum();
    println!("  {} adapted modules, {params} parameters", a.modules.len());
    Ok(())
}
