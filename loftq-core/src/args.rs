//! Command-line parsers for the settings of this crate (feature `clap`): the enums that carry
//! a configuration parse by their name with that configuration's defaults, and [`SvdArgs`] is
//! the one set of truncated-SVD flags that every command fitting adapters flattens in.

use clap::ValueEnum;
use clap::builder::PossibleValue;

use crate::calib::{BaseQuantizer, GptqConfig};
use crate::lowrank::{RsvdConfig, SvdMethod};

/// `--svd` and the randomized SVD's settings.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct SvdArgs {
    /// Truncated SVD: randomized (fast, products on the device) or exact (host, faer: the
    /// optimum, slow on large matrices).
    #[arg(long, value_enum, default_value = "randomized")]
    pub svd: SvdMethod,
    /// The randomized SVD's sketch and power iterations.
    #[command(flatten)]
    pub rsvd: RsvdConfig,
}

impl SvdArgs {
    /// The method these flags ask for, its random sketch seeded with `seed`.
    pub fn method(&self, seed: u64) -> SvdMethod {
        match self.svd {
            SvdMethod::Exact => SvdMethod::Exact,
            SvdMethod::Randomized(_) => SvdMethod::Randomized(RsvdConfig { seed, ..self.rsvd }),
        }
    }
}

/// `exact` or `randomized` (with [`RsvdConfig::DEFAULT`]; [`SvdArgs`] sets the rest).
impl ValueEnum for SvdMethod {
    fn value_variants<'a>() -> &'a [Self] {
        &[SvdMethod::Randomized(RsvdConfig::DEFAULT), SvdMethod::Exact]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            SvdMethod::Randomized(_) => PossibleValue::new("randomized")
                .help("randomized range finder with power iterations"),
            SvdMethod::Exact => PossibleValue::new("exact").help("full SVD on the host (faer)"),
        })
    }
}

/// `rtn` or `gptq` (with [`GptqConfig::DEFAULT`]).
impl ValueEnum for BaseQuantizer {
    fn value_variants<'a>() -> &'a [Self] {
        &[BaseQuantizer::Rtn, BaseQuantizer::Gptq(GptqConfig::DEFAULT)]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            BaseQuantizer::Rtn => {
                PossibleValue::new("rtn").help("round to nearest, block by block")
            }
            BaseQuantizer::Gptq(_) => PossibleValue::new("gptq")
                .help("column by column, errors compensated through the calibration statistics"),
        })
    }
}
