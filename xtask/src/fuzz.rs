//! `cargo xtask fuzz [--seconds N] [--targets a,b] [--jobs J]`: AFL++ on every file reader.
//!
//! Builds `fuzz/` with `cargo afl` (instrumented, overflow checks on) into
//! `$CARGO_TARGET_DIR/afl`, rewrites the seeds (`fuzz/seeds/<target>/`), then runs `afl-fuzz`
//! for N seconds per target (`jobs` targets at a time) on the seeds plus the kept corpus. After
//! the run it keeps a minimized corpus (`fuzz/corpus/<target>/`, by `afl-cmin`) and copies every
//! crash and hang to `fuzz/crashes/<target>/`. `loftq-models/tests/fuzz_corpus.rs` runs all
//! three folders through the same targets on every `cargo xtask test`. The figures of the run
//! go to stderr and to the top of `fuzz/last-run.md`, above the runs before it.
//!
//! Needs `cargo install cargo-afl` and `cargo afl config --build` once (AFL++ from source).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

const TARGETS: &[&str] = &[
    "safetensors",
    "gguf",
    "config",
    "tokenizer",
    "adapter",
    "torch_bin",
    "pickle",
];
/// The title of `fuzz/last-run.md`, above the last run's figures and the runs before it.
const TITLE: &str = "# Last fuzz run\n\n";
const USAGE: &str =
    "usage: cargo xtask fuzz [--seconds N (600)] [--targets a,b] [--jobs J (cores)]";

struct Options {
    seconds: u64,
    targets: Vec<String>,
    jobs: usize,
}

fn options(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        seconds: 600,
        targets: TARGETS.iter().map(|t| t.to_string()).collect(),
        jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value\n{USAGE}"));
        match a.as_str() {
            "--seconds" => o.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--jobs" => o.jobs = value()?.parse().map_err(|e| format!("--jobs: {e}"))?,
            "--targets" => o.targets = value()?.split(',').map(str::to_string).collect(),
            other => return Err(format!("fuzz: unknown argument `{other}`\n{USAGE}")),
        }
    }
    if let Some(t) = o.targets.iter().find(|t| !TARGETS.contains(&t.as_str())) {
        return Err(format!(
            "fuzz: no target `{t}`; targets: {}",
            TARGETS.join(",")
        ));
    }
    if o.jobs == 0 || o.seconds == 0 {
        return Err(format!(
            "fuzz: --jobs and --seconds must be positive\n{USAGE}"
        ));
    }
    Ok(o)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cargo_afl() -> Command {
    let mut c = super::cargo();
    c.arg("afl");
    c
}

/// One finished target's figures, from AFL's `fuzzer_stats`.
struct Figures {
    target: String,
    execs: u64,
    execs_per_sec: f64,
    edges: String,
    coverage: String,
    corpus: usize,
    crashes: usize,
    hangs: usize,
    minutes: f64,
}

pub fn run(args: &[String]) -> Result<(), String> {
    let o = options(args)?;
    let probe = cargo_afl().arg("--version").output();
    if !probe.is_ok_and(|p| p.status.success()) {
        return Err("fuzz: `cargo afl` is missing: cargo install cargo-afl && \
                    cargo afl config --build"
            .into());
    }
    let root = root();
    let fuzz = root.join("fuzz");
    let target = super::target_dir().join("afl");
    super::run(
        "build the fuzz harness",
        cargo_afl()
            .args(["build", "--release"])
            .current_dir(&fuzz)
            .env("CARGO_TARGET_DIR", &target),
    )?;
    let bin = target.join("release/loftq-fuzz");
    super::run(
        "write the seeds",
        Command::new(&bin).arg("--seeds").arg(fuzz.join("seeds")),
    )?;
    let work = target.join("afl-runs");
    let _ = std::fs::remove_dir_all(&work);
    // Readers take paths: the harness writes each input to a file, on tmpfs when there is one.
    let tmp = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let mut figures = Vec::new();
    for batch in o.targets.chunks(o.jobs) {
        let started = Instant::now();
        let mut children: Vec<(String, Child)> = Vec::new();
        for t in batch {
            let input = work.join(t).join("in");
            gather(
                &[fuzz.join("seeds").join(t), fuzz.join("corpus").join(t)],
                &input,
            )?;
            eprintln!("xtask: fuzzing `{t}` for {} s", o.seconds);
            let child = cargo_afl()
                .arg("fuzz")
                .args(["-i", &s(&input), "-o", &s(&work.join(t).join("out"))])
                .args(["-V", &o.seconds.to_string(), "-t", "2000", "-m", "4096"])
                .arg("--")
                .arg(&bin)
                .arg(t)
                .env("AFL_NO_UI", "1")
                .env("AFL_SKIP_CPUFREQ", "1")
                .env("AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES", "1")
                .env("AFL_NO_AFFINITY", "1")
                .env("TMPDIR", &tmp)
                .stdout(Stdio::null())
                .stderr(Stdio::from(
                    std::fs::File::create(work.join(t).join("afl.log"))
                        .map_err(|e| e.to_string())?,
                ))
                .spawn()
                .map_err(|e| format!("afl-fuzz: {e}"))?;
            children.push((t.clone(), child));
        }
        for (t, mut child) in children {
            let status = child.wait().map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!(
                    "afl-fuzz on `{t}` failed ({status}); see {}",
                    work.join(&t).join("afl.log").display()
                ));
            }
            let minutes = started.elapsed().as_secs_f64() / 60.0;
            figures.push(keep(&bin, &fuzz, &work.join(&t), &t, minutes)?);
        }
    }
    report(&fuzz, &o, &figures)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Copies the files of `from` (those that exist) into a fresh `to`.
fn gather(from: &[PathBuf], to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    for (i, dir) in from.iter().enumerate() {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let dest = to.join(format!("{i}-{}", e.file_name().to_string_lossy()));
            std::fs::copy(e.path(), &dest).map_err(|e| format!("{}: {e}", dest.display()))?;
        }
    }
    Ok(())
}

/// Keeps the minimized corpus and the crashes of one target; returns its figures.
fn keep(bin: &Path, fuzz: &Path, run: &Path, t: &str, minutes: f64) -> Result<Figures, String> {
    let out = run.join("out/default");
    let stats = std::fs::read_to_string(out.join("fuzzer_stats"))
        .map_err(|e| format!("{}: {e}", out.join("fuzzer_stats").display()))?;
    let stat = |key: &str| -> String {
        stats
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == key).then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    let mut found = 0;
    let mut hangs = 0;
    for (sub, count) in [("crashes", &mut found), ("hangs", &mut hangs)] {
        let Ok(entries) = std::fs::read_dir(out.join(sub)) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.starts_with("id:") {
                continue;
            }
            *count += 1;
            let dir = fuzz.join("crashes").join(t);
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let safe: String = name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            std::fs::copy(e.path(), dir.join(format!("{sub}-{safe}")))
                .map_err(|e| e.to_string())?;
        }
    }
    // The queue minimized to the inputs that keep its coverage.
    let corpus = fuzz.join("corpus").join(t);
    let fresh = run.join("cmin");
    super::run(
        &format!("minimize the `{t}` corpus"),
        cargo_afl()
            .arg("cmin")
            .args(["-i", &s(&out.join("queue")), "-o", &s(&fresh), "-t", "2000"])
            .arg("--")
            .arg(bin)
            .arg(t)
            .env("AFL_SKIP_BIN_CHECK", "1")
            .stdout(Stdio::null()),
    )?;
    let _ = std::fs::remove_dir_all(&corpus);
    std::fs::create_dir_all(&corpus).map_err(|e| e.to_string())?;
    let mut kept = 0;
    for e in std::fs::read_dir(&fresh)
        .map_err(|e| e.to_string())?
        .flatten()
    {
        let bytes = std::fs::read(e.path()).map_err(|e| e.to_string())?;
        std::fs::write(corpus.join(format!("{:016x}", fnv(&bytes))), bytes)
            .map_err(|e| e.to_string())?;
        kept += 1;
    }
    Ok(Figures {
        target: t.to_string(),
        execs: stat("execs_done").parse().unwrap_or(0),
        execs_per_sec: stat("execs_per_sec").parse().unwrap_or(0.0),
        edges: format!("{}/{}", stat("edges_found"), stat("total_edges")),
        coverage: stat("bitmap_cvg"),
        corpus: kept,
        crashes: found,
        hangs,
        minutes,
    })
}

/// A content name for corpus files (FNV-1a), so reruns do not duplicate them.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn report(fuzz: &Path, o: &Options, figures: &[Figures]) -> Result<(), String> {
    let mut md = format!(
        "`cargo xtask fuzz --seconds {} --jobs {} --targets {}` (AFL++ through cargo-afl).\n\n\
         | target | minutes | executions | execs/s | edges | map coverage | corpus kept | crashes | hangs |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        o.seconds,
        o.jobs,
        o.targets.join(",")
    );
    for f in figures {
        md += &format!(
            "| {} | {:.1} | {} | {:.0} | {} | {} | {} | {} | {} |\n",
            f.target,
            f.minutes,
            f.execs,
            f.execs_per_sec,
            f.edges,
            f.coverage,
            f.corpus,
            f.crashes,
            f.hangs
        );
    }
    eprint!("{md}");
    // The runs before this one stay below it: a run of some targets is not the whole story.
    let path = fuzz.join("last-run.md");
    let earlier = std::fs::read_to_string(&path).unwrap_or_default();
    let earlier = earlier.strip_prefix(TITLE).unwrap_or(&earlier).trim();
    let mut file = format!("{TITLE}{md}");
    if !earlier.is_empty() {
        file += &format!("\nBefore it:\n\n{earlier}\n");
    }
    std::fs::write(&path, file).map_err(|e| e.to_string())?;
    let bad: usize = figures.iter().map(|f| f.crashes + f.hangs).sum();
    if bad > 0 {
        return Err(format!(
            "{bad} crash(es) or hang(s), copied to fuzz/crashes/: reproduce with \
             `cargo test -p loftq-models --test fuzz_corpus`"
        ));
    }
    Ok(())
}
