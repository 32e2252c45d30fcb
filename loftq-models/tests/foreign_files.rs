//! Files other tools wrote: PyTorch `.bin` state dicts (`torch.save`'s zip archive and
//! pickle, as PEFT's `adapter_model.bin`), read as saved and refused when hostile; a model
//! directory with only a SentencePiece model.

mod common;

use std::path::Path;

use common::{fixture, scratch};
use loftq_models::fuzz::torch_bin;
use loftq_models::io::{Checkpoint, TorchState};

/// PyTorch `.bin` files (`make_torch_bin.py`): dtypes, strided and shared views, a scalar,
/// read as torch.save wrote them; code in the pickle is refused, not run.
#[test]
fn torch_bin_state_dicts_read_as_saved_and_code_is_refused() {
    let dir = fixture("torch-bin");
    let state = TorchState::open(&dir.join("state.bin")).unwrap();
    let want = Checkpoint::open(&dir.join("state.safetensors")).unwrap();
    let names: Vec<&str> = state.names().collect();
    assert_eq!(names.len(), 9);
    for name in names {
        let (got, w) = (state.f32(name).unwrap(), want.f32(name).unwrap());
        assert_eq!((got.shape, got.data), (w.shape, w.data), "{name}");
    }
    let msg = TorchState::open(&dir.join("evil.bin"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("evil.bin") && msg.contains("system"), "{msg}");
    assert!(!Path::new("/tmp/loftq-evil").exists());
    let msg = TorchState::open(&dir.join("legacy.bin"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("legacy"), "{msg}");
    // Hostile pickles: nesting deep enough to overflow the stack, copying that grows with the
    // square of the file; refused at once.
    let refused = |name: &str| TorchState::open(&dir.join(name)).unwrap_err().to_string();
    let msg = refused("deep.bin");
    assert!(msg.contains("nested more than 32 deep"), "{msg}");
    let msg = refused("copies.bin");
    assert!(msg.contains("copies its containers too often"), "{msg}");

    // Cut short anywhere, or with any byte changed: an error or good values, never a panic
    // (through the fuzz target, which reads every tensor).
    let bytes = std::fs::read(dir.join("state.bin")).unwrap();
    assert!(torch_bin(&bytes));
    for len in (0..bytes.len()).step_by(7) {
        assert!(!torch_bin(&bytes[..len]), "cut to {len} bytes");
    }
    for at in (0..bytes.len()).step_by(3) {
        let mut b = bytes.clone();
        b[at] ^= 0xA5;
        torch_bin(&b);
    }
}

/// A model directory with only a SentencePiece model (DeBERTa-v3 as published) gets an error
/// that says how to make the tokenizer.json this tool reads.
#[test]
fn a_missing_tokenizer_json_says_how_to_write_one() {
    let dir = scratch("no-tokenizer");
    std::fs::write(dir.join("spm.model"), b"not read").unwrap();
    let err = loftq_models::Tokenizer::for_model(&dir)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no tokenizer.json")
            && err.contains("spm.model")
            && err.contains("save_pretrained"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
