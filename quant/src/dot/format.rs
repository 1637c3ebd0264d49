//! The activation formats of the dot products ([`ActFormat`]: what activations are converted to
//! before a dot with a weight row of each ggml type) and the row-length checks every kernel relies on.

use crate::blocks::{BlockQ8K, BlockQ8_0, QK, QK_K};
use crate::{GgmlType, QuantError};

/// Bytes of one Q8_1 activation block, `d:f16 | s:f16 | qs[32]` (a format of activations only, so
/// not in the type table).
pub(crate) const Q8_1_BYTES: usize = 2 + 2 + QK;

/// `n` activation rows in `bytes`, row `j` starting at `bytes[j * stride..]`: the activation
/// operand of the matrix products ([`super::gemm_f16_par`], [`super::repack::matmul`]).
#[derive(Clone, Copy, Debug)]
pub struct ActRows<'a> {
    /// The rows, in the activation format the product reads.
    pub bytes: &'a [u8],
    /// Bytes from one row's start to the next.
    pub stride: usize,
    /// Number of rows.
    pub n: usize,
}

/// The format activations are converted to before a dot product with a weight row
/// (ggml's `vec_dot_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActFormat {
    /// f32 as is (F32 weights).
    F32,
    /// Rounded to f16 (F16 weights: ggml-cpu's `vec_dot_type` for F16 is F16, and llamafile's
    /// tinyBLAS multiplies f16 by f16), kept widened as f32 (4 bytes) so that kernels load them
    /// directly: the values are exactly ggml's.
    F16,
    /// Rounded to bf16 (BF16 weights).
    BF16,
    /// `d:f16 | qs[32] (i8)`, 34 bytes per 32 values.
    Q8_0,
    /// `d:f16 | s:f16 | qs[32] (i8)`, 36 bytes per 32 values; `s = d * Σqs`.
    Q8_1,
    /// `d:f32 | qs[256] (i8) | bsums[16] (i16)`, 292 bytes per 256 values.
    Q8K,
}

impl ActFormat {
    /// Values per block.
    pub const fn block_size(self) -> usize {
        match self {
            ActFormat::F32 | ActFormat::F16 | ActFormat::BF16 => 1,
            ActFormat::Q8_0 | ActFormat::Q8_1 => QK,
            ActFormat::Q8K => QK_K,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            ActFormat::F32 | ActFormat::F16 => 4,
            ActFormat::BF16 => 2,
            ActFormat::Q8_0 => BlockQ8_0::BYTES,
            ActFormat::Q8_1 => Q8_1_BYTES,
            ActFormat::Q8K => BlockQ8K::BYTES,
        }
    }
}

/// The activation format ggml pairs with weights of type `w`, or None when `w` cannot be a matmul
/// weight here (Q8_K is an intermediate type only).
pub fn act_format(w: GgmlType) -> Option<ActFormat> {
    Some(match w {
        GgmlType::F32 => ActFormat::F32,
        GgmlType::F16 => ActFormat::F16,
        GgmlType::BF16 => ActFormat::BF16,
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => ActFormat::Q8_0,
        GgmlType::Q4_1 | GgmlType::Q5_1 => ActFormat::Q8_1,
        GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
            ActFormat::Q8K
        }
        GgmlType::Q8K => return None,
    })
}

/// Bytes of one activation row of `n` values in format `f`; `n` must be a whole number of blocks.
pub fn act_row_bytes(f: ActFormat, n: usize) -> Option<usize> {
    if !n.is_multiple_of(f.block_size()) {
        return None;
    }
    (n / f.block_size()).checked_mul(f.block_bytes())
}

/// Checks that `bytes` is exactly one row of `n` values of weight type `ty` usable in a dot product.
pub fn check_row(ty: GgmlType, n: usize, bytes: usize) -> Result<(), QuantError> {
    if act_format(ty).is_none() || !n.is_multiple_of(ty.block_size()) {
        return Err(QuantError::NotBlockMultiple {
            ty,
            block_size: ty.block_size(),
            len: n,
        });
    }
    let expected = (n / ty.block_size())
        .checked_mul(ty.type_size())
        .ok_or(QuantError::SizeOverflow { ty, elements: n })?;
    if expected != bytes {
        return Err(QuantError::ByteLength {
            ty,
            what: "weight row",
            expected,
            actual: bytes,
        });
    }
    Ok(())
}
