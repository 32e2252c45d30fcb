//! Files other tools wrote: PyTorch `.bin` state dicts (`torch.save`'s zip archive and
//! pickle, as PEFT's `adapter_model.bin`), read as saved and refused when hostile; a model
//! directory with only a SentencePiece model.

mod common;

use std::path::Path;

use common::{fixture, scratch};
use loftq_models::fuzz::{torch_archive, torch_bin};
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

/// The fuzzer's `pickle` target reads a pickle in an archive of its own making: `state.bin`'s
/// pickle there gives the same tensors by name and shape, its views read from the target's
/// storages; a pickle naming a storage the archive lacks is refused by name.
#[test]
fn the_pickle_targets_archive_reads_as_torch_save_s() {
    let dir = fixture("torch-bin");
    let saved = TorchState::open(&dir.join("state.bin")).unwrap();
    let pkl = std::fs::read(dir.join("state.pkl")).unwrap();
    let work = scratch("pickle-archive");
    std::fs::write(work.join("state.bin"), torch_archive(&pkl)).unwrap();
    let built = TorchState::open(&work.join("state.bin")).unwrap();
    assert!(saved.names().eq(built.names()));
    for name in saved.names() {
        let (a, b) = (saved.f32(name).unwrap(), built.f32(name).unwrap());
        assert_eq!(a.shape, b.shape, "{name}");
    }
    // Storage keys are the pickle's strings `'0'`…`'7'` (BINUNICODE, length 1): `'7'` made
    // `'X'`, a storage the archive does not hold.
    let key = pkl
        .windows(6)
        .position(|w| w == b"X\x01\x00\x00\x007")
        .unwrap();
    let mut bad = pkl.clone();
    bad[key + 5] = b'X';
    std::fs::write(work.join("bad.bin"), torch_archive(&bad)).unwrap();
    let state = TorchState::open(&work.join("bad.bin")).unwrap();
    let errors: Vec<String> = (state.names())
        .filter_map(|n| state.f32(n).err().map(|e| e.to_string()))
        .collect();
    assert!(
        errors.len() == 1 && errors[0].contains("archive/data/X"),
        "{errors:?}"
    );
    std::fs::remove_dir_all(&work).unwrap();
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
