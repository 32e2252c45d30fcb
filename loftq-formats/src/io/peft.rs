//! PEFT LoRA adapter directories: `adapter_config.json` + `adapter_model.safetensors` (or
//! PyTorch's `adapter_model.bin`, read only), and the LoftQ organisation's releases, whose
//! adapter is in the backbone's `loftq_init/` folder.
//!
//! Keys are `base_model.model.<module path>.lora_A.weight` `[r, in]` and
//! `....lora_B.weight` `[out, r]`, exactly as PEFT saves them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use loftq_core::LoraSpec;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::atomic::write_atomic;
use super::peft_weights::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, Weights, adapter_dir};
use super::safetensors::{HostTensor, f32_le_bytes};
use super::stream::StreamWriter;
use crate::{ModelError, Result};

/// What PEFT puts before a module path in adapter tensor names.
pub const PREFIX: &str = "base_model.model.";

/// The fields of `adapter_config.json` this project reads and writes. Unknown fields are
/// kept in `extra` and written back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Always `"LORA"`.
    pub peft_type: String,
    /// `"CAUSAL_LM"` for decoder models.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Rank.
    pub r: usize,
    /// Scaling numerator.
    pub lora_alpha: f64,
    /// Module names or suffixes (a list), or a regular expression (a string).
    pub target_modules: Value,
    /// Dropout on the adapter input.
    #[serde(default)]
    pub lora_dropout: f64,
    /// `s = alpha/√r` instead of `alpha/r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Weights stored `[in, out]` (GPT-2 `Conv1D`).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Must be `"none"` here.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// `true` when the saved weights are the initialization (also for LoftQ artifacts, so
    /// that PEFT does not re-quantize on load); `"loftq"`, `"pissa"`, ... otherwise.
    #[serde(default = "default_init")]
    pub init_lora_weights: Value,
    /// Where the base model was.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Saved for inference.
    #[serde(default)]
    pub inference_mode: bool,
    /// Per-module ranks (keys are module names or suffixes).
    #[serde(default)]
    pub rank_pattern: HashMap<String, usize>,
    /// Per-module alphas.
    #[serde(default)]
    pub alpha_pattern: HashMap<String, f64>,
    /// Modules trained in full and saved whole beside the factors (a classification head).
    /// Left out when there are none, as before it was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    /// Everything else PEFT wrote.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

fn default_bias() -> String {
    "none".into()
}

fn default_init() -> Value {
    Value::Bool(true)
}

impl AdapterConfig {
    /// The config of the adapter `lora` describes (its rank, alpha and rsLoRA) on
    /// `target_modules`, started from the model at `base`: what `init` and `refine` write.
    pub fn of_lora(lora: &LoraSpec, target_modules: Vec<String>, base: &Path) -> Self {
        let mut config = Self::new(lora.rank, f64::from(lora.alpha), target_modules);
        config.use_rslora = lora.rslora;
        config.base_model_name_or_path = Some(base.display().to_string());
        config
    }

    /// A LoRA config as this project writes it: `init_lora_weights: true` (the saved weights
    /// are the initialization), bias none, no dropout.
    pub fn new(r: usize, lora_alpha: f64, target_modules: Vec<String>) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r,
            lora_alpha,
            target_modules: Value::from(target_modules),
            lora_dropout: 0.0,
            use_rslora: false,
            fan_in_fan_out: false,
            bias: "none".into(),
            init_lora_weights: Value::Bool(true),
            base_model_name_or_path: None,
            inference_mode: true,
            rank_pattern: HashMap::new(),
            alpha_pattern: HashMap::new(),
            modules_to_save: None,
            extra: serde_json::Map::new(),
        }
    }

    /// The scaling `s` of module `path` (whose rank is `r`): `alpha/r`, or `alpha/√r` with
    /// rsLoRA, `alpha` taken from `alpha_pattern` when a key is a suffix of `path`.
    pub fn scaling(&self, path: &str, r: usize) -> f64 {
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| module_matches(path, k))
            .map_or(self.lora_alpha, |(_, &a)| a);
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

/// PEFT's module match: `path` is `key`, or ends with `.key` (`q_proj` matches
/// `model.layers.0.self_attn.q_proj`).
pub fn module_matches(path: &str, key: &str) -> bool {
    path == key || path.ends_with(&format!(".{key}"))
}

/// The decoder layer index in a name (`model.layers.12.mlp.up_proj.weight` → 12), for
/// per-layer precision and file order. Recognises `layers.N`, `layer.N`, `h.N`, `blocks.N`,
/// `blk.N`.
pub fn layer_index(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).find_map(|w| {
        matches!(w[0], "layers" | "layer" | "h" | "blocks" | "blk")
            .then(|| w[1].parse().ok())
            .flatten()
    })
}

/// The factors of one adapted module, PEFT layout.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraWeights {
    /// `lora_A` `[r, in]`.
    pub a: HostTensor,
    /// `lora_B` `[out, r]`.
    pub b: HostTensor,
}

/// A LoRA adapter: its config and the factors per module path (e.g.
/// `model.layers.0.self_attn.q_proj`).
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    /// The configuration.
    pub config: AdapterConfig,
    /// Factors keyed by module path.
    pub modules: BTreeMap<String, LoraWeights>,
    /// Whole tensors of the `modules_to_save`, keyed by the model's tensor name
    /// (`classifier.weight`): they replace the model's own.
    pub saved: BTreeMap<String, HostTensor>,
}

impl Adapter {
    /// An adapter of `modules` with `config` as the template, its `target_modules` set to the
    /// modules' names (the last part of each path). `None` for no module.
    pub fn from_modules(
        mut config: AdapterConfig,
        modules: BTreeMap<String, LoraWeights>,
    ) -> Option<Adapter> {
        if modules.is_empty() {
            return None;
        }
        let names: BTreeSet<&str> = modules
            .keys()
            .map(|p| p.rsplit('.').next().unwrap_or(p))
            .collect();
        config.target_modules = names.into_iter().collect::<Vec<_>>().into();
        Some(Adapter {
            config,
            modules,
            saved: BTreeMap::new(),
        })
    }

    /// Reads an adapter directory.
    ///
    /// # Errors
    /// [`ModelError`] naming the file and tensor for unreadable or inconsistent files: a
    /// `lora_A` without its `lora_B`, ranks that disagree, `fan_in_fan_out` or a bias other
    /// than `none` (not supported).
    ///
    /// `dir` may also be a LoftQ organisation release: the adapter in its `loftq_init/` is
    /// read (see [`adapter_dir`]).
    pub fn read(dir: &Path) -> Result<Self> {
        let dir = &adapter_dir(dir);
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let config: AdapterConfig = serde_json::from_str(&text)
            .map_err(|e| ModelError::format(&cfg_path, format!("bad adapter config: {e}")))?;
        if config.peft_type != "LORA" {
            return Err(ModelError::format(
                &cfg_path,
                format!("peft_type `{}` is not LORA", config.peft_type),
            ));
        }
        if config.bias != "none" {
            return Err(ModelError::format(
                &cfg_path,
                format!("bias `{}` is not supported (only \"none\")", config.bias),
            ));
        }
        if config.fan_in_fan_out {
            return Err(ModelError::format(
                &cfg_path,
                "fan_in_fan_out adapters (GPT-2 Conv1D) are not supported",
            ));
        }
        check_config(&config).map_err(|msg| ModelError::format(&cfg_path, msg))?;
        let (weights_path, ckpt) = Weights::open(dir)?;
        let mut modules = BTreeMap::new();
        let mut saved = BTreeMap::new();
        for name in &ckpt.names() {
            let name = name.as_str();
            let Some(path) = module_of(name, "lora_A") else {
                if module_of(name, "lora_B").is_some() {
                    continue;
                }
                let whole = name.strip_prefix(PREFIX).unwrap_or(name);
                let module = whole.rsplit_once('.').map_or(whole, |(m, _)| m);
                let listed =
                    (config.modules_to_save.iter().flatten()).any(|k| module_matches(module, k));
                if !listed {
                    return Err(ModelError::tensor(
                        &weights_path,
                        name,
                        "not a LoRA factor, nor a tensor of modules_to_save",
                    ));
                }
                let t = ckpt.f32(name)?;
                if t.data.iter().any(|v| !v.is_finite()) {
                    return Err(ModelError::tensor(
                        &weights_path,
                        name,
                        "a NaN or infinite value",
                    ));
                }
                saved.insert(whole.to_string(), t);
                continue;
            };
            let b_name = name.replace(".lora_A.", ".lora_B.");
            let a = ckpt.f32(name)?;
            let b = ckpt.f32(&b_name)?;
            let (Some([r, _]), Some([_, rb])) = (a.matrix_shape(), b.matrix_shape()) else {
                return Err(ModelError::tensor(
                    &weights_path,
                    name,
                    "factors must be 2-D",
                ));
            };
            if r != rb {
                return Err(ModelError::tensor(
                    &weights_path,
                    name,
                    format!("lora_A has rank {r} but lora_B has rank {rb}"),
                ));
            }
            if r == 0 {
                return Err(ModelError::tensor(&weights_path, name, "rank 0 factors"));
            }
            let want = config
                .rank_pattern
                .iter()
                .find(|(k, _)| module_matches(&path, k))
                .map_or(config.r, |(_, &r)| r);
            if r != want {
                return Err(ModelError::tensor(
                    &weights_path,
                    name,
                    format!("rank {r}, but {ADAPTER_CONFIG} says r = {want}"),
                ));
            }
            // A list of target modules must cover every adapted module (a string is a
            // regular expression or `all-linear`, left to the model to match).
            if let Some(list) = config.target_modules.as_array()
                && !list
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|k| module_matches(&path, k))
            {
                return Err(ModelError::tensor(
                    &weights_path,
                    name,
                    format!(
                        "module `{path}` is not in {ADAPTER_CONFIG}'s target_modules {}",
                        config.target_modules
                    ),
                ));
            }
            for (t, n) in [(&a, name), (&b, &b_name)] {
                if t.data.iter().any(|v| !v.is_finite()) {
                    return Err(ModelError::tensor(
                        &weights_path,
                        n,
                        "a NaN or infinite value",
                    ));
                }
            }
            modules.insert(path, LoraWeights { a, b });
        }
        if modules.is_empty() {
            return Err(ModelError::format(
                &weights_path,
                "no lora_A/lora_B tensors",
            ));
        }
        Ok(Self {
            config,
            modules,
            saved,
        })
    }

    /// The modules the adapter in `dir` adapts (those with a `lora_A`), from its weights
    /// file's tensor names alone: nothing is decoded or checked, as [`Adapter::read`] does.
    ///
    /// # Errors
    /// [`ModelError`] if the weights file cannot be opened.
    pub fn modules_in(dir: &Path) -> Result<BTreeSet<String>> {
        let (_, weights) = Weights::open(&adapter_dir(dir))?;
        let names = weights.names();
        Ok(names
            .iter()
            .filter_map(|n| module_of(n, "lora_A"))
            .collect())
    }

    /// The scaling of module `path`.
    pub fn scaling(&self, path: &str) -> Option<f64> {
        let w = self.modules.get(path)?;
        Some(self.config.scaling(path, w.a.shape[0]))
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (`f32`: the factors, then
    /// the [`saved`](Self::saved) tensors) into `dir` (created if needed), each file
    /// atomically, through [`AdapterWriter`].
    ///
    /// # Errors
    /// [`ModelError::Io`] if writing fails.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let factors = || {
            let lora = self.modules.iter().flat_map(|(path, w)| {
                [
                    (format!("{path}.lora_A.weight"), &w.a),
                    (format!("{path}.lora_B.weight"), &w.b),
                ]
            });
            lora.chain(self.saved.iter().map(|(name, t)| (name.clone(), t)))
        };
        let declared: Vec<_> = factors()
            .map(|(name, t)| (name, Dtype::F32, t.shape.clone()))
            .collect();
        let mut w = AdapterWriter::create(dir, &declared)?;
        for (name, t) in factors() {
            w.write(&name, &f32_le_bytes(&t.data))?;
        }
        w.finish(&self.config)
    }
}

/// A PEFT adapter directory written one factor at a time, in bounded memory: the factors are
/// declared first, by the model's names (`<module path>.lora_A.weight`, `....lora_B.weight`;
/// the writer adds PEFT's prefix), then written in that order. [`AdapterWriter::finish`]
/// renames `adapter_model.safetensors` into place and writes `adapter_config.json`, each
/// atomically. The one writer of the format: [`Adapter::write`] and `loftq init`'s streaming
/// assembly both use it.
#[derive(Debug)]
pub struct AdapterWriter {
    dir: PathBuf,
    weights: StreamWriter,
}

impl AdapterWriter {
    /// Starts the adapter in `dir` (created if needed) with the factors `(name, dtype, shape)`.
    ///
    /// # Errors
    /// [`ModelError::Io`] if the directory or the temporary file cannot be created.
    pub fn create(dir: &Path, factors: &[(String, Dtype, Vec<usize>)]) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let entries: Vec<_> = factors
            .iter()
            .map(|(name, dtype, shape)| (format!("{PREFIX}{name}"), *dtype, shape.clone()))
            .collect();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let weights = StreamWriter::create(&dir.join(ADAPTER_WEIGHTS), &entries, &meta)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            weights,
        })
    }

    /// Writes the next factor's bytes.
    ///
    /// # Errors
    /// As [`StreamWriter::write`].
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.weights.write(&format!("{PREFIX}{name}"), bytes)
    }

    /// Puts the weights in place, then writes `config`.
    ///
    /// # Errors
    /// As [`StreamWriter::finish`]; [`ModelError::Io`] if the config cannot be written.
    pub fn finish(self, config: &AdapterConfig) -> Result<()> {
        self.weights.finish()?;
        let json = serde_json::to_string_pretty(config).expect("config serializes");
        write_atomic(&self.dir.join(ADAPTER_CONFIG), json.as_bytes())
    }
}

/// `base_model.model.X.lora_A.weight` (or PEFT's older `X.lora_A.default.weight`) → `X`.
/// The settings a model cannot run with: rank 0 (also in `rank_pattern`), an alpha that is
/// not a finite number, a dropout outside `[0, 1)`.
fn check_config(c: &AdapterConfig) -> std::result::Result<(), String> {
    if c.r == 0 || c.rank_pattern.values().any(|&r| r == 0) {
        return Err("rank r is 0".into());
    }
    if !c.lora_alpha.is_finite() || c.alpha_pattern.values().any(|a| !a.is_finite()) {
        return Err(format!(
            "lora_alpha {} is not a finite number",
            c.lora_alpha
        ));
    }
    if !(0.0..1.0).contains(&c.lora_dropout) {
        return Err(format!("lora_dropout {} is outside [0, 1)", c.lora_dropout));
    }
    Ok(())
}

fn module_of(key: &str, factor: &str) -> Option<String> {
    let rest = key.strip_prefix(PREFIX).unwrap_or(key);
    let rest = rest
        .strip_suffix(&format!(".{factor}.weight"))
        .or_else(|| rest.strip_suffix(&format!(".{factor}.default.weight")))?;
    Some(rest.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_paths_from_peft_keys() {
        assert_eq!(
            module_of(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                "lora_A"
            )
            .as_deref(),
            Some("model.layers.0.self_attn.q_proj")
        );
        assert_eq!(
            module_of(
                "base_model.model.model.layers.3.mlp.up_proj.lora_B.default.weight",
                "lora_B"
            )
            .as_deref(),
            Some("model.layers.3.mlp.up_proj")
        );
        assert_eq!(module_of("base_model.model.x.weight", "lora_A"), None);
    }

    #[test]
    fn scaling_follows_alpha_rank_and_rslora() {
        let mut c = AdapterConfig::new(16, 32.0, vec!["q_proj".into()]);
        assert_eq!(c.scaling("model.layers.0.self_attn.q_proj", 16), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scaling("model.layers.0.self_attn.q_proj", 16), 8.0);
        c.alpha_pattern.insert("q_proj".into(), 4.0);
        assert_eq!(c.scaling("model.layers.0.self_attn.q_proj", 16), 1.0);
        assert_eq!(c.scaling("model.layers.0.self_attn.k_proj", 16), 8.0);
    }
}
