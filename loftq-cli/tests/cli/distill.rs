//! `loftq init --distill-steps` through the binary.

use super::*;

#[test]
fn init_distills_its_start_through_the_binary() {
    let dir = scratch("init-distill");
    let (model, text) = tiny_with_tokenizer(&dir);
    let out = dir.join("out");
    let (m, o, t) = (
        model.to_str().unwrap(),
        out.to_str().unwrap(),
        text.to_str().unwrap(),
    );
    let args = [
        "init",
        "--model",
        m,
        "--out",
        o,
        "--bits",
        "nf2",
        "--rank",
        "4",
        "--iters",
        "1",
        "--calibration",
        t,
        "--calibration-tokens",
        "256",
        "--calibration-seq",
        "64",
        "--distill-steps",
        "3",
        "--distill-seq",
        "32",
        "--distill-batch",
        "2",
    ];
    let run = loftq_output(&args);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("distilled 3 steps"), "{stdout}");
    let report = std::fs::read_to_string(out.join("report.json")).unwrap();
    assert!(report.contains("\"distill\""), "{report}");
    assert!(out.join("adapter/adapter_model.safetensors").is_file());
    assert!(!out.join(".loftq-partial").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
