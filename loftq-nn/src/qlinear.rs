//! [`QLinear`]: the one place where quantization and LoRA meet.
//!
//! `y = x·Wᵀ + bias + s·dropout(x)·Aᵀ·Bᵀ`, with `W [out, in]` frozen (dense, or held packed
//! and dequantized for each product), `A [r, in]` and `B [out, r]` trainable (PEFT layout),
//! `s` the LoRA scaling.

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::tensor::{Device, Int, Tensor, TensorData};
use loftq_core::lowrank::Gaussian;
use loftq_core::quant::{Kernel, PackedTensor, Quantized, cube, is_host_device};
use loftq_core::{QuantError, Quantizer, fused, profile};

use super::Output;
use super::kernels::{self, HostWeight};

/// The frozen weight of a [`QLinear`], `[out, in]`.
#[derive(Clone, Debug)]
// A Burn `Tensor` handle is itself ~640 bytes; boxing would not make this smaller.
#[allow(clippy::large_enum_variant)]
pub enum BaseWeight {
    /// A dense matrix (full precision, or a PiSSA residual).
    Dense(Tensor<2>),
    /// Codes and scales; never a dense copy between products.
    Packed(PackedWeight),
}

/// A quantized weight kept packed: the host [`PackedTensor`] (what is written to disk, and
/// what CPU back ends dequantize from), plus on other devices the codes packed into `i32`
/// words (GPU back ends have no `u8` tensors), `⌊32/bits⌋` codes per word, low bits first.
#[derive(Clone, Debug)]
pub struct PackedWeight {
    packed: Arc<PackedTensor>,
    quantizer: Arc<Quantizer>,
    device: Device,
    words: Option<DeviceWords>,
}

#[derive(Clone, Debug)]
struct DeviceWords {
    words: Tensor<1, Int>,
    /// `[1, codes per word]`: each code's shift inside its word (uploaded once, not per product).
    shifts: Tensor<2, Int>,
    scales: Tensor<1>,
    mins: Option<Tensor<1>>,
    block: usize,
    /// A codebook scheme's levels (NF, uniform codebooks), for the one-kernel dequantization.
    levels: Option<Tensor<1>>,
}

impl PackedWeight {
    /// Holds `packed` for products on `device`.
    ///
    /// # Errors
    /// [`QuantError::Corrupt`] if the codes and scales disagree with the shape.
    pub fn new(packed: PackedTensor, device: &Device) -> Result<Self, QuantError> {
        let quantizer = Arc::new(Quantizer::new(packed.config)?);
        let host = packed.unpack()?;
        let words = (!is_host_device(device)).then(|| {
            let per = codes_per_word(packed.config.scheme.bits());
            let bits = u32::from(packed.config.scheme.bits());
            let words: Vec<i32> = host
                .codes
                .chunks(per)
                .map(|c| {
                    let w = c.iter().enumerate().fold(0u32, |w, (j, &code)| {
                        w | (u32::from(code) << (j as u32 * bits))
                    });
                    w as i32
                })
                .collect();
            let nw = words.len();
            let shifts: Vec<i32> = (0..per as i32).map(|j| j * bits as i32).collect();
            let upload =
                |v: &[f32]| Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), device);
            DeviceWords {
                words: Tensor::from_data(TensorData::new(words, [nw]), device),
                shifts: Tensor::from_data(TensorData::new(shifts, [1, per]), device),
                scales: upload(&host.scales),
                mins: (!host.mins.is_empty()).then(|| upload(&host.mins)),
                block: host.block,
                levels: (!quantizer.levels().is_empty()).then(|| upload(quantizer.levels())),
            }
        });
        Ok(Self {
            packed: Arc::new(packed),
            quantizer,
            device: device.clone(),
            words,
        })
    }

    /// The host storage.
    pub fn packed(&self) -> &PackedTensor {
        &self.packed
    }

    /// The codes on the device with their codebook, for a codebook scheme (NF, uniform
    /// codebooks) off the CPU back end.
    pub fn codebook(&self) -> Option<cube::Codebook<'_>> {
        let dw = self.words.as_ref()?;
        Some(cube::Codebook {
            words: cube::PackedWords {
                words: &dw.words,
                bits: self.packed.config.scheme.bits(),
                block: dw.block,
            },
            levels: dw.levels.as_ref()?,
            scales: &dw.scales,
            shape: self.packed.shape,
        })
    }

    /// The dequantized matrix `[out, in]` on the weight's device.
    pub fn dequantize(&self) -> Tensor<2> {
        let shape = self.packed.shape;
        match &self.words {
            None => {
                let v = self.packed.dequantize().expect("checked when built");
                Tensor::from_data(TensorData::new(v, shape), &self.device)
            }
            Some(dw) => {
                let bits = self.packed.config.scheme.bits();
                if let Some(w) = self.codebook().and_then(|c| cube::dequantize_codebook(&c)) {
                    return w;
                }
                let n = shape[0] * shape[1];
                let per = codes_per_word(bits);
                let nw = dw.words.dims()[0];
                let codes = dw
                    .words
                    .clone()
                    .reshape([nw, 1])
                    .expand([nw, per])
                    .bitwise_right_shift(dw.shifts.clone().expand([nw, per]))
                    .bitwise_and_scalar((1i32 << bits) - 1)
                    .reshape([nw * per])
                    .slice(0..n);
                let q = Quantized {
                    shape,
                    block: dw.block,
                    bits,
                    codes,
                    scales: dw.scales.clone(),
                    mins: dw.mins.clone(),
                };
                self.quantizer.dequantize_with(&q, Kernel::Portable)
            }
        }
    }
}

fn codes_per_word(bits: u8) -> usize {
    32 / usize::from(bits)
}

impl BaseWeight {
    /// The weight as a dense `[out, in]` tensor (dequantized if packed).
    pub fn dense(&self) -> Tensor<2> {
        match self {
            BaseWeight::Dense(w) => w.clone(),
            BaseWeight::Packed(p) => p.dequantize(),
        }
    }

    /// `[out, in]`.
    pub fn shape(&self) -> [usize; 2] {
        match self {
            BaseWeight::Dense(w) => w.dims(),
            BaseWeight::Packed(p) => p.packed.shape,
        }
    }
}

/// The LoRA factors of a [`QLinear`].
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// `lora_A` `[r, in]`.
    pub a: Param<Tensor<2>>,
    /// `lora_B` `[out, r]`.
    pub b: Param<Tensor<2>>,
    /// `s` in `s·B·A` (`alpha / r`, or `alpha / √r` for rsLoRA).
    pub scaling: f64,
    /// Dropout probability on the adapter's input, applied only while
    /// [`QLinear::dropout_seed`] is set (training).
    pub dropout: f64,
}

impl LoraAdapter {
    /// Builds an adapter from `A [r, in]` and `B [out, r]`.
    ///
    /// # Panics
    /// If the ranks of `a` and `b` differ, or `dropout` is not in `[0, 1)`.
    pub fn new(a: Tensor<2>, b: Tensor<2>, scaling: f64, dropout: f64) -> Self {
        assert_eq!(a.dims()[0], b.dims()[1], "lora_A and lora_B ranks differ");
        assert!((0.0..1.0).contains(&dropout), "dropout must be in [0, 1)");
        Self {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
            scaling,
            dropout,
        }
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `s·B·A`, `[out, in]`.
    pub fn delta(&self) -> Tensor<2> {
        self.b.val().matmul(self.a.val()).mul_scalar(self.scaling)
    }
}

/// A linear layer with a frozen (possibly quantized) base and an optional LoRA adapter.
#[derive(Module, Debug)]
pub struct QLinear {
    /// Frozen weight `[out, in]`.
    #[module(skip)]
    pub base: BaseWeight,
    /// Frozen bias `[out]`.
    pub bias: Option<Tensor<1>>,
    /// The adapter.
    pub lora: Option<LoraAdapter>,
    /// When false the adapter is ignored (the base model alone).
    pub adapter_enabled: bool,
    /// While set, the adapter's dropout is applied with a mask drawn from this seed. The mask
    /// depends only on the seed, so a recomputed forward pass (gradient checkpointing) sees
    /// the same mask as the first one.
    #[module(skip)]
    pub dropout_seed: Option<u64>,
}

impl QLinear {
    /// A layer with `base`, no bias, no adapter.
    pub fn new(base: BaseWeight) -> Self {
        Self {
            base,
            bias: None,
            lora: None,
            adapter_enabled: true,
            dropout_seed: None,
        }
    }

    /// Sets the bias.
    pub fn with_bias(mut self, bias: Option<Tensor<1>>) -> Self {
        self.bias = bias;
        self
    }

    /// Sets the adapter.
    ///
    /// # Panics
    /// If its shapes do not fit the base.
    pub fn with_lora(mut self, lora: Option<LoraAdapter>) -> Self {
        if let Some(l) = &lora {
            let [out, inp] = self.base.shape();
            assert_eq!(l.a.dims()[1], inp, "lora_A columns must equal in_features");
            assert_eq!(l.b.dims()[0], out, "lora_B rows must equal out_features");
        }
        self.lora = lora;
        self
    }

    /// `[out, in]`.
    pub fn shape(&self) -> [usize; 2] {
        self.base.shape()
    }

    /// Applies the layer to the last dimension of `x` (`[..., in]` → `[..., out]`).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_as(x, Output::Value)
    }

    /// [`forward`](Self::forward) for `output`: with [`Output::GradientOnly`] (an output whose
    /// value nothing reads, such as a recomputed layer's last product), the CPU back end
    /// leaves the value as zeros and skips its products, while the backward pass is exactly
    /// `forward`'s; elsewhere it is `forward`.
    pub(crate) fn forward_as<const D: usize>(&self, x: Tensor<D>, output: Output) -> Tensor<D> {
        let [out, inp] = self.shape();
        let mut dims = x.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let x2: Tensor<2> = x.reshape([rows, inp]);
        let lora = self.lora.as_ref().filter(|_| self.adapter_enabled);
        let dropout_seed = lora.and_then(|l| self.dropout_for(l));
        let mut y = match (lora, dropout_seed) {
            // Base and adapter see the same input: one product operation on the CPU back end.
            (Some(lora), None) => self.product_with_lora(x2.clone(), lora, output),
            _ => self.base_product(x2.clone(), output),
        };
        if let (Some(lora), Some(seed)) = (lora, dropout_seed) {
            let x2 = dropout(x2, lora.dropout, seed);
            y = y + lora_branch(x2, lora.a.val(), lora.b.val(), lora.scaling);
        }
        if let Some(bias) = &self.bias {
            y = y + bias.clone().reshape([1, out]);
        }
        dims[D - 1] = out;
        y.reshape(dims)
    }

    /// The seed of `lora`'s dropout when this step drops (training, a probability above 0).
    fn dropout_for(&self, lora: &LoraAdapter) -> Option<u64> {
        self.dropout_seed.filter(|_| lora.dropout > 0.0)
    }

    /// The outputs of `layers`, all of input `x [.., in]`, side by side, `[.., Σ out]`, in one
    /// product (`fused::lora_linear_codebook_group`): on WGPU and CUDA, where every layer is a
    /// LoRA layer over a packed codebook base that [`forward`](Self::forward) would merge
    /// with `B·A` summed inline, its adapter on, without dropout or bias. `None` otherwise.
    pub(crate) fn forward_group<const D: usize>(
        layers: &[QLinear],
        x: &Tensor<D>,
    ) -> Option<Tensor<D>> {
        let [_, inp] = layers.first()?.shape();
        let mut dims = x.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let mut members = Vec::with_capacity(layers.len());
        let mut factors = Vec::with_capacity(layers.len());
        for layer in layers {
            let lora = layer.lora.as_ref().filter(|_| layer.adapter_enabled)?;
            let BaseWeight::Packed(packed) = &layer.base else {
                return None;
            };
            let dropout = layer.dropout_for(lora).is_some();
            let merge = merges_over_codes(layer.shape(), rows, lora.a.dims()[0]);
            if dropout || layer.bias.is_some() || layer.shape()[1] != inp || !merge {
                return None;
            }
            members.push((packed, lora.scaling as f32));
            factors.push([lora.a.val(), lora.b.val()]);
        }
        let codebooks: Vec<_> = members
            .iter()
            .map(|(p, _)| p.codebook())
            .collect::<Option<_>>()?;
        let group: Vec<fused::GroupMember> = (codebooks.iter().zip(&factors).zip(&members))
            .map(|((c, [a, b]), (_, s))| (c, [a, b], *s))
            .collect();
        let device = x.device();
        profile::mark(&device, "model: other");
        let x2: Tensor<2> = x.clone().reshape([rows, inp]);
        let y = fused::lora_linear_codebook_group(&x2, &group)?;
        profile::mark(&device, "linear: product and adapter");
        dims[D - 1] = y.dims()[1];
        Some(y.reshape(dims))
    }

    /// `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` for `x [rows, in]`.
    fn product_with_lora(&self, x: Tensor<2>, lora: &LoraAdapter, output: Output) -> Tensor<2> {
        let (a, b) = (lora.a.val(), lora.b.val());
        if let Some(y) = self
            .host_weight()
            .and_then(|w| kernels::product_with_lora(&x, Some(&w), [&a, &b], lora.scaling, output))
        {
            return y;
        }
        let device = x.device();
        // WGPU and CUDA: one recorded operation, the factors' gradients in their own layout.
        if fused::applies(&x) {
            profile::mark(&device, "model: other");
            // Merged (`W + s·B·A`, fewer kernels) when W is dequantized for this step anyway
            // and forming `B·A` costs no more than the factored adapter's products.
            let ([rows, _], [out, inp]) = (x.dims(), self.shape());
            let packed = match &self.base {
                BaseWeight::Packed(p) => Some(p),
                BaseWeight::Dense(_) => None,
            };
            let merge = packed.is_some() && merge_pays([out, inp], rows);
            let s = lora.scaling as f32;
            // Over codebook codes the merged weight is one kernel, dequantization included (and
            // two with the product `B·A` where it is large). With a small `B·A` summed in that
            // kernel, merging saves launches whatever the rows: 2 kernels forward where
            // dequantizing and the factored form take 5.
            let r = a.dims()[0];
            let how = fused::AdapterProduct::for_shape([out, inp], r);
            let codebook = (packed.and_then(|p| p.codebook()))
                .filter(|_| merges_over_codes([out, inp], rows, r));
            if let Some(y) =
                codebook.and_then(|c| fused::lora_linear_codebook(&x, &c, [&a, &b], s, how))
            {
                profile::mark(&device, "linear: product and adapter");
                return y;
            }
            let w = self.base.dense();
            profile::mark(&device, "linear: dequantize");
            let y = match fused::lora_linear(&x, &w, [&a, &b], s, merge) {
                Some(y) => y,
                None => x.clone().matmul(w.transpose()) + lora_branch(x, a, b, lora.scaling),
            };
            profile::mark(&device, "linear: product and adapter");
            return y;
        }
        let y = self.base_product(x.clone(), output);
        let y = y + lora_branch(x, a, b, lora.scaling);
        profile::mark(&device, "linear: adapter");
        y
    }

    /// `x·Wᵀ` for `x [rows, in]`: faer on the CPU back end, Burn's matmul elsewhere.
    fn base_product(&self, x: Tensor<2>, output: Output) -> Tensor<2> {
        if let Some(y) = self
            .host_weight()
            .and_then(|w| kernels::product(&x, &w, self.shape(), output))
        {
            return y;
        }
        let device = x.device();
        // With LOFTQ_PROFILE: what ran since the previous mark is the model's other work.
        profile::mark(&device, "model: other");
        let w = self.base.dense();
        profile::mark(&device, "linear: dequantize");
        let y = x.matmul(w.transpose());
        profile::mark(&device, "linear: product");
        y
    }

    /// The base weight `[out, in]` in host memory, dequantized if packed; `None` off the CPU
    /// back end.
    pub(crate) fn host_weight(&self) -> Option<HostWeight> {
        match &self.base {
            BaseWeight::Dense(w) => kernels::plain(w),
            BaseWeight::Packed(p) if p.words.is_none() => kernels::dequantized(&p.packed),
            BaseWeight::Packed(_) => None,
        }
    }

    /// The dense weight this layer computes with, adapter merged: `W + s·B·A`, `[out, in]`.
    pub fn merged_weight(&self) -> Tensor<2> {
        let w = self.base.dense();
        match (&self.lora, self.adapter_enabled) {
            (Some(lora), true) => w + lora.delta(),
            _ => w,
        }
    }
}

/// Whether forming `B·A` for a merged weight `[out, in]` costs no more than the factored
/// adapter's products at `rows` rows.
fn merge_pays([out, inp]: [usize; 2], rows: usize) -> bool {
    out * inp <= rows * (inp + out)
}

/// Whether a LoRA layer of rank `r` over packed codebook codes merges on WGPU and CUDA: where
/// merging pays, and whatever the rows where its `B·A` is small (summed inline by the
/// dequantization kernel, no launch of its own).
fn merges_over_codes(shape: [usize; 2], rows: usize, r: usize) -> bool {
    merge_pays(shape, rows) || shape[0] * shape[1] * r <= fused::AdapterProduct::FEW_ROWS_MAX
}

/// Inverted dropout with a host-drawn mask: zeroes each element with probability `p` and
/// scales the rest by `1/(1-p)`.
fn dropout(x: Tensor<2>, p: f64, seed: u64) -> Tensor<2> {
    let [rows, cols] = x.dims();
    let mut g = Gaussian::new(seed);
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..rows * cols)
        .map(|_| if g.uniform() < p { 0.0 } else { keep as f32 })
        .collect();
    let device = x.device();
    x * Tensor::from_data(TensorData::new(mask, [rows, cols]), &device)
}

/// `x·Wᵀ` for `x [rows, in]` and a dense `w [out, in]` (faer on the CPU back end).
pub(crate) fn dense_product(x: Tensor<2>, w: &Tensor<2>) -> Tensor<2> {
    if let Some(y) =
        kernels::plain(w).and_then(|hw| kernels::product(&x, &hw, w.dims(), Output::Value))
    {
        return y;
    }
    x.matmul(w.clone().transpose())
}

/// `s·(x·Aᵀ)·Bᵀ` (faer on the CPU back end).
fn lora_branch(x: Tensor<2>, a: Tensor<2>, b: Tensor<2>, scaling: f64) -> Tensor<2> {
    if let Some(y) = kernels::product_with_lora(&x, None, [&a, &b], scaling, Output::Value) {
        return y;
    }
    let y = x.matmul(a.transpose()).matmul(b.transpose());
    // A scale of 1 (alpha = r) is common: one kernel less per layer, each way.
    if scaling == 1.0 {
        y
    } else {
        y.mul_scalar(scaling)
    }
}
