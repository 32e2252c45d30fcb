//! `vzeroupper` after faer's kernels.
//!
//! faer's AVX-512 matrix kernels return with the upper halves of the vector registers dirty.
//! Until a `vzeroupper` runs, every legacy-SSE instruction on that thread carries a false
//! dependency on them, and this crate, Burn and the standard library are compiled for baseline
//! x86-64, whose float code is SSE. Measured on the project's Xeon: drawing 262,144 Gaussian
//! samples took 57 ms after a faer product and 7.5 ms after this call.

#![allow(unsafe_code)]

/// Clears the upper register state on this thread and, with the `flex` feature, on every
/// rayon worker thread (faer's products and factorizations run on both).
pub fn clear_upper_state() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        zero_upper();
        #[cfg(feature = "flex")]
        rayon::broadcast(|_| zero_upper());
    }
}

/// [`clear_upper_state`] for the calling thread only (after a product inside a rayon task).
pub fn clear_upper_state_here() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        zero_upper();
    }
}

#[cfg(target_arch = "x86_64")]
fn zero_upper() {
    // SAFETY: the caller checked that the CPU has AVX, the only feature the function needs.
    unsafe { zero_upper_avx() }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn zero_upper_avx() {
    // Clears bits 128 and up of the vector registers, which no code relies on across a call.
    std::arch::x86_64::_mm256_zeroupper()
}
