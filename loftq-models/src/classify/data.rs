//! Labelled text for sequence classification: a TSV file of `label<TAB>text` lines, tokenized
//! as the encoder reads a sentence (`[CLS] text [SEP]`), and padded batches of it.

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::{ModelError, Result, Tokenizer};

/// One tokenized example.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// Token ids with the tokenizer's special tokens, at most the set's `max_len`.
    pub ids: Vec<u32>,
    /// Index into the set's labels.
    pub label: usize,
}

/// A labelled set: its examples and the names of its labels (sorted; the index of a name is
/// the classifier's output).
#[derive(Clone, Debug, PartialEq)]
pub struct Labelled {
    /// The examples, in file order.
    pub examples: Vec<Example>,
    /// The label names.
    pub labels: Vec<String>,
}

impl Labelled {
    /// Reads `path` (`label<TAB>text` per line; empty lines skipped), each text tokenized
    /// with the special tokens and cut to `max_len` tokens (the last one kept: `[SEP]`). The
    /// labels are `labels` when given (a held-out set takes the training set's), else the
    /// file's own, sorted.
    ///
    /// # Errors
    /// [`ModelError::Io`] if the file cannot be read; [`ModelError::Data`] naming the line for
    /// a line without a tab, an empty text or label, a label not in `labels`, or no example.
    pub fn read(
        path: &Path,
        tokenizer: &Tokenizer,
        max_len: usize,
        labels: Option<&[String]>,
    ) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let bad = |n: usize, msg: &str| {
            ModelError::Data(format!("{}, line {}: {msg}", path.display(), n + 1))
        };
        let mut rows = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let Some((label, body)) = line.split_once('\t') else {
                return Err(bad(n, "no tab between the label and the text"));
            };
            let (label, body) = (label.trim(), body.trim());
            if label.is_empty() || body.is_empty() {
                return Err(bad(n, "an empty label or text"));
            }
            rows.push((n, label.to_string(), body.to_string()));
        }
        if rows.is_empty() {
            return Err(ModelError::Data(format!("{}: no example", path.display())));
        }
        let labels: Vec<String> = match labels {
            Some(l) => l.to_vec(),
            None => {
                let mut l: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
                l.sort();
                l.dedup();
                l
            }
        };
        let mut examples = Vec::with_capacity(rows.len());
        for (n, label, body) in rows {
            let Some(label) = labels.iter().position(|l| *l == label) else {
                return Err(bad(n, &format!("label `{label}` is not one of {labels:?}")));
            };
            let mut ids = tokenizer.encode_with_special(&body)?;
            if ids.len() > max_len {
                let last = *ids.last().expect("ids");
                ids.truncate(max_len);
                ids[max_len - 1] = last;
            }
            examples.push(Example { ids, label });
        }
        Ok(Self { examples, labels })
    }
}

/// A padded batch: `ids`, `types` (all 0) and `mask` `[batch, len]` (1: a token), the labels
/// `[batch]`.
#[derive(Clone, Debug)]
pub struct ClassBatch {
    /// Token ids, padded with `pad`.
    pub ids: Tensor<2, Int>,
    /// Segment types.
    pub types: Tensor<2, Int>,
    /// HF's attention mask.
    pub mask: Tensor<2, Int>,
    /// Label indices.
    pub labels: Vec<usize>,
}

impl ClassBatch {
    /// `examples` padded with `pad` to the longest.
    ///
    /// # Panics
    /// If `examples` is empty.
    pub fn new(examples: &[&Example], pad: u32, device: &Device) -> Self {
        let len = examples
            .iter()
            .map(|e| e.ids.len())
            .max()
            .expect("examples");
        let b = examples.len();
        let (mut ids, mut mask) = (vec![pad as i32; b * len], vec![0i32; b * len]);
        for (r, e) in examples.iter().enumerate() {
            for (c, &t) in e.ids.iter().enumerate() {
                ids[r * len + c] = t as i32;
                mask[r * len + c] = 1;
            }
        }
        let int = |v: Vec<i32>| Tensor::from_data(TensorData::new(v, [b, len]), device);
        Self {
            ids: int(ids),
            types: int(vec![0; b * len]),
            mask: int(mask),
            labels: examples.iter().map(|e| e.label).collect(),
        }
    }
}
