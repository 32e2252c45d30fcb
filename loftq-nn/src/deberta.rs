//! DeBERTa's disentangled attention: besides content-to-content scores, each query scores the
//! relative position of each key (c2p) and each key the relative position of each query
//! (p2c), the positions' embeddings projected by the layer's own query and key projections.

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use loftq_formats::config::RelativeAttention;

use super::{Norm, QLinear};

/// `encoder.rel_embeddings` `[2·span, hidden]` and its LayerNorm (`encoder.LayerNorm`).
#[derive(Module, Debug)]
pub struct RelativeEmbeddings {
    /// The table, one row per relative distance in `-span..span`.
    pub table: Tensor<2>,
    /// `encoder.LayerNorm`, with `norm_rel_ebd: layer_norm`.
    pub norm: Option<Norm>,
}

/// What every layer's attention needs for a sequence length: the normalized table and where
/// each (query, key) pair reads it.
#[derive(Clone, Debug)]
pub struct RelativeInputs {
    table: Tensor<3>,
    /// `[s, s]`: the table row of key `j`'s position seen from query `i` (c2p).
    c2p: Tensor<2, Int>,
    /// `[s, s]`: the same for p2c, indexed `[key, query]` before its transpose.
    p2c: Tensor<2, Int>,
    kinds: (bool, bool),
}

impl RelativeEmbeddings {
    /// The inputs of `disentangled_bias` for sequences of `s` tokens.
    pub fn inputs(&self, rel: &RelativeAttention, s: usize) -> RelativeInputs {
        let table = match &self.norm {
            Some(n) => n.forward(self.table.clone().unsqueeze::<3>()),
            None => self.table.clone().unsqueeze::<3>(),
        };
        let span = rel.span() as i64;
        let device = self.table.device();
        let index = |sign: i64| {
            let v: Vec<i64> = (0..s as i64)
                .flat_map(|i| (0..s as i64).map(move |j| (i, j)))
                .map(|(i, j)| (sign * relative_position(i - j, rel) + span).clamp(0, 2 * span - 1))
                .collect();
            Tensor::<2, Int>::from_data(TensorData::new(v, [s, s]), &device)
        };
        RelativeInputs {
            table,
            c2p: index(1),
            p2c: index(-1),
            kinds: (rel.c2p, rel.p2c),
        }
    }
}

/// The relative position `r = i − j` as DeBERTa reads it: itself within half the buckets,
/// else a log-spaced bucket up to `max_relative_positions` (transformers'
/// `make_log_bucket_position`, in `f32` as torch computes it).
pub fn relative_position(r: i64, rel: &RelativeAttention) -> i64 {
    let Some(buckets) = rel.buckets else {
        return r;
    };
    let mid = (buckets / 2) as i64;
    if r.abs() <= mid {
        return r;
    }
    let base = ((rel.max_relative_positions as f64 - 1.0) / mid as f64) as f32;
    let scaled = (r.abs() as f32 / mid as f32).ln() / base.ln() * (mid - 1) as f32;
    // Saturating: a degenerate config gives a clamped index, not a panic.
    (scaled.ceil() as i64 + mid) * r.signum()
}

/// The c2p and p2c scores `[b, heads, s, s]` of queries and keys `[b, heads, s, d]` (already
/// divided by DeBERTa's scale `√(d·(1 + #kinds))`), from the layer's query and key
/// projections applied to the relative embeddings (adapters included, as under PEFT).
pub fn disentangled_bias(
    q: &Tensor<4>,
    k: &Tensor<4>,
    query_proj: &QLinear,
    key_proj: &QLinear,
    rel: &RelativeInputs,
    scale: f64,
) -> Option<Tensor<4>> {
    let [b, heads, s, d] = q.dims();
    let rows = rel.table.dims()[1];
    let project = |lin: &QLinear| {
        lin.forward(rel.table.clone())
            .reshape([1, rows, heads, d])
            .swap_dims(1, 2)
            .expand([b, heads, rows, d])
    };
    let index = |i: &Tensor<2, Int>| i.clone().reshape([1, 1, s, s]).expand([b, heads, s, s]);
    let mut score: Option<Tensor<4>> = None;
    let mut add = |t: Tensor<4>| {
        let t = t.mul_scalar(1.0 / scale);
        score = Some(match score.take() {
            Some(x) => x + t,
            None => t,
        });
    };
    if rel.kinds.0 {
        let c2p = q.clone().matmul(project(key_proj).swap_dims(2, 3));
        add(c2p.gather(3, index(&rel.c2p)));
    }
    if rel.kinds.1 {
        let p2c = k.clone().matmul(project(query_proj).swap_dims(2, 3));
        add(p2c.gather(3, index(&rel.p2c)).swap_dims(2, 3));
    }
    score
}

/// DeBERTa's score scale `√(d·(1 + #kinds))`.
pub fn scale(d: usize, rel: Option<&RelativeAttention>) -> f64 {
    let kinds = rel.map_or(0, |r| usize::from(r.c2p) + usize::from(r.p2c));
    ((d * (1 + kinds)) as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_transformers_log_buckets() {
        // transformers' make_log_bucket_position on these distances, printed once: the tiny
        // fixture's (8 buckets, 32 positions) and deberta-v3-base's (256, 512).
        let rel = |buckets, max| RelativeAttention {
            buckets: Some(buckets),
            max_relative_positions: max,
            c2p: true,
            p2c: true,
            norm: true,
        };
        let got: Vec<i64> = (-20..=20)
            .map(|r| relative_position(r, &rel(8, 32)))
            .collect();
        let want = [
            -7, -7, -7, -7, -7, -6, -6, -6, -6, -6, -6, -6, -6, -5, -5, -5, -4, -3, -2, -1, 0, 1,
            2, 3, 4, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7,
        ];
        assert_eq!(got, want);
        let got: Vec<i64> = (-300..=300)
            .step_by(37)
            .map(|r| relative_position(r, &rel(256, 512)))
            .collect();
        let want = [
            -207, -195, -181, -164, -144, -115, -78, -41, -4, 33, 70, 107, 139, 160, 177, 192, 204,
        ];
        assert_eq!(got, want);
    }
}
