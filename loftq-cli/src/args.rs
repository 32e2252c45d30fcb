//! Flags that several commands take: the adapter's shape and scale (`init`, `refine`), and
//! which modules get an adapter (`init`, `refine`, `train`).

use clap::Args;
use loftq_core::{InitScaling, LoraSpec};
use loftq_models::init::Target;
use loftq_models::init::plan::split_list;

use crate::error::{Result, invalid};

/// The adapter's shape and scale.
#[derive(Args)]
pub(crate) struct LoraArgs {
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// LoRA alpha (default: the rank, so s = 1).
    #[arg(long)]
    alpha: Option<f32>,
    /// rsLoRA scaling s = alpha/√r.
    #[arg(long)]
    rslora: bool,
    /// How the scale s enters the initial factors.
    #[arg(long, value_enum, default_value_t = InitScaling::Exact)]
    init_scaling: InitScaling,
}

impl LoraArgs {
    /// The adapter these flags describe; alpha is the rank when `--alpha` is absent.
    ///
    /// # Errors
    /// An alpha that is not a positive number.
    pub(crate) fn spec(&self) -> Result<LoraSpec> {
        let alpha = self.alpha.unwrap_or(self.rank as f32);
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(invalid(format!("--alpha {alpha} must be positive")));
        }
        Ok(LoraSpec {
            rank: self.rank,
            alpha,
            rslora: self.rslora,
            scaling: self.init_scaling,
        })
    }
}

/// Which modules get an adapter.
#[derive(Args)]
pub(crate) struct TargetArgs {
    /// all-linear (every linear weight the command can adapt: not embeddings or the LM head;
    /// for `refine` the quantized ones) or module names, comma-separated (PEFT's suffix rule:
    /// q_proj matches model.layers.0.self_attn.q_proj).
    #[arg(long, default_value = "all-linear")]
    target: String,
    /// Module names to leave alone, comma-separated (same rule).
    #[arg(long, default_value = "")]
    exclude: String,
}

impl TargetArgs {
    /// `--target`.
    pub(crate) fn target(&self) -> Target {
        Target::parse(&self.target)
    }

    /// `--exclude`.
    pub(crate) fn exclude(&self) -> Vec<String> {
        split_list(&self.exclude)
    }
}

/// Says so when `model` is a LoftQ organisation release run without its adapter: its
/// backbone alone is plain quantized, which is rarely what was meant.
#[allow(clippy::print_stderr)]
pub(crate) fn note_release(model: &std::path::Path, adapter: Option<&std::path::Path>) {
    use loftq_models::io::adapter_dir;
    if adapter.is_none() && adapter_dir(model) != model {
        eprintln!(
            "note: {} is a LoftQ release; its adapter is not used unless you pass --adapter {0}",
            model.display()
        );
    }
}
