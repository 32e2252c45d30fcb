//! LoftQ on a GPU, several targets of one shape at a time: the plan's targets are grouped,
//! and a worker computes a group as one device problem ([`loftq_batch`]) and writes one
//! piece per tensor. A whole model is hundreds of small matrices; one at a time, a GPU waits
//! on the host at every step.

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use loftq_core::init::LoraInit;
use loftq_core::quant::{host_f32, is_host_device};
use loftq_core::{LoftqError, LoftqResult, loftq_batch};

use super::piece::{self, Loaded, Plan, Start, write_start};
use super::{InitMethod, InitSpec, TensorReport};
use crate::nn::tensor_seed;
use crate::{ModelError, Result};

/// The most values a group holds, all its matrices together: 64 MB of `f32` per copy (the
/// alternation keeps about eight copies on the device). A larger matrix is a group alone.
const GROUP_VALUES: usize = 1 << 24;

/// `tensors` in the groups to compute together. When LoftQ runs on a device whose
/// memory is not the host's: targets of one shape and quantizer, in plan order, up to
/// `spec.device_batch` of them and [`GROUP_VALUES`] values. Otherwise one tensor per group.
pub(super) fn groups(
    spec: &InitSpec,
    plan: &Plan,
    tensors: &[usize],
    devices: &[Device],
) -> Vec<Vec<usize>> {
    let batching = spec.method == InitMethod::Loftq
        && spec.device_batch > 1
        && devices.iter().any(|d| !is_host_device(d));
    if !batching {
        return tensors.iter().map(|&i| vec![i]).collect();
    }
    by_shape(plan, tensors, spec.device_batch, GROUP_VALUES)
}

/// The targets of `tensors` in groups of one shape and quantizer, in plan order, each of at most
/// `count` tensors and `values` values (or one tensor); other tensors alone.
fn by_shape(plan: &Plan, tensors: &[usize], count: usize, values: usize) -> Vec<Vec<usize>> {
    let mut closed = Vec::new();
    let mut open: Vec<(_, Vec<usize>)> = Vec::new();
    for &i in tensors {
        let Some(key @ ([rows, cols], _)) = plan.items[i].target else {
            closed.push(vec![i]);
            continue;
        };
        let at = match open.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                open.push((key, Vec::new()));
                open.len() - 1
            }
        };
        let group = &mut open[at].1;
        group.push(i);
        if group.len() >= count || (group.len() + 1) * rows * cols > values {
            closed.push(open.remove(at).1);
        }
    }
    closed.extend(open.into_iter().map(|(_, group)| group));
    closed
}

/// A group computed by [`compute`]: its tensors' results, or the starts still to write
/// ([`write`]), each with its target's index, and the seconds per target.
pub(super) enum Computed {
    /// Written tensor by tensor.
    Written(Vec<(usize, Result<Option<TensorReport>>)>),
    /// LoftQ's starts, to write.
    Starts(Vec<(usize, Result<Start>)>, f64),
}

/// Computes a group read by [`piece::load`], for the tensors not `done`, in the group's order.
/// LoftQ targets run as one [`loftq_batch`] (on a GPU a single one too: its path reads less)
/// and come back to write, so that writing them can overlap the next group's work; other
/// methods, or a group with a tensor that could not be read, run and are written tensor by
/// tensor.
pub(super) fn compute(
    spec: &InitSpec,
    plan: &Plan,
    group: Vec<(usize, Result<Loaded>)>,
    done: &HashSet<usize>,
    work: &Path,
    device: &Device,
) -> Computed {
    let weights = spec.method == InitMethod::Loftq
        && group
            .iter()
            .all(|(_, l)| matches!(l, Ok(Loaded::Weight(_))));
    if !weights {
        return Computed::Written(
            group
                .into_iter()
                .filter(|(i, _)| !done.contains(i))
                .map(|(i, loaded)| {
                    let item = &plan.items[i];
                    let r =
                        loaded.and_then(|l| piece::compute(spec, item, l, i, work, device, None));
                    (i, r)
                })
                .collect(),
        );
    }
    let t0 = Instant::now();
    loftq_core::profile::start(device);
    let (mut ws, mut cfgs, mut order) = (Vec::new(), Vec::new(), Vec::new());
    for (i, loaded) in group {
        let (Ok(Loaded::Weight(host)), Some((shape, quant))) = (loaded, plan.items[i].target)
        else {
            unreachable!("checked above: targeted weights")
        };
        let LoraInit::Loftq(cfg) =
            spec.method_for(quant, tensor_seed(spec.seed, &plan.items[i].name))
        else {
            unreachable!("checked above: LoftQ")
        };
        ws.push(Tensor::from_data(TensorData::new(host.data, shape), device));
        cfgs.push(cfg);
        order.push(i);
    }
    loftq_core::profile::mark(device, "init: upload");
    let mut results = loftq_batch(&ws, &cfgs);
    drop(ws);
    if !is_host_device(device) {
        factors_to_host(&mut results);
    }
    let seconds = t0.elapsed().as_secs_f64() / order.len() as f64;
    let starts = order
        .into_iter()
        .zip(results)
        .filter(|(i, _)| !done.contains(i))
        .map(|(i, r)| {
            let name = plan.items[i].name.clone();
            (
                i,
                r.map(Start::from)
                    .map_err(|source| ModelError::Loftq { name, source }),
            )
        })
        .collect();
    loftq_core::profile::mark(device, "init: results");
    Computed::Starts(starts, seconds)
}

/// Writes the pieces of `starts` (from [`compute`]); one result per tensor, in their order.
/// Host work only: on a device the factors were read with the codes.
pub(super) fn write(
    plan: &Plan,
    work: &Path,
    starts: Vec<(usize, Result<Start>)>,
    seconds: f64,
) -> Vec<(usize, Result<Option<TensorReport>>)> {
    let host = Device::flex();
    loftq_core::profile::start(&host);
    let written = (starts.into_iter())
        .map(|(i, start)| {
            let item = &plan.items[i];
            let written = start.and_then(|s| write_start(item, i, work, s, None, seconds));
            (i, written.map(Some))
        })
        .collect();
    loftq_core::profile::mark(&host, "init: write");
    written
}

/// The LoRA factors of every result held on the host, so that writing the pieces does not read
/// two small tensors per target (420 reads, each a wait for the device, in a whole-model init
/// of SmolLM2): the values the batched path read with the codes, and those of any other result
/// (one matrix at a time, after a fallback) read at once.
fn factors_to_host(results: &mut [std::result::Result<LoftqResult, LoftqError>]) {
    let host = Device::flex();
    let on_host =
        |v: Vec<f32>, like: &Tensor<2>| Tensor::from_data(TensorData::new(v, like.dims()), &host);
    for r in results.iter_mut().flatten() {
        if let Some(f) = r.host_factors.take() {
            r.lora_a = on_host(f.lora_a, &r.lora_a);
            r.lora_b = on_host(f.lora_b, &r.lora_b);
        }
    }
    let on_device = |r: &&mut LoftqResult| !is_host_device(&r.lora_a.device());
    let mut rest: Vec<&mut LoftqResult> = results.iter_mut().flatten().filter(on_device).collect();
    let flat = |t: &Tensor<2>| t.clone().reshape([t.dims()[0] * t.dims()[1]]);
    let parts: Vec<Tensor<1>> = (rest.iter())
        .flat_map(|r| [flat(&r.lora_a), flat(&r.lora_b)])
        .collect();
    if parts.is_empty() {
        return;
    }
    let mut values = host_f32(&loftq_core::fused::cat(parts)).into_iter();
    let mut take = |like: &Tensor<2>| {
        on_host(
            values.by_ref().take(like.dims().iter().product()).collect(),
            like,
        )
    };
    for r in rest.iter_mut() {
        r.lora_a = take(&r.lora_a);
        r.lora_b = take(&r.lora_b);
    }
}

#[cfg(test)]
mod tests {
    use loftq_core::QuantConfig;

    use super::*;
    use crate::init::piece::PlanItem;

    #[test]
    fn targets_group_by_shape_and_quantizer() {
        let item = |shape: Option<[usize; 2]>, bits| PlanItem {
            name: String::new(),
            target: shape.map(|s| (s, QuantConfig::nf(bits))),
        };
        let plan = Plan {
            items: vec![
                item(Some([8, 8]), 2),   // 0
                item(Some([4, 8]), 2),   // 1
                item(None, 2),           // 2: passed through
                item(Some([8, 8]), 2),   // 3
                item(Some([8, 8]), 4),   // 4: another quantizer
                item(Some([8, 8]), 2),   // 5
                item(Some([4, 8]), 2),   // 6
                item(Some([64, 64]), 2), // 7: too large to share
                item(Some([64, 64]), 2), // 8
            ],
        };
        let todo: Vec<usize> = (0..9).collect();
        assert_eq!(
            by_shape(&plan, &todo, 2, 1000),
            vec![
                vec![2],
                vec![0, 3],
                vec![1, 6],
                vec![7],
                vec![8],
                vec![4],
                vec![5]
            ]
        );
        assert_eq!(
            by_shape(&plan, &todo, 8, 1000),
            vec![
                vec![2],
                vec![7],
                vec![8],
                vec![0, 3, 5],
                vec![1, 6],
                vec![4]
            ]
        );
        assert_eq!(by_shape(&plan, &[3, 5], 1, 1000), vec![vec![3], vec![5]]);
    }
}
