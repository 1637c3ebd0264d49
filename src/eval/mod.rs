//! Evaluation of a loaded model: perplexity exactly as llama-perplexity computes it.

pub mod imatrix;
pub mod perplexity;
