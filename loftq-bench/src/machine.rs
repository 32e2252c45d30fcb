//! What a benchmark ran on: CPU, memory, GPU and driver, and the commit measured.

use std::process::Command;

use loftq_core::DeviceSpec;
use serde::{Deserialize, Serialize};

/// The machine of a run (Linux files where they exist, `unknown` elsewhere).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model name.
    pub cpu: String,
    /// Logical cores this process may use.
    pub cores: usize,
    /// Total memory.
    pub memory_bytes: u64,
    /// Operating system.
    pub os: String,
    /// NVIDIA GPUs and driver (`nvidia-smi`), if any.
    pub nvidia: Option<String>,
    /// Installed Vulkan drivers (ICD files), which WGPU chooses from on Linux.
    pub vulkan_drivers: Vec<String>,
    /// Whether the build has Burn's fusion and autotuning (the `tuned` feature).
    #[serde(default)]
    pub tuned_kernels: bool,
}

impl Machine {
    /// Reads this machine's description; `spec` decides which GPU facts are relevant.
    pub fn read(spec: DeviceSpec) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown".into(), |(_, v)| v.trim().to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_bytes = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024);
        let os = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("PRETTY_NAME=")
                        .map(|v| v.trim_matches('"').to_string())
                })
            })
            .unwrap_or_else(|| std::env::consts::OS.to_string());
        let nvidia = output(
            "nvidia-smi",
            &[
                "--query-gpu=name,driver_version,memory.total",
                "--format=csv,noheader",
            ],
        );
        let vulkan_drivers = match spec {
            DeviceSpec::Wgpu | DeviceSpec::WgpuGpu(_) => vulkan_drivers(),
            _ => Vec::new(),
        };
        Self {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes,
            os,
            nvidia,
            vulkan_drivers,
            tuned_kernels: loftq_core::device::TUNED_KERNELS,
        }
    }

    /// One line for tables.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}, {} cores, {:.0} GiB",
            self.cpu,
            self.cores,
            self.memory_bytes as f64 / (1u64 << 30) as f64
        );
        if let Some(g) = &self.nvidia {
            s += &format!("; GPU {g}");
        }
        if !self.vulkan_drivers.is_empty() {
            s += &format!(
                "; Vulkan drivers installed: {}",
                self.vulkan_drivers.join(", ")
            );
        }
        if self.tuned_kernels {
            s += "; build with Burn's fusion and autotuning";
        }
        s
    }
}

/// The commit measured: short hash, `-dirty` with uncommitted changes to anything but results
/// and documentation.
pub fn commit() -> String {
    let Some(hash) = output("git", &["rev-parse", "--short=10", "HEAD"]) else {
        return "unknown".into();
    };
    let status = [
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":!bench/results",
        ":!*.md",
    ];
    let dirty = output("git", &status).is_some_and(|s| !s.is_empty());
    if dirty { format!("{hash}-dirty") } else { hash }
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn vulkan_drivers() -> Vec<String> {
    let mut v = Vec::new();
    for dir in ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let label = match name.split('_').next().unwrap_or("") {
                    "lvp" => "lavapipe (Mesa, software)".to_string(),
                    "radeon" => "RADV (Mesa, AMD)".to_string(),
                    "intel" => "ANV (Mesa, Intel)".to_string(),
                    "nvidia" => "NVIDIA".to_string(),
                    _ => name.trim_end_matches(".json").to_string(),
                };
                if !v.contains(&label) {
                    v.push(label);
                }
            }
        }
    }
    v.sort();
    v
}
