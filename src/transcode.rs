//! Row-parallel re-encoding of a tensor from one ggml type to another (dequantize or widen each row
//! to f32, then quantize it), with an optional row permutation and a finiteness check.

use anyhow::{anyhow, bail, Result};
use kiln_quant::GgmlType;
use rayon::prelude::*;

/// A tensor being re-encoded: its name (for errors), its matrix shape and the two types.
#[derive(Clone, Copy, Debug)]
pub struct Recode<'a> {
    pub tensor: &'a str,
    pub src_ty: GgmlType,
    pub dst_ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
}

impl Recode<'_> {
    /// Bytes per row in the source and in the target type, after checking that `src_len` bytes
    /// are exactly `rows` source rows.
    pub fn row_sizes(&self, src_len: usize) -> Result<(usize, usize)> {
        let Recode {
            tensor,
            src_ty,
            dst_ty,
            rows,
            cols,
        } = *self;
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
}

/// Re-encodes the `rows` rows of `src` from `r.src_ty` bytes to `r.dst_ty` bytes. `src_row_of(r)`
/// names the source row of output row `r` (identity unless the rows are permuted). Values that are
/// not finite are refused, naming the tensor and the row, since llama.cpp's quantizers would write
/// NaN or Inf scales that its own loader then rejects.
pub fn transcode(
    r: Recode<'_>,
    src: &[u8],
    src_row_of: &(dyn Fn(usize) -> usize + Sync),
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    transcode_into(r, src, src_row_of, &mut out)?;
    Ok(out)
}

/// [`transcode`] into a caller's buffer, so a loop over tensors reuses one allocation (its pages stay
/// mapped instead of being faulted in again for every tensor).
pub fn transcode_into(
    r: Recode<'_>,
    src: &[u8],
    src_row_of: &(dyn Fn(usize) -> usize + Sync),
    out: &mut Vec<u8>,
) -> Result<()> {
    let (in_row, out_row) = r.row_sizes(src.len())?;
    out.clear();
    out.resize(r.rows * out_row, 0);
    out.par_chunks_mut(out_row).enumerate().try_for_each_init(
        || vec![0f32; r.cols],
        |buf, (i, dst)| -> Result<()> {
            let s = src_row_of(i);
            let row = &src[s * in_row..(s + 1) * in_row];
            encode_row(&r, s, row, None, buf, dst)
        },
    )?;
    Ok(())
}

/// Re-encodes one row of `r` (`row` names it in errors): copied when the types are equal, else
/// decoded to f32 in `buf` (`cols` long), refused if not finite when the target is quantized
/// (llama.cpp's quantizers would write NaN or Inf scales that its own loader then rejects), and
/// quantized into `dst`, with importance `weights` for the row when given.
pub fn encode_row(
    r: &Recode<'_>,
    row: usize,
    src: &[u8],
    weights: Option<&[f32]>,
    buf: &mut [f32],
    dst: &mut [u8],
) -> Result<()> {
    let Recode {
        tensor,
        src_ty,
        dst_ty,
        ..
    } = *r;
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
