//! The fuzzer's seeds, kept corpus and crash reproducers (`fuzz/{seeds,corpus,crashes}/`,
//! written by `cargo xtask fuzz`), run through the same targets: an input that once crashed a
//! reader must now be a clean error, and every seed must still be read whole.

use std::path::{Path, PathBuf};

use loftq_models::fuzz::TARGETS;

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join(target);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn every_kept_fuzz_input_is_read_without_a_panic() {
    for (target, run) in TARGETS {
        let seeds = inputs("seeds", target);
        assert!(
            !seeds.is_empty(),
            "no seeds for `{target}` under fuzz/seeds"
        );
        let mut n = 0;
        for kind in ["seeds", "corpus", "crashes"] {
            for path in inputs(kind, target) {
                let bytes = std::fs::read(&path).unwrap();
                // A panic here names the input through the test's output.
                eprintln!("{target}: {}", path.display());
                let accepted = run(&bytes);
                // A seed is a well-formed file: the reader must take all of it.
                assert!(
                    accepted || kind != "seeds",
                    "{} was refused",
                    path.display()
                );
                n += 1;
            }
        }
        eprintln!("{target}: {n} inputs");
    }
}
