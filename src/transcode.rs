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
    let in_row = src_ty
        .row_size(cols as u64)
        .ok_or_else(|| anyhow!("tensor {tensor}: rows of {cols} values do not fit {src_ty}"))?
        as usize;
    let out_row = dst_ty
        .row_size(cols as u64)
        .ok_or_else(|| anyhow!("tensor {tensor}: rows of {cols} values do not fit {dst_ty}"))?
        as usize;
    if src.len() != rows * in_row {
        bail!(
            "tensor {tensor}: {} bytes of data, expected {} ({rows} rows of {cols} {src_ty})",
            src.len(),
            rows * in_row
        );
    }
    out.clear();
    out.resize(rows * out_row, 0);
    if src_ty == dst_ty {
        out.par_chunks_mut(out_row)
            .enumerate()
            .for_each(|(r, dst)| {
                let s = src_row_of(r);
                dst.copy_from_slice(&src[s * in_row..(s + 1) * in_row]);
            });
        return Ok(());
    }
    out.par_chunks_mut(out_row)
        .enumerate()
        .try_for_each_init(
            || vec![0f32; cols],
            |buf, (r, dst)| -> Result<()> {
                let s = src_row_of(r);
                kiln_quant::dequantize_row(src_ty, &src[s * in_row..(s + 1) * in_row], buf)?;
                if dst_ty.is_quantized() {
                    // A branch-free fold vectorizes; the position is looked up only on failure.
                    let finite = buf.iter().fold(true, |ok, v| ok & v.is_finite());
                    if let Some(i) = (!finite).then(|| buf.iter().position(|v| !v.is_finite())).flatten() {
                        bail!(
                            "tensor {tensor}: row {s}, column {i} holds {}; llama.cpp refuses to quantize \
                             non-finite values, and so does kiln",
                            buf[i]
                        );
                    }
                }
                kiln_quant::quantize_row(dst_ty, buf, dst)?;
                Ok(())
            },
        )?;
    Ok(())
}

/// The identity row map.
pub fn same_row(r: usize) -> usize {
    r
}
