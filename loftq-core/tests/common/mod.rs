//! Shared helpers of the integration tests: fixture loading and the test device.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use loftq_core::DeviceSpec;
use safetensors::{Dtype, SafeTensors};

/// A tensor read from a fixture: shape and raw little-endian bytes.
pub struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    pub fn open(name: &str) -> Self {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { bytes }
    }

    fn view(&self, key: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("fixture is safetensors");
        let t = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }

    pub fn f32(&self, key: &str) -> (Vec<f32>, Vec<usize>) {
        let (dtype, shape, data) = self.view(key);
        assert_eq!(dtype, Dtype::F32, "{key}");
        let v = data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (v, shape)
    }

    pub fn u8(&self, key: &str) -> Vec<u8> {
        let (dtype, _, data) = self.view(key);
        assert_eq!(dtype, Dtype::U8, "{key}");
        data
    }

    pub fn matrix(&self, key: &str, device: &Device) -> Tensor<2> {
        let (v, shape) = self.f32(key);
        Tensor::from_data(TensorData::new(v, [shape[0], shape[1]]), device)
    }
}

/// The device under test: `LOFTQ_DEVICE` (cpu by default; `wgpu` in CI's second pass).
pub fn device() -> Device {
    DeviceSpec::from_env().device().expect("device")
}

/// A deterministic pseudo-Gaussian matrix (Box–Muller over a 64-bit LCG).
pub fn gaussian(rows: usize, cols: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut uniform = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..rows * cols)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32 * std
        })
        .collect()
}
