//! A LoRA adapter's settings, one vocabulary for every floor: its rank, `alpha`, rsLoRA, and
//! how the scale enters the initial factors.

use serde::{Deserialize, Serialize};

/// A LoRA adapter's shape and scale: `W ≈ Q + s·B·A` with `B: [out, rank]`, `A: [rank, in]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    /// Rank `r`.
    pub rank: usize,
    /// `alpha`; the scale is `alpha / r`, or `alpha / √r` with `rslora`.
    pub alpha: f32,
    /// rsLoRA scaling.
    pub rslora: bool,
    /// How the scale enters the initial factors.
    pub scaling: InitScaling,
}

impl LoraSpec {
    /// Rank `rank` with `alpha = rank` (scale 1), no rsLoRA, exact scaling.
    pub fn new(rank: usize) -> Self {
        Self {
            rank,
            alpha: rank as f32,
            rslora: false,
            scaling: InitScaling::Exact,
        }
    }

    /// The scale `s` of the forward pass `Q·x + s·B·A·x`: `alpha / r`, or `alpha / √r` with
    /// rsLoRA.
    pub fn scale(&self) -> f32 {
        let r = self.rank as f32;
        if self.rslora {
            self.alpha / r.sqrt()
        } else {
            self.alpha / r
        }
    }
}

/// How the LoRA scale `s` enters the initial factors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum InitScaling {
    /// Divide both factors by `√s`, so that `Q + s·B·A ≈ W` for any `alpha` (correct).
    #[default]
    Exact,
    /// Ignore `s` as PEFT's `loftq_init` does: correct only when `s = 1` (`alpha = r`).
    Peft,
}

impl InitScaling {
    /// For the forward pass's scale `s`: the factor both fitted factors are multiplied by
    /// (`1/√s`, or 1 for [`InitScaling::Peft`]), and the scale that the product of the
    /// *unmultiplied* factors then has in `Q + s·B·A` (1, or `s` for [`InitScaling::Peft`]).
    pub fn scales(self, s: f32) -> (f32, f32) {
        match self {
            InitScaling::Exact => (1.0 / s.sqrt(), 1.0),
            InitScaling::Peft => (1.0, s),
        }
    }
}
