//! The quantizers against the Python references (PEFT 0.18.1, bitsandbytes), on the device
//! named by `LOFTQ_DEVICE`.

mod common;

use burn::tensor::{Tensor, TensorData};
use common::{Fixture, device, gaussian};
use loftq_core::quant::{
    Codebook, HostQuantized, Kernel, Rounding, is_host_device, torch_linspace_f32,
};
use loftq_core::{QuantConfig, Quantizer};

fn assert_bits_eq(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}[{i}]: {a} vs {b}");
    }
}

/// The portable kernel against the host kernel where the two cannot agree bit for bit: codes
/// equal up to a step at a rounding boundary (rarely), and scales, minimums and values within
/// a few `f32` ulps of their block's magnitude.
fn assert_kernels_close(
    x: &[f32],
    h: &HostQuantized,
    p: &HostQuantized,
    dh: &[f32],
    dp: &[f32],
    what: &str,
) {
    let magnitude: Vec<f32> = x
        .chunks(h.block)
        .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect();
    let tol = |block: usize| 8.0 * f32::EPSILON * magnitude[block];
    for (name, a, b) in [("scales", &h.scales, &p.scales), ("mins", &h.mins, &p.mins)] {
        assert_eq!(a.len(), b.len(), "{what}: {name}");
        for (i, (u, v)) in a.iter().zip(b.iter()).enumerate() {
            assert!((u - v).abs() <= tol(i), "{what}: {name}[{i}] {u} vs {v}");
        }
    }
    let mut differ = 0;
    for (i, (a, b)) in h.codes.iter().zip(&p.codes).enumerate() {
        let block = i / h.block;
        if a == b {
            let (u, v) = (dh[i], dp[i]);
            assert!((u - v).abs() <= tol(block), "{what}: value[{i}] {u} vs {v}");
        } else {
            assert_eq!(a.abs_diff(*b), 1, "{what}: code[{i}] {a} vs {b}");
            differ += 1;
        }
    }
    assert!(
        differ * 100 <= h.codes.len(),
        "{what}: {differ} codes differ"
    );
}

#[test]
fn codebooks_equal_reference_bit_for_bit() {
    let fx = Fixture::open("nf_codebooks.safetensors");
    for bits in [2u8, 4, 8] {
        let n = 1usize << bits;
        let (pos, _) = fx.f32(&format!("nf{bits}_linspace_pos"));
        let (neg, _) = fx.f32(&format!("nf{bits}_linspace_neg"));
        assert_bits_eq(
            &torch_linspace_f32(0.9677083, 0.5, n / 2 + 1)[..n / 2],
            &pos,
            "linspace+",
        );
        assert_bits_eq(
            &torch_linspace_f32(0.9677083, 0.5, n / 2)[..n / 2 - 1],
            &neg,
            "linspace-",
        );
        let (nf, _) = fx.f32(&format!("nf{bits}"));
        assert_bits_eq(
            Codebook::normal_float(bits).levels(),
            &nf,
            &format!("nf{bits}"),
        );
        let (uniform, _) = fx.f32(&format!("uniform{bits}"));
        assert_bits_eq(
            Codebook::uniform(bits).levels(),
            &uniform,
            &format!("uniform{bits}"),
        );
    }
    // NF3 follows the same rule: 8 sorted levels with exact -1, 0 and 1.
    let nf3 = Codebook::normal_float(3);
    assert_eq!(nf3.len(), 8);
    assert_eq!(
        (nf3.levels()[0], nf3.levels()[3], nf3.levels()[7]),
        (-1.0, 0.0, 1.0)
    );
}

/// Codes, absmax and dequantized values identical to PEFT's `NFQuantizer.quantize_block`.
fn check_against_peft(bits: u8, kernel: Kernel) {
    let fx = Fixture::open("loftq_gauss256x512.safetensors");
    let dev = device();
    let w = fx.matrix("W", &dev);
    let quantizer = Quantizer::new(QuantConfig::nf(bits)).unwrap();
    let q = quantizer.quantize_with(&w, kernel).unwrap();
    let host = q.to_host();
    let want_codes = fx.u8(&format!("nf{bits}_codes"));
    let diff = host
        .codes
        .iter()
        .zip(&want_codes)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(diff, 0, "NF{bits} {kernel:?}: {diff} codes differ");
    assert_bits_eq(
        &host.scales,
        &fx.f32(&format!("nf{bits}_absmax")).0,
        "absmax",
    );
    let deq = quantizer.dequantize_with(&q, kernel);
    let deq = deq.to_data().try_to_vec::<f32>().unwrap();
    assert_bits_eq(&deq, &fx.f32(&format!("nf{bits}_q0")).0, "dequantized");
}

#[test]
fn nf4_matches_peft_host_kernel() {
    check_against_peft(4, Kernel::Host);
}

#[test]
fn nf4_matches_peft_portable_kernel() {
    check_against_peft(4, Kernel::Portable);
}

#[test]
fn nf2_matches_peft_host_kernel() {
    check_against_peft(2, Kernel::Host);
}

#[test]
fn nf2_matches_peft_portable_kernel() {
    check_against_peft(2, Kernel::Portable);
}

/// The bitsandbytes rule differs from PEFT's only for values within an ulp of a midpoint.
#[test]
fn bnb_rounding_differs_from_peft_only_at_boundaries() {
    let w = gaussian(512, 512, 0.02, 7);
    let peft = Quantizer::new(QuantConfig::nf4()).unwrap();
    let bnb = Quantizer::new(QuantConfig::nf4().with_rounding(Rounding::Bnb)).unwrap();
    let a = peft.quantize_host(&w, [512, 512]).unwrap();
    let b = bnb.quantize_host(&w, [512, 512]).unwrap();
    assert_eq!(a.scales, b.scales);
    let differ = a.codes.iter().zip(&b.codes).filter(|(x, y)| x != y).count();
    assert!(
        differ * 10_000 <= w.len(),
        "{differ} of {} codes differ",
        w.len()
    );
    for ((x, ca), cb) in w.iter().zip(&a.codes).zip(&b.codes) {
        assert!(ca.abs_diff(*cb) <= 1, "{x}: {ca} vs {cb}");
    }
}

/// bitsandbytes 0.50's own NF4 with double quantization, made on the CPU by
/// `tests/fixtures/make_bnb_double_quant.py`: the 4-bit codes, the 8-bit codes of the block
/// scales, their second-level absmax and the offset, bit for bit; and the double quantization
/// alone on 65,536 scales, so that its rounding is checked on many values.
#[test]
fn double_quant_equals_bitsandbytes() {
    use loftq_core::quant::{DoubleQuant, PackedTensor, Scales};
    let f = Fixture::open("bnb_double_quant.safetensors");
    let (w, shape) = f.f32("w");
    let config = QuantConfig::nf4()
        .with_rounding(Rounding::Bnb)
        .with_double_quant(true);
    let q = Quantizer::new(config)
        .unwrap()
        .quantize_host(&w, [shape[0], shape[1]])
        .unwrap();
    // bitsandbytes packs two codes per byte, the first in the high nibble.
    let theirs: Vec<u8> = f
        .u8("w.codes")
        .iter()
        .flat_map(|b| [b >> 4, b & 15])
        .collect();
    assert_eq!(q.codes, theirs, "4-bit codes");
    let Scales::Double(dq) = PackedTensor::pack(&q, config).scales else {
        panic!("double quantization was asked for");
    };
    assert_eq!(dq.codes, f.u8("w.scale_codes"), "8-bit scale codes");
    assert_bits_eq(
        &dq.absmax,
        &f.f32("w.scale_absmax").0,
        "second-level absmax",
    );
    assert_bits_eq(&[dq.offset], &f.f32("w.offset").0, "offset");

    let (scales, _) = f.f32("s");
    let dq = DoubleQuant::encode(&scales);
    let want = f.u8("s.codes");
    let differ = dq.codes.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "{differ} of {} scale codes differ", want.len());
    assert_bits_eq(&dq.absmax, &f.f32("s.absmax").0, "second-level absmax");
    assert_bits_eq(&[dq.offset], &f.f32("s.offset").0, "offset");
}

/// Every configuration: host and portable kernels agree (exactly on the host), tail blocks
/// included.
#[test]
fn portable_and_host_kernels_agree() {
    let dev = device();
    // On the host both kernels do the same IEEE operations, so they agree bit for bit. A GPU's
    // division may be 2.5 ulp off (Vulkan's precision rules) and it may fuse `c·s + m` into one
    // FMA: an NVIDIA H200 gave int8's `(c − 127)·s / 127` one ulp off.
    let exact = is_host_device(&dev);
    let configs = [
        QuantConfig::nf(2),
        QuantConfig::nf(3),
        QuantConfig::nf4().with_rounding(Rounding::Bnb),
        QuantConfig::nf(8),
        QuantConfig::new(loftq_core::quant::Scheme::UniformCodebook { bits: 4 }),
        QuantConfig::int8_rowwise(),
        QuantConfig::int(4, true),
        QuantConfig::int(3, false),
        QuantConfig::int(2, true).with_rounding(Rounding::Bnb),
    ];
    // 37 × 29 = 1073 elements: 16 full blocks of 64 and a tail of 49.
    let (rows, cols) = (37, 29);
    let mut x = gaussian(rows, cols, 0.05, 3);
    x[64..128].fill(0.0); // an all-zero block
    x[200] = 3.0; // an outlier
    let w = Tensor::<2>::from_data(TensorData::new(x.clone(), [rows, cols]), &dev);
    for cfg in configs {
        let quantizer = Quantizer::new(cfg).unwrap();
        let host = quantizer.quantize_with(&w, Kernel::Host).unwrap();
        let port = quantizer.quantize_with(&w, Kernel::Portable).unwrap();
        let (h, p) = (host.to_host(), port.to_host());
        let dh = quantizer
            .dequantize_with(&host, Kernel::Host)
            .to_data()
            .try_to_vec::<f32>()
            .unwrap();
        let dp = quantizer
            .dequantize_with(&port, Kernel::Portable)
            .to_data()
            .try_to_vec::<f32>()
            .unwrap();
        if exact {
            assert_eq!(h.codes, p.codes, "{}: codes", cfg.label());
            assert_bits_eq(&h.scales, &p.scales, &cfg.label());
            assert_bits_eq(&h.mins, &p.mins, &cfg.label());
            assert_bits_eq(&dh, &dp, &format!("{} dequantized", cfg.label()));
        } else {
            assert_kernels_close(&x, &h, &p, &dh, &dp, &cfg.label());
        }
        if cfg.block_size == loftq_core::quant::BlockSize::Elements(64) {
            assert!(
                dh[64..128].iter().all(|&v| v == 0.0),
                "{}: zero block",
                cfg.label()
            );
        }
        assert!(dh.iter().all(|v| v.is_finite()));
    }
}

/// On GPU back ends a codebook scheme quantizes in one CubeCL kernel (a thread a block): it
/// must apply there (not fall back unseen) and give Burn's ops' codes, scales and values (or
/// LoftQ's residual) bit for bit, zero blocks and both roundings included. On the CPU it does
/// not apply.
#[test]
fn codebook_kernel_applies_on_gpus_and_equals_burn_ops() {
    use burn::tensor::Int;
    let dev = device();
    let (nb, len) = (40, 64);
    let mut x = gaussian(nb, len, 0.05, 5);
    x[128..192].fill(0.0);
    let w = Tensor::<2>::from_data(TensorData::new(x, [nb, len]), &dev);
    for cfg in [
        QuantConfig::nf4(),
        QuantConfig::nf(2),
        QuantConfig::nf(3).with_rounding(Rounding::Bnb),
        QuantConfig::new(loftq_core::quant::Scheme::UniformCodebook { bits: 4 }),
    ] {
        let quantizer = Quantizer::new(cfg).unwrap();
        let (t, l) = (quantizer.thresholds(), quantizer.levels());
        let fused = loftq_core::quant::cube::quantize_codebook(&w, t, l, len, cfg.rounding, None);
        assert_eq!(fused.is_some(), !is_host_device(&dev), "{}", cfg.label());
        let Some((codes, scales, values)) = fused else {
            continue;
        };
        let absmax = w.clone().abs().max_dim(1);
        let safe = absmax
            .clone()
            .mask_fill(absmax.clone().equal_elem(0.0), 1.0);
        let v = match cfg.rounding {
            Rounding::Peft => w.clone() / safe,
            Rounding::Bnb => w.clone() * safe.recip(),
        };
        let mut want: Tensor<2, Int> = Tensor::zeros([nb, len], &dev);
        for &th in t {
            want = want + v.clone().greater_equal_elem(th).int();
        }
        let want = want.reshape([nb * len]);
        let levels = Tensor::<1>::from_data(TensorData::new(l.to_vec(), [l.len()]), &dev);
        let want_values = levels.select(0, want.clone()).reshape([nb, len]) * absmax.clone();
        let ints = |c: Tensor<1, Int>| c.to_data().convert::<i32>().try_to_vec::<i32>().unwrap();
        let floats = |f: Tensor<2>| f.to_data().try_to_vec::<f32>().unwrap();
        assert_eq!(ints(codes), ints(want), "{}: codes", cfg.label());
        assert_bits_eq(
            &floats(scales.reshape([nb, 1])),
            &floats(absmax),
            &format!("{} scales", cfg.label()),
        );
        assert_bits_eq(
            &floats(values),
            &floats(want_values.clone()),
            &format!("{} values", cfg.label()),
        );
        // LoftQ's residual `W − Q` from the same pass.
        let other =
            Tensor::<2>::from_data(TensorData::new(gaussian(nb, len, 0.05, 6), [nb, len]), &dev);
        let (_, _, residual) =
            loftq_core::quant::cube::quantize_codebook(&w, t, l, len, cfg.rounding, Some(&other))
                .expect("applies as before");
        assert_bits_eq(
            &floats(residual),
            &floats(other - want_values),
            &format!("{} residual", cfg.label()),
        );
    }
}

#[test]
fn fused_residual_equals_weight_minus_dequantized() {
    // 300 × 301: over the parallel threshold, with blocks that straddle rows and a tail.
    let (rows, cols) = (300, 301);
    let x = gaussian(rows, cols, 0.05, 9);
    for cfg in [
        QuantConfig::nf4(),
        QuantConfig::nf(3),
        QuantConfig::int(4, false),
        QuantConfig::int8_rowwise(),
    ] {
        let quantizer = Quantizer::new(cfg).unwrap();
        let q = quantizer.quantize_host(&x, [rows, cols]).unwrap();
        let want: Vec<f32> = x
            .iter()
            .zip(quantizer.dequantize_host(&q))
            .map(|(w, d)| w - d)
            .collect();
        let mut got = vec![f32::NAN; x.len()];
        quantizer.residual_host_into(&q, &x, &mut got);
        assert_bits_eq(&got, &want, &format!("{} residual", cfg.label()));
    }
}

#[test]
fn non_finite_weights_are_reported_with_position() {
    let dev = device();
    let mut x = gaussian(8, 16, 1.0, 1);
    x[3 * 16 + 5] = f32::NAN;
    x[6 * 16 + 1] = f32::INFINITY;
    let w = Tensor::<2>::from_data(TensorData::new(x, [8, 16]), &dev);
    for kernel in [Kernel::Host, Kernel::Portable] {
        let err = Quantizer::nf4().quantize_with(&w, kernel).unwrap_err();
        match err {
            loftq_core::QuantError::NonFinite { row, col, value } => {
                assert_eq!((row, col), (3, 5), "{kernel:?}");
                assert!(value.is_nan());
            }
            e => panic!("unexpected {e}"),
        }
    }
}

/// Codes read back from the device arrive packed `⌊31/bits⌋` to a word and unpack to the
/// same codes, for every width and a length that leaves the last word part full.
#[test]
fn device_codes_read_back_packed() {
    use loftq_core::quant::Quantized;
    use loftq_core::transfers::transfers;
    let device = device();
    for bits in 1u8..=8 {
        let n = 1000 + usize::from(bits);
        let top = (1u32 << bits) - 1;
        let codes: Vec<u8> = (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) % (top + 1))
            .map(|c| c as u8)
            .chain([top as u8])
            .collect();
        let host = HostQuantized {
            shape: [1, n + 1],
            block: n + 1,
            codes,
            scales: vec![1.0],
            mins: Vec::new(),
        };
        let q = Quantized::from_host(&host, &device);
        assert_eq!(q.bits, bits);
        let before = transfers();
        let back = q.to_host();
        let moved = transfers() - before;
        assert_eq!(back.codes, host.codes, "{bits} bits");
        let per = 31 / usize::from(bits);
        // The words and the one scale.
        assert_eq!(
            moved.read_values as usize,
            (n + 1).div_ceil(per) + 1,
            "{bits} bits"
        );
    }
}
