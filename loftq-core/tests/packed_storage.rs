//! Packed storage: round trips, bits per parameter, error bounds of every scheme.

mod common;

use common::gaussian;
use loftq_core::quant::{BlockSize, PackedTensor, Scales, Scheme};
use loftq_core::{QuantConfig, QuantError, Quantizer};
use proptest::prelude::*;

fn schemes() -> Vec<QuantConfig> {
    vec![
        QuantConfig::nf(2),
        QuantConfig::nf(3),
        QuantConfig::nf4(),
        QuantConfig::nf(8),
        QuantConfig::int(2, true),
        QuantConfig::int(3, false),
        QuantConfig::int(4, true),
        QuantConfig::int(4, false),
        QuantConfig::int8_rowwise(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// pack → unpack gives the same codes and scales; dequantizing the packed tensor equals
    /// dequantizing the unpacked codes, for odd shapes and block sizes (up to 42k values, so
    /// that dequantizing runs over several runs of blocks).
    #[test]
    fn pack_unpack_dequantize_round_trip(
        rows in 1usize..600,
        cols in 1usize..70,
        block in prop_oneof![Just(64usize), Just(7), Just(256), Just(1)],
        which in 0usize..9,
        seed in any::<u64>(),
    ) {
        let mut cfg = schemes()[which];
        if cfg.block_size != BlockSize::Row {
            cfg = cfg.with_block_size(BlockSize::Elements(block));
        }
        let x = gaussian(rows, cols, 0.1, seed);
        let quantizer = Quantizer::new(cfg).unwrap();
        let q = quantizer.quantize_host(&x, [rows, cols]).unwrap();
        let packed = PackedTensor::pack(&q, cfg);
        let back = packed.unpack().unwrap();
        prop_assert_eq!(&back, &q);
        prop_assert_eq!(packed.dequantize().unwrap(), quantizer.dequantize_host(&q));
    }

    /// With double-quantized scales the codes survive exactly and the scales within the
    /// 8-bit dynamic map's resolution.
    #[test]
    fn double_quant_round_trip(rows in 1usize..64, cols in 1usize..300, seed in any::<u64>()) {
        let cfg = QuantConfig::nf4().with_double_quant(true);
        let x = gaussian(rows, cols, 0.02, seed);
        let q = Quantizer::new(cfg).unwrap().quantize_host(&x, [rows, cols]).unwrap();
        let packed = PackedTensor::pack(&q, cfg);
        prop_assert!(matches!(packed.scales, Scales::Double(_)));
        let back = packed.unpack().unwrap();
        prop_assert_eq!(&back.codes, &q.codes);
        let spread = q.scales.iter().fold(0f32, |m, s| m.max(s.abs()));
        for (a, b) in q.scales.iter().zip(&back.scales) {
            prop_assert!((a - b).abs() <= 0.01 * spread + 1e-7, "{} vs {}", a, b);
        }
    }
}

#[test]
fn bits_per_param() {
    let (rows, cols) = (4096, 4096);
    let q = Quantizer::nf4()
        .quantize_host(&vec![0.5; rows * cols], [rows, cols])
        .unwrap();
    let plain = PackedTensor::pack(&q, QuantConfig::nf4());
    assert_eq!(plain.bits_per_param(), 4.5);
    let dq = PackedTensor::pack(&q, QuantConfig::nf4().with_double_quant(true));
    let expected = 4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0) + 32.0 / (rows * cols) as f64;
    assert!((dq.bits_per_param() - expected).abs() < 1e-12);
    assert!(
        (dq.bits_per_param() - 4.127).abs() < 5e-4,
        "{}",
        dq.bits_per_param()
    );
    let nf2 = Quantizer::new(QuantConfig::nf(2))
        .unwrap()
        .quantize_host(&[1.0; 640], [10, 64])
        .unwrap();
    assert_eq!(
        PackedTensor::pack(&nf2, QuantConfig::nf(2)).bits_per_param(),
        2.5
    );
}

#[test]
fn corrupt_packed_data_is_an_error() {
    let q = Quantizer::nf4()
        .quantize_host(&gaussian(4, 64, 1.0, 2), [4, 64])
        .unwrap();
    let mut packed = PackedTensor::pack(&q, QuantConfig::nf4());
    packed.data.truncate(10);
    assert!(matches!(packed.unpack(), Err(QuantError::Corrupt(_))));
    let mut packed = PackedTensor::pack(&q, QuantConfig::nf4());
    packed.scales = Scales::F32(vec![1.0; 3]);
    assert!(matches!(packed.dequantize(), Err(QuantError::Corrupt(_))));
}

/// Each scheme's reconstruction error stays within half a step of its grid.
#[test]
fn error_bounds() {
    let (rows, cols) = (64, 256);
    let x = gaussian(rows, cols, 1.0, 11);
    for cfg in schemes() {
        let quantizer = Quantizer::new(cfg).unwrap();
        let q = quantizer.quantize_host(&x, [rows, cols]).unwrap();
        let y = quantizer.dequantize_host(&q);
        for (i, (a, b)) in x.iter().zip(&y).enumerate() {
            let blk = i / q.block;
            let s = q.scales[blk];
            let half_step = match cfg.scheme {
                Scheme::IntSym { bits } => s / ((1 << (bits - 1)) - 1) as f32 / 2.0,
                Scheme::IntAsym { .. } => s / 2.0,
                _ => {
                    // Half the widest gap of the codebook, times the block absmax.
                    let l = quantizer.levels();
                    s * l.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max) / 2.0
                }
            };
            assert!(
                (a - b).abs() <= half_step * (1.0 + 1e-5) + 1e-6,
                "{}: {a} vs {b}",
                cfg.label()
            );
        }
    }
}

#[test]
fn int8_rowwise_is_per_row() {
    let x: Vec<f32> = (0..6).map(|i| i as f32 - 2.5).collect();
    let quantizer = Quantizer::new(QuantConfig::int8_rowwise()).unwrap();
    let q = quantizer.quantize_host(&x, [2, 3]).unwrap();
    assert_eq!(q.scales, vec![2.5, 2.5]);
    // -2.5 → -127, -1.5 → round(-76.2) = -76, -0.5 → round(-25.4) = -25; stored with +127.
    assert_eq!(&q.codes[..3], &[0, 51, 102]);
}

#[test]
fn invalid_configs_are_rejected() {
    assert!(Quantizer::new(QuantConfig::nf(9)).is_err());
    assert!(Quantizer::new(QuantConfig::int(1, true)).is_err());
    assert!(Quantizer::new(QuantConfig::nf4().with_block_size(BlockSize::Elements(0))).is_err());
    let q = Quantizer::nf4();
    assert!(q.quantize_host(&[1.0; 5], [2, 3]).is_err());
}
