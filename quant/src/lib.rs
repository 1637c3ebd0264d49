//! kiln-quant: ggml block types, reference quantizers bit-exact with llama.cpp, and SIMD kernels.

pub mod blocks;
pub mod dot;
pub mod error;
pub mod lowrank;
pub mod reference;
pub mod simd;
pub mod types;

use rayon::prelude::*;

pub use error::QuantError;
pub use reference::float::{
    bf16_bits_to_f32, bf16_to_f32_slice, f16_bits_to_f32, f16_to_f32_slice, f32_to_bf16_bits,
    f32_to_f16_bits,
};
pub use reference::quantize_row_ref;
pub use reference::weighted::{quantize_row_weighted, uses_weights};
pub use simd::Isa;
pub use types::GgmlType;

/// Quantizes one row (any whole number of blocks) of `src` into `dst`.
///
/// This is the fast-path entry point: it runs the SIMD kernels of [`Isa::current`] (AVX-512 or
/// AVX2 when the CPU has them, the reference with `KILN_FORCE_SCALAR=1`), and its output is always
/// byte-identical to [`quantize_row_ref`].
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    simd::quantize_row_with(Isa::current(), ty, src, dst)
}

/// Dequantizes `src` (whole blocks of `ty`) into `dst`, as ggml's `dequantize_row_*` /
/// `ggml_fp16_to_fp32_row` / `ggml_bf16_to_fp32_row` (F16 widening uses F16C when available;
/// the values are identical to [`reference::dequantize_row`]'s).
///
/// `dst.len()` must be a multiple of `ty.block_size()` and `src.len()` exactly its byte size.
/// Any byte pattern is accepted.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    simd::dequantize_row_with(Isa::current(), ty, src, dst)
}

/// Quantizes `src`, a row-major matrix with `n_per_row` columns, into `dst`, rows in parallel
/// (rayon). The bytes are identical to quantizing the rows one after another.
///
/// `n_per_row` must be non-zero, divide `src.len()` and be a multiple of `ty.block_size()`;
/// `dst.len()` must be exactly `rows * row_size`.
pub fn quantize_rows(
    ty: GgmlType,
    src: &[f32],
    n_per_row: usize,
    dst: &mut [u8],
) -> Result<(), QuantError> {
    if n_per_row == 0 || !src.len().is_multiple_of(n_per_row) {
        return Err(QuantError::BadRowLength {
            ty,
            n_per_row,
            len: src.len(),
        });
    }
    let row_bytes = reference::bytes_for(ty, n_per_row)?;
    let rows = src.len() / n_per_row;
    let total = rows
        .checked_mul(row_bytes)
        .ok_or(QuantError::SizeOverflow {
            ty,
            elements: src.len(),
        })?;
    reference::check_len(ty, "destination", total, dst.len())?;
    if rows == 0 {
        return Ok(());
    }
    src.par_chunks(n_per_row)
        .zip(dst.par_chunks_mut(row_bytes))
        .try_for_each(|(s, d)| quantize_row(ty, s, d))
}

/// Quantizes `src`, a row-major matrix with `n_per_row` columns, with importance weights
/// `weights` (one per column, shared by every row: llama-quantize's imatrix for this tensor), rows
/// in parallel. The bytes equal ggml's `quantize_*(src, dst, rows, n_per_row, weights)`; for types
/// without a weighted path they equal [`quantize_rows`].
///
/// Same length rules as [`quantize_rows`], and `weights.len()` must equal `n_per_row`.
pub fn quantize_rows_weighted(
    ty: GgmlType,
    src: &[f32],
    n_per_row: usize,
    weights: &[f32],
    dst: &mut [u8],
) -> Result<(), QuantError> {
    if !uses_weights(ty) {
        return quantize_rows(ty, src, n_per_row, dst);
    }
    if n_per_row == 0 || !src.len().is_multiple_of(n_per_row) {
        return Err(QuantError::BadRowLength {
            ty,
            n_per_row,
            len: src.len(),
        });
    }
    if weights.len() != n_per_row {
        return Err(QuantError::ElementCount {
            what: "importance weights",
            expected: n_per_row,
            actual: weights.len(),
        });
    }
    let row_bytes = reference::bytes_for(ty, n_per_row)?;
    let rows = src.len() / n_per_row;
    let total = rows
        .checked_mul(row_bytes)
        .ok_or(QuantError::SizeOverflow {
            ty,
            elements: src.len(),
        })?;
    reference::check_len(ty, "destination", total, dst.len())?;
    src.par_chunks(n_per_row)
        .zip(dst.par_chunks_mut(row_bytes))
        .try_for_each(|(s, d)| quantize_row_weighted(ty, s, weights, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32) * 0.37).sin() * (1.0 + (i % 97) as f32 * 0.05))
            .collect()
    }

    #[test]
    fn rows_equal_sequential() {
        let n_per_row = 512;
        let rows = 9;
        let x = signal(n_per_row * rows);
        for ty in GgmlType::ALL {
            let rb = ty.row_size(n_per_row as u64).unwrap() as usize;
            let mut par = vec![0u8; rb * rows];
            quantize_rows(ty, &x, n_per_row, &mut par).unwrap();
            let mut seq = vec![0u8; rb * rows];
            for (s, d) in x.chunks(n_per_row).zip(seq.chunks_mut(rb)) {
                quantize_row_ref(ty, s, d).unwrap();
            }
            assert_eq!(par, seq, "{ty}");
            // one call over the whole matrix gives the same bytes too (blocks are independent)
            let mut whole = vec![0u8; rb * rows];
            quantize_row(ty, &x, &mut whole).unwrap();
            assert_eq!(whole, seq, "{ty}");
        }
    }

    #[test]
    fn weighted_rows_equal_sequential() {
        let n_per_row = 512;
        let rows = 5;
        let x = signal(n_per_row * rows);
        let w: Vec<f32> = (0..n_per_row).map(|i| 0.1 + (i % 13) as f32).collect();
        for ty in GgmlType::ALL {
            let rb = ty.row_size(n_per_row as u64).unwrap() as usize;
            let mut par = vec![0u8; rb * rows];
            quantize_rows_weighted(ty, &x, n_per_row, &w, &mut par).unwrap();
            let mut seq = vec![0u8; rb * rows];
            for (s, d) in x.chunks(n_per_row).zip(seq.chunks_mut(rb)) {
                quantize_row_weighted(ty, s, &w, d).unwrap();
            }
            assert_eq!(par, seq, "{ty}");
        }
        assert!(matches!(
            quantize_rows_weighted(GgmlType::Q4K, &x, n_per_row, &w[..10], &mut [0u8; 10]),
            Err(QuantError::ElementCount { .. })
        ));
    }

    #[test]
    fn rows_errors() {
        let x = signal(512);
        let mut out = vec![0u8; 4096];
        assert!(matches!(
            quantize_rows(GgmlType::Q4_0, &x, 0, &mut out),
            Err(QuantError::BadRowLength { n_per_row: 0, .. })
        ));
        assert!(matches!(
            quantize_rows(GgmlType::Q4_0, &x, 100, &mut out),
            Err(QuantError::BadRowLength { .. })
        ));
        assert!(matches!(
            quantize_rows(GgmlType::Q4K, &x, 128, &mut out),
            Err(QuantError::NotBlockMultiple { .. })
        ));
        assert!(matches!(
            quantize_rows(GgmlType::Q4_0, &x, 256, &mut out),
            Err(QuantError::ByteLength { expected: 288, .. })
        ));
        assert!(quantize_rows(GgmlType::Q4_0, &[], 32, &mut []).is_ok());
    }
}
