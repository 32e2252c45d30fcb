//! What `loftq train` reads: the model with its adapter (read or fresh) and the text.

use burn::tensor::Device;
use loftq_models::Tokenizer;
use loftq_models::init::Target;
use loftq_models::init::plan::split_list;
use loftq_models::io::{Adapter, AdapterConfig};
use loftq_models::nn::{FreshLora, Llama, LoadOptions, load_pretrained_with};
use loftq_models::train::data::tokenize_file;
use loftq_models::train::{TokenStream, Validation};

use super::TrainArgs;
use crate::error::{CliError, Result, invalid};

/// The training text and the validation: --val-text, or the tail of the training text.
pub(super) fn read_text(
    a: &TrainArgs,
    eos: Option<u32>,
) -> Result<(TokenStream, Option<Validation>)> {
    let tok = Tokenizer::for_model(&a.model)?;
    let stream = TokenStream::from_files(&tok, &a.text, eos)?;
    let (stream, val_tokens) = match &a.val_text {
        Some(path) => (stream, tokenize_file(&tok, path)?),
        None => {
            let (s, v) = stream.split_tail(a.val_fraction);
            (s, v.tokens)
        }
    };
    let val = (val_tokens.len() >= 2).then(|| {
        let tokens: Vec<u32> = val_tokens.into_iter().take(a.val_tokens.max(2)).collect();
        let window = a.val_window.unwrap_or(tokens.len()).max(2);
        Validation {
            stride: a.val_stride.unwrap_or(window / 2).clamp(1, window),
            window,
            tokens,
        }
    });
    Ok((stream, val))
}

/// The model on `device` with its adapter (read, or fresh from the seed, so every device's
/// copy starts the same) and the adapter's config.
pub(super) fn build_model(
    a: &TrainArgs,
    opts: &LoadOptions,
    adapter: Option<&Adapter>,
    device: &Device,
) -> Result<(Llama, AdapterConfig)> {
    let mut model = load_pretrained_with(&a.model, device, opts)?;
    let mut template = match adapter {
        Some(ad) => ad.config.clone(),
        None => {
            let fresh = Fresh::of(a);
            let l = fresh.lora;
            let n = model.add_lora(l.rank, l.scaling, l.dropout, l.seed, |p| fresh.picks(p));
            if n == 0 {
                return Err(fresh.no_match(a));
            }
            fresh.config
        }
    };
    if let Some(p) = a.dropout {
        template.lora_dropout = p;
    }
    for (_, lin) in model.decoder_linears_mut() {
        if let Some(l) = &mut lin.lora {
            l.dropout = template.lora_dropout;
        }
    }
    Ok((model, template))
}

/// A fresh adapter, as --rank, --alpha, --rslora, --target and --exclude say.
pub(super) struct Fresh {
    pub(super) config: AdapterConfig,
    pub(super) lora: FreshLora,
    target: Target,
    exclude: Vec<String>,
}

impl Fresh {
    pub(super) fn of(a: &TrainArgs) -> Fresh {
        let alpha = a.alpha.unwrap_or(a.rank as f64);
        let mut config = AdapterConfig::new(a.rank, alpha, vec![]);
        config.use_rslora = a.rslora;
        let lora = FreshLora {
            rank: a.rank,
            scaling: config.scaling("", a.rank),
            dropout: 0.0,
            seed: a.seed,
        };
        Fresh {
            config,
            lora,
            target: Target::parse(&a.target),
            exclude: split_list(&a.exclude),
        }
    }

    /// Whether the module at `path` (a decoder linear layer) gets an adapter.
    pub(super) fn picks(&self, path: &str) -> bool {
        self.target.picks(path, &self.exclude, true)
    }

    pub(super) fn no_match(&self, a: &TrainArgs) -> CliError {
        invalid(format!(
            "no linear layer matches --target {:?} (minus --exclude)",
            a.target
        ))
    }
}
