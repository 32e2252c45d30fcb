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

/// Defines `fn $name(args) -> ret { body }`: the portable body compiled a second and third
/// time for AVX-512 and AVX2 + FMA, the copy chosen when the function is called ([`level`]).
/// The one dispatch mechanism of the workspace's SIMD kernels.
///
/// The release build targets baseline x86-64 (SSE2), where element-wise loops run 4 lanes
/// wide; the same code compiled for AVX-512 runs 16 wide. Rust never contracts `a·b + c` into
/// an FMA and the lane structure of every reduction is written out in the source, so all three
/// copies give the same bits. Under `cfg(test)` a module `$name` holds the portable copy alone
/// (`$name::portable`), for tests that compare it with the dispatched one. A body that calls
/// other functions gets their vector code only if they are `#[inline(always)]`.
#[macro_export]
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(unsafe_code)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                match $crate::simd::level() {
                    // SAFETY: `level` checked every feature each copy was compiled with.
                    $crate::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::simd::Level::Portable => {}
                }
            }
            portable($($arg),*)
        }

        /// The portable copy alone, for tests that compare it with the dispatched one.
        #[cfg(test)]
        #[allow(dead_code)]
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            pub(crate) fn portable($($arg: $ty),*) $(-> $ret)? $body
        }
    };
}
