//! llama.cpp's block formats (`Q4_0` ... `Q8_0`) against gguf-py, llama.cpp's own Python
//! package, and `IQ4_NL` and the K-quants against llama.cpp's library itself: the bytes of a
//! quantized matrix and its values, on the device named by `LOFTQ_DEVICE` (fixtures made by
//! `fixtures/make_ggml_quant.py`, `make_ggml_iq4_nl.py` and `make_ggml_kquants.py`).

mod common;

use burn::tensor::{Tensor, TensorData};
use common::{Fixture, device};
use loftq_core::quant::{GgmlFormat, Kernel, PackedTensor, is_host_device};
use loftq_core::{QuantConfig, QuantError, Quantizer};

const CASES: [&str; 5] = ["gauss", "bf16_ties", "zeros", "midpoints", "tiny"];
const K_CASES: [&str; 7] = ["gauss", "heavy", "bf16", "signs", "steps", "small", "tiny"];
const K_FORMATS: [GgmlFormat; 3] = [GgmlFormat::Q4K, GgmlFormat::Q5K, GgmlFormat::Q6K];

fn upper(f: GgmlFormat) -> String {
    f.name().to_uppercase()
}

#[test]
fn bytes_and_values_equal_llama_cpp() {
    let fx = Fixture::open("ggml_quant.safetensors");
    let iq4 = Fixture::open("ggml_iq4_nl.safetensors");
    let dev = device();
    let exact = is_host_device(&dev);
    for case in CASES {
        let (x, shape) = fx.f32(&format!("{case}.x"));
        let shape = [shape[0], shape[1]];
        let w = Tensor::<2>::from_data(TensorData::new(x.clone(), shape), &dev);
        for f in GgmlFormat::ALL.into_iter().filter(|f| !f.is_k()) {
            let what = format!("{case} {}", f.name());
            let reference = if f == GgmlFormat::Iq4Nl { &iq4 } else { &fx };
            let want = reference.u8(&format!("{case}.{}", upper(f)));
            let (values, _) = reference.f32(&format!("{case}.{}.values", upper(f)));
            let q = Quantizer::new(QuantConfig::ggml(f)).unwrap();
            let host = q.quantize_host(&x, shape).unwrap();
            let bytes = f.encode(&host.codes, &host.scales, &host.mins).unwrap();
            assert!(bytes == want, "{what}: bytes differ from llama.cpp's");
            let deq = q.dequantize_host(&host);
            for (i, (a, b)) in deq.iter().zip(&values).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{what}: value[{i}] {a} vs {b}");
            }
            // The portable (tensor-op) kernel: the same bytes wherever division is exact.
            let port = q.quantize_with(&w, Kernel::Portable).unwrap().to_host();
            if exact {
                let bytes = f.encode(&port.codes, &port.scales, &port.mins).unwrap();
                assert!(bytes == want, "{what}: portable kernel's bytes differ");
            } else {
                let differ = host.codes.iter().zip(&port.codes).filter(|(a, b)| a != b);
                assert!(differ.count() * 100 <= host.codes.len(), "{what}: codes");
            }
        }
    }
}

/// The K-quants: bytes equal llama.cpp's except, in a super-block whose `f16` scale underflows
/// to zero, the 6/8-bit group scales that multiply it (module doc of `kquant`); values equal
/// bit for bit everywhere; the device kernel gives the same codes.
#[test]
fn k_quants_equal_llama_cpp() {
    let fx = Fixture::open("ggml_kquants.safetensors");
    let dev = device();
    for case in K_CASES {
        let (x, shape) = fx.f32(&format!("{case}.x"));
        let shape = [shape[0], shape[1]];
        for f in K_FORMATS {
            let what = format!("{case} {}", f.name());
            let want = fx.u8(&format!("{case}.{}", upper(f)));
            let (values, _) = fx.f32(&format!("{case}.{}.values", upper(f)));
            let q = Quantizer::new(QuantConfig::ggml(f)).unwrap();
            let host = q.quantize_host(&x, shape).unwrap();
            let bytes = f.encode(&host.codes, &host.scales, &host.mins).unwrap();
            assert_eq!(bytes.len(), want.len(), "{what}: length");
            let size = f.block_bytes();
            for (b, (ours, theirs)) in bytes.chunks(size).zip(want.chunks(size)).enumerate() {
                if ours != theirs {
                    assert!(
                        underflowed(f, theirs),
                        "{what}: super-block {b} differs from llama.cpp's"
                    );
                    assert_eq!(codes_of(f, ours), codes_of(f, theirs), "{what}: codes");
                }
            }
            let deq = q.dequantize_host(&host);
            for (i, (a, b)) in deq.iter().zip(&values).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{what}: value[{i}] {a} vs {b}");
            }
            let w = Tensor::<2>::from_data(TensorData::new(x.clone(), shape), &dev);
            let port = q.quantize_with(&w, Kernel::Portable).unwrap().to_host();
            assert_eq!(port, host, "{what}: device kernel");
        }
    }
}

/// True if a K-quant super-block's `f16` scale (or minimum scale) is zero.
fn underflowed(f: GgmlFormat, block: &[u8]) -> bool {
    let at: &[usize] = if f == GgmlFormat::Q6K {
        &[208]
    } else {
        &[0, 2]
    };
    at.iter()
        .any(|&i| u16::from_le_bytes([block[i], block[i + 1]]) & 0x7FFF == 0)
}

/// The code bytes of a K-quant super-block (everything but its scales).
fn codes_of(f: GgmlFormat, block: &[u8]) -> Vec<u8> {
    match f {
        GgmlFormat::Q6K => block[..192].to_vec(),
        _ => block[16..].to_vec(),
    }
}

#[test]
fn packed_storage_counts_f16_scales() {
    let fx = Fixture::open("ggml_quant.safetensors");
    let (x, shape) = fx.f32("gauss.x");
    let shape = [shape[0], shape[1]];
    for (f, bpw) in GgmlFormat::ALL
        .into_iter()
        .zip([4.5, 5.0, 5.5, 6.0, 8.5, 4.5, 5.5, 6.5625, 4.5])
    {
        let cfg = QuantConfig::ggml(f);
        let q = Quantizer::new(cfg).unwrap();
        let host = q.quantize_host(&x, shape).unwrap();
        let packed = PackedTensor::pack(&host, cfg);
        assert_eq!(packed.bits_per_param(), bpw, "{}", f.name());
        assert_eq!(
            packed.storage_bits(),
            8 * f
                .encode(&host.codes, &host.scales, &host.mins)
                .unwrap()
                .len(),
            "{}: GGUF bytes",
            f.name()
        );
        assert_eq!(packed.unpack().unwrap(), host, "{}", f.name());
        assert_eq!(packed.dequantize().unwrap(), q.dequantize_host(&host));
    }
}

#[test]
fn rows_must_be_whole_blocks_and_blocks_fixed() {
    let q = Quantizer::new(QuantConfig::ggml(GgmlFormat::Q4_0)).unwrap();
    let err = q.quantize_host(&[0.5; 40], [2, 20]).unwrap_err();
    assert!(
        matches!(&err, QuantError::InvalidConfig(m) if m.contains("multiple of 32")),
        "{err}"
    );
    let cfg = QuantConfig::ggml(GgmlFormat::Q8_0);
    assert!(
        cfg.with_block_size(loftq_core::quant::BlockSize::Elements(64))
            .validate()
            .is_err()
    );
    assert!(cfg.with_double_quant(true).validate().is_err());
    let mut x = vec![0.1f32; 64];
    x[33] = f32::NAN;
    let err = q.quantize_host(&x, [2, 32]).unwrap_err();
    assert!(
        matches!(err, QuantError::NonFinite { row: 1, col: 1, .. }),
        "{err}"
    );
}

/// LoftQ over the K-quants: the packed base is what the quantizer gives for `W − s·B·A`,
/// encodes to whole super-blocks, and the adapter lowers the error below plain quantization.
#[test]
fn loftq_runs_on_k_quants() {
    let dev = device();
    let x = common::gaussian(64, 512, 0.02, 5);
    let w = Tensor::<2>::from_data(TensorData::new(x, [64, 512]), &dev);
    for f in K_FORMATS {
        let r = loftq_core::loftq(
            &w,
            &loftq_core::LoftqConfig::new(QuantConfig::ggml(f), 8, 2),
        )
        .unwrap();
        assert!(r.rel_err() < r.rel_err_quant, "{}: {r:?}", f.name());
        let host = r.packed.unpack().unwrap();
        let bytes = f.encode(&host.codes, &host.scales, &host.mins).unwrap();
        assert_eq!(bytes.len(), 64 * 2 * f.block_bytes(), "{}", f.name());
        assert_eq!(
            r.packed.bits_per_param(),
            8.0 * bytes.len() as f64 / (64.0 * 512.0)
        );
    }
}
