//! The truncated-SVD flags, one set for every command that fits adapters (`init`, `refine`).

use clap::{Args, ValueEnum};
use loftq_core::lowrank::{RsvdConfig, SvdMethod};

#[derive(Clone, Copy, ValueEnum)]
enum SvdArg {
    Randomized,
    Exact,
}

/// `--svd` and the randomized SVD's settings.
#[derive(Args, Clone)]
pub(crate) struct SvdArgs {
    /// Truncated SVD: randomized (fast, products on the device) or exact (host, faer: the
    /// optimum, slow on large matrices).
    #[arg(long, value_enum, default_value_t = SvdArg::Randomized)]
    svd: SvdArg,
    /// Randomized SVD: extra sketch columns (default max(16, rank)).
    #[arg(long)]
    oversample: Option<usize>,
    /// Randomized SVD: power iterations of a cold start (the first LoftQ iteration).
    #[arg(long, default_value_t = RsvdConfig::default().power_iters)]
    power_iters: usize,
    /// Randomized SVD: power iterations of the later LoftQ iterations of `init`, which start
    /// from the previous iteration's singular vectors (`refine` has none).
    #[arg(long, default_value_t = RsvdConfig::default().warm_power_iters)]
    warm_power_iters: usize,
    /// Randomized SVD: extra sketch columns of the later LoftQ iterations of `init`.
    #[arg(long, default_value_t = RsvdConfig::default().warm_oversample)]
    warm_oversample: usize,
}

impl SvdArgs {
    /// The method these flags ask for, its random sketch seeded with `seed`.
    pub(crate) fn method(&self, seed: u64) -> SvdMethod {
        match self.svd {
            SvdArg::Exact => SvdMethod::Exact,
            SvdArg::Randomized => SvdMethod::Randomized(RsvdConfig {
                oversample: self.oversample,
                power_iters: self.power_iters,
                warm_power_iters: self.warm_power_iters,
                warm_oversample: self.warm_oversample,
                seed,
            }),
        }
    }
}
