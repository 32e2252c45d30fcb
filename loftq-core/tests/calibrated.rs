//! The calibrated starts: the weighted closed form against a brute-force optimum, the
//! reduction to LoftQ when every input direction weighs the same, GPTQ inside the alternation.

mod common;

use burn::tensor::{Tensor, TensorData};
use loftq_core::calib::{
    BaseQuantizer, CalibratedConfig, GptqConfig, Gram, Objective, Weighting, calibrated,
    fit_weighted, score,
};
use loftq_core::lowrank::{Gaussian, SvdMethod};
use loftq_core::{InitScaling, LoftqConfig, QuantConfig, loftq};

fn host(t: &Tensor<2>) -> Vec<f32> {
    t.to_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// Correlated inputs `X = Z·M` of width `d` and their weighting.
fn inputs(n: usize, d: usize, seed: u64) -> (Vec<f32>, Weighting) {
    let mut g = Gaussian::new(seed);
    let z = g.values(n * d);
    // Row k of the mixing scaled by 1.05^-k, then mixed: an uneven, correlated spectrum.
    let m: Vec<f32> = g
        .values(d * d)
        .iter()
        .enumerate()
        .map(|(i, v)| v * 1.05f32.powi(-((i / d) as i32)))
        .collect();
    let x: Vec<f32> = (0..n)
        .flat_map(|r| {
            let (z, m) = (&z, &m);
            (0..d).map(move |j| (0..d).map(|k| z[r * d + k] * m[k * d + j]).sum::<f32>())
        })
        .collect();
    let mut gram = Gram::new(d);
    gram.add_rows(&x).unwrap();
    (x, gram.weighting(1e-3).unwrap())
}

/// `‖(R − B·A)·Xᵀ‖_F` computed directly from the inputs (f64).
fn output_error(r: &[f64], b: &[f64], a: &[f64], x: &[f32], mnk: [usize; 3]) -> f64 {
    weighted_output_error(r, b, a, x, &vec![1.0; mnk[0]], mnk)
}

/// `‖D^{1/2}·(R − B·A)·Xᵀ‖_F` for row weights `d`, computed directly (f64).
fn weighted_output_error(
    r: &[f64],
    b: &[f64],
    a: &[f64],
    x: &[f32],
    d: &[f64],
    [m, n, k]: [usize; 3],
) -> f64 {
    let rows = x.len() / n;
    let mut total = 0.0;
    for i in 0..m {
        let row: Vec<f64> = (0..n)
            .map(|j| r[i * n + j] - (0..k).map(|p| b[i * k + p] * a[p * n + j]).sum::<f64>())
            .collect();
        for t in 0..rows {
            let y: f64 = (0..n).map(|j| row[j] * f64::from(x[t * n + j])).sum();
            total += d[i] * y * y;
        }
    }
    total.sqrt()
}

/// Weighted alternating least squares from a random start, run to convergence: an independent
/// route to the optimum of `min_{rank k} ‖D^{1/2}·(R − B·A)·S‖` (row weights `d`).
fn brute_force(r: &[f64], x: &[f32], d: &[f64], [m, n, k]: [usize; 3], seed: u64) -> f64 {
    use faer::Mat;
    use faer::linalg::solvers::Solve;
    let rows = x.len() / n;
    let xm = Mat::<f64>::from_fn(rows, n, |t, j| f64::from(x[t * n + j]));
    let rm = Mat::<f64>::from_fn(m, n, |i, j| r[i * n + j]);
    let dm = Mat::<f64>::from_fn(m, m, |i, j| if i == j { d[i] } else { 0.0 });
    let mut g = Gaussian::new(seed);
    let mut b = Mat::<f64>::from_fn(m, k, |_, _| g.normal());
    let mut a = Mat::<f64>::zeros(k, n);
    let target = &rm * xm.transpose(); // R·Xᵀ [m, rows]
    for _ in 0..3000 {
        // A given B: min ‖D^{1/2}(R − B·A)Xᵀ‖ → A = (BᵀDB)⁻¹BᵀD·R (X full column rank).
        let btb = b.transpose() * &dm * &b;
        a = btb
            .llt(faer::Side::Lower)
            .unwrap()
            .solve(b.transpose() * &dm * &rm);
        // B given A: each row on its own, so D does not enter.
        let ax = &a * xm.transpose();
        let g2 = &ax * ax.transpose();
        let rhs = &ax * target.transpose();
        b = g2
            .llt(faer::Side::Lower)
            .unwrap()
            .solve(rhs)
            .transpose()
            .to_owned();
    }
    let bv: Vec<f64> = (0..m * k).map(|i| b[(i / k, i % k)]).collect();
    let av: Vec<f64> = (0..k * n).map(|i| a[(i / n, i % n)]).collect();
    weighted_output_error(r, &bv, &av, x, d, [m, n, k])
}

#[test]
fn weighted_closed_form_is_the_optimum() {
    let device = common::device();
    let (m, n, k) = (9, 7, 2);
    for seed in 0..3 {
        let (x, weighting) = inputs(60, n, 10 + seed);
        let w = Gaussian::new(20 + seed).values(m * n);
        let wt = Tensor::<2>::from_data(TensorData::new(w.clone(), [m, n]), &device);
        let zero = Tensor::<2>::zeros([m, n], &device);
        let fit = fit_weighted(
            &wt,
            &zero,
            &weighting,
            k,
            &SvdMethod::Exact,
            1.0,
            InitScaling::Exact,
        )
        .unwrap();
        let r: Vec<f64> = w.iter().map(|v| f64::from(*v)).collect();
        let (a, b) = (host(&fit.fit.lora_a), host(&fit.fit.lora_b));
        let to64 = |v: &[f32]| v.iter().map(|x| f64::from(*x)).collect::<Vec<_>>();
        let closed = output_error(&r, &to64(&b), &to64(&a), &x, [m, n, k]);
        let brute = (0..3)
            .map(|s| brute_force(&r, &x, &[1.0; 9], [m, n, k], s))
            .fold(f64::INFINITY, f64::min);
        assert!(
            (closed - brute).abs() <= 1e-4 * brute,
            "seed {seed}: closed form {closed}, brute force {brute}"
        );
        // The plain SVD's adapter is worse on the outputs.
        let plain = loftq_core::init::fit_adapter(
            &wt,
            &zero,
            k,
            &SvdMethod::Exact,
            1.0,
            InitScaling::Exact,
        )
        .unwrap();
        let plain_err = output_error(
            &r,
            &to64(&host(&plain.lora_b)),
            &to64(&host(&plain.lora_a)),
            &x,
            [m, n, k],
        );
        assert!(closed < plain_err, "{closed} vs plain {plain_err}");
    }
}

/// The row-weighted closed form (`D^{-1/2}·[D^{1/2}·(W − Q)·S]_r·S⁻¹`) against weighted ALS
/// for the base it quantized; constant weights change nothing (their scale cancels).
#[test]
fn row_weighted_closed_form_is_the_optimum() {
    let device = common::device();
    let (m, n, k) = (9, 7, 2);
    let mut lcfg = LoftqConfig::new(
        QuantConfig::nf(2).with_block_size(loftq_core::quant::BlockSize::Elements(7)),
        k,
        1,
    );
    lcfg.svd = SvdMethod::Exact;
    let cfg = CalibratedConfig {
        loftq: lcfg,
        base: BaseQuantizer::Rtn,
    };
    let to64 = |v: &[f32]| v.iter().map(|x| f64::from(*x)).collect::<Vec<_>>();
    for seed in 0..3 {
        let (x, weighting) = inputs(60, n, 30 + seed);
        let w = Gaussian::new(40 + seed).values(m * n);
        let wt = Tensor::<2>::from_data(TensorData::new(w.clone(), [m, n]), &device);
        // Weights spread over two orders of magnitude.
        let d: Vec<f32> = (0..m)
            .map(|i| 10f32.powf(((i * 5 + seed as usize) % 9) as f32 / 4.0))
            .collect();
        let rows = Objective {
            inputs: &weighting,
            rows: Some(&d),
        };
        let r = calibrated(&wt, rows, &cfg).unwrap();
        let residual: Vec<f64> = (w.iter().zip(host(&r.start.q)))
            .map(|(a, q)| f64::from(*a) - f64::from(q))
            .collect();
        let (a, b) = (host(&r.start.lora_a), host(&r.start.lora_b));
        let d64 = to64(&d);
        let closed = weighted_output_error(&residual, &to64(&b), &to64(&a), &x, &d64, [m, n, k]);
        let brute = (0..3)
            .map(|s| brute_force(&residual, &x, &d64, [m, n, k], s))
            .fold(f64::INFINITY, f64::min);
        assert!(
            (closed - brute).abs() <= 1e-4 * brute,
            "seed {seed}: closed form {closed}, brute force {brute}"
        );
        // The unweighted adapter for the same base is worse under these weights.
        let plain = calibrated(&wt, &weighting, &cfg).unwrap();
        let (pa, pb) = (host(&plain.start.lora_a), host(&plain.start.lora_b));
        let other = weighted_output_error(&residual, &to64(&pb), &to64(&pa), &x, &d64, [m, n, k]);
        assert!(closed < other, "{closed} vs unweighted rows {other}");
        // Constant weights are no weights.
        let c = vec![3.5f32; m];
        let flat = Objective {
            inputs: &weighting,
            rows: Some(&c),
        };
        let f = calibrated(&wt, flat, &cfg).unwrap();
        for (u, v) in host(&f.start.lora_b).iter().zip(&pb) {
            assert!((u - v).abs() <= 1e-4 * (1.0 + v.abs()), "{u} vs {v}");
        }
        assert!((f.weighted_err() - plain.weighted_err()).abs() <= 1e-5);
    }
}

/// Row weights that are not one finite positive number per row are refused.
#[test]
fn bad_row_weights_are_refused() {
    let device = common::device();
    let (_, weighting) = inputs(40, 8, 1);
    let wt = Tensor::<2>::from_data(
        TensorData::new(Gaussian::new(2).values(32), [4, 8]),
        &device,
    );
    let cfg = CalibratedConfig {
        loftq: LoftqConfig::new(
            QuantConfig::nf(4).with_block_size(loftq_core::quant::BlockSize::Elements(8)),
            1,
            1,
        ),
        base: BaseQuantizer::Rtn,
    };
    for d in [
        vec![1.0; 3],
        vec![1.0, 0.0, 1.0, 1.0],
        vec![1.0, f32::NAN, 1.0, 1.0],
    ] {
        let o = Objective {
            inputs: &weighting,
            rows: Some(&d),
        };
        assert!(calibrated(&wt, o, &cfg).is_err(), "{d:?}");
    }
}

#[test]
fn identity_statistics_reduce_to_loftq() {
    let device = common::device();
    let (m, n) = (64, 128);
    let w = Gaussian::new(5).values(m * n);
    let wt = Tensor::<2>::from_data(TensorData::new(w, [m, n]), &device);
    let identity = Gram::identity(n).weighting(0.01).unwrap();
    for (bits, iters) in [(4, 1), (2, 3)] {
        let mut lcfg = LoftqConfig::new(QuantConfig::nf(bits), 8, iters);
        lcfg.svd = SvdMethod::Exact;
        lcfg.lora.alpha = 16.0;
        let plain = loftq(&wt, &lcfg).unwrap();
        let cal = calibrated(
            &wt,
            &identity,
            &CalibratedConfig {
                loftq: lcfg.clone(),
                base: BaseQuantizer::Rtn,
            },
        )
        .unwrap();
        assert_eq!(cal.start.rel_err_quant, plain.rel_err_quant);
        for (a, b) in cal.start.history.iter().zip(&plain.history) {
            assert!((a - b).abs() <= 1e-4 * b, "nf{bits}: {a} vs {b}");
        }
        // With H = I the weighted error is the plain one.
        for (a, b) in cal.weighted_history.iter().zip(&cal.start.history) {
            assert!((a - b).abs() <= 1e-4 * b);
        }
        let (c1, c2) = (
            cal.start.packed.unpack().unwrap().codes,
            plain.packed.unpack().unwrap().codes,
        );
        let differ = c1.iter().zip(&c2).filter(|(a, b)| a != b).count();
        if iters == 1 {
            assert_eq!(differ, 0);
        } else {
            assert!(differ * 1000 <= c1.len(), "{differ} codes differ");
        }
    }
}

#[test]
fn calibration_lowers_the_output_error() {
    let device = common::device();
    let (m, n) = (48, 64);
    let (_, weighting) = inputs(400, n, 3);
    let w = Gaussian::new(8).values(m * n);
    let wt = Tensor::<2>::from_data(TensorData::new(w, [m, n]), &device);
    let mut lcfg = LoftqConfig::new(QuantConfig::nf(2), 4, 3);
    lcfg.svd = SvdMethod::Exact;
    let identity = Gram::identity(n).weighting(0.01).unwrap();
    let run = |wg: &Weighting, base| {
        let cfg = CalibratedConfig {
            loftq: lcfg.clone(),
            base,
        };
        calibrated(&wt, wg, &cfg).unwrap()
    };
    // Weighted error of plain LoftQ, measured under the real statistics.
    let plain = run(&identity, BaseQuantizer::Rtn);
    let q = plain.start.q.clone();
    let ba = plain
        .start
        .lora_b
        .clone()
        .matmul(plain.start.lora_a.clone());
    let s = Tensor::<2>::from_data(
        TensorData::new(weighting.factor().to_vec(), [n, n]),
        &device,
    );
    let norm = |t: Tensor<2>| {
        host(&t)
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let wnorm = norm(wt.clone().matmul(s.clone()));
    let plain_w = norm((wt.clone() - q - ba).matmul(s.clone())) / wnorm;
    // The weighted error a run reports (from the singular values) is the one its start has.
    let direct = |r: &loftq_core::calib::CalibratedResult| {
        let ba = r.start.lora_b.clone().matmul(r.start.lora_a.clone());
        norm((wt.clone() - r.start.q.clone() - ba).matmul(s.clone())) / wnorm
    };

    let rtn = run(&weighting, BaseQuantizer::Rtn);
    let gptq = run(
        &weighting,
        BaseQuantizer::Gptq(GptqConfig { block_cols: 16 }),
    );
    assert!(
        (rtn.weighted_err() as f64) < plain_w,
        "{} vs {plain_w}",
        rtn.weighted_err()
    );
    assert!(gptq.weighted_err() < rtn.weighted_err());
    assert!(gptq.weighted_err_quant < rtn.weighted_err_quant);
    let randomized = calibrated(
        &wt,
        &weighting,
        &CalibratedConfig {
            loftq: LoftqConfig {
                svd: SvdMethod::default(),
                ..lcfg.clone()
            },
            base: BaseQuantizer::Rtn,
        },
    )
    .unwrap();
    for r in [&rtn, &gptq, &randomized] {
        let (got, want) = (f64::from(r.weighted_err()), direct(r));
        assert!((got - want).abs() <= 1e-4 * want, "{got} vs {want}");
    }
}

#[test]
fn scores_rank_the_candidates_and_count_their_bits() {
    let device = common::device();
    let (m, n) = (48, 64);
    let (x, weighting) = inputs(400, n, 4);
    let w = Gaussian::new(9).values(m * n);
    let wt = Tensor::<2>::from_data(TensorData::new(w.clone(), [m, n]), &device);
    let mut lcfg = LoftqConfig::new(QuantConfig::nf4(), 4, 1);
    lcfg.svd = SvdMethod::Exact;
    let candidates = [2, 3, 4, 8].map(QuantConfig::nf);
    for wg in [None, Some(&weighting)] {
        let choices = score(&wt, wg.map(Into::into), &candidates, Some(&lcfg)).unwrap();
        for (c, q) in choices.iter().zip(&candidates) {
            // Codes and one f32 scale per block of 64.
            let bits = (m * n) as u64 * u64::from(q.scheme.bits()) + (m * n / 64) as u64 * 32;
            assert_eq!(c.bits, bits);
        }
        assert!(choices.windows(2).all(|p| p[1].error < p[0].error));
        // The score is the absolute squared error of the one-iteration start.
        let cfg = CalibratedConfig {
            loftq: LoftqConfig {
                quant: candidates[0],
                ..lcfg.clone()
            },
            base: BaseQuantizer::Rtn,
        };
        let expected = match wg {
            None => {
                let r = loftq(&wt, &cfg.loftq).unwrap();
                let d = host(&(wt.clone() - r.q - r.lora_b.matmul(r.lora_a)));
                d.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>()
            }
            Some(wg) => {
                let r = calibrated(&wt, wg, &cfg).unwrap().start;
                let d = host(&(wt.clone() - r.q - r.lora_b.matmul(r.lora_a)));
                let d: Vec<f64> = d.iter().map(|&v| f64::from(v)).collect();
                let (z, zn) = (vec![0.0; m], vec![0.0; n]);
                // The damping adds λ·mean(diag H)·‖ΔW‖², with λ = 1e-3.
                let mean_diag = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / n as f64;
                let plain = d.iter().map(|v| v * v).sum::<f64>();
                output_error(&d, &z, &zn, &x, [m, n, 1]).powi(2) + 1e-3 * mean_diag * plain
            }
        };
        let rel = (choices[0].error - expected).abs() / expected;
        assert!(rel < 1e-3, "{} vs {expected}", choices[0].error);
        // Without an adapter the base alone is scored: more error, same bits.
        let base = score(&wt, wg.map(Into::into), &candidates, None).unwrap();
        for (b, c) in base.iter().zip(&choices) {
            assert_eq!(b.bits, c.bits);
            assert!(b.error > c.error);
        }
    }
}
