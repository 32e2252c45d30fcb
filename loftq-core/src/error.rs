//! Errors of the quantizers and of the algorithms built on them.

/// What can go wrong when quantizing user data.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantError {
    /// A NaN or infinite weight; the position is in the matrix as given (`[out, in]`).
    #[error("non-finite weight {value} at row {row}, column {col}")]
    NonFinite {
        /// Row of the first bad value.
        row: usize,
        /// Column of the first bad value.
        col: usize,
        /// The value itself (NaN or ±inf).
        value: f32,
    },
    /// A configuration that cannot work (bit width, block size, scheme combination).
    #[error("invalid quantizer configuration: {0}")]
    InvalidConfig(String),
    /// Stored quantized data whose sizes do not agree with its shape and configuration.
    #[error("corrupt quantized data: {0}")]
    Corrupt(String),
}
