//! Training text: tokenized files joined into one stream, and the batches drawn from it.

use std::path::{Path, PathBuf};

use loftq_core::lowrank::Gaussian;
use serde::{Deserialize, Serialize};

use crate::{ModelError, Result, Tokenizer};

/// Token windows: `batch` rows of `seq` ids. Each position predicts the next one in its row,
/// so a row gives `seq - 1` predictions (as transformers' causal-LM loss with
/// `labels = input_ids`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Row-major `[batch, seq]`.
    pub ids: Vec<u32>,
    /// Rows.
    pub batch: usize,
    /// Tokens per row (at least 2).
    pub seq: usize,
}

/// A token stream: each file's tokens followed by the end-of-sequence id, if any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenStream {
    /// The tokens.
    pub tokens: Vec<u32>,
    /// Files read.
    pub files: Vec<PathBuf>,
}

impl TokenStream {
    /// Tokenizes `files` (UTF-8 text) in order, appending `eos` after each one.
    ///
    /// # Errors
    /// [`ModelError::Io`] naming an unreadable file, [`ModelError::Format`] for one that is not
    /// UTF-8 or holds no tokens.
    pub fn from_files(tok: &Tokenizer, files: &[PathBuf], eos: Option<u32>) -> Result<Self> {
        let mut tokens = Vec::new();
        for f in files {
            let ids = tokenize_file(tok, f)?;
            tokens.extend(ids);
            tokens.extend(eos);
        }
        Ok(Self {
            tokens,
            files: files.to_vec(),
        })
    }

    /// Splits off the last `fraction` of the tokens (for validation).
    pub fn split_tail(mut self, fraction: f64) -> (Self, Self) {
        let n = self.tokens.len();
        let keep = n - ((n as f64 * fraction.clamp(0.0, 1.0)) as usize).min(n);
        let tail = self.tokens.split_off(keep);
        let files = self.files.clone();
        (
            self,
            Self {
                tokens: tail,
                files,
            },
        )
    }
}

/// The tokens of one text file (no special tokens).
///
/// # Errors
/// As [`TokenStream::from_files`].
pub fn tokenize_file(tok: &Tokenizer, path: &Path) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|_| ModelError::format(path, "not UTF-8 text"))?;
    let ids = tok.encode(&text)?;
    if ids.is_empty() {
        return Err(ModelError::format(path, "holds no tokens"));
    }
    Ok(ids)
}

/// How training rows are cut from the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Sampling {
    /// Each row starts at a uniformly random position (windows may overlap).
    Random,
    /// The stream cut into consecutive `seq`-token rows, visited in a random order that is
    /// drawn afresh each epoch.
    Packed,
}

/// Draws the rows of micro-batch `micro` of step `step`. The rows depend only on the stream,
/// the arguments and `seed`, so a resumed run sees the same batches.
///
/// # Panics
/// If the stream is shorter than `seq` tokens.
pub fn draw_batch(
    stream: &[u32],
    sampling: Sampling,
    rows: usize,
    seq: usize,
    seed: u64,
    (step, micro, micros): (usize, usize, usize),
) -> Batch {
    assert!(stream.len() >= seq, "the stream is shorter than one row");
    let mut ids = Vec::with_capacity(rows * seq);
    match sampling {
        Sampling::Random => {
            let mut g = Gaussian::new(mix(seed, &[step as u64, micro as u64]));
            let starts = stream.len() - seq + 1;
            for _ in 0..rows {
                let at = ((g.uniform() * starts as f64) as usize).min(starts - 1);
                ids.extend_from_slice(&stream[at..at + seq]);
            }
        }
        Sampling::Packed => {
            let chunks = stream.len() / seq;
            let first = (step * micros + micro) * rows;
            let mut order: Option<(usize, Vec<usize>)> = None;
            for k in first..first + rows {
                let epoch = k / chunks;
                if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    order = Some((epoch, permutation(chunks, mix(seed, &[epoch as u64]))));
                }
                let (_, perm) = order.as_ref().expect("set");
                let at = perm[k % chunks] * seq;
                ids.extend_from_slice(&stream[at..at + seq]);
            }
        }
    }
    Batch {
        ids,
        batch: rows,
        seq,
    }
}

/// A seed for a position in the run, from the run's seed.
pub(crate) fn mix(seed: u64, parts: &[u64]) -> u64 {
    parts.iter().fold(seed ^ 0x5851_F42D_4C95_7F2D, |h, &p| {
        (h ^ p.wrapping_add(0x9E37_79B9_7F4A_7C15))
            .rotate_left(27)
            .wrapping_mul(0x94D0_49BB_1331_11EB)
    })
}

/// Fisher–Yates shuffle of `0..n`.
pub(crate) fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut g = Gaussian::new(seed);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = ((g.uniform() * (i + 1) as f64) as usize).min(i);
        v.swap(i, j);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_rows_are_windows_of_the_stream_and_repeatable() {
        let stream: Vec<u32> = (0..1000).collect();
        let b = draw_batch(&stream, Sampling::Random, 4, 16, 7, (3, 0, 1));
        assert_eq!(b.ids.len(), 64);
        for row in b.ids.chunks(16) {
            assert!(row.windows(2).all(|w| w[1] == w[0] + 1), "{row:?}");
        }
        assert_eq!(
            b,
            draw_batch(&stream, Sampling::Random, 4, 16, 7, (3, 0, 1))
        );
        assert_ne!(
            b,
            draw_batch(&stream, Sampling::Random, 4, 16, 7, (4, 0, 1))
        );
        assert_ne!(
            b,
            draw_batch(&stream, Sampling::Random, 4, 16, 8, (3, 0, 1))
        );
    }

    #[test]
    fn packed_rows_visit_every_chunk_once_per_epoch() {
        let stream: Vec<u32> = (0..100).collect();
        // 10 chunks of 10; 5 steps of 2 rows = one epoch.
        let mut starts: Vec<u32> = (0..5)
            .flat_map(|s| draw_batch(&stream, Sampling::Packed, 2, 10, 1, (s, 0, 1)).ids)
            .step_by(10)
            .collect();
        starts.sort_unstable();
        assert_eq!(starts, (0..10).map(|i| i * 10).collect::<Vec<u32>>());
    }

    #[test]
    fn tail_split() {
        let s = TokenStream {
            tokens: (0..100).collect(),
            files: vec![],
        };
        let (a, b) = s.split_tail(0.1);
        assert_eq!(a.tokens.len(), 90);
        assert_eq!(b.tokens, (90..100).collect::<Vec<u32>>());
    }
}
