//! Truncated SVDs on matrices with known spectra, and the LoRA start methods.

mod common;

use burn::tensor::{Tensor, TensorData};
use common::{device, gaussian};
use loftq_core::init::{Base, LoraInit, init_lora};
use loftq_core::lowrank::{RsvdConfig, SvdMethod, exact_svd, randomized_svd, truncated_svd};
use loftq_core::{LoftqConfig, QuantConfig};

use loftq_core::quant::host_f32 as host;

/// `U·diag(σ)·Vᵀ` with orthonormal `U`, `V` taken from the SVD of a Gaussian matrix.
fn with_spectrum(m: usize, n: usize, sigma: &[f32]) -> Tensor<2> {
    let dev = device();
    let g = Tensor::<2>::from_data(TensorData::new(gaussian(m, n, 1.0, 21), [m, n]), &dev);
    let k = sigma.len();
    let basis = exact_svd(&g, k).unwrap();
    let s = Tensor::<1>::from_data(TensorData::new(sigma.to_vec(), [k]), &dev);
    (basis.u * s.reshape([1, k])).matmul(basis.v.transpose())
}

#[test]
fn exact_svd_recovers_a_known_spectrum() {
    let sigma: Vec<f32> = (0..40).map(|i| 10.0 * 0.8f32.powi(i)).collect();
    let a = with_spectrum(200, 120, &sigma);
    let lr = exact_svd(&a, 10).unwrap();
    for (got, want) in lr.s.iter().zip(&sigma) {
        assert!((got - want).abs() <= 1e-4 * want, "{got} vs {want}");
    }
}

#[test]
fn randomized_svd_on_decaying_and_flat_spectra() {
    let rank = 16;
    // Decaying: the top 16 values within 1e-3, reconstruction within 1% of the optimum.
    let decaying: Vec<f32> = (0..80).map(|i| 0.85f32.powi(i)).collect();
    // Flat tail (like LoftQ's residuals): a clear top block, then noise-level values.
    let flat: Vec<f32> = (0..80)
        .map(|i| {
            if i < 8 {
                5.0 - i as f32 * 0.3
            } else {
                1.0 - i as f32 * 0.002
            }
        })
        .collect();
    // The decaying sketches need two Cholesky-QR passes; the flat ones settle in one, so on a
    // device their last pass shares the final step's read (`SettledFinal`), with power
    // iterations before it or without (the CPU's host path keeps the two steps apart).
    for (name, sigma, power_iters, tol_s, tol_err) in [
        ("decaying", &decaying, 2, 1e-3, 0.01),
        ("flat", &flat, 2, 0.03, 0.02),
        ("flat, no power iteration", &flat, 0, 0.1, 0.15),
    ] {
        let a = with_spectrum(300, 200, sigma);
        let cfg = RsvdConfig {
            power_iters,
            ..RsvdConfig::default()
        };
        let lr = randomized_svd(&a, rank, &cfg, None).unwrap();
        // Orthonormal singular vectors: UᵀU = VᵀV = I.
        for (side, m) in [("U", &lr.u), ("V", &lr.v)] {
            let gram = host(&m.clone().transpose().matmul(m.clone()));
            for (i, g) in gram.iter().enumerate() {
                let want = f32::from(u8::from(i % (rank + 1) == 0));
                assert!((g - want).abs() < 1e-4, "{name}: {side}ᵀ{side}[{i}] = {g}");
            }
        }
        for (i, (got, want)) in lr.s.iter().zip(sigma.iter()).enumerate() {
            assert!(
                (got - want).abs() <= tol_s * want,
                "{name} σ{i}: {got} vs {want}"
            );
        }
        // ‖A − A_r‖ against the optimum √(Σ_{i>r} σ_i²).
        let (b, at) = lr.balanced_factors();
        let err: f64 = host(&(a.clone() - b.matmul(at)))
            .iter()
            .map(|x| f64::from(*x).powi(2))
            .sum::<f64>()
            .sqrt();
        let best: f64 = sigma[rank..]
            .iter()
            .map(|x| f64::from(*x).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            err <= best * (1.0 + tol_err),
            "{name}: {err} vs optimum {best}"
        );
    }
}

#[test]
fn randomized_svd_is_deterministic_and_rank_is_checked() {
    let a = with_spectrum(
        64,
        48,
        &(0..32).map(|i| 1.0 / (1 + i) as f32).collect::<Vec<_>>(),
    );
    let cfg = RsvdConfig::default();
    let x = randomized_svd(&a, 8, &cfg, None).unwrap();
    let y = randomized_svd(&a, 8, &cfg, None).unwrap();
    assert_eq!(x.s, y.s);
    assert_eq!(host(&x.u), host(&y.u));
    assert!(truncated_svd(&a, 0, &SvdMethod::Exact, None).is_err());
    assert!(truncated_svd(&a, 49, &SvdMethod::Exact, None).is_err());
    assert!(randomized_svd(&a, 49, &cfg, None).is_err());
    assert!(exact_svd(&a, 0).is_err());
}

#[test]
fn lora_start_methods() {
    let dev = device();
    let (m, n, rank, scale) = (96, 128, 8, 2.0);
    let w = Tensor::<2>::from_data(TensorData::new(gaussian(m, n, 0.02, 8), [m, n]), &dev);
    let quant = QuantConfig::nf(2);

    let zeros = init_lora(&w, &LoraInit::Zeros { quant, seed: 1 }, rank, scale).unwrap();
    assert!(host(&zeros.lora_b).iter().all(|&v| v == 0.0));
    let bound = 1.0 / (n as f32).sqrt();
    assert!(host(&zeros.lora_a).iter().all(|v| v.abs() <= bound));
    assert!(matches!(zeros.base, Base::Quantized { .. }));

    let pissa = init_lora(
        &w,
        &LoraInit::Pissa {
            svd: SvdMethod::Exact,
        },
        rank,
        scale,
    )
    .unwrap();
    assert!(matches!(pissa.base, Base::Dense(_)));
    assert!(pissa.rel_err < 1e-5, "PiSSA is exact: {}", pissa.rel_err);

    let qpissa = init_lora(
        &w,
        &LoraInit::QPissa {
            quant,
            svd: SvdMethod::Exact,
        },
        rank,
        scale,
    )
    .unwrap();
    let mut cfg = LoftqConfig {
        svd: SvdMethod::Exact,
        ..LoftqConfig::new(quant, rank, 5)
    };
    cfg.lora.alpha = scale * rank as f32;
    let loftq = init_lora(&w, &LoraInit::Loftq(cfg), rank, scale).unwrap();
    // Starting from the quantization error beats starting from zero at 2 bits.
    assert!(
        loftq.rel_err < zeros.rel_err,
        "LoftQ {} vs QLoRA {}",
        loftq.rel_err,
        zeros.rel_err
    );
    assert!(
        qpissa.rel_err < zeros.rel_err,
        "QPiSSA {} vs QLoRA {}",
        qpissa.rel_err,
        zeros.rel_err
    );
    assert_eq!(loftq.lora_a.dims(), [rank, n]);
    assert_eq!(loftq.lora_b.dims(), [m, rank]);
}

/// The host–device traffic of LoftQ on the test's device: every warm iteration (2..T) costs
/// the same number of reads, the same whatever the matrix's size, and few of them (on the
/// CPU's host path none; on a device one: the sketch's Gram matrix with the projection's, as
/// one Cholesky-QR pass settles the sketch, and with them the previous iteration's row sums of
/// the error; the quantizer's finiteness check only runs on `W` itself). Nothing read is
/// tall: two `k × k` matrices and `m` row sums.
#[test]
fn loftq_reads_a_constant_number_of_times_per_iteration() {
    use loftq_core::transfers::transfers;
    let reads = |shape: [usize; 2], iters: usize| {
        let w = Tensor::<2>::from_data(
            TensorData::new(gaussian(shape[0], shape[1], 0.02, 5), shape),
            &device(),
        );
        let cfg = LoftqConfig::new(QuantConfig::nf(2), 8, iters);
        let before = transfers();
        loftq_core::loftq(&w, &cfg).unwrap();
        transfers() - before
    };
    let mut per_warm = Vec::new();
    for shape in [[64, 96], [192, 256]] {
        let [t2, t3, t4] = [2, 3, 4].map(|t| reads(shape, t));
        let k = 8 + 16;
        let values = t4.read_values - t3.read_values;
        assert!(
            values <= (2 * k * k + shape[0]) as u64,
            "{shape:?}: {values} values read per warm iteration"
        );
        let [t2, t3, t4] = [t2.reads, t3.reads, t4.reads];
        assert_eq!(t4 - t3, t3 - t2, "{shape:?}: {t2}, {t3}, {t4} reads");
        per_warm.push(t4 - t3);
        // The first (cold) iteration and the result's copy cost a bounded number more.
        assert!(t2 <= 2 * (t4 - t3) + 24, "{shape:?}: {t2} reads at T = 2");
    }
    assert_eq!(
        per_warm[0], per_warm[1],
        "reads per warm iteration depend on the size"
    );
    let most = match loftq_core::DeviceSpec::from_env() {
        loftq_core::DeviceSpec::Cpu => 0,
        _ => 1,
    };
    assert_eq!(per_warm[0], most, "reads per warm iteration");
}

/// A weight that is not finite is refused with the position of its first such value, though
/// LoftQ checks the values only when their norm is not finite (a read fewer on a device).
#[test]
fn loftq_names_the_first_value_that_is_not_finite() {
    for (at, bad) in [((3, 5), f32::NAN), ((6, 1), f32::INFINITY)] {
        let mut x = gaussian(8, 64, 0.02, 1);
        x[at.0 * 64 + at.1] = bad;
        x[7 * 64 + 2] = f32::NEG_INFINITY;
        let w = Tensor::<2>::from_data(TensorData::new(x, [8, 64]), &device());
        let err = loftq_core::loftq(&w, &LoftqConfig::new(QuantConfig::nf4(), 4, 2)).unwrap_err();
        match err {
            loftq_core::LoftqError::Quant(loftq_core::QuantError::NonFinite {
                row, col, ..
            }) => {
                assert_eq!((row, col), at, "{bad}")
            }
            e => panic!("{bad}: unexpected {e}"),
        }
    }
}
