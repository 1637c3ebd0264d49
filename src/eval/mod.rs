//! Evaluation of a loaded model: perplexity and KL divergence exactly as llama-perplexity computes
//! them, llama-bench-style speed measurement, and RoPE context extension.

pub mod bench;
pub mod kld;
pub mod perplexity;
pub mod rope;
