//! Which vector instructions the kernels may use, decided in one place for the workspace.
//!
//! Every multi-versioned kernel has an AVX-512 copy compiled with
//! `#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]` and an AVX2 copy
//! compiled with `#[target_feature(enable = "avx2,fma")]`, and enters a copy only when [`level`]
//! says the CPU has every one of its features.

use std::sync::OnceLock;

/// The widest kernel copy this CPU can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// AVX-512 F, BW, VL and DQ, with AVX2 and FMA.
    Avx512,
    /// AVX2 with FMA.
    Avx2,
    /// Neither: the portable code.
    Portable,
}

/// The [`Level`] of this CPU, detected once.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    use std::arch::is_x86_feature_detected as has;
    let avx2 = has!("avx2") && has!("fma");
    if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
        Level::Avx512
    } else if avx2 {
        Level::Avx2
    } else {
        Level::Portable
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Level {
    Level::Portable
}
