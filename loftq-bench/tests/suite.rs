//! `loftq-bench suite --profile smoke` end to end on the device of `LOFTQ_DEVICE` (cpu by
//! default; CI runs it on WGPU too), then `loftq-bench report` on its record.

use std::path::PathBuf;
use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loftq-bench"))
}

/// Runs `cmd` and asserts that it succeeded, showing its stderr if not.
fn succeed(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn smoke_suite_runs_and_reports() {
    let device = std::env::var("LOFTQ_DEVICE").unwrap_or_else(|_| "cpu".into());
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("suite-{device}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("suite.json");
    succeed(
        bench()
            .args([
                "suite",
                "--profile",
                "smoke",
                "--device",
                &device,
                "--scratch",
            ])
            .arg(dir.join("scratch"))
            .arg("--json")
            .arg(&json),
    );

    let run: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(run["backend"], device.as_str());
    let cases = run["cases"].as_array().unwrap();
    for suite in ["quant", "svd", "loftq", "init", "train"] {
        assert!(cases.iter().any(|c| c["suite"] == suite), "no {suite} case");
    }
    let find = |name: &str| {
        cases
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no case {name}"))
    };
    for c in cases {
        let t = &c["timing"];
        let (lo, mid, hi) = (
            t["min_s"].as_f64().unwrap(),
            t["median_s"].as_f64().unwrap(),
            t["max_s"].as_f64().unwrap(),
        );
        assert!(0.0 < lo && lo <= mid && mid <= hi, "{c}");
    }
    // The errors are the algorithms' own: NF4 plain, LoftQ better than plain, exact SVD best.
    let err = |name: &str| find(name)["error"].as_f64().unwrap();
    assert!((err("nf4 quantize+dequantize 256²") - 0.092).abs() < 0.002);
    let plain = err("nf2 quantize+dequantize 256²");
    assert!(err("128x128 nf2-b64 r8 T5 exact") < err("128x128 nf2-b64 r8 T1 exact"));
    assert!(err("128x128 nf2-b64 r8 T5 randomized") < plain);
    let exact = err("128x128 r8 exact");
    for p in [0, 1, 2, 4] {
        assert!(err(&format!("128x128 r8 randomized p{p}")) >= exact * 0.999);
    }
    // The calibrated start reports its weighted error and its time against LoftQ's.
    let calib = find("smollm2-135m (1 layers) nf2 r16 T5 calibrated, 512 tokens");
    let e = calib["error"].as_f64().unwrap();
    assert!(0.0 < e && e < 1.0, "{calib}");
    assert!(
        calib["metric"]
            .as_str()
            .unwrap()
            .contains("× plain LoftQ's")
    );

    let report = dir.join("report");
    succeed(
        bench()
            .args(["report", "--input"])
            .arg(&json)
            .arg("--input")
            .arg(&json)
            .arg("--out")
            .arg(&report)
            .args(["--skipped", "cuda: none here"]),
    );
    let md = std::fs::read_to_string(report.join("bench.md")).unwrap();
    assert!(
        md.contains("## loftq")
            && md.contains("1.00× faster, error +0.0000")
            && md.contains("Skipped: cuda")
    );
    for svg in ["loftq-time.svg", "svd-error.svg"] {
        let s = std::fs::read_to_string(report.join(svg)).unwrap();
        assert!(s.starts_with("<svg") && s.contains("<circle"), "{svg}");
    }
}

#[test]
fn report_rejects_a_file_that_is_not_a_record() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("suite-bad");
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.json");
    std::fs::write(&bad, "{\"cases\": 3}").unwrap();
    let out = bench()
        .args(["report", "--input"])
        .arg(&bad)
        .arg("--out")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.json") && err.contains("not a suite record"),
        "{err}"
    );
}
