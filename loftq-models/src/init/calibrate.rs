//! The calibration pass of `loftq init`, decoder layer by decoder layer as GPTQ runs it: the
//! calibration text's hidden states enter layer `l`; that layer alone is loaded; the Gram
//! matrices of its linear layers' inputs are summed; its targeted weights are initialized with
//! them; the hidden states then go through the initialized layer (or the full-precision one)
//! to layer `l + 1`. Memory: one layer and the calibration hidden states.
//!
//! After each layer the hidden states are written to the work area, so `--resume` continues
//! from the last finished layer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};

use burn::tensor::{Device, Tensor, TensorData};
use loftq_core::calib::{Cross, Gram, Objective, Weighting};

use super::pass::{
    KEEP_ACTIVATIONS_BYTES, advance, embed, in_layer, paired_statistics, sequential, statistics,
};
use super::piece::{self, Plan, piece_path};
use super::plan::layer_index;
use super::sensitivity::{self, Rows};
use super::{CalibInputs, Calibration, Event, InitSpec, TensorReport};
use crate::config::{Family, LlamaConfig};
use crate::io::{Checkpoint, OutTensor, TensorSource, read_packed, write_safetensors};
use crate::nn::{
    BaseWeight, DecoderLayer, LoadOptions, LoraAdapter, PackedWeight, RopeTables, load_layer,
};
use crate::{ModelError, Result};

/// What [`run`] reports as it goes.
pub(super) enum Progress {
    /// A layer starts ([`Event::Calibrating`]).
    Layer(Event),
    /// Plan item `.0` is done.
    Tensor(usize, TensorReport),
}

const STATE_FILE: &str = "calibration-hidden.safetensors";
const STATE_KEY: &str = "hidden";
const FP_STATE_KEY: &str = "hidden_fp";
const LAYER_KEY: &str = "loftq.next_layer";

/// The architecture of the source (GGUF metadata, or the directory's `config.json`).
fn model_config(spec: &InitSpec, source: &dyn TensorSource) -> Result<LlamaConfig> {
    match source.llama_config() {
        Some(c) => Ok(c.clone()),
        None => LlamaConfig::from_file(&spec.model.join("config.json")),
    }
}

/// The plan's targets by decoder layer: `(item, position in the family's linear paths)`.
///
/// # Errors
/// A target that is not one of a decoder layer's linear layers.
fn targets_by_layer(plan: &Plan, family: Family) -> Result<BTreeMap<usize, Vec<(usize, usize)>>> {
    let mut by_layer: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
    for (i, item) in plan.items.iter().enumerate() {
        if item.target.is_none() {
            continue;
        }
        let pos = layer_index(&item.name).and_then(|l| {
            let p = (family.linear_paths().iter())
                .position(|p| item.name == format!("model.layers.{l}.{p}.weight"))?;
            Some((l, p))
        });
        let Some((l, p)) = pos else {
            return Err(ModelError::Settings(format!(
                "calibration covers the decoder layers' linear weights; `{}` is not one \
                 (exclude it)",
                item.name
            )));
        };
        by_layer.entry(l).or_default().push((i, p));
    }
    Ok(by_layer)
}

/// What both passes over the model start from.
struct Setup<'a> {
    calib: &'a Calibration,
    config: LlamaConfig,
    /// The plan's targets by decoder layer ([`targets_by_layer`]).
    by_layer: BTreeMap<usize, Vec<(usize, usize)>>,
    rope: RopeTables,
}

impl<'a> Setup<'a> {
    fn new(
        spec: &'a InitSpec,
        plan: &Plan,
        source: &dyn TensorSource,
        device: &Device,
    ) -> Result<Self> {
        let calib = spec
            .calibration
            .as_ref()
            .expect("called for calibrated runs");
        let config = model_config(spec, source)?;
        let rope = RopeTables::new(&config.rope, config.rotary_dim(), calib.seq, device);
        Ok(Self {
            calib,
            by_layer: targets_by_layer(plan, config.family)?,
            config,
            rope,
        })
    }

    /// Decoder layer `l` in full precision, and the plan's targets in it.
    fn layer(
        &self,
        source: &dyn TensorSource,
        l: usize,
        device: &Device,
    ) -> Result<(DecoderLayer, &[(usize, usize)])> {
        let layer = load_layer(&self.config, source, l, device, &LoadOptions::default())?;
        Ok((layer, self.by_layer.get(&l).map_or(&[][..], Vec::as_slice)))
    }
}

/// Runs the pass over every decoder layer on the calibration tokens `ids` (from
/// [`tokens`](super::calibration::tokens)), initializing the plan's targets that have no piece
/// in `work` yet, their output rows weighted by `rows` when given; returns the items it
/// covered (all targets).
pub(super) fn run(
    spec: &InitSpec,
    plan: &Plan,
    source: &dyn TensorSource,
    work: &Path,
    (ids, rows): (&[u32], Option<&Rows>),
    device: &Device,
    progress: &mut dyn FnMut(Progress),
) -> Result<HashSet<usize>> {
    let setup = Setup::new(spec, plan, source, device)?;
    let (calib, config, rope) = (setup.calib, &setup.config, &setup.rope);
    let done = plan.done(work);
    let (seqs, seq, hidden) = (ids.len() / calib.seq, calib.seq, config.hidden_size);
    let state = work.join(STATE_FILE);
    let drift = calib.drift() > 0.0;
    // `xf`: the full-precision model's hidden states, when its outputs are part of the target.
    let (mut x, mut xf, first) = match read_state(&state, [seqs, seq, hidden], drift)? {
        Some(s) => s,
        None => {
            let x = embed(source, ids, hidden)?;
            (x.clone(), drift.then_some(x), 0)
        }
    };
    let layers = config.num_hidden_layers;
    let groups = config.family.input_groups();
    loftq_core::profile::start(device);
    for l in first..layers {
        progress(Progress::Layer(Event::Calibrating { layer: l, layers }));
        let (mut layer, targets) = setup.layer(source, l, device)?;
        loftq_core::profile::mark(device, "calibration: load layer");
        let mut needs = [false; 4];
        for &(i, p) in targets {
            needs[groups[p]] |= !done.contains(&i);
        }
        // With full-precision inputs the initialized layer is never run.
        let full = calib.inputs == CalibInputs::Full;
        let members = |g: usize| (targets.iter().copied()).filter(move |&(_, p)| groups[p] == g);
        // Initializes the targets of the groups `grams` names that have no piece yet, each with
        // its group's statistics (given when some have none), all in one pool; then puts every
        // member of those groups into the layer (unless `full`).
        let mut init_groups = |layer: &mut DecoderLayer,
                               mut grams: Vec<(usize, Option<Gram>, Option<Cross>)>|
         -> Result<()> {
            let (mut slots, mut todo) = (Vec::new(), Vec::new());
            for (g, gram, cross) in &mut grams {
                let Some(gram) = gram.take() else { continue };
                // The full-precision copies are read again from the source; the
                // statistics live until the group's last tensor is done.
                release(layer, &members(*g).collect::<Vec<_>>());
                let weighting = gram.into_weighting(calib.damping);
                let users: Vec<usize> = (members(*g).map(|(i, _)| i))
                    .filter(|i| !done.contains(i))
                    .collect();
                let stats = Stats {
                    weighting: weighting.map_err(|e| in_layer(l, e))?,
                    cross: cross.take().map(|c| Slot::new(c, users.len())),
                };
                let width = stats.weighting.dim();
                slots.push(Slot::new(stats, users.len()));
                todo.extend(users.into_iter().map(|i| (i, width, slots.len() - 1)));
            }
            let area = |i: usize| plan.items[i].target.map_or(0, |(s, _)| s[0] * s[1]);
            // Largest first; among equals the widest statistics, freed early (down_proj).
            todo.sort_by_key(|&(i, width, _)| std::cmp::Reverse((area(i), width)));
            let jobs: Vec<(usize, &Slot<Stats>)> =
                todo.into_iter().map(|(i, _, s)| (i, &slots[s])).collect();
            let job = |i: usize, stats: &Stats| {
                let item = &plan.items[i];
                let mut loaded = piece::load(source, item)?;
                if let (Some(c), piece::Loaded::Weight(h)) = (&stats.cross, &mut loaded) {
                    // The pairing is freed once the group's last target is made.
                    let target = stats.weighting.target(&h.data, &c.take(), calib.drift());
                    h.data =
                        target.map_err(|e| ModelError::Data(format!("`{}`: {e}", item.name)))?;
                }
                let out = item.target.map_or(0, |(shape, _)| shape[0]);
                let rows = sensitivity::of(rows, &item.name, out)?;
                let wg = Some(Objective {
                    inputs: &stats.weighting,
                    rows,
                });
                piece::compute(spec, item, loaded, i, work, device, wg)
            };
            loftq_core::profile::mark(device, "calibration: weighting");
            let split = jobs.partition_point(|&(i, _)| area(i) > ALONE_ABOVE);
            let mut report = |i, r| progress(Progress::Tensor(i, r));
            for (part, at_once) in [(&jobs[..split], 1), (&jobs[split..], TENSORS_AT_ONCE)] {
                in_pool(part, at_once, &job, &mut report)?;
            }
            loftq_core::profile::mark(device, "calibration: initialize tensors");
            // Kept buffers would sit through the pass.
            #[cfg(feature = "flex")]
            loftq_core::cpu::release_buffers();
            for (i, p) in grams
                .iter()
                .flat_map(|&(g, ..)| members(g))
                .filter(|_| !full)
            {
                let name = &plan.items[i].name;
                install(layer, p, &piece_path(work, i), name, spec, device)?;
            }
            loftq_core::profile::mark(device, "calibration: install");
            Ok(())
        };
        x = if calib.inputs == CalibInputs::Sequential {
            let how = (needs, l, KEEP_ACTIVATIONS_BYTES);
            let mut init_group = |layer: &mut DecoderLayer, g: usize, gram: Option<Gram>| {
                init_groups(layer, vec![(g, gram, None)])
            };
            sequential(&mut layer, x, [seq, hidden], rope, how, &mut init_group)?
        } else {
            // The full-precision layer is observed when some target needs its statistics; with
            // full-precision inputs that pass also moves the hidden states on, else they go
            // through the initialized layer after. Every group's statistics are known at once,
            // so the layer's tensors share one pool.
            let (mut grams, mut next) = ([None, None, None, None], None);
            let mut crosses = [None, None, None, None];
            match xf.take() {
                Some(f) if f != x => {
                    let (g, c, y) = paired_statistics(&layer, &x, f, [seq, hidden], rope)
                        .map_err(|e| in_layer(l, e))?;
                    (grams, crosses) = (g.map(Some), c.map(Some));
                    xf = Some(y);
                }
                f if needs.contains(&true) || f.is_some() => {
                    // Equal streams (layer 0): the full-precision one is this pass's output.
                    let (fp, out) = (f.is_some(), full || f.is_some());
                    drop(f);
                    let (g, y) = statistics(&layer, &x, [seq, hidden], rope, out)
                        .map_err(|e| in_layer(l, e))?;
                    grams = g.map(Some);
                    match fp {
                        true => xf = Some(y),
                        false => next = full.then_some(y),
                    }
                }
                f => xf = f,
            }
            loftq_core::profile::mark(device, "calibration: statistics");
            let given = (grams.into_iter().zip(crosses).enumerate())
                .map(|(g, (gram, cross))| (g, gram.filter(|_| needs[g]), cross))
                .collect();
            init_groups(&mut layer, given)?;
            match next {
                Some(y) => y,
                None => {
                    let mut x = x;
                    advance(&layer, &mut x, [seq, hidden], rope)?;
                    loftq_core::profile::mark(device, "calibration: advance");
                    x
                }
            }
        };
        write_state(&state, (&x, xf.as_deref()), [seqs, seq, hidden], l + 1)?;
        loftq_core::profile::mark(device, "calibration: write state");
    }
    let _ = std::fs::remove_file(&state);
    Ok(setup.by_layer.values().flatten().map(|&(i, _)| i).collect())
}

/// Tensors computed at once: one tensor's serial stretches (quantization, the small SVD) leave
/// a core idle that another's products fill; each more multiplies the alternation's buffers
/// (the 7B shapes' gate_proj: ~0.2 GB each).
const TENSORS_AT_ONCE: usize = 2;

/// Matrices above this many elements run alone: each holds ~0.8 GB at the 7B shapes.
const ALONE_ABOVE: usize = 1 << 25;

// The tensors run as tasks of rayon's pool, where faer's products inside them run too: as
// threads of their own they competed with the pool's threads for the cores (on 2 cores:
// ~12% more CPU time, more of it spent waiting in the kernel, and 25% more memory).

/// What [`in_pool`] runs for each tensor.
type Job<'a> = dyn Fn(usize, &Stats) -> Result<Option<TensorReport>> + Sync + 'a;

/// A group's statistics: the weighting of its inputs and, with drift correction, their
/// pairing with the full-precision model's inputs.
struct Stats {
    weighting: Weighting,
    cross: Option<Slot<Cross>>,
}

/// Hands a group's statistics to its tensors' tasks; the last task to take them holds the last
/// reference, so they are freed when it is done with them, not with the layer (the 7B shapes'
/// down_proj: 485 MB for the factor, as much again for the pairing).
struct Slot<T>(Mutex<(usize, Option<Arc<T>>)>);

impl<T> Slot<T> {
    fn new(stats: T, users: usize) -> Self {
        Self(Mutex::new((users, Some(Arc::new(stats)))))
    }

    /// The statistics, for one of the `users` given to [`Slot::new`].
    fn take(&self) -> Arc<T> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.0 = s.0.saturating_sub(1);
        let stats = if s.0 == 0 { s.1.take() } else { s.1.clone() };
        stats.expect("one take per user")
    }
}

/// Runs `job` on every `(item, statistics)` of `jobs`, in order, `at_once` at a time,
/// handing each report to `done` on this thread as it comes. After the first error no new job
/// starts; the running ones finish, and the error is returned.
fn in_pool(
    jobs: &[(usize, &Slot<Stats>)],
    at_once: usize,
    job: &Job<'_>,
    done: &mut dyn FnMut(usize, TensorReport),
) -> Result<()> {
    let (next, stop) = (AtomicUsize::new(0), AtomicBool::new(false));
    let (next, stop) = (&next, &stop);
    let (to_caller, finished) = channel();
    // In place: this thread waits for the reports without taking a pool thread.
    rayon::in_place_scope(|scope| {
        for _ in 0..at_once.min(jobs.len()) {
            let to_caller = to_caller.clone();
            scope.spawn(move |_| {
                while let Some(&(i, slot)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let result = job(i, &slot.take());
                    stop.fetch_or(result.is_err(), Ordering::Relaxed);
                    if to_caller.send((i, result)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(to_caller);
        // Should `done` panic (a test's "kill"), the tasks start nothing new.
        let _stop = StopOnDrop(stop);
        super::workers::reports(finished, stop, done)
    })
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What [`full_precision_pass`] hands each decoder layer's targets, with their weightings, to.
pub(super) type OnLayer<'a> = dyn FnMut(&[(usize, &Weighting)]) -> Result<()> + 'a;

/// Runs the full-precision model over the calibration tokens `ids`, layer by layer, and hands
/// every decoder layer's targets (their plan items) with the damped weighting of each one's
/// input to `each` (the allocator's statistics). Memory as
/// [`run`]; nothing is written.
pub(super) fn full_precision_pass(
    spec: &InitSpec,
    plan: &Plan,
    source: &dyn TensorSource,
    ids: &[u32],
    device: &Device,
    each: &mut OnLayer<'_>,
) -> Result<()> {
    let setup = Setup::new(spec, plan, source, device)?;
    let (calib, config, rope) = (setup.calib, &setup.config, &setup.rope);
    let (seq, hidden) = (calib.seq, config.hidden_size);
    let mut x = embed(source, ids, hidden)?;
    for l in 0..config.num_hidden_layers {
        let (layer, targets) = setup.layer(source, l, device)?;
        x = if targets.is_empty() {
            advance(&layer, &mut x, [seq, hidden], rope)?;
            x
        } else {
            let (grams, y) =
                statistics(&layer, &x, [seq, hidden], rope, true).map_err(|e| in_layer(l, e))?;
            let weightings = grams
                .into_iter()
                .map(|g| g.into_weighting(calib.damping).map_err(|e| in_layer(l, e)))
                .collect::<Result<Vec<_>>>()?;
            let groups = layer.input_groups();
            let pairs: Vec<_> = (targets.iter())
                .map(|&(i, p)| (i, &weightings[groups[p]]))
                .collect();
            each(&pairs)?;
            y
        };
    }
    Ok(())
}

/// Drops the full-precision weights of the targeted linear layers `targets` of `layer` (a
/// 1×1 placeholder stands in until [`install`] puts the initialized weight there).
fn release(layer: &mut DecoderLayer, targets: &[(usize, usize)]) {
    let mut linears = layer.linears_mut();
    for &(_, p) in targets {
        let device = match &linears[p].base {
            BaseWeight::Dense(w) => w.device(),
            BaseWeight::Packed(_) => continue,
        };
        linears[p].base = BaseWeight::Dense(Tensor::zeros([1, 1], &device));
    }
}

/// Puts the initialized weight of a finished piece into linear layer `p` of `layer`.
fn install(
    layer: &mut DecoderLayer,
    p: usize,
    piece: &Path,
    name: &str,
    spec: &InitSpec,
    device: &Device,
) -> Result<()> {
    let ck = Checkpoint::open(piece)?;
    let packed = read_packed(&ck, name)?.ok_or_else(|| {
        ModelError::format(
            piece,
            format!("no packed `{name}` in the piece (damaged work area?)"),
        )
    })?;
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let upload =
        |t: crate::io::HostTensor| Tensor::<2>::from_data(TensorData::new(t.data, t.shape), device);
    let a = upload(ck.f32(&format!("{module}.lora_A.weight"))?);
    let b = upload(ck.f32(&format!("{module}.lora_B.weight"))?);
    let lin = layer
        .linears_mut()
        .into_iter()
        .nth(p)
        .expect("a linear layer of the family");
    lin.base = BaseWeight::Packed(
        PackedWeight::new(packed, device).map_err(|e| ModelError::quant(name, e))?,
    );
    lin.lora = Some(LoraAdapter::new(a, b, f64::from(spec.lora.scale()), 0.0));
    lin.adapter_enabled = true;
    Ok(())
}

/// The hidden states of the quantized stream and (with `drift`) of the full-precision one, and
/// the next layer, written after the last finished layer.
type State = (Vec<f32>, Option<Vec<f32>>, usize);

fn read_state(path: &Path, [seqs, seq, hidden]: [usize; 3], drift: bool) -> Result<Option<State>> {
    if !path.is_file() {
        return Ok(None);
    }
    let ck = Checkpoint::open(path)?;
    let next: usize = ck
        .metadata()
        .get(LAYER_KEY)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ModelError::format(path, "no layer index (damaged work area?)"))?;
    let read = |key: &str| ck.shaped(key, &[seqs * seq, hidden]).map(|t| t.data);
    let xf = drift.then(|| read(FP_STATE_KEY)).transpose()?;
    Ok(Some((read(STATE_KEY)?, xf, next)))
}

fn write_state(
    path: &Path,
    (x, xf): (&[f32], Option<&[f32]>),
    [seqs, seq, hidden]: [usize; 3],
    next: usize,
) -> Result<()> {
    let mut tensors = BTreeMap::new();
    let shape = vec![seqs * seq, hidden];
    tensors.insert(STATE_KEY.to_string(), OutTensor::f32(shape.clone(), x));
    if let Some(xf) = xf {
        tensors.insert(FP_STATE_KEY.to_string(), OutTensor::f32(shape, xf));
    }
    let meta = HashMap::from([(LAYER_KEY.to_string(), next.to_string())]);
    write_safetensors(path, &tensors, Some(meta))
}
