//! Double quantization of block scales (bitsandbytes' `compress_statistics=True`).

use std::sync::OnceLock;

use super::normal::torch_linspace_f32;

/// Scales per second-level block, as in bitsandbytes.
pub const DYNAMIC_BLOCK: usize = 256;

/// bitsandbytes' signed 8-bit "dynamic" map (`create_dynamic_map(signed=True)`), sorted.
///
/// # Algorithm
/// For exponent `i` in `0..7`: the midpoints of `linspace(0.1, 1, 2^i + 1)` scaled by
/// `10^(i−6)`, with both signs; then `0` and `1`: 127·2 + 2 = 256 values, in `f32`.
pub fn dynamic_map() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let bounds = torch_linspace_f32(0.1, 1.0, (1usize << i) + 1);
        let scale = 10f64.powi(i - 6) as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data.try_into().expect("256 values")
}

/// Scales stored as 8-bit codes of the dynamic map, one `f32` absmax per 256 of them, around
/// their mean.
///
/// `decode()[i] = map[codes[i]] · absmax[i / 256] + offset`.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuant {
    /// Mean of the original scales, subtracted before quantizing.
    pub offset: f32,
    /// One 8-bit code per scale.
    pub codes: Vec<u8>,
    /// One absmax per [`DYNAMIC_BLOCK`] codes.
    pub absmax: Vec<f32>,
}

/// Bins of [`code_table`] over `[-1, 1]`.
const TABLE_BINS: usize = 1 << 16;

/// bitsandbytes' CPU rounding to the dynamic map (0.50, `cpu_ops.cpp`): `[-1, 1]` is cut into
/// 65,536 evenly spaced points `-1 + 2i/65535`, each given the code of the nearest map value
/// (midpoints in `f32`, ties to the lower code), and a value takes the code of its nearest
/// point. Near a midpoint, or between the map's smallest values, this is not always the
/// nearest map value; it is what bitsandbytes stores.
fn code_table() -> &'static [u8; TABLE_BINS] {
    static TABLE: OnceLock<Box<[u8; TABLE_BINS]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let map = dynamic_map();
        let mids: Vec<f32> = map.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let mut table = Box::new([0u8; TABLE_BINS]);
        let mut code = 0;
        for (i, slot) in table.iter_mut().enumerate() {
            let point = -1.0 + (2.0 * i as f32) / (TABLE_BINS - 1) as f32;
            while code < mids.len() && mids[code] < point {
                code += 1;
            }
            *slot = code as u8;
        }
        table
    })
}

/// The code of `v` (a scale already divided by its block's absmax), as bitsandbytes rounds.
fn code_of(v: f32) -> u8 {
    let t = (v.clamp(-1.0, 1.0) + 1.0) * 0.5;
    // Non-negative and at most 65,535.5: truncation is the floor bitsandbytes takes.
    let bin = (t * (TABLE_BINS - 1) as f32 + 0.5) as usize;
    code_table()[bin.min(TABLE_BINS - 1)]
}

impl DoubleQuant {
    /// Quantizes `scales` as bitsandbytes' `quantize_4bit(..., compress_statistics=True)`
    /// does on the CPU: the mean is subtracted, then blocks of 256 are scaled by their absmax
    /// and coded with the dynamic map (a block whose absmax is 0 gets code 0 throughout).
    ///
    /// # Numerical behaviour
    /// The error of each decoded scale is at most about half a gap of the dynamic map times
    /// its block's absmax (about 1% of the spread of the scales around their mean for typical
    /// weights). Codes equal bitsandbytes 0.50's on the CPU bit for bit
    /// (`tests/quant_reference.rs`).
    pub fn encode(scales: &[f32]) -> Self {
        let offset = if scales.is_empty() {
            0.0
        } else {
            (scales.iter().map(|&s| f64::from(s)).sum::<f64>() / scales.len() as f64) as f32
        };
        let mut codes = Vec::with_capacity(scales.len());
        let mut absmax = Vec::with_capacity(scales.len().div_ceil(DYNAMIC_BLOCK));
        for chunk in scales.chunks(DYNAMIC_BLOCK) {
            let a = chunk.iter().fold(0.0f32, |m, &s| m.max((s - offset).abs()));
            absmax.push(a);
            if a == 0.0 {
                codes.extend(std::iter::repeat_n(0, chunk.len()));
                continue;
            }
            let inv = 1.0 / a;
            codes.extend(chunk.iter().map(|&s| code_of((s - offset) * inv)));
        }
        Self {
            offset,
            codes,
            absmax,
        }
    }

    /// The decoded scales.
    pub fn decode(&self) -> Vec<f32> {
        let map = dynamic_map();
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &c)| map[usize::from(c)] * self.absmax[i / DYNAMIC_BLOCK] + self.offset)
            .collect()
    }

    /// Storage in bits: the codes, the second-level absmax values and the offset.
    pub fn storage_bits(&self) -> usize {
        8 * self.codes.len() + 32 * self.absmax.len() + 32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_map_shape() {
        let m = dynamic_map();
        assert!(
            m[0] < -0.99 && m[0] > -1.0,
            "most negative is -mean(0.986, 1)"
        );
        assert_eq!(m[255], 1.0);
        assert!(m.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
        assert!(m.contains(&0.0));
        // Smallest magnitude: 10^-6 · (0.1 + 1) / 2.
        let smallest = m
            .iter()
            .filter(|v| **v > 0.0)
            .fold(f32::MAX, |a, &b| a.min(b));
        assert!((smallest - 5.5e-7).abs() < 1e-12);
    }

    #[test]
    fn round_trip_error_is_small() {
        let scales: Vec<f32> = (0..1000)
            .map(|i| 0.02 + 0.01 * ((i as f32) * 0.37).sin())
            .collect();
        let dq = DoubleQuant::encode(&scales);
        assert_eq!(dq.absmax.len(), 4);
        let back = dq.decode();
        for (a, b) in scales.iter().zip(&back) {
            assert!((a - b).abs() <= 0.01 * 0.01 + 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn constant_scales_decode_exactly() {
        let dq = DoubleQuant::encode(&[0.5; 300]);
        assert_eq!(dq.decode(), vec![0.5; 300]);
    }
}
