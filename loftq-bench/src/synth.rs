//! Synthetic checkpoints with the shapes of real models: Gaussian bf16 weights (std 0.02),
//! norms at 1, written one tensor at a time (bounded memory) as an HF directory with a
//! byte-level tokenizer.

use std::collections::HashMap;
use std::path::Path;

use loftq_models::config::LINEAR_PATHS;
use loftq_models::config::{Family, LlamaConfig, RopeConfig, RopeScaling};
use loftq_models::io::{StreamWriter, write_atomic};
use safetensors::Dtype;

/// Shapes of a known architecture with `layers` decoder layers.
pub fn config(arch: &str, layers: Option<usize>) -> Result<LlamaConfig, String> {
    // (vocab, hidden, ffn, layers, heads, kv heads, tied)
    let (vocab, hidden, ffn, n, heads, kv, tied) = match arch {
        "smollm2-135m" => (49152, 576, 1536, 30, 9, 3, true),
        "llama-3.2-1b" => (128256, 2048, 8192, 16, 32, 8, true),
        "llama2-7b" => (32000, 4096, 11008, 32, 32, 32, false),
        other => {
            return Err(format!(
                "unknown --arch {other} (smollm2-135m, llama-3.2-1b, llama2-7b)"
            ));
        }
    };
    Ok(LlamaConfig {
        family: Family::Llama,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_hidden_layers: layers.unwrap_or(n),
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-5,
        rope: RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::None,
        },
        tie_word_embeddings: tied,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        max_position_embeddings: 4096,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        sliding_window: None,
        partial_rotary_factor: None,
    })
}

/// Every tensor of `c`: name and shape, in file order.
pub fn tensors(c: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, q, kv, f) = (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
    );
    let mut v = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, h],
    )];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        v.push((format!("{p}.input_layernorm.weight"), vec![h]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        let shapes = [[q, h], [kv, h], [kv, h], [h, q], [f, h], [f, h], [h, f]];
        for (name, s) in LINEAR_PATHS.iter().zip(shapes) {
            v.push((format!("{p}.{name}.weight"), s.to_vec()));
        }
    }
    v.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        v.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
    }
    v
}

/// Writes the checkpoint into `dir`. Returns the number of parameters.
pub fn write(c: &LlamaConfig, dir: &Path, seed: u64) -> Result<u64, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let list = tensors(c);
    let entries: Vec<(String, Dtype, Vec<usize>)> = list
        .iter()
        .map(|(n, s)| (n.clone(), Dtype::BF16, s.clone()))
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let path = dir.join("model.safetensors");
    let mut w = StreamWriter::create(&path, &entries, &meta).map_err(|e| e.to_string())?;
    let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut params = 0u64;
    for (name, shape) in &list {
        let n: usize = shape.iter().product();
        params += n as u64;
        let bytes: Vec<u8> = if shape.len() == 1 {
            (0..n).flat_map(|_| half::bf16::ONE.to_le_bytes()).collect()
        } else {
            (0..n)
                .flat_map(|_| half::bf16::from_f32(0.02 * gaussian(&mut rng)).to_le_bytes())
                .collect()
        };
        w.write(name, &bytes).map_err(|e| e.to_string())?;
    }
    w.finish().map_err(|e| e.to_string())?;
    let cfg = serde_json::to_string_pretty(&c.to_hf_json()).expect("json");
    write_atomic(&dir.join("config.json"), cfg.as_bytes()).map_err(|e| e.to_string())?;
    let tok = loftq_models::tokenizer::byte_level_json().to_string();
    write_atomic(&dir.join("tokenizer.json"), tok.as_bytes()).map_err(|e| e.to_string())?;
    Ok(params)
}

/// Approximately standard normal: the sum of four uniforms (xorshift64), rescaled. Cheap,
/// and the tails do not matter for these benchmarks.
fn gaussian(s: &mut u64) -> f32 {
    let mut sum = 0.0f32;
    for _ in 0..4 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        sum += (*s >> 40) as f32 / (1u64 << 24) as f32;
    }
    (sum - 2.0) * (3.0f32).sqrt()
}
