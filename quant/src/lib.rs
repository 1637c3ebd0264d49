//! kiln-quant: ggml block types, reference quantizers bit-exact with llama.cpp, and SIMD kernels.

pub mod types;

pub use types::GgmlType;
