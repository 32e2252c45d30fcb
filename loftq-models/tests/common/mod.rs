//! Shared helpers of the integration tests.
#![allow(dead_code)]

mod skip;
pub use skip::skip;

use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor, TensorData};
use loftq_core::DeviceSpec;
use loftq_models::nn::Llama;

/// A fixture under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The device under test: `LOFTQ_DEVICE` (cpu by default; `wgpu` in CI's second pass).
pub fn device() -> Device {
    DeviceSpec::from_env().device().expect("device")
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loftq-models-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A file fetched by `cargo xtask assets` (`$LOFTQ_ASSETS`, else `~/.cache/loftq-assets`),
/// or `None` after [`skip`]: tests that need it skip. With `LOFTQ_REQUIRE_ASSETS` set (CI does
/// after fetching them) a missing asset fails the test instead.
pub fn asset(rel: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("LOFTQ_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/loftq-assets")
        });
    let path = dir.join(rel);
    if path.is_file() {
        return Some(path);
    }
    let reason = format!(
        "{} is missing; run `cargo xtask assets` (needs PyPI) to fetch it",
        path.display()
    );
    assert!(
        std::env::var_os("LOFTQ_REQUIRE_ASSETS").is_none(),
        "{reason} (LOFTQ_REQUIRE_ASSETS is set: the assets were fetched, so this test must run)"
    );
    skip(&reason);
    None
}

/// Token ids `[batch, seq]` on the test device.
pub fn ids(v: Vec<i32>, batch: usize, seq: usize) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(v, [batch, seq]), &device())
}

/// Logits of `model` for `ids`, flattened.
pub fn logits(model: &Llama, ids: Tensor<2, Int>) -> Vec<f32> {
    loftq_models::eval::host_logits(model, ids)
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The tiny Llama fixture with a byte-level tokenizer (its vocabulary is 256), and a text.
pub fn model_and_text(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-llama").join(f), model.join(f)).unwrap();
    }
    let tok = loftq_models::tokenizer::byte_level_json();
    std::fs::write(model.join("tokenizer.json"), tok.to_string()).unwrap();
    let text = dir.join("text.txt");
    let line = "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. ";
    std::fs::write(&text, line.repeat(20)).unwrap();
    (model, text)
}

/// `loftq init` on the device under test.
pub fn run_init_here(
    spec: &loftq_models::init::InitSpec,
    resume: bool,
) -> loftq_models::Result<loftq_models::init::Report> {
    loftq_models::init::run_init(spec, &[device()], resume, &mut |_| {})
}

/// The bytes of each of `files` under `dir`, for byte-identity checks.
pub fn read_files(dir: &std::path::Path, files: &[&str]) -> Vec<Vec<u8>> {
    files
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect()
}

/// llama.cpp's vocabulary file `name` (`fixtures/vocab/<name>.gguf.gz`) unpacked into `dir`;
/// its path.
pub fn vocab_gguf(name: &str, dir: &std::path::Path) -> PathBuf {
    use std::io::Read;
    let gz = std::fs::File::open(fixture("vocab").join(format!("{name}.gguf.gz"))).unwrap();
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut bytes)
        .unwrap();
    let path = dir.join(format!("{name}.gguf"));
    std::fs::write(&path, bytes).unwrap();
    path
}
