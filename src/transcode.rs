//! Row-parallel re-encoding of a tensor from one ggml type to another (dequantize or widen each row
//! to f32, then quantize it), with an optional row permutation and a finiteness check.

use anyhow::{anyhow, bail, Result};
use kiln_quant::GgmlType;
use rayon::prelude::*;

/// Re-encodes `rows` rows of `cols` values from `src_ty` bytes to `dst_ty` bytes. `src_row_of(r)`
/// names the source row of output row `r` (identity unless the rows are permuted). Values that are
/// not finite are refused, naming `tensor` and the row, since llama.cpp's quantizers would write
/// NaN or Inf scales that its own loader then rejects.
pub fn transcode(
    tensor: &str,
    src_ty: GgmlType,
    src: &[u8],
    dst_ty: GgmlType,
    rows: usize,
    cols: usize,
    src_row_of: &(dyn Fn(usize) -> usize + Sync),
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    transcode_into(
        tensor, src_ty, src, dst_ty, rows, cols, src_row_of, &mut out,
    )?;
    Ok(out)
}

/// [`transcode`] into a caller's buffer, so a loop over tensors reuses one allocation (its pages stay
/// mapped instead of being faulted in again for every tensor).
#[allow(clippy::too_many_arguments)]
pub fn transcode_into(
    tensor: &str,
    src_ty: GgmlType,
    src: &[u8],
    dst_ty: GgmlType,
    rows: usize,
    cols: usize,
    src_row_of: &(dyn Fn(usize) -> usize + Sync),
    out: &mut Vec<u8>,
) -> Result<()> {
    let (in_row, out_row) = row_sizes(tensor, src_ty, src.len(), dst_ty, rows, cols)?;
    out.clear();
    out.resize(rows * out_row, 0);
    out.par_chunks_mut(out_row).enumerate().try_for_each_init(
        || vec![0f32; cols],
        |buf, (r, dst)| -> Result<()> {
            let s = src_row_of(r);
            let row = &src[s * in_row..(s + 1) * in_row];
            encode_row(tensor, s, src_ty, row, dst_ty, None, buf, dst)
        },
    )?;
    Ok(())
}

/// Bytes per row of `cols` values in `src_ty` and in `dst_ty`, after checking that `src_len` bytes
/// are exactly `rows` such rows.
pub fn row_sizes(
    tensor: &str,
    src_ty: GgmlType,
    src_len: usize,
    dst_ty: GgmlType,
    rows: usize,
    cols: usize,
) -> Result<(usize, usize)> {
    let in_row = src_ty
        .row_size(cols as u64)
        .ok_or_else(|| anyhow!("tensor {tensor}: rows of {cols} values do not fit {src_ty}"))?
        as usize;
    let out_row = dst_ty
        .row_size(cols as u64)
        .ok_or_else(|| anyhow!("tensor {tensor}: rows of {cols} values do not fit {dst_ty}"))?
        as usize;
    if Some(src_len) != rows.checked_mul(in_row) {
        bail!(
            "tensor {tensor}: {src_len} bytes of data, expected {} ({rows} rows of {cols} {src_ty})",
            rows.saturating_mul(in_row)
        );
    }
    Ok((in_row, out_row))
}

/// Re-encodes one row (`row` names it in errors): copied when the types are equal, else decoded
/// to f32 in `buf` (`cols` long), refused if not finite when the target is quantized (llama.cpp's
/// quantizers would write NaN or Inf scales that its own loader then rejects), and quantized into
/// `dst`, with importance `weights` for the row when given.
#[allow(clippy::too_many_arguments)]
pub fn encode_row(
    tensor: &str,
    row: usize,
    src_ty: GgmlType,
    src: &[u8],
    dst_ty: GgmlType,
    weights: Option<&[f32]>,
    buf: &mut [f32],
    dst: &mut [u8],
) -> Result<()> {
    if src_ty == dst_ty {
        dst.copy_from_slice(src);
        return Ok(());
    }
    kiln_quant::dequantize_row(src_ty, src, buf)?;
    if dst_ty.is_quantized() {
        // A branch-free fold vectorizes; the position is looked up only on failure.
        let finite = buf.iter().fold(true, |ok, v| ok & v.is_finite());
        if let Some(i) = (!finite)
            .then(|| buf.iter().position(|v| !v.is_finite()))
            .flatten()
        {
            bail!(
                "tensor {tensor}: row {row}, column {i} holds {}; llama.cpp refuses to quantize \
                 non-finite values, and so does kiln",
                buf[i]
            );
        }
    }
    match weights {
        Some(w) => kiln_quant::quantize_row_weighted(dst_ty, buf, w, dst)?,
        None => kiln_quant::quantize_row(dst_ty, buf, dst)?,
    }
    Ok(())
}

/// The identity row map.
pub fn same_row(r: usize) -> usize {
    r
}
