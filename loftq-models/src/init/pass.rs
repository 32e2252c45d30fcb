//! One decoder layer over the calibration hidden states: its forward (plain, or observing the
//! inputs of its linear layers), the statistics of those inputs, and GPTQ's true-sequential
//! order (`--calibration-inputs sequential`), where each group of linear layers is initialized
//! on the inputs it will see, through the groups before it already initialized.

use burn::tensor::{Device, Tensor, TensorData};
use loftq_core::calib::{Cross, Gram};
use loftq_core::quant::host_f32;

use crate::io::TensorSource;
use crate::nn::{BaseWeight, DecoderLayer, RopeTables};
use crate::{ModelError, Result};

/// Sequences pushed through a layer at once.
const SEQS_PER_PASS: usize = 4;

/// What [`sequential`] hands each group of linear layers to: the layer, the group, and the
/// statistics of its input when asked for.
pub(super) type InitGroup<'a> =
    dyn FnMut(&mut DecoderLayer, usize, Option<Gram>) -> Result<()> + 'a;

/// Down_proj's inputs on every calibration sequence are kept between its statistics and the
/// layer's output up to this size, and computed again above it (the 7B shapes' 16,384 tokens
/// take 721 MB, which a 3 GiB run cannot spare).
pub(super) const KEEP_ACTIVATIONS_BYTES: usize = 256 << 20;

/// Decoder layer `l` on the hidden states `x` in GPTQ's true-sequential order: the input of
/// each group of linear layers in turn (q/k/v, o, gate/up, down) is computed on every
/// sequence through the groups before it, already initialized, and its statistics (where
/// `needs` says) go to `init`, which puts the group's initialized weights in; down_proj's inputs
/// are kept up to `keep_bytes`. Returns the layer's outputs: one forward pass in all, where
/// observing the full-precision layer first would take two.
pub(super) fn sequential(
    layer: &mut DecoderLayer,
    x: Vec<f32>,
    [seq, hidden]: [usize; 2],
    rope: &RopeTables,
    (needs, l, keep_bytes): ([bool; 4], usize, usize),
    init: &mut InitGroup<'_>,
) -> Result<Vec<f32>> {
    let xs: Vec<Tensor<3>> = chunks(&x, [seq, hidden], rope).collect();
    // Memory: one copy of the hidden states at a time (the 7B shapes' 16,384 tokens: 268 MB).
    let len = x.len();
    drop(x);
    // The statistics of group `g`'s inputs, when needed.
    let stats = |g: usize, inputs: &mut dyn Iterator<Item = Tensor<3>>| -> Result<Option<Gram>> {
        if !needs[g] {
            return Ok(None);
        }
        let mut gram: Option<Gram> = None;
        for t in inputs {
            let sum = gram.get_or_insert_with(|| Gram::new(t.dims()[2]));
            sum.add_rows(&rows(t)).map_err(|e| in_layer(l, e))?;
        }
        Ok(gram)
    };
    let g0 = stats(0, &mut xs.iter().map(|x| layer.attention_input(x.clone())))?;
    init(layer, 0, g0)?;
    let atts: Vec<Tensor<3>> = (xs.iter())
        .map(|x| layer.attention_heads(layer.attention_input(x.clone()), rope))
        .collect();
    init(layer, 1, stats(1, &mut atts.iter().cloned())?)?;
    let hs: Vec<Tensor<3>> = (xs.iter().zip(atts))
        .map(|(x, att)| layer.after_attention(x.clone(), att))
        .collect();
    // In parallel (Phi) the MLP reads the attention's input, so `x` stays.
    let xs = if layer.post_attention_layernorm.is_none() {
        xs
    } else {
        Vec::new()
    };
    let mlp_input = |layer: &DecoderLayer, i: usize| {
        let xn = xs.get(i).map(|x| layer.attention_input(x.clone()));
        match xn {
            Some(xn) => layer.mlp_input(hs[i].clone(), xn),
            None => layer.mlp_input(hs[i].clone(), hs[i].clone()),
        }
    };
    init(
        layer,
        2,
        stats(2, &mut (0..hs.len()).map(|i| mlp_input(layer, i)))?,
    )?;
    let activation = |layer: &DecoderLayer, i: usize| layer.mlp.activation(mlp_input(layer, i));
    // Down_proj's inputs for every sequence, or for none.
    let keep = len / hidden * layer.mlp.down_proj.shape()[1] * 4 <= keep_bytes;
    let mut acts = Vec::new();
    let mut all = (0..hs.len()).map(|i| {
        let act = activation(layer, i);
        if keep {
            acts.push(act.clone());
        }
        act
    });
    let gram = stats(3, &mut all)?;
    init(layer, 3, gram)?;
    let mut kept = acts.into_iter();
    let mut out = Vec::with_capacity(len);
    for (i, h) in hs.iter().enumerate() {
        let act = kept.next().unwrap_or_else(|| activation(layer, i));
        out.extend(finite_states(rows(layer.after_mlp(h.clone(), act)))?);
    }
    Ok(out)
}

/// The hidden states `x` (`[sequences·seq, hidden]` row-major) as tensors of a few sequences.
fn chunks<'x>(
    x: &'x [f32],
    [seq, hidden]: [usize; 2],
    rope: &RopeTables,
) -> impl Iterator<Item = Tensor<3>> + 'x {
    let device = rope.cos.device();
    (x.chunks(SEQS_PER_PASS * seq * hidden)).map(move |c| tensor_of(c, [seq, hidden], &device))
}

/// Whole sequences of hidden states (`[sequences·seq, hidden]` row-major) as a tensor.
fn tensor_of(c: &[f32], [seq, hidden]: [usize; 2], device: &Device) -> Tensor<3> {
    let b = c.len() / (seq * hidden);
    Tensor::from_data(TensorData::new(c.to_vec(), [b, seq, hidden]), device)
}

/// The rows of `t` `[batch, seq, width]` on the host, row-major `[batch·seq, width]`.
fn rows(t: Tensor<3>) -> Vec<f32> {
    let [b, s, w] = t.dims();
    host_f32(&t.reshape([b * s, w]))
}

/// `v`, unless the calibration hidden states became NaN or infinite.
fn finite_states(v: Vec<f32>) -> Result<Vec<f32>> {
    if v.iter().any(|v| !v.is_finite()) {
        return Err(ModelError::Data(
            "the calibration hidden states became NaN or infinite".into(),
        ));
    }
    Ok(v)
}

/// The input statistics of the four input groups of `layer` on the hidden states `x`, and,
/// with `output`, the layer's outputs (else nothing).
pub(super) fn statistics(
    layer: &DecoderLayer,
    x: &[f32],
    shape: [usize; 2],
    rope: &RopeTables,
    output: bool,
) -> std::result::Result<([Gram; 4], Vec<f32>), CalibFailure> {
    let mut grams: [Gram; 4] = group_widths(layer).map(Gram::new);
    let mut failed = None;
    let mut observe = |g: usize, t: Tensor<2>| {
        if let Err(e) = grams[g].add_rows(&host_f32(&t)) {
            failed.get_or_insert(e);
        }
    };
    let pass = match output {
        true => Pass::Observed(&mut observe),
        false => Pass::ObserveOnly(&mut observe),
    };
    let y = forward(layer, x, shape, rope, pass).map_err(CalibFailure::Model)?;
    match failed {
        Some(e) => Err(CalibFailure::Statistics(e)),
        None => Ok((grams, y)),
    }
}

/// What [`paired_statistics`] returns: each group's statistics and pairings, and the
/// full-precision stream's next hidden states.
pub(super) type Paired = ([Gram; 4], [Cross; 4], Vec<f32>);

/// Sequences of both streams pushed through a layer at once by [`paired_statistics`]: half
/// of [`SEQS_PER_PASS`], as it holds the quantized stream's inputs of all four groups while
/// the full-precision one runs (the 7B shapes' 4 sequences of 512: 190 MB, and 134 MB per copy
/// of the attention's scores).
const PAIRED_SEQS_PER_PASS: usize = SEQS_PER_PASS / 2;

/// The statistics of `layer`'s four input groups on the quantized model's hidden states `x`,
/// their pairing with the full-precision model's on its hidden states `f` (the same tokens),
/// and the layer's outputs on `f` (the full-precision stream's next hidden states), written
/// over `f` as it goes.
pub(super) fn paired_statistics(
    layer: &DecoderLayer,
    x: &[f32],
    mut f: Vec<f32>,
    [seq, hidden]: [usize; 2],
    rope: &RopeTables,
) -> std::result::Result<Paired, CalibFailure> {
    let widths = group_widths(layer);
    let mut grams: [Gram; 4] = widths.map(Gram::new);
    let (mut crosses, weights) = pairings(layer, widths);
    let device = rope.cos.device();
    let step = PAIRED_SEQS_PER_PASS * seq * hidden;
    for (cx, cf) in x.chunks(step).zip(f.chunks_mut(step)) {
        let tx = tensor_of(cx, [seq, hidden], &device);
        let tf = tensor_of(cf, [seq, hidden], &device);
        let mut seen: [Vec<f32>; 4] = Default::default();
        layer.observe_inputs(tx, rope, &mut |g, t| seen[g] = host_f32(&t));
        let mut failed = None;
        let y = layer.forward_observed(tf, rope, &mut |g, t| {
            let q = std::mem::take(&mut seen[g]);
            let paired = match &weights[g] {
                Some(w) => host_f32(&t.matmul(w.clone().transpose())),
                None => host_f32(&t),
            };
            let added = (grams[g].add_rows(&q)).and_then(|()| crosses[g].add_rows(&q, &paired));
            if let Err(e) = added {
                failed.get_or_insert(e);
            }
        });
        if let Some(e) = failed {
            return Err(CalibFailure::Statistics(e));
        }
        cf.copy_from_slice(&finite_states(rows(y)).map_err(CalibFailure::Model)?);
    }
    Ok((grams, crosses, f))
}

/// Each group's empty pairing, and the full-precision weight whose outputs it sums: a group
/// of one dense weight with fewer outputs than inputs (down_proj) sums them, the smaller and
/// cheaper form (see [`Cross`]).
fn pairings(layer: &DecoderLayer, widths: [usize; 4]) -> ([Cross; 4], [Option<Tensor<2>>; 4]) {
    let (linears, groups) = (layer.linears(), layer.input_groups());
    let mut weights: [Option<Tensor<2>>; 4] = Default::default();
    let crosses = std::array::from_fn(|g| {
        let mut members = (linears.iter().zip(groups)).filter(|&(_, &x)| x == g);
        let only = match (members.next(), members.next()) {
            (Some((lin, _)), None) => Some(&lin.base),
            _ => None,
        };
        match only {
            Some(BaseWeight::Dense(w)) if w.dims()[0] < widths[g] => {
                weights[g] = Some(w.clone());
                Cross::of_outputs(w.dims()[0], widths[g])
            }
            _ => Cross::new(widths[g]),
        }
    });
    (crosses, weights)
}

/// The input width of each of `layer`'s four groups (that of its first linear layer).
fn group_widths(layer: &DecoderLayer) -> [usize; 4] {
    let (linears, groups) = (layer.linears(), layer.input_groups());
    std::array::from_fn(|g| {
        let p = (groups.iter())
            .position(|&x| x == g)
            .expect("every group is read");
        linears[p].shape()[1]
    })
}

/// What can fail while a layer's statistics are gathered and factored.
pub(super) enum CalibFailure {
    Model(ModelError),
    Statistics(loftq_core::calib::CalibError),
}

impl From<loftq_core::calib::CalibError> for CalibFailure {
    fn from(e: loftq_core::calib::CalibError) -> Self {
        CalibFailure::Statistics(e)
    }
}

/// The error of decoder layer `l`'s statistics.
pub(super) fn in_layer(l: usize, e: impl Into<CalibFailure>) -> ModelError {
    match e.into() {
        CalibFailure::Model(e) => e,
        CalibFailure::Statistics(e) => ModelError::Data(format!("decoder layer {l}: {e}")),
    }
}

/// The hidden states `x` (`[sequences·seq, hidden]` row-major) moved through `layer`, a few
/// sequences at a time, each chunk's outputs written over its inputs (one copy of the hidden
/// states: the 7B shapes' 16,384 tokens take 268 MB).
pub(super) fn advance(
    layer: &DecoderLayer,
    x: &mut [f32],
    [seq, hidden]: [usize; 2],
    rope: &RopeTables,
) -> Result<()> {
    let device = rope.cos.device();
    for c in x.chunks_mut(SEQS_PER_PASS * seq * hidden) {
        let y = layer.forward(tensor_of(c, [seq, hidden], &device), rope);
        c.copy_from_slice(&finite_states(rows(y))?);
    }
    Ok(())
}

/// What [`forward`] does with a decoder layer.
pub(super) enum Pass<'f> {
    /// Its outputs, observing the inputs of its linear layers.
    Observed(&'f mut dyn FnMut(usize, Tensor<2>)),
    /// The inputs of its linear layers alone.
    ObserveOnly(&'f mut dyn FnMut(usize, Tensor<2>)),
}

/// `layer` applied to the hidden states `x` (`[sequences·seq, hidden]` row-major), a few
/// sequences at a time, as `pass` says; its outputs (none when the pass only observes).
pub(super) fn forward(
    layer: &DecoderLayer,
    x: &[f32],
    [seq, hidden]: [usize; 2],
    rope: &RopeTables,
    mut pass: Pass<'_>,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(match pass {
        Pass::ObserveOnly(_) => 0,
        _ => x.len(),
    });
    for t in chunks(x, [seq, hidden], rope) {
        let y = match &mut pass {
            Pass::Observed(f) => layer.forward_observed(t, rope, &mut **f),
            Pass::ObserveOnly(f) => {
                layer.observe_inputs(t, rope, &mut **f);
                continue;
            }
        };
        out.extend(finite_states(rows(y))?);
    }
    Ok(out)
}

/// The embeddings of `ids`, row-major `[tokens, hidden]`.
pub(super) fn embed(source: &dyn TensorSource, ids: &[u32], hidden: usize) -> Result<Vec<f32>> {
    let name = "model.embed_tokens.weight";
    let shape = source.shape(name)?;
    let table = source.shaped(name, &[shape.first().copied().unwrap_or(0), hidden])?;
    source.release(name);
    let vocab = table.shape[0];
    let mut x = Vec::with_capacity(ids.len() * hidden);
    for &t in ids {
        let t = t as usize;
        if t >= vocab {
            return Err(ModelError::Data(format!(
                "token id {t} is outside the embedding table ({vocab} rows)"
            )));
        }
        x.extend_from_slice(&table.data[t * hidden..(t + 1) * hidden]);
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::LlamaConfig;
    use crate::io::Checkpoint;
    use crate::nn::{LoadOptions, load_layer};
    use burn::tensor::Device;

    /// Layer 0 of the tiny Llama fixture, `sequences` sequences of 6 deterministic hidden
    /// states, the rope tables and the `[seq, hidden]` shape.
    fn tiny_layer(sequences: usize) -> (DecoderLayer, Vec<f32>, RopeTables, [usize; 2]) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let config = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
        let ck = Checkpoint::open(&dir.join("model.safetensors")).unwrap();
        let device = Device::default();
        let layer = load_layer(&config, &ck, 0, &device, &LoadOptions::default()).unwrap();
        let (seq, hidden) = (6, config.hidden_size);
        let x: Vec<f32> = (0..sequences * seq * hidden)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let rope = RopeTables::new(&config.rope, config.rotary_dim(), seq, &device);
        (layer, x, rope, [seq, hidden])
    }

    /// With no weight changed, the group-by-group pass is the layer's forward, whether it
    /// keeps down_proj's inputs or computes them again, and it hands each group its inputs.
    #[test]
    fn sequential_pass_is_the_forward_kept_or_recomputed() {
        // 9 sequences: three chunks, the last one short.
        let (mut layer, x, rope, [seq, hidden]) = tiny_layer(9);
        let mut plain = x.clone();
        advance(&layer, &mut plain, [seq, hidden], &rope).unwrap();
        for keep in [usize::MAX, 0] {
            let mut rows = Vec::new();
            let mut init = |_: &mut DecoderLayer, g: usize, gram: Option<Gram>| {
                rows.push((g, gram.map(|g| g.rows())));
                Ok(())
            };
            let shape = [seq, hidden];
            let y = sequential(
                &mut layer,
                x.clone(),
                shape,
                &rope,
                ([true; 4], 0, keep),
                &mut init,
            )
            .unwrap();
            assert_eq!(y, plain, "keep {keep}");
            let n = Some(9 * seq as u64);
            assert_eq!(rows, [(0, n), (1, n), (2, n), (3, n)]);
        }
    }

    /// On the same hidden states, the paired pass gives the plain pass's statistics, pairings
    /// equal to them (down_proj's, of outputs: `H·Wᵀ`), and the layer's outputs; on others,
    /// pairings that differ.
    #[test]
    fn paired_statistics_on_equal_streams_are_the_plain_ones() {
        let (layer, x, rope, shape) = tiny_layer(5);
        let Ok((grams, y)) = statistics(&layer, &x, shape, &rope, true) else {
            panic!("statistics failed")
        };
        let paired = |f: &[f32]| match paired_statistics(&layer, &x, f.to_vec(), shape, &rope) {
            Ok(r) => r,
            Err(_) => panic!("paired statistics failed"),
        };
        // The two passes cut the sequences into different chunks: equal up to rounding.
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * (1.0 + b.abs());
        let (paired_grams, crosses, yf) = paired(&x);
        assert!(yf.iter().zip(&y).all(|(&a, &b)| close(a, b)));
        let down = match &layer.mlp.down_proj.base {
            BaseWeight::Dense(w) => (host_f32(w), w.dims()[0]),
            BaseWeight::Packed(_) => panic!("a dense layer"),
        };
        assert_eq!(
            crosses.iter().map(Cross::outputs).collect::<Vec<_>>()[..3],
            [None; 3]
        );
        assert_eq!(crosses[3].outputs(), Some(down.1));
        for (g, (p, c)) in grams.iter().zip(paired_grams.iter().zip(&crosses)) {
            assert_eq!(c.rows(), g.rows());
            let w = c.dim();
            let h = |i: usize, j: usize| g.value(i.max(j), i.min(j));
            for (i, j) in [(0, 0), (w - 1, 0), (w / 2, w / 3)] {
                assert!(close(p.value(i, j), g.value(i, j)), "{i},{j}");
                match c.outputs() {
                    // The pairing of equal inputs is the Gram matrix (both triangles).
                    None => {
                        assert!(close(c.value(i, j), h(i, j)), "{i},{j}");
                        assert!(close(c.value(j, i), h(i, j)), "{j},{i}");
                    }
                    // Its outputs' pairing is H·Wᵀ.
                    Some(out) => {
                        let j = j % out;
                        let hw: f32 = (0..w).map(|k| h(i, k) * down.0[j * w + k]).sum();
                        assert!(
                            close(c.value(i, j), hw),
                            "{i},{j}: {} vs {hw}",
                            c.value(i, j)
                        );
                    }
                }
            }
        }
        let f: Vec<f32> = x.iter().map(|v| v * 0.5 + 0.1).collect();
        let (_, crosses, _) = paired(&f);
        assert_ne!(crosses[0].value(0, 0), grams[0].value(0, 0));
    }
}
