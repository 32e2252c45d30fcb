//! LoftQ on matrices of one shape as one batched problem ([`loftq_batch_with`]): the same
//! starts as one matrix at a time, and host reads that do not grow with the batch.

mod common;

use burn::tensor::{Tensor, TensorData};
use common::{device, gaussian};
use loftq_core::lowrank::{RsvdConfig, SvdMethod};
use loftq_core::quant::{Kernel, host_f32};
use loftq_core::transfers::transfers;
use loftq_core::{LoftqConfig, LoftqResult, QuantConfig, loftq, loftq_batch_with, rel_dist};

/// Three Gaussian matrices of different scales and a zero one (its error stays 0, so it never
/// improves after the first iteration while the others do: the per-matrix choice of the best
/// iterate is exercised), each with its own sketch seed.
fn batch(shape: [usize; 2]) -> Vec<Tensor<2>> {
    let [m, n] = shape;
    let mut ws: Vec<Tensor<2>> = [(0.02, 1), (0.5, 2), (0.02, 3)]
        .iter()
        .map(|&(s, seed)| {
            Tensor::from_data(TensorData::new(gaussian(m, n, s, seed), shape), &device())
        })
        .collect();
    ws.insert(2, Tensor::zeros(shape, &device()));
    ws
}

fn configs(n: usize, iters: usize, early_stop: Option<f32>, alpha: f32) -> Vec<LoftqConfig> {
    (0..n)
        .map(|i| {
            let mut c = LoftqConfig::new(QuantConfig::nf(2), 8, iters);
            c.svd = SvdMethod::Randomized(RsvdConfig::default()).with_seed(10 + i as u64);
            c.early_stop = early_stop;
            c.lora.alpha = alpha;
            c
        })
        .collect()
}

/// `‖W − Q − s·B·A‖ / ‖W‖` from the returned tensors.
fn reconstruction_error(w: &Tensor<2>, r: &LoftqResult, scale: f32) -> f64 {
    let fit = r.q.clone() + r.lora_b.clone().matmul(r.lora_a.clone()).mul_scalar(scale);
    rel_dist(&host_f32(w), &host_f32(&fit))
}

#[test]
fn batched_starts_match_one_at_a_time() {
    // alpha 16 at rank 8: scale 2, so the factors' scaling is exercised; an early stop at a
    // 30% gain stops the Gaussian matrices after a few iterations, the zero one never.
    // Without it the whole batch stops early, and the iteration it began before its errors
    // were read is dropped.
    for with_zero in [true, false] {
        let mut ws = batch([64, 96]);
        if !with_zero {
            ws.remove(2);
        }
        let cfgs = configs(ws.len(), 5, Some(0.3), 16.0);
        check_against_one_at_a_time(&ws, &cfgs, with_zero.then_some(2));
    }
}

fn check_against_one_at_a_time(ws: &[Tensor<2>], cfgs: &[LoftqConfig], zero: Option<usize>) {
    let batched = loftq_batch_with(ws, cfgs, Kernel::Portable);
    assert_eq!(batched.len(), ws.len());
    for (i, ((w, cfg), got)) in ws.iter().zip(cfgs).zip(batched).enumerate() {
        let got = got.unwrap();
        let want = loftq(w, cfg).unwrap();
        assert_eq!(got.history.len(), want.history.len(), "matrix {i}");
        if zero.is_none() {
            assert!(got.history.len() < cfg.iters, "matrix {i} ran to the end");
        }
        assert!(
            (got.rel_err_quant - want.rel_err_quant).abs() <= 1e-5,
            "matrix {i}: quantization error {} vs {}",
            got.rel_err_quant,
            want.rel_err_quant
        );
        for (t, (g, e)) in got.history.iter().zip(&want.history).enumerate() {
            assert!(
                (g - e).abs() <= 0.01 * e + 1e-6,
                "matrix {i}, iteration {}: {g} vs {e}",
                t + 1
            );
        }
        assert_eq!(got.best_iter, want.best_iter, "matrix {i}");
        // The returned tensors are the reported iterate, and the packed codes are `Q`.
        let recon = reconstruction_error(w, &got, cfg.lora.scale());
        if zero == Some(i) {
            assert_eq!(got.history, vec![0.0; 5]);
            assert!(host_f32(&got.q).iter().all(|&x| x == 0.0));
        } else {
            assert!(
                (recon - f64::from(got.rel_err())).abs() <= 1e-4,
                "matrix {i}: {recon}"
            );
        }
        let unpacked = got.packed.dequantize().unwrap();
        assert_eq!(unpacked, host_f32(&got.q), "matrix {i}: packed codes");
        assert_eq!(got.packed.shape, [64, 96]);
        // The factors' values read with the codes are this matrix's.
        let host = got
            .host_factors
            .as_ref()
            .expect("factors read with the codes");
        assert_eq!(
            host.lora_a,
            host_f32(&got.lora_a),
            "matrix {i}: host lora_A"
        );
        assert_eq!(
            host.lora_b,
            host_f32(&got.lora_b),
            "matrix {i}: host lora_B"
        );
    }
}

#[test]
fn batches_that_cannot_stack_run_one_at_a_time() {
    // Different shapes, and a NaN: every matrix still gets its own result or error.
    let mut ws = batch([64, 96]);
    ws[1] = Tensor::from_data(
        TensorData::new(gaussian(32, 96, 0.02, 4), [32, 96]),
        &device(),
    );
    let cfgs = configs(ws.len(), 2, None, 8.0);
    let results = loftq_batch_with(&ws, &cfgs, Kernel::Portable);
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(results[1].as_ref().unwrap().q.dims(), [32, 96]);

    let mut bad = gaussian(64, 96, 0.02, 5);
    bad[7 * 96 + 3] = f32::NAN;
    let mut ws = batch([64, 96]);
    ws[3] = Tensor::from_data(TensorData::new(bad, [64, 96]), &device());
    let results = loftq_batch_with(&ws, &configs(ws.len(), 2, None, 8.0), Kernel::Portable);
    assert!(results[..3].iter().all(Result::is_ok));
    let err = results[3].as_ref().unwrap_err().to_string();
    assert!(err.contains("row 7") && err.contains("column 3"), "{err}");
}

/// The acceptance of the batched path: the reads of a LoftQ run depend neither on the number
/// of matrices in the batch nor on their size, and each warm iteration costs one: the
/// sketch's Gram matrix with the projection's (one Cholesky-QR pass settles these sketches),
/// and with them the previous iteration's error norms.
#[test]
fn batched_reads_do_not_grow_with_the_batch() {
    let reads = |b: usize, shape: [usize; 2], iters: usize| {
        let ws: Vec<Tensor<2>> = batch(shape).into_iter().cycle().take(b).collect();
        let cfgs = configs(b, iters, None, 8.0);
        let before = transfers();
        let results = loftq_batch_with(&ws, &cfgs, Kernel::Portable);
        assert!(results.iter().all(Result::is_ok));
        (transfers() - before).reads
    };
    for shape in [[64, 96], [128, 192]] {
        let by_size: Vec<[u64; 3]> = [1, 2, 4]
            .iter()
            .map(|&b| [2, 3, 4].map(|t| reads(b, shape, t)))
            .collect();
        assert!(
            by_size.iter().all(|r| *r == by_size[0]),
            "{shape:?}: reads at T = 2, 3, 4 for b = 1, 2, 4: {by_size:?}"
        );
        let [t2, t3, t4] = by_size[0];
        assert_eq!(t4 - t3, t3 - t2, "{shape:?}: {by_size:?}");
        assert_eq!(t4 - t3, 1, "{shape:?}: reads per warm iteration");
    }
}

/// The cold sketch's power steps run with no orthonormalisation between them, each scaled by
/// `1/‖A‖²`: weights of any magnitude keep the batched path (no overflow, so no fallback to
/// one matrix at a time, which would read more) and its errors, which do not depend on the
/// scale.
#[test]
fn batched_power_steps_hold_at_any_scale() {
    let run = |scale: f32| {
        let ws: Vec<Tensor<2>> = batch([64, 96])
            .into_iter()
            .map(|w| w.mul_scalar(scale))
            .collect();
        let cfgs = configs(ws.len(), 3, None, 8.0);
        let before = transfers();
        let results = loftq_batch_with(&ws, &cfgs, Kernel::Portable);
        let reads = (transfers() - before).reads;
        let errs: Vec<f32> = results.into_iter().map(|r| r.unwrap().rel_err()).collect();
        (reads, errs)
    };
    let (reads, errs) = run(1.0);
    for scale in [1e-12, 1e12] {
        let (r, e) = run(scale);
        assert_eq!(r, reads, "scale {scale}: reads");
        for (a, b) in e.iter().zip(&errs) {
            assert!(
                (a - b).abs() <= 1e-3 * b + 1e-7,
                "scale {scale}: {a} vs {b}"
            );
        }
    }
}
