//! Models read one decoder layer at a time, so that a pass over the layers (block-wise
//! distillation) holds one layer of each model, whatever the model's depth.

use std::path::Path;

use burn::tensor::Device;

use super::load::{LoadOptions, load_ends, load_layer, open_pretrained};
use super::{DecoderLayer, Llama};
use loftq_formats::io::TensorSource;
use loftq_formats::{ModelError, Result};

/// A model's decoder layers, handed out one at a time.
pub trait LayerSource {
    /// The model's ends: its embedding, final norm, head and config. Its `layers` may be empty.
    fn ends(&self) -> &Llama;

    /// Decoder layer `l`, with its adapters.
    ///
    /// # Errors
    /// [`ModelError`] when the layer cannot be read.
    fn layer(&self, l: usize) -> Result<DecoderLayer>;
}

impl LayerSource for Llama {
    fn ends(&self) -> &Llama {
        self
    }

    fn layer(&self, l: usize) -> Result<DecoderLayer> {
        self.layers.get(l).cloned().ok_or_else(|| {
            ModelError::Mismatch(format!(
                "the model has {} layers, not {}",
                self.layers.len(),
                l + 1
            ))
        })
    }
}

/// What is done to each layer as it is read (e.g. fresh adapters attached).
pub type LayerHook<'a> = Box<dyn Fn(usize, &mut DecoderLayer) + 'a>;

/// A pretrained model on disk whose decoder layers are read when asked for; only the ends stay
/// in memory.
pub struct LayerReader<'a> {
    ends: Llama,
    source: Box<dyn TensorSource>,
    opts: LoadOptions<'a>,
    device: Device,
    hook: Option<LayerHook<'a>>,
}

impl<'a> LayerReader<'a> {
    /// Opens the model at `path` (an HF-style directory or a `.gguf` file) and reads its ends;
    /// its layers will be built as `opts` says, on `device`.
    ///
    /// # Errors
    /// As [`open_pretrained`] and [`load_ends`].
    pub fn open(path: &Path, device: &Device, opts: LoadOptions<'a>) -> Result<Self> {
        let (config, source) = open_pretrained(path)?;
        let ends = load_ends(&config, source.as_ref(), device, &opts)?;
        Ok(LayerReader {
            ends,
            source,
            opts,
            device: device.clone(),
            hook: None,
        })
    }

    /// Runs `hook` on every layer read, with its index.
    pub fn with_hook(mut self, hook: impl Fn(usize, &mut DecoderLayer) + 'a) -> Self {
        self.hook = Some(Box::new(hook));
        self
    }
}

impl LayerSource for LayerReader<'_> {
    fn ends(&self) -> &Llama {
        &self.ends
    }

    fn layer(&self, l: usize) -> Result<DecoderLayer> {
        let config = &self.ends.config;
        let mut layer = load_layer(config, self.source.as_ref(), l, &self.device, &self.opts)?;
        if let Some(hook) = &self.hook {
            hook(l, &mut layer);
        }
        Ok(layer)
    }
}
