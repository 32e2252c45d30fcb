//! [`PackedTensor`]: the compact host storage of a quantized matrix.

use super::host::dequantize_range;
use super::{
    DoubleQuant, HostQuantized, QuantConfig, Quantizer, pack_codes, unpack_codes, unpack_codes_into,
};
use crate::QuantError;

/// How the per-block scales are stored.
#[derive(Clone, Debug, PartialEq)]
pub enum Scales {
    /// One `f32` per block.
    F32(Vec<f32>),
    /// Double-quantized: 8 bits per block plus one `f32` per 256 blocks.
    Double(DoubleQuant),
}

impl Scales {
    /// The scales as `f32` (decoded when double-quantized).
    pub fn decode(&self) -> Vec<f32> {
        match self {
            Scales::F32(v) => v.clone(),
            Scales::Double(dq) => dq.decode(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Scales::F32(v) => v.len(),
            Scales::Double(dq) => dq.codes.len(),
        }
    }
}

/// A quantized `[rows, cols]` matrix with its codes packed into bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedTensor {
    /// Shape of the original matrix (PyTorch layout `[out, in]` for linear weights).
    pub shape: [usize; 2],
    /// The quantizer that produced it.
    pub config: QuantConfig,
    /// Codes packed as described in [`pack_codes`].
    pub data: Vec<u8>,
    /// Per-block scales.
    pub scales: Scales,
    /// Per-block minimums ([`super::Scheme::has_mins`] only; `f32`, never double-quantized).
    pub mins: Vec<f32>,
}

impl PackedTensor {
    /// Packs `q`; double-quantizes the scales when `config.double_quant` is set.
    pub fn pack(q: &HostQuantized, config: QuantConfig) -> Self {
        let bits = config.scheme.bits();
        let scales = if config.double_quant {
            Scales::Double(DoubleQuant::encode(&q.scales))
        } else {
            Scales::F32(q.scales.clone())
        };
        Self {
            shape: q.shape,
            config,
            data: pack_codes(&q.codes, bits),
            scales,
            mins: q.mins.clone(),
        }
    }

    /// Unpacks codes and (decoded) scales.
    ///
    /// # Errors
    /// [`QuantError::Corrupt`] when the buffer sizes disagree with the shape and configuration.
    pub fn unpack(&self) -> Result<HostQuantized, QuantError> {
        let (block, _) = self.check()?;
        let codes = unpack_codes(&self.data, self.config.scheme.bits(), self.numel())
            .expect("length checked");
        Ok(HostQuantized {
            shape: self.shape,
            block,
            codes,
            scales: self.scales.decode(),
            mins: self.mins.clone(),
        })
    }

    /// The block length and block count, after checking every buffer's size against the shape
    /// and configuration.
    fn check(&self) -> Result<(usize, usize), QuantError> {
        let n = self.numel();
        let block = self.config.block_size.len(self.shape[1]);
        if block == 0 {
            return Err(QuantError::Corrupt(format!(
                "zero block length for shape {:?}",
                self.shape
            )));
        }
        let nb = n.div_ceil(block);
        let bits = self.config.scheme.bits();
        if self.data.len() < super::packed_len(n, bits) {
            return Err(QuantError::Corrupt(format!(
                "{} bytes of {bits}-bit codes cannot hold {n} values",
                self.data.len()
            )));
        }
        let want_mins = if self.config.scheme.has_mins() { nb } else { 0 };
        if self.scales.len() != nb || self.mins.len() != want_mins {
            return Err(QuantError::Corrupt(format!(
                "{} scales and {} minimums for {nb} blocks",
                self.scales.len(),
                self.mins.len()
            )));
        }
        if let Scales::Double(dq) = &self.scales
            && dq.absmax.len() != nb.div_ceil(super::DYNAMIC_BLOCK)
        {
            return Err(QuantError::Corrupt("double-quant absmax count".into()));
        }
        Ok((block, nb))
    }

    /// Dequantizes to a row-major `f32` buffer. Runs of whole blocks are unpacked and
    /// dequantized together (on the rayon pool with the `flex` feature), so no buffer of all
    /// the codes is made.
    pub fn dequantize(&self) -> Result<Vec<f32>, QuantError> {
        let (block, _) = self.check()?;
        let quantizer = Quantizer::new(self.config)?;
        let scales = self.scales.decode();
        let bits = usize::from(self.config.scheme.bits());
        // Eight blocks always end on a byte boundary, whatever the bit width.
        let run_blocks = 8 * (1usize << 14).div_ceil(8 * block);
        let run = run_blocks * block;
        let mut out = vec![0f32; self.numel()];
        let one = |(i, o): (usize, &mut [f32])| {
            let mut codes = vec![0u8; o.len()];
            let whole = unpack_codes_into(&self.data[i * run * bits / 8..], bits as u8, &mut codes);
            assert!(whole, "length checked");
            let b0 = i * run_blocks;
            let mins = self.mins.get(b0..).unwrap_or(&[]);
            dequantize_range(&quantizer, &codes, &scales[b0..], mins, block, o);
        };
        #[cfg(feature = "flex")]
        {
            use rayon::prelude::*;
            out.par_chunks_mut(run).enumerate().for_each(one);
        }
        #[cfg(not(feature = "flex"))]
        out.chunks_mut(run).enumerate().for_each(one);
        Ok(out)
    }

    /// Number of weights.
    pub fn numel(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    /// Total storage in bits: codes, scales (with their second level), minimums; the
    /// llama.cpp formats count what their files hold (`f16` scales, the K-quants' 6- or 8-bit
    /// group scales and `f16` super-block scales).
    pub fn storage_bits(&self) -> usize {
        if let super::Scheme::Ggml { format } = self.config.scheme {
            return 8 * format.byte_len(self.numel());
        }
        let scales = match &self.scales {
            Scales::F32(v) => 32 * v.len(),
            Scales::Double(dq) => dq.storage_bits(),
        };
        8 * self.data.len() + scales + 32 * self.mins.len()
    }

    /// Exact bits per weight of this matrix (NF4, blocks of 64: 4.5 with `f32` scales,
    /// ≈ 4.127 double-quantized).
    pub fn bits_per_param(&self) -> f64 {
        self.storage_bits() as f64 / self.numel().max(1) as f64
    }
}
