//! Small programs that teach the loftq-rs API; run them with
//! `cargo run -p loftq-examples --example <name>`:
//!
//! - `quantize`: every quantizer on a Gaussian matrix, with its error and bits per parameter.
//! - `loftq`: LoftQ on one matrix, quantization-only vs T = 1..5, exact vs randomized SVD.
