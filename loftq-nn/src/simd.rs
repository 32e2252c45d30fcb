//! [`multiversion!`]: a portable function body compiled a second and third time for AVX-512
//! and AVX2 + FMA, with the copy chosen when the function is called (runtime detection). The
//! release build targets baseline x86-64 (SSE2), where the element-wise kernels' loops run 4
//! lanes wide; the same code compiled for AVX-512 runs 16 wide. Rust never contracts `a·b + c`
//! into an FMA and the lane structure of every reduction is written out in the source, so all
//! three copies give the same bits.

/// Defines `fn $name(args) -> ret { body }` as described in the [module](self) documentation.
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
                match loftq_core::simd::level() {
                    // SAFETY: `level` checked every feature each copy was compiled with.
                    loftq_core::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    loftq_core::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    loftq_core::simd::Level::Portable => {}
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
