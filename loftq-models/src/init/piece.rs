//! The plan of a run and its pieces: one small safetensors file per finished tensor.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use loftq_core::calib::{
    BaseQuantizer, CalibratedConfig, Objective, base_errors, calibrated, gptq_base,
};
use loftq_core::init::{Base, LoraInit, init_lora, qlora_factors};
use loftq_core::quant::{PackedTensor, host_values};
use loftq_core::{LoftqError, LoftqResult, QuantConfig, Quantizer, loftq};

use super::plan::{is_embedding_or_head, module_of_weight, quant_for};
use super::{InitMethod, InitSpec, TensorReport};
use crate::io::{
    Checkpoint, OutTensor, TensorSource, add_packed, check_finite, write_atomic, write_safetensors,
};
use crate::nn::tensor_seed;
use crate::{ModelError, Result};

/// One tensor of the source and what to do with it.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanItem {
    /// HF name.
    pub name: String,
    /// `Some((shape, quantizer))` if it gets an adapter.
    pub target: Option<([usize; 2], QuantConfig)>,
}

/// Every tensor of the source, in name order.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The tensors.
    pub items: Vec<PlanItem>,
}

impl Plan {
    /// Decides the target of every tensor and checks the ranks.
    ///
    /// # Errors
    /// No tensor matching `--target`, a rank larger than a targeted matrix, an input that is
    /// already quantized.
    pub fn new(spec: &InitSpec, source: &dyn TensorSource) -> Result<Self> {
        let names = source.tensor_names();
        let embed_shape = names
            .iter()
            .find(|n| n.contains("embed") && n.ends_with(".weight"))
            .map(|n| source.shape(n))
            .transpose()?;
        let mut items = Vec::with_capacity(names.len());
        for name in names {
            if source.quantized(&name)? {
                return Err(ModelError::tensor(
                    source.root(),
                    &name,
                    "is already quantized; give the full-precision model",
                ));
            }
            let shape = source.shape(&name)?;
            let module = module_of_weight(&name);
            let wanted = match (module, shape.as_slice()) {
                (Some(m), &[_, _]) => {
                    let linear =
                        !is_embedding_or_head(&name) && Some(&shape) != embed_shape.as_ref();
                    spec.target.picks(m, &spec.exclude, linear)
                }
                _ => false,
            };
            let target = if wanted {
                let s = [shape[0], shape[1]];
                if spec.lora.rank == 0 || spec.lora.rank > s[0].min(s[1]) {
                    return Err(ModelError::Settings(format!(
                        "rank {} does not fit `{name}` of shape {s:?}",
                        spec.lora.rank
                    )));
                }
                Some((s, quant_for(&name, s[1], &spec.layer_rules, spec.quant)))
            } else {
                None
            };
            items.push(PlanItem { name, target });
        }
        let plan = Self { items };
        if plan.targets() == 0 {
            return Err(ModelError::Settings(format!(
                "no 2-D weight of {} matches the targets {:?} (minus the exclusions)",
                source.root().display(),
                spec.target
            )));
        }
        Ok(plan)
    }

    /// Number of targeted tensors.
    pub fn targets(&self) -> usize {
        self.items.iter().filter(|i| i.target.is_some()).count()
    }

    /// Parameters of the targeted tensors.
    pub fn target_params(&self) -> u64 {
        self.items
            .iter()
            .filter_map(|i| i.target.map(|(s, _)| (s[0] * s[1]) as u64))
            .sum()
    }

    /// Checks that the work area (from an interrupted run) is this job's.
    ///
    /// # Errors
    /// [`ModelError::Output`] if it belongs to a different job.
    pub fn check(&self, work: &Path, spec: &InitSpec) -> Result<()> {
        match std::fs::read_to_string(work.join("plan.json")) {
            Ok(old) if old != self.json(spec) => Err(self.mismatch(work)),
            _ => Ok(()),
        }
    }

    fn mismatch(&self, work: &Path) -> ModelError {
        ModelError::output(
            work,
            "the interrupted run used other settings or another model; resume it with the \
             same ones, or write elsewhere",
        )
    }

    fn json(&self, spec: &InitSpec) -> String {
        let targets: Vec<(String, Option<String>)> = self
            .items
            .iter()
            .map(|i| (i.name.clone(), i.target.map(|(_, q)| q.label())))
            .collect();
        let mut spec_json = serde_json::to_value(spec).expect("spec serializes");
        spec_json["out"] = serde_json::Value::Null;
        // The distillation comes after the pieces: a resume may change it (`distill::run`
        // starts its own part again when its settings changed).
        if let Some(o) = spec_json.as_object_mut() {
            o.remove("distill");
        }
        serde_json::json!({"spec": spec_json, "tensors": targets}).to_string()
    }

    /// Writes `plan.json`, or checks that an existing one is this job's.
    ///
    /// # Errors
    /// [`ModelError::Output`] if the work area belongs to a different job.
    pub fn check_or_write(&self, work: &Path, spec: &InitSpec) -> Result<()> {
        let path = work.join("plan.json");
        let json = self.json(spec);
        match std::fs::read_to_string(&path) {
            Ok(old) if old == json => Ok(()),
            Ok(_) => Err(self.mismatch(work)),
            Err(_) => write_atomic(&path, json.as_bytes()),
        }
    }

    /// Indices of the tensors already done.
    pub fn done(&self, work: &Path) -> HashSet<usize> {
        (0..self.items.len())
            .filter(|&i| piece_path(work, i).is_file())
            .collect()
    }
}

/// The piece file of tensor `i`.
pub fn piece_path(work: &Path, i: usize) -> PathBuf {
    work.join(format!("piece-{i:06}.safetensors"))
}

const REPORT_KEY: &str = "loftq.report";

/// The report stored in a finished piece (`None` for pass-through tensors).
///
/// # Errors
/// [`ModelError`] if the piece is unreadable (a damaged work area).
pub fn read_report(work: &Path, i: usize) -> Result<Option<TensorReport>> {
    let path = piece_path(work, i);
    let ck = Checkpoint::open(&path)?;
    ck.metadata()
        .get(REPORT_KEY)
        .map(|s| {
            serde_json::from_str(s)
                .map_err(|e| ModelError::format(&path, format!("bad piece report: {e}")))
        })
        .transpose()
}

/// A tensor read from the source, ready for [`compute`].
#[derive(Debug)]
pub enum Loaded {
    /// A tensor passed through as stored.
    Pass(OutTensor),
    /// A targeted weight as `f32`.
    Weight(crate::io::HostTensor),
}

/// Reads what [`compute`] needs for `item` (run ahead of it on another thread).
///
/// # Errors
/// [`ModelError`] naming the tensor.
pub fn load(source: &dyn TensorSource, item: &PlanItem) -> Result<Loaded> {
    let loaded = load_inner(source, item);
    source.release(&item.name);
    loaded
}

fn load_inner(source: &dyn TensorSource, item: &PlanItem) -> Result<Loaded> {
    let name = &item.name;
    if item.target.is_some() {
        return Ok(Loaded::Weight(check_finite(
            source,
            name,
            source.tensor(name)?,
        )?));
    }
    Ok(Loaded::Pass(match source.raw(name)? {
        Some((dtype, bytes)) => OutTensor {
            dtype,
            shape: source.shape(name)?,
            bytes,
        },
        None => {
            let t = source.tensor(name)?;
            OutTensor::f32(t.shape, &t.data)
        }
    }))
}

/// Computes tensor `i` from what [`load`] read and writes its piece.
///
/// # Errors
/// [`ModelError`] naming the tensor.
pub fn compute(
    spec: &InitSpec,
    item: &PlanItem,
    loaded: Loaded,
    i: usize,
    work: &Path,
    device: &Device,
    objective: Option<Objective<'_>>,
) -> Result<Option<TensorReport>> {
    let name = &item.name;
    let (host, shape, quant) = match (loaded, item.target) {
        (Loaded::Weight(h), Some((shape, quant))) => (h, shape, quant),
        (Loaded::Pass(t), _) => {
            let tensors = BTreeMap::from([(name.clone(), t)]);
            write_safetensors(&piece_path(work, i), &tensors, None)?;
            return Ok(None);
        }
        (Loaded::Weight(_), None) => unreachable!("load() reads weights only for targets"),
    };
    // QPiSSA reports the error of quantizing W itself: measure it before W moves to the device.
    let qpissa_quant_err = match spec.method {
        InitMethod::Qpissa => Some(host_quant_error(&host.data, shape, quant, name)?),
        _ => None,
    };
    let w: Tensor<2> = Tensor::from_data(TensorData::new(host.data, shape), device);
    let t0 = Instant::now();
    let seed = tensor_seed(spec.seed, name);
    let method = spec.method_for(quant, seed);
    let lerr = |source| ModelError::Loftq {
        name: name.clone(),
        source,
    };
    let (start, weighted) = match objective {
        Some(o) => calibrated_start(spec, &w, &method, o, quant, seed).map_err(lerr)?,
        None => (
            plain_start(spec, &w, &method, qpissa_quant_err).map_err(lerr)?,
            None,
        ),
    };
    write_start(item, i, work, start, weighted, t0.elapsed().as_secs_f64()).map(Some)
}

/// Writes the piece of target `i` from its computed start: the packed (or dense) base, the
/// factors and the report, which it returns. `weighted`: the calibrated errors.
pub(super) fn write_start(
    item: &PlanItem,
    i: usize,
    work: &Path,
    start: Start,
    weighted: Option<(f32, f32)>,
    seconds: f64,
) -> Result<TensorReport> {
    let name = &item.name;
    let shape = start.base.dense().dims();
    let mut tensors = BTreeMap::new();
    let mut meta = HashMap::new();
    let Start {
        base,
        a,
        b,
        rel_err_quant,
        rel_err_init,
        iters_used,
    } = start;
    let module = module_of_weight(name).expect("targets are weights");
    let (label, bits) = match &base {
        Base::Quantized { packed, .. } => {
            add_packed(name, packed, &mut tensors, &mut meta);
            (packed.config.label(), packed.bits_per_param())
        }
        Base::Dense(t) => {
            tensors.insert(
                name.clone(),
                OutTensor::f32(shape.to_vec(), &host_values(t)),
            );
            ("dense".to_string(), 32.0)
        }
    };
    tensors.insert(
        format!("{module}.lora_A.weight"),
        OutTensor::f32(a.dims().to_vec(), &host_values(&a)),
    );
    tensors.insert(
        format!("{module}.lora_B.weight"),
        OutTensor::f32(b.dims().to_vec(), &host_values(&b)),
    );
    let report = TensorReport {
        name: name.clone(),
        shape,
        quantizer: label,
        bits_per_param: bits,
        rel_err_quant,
        rel_err_init,
        weighted_err_quant: weighted.map(|w| w.0),
        weighted_err_init: weighted.map(|w| w.1),
        iters_used,
        seconds,
    };
    meta.insert(
        REPORT_KEY.to_string(),
        serde_json::to_string(&report).expect("report serializes"),
    );
    write_safetensors(&piece_path(work, i), &tensors, Some(meta))?;
    Ok(report)
}

/// A computed start before it is written.
pub(super) struct Start {
    base: Base,
    a: Tensor<2>,
    b: Tensor<2>,
    rel_err_quant: Option<f32>,
    rel_err_init: f32,
    iters_used: usize,
}

impl From<LoftqResult> for Start {
    fn from(r: LoftqResult) -> Self {
        Start {
            rel_err_init: r.rel_err(),
            iters_used: r.history.len(),
            rel_err_quant: Some(r.rel_err_quant),
            base: Base::Quantized {
                packed: r.packed,
                dequantized: r.q,
            },
            a: r.lora_a,
            b: r.lora_b,
        }
    }
}

/// The uncalibrated starts.
fn plain_start(
    spec: &InitSpec,
    w: &Tensor<2>,
    method: &LoraInit,
    qpissa_quant_err: Option<f32>,
) -> std::result::Result<Start, LoftqError> {
    Ok(match method {
        LoraInit::Loftq(cfg) => loftq(w, cfg)?.into(),
        m => {
            let st = init_lora(w, m, spec.lora.rank, spec.lora.scale())?;
            let rel_err_quant = match spec.method {
                InitMethod::Qlora => Some(st.rel_err),
                InitMethod::Qpissa => qpissa_quant_err,
                _ => None,
            };
            Start {
                base: st.base,
                a: st.lora_a,
                b: st.lora_b,
                rel_err_quant,
                rel_err_init: st.rel_err,
                iters_used: 0,
            }
        }
    })
}

/// The calibrated starts: LoftQ's alternation with the weighted adapter fit (and GPTQ when
/// asked), or QLoRA's zero adapter on a GPTQ base. Also returns the weighted errors of
/// the QLoRA start and of this one.
fn calibrated_start(
    spec: &InitSpec,
    w: &Tensor<2>,
    method: &LoraInit,
    objective: Objective<'_>,
    quant: QuantConfig,
    seed: u64,
) -> std::result::Result<(Start, Option<(f32, f32)>), LoftqError> {
    match (method, spec.quantizer) {
        (LoraInit::Loftq(cfg), base) => {
            let r = calibrated(
                w,
                objective,
                &CalibratedConfig {
                    loftq: cfg.clone(),
                    base,
                },
            )?;
            let weighted = (r.weighted_err_quant, r.weighted_err());
            Ok((r.start.into(), Some(weighted)))
        }
        (LoraInit::Zeros { .. }, BaseQuantizer::Gptq(g)) => {
            let rtn = Quantizer::new(quant)?.quantize_dequantize(w)?.1;
            let (packed, q) = gptq_base(w, objective.inputs, quant, &g)?;
            let [out, inp] = w.dims();
            let (a, b) = qlora_factors([out, inp], spec.lora.rank, seed, &w.device());
            // `*_quant` are round to nearest's (the QLoRA start), `*_init` this base's.
            let (plain_rtn, w_rtn) = base_errors(w, &rtn, objective)?;
            let (plain, w_gptq) = base_errors(w, &q, objective)?;
            Ok((
                Start {
                    base: Base::Quantized {
                        packed,
                        dequantized: q,
                    },
                    a,
                    b,
                    rel_err_quant: Some(plain_rtn),
                    rel_err_init: plain,
                    iters_used: 0,
                },
                Some((w_rtn, w_gptq)),
            ))
        }
        (m, _) => Ok((plain_start(spec, w, m, None)?, None)),
    }
}

fn host_quant_error(w: &[f32], shape: [usize; 2], cfg: QuantConfig, name: &str) -> Result<f32> {
    let qerr = |e| ModelError::quant(name, e);
    let q = Quantizer::new(cfg).map_err(qerr)?;
    let packed = PackedTensor::pack(&q.quantize_host(w, shape).map_err(qerr)?, cfg);
    let d = packed.dequantize().map_err(qerr)?;
    Ok(loftq_core::rel_dist(w, &d) as f32)
}
