//! Reference (scalar) quantizers and dequantizers, bit-for-bit equal to ggml's `quantize_row_*_ref`
//! and `dequantize_row_*` (spec §3), behind a byte-slice API.
//!
//! # Arithmetic
//! Everything is IEEE f32 with the C operation order: `a*b*c` is `(a*b)*c`, sums run left to right,
//! and nothing is fused (Rust never contracts `a*b+c` into an FMA).
//!
//! # NaN and infinity
//! ggml does not validate its input: `quantize_row_*_ref` has only `assert`s on the length, and
//! `nearest_int` asserts `|x| <= 4194303` in debug builds only. In the release library a NaN or an
//! infinity silently yields meaningless blocks (e.g. a NaN in Q4_0 is skipped by the max search and then
//! becomes nibble 0 via `cvttss2si`'s "integer indefinite"; an infinity makes the scale inf/NaN).
//! These functions never panic on such input, and they reproduce the x86-64 release behaviour:
//! float-to-int casts use `cvttss2si` semantics ([`c_trunc_i32`]), `nearest_int` uses the same bit
//! trick, and comparisons keep C's NaN semantics. A check against the x86-64 `libggml-base.so` of the
//! oracle build (120 rows of 256 holding NaN, ±inf, ±1e30 and 3e38, every type here) gave identical
//! bytes, but NaN payload propagation is the CPU's, so on other targets this is best effort. Callers
//! should reject non-finite weights first, as llama-quantize's callers effectively must.

pub mod float;
pub mod kquants;
pub mod legacy;
pub mod weighted;

use crate::blocks::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, QK, QK_K,
};
use crate::error::QuantError;
use crate::types::GgmlType;

/// ggml's `nearest_int`: `(bits(f + 12582912.0) & 0x7FFFFF) - 0x400000`, i.e. round half to even
/// for |f| < 2^22; outside that range it returns the same garbage ggml does.
#[inline]
pub fn nearest_int(f: f32) -> i32 {
    let val = f + 12_582_912.0;
    (val.to_bits() & 0x007F_FFFF) as i32 - 0x0040_0000
}

/// C's float-to-int conversion as compiled for x86-64 (`cvttss2si`): truncation toward zero, and
/// `i32::MIN` (the "integer indefinite") for NaN and out-of-range values.
#[inline]
pub fn c_trunc_i32(f: f32) -> i32 {
    if (-2_147_483_648.0..2_147_483_648.0).contains(&f) {
        f as i32
    } else {
        i32::MIN
    }
}

/// Byte size of `n` elements of `ty`, checking that `n` is a whole number of blocks.
pub(crate) fn bytes_for(ty: GgmlType, n: usize) -> Result<usize, QuantError> {
    let bs = ty.block_size();
    if !n.is_multiple_of(bs) {
        return Err(QuantError::NotBlockMultiple {
            ty,
            block_size: bs,
            len: n,
        });
    }
    (n / bs)
        .checked_mul(ty.type_size())
        .ok_or(QuantError::SizeOverflow { ty, elements: n })
}

pub(crate) fn check_len(
    ty: GgmlType,
    what: &'static str,
    expected: usize,
    actual: usize,
) -> Result<(), QuantError> {
    if expected != actual {
        return Err(QuantError::ByteLength {
            ty,
            what,
            expected,
            actual,
        });
    }
    Ok(())
}

fn quant_blocks<const N: usize, const B: usize>(
    src: &[f32],
    dst: &mut [u8],
    f: impl Fn(&[f32; N]) -> [u8; B],
) {
    for (x, o) in src.chunks_exact(N).zip(dst.chunks_exact_mut(B)) {
        if let Ok(x) = <&[f32; N]>::try_from(x) {
            o.copy_from_slice(&f(x));
        }
    }
}

fn dequant_blocks<const N: usize, const B: usize>(
    src: &[u8],
    dst: &mut [f32],
    f: impl Fn(&[u8; B], &mut [f32; N]),
) {
    for (b, y) in src.chunks_exact(B).zip(dst.chunks_exact_mut(N)) {
        if let (Ok(b), Ok(y)) = (<&[u8; B]>::try_from(b), <&mut [f32; N]>::try_from(y)) {
            f(b, y);
        }
    }
}

/// Quantizes one row (or any whole number of blocks) of `src` into `dst` with ggml's reference
/// algorithm for `ty` (what `ggml_quantize_chunk` does without an imatrix).
///
/// `src.len()` must be a multiple of `ty.block_size()` and `dst.len()` must be exactly the row's
/// byte size. F32 is copied, F16/BF16 are rounded to nearest even (see [`float`]).
pub fn quantize_row_ref(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    let expected = bytes_for(ty, src.len())?;
    check_len(ty, "destination", expected, dst.len())?;
    match ty {
        GgmlType::F32 => {
            for (x, o) in src.iter().zip(dst.chunks_exact_mut(4)) {
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
        GgmlType::F16 => float::f32_to_f16_bytes(src, dst),
        GgmlType::BF16 => float::f32_to_bf16_bytes(src, dst),
        GgmlType::Q4_0 => quant_blocks::<QK, { BlockQ4_0::BYTES }>(src, dst, |x| {
            legacy::quantize_q4_0(x).to_bytes()
        }),
        GgmlType::Q4_1 => quant_blocks::<QK, { BlockQ4_1::BYTES }>(src, dst, |x| {
            legacy::quantize_q4_1(x).to_bytes()
        }),
        GgmlType::Q5_0 => quant_blocks::<QK, { BlockQ5_0::BYTES }>(src, dst, |x| {
            legacy::quantize_q5_0(x).to_bytes()
        }),
        GgmlType::Q5_1 => quant_blocks::<QK, { BlockQ5_1::BYTES }>(src, dst, |x| {
            legacy::quantize_q5_1(x).to_bytes()
        }),
        GgmlType::Q8_0 => quant_blocks::<QK, { BlockQ8_0::BYTES }>(src, dst, |x| {
            legacy::quantize_q8_0(x).to_bytes()
        }),
        GgmlType::Q2K => quant_blocks::<QK_K, { BlockQ2K::BYTES }>(src, dst, |x| {
            kquants::quantize_q2_k(x).to_bytes()
        }),
        GgmlType::Q3K => quant_blocks::<QK_K, { BlockQ3K::BYTES }>(src, dst, |x| {
            kquants::quantize_q3_k(x).to_bytes()
        }),
        GgmlType::Q4K => quant_blocks::<QK_K, { BlockQ4K::BYTES }>(src, dst, |x| {
            kquants::quantize_q4_k(x).to_bytes()
        }),
        GgmlType::Q5K => quant_blocks::<QK_K, { BlockQ5K::BYTES }>(src, dst, |x| {
            kquants::quantize_q5_k(x).to_bytes()
        }),
        GgmlType::Q6K => quant_blocks::<QK_K, { BlockQ6K::BYTES }>(src, dst, |x| {
            kquants::quantize_q6_k(x).to_bytes()
        }),
        GgmlType::Q8K => quant_blocks::<QK_K, { BlockQ8K::BYTES }>(src, dst, |x| {
            kquants::quantize_q8_k(x).to_bytes()
        }),
    }
    Ok(())
}

/// Dequantizes `src` (whole blocks of `ty`) into `dst`, as ggml's `dequantize_row_*` /
/// `ggml_fp16_to_fp32_row` / `ggml_bf16_to_fp32_row`.
///
/// `dst.len()` must be a multiple of `ty.block_size()` and `src.len()` exactly its byte size.
/// Any byte pattern is accepted.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    let expected = bytes_for(ty, dst.len())?;
    check_len(ty, "source", expected, src.len())?;
    match ty {
        GgmlType::F32 => {
            for (b, y) in src.chunks_exact(4).zip(dst.iter_mut()) {
                *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => float::f16_to_f32_slice(src, dst)?,
        GgmlType::BF16 => float::bf16_to_f32_slice(src, dst)?,
        GgmlType::Q4_0 => dequant_blocks::<QK, { BlockQ4_0::BYTES }>(src, dst, |b, y| {
            legacy::dequantize_q4_0(&BlockQ4_0::from_bytes(b), y)
        }),
        GgmlType::Q4_1 => dequant_blocks::<QK, { BlockQ4_1::BYTES }>(src, dst, |b, y| {
            legacy::dequantize_q4_1(&BlockQ4_1::from_bytes(b), y)
        }),
        GgmlType::Q5_0 => dequant_blocks::<QK, { BlockQ5_0::BYTES }>(src, dst, |b, y| {
            legacy::dequantize_q5_0(&BlockQ5_0::from_bytes(b), y)
        }),
        GgmlType::Q5_1 => dequant_blocks::<QK, { BlockQ5_1::BYTES }>(src, dst, |b, y| {
            legacy::dequantize_q5_1(&BlockQ5_1::from_bytes(b), y)
        }),
        GgmlType::Q8_0 => dequant_blocks::<QK, { BlockQ8_0::BYTES }>(src, dst, |b, y| {
            legacy::dequantize_q8_0(&BlockQ8_0::from_bytes(b), y)
        }),
        GgmlType::Q2K => dequant_blocks::<QK_K, { BlockQ2K::BYTES }>(src, dst, |b, y| {
            kquants::dequantize_q2_k(&BlockQ2K::from_bytes(b), y)
        }),
        GgmlType::Q3K => dequant_blocks::<QK_K, { BlockQ3K::BYTES }>(src, dst, |b, y| {
            kquants::dequantize_q3_k(&BlockQ3K::from_bytes(b), y)
        }),
        GgmlType::Q4K => dequant_blocks::<QK_K, { BlockQ4K::BYTES }>(src, dst, |b, y| {
            kquants::dequantize_q4_k(&BlockQ4K::from_bytes(b), y)
        }),
        GgmlType::Q5K => dequant_blocks::<QK_K, { BlockQ5K::BYTES }>(src, dst, |b, y| {
            kquants::dequantize_q5_k(&BlockQ5K::from_bytes(b), y)
        }),
        GgmlType::Q6K => dequant_blocks::<QK_K, { BlockQ6K::BYTES }>(src, dst, |b, y| {
            kquants::dequantize_q6_k(&BlockQ6K::from_bytes(b), y)
        }),
        GgmlType::Q8K => dequant_blocks::<QK_K, { BlockQ8K::BYTES }>(src, dst, |b, y| {
            kquants::dequantize_q8_k(&BlockQ8K::from_bytes(b), y)
        }),
    }
    Ok(())
}

#[cfg(test)]
mod tests;
