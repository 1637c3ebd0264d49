//! Evaluation of a loaded model: perplexity and KL divergence exactly as llama-perplexity computes
//! them, llama-bench-style speed measurement, importance matrices as llama-imatrix collects them,
//! and RoPE context extension.

pub mod bench;
pub mod imatrix;
pub mod kld;
pub mod perplexity;
pub mod rope;
