//! Faults while writing: a full disk (the file-size limit `ulimit -f`, with `SIGXFSZ`
//! ignored so that writes fail with `EFBIG` as on a full file system) and `SIGKILL` at spread
//! points of `init`, `train` and `convert`. After each: a clean error (exit 1 to 100, no
//! panic), every file under its final name whole (byte-identical to an undisturbed run), and
//! `--resume` (or a rerun) giving byte-identical outputs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{s, skip, tiny_gguf, tiny_model};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loftq-faults-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn init_args(model: &Path, out: &Path) -> Vec<String> {
    let v = ["init", "--model", s(model), "--out", s(out), "--rank", "4"];
    let mut v: Vec<String> = v.map(String::from).to_vec();
    v.extend(["--bits", "nf2", "--iters", "3"].map(String::from));
    v
}

fn train_args(root: &Path, model: &Path, out: &Path) -> Vec<String> {
    let text = root.join("text.txt");
    [
        "train",
        "--model",
        s(model),
        "--text",
        s(&text),
        "--out",
        s(out),
        "--steps",
        "4",
        "--batch",
        "1",
        "--seq",
        "16",
        "--rank",
        "4",
        "--save-every",
        "1",
        "--keep-checkpoints",
        "10",
    ]
    .map(String::from)
    .to_vec()
}

/// Runs the CLI with `args`, optionally under a file-size limit of `blocks` (512 bytes each).
fn run(args: &[String], blocks: Option<u64>) -> (Option<i32>, String) {
    let bin = env!("CARGO_BIN_EXE_loftq");
    let mut cmd = match blocks {
        None => {
            let mut c = Command::new(bin);
            c.args(args);
            c
        }
        Some(n) => {
            // An ignored signal stays ignored across exec: writes past the limit fail.
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("ulimit -f {n}; trap '' XFSZ; exec \"$0\" \"$@\""))
                .arg(bin)
                .args(args);
            c
        }
    };
    let out = cmd.stdout(Stdio::null()).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Starts the CLI and kills it (`SIGKILL`) after `after`; false if it had finished by then.
fn run_killed(args: &[String], after: Duration) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_loftq"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    running
}

/// What a run leaves under final names: relative path, length and a hash of the bytes. Work in
/// progress (`.loftq-partial/`, temporary `.name.tmp-*` siblings) is not final. JSON files
/// must be whole JSON; `report.json`, `history.json` and `trainer_state.json` hold timings, so
/// their bytes are not compared.
fn finals(dir: &Path) -> Vec<(String, usize, u64)> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue;
            }
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .to_string();
            let bytes = std::fs::read(&path).unwrap();
            if name.ends_with(".json") {
                serde_json::from_slice::<serde_json::Value>(&bytes)
                    .unwrap_or_else(|e| panic!("{rel} is not whole JSON: {e}"));
                if ["report.json", "history.json", "trainer_state.json"].contains(&name.as_str()) {
                    v.push((rel, 0, 0));
                    continue;
                }
            }
            let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            v.push((rel, bytes.len(), hash));
        }
    }
    v.sort();
    v
}

/// Every final file of `dir` equals the same file of the undisturbed run.
fn assert_whole(dir: &Path, reference: &[(String, usize, u64)], what: &str) {
    for f in finals(dir) {
        assert!(
            reference.contains(&f),
            "{what}: {} ({} bytes) is not the undisturbed run's",
            f.0,
            f.1
        );
    }
}

/// The largest file of an output, in blocks of 512 bytes.
fn largest_blocks(files: &[(String, usize, u64)]) -> u64 {
    files.iter().map(|f| f.1).max().unwrap_or(0) as u64 / 512
}

fn assert_clean(code: Option<i32>, err: &str, what: &str) {
    assert!(!err.contains("panicked"), "{what}: panic\n{err}");
    assert!(
        matches!(code, Some(0..=100)),
        "{what}: exit {code:?}\n{err}"
    );
}

/// File-size limits from one block to just under the largest output file, so that each kind
/// of file (plan, pieces, backbone, adapter, report) is the one that hits the limit in some
/// run.
fn limits(largest: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..8).map(|i| 1 + largest * i / 8).collect();
    v.push(largest.saturating_sub(1));
    v
}

#[test]
fn init_survives_a_full_disk_and_kills() {
    let root = scratch("init");
    let model = tiny_model(&root);
    let reference = root.join("reference");
    let (code, err) = run(&init_args(&model, &reference), None);
    assert_eq!(code, Some(0), "{err}");
    let want = finals(&reference);
    assert!(want.iter().any(|f| f.0 == "model.safetensors"));

    for blocks in limits(largest_blocks(&want)) {
        let out = root.join(format!("full-{blocks}"));
        let what = format!("init under ulimit -f {blocks}");
        let (code, err) = run(&init_args(&model, &out), Some(blocks));
        assert_clean(code, &err, &what);
        assert_ne!(code, Some(0), "{what}: finished");
        assert!(
            err.contains(s(&out)),
            "{what}: error does not name the output\n{err}"
        );
        assert_whole(&out, &want, &what);
        // What a full disk left is resumed (or, with nothing kept, started again) to the
        // same bytes.
        let mut again = init_args(&model, &out);
        if out.join(".loftq-partial").is_dir() {
            assert!(
                err.contains("--resume"),
                "{what}: no word of --resume\n{err}"
            );
            again.push("--resume".into());
        }
        let (code, err) = run(&again, None);
        assert_eq!(code, Some(0), "{what}, resumed: {err}");
        assert_eq!(finals(&out), want, "{what}, resumed");
    }

    // Kills spread over the run's duration (and a little past it).
    let t = Instant::now();
    run(&init_args(&model, &root.join("timed")), None);
    let mut took = t.elapsed();
    // As in the train test: another sweep over half the time when too few were killed.
    let mut kills = 0;
    for round in 0..3 {
        for i in 0..12u32 {
            let out = root.join(format!("killed-{round}-{i}"));
            let what = format!("init killed after {i}/10 of {took:?}");
            let killed = run_killed(&init_args(&model, &out), took * i / 10);
            assert_whole(&out, &want, &what);
            let work = out.join(".loftq-partial").exists();
            // Killed between creating `out` and its work area: an empty `out`, which a plain
            // rerun takes as it is.
            if killed && out.exists() && !work && finals(&out).is_empty() {
                let (code, err) = run(&init_args(&model, &out), None);
                assert_eq!(code, Some(0), "{what}, rerun: {err}");
                assert_eq!(finals(&out), want, "{what}, rerun");
                continue;
            }
            // Killed after the work area was removed (the outputs were complete): finished.
            if !killed || (out.exists() && !work) {
                let state = format!("killed {killed}, out {}", out.exists());
                assert_eq!(finals(&out), want, "{what}: finished ({state})");
                continue;
            }
            kills += 1;
            let mut again = init_args(&model, &out);
            again.push("--resume".into());
            let (code, err) = run(&again, None);
            assert_eq!(code, Some(0), "{what}, resumed: {err}");
            assert_eq!(finals(&out), want, "{what}, resumed");
        }
        if kills >= 3 {
            break;
        }
        took /= 2;
    }
    assert!(
        kills >= 3,
        "only {kills} runs were killed before they finished"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn train_survives_a_full_disk_and_kills() {
    let root = scratch("train");
    let model = tiny_model(&root);
    let reference = root.join("reference");
    let (code, err) = run(&train_args(&root, &model, &reference), None);
    assert_eq!(code, Some(0), "{err}");
    let want = finals(&reference);
    let resumed = |out: &Path, what: &str| {
        let mut again = train_args(&root, &model, out);
        again.push("--resume".into());
        let (code, err) = run(&again, None);
        assert_eq!(code, Some(0), "{what}, resumed: {err}");
        assert_eq!(finals(out), want, "{what}, resumed");
    };
    for blocks in limits(largest_blocks(&want)) {
        let out = root.join(format!("full-{blocks}"));
        let what = format!("train under ulimit -f {blocks}");
        let (code, err) = run(&train_args(&root, &model, &out), Some(blocks));
        assert_clean(code, &err, &what);
        assert_ne!(code, Some(0), "{what}: finished");
        assert_whole(&out, &want, &what);
        resumed(&out, &what);
    }
    let t = Instant::now();
    run(&train_args(&root, &model, &root.join("timed")), None);
    let mut took = t.elapsed();
    // The timed run may have shared the cores with this binary's other tests: when too few
    // runs were still going at their kill, sweep again over half the time.
    let mut kills = 0;
    for round in 0..3 {
        for i in 1..10u32 {
            let out = root.join(format!("killed-{round}-{i}"));
            let what = format!("train killed after {i}/10 of {took:?}");
            let killed = run_killed(&train_args(&root, &model, &out), took * i / 10);
            assert_whole(&out, &want, &what);
            if killed {
                kills += 1;
                resumed(&out, &what);
            }
        }
        if kills >= 3 {
            break;
        }
        took /= 2;
    }
    assert!(
        kills >= 3,
        "only {kills} runs were killed before they finished"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn convert_survives_a_full_disk_and_kills() {
    let root = scratch("convert");
    let gguf = root.join("tiny.gguf");
    std::fs::write(&gguf, tiny_gguf()).unwrap();
    let args =
        |out: &Path| -> Vec<String> { vec!["convert".into(), s(&gguf).into(), s(out).into()] };
    let reference = root.join("reference");
    let (code, err) = run(&args(&reference), None);
    assert_eq!(code, Some(0), "{err}");
    let want = finals(&reference);
    for blocks in limits(largest_blocks(&want)) {
        let out = root.join(format!("full-{blocks}"));
        let what = format!("convert under ulimit -f {blocks}");
        let (code, err) = run(&args(&out), Some(blocks));
        assert_clean(code, &err, &what);
        assert_ne!(code, Some(0), "{what}: finished");
        assert_whole(&out, &want, &what);
    }
    let t = Instant::now();
    run(&args(&root.join("timed")), None);
    let took = t.elapsed();
    for i in 0..10u32 {
        let out = root.join(format!("killed-{i}"));
        let _ = run_killed(&args(&out), took * i / 8);
        assert_whole(
            &out,
            &want,
            &format!("convert killed after {i}/8 of its run"),
        );
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// A file system too small for the output (a 256 kB tmpfs; needs root, as CI runs): `init` and
/// `train` refuse before any work, naming `--out`, the space free and the space needed.
#[test]
fn a_disk_too_small_is_refused_before_the_work() {
    let root = scratch("small-disk");
    let model = tiny_model(&root);
    let disk = root.join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs", s(&disk)])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|st| st.success());
    if !mounted {
        skip("cannot mount a small tmpfs here (needs root)");
        return;
    }
    let out = disk.join("out");
    let t = Instant::now();
    let (code, err) = run(&init_args(&model, &out), None);
    let took = t.elapsed();
    // train: five checkpoints of the adapter and AdamW's moments do not fit either.
    let run_dir = disk.join("run");
    let (train_code, train_err) = run(&train_args(&root, &model, &run_dir), None);
    let _ = Command::new("umount").arg(&disk).status();
    assert_clean(code, &err, "init on a small disk");
    assert_ne!(code, Some(0), "init on a small disk finished");
    for word in ["--out", "free", "writes about"] {
        assert!(err.contains(word), "no `{word}` in\n{err}");
    }
    assert!(!out.exists(), "init on a small disk left {}", out.display());
    assert!(took < Duration::from_secs(5), "refused after {took:?}");
    assert_clean(train_code, &train_err, "train on a small disk");
    assert_ne!(train_code, Some(0), "train on a small disk finished");
    assert!(train_err.contains("checkpoints"), "{train_err}");
    assert!(
        !run_dir.exists(),
        "train on a small disk left {}",
        run_dir.display()
    );
    std::fs::remove_dir_all(&root).unwrap();
}
