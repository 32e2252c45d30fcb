//! Tests of `config.json` parsing and validation.

use super::*;

pub(super) const BASE: &str = r#""vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4"#;

#[test]
fn transformers_4_and_5_spellings_agree() {
    let v4 = format!(
        r#"{{{BASE}, "rope_theta": 500000.0, "rope_scaling": {{"rope_type": "llama3",
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}}}"#
    );
    let v5 = format!(
        r#"{{{BASE}, "rope_parameters": {{"rope_type": "llama3", "rope_theta": 500000.0,
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}}}"#
    );
    let a = LlamaConfig::from_json(&v4).unwrap();
    let b = LlamaConfig::from_json(&v5).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.rope.theta, 500000.0);
    assert!(matches!(
        a.rope.scaling,
        RopeScaling::Llama3 { factor: 8.0, .. }
    ));
    assert_eq!(a.head_dim, 16);
    assert_eq!(a.num_key_value_heads, 4);
    // Our own output reads back to the same architecture.
    let c = LlamaConfig::from_json(&a.to_hf_json().to_string()).unwrap();
    assert_eq!(a, c);
}

/// Phi-3 with LongRoPE (transformers 5's spelling) reads back from our own `config.json`;
/// factors that do not cover the head are refused.
#[test]
fn phi3_longrope_round_trips() {
    let json = format!(
        r#"{{{BASE}, "model_type": "phi3", "max_position_embeddings": 128,
        "rope_parameters": {{"rope_type": "longrope", "rope_theta": 10000.0,
        "short_factor": [1, 1, 1, 1, 1, 1, 1, 1], "long_factor": [2, 2, 2, 2, 2, 2, 2, 2],
        "original_max_position_embeddings": 32}}}}"#
    );
    let a = LlamaConfig::from_json(&json).unwrap();
    assert!(a.family.layout() == Layout::Fused && a.rope.scaling.attention_factor() > 1.0);
    let b = LlamaConfig::from_json(&a.to_hf_json().to_string()).unwrap();
    assert_eq!(a, b);
    let short = json.replace("[1, 1, 1, 1, 1, 1, 1, 1]", "[1, 1]");
    let err = LlamaConfig::from_json(&short).unwrap_err().to_string();
    assert!(err.contains("2 short and 8 long factors"), "{err}");
}

#[test]
fn rejects_what_it_cannot_run() {
    let bad_type = format!(r#"{{{BASE}, "model_type": "gpt2"}}"#);
    assert!(
        LlamaConfig::from_json(&bad_type)
            .unwrap_err()
            .to_string()
            .contains("gpt2")
    );
    let bad_rope = format!(r#"{{{BASE}, "rope_scaling": {{"rope_type": "yarn", "factor": 2}}}}"#);
    assert!(
        LlamaConfig::from_json(&bad_rope)
            .unwrap_err()
            .to_string()
            .contains("yarn")
    );
    let bad_heads = format!(r#"{{{BASE}, "num_key_value_heads": 3}}"#);
    assert!(LlamaConfig::from_json(&bad_heads).is_err());
    assert!(LlamaConfig::from_json("{").is_err());
    // Sizes whose products overflow, an odd head width, a non-positive epsilon: refused
    // before anything is allocated from them.
    let huge = r#"{"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 4611686018427387904}"#;
    assert!(
        LlamaConfig::from_json(huge)
            .unwrap_err()
            .to_string()
            .contains("too large")
    );
    let odd = format!(r#"{{{BASE}, "head_dim": 15}}"#);
    assert!(
        LlamaConfig::from_json(&odd)
            .unwrap_err()
            .to_string()
            .contains("head_dim 15")
    );
    let eps = format!(r#"{{{BASE}, "rms_norm_eps": -1e-6}}"#);
    assert!(
        LlamaConfig::from_json(&eps)
            .unwrap_err()
            .to_string()
            .contains("rms_norm_eps")
    );
    let zero = format!(r#"{{{BASE}, "vocab_size": 0}}"#).replacen("\"vocab_size\": 256, ", "", 1);
    assert!(
        LlamaConfig::from_json(&zero)
            .unwrap_err()
            .to_string()
            .contains("vocab_size is 0")
    );
    // Values from a GGUF file go through the same check.
    let mut c = LlamaConfig::from_json(&format!("{{{BASE}}}")).unwrap();
    c.rope.theta = f64::NAN;
    assert!(matches!(
        c.validate(),
        Err(ConfigError::Value {
            field: "rope_theta",
            ..
        })
    ));
    c.rope.theta = 1e4;
    c.head_dim = 7;
    assert!(c.validate().is_err());
    let qwen = format!(r#"{{{BASE}, "model_type": "qwen2"}}"#);
    assert!(LlamaConfig::from_json(&qwen).unwrap().qkv_bias);
}

/// Phi-2's settings: LayerNorm's epsilon, biases everywhere, `gelu_new`, a partial rotary
/// factor (0.5 when absent, as transformers) rounded down to whole dimensions; they round-trip.
/// A partial factor outside Phi, an odd rotary width, `qk_layernorm` and SiLU are refused.
#[test]
fn phi_reads_its_own_settings() {
    let json = format!(
        r#"{{{BASE}, "model_type": "phi", "hidden_act": "gelu_new", "layer_norm_eps": 1e-5,
        "rope_parameters": {{"rope_type": "default", "rope_theta": 10000.0,
        "partial_rotary_factor": 0.4}}}}"#
    );
    let a = LlamaConfig::from_json(&json).unwrap();
    assert_eq!((a.head_dim, a.rotary_dim(), a.rms_norm_eps), (16, 6, 1e-5));
    assert!(a.family.parallel() && a.qkv_bias && a.o_bias && a.mlp_bias);
    assert_eq!(a.family.layout(), Layout::Phi);
    let b = LlamaConfig::from_json(&a.to_hf_json().to_string()).unwrap();
    assert_eq!(a, b);
    let default = format!(r#"{{{BASE}, "model_type": "phi"}}"#);
    assert_eq!(LlamaConfig::from_json(&default).unwrap().rotary_dim(), 8);
    let refused = |json: String, what: &str| {
        let err = LlamaConfig::from_json(&json).unwrap_err().to_string();
        assert!(err.contains(what), "{what}: {err}");
    };
    refused(
        format!(r#"{{{BASE}, "partial_rotary_factor": 0.5}}"#),
        "partial_rotary_factor",
    );
    refused(
        format!(r#"{{{BASE}, "model_type": "phi", "partial_rotary_factor": 0.1}}"#),
        "1 rotary dimensions",
    );
    refused(
        format!(r#"{{{BASE}, "model_type": "phi", "qk_layernorm": true}}"#),
        "qk_layernorm",
    );
    refused(
        format!(r#"{{{BASE}, "model_type": "phi", "hidden_act": "silu"}}"#),
        "gelu_new",
    );
}
