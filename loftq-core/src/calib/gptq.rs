//! GPTQ (Frantar et al., 2022) over this crate's quantizers: columns quantized in order, each
//! column's error spread over the columns not yet quantized.

use faer::{Accum, MatMut, MatRef, Par};

use crate::QuantError;
use crate::quant::{HostQuantized, Quantizer};

/// Settings of [`gptq`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GptqConfig {
    /// Columns per lazy batch: updates inside a batch are applied at once, the rest of the
    /// matrix is updated by one product per batch (GPTQ's 128).
    pub block_cols: usize,
}

impl GptqConfig {
    /// GPTQ's lazy batches of 128 columns.
    pub const DEFAULT: Self = Self { block_cols: 128 };
}

impl Default for GptqConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Quantizes the row-major `w [rows, cols]` column by column, compensating each column's
/// error with `u`, the upper Cholesky factor of `H⁻¹` (`[cols, cols]`, row-major, from
/// [`Weighting::gptq_factor`](super::Weighting::gptq_factor)).
///
/// # Algorithm
/// The block scales (and minima) are fixed first from `w`, as round-to-nearest sets them.
/// Then for each column `j`: every row's value (already updated by earlier columns) gets the
/// nearest code on its block's grid, and its error `e = (x − q) / U[j, j]` is subtracted from
/// the later columns as `e·U[j, j+1..]`: inside the current batch of `block_cols` columns at
/// once, beyond it by one product per batch. Rows are independent and run in parallel.
///
/// # Numerical behaviour
/// With `H = I` (a diagonal `U`) no error moves and the codes are round-to-nearest's. Values
/// pushed past their block's absmax clamp to the end codes.
///
/// # Errors
/// As [`Quantizer::quantize_host`]; [`QuantError::InvalidConfig`] if `u` is not `cols²` long.
pub fn gptq(
    quantizer: &Quantizer,
    w: &[f32],
    [rows, cols]: [usize; 2],
    u: &[f32],
    cfg: &GptqConfig,
) -> Result<HostQuantized, QuantError> {
    if u.len() != cols * cols {
        return Err(QuantError::InvalidConfig(format!(
            "GPTQ factor of {} values for {cols} columns",
            u.len()
        )));
    }
    let mut out = quantizer.quantize_host(w, [rows, cols])?;
    let batch = cfg.block_cols.max(1);
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let rows_per = rows.div_ceil(threads).max(1);
    let mut work = w.to_vec();
    let (block, scales, mins) = (out.block, &out.scales, &out.mins);
    std::thread::scope(|s| {
        for (chunk, (xs, codes)) in work
            .chunks_mut(rows_per * cols)
            .zip(out.codes.chunks_mut(rows_per * cols))
            .enumerate()
        {
            s.spawn(move || {
                let first = chunk * rows_per * cols;
                let params = |e: usize| {
                    let b = (first + e) / block;
                    (scales[b], mins.get(b).copied().unwrap_or(0.0))
                };
                rows_in_order(quantizer, xs, codes, cols, u, batch, params);
            });
        }
    });
    Ok(out)
}

/// GPTQ on a run of whole rows `xs` (updated in place); `params(e)` gives the scale and
/// minimum of element `e` of the run.
fn rows_in_order(
    quantizer: &Quantizer,
    xs: &mut [f32],
    codes: &mut [u8],
    cols: usize,
    u: &[f32],
    batch: usize,
    params: impl Fn(usize) -> (f32, f32),
) {
    let rows = xs.len() / cols;
    let mut err = vec![0f32; rows * batch];
    for b0 in (0..cols).step_by(batch) {
        let b1 = (b0 + batch).min(cols);
        let width = b1 - b0;
        for r in 0..rows {
            let row = &mut xs[r * cols..(r + 1) * cols];
            for j in b0..b1 {
                let (scale, min) = params(r * cols + j);
                let (code, q) = quantizer.code_fixed(row[j], scale, min);
                codes[r * cols + j] = code;
                let e = (row[j] - q) / u[j * cols + j];
                err[r * width + (j - b0)] = e;
                let uj = &u[j * cols + j + 1..j * cols + b1];
                row[j + 1..b1]
                    .iter_mut()
                    .zip(uj)
                    .for_each(|(x, u)| *x -= e * u);
            }
        }
        if b1 < cols {
            // Later columns: xs[:, b1..] −= E · U[b0..b1, b1..]. (faer 0.24.4's
            // `from_row_major_slice_with_stride_mut` lays the slice out column-major; the
            // transposed column-major view is the row-major one.)
            let rest = cols - b1;
            let dst =
                MatMut::from_column_major_slice_with_stride_mut(&mut xs[b1..], rest, rows, cols);
            faer::linalg::matmul::matmul(
                dst.transpose_mut(),
                Accum::Add,
                MatRef::from_row_major_slice(&err[..rows * width], rows, width),
                MatRef::from_row_major_slice_with_stride(&u[b0 * cols + b1..], width, rest, cols),
                -1.0,
                Par::Seq,
            );
            crate::upper::clear_upper_state_here();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calib::Gram;
    use crate::calib::gram::host_product;
    use crate::lowrank::Gaussian;
    use crate::quant::{BlockSize, QuantConfig};

    fn schemes() -> Vec<QuantConfig> {
        vec![
            QuantConfig::nf(2),
            QuantConfig::nf(3),
            QuantConfig::nf(4).with_block_size(BlockSize::Elements(32)),
            QuantConfig::int(3, true),
            QuantConfig::int(2, false),
            QuantConfig::int8_rowwise(),
            QuantConfig::nf(4).with_rounding(crate::quant::Rounding::Bnb),
        ]
    }

    /// `‖(W − Q)·S‖_F` for row-major `W`, `Q` `[rows, cols]`.
    fn weighted_err(w: &[f32], q: &[f32], s: &[f32], [rows, cols]: [usize; 2]) -> f64 {
        let d: Vec<f32> = w.iter().zip(q).map(|(a, b)| a - b).collect();
        let ds = host_product(&d, s, [rows, cols, cols]);
        ds.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt()
    }

    #[test]
    fn identity_statistics_give_round_to_nearest() {
        let (rows, cols) = (24, 96);
        let w = Gaussian::new(1).values(rows * cols);
        let u = Gram::identity(cols)
            .weighting(0.01)
            .unwrap()
            .gptq_factor()
            .unwrap();
        for cfg in schemes() {
            let q = Quantizer::new(cfg).unwrap();
            let rtn = q.quantize_host(&w, [rows, cols]).unwrap();
            let g = gptq(&q, &w, [rows, cols], &u, &GptqConfig { block_cols: 40 }).unwrap();
            assert_eq!(g, rtn, "{}", cfg.label());
        }
    }

    /// Correlated inputs (a random mixing of Gaussians): GPTQ never has a larger weighted
    /// error than round-to-nearest, and usually a much smaller one.
    #[test]
    fn never_worse_than_round_to_nearest_on_random_problems() {
        let mut gains = Vec::new();
        for seed in 0..6u64 {
            let (rows, cols, n) = (16, 64, 256);
            let mut g = Gaussian::new(100 + seed);
            let w = g.values(rows * cols);
            let mix = g.values(cols * cols);
            let z = g.values(n * cols);
            let x = host_product(&z, &mix, [n, cols, cols]);
            let mut gram = Gram::new(cols);
            gram.add_rows(&x).unwrap();
            let weighting = gram.weighting(0.01).unwrap();
            let u = weighting.gptq_factor().unwrap();
            for cfg in schemes() {
                let q = Quantizer::new(cfg).unwrap();
                let rtn = q.quantize_host(&w, [rows, cols]).unwrap();
                let gq = gptq(&q, &w, [rows, cols], &u, &GptqConfig { block_cols: 24 }).unwrap();
                let (a, b) = (q.dequantize_host(&rtn), q.dequantize_host(&gq));
                let s = weighting.factor();
                let (e_rtn, e_gptq) = (
                    weighted_err(&w, &a, s, [rows, cols]),
                    weighted_err(&w, &b, s, [rows, cols]),
                );
                assert!(
                    e_gptq <= e_rtn * (1.0 + 1e-6),
                    "{} seed {seed}: {e_gptq} > {e_rtn}",
                    cfg.label()
                );
                gains.push(e_gptq / e_rtn);
            }
        }
        gains.sort_by(f64::total_cmp);
        let median = gains[gains.len() / 2];
        assert!(median < 0.9, "median ratio {median}");
    }

    /// llama.cpp's K-quants (super-blocks of 256, group scales fixed by their own fit):
    /// round to nearest's codes with `H = I`, and no larger weighted error on a correlated
    /// problem.
    #[test]
    fn k_quants_keep_their_scales() {
        use crate::quant::GgmlFormat;
        let (rows, cols, n) = (8, 256, 1024);
        let mut g = Gaussian::new(17);
        let w = g.values(rows * cols);
        let mix = g.values(cols * cols);
        let x = host_product(&g.values(n * cols), &mix, [n, cols, cols]);
        let mut gram = Gram::new(cols);
        gram.add_rows(&x).unwrap();
        let weighting = gram.weighting(0.01).unwrap();
        let u = weighting.gptq_factor().unwrap();
        let identity = Gram::identity(cols)
            .weighting(0.01)
            .unwrap()
            .gptq_factor()
            .unwrap();
        for f in [GgmlFormat::Q4K, GgmlFormat::Q5K, GgmlFormat::Q6K] {
            let q = Quantizer::new(QuantConfig::ggml(f)).unwrap();
            let rtn = q.quantize_host(&w, [rows, cols]).unwrap();
            let cfg = GptqConfig { block_cols: 64 };
            let same = gptq(&q, &w, [rows, cols], &identity, &cfg).unwrap();
            assert_eq!(same, rtn, "{}", f.name());
            let gq = gptq(&q, &w, [rows, cols], &u, &cfg).unwrap();
            let s = weighting.factor();
            let e_rtn = weighted_err(&w, &q.dequantize_host(&rtn), s, [rows, cols]);
            let e_gptq = weighted_err(&w, &q.dequantize_host(&gq), s, [rows, cols]);
            assert!(e_gptq < e_rtn, "{}: {e_gptq} ≥ {e_rtn}", f.name());
        }
    }

    #[test]
    fn batch_width_does_not_change_the_result() {
        let (rows, cols) = (8, 70);
        let mut g = Gaussian::new(9);
        let w = g.values(rows * cols);
        let x = g.values(200 * cols);
        let mut gram = Gram::new(cols);
        gram.add_rows(&x).unwrap();
        let u = gram.weighting(0.01).unwrap().gptq_factor().unwrap();
        let q = Quantizer::new(QuantConfig::nf(3)).unwrap();
        let one = gptq(&q, &w, [rows, cols], &u, &GptqConfig { block_cols: 70 }).unwrap();
        let many = gptq(&q, &w, [rows, cols], &u, &GptqConfig { block_cols: 16 }).unwrap();
        let differ = one.codes.iter().zip(&many.codes).filter(|(a, b)| a != b);
        // The same arithmetic in another order: at most a boundary value or two moves.
        assert!(differ.count() <= 2);
        assert!(gptq(&q, &w, [rows, cols], &u[1..], &GptqConfig::default()).is_err());
    }
}
