//! Errors of the quantize / dequantize entry points.

use crate::types::GgmlType;

/// What went wrong when quantizing or dequantizing a row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// An element count is not a whole number of the type's blocks.
    #[error("{ty}: {len} elements is not a multiple of the block size {block_size}")]
    NotBlockMultiple {
        ty: GgmlType,
        block_size: usize,
        len: usize,
    },
    /// A byte buffer (quantized data) has the wrong length for the element count.
    #[error("{ty}: {what} holds {actual} bytes, expected {expected}")]
    ByteLength {
        ty: GgmlType,
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    /// An f32 or f16/bf16 buffer has the wrong element count.
    #[error("{what} holds {actual} elements, expected {expected}")]
    ElementCount {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    /// `n_per_row` is zero or does not divide the source length.
    #[error("{ty}: {len} elements cannot be split into rows of {n_per_row}")]
    BadRowLength {
        ty: GgmlType,
        n_per_row: usize,
        len: usize,
    },
    /// The byte size of the data does not fit in `usize`.
    #[error("{ty}: the byte size of {elements} elements overflows")]
    SizeOverflow { ty: GgmlType, elements: usize },
}
