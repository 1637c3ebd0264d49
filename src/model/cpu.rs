//! The CPU backend: weights stay in the memory-mapped GGUF, matrix products quantize the
//! activations to the weight type's partner format and use kiln-quant's dot kernels, tiled over
//! weight rows and spread across threads with rayon; f16 KV cache; f32 everything else.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{bail, Context, Result};
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use kiln_formats::gguf::{GgufFile, TensorInfo};
use kiln_quant::dot::attn::{attend_head, HeadView, Queries};
use kiln_quant::dot::repack;
use kiln_quant::dot::{
    act_format, act_row_bytes, check_row, dot_many_fn, gemm_f16_fast, gemm_f16_par, quantize_act,
    rope_pairs, ActFormat, ActRows, DotManyFn, TILED_MIN_ROWS,
};
use kiln_quant::{GgmlType, Isa};
use rayon::prelude::*;

use super::{AttnShape, Backend, Qkv, Rope};

/// Weight rows per parallel task of a matrix product with few tokens.
const ROW_TILE: usize = 16;
/// Tokens per parallel task of a matrix product over a prompt.
const TOKEN_TILE: usize = 128;
/// Upper bound on one cache's size in bytes.
const MAX_CACHE_BYTES: usize = 64 << 30;

/// The CPU backend (threads come from rayon's global pool).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

/// A weight tensor: the mapped file and where its rows are.
pub struct CpuWeight {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    file: Arc<GgufFile>,
    info: TensorInfo,
    act: Option<ActFormat>,
    /// Tile kernels in ggml-cpu's order for fewer than [`TILED_MIN_ROWS`] activation rows and
    /// for more.
    many: Option<(DotManyFn, DotManyFn)>,
    /// 1-D f32 vectors (norm weights), decoded once.
    dense: Option<Vec<f32>>,
    /// The rows repacked into 16-row groups for the VNNI kernels (`kiln_quant::dot::repack`).
    packed: Option<Vec<u8>>,
}

impl CpuWeight {
    fn bytes(&self) -> &[u8] {
        self.file.tensor_data(&self.info)
    }
}

/// A row-major f32 matrix. Its buffer goes back to the buffer pool when it is dropped.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuAct {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl Drop for CpuAct {
    fn drop(&mut self) {
        give_buf(std::mem::take(&mut self.data));
    }
}

/// Buffers of dropped activations, kept for the next ones. A forward pass over a prompt frees and
/// allocates the same few sizes (megabytes each) in every layer; the allocator hands such sizes
/// back to the kernel, and every fresh allocation then costs a page fault per 4 KiB (about 40,000
/// per pass over 512 tokens of the 400M test model, ~4% of its time).
static POOL: Mutex<Pool> = Mutex::new(Pool(Vec::new()));
/// Buffers the pool keeps at most (the largest ones).
const POOL_MAX: usize = 8;

/// Spare f32 buffers.
struct Pool(Vec<Vec<f32>>);

impl Pool {
    /// The smallest buffer that holds `n` floats, as `n` floats of unspecified value.
    fn take(&mut self, n: usize) -> Option<Vec<f32>> {
        let i = (0..self.0.len())
            .filter(|&i| self.0[i].capacity() >= n)
            .min_by_key(|&i| self.0[i].capacity())?;
        let mut v = self.0.swap_remove(i);
        if v.len() < n {
            v.resize(n, 0.0);
        } else {
            v.truncate(n);
        }
        Some(v)
    }

    /// Keeps `v`; when that makes more than [`POOL_MAX`], returns the smallest one to drop.
    fn give(&mut self, v: Vec<f32>) -> Option<Vec<f32>> {
        if v.capacity() == 0 {
            return None;
        }
        self.0.push(v);
        if self.0.len() <= POOL_MAX {
            return None;
        }
        let i = (0..self.0.len()).min_by_key(|&i| self.0[i].capacity())?;
        Some(self.0.swap_remove(i))
    }
}

/// A buffer of `n` floats whose contents are unspecified (an earlier activation's values; NaN in
/// debug builds, so that an element left unwritten shows): the caller writes every element.
fn take_buf(n: usize) -> Vec<f32> {
    let spare = POOL.lock().unwrap_or_else(PoisonError::into_inner).take(n);
    match spare {
        Some(mut v) => {
            if cfg!(debug_assertions) {
                v.fill(f32::NAN);
            }
            v
        }
        None => vec![0f32; n],
    }
}

/// Returns a buffer to the pool.
fn give_buf(v: Vec<f32>) {
    // a buffer dropped by the pool is freed after the lock is released
    let dropped = POOL.lock().unwrap_or_else(PoisonError::into_inner).give(v);
    drop(dropped);
}

thread_local! {
    /// The quantized activations of matrix products called from this thread (reused, for the
    /// same reason as [`POOL`]; every byte used is written first).
    static ACTS: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The f16 K and V rows of every layer.
pub struct CpuCache {
    n_ctx: usize,
    kv_dim: usize,
    k: Vec<Vec<u16>>,
    v: Vec<Vec<u16>>,
}

/// A product with repacked weights `p` (`n` rows of `k` values of type `ty`) and `t` activation
/// rows `qa` (`rb` bytes each): token tiles in parallel for a prompt, groups of 16 rows otherwise.
fn packed_matmul(
    ty: GgmlType,
    p: &[u8],
    k: usize,
    n: usize,
    qa: &[u8],
    rb: usize,
    t: usize,
) -> Result<CpuAct> {
    let gbytes = repack::repacked_bytes(ty, repack::GROUP, k).context("repacked size")?;
    // bytes per token of prepared Q8_0 blocks or of the Q8_K rows themselves (a type without
    // one: matmul refuses the product)
    let astride = repack::act_stride(ty, k).unwrap_or(0);
    // every output is written by repack::matmul (or the product fails)
    let mut data = take_buf(n * t);
    let run = |j0: usize, nt: usize, w: &[u8], out: &mut [f32]| -> Result<()> {
        let acts = qa.get(j0 * rb..(j0 + nt) * rb).unwrap_or(&[]);
        let prep = repack::prepare(ty, k, acts, nt);
        let a = ActRows {
            bytes: prep.as_deref().unwrap_or(acts),
            stride: astride,
            n: nt,
        };
        if !repack::matmul(ty, k, w, a, t >= TILED_MIN_ROWS, out, n) {
            bail!("repacked {ty} product does not fit");
        }
        Ok(())
    };
    if t >= TOKEN_TILE {
        data.par_chunks_mut(TOKEN_TILE * n)
            .enumerate()
            .try_for_each(|(gi, o)| run(gi * TOKEN_TILE, o.len() / n.max(1), p, o))?;
    } else {
        // few tokens: tiles of row groups in parallel, each into its own token-major slice
        const GROUPS: usize = 4;
        let acts = qa.get(..t * rb).unwrap_or(&[]);
        let prep = repack::prepare(ty, k, acts, t);
        let a = ActRows {
            bytes: prep.as_deref().unwrap_or(acts),
            stride: astride,
            n: t,
        };
        let tile = GROUPS * repack::GROUP;
        let mut parts = take_buf(n * t);
        parts
            .par_chunks_mut(tile * t)
            .zip(p.par_chunks(GROUPS * gbytes))
            .try_for_each(|(o, w)| {
                if !repack::matmul(ty, k, w, a, t >= TILED_MIN_ROWS, o, o.len() / t) {
                    bail!("repacked {ty} product does not fit");
                }
                Ok(())
            })?;
        for (c, part) in parts.chunks(tile * t).enumerate() {
            let rows = part.len() / t;
            for (j, row) in part.chunks_exact(rows).enumerate() {
                data[j * n + c * tile..][..rows].copy_from_slice(row);
            }
        }
        give_buf(parts);
    }
    Ok(CpuAct {
        data,
        rows: t,
        cols: n,
    })
}

/// [`CpuBackend`]'s matrix product with `qa` (`rb` bytes for each of `x`'s rows) to quantize the
/// activations into, in the weight's partner format `af`.
fn matmul_acts(
    w: &CpuWeight,
    af: ActFormat,
    x: &CpuAct,
    qa: &mut [u8],
    rb: usize,
) -> Result<CpuAct> {
    let Some((few, batch)) = w.many else {
        bail!("{} weights cannot be multiplied", w.ty);
    };
    let k = w.cols;
    let n = w.rows;
    let t = x.rows;
    let many = if t >= TILED_MIN_ROWS { batch } else { few };
    let wb = w.bytes();
    qa.par_chunks_mut(rb)
        .zip(x.data.par_chunks(k))
        .for_each(|(o, r)| quantize_act(af, r, o));
    let wrows = |r: usize, nr: usize| {
        wb.get(r * w.row_bytes..(r + nr) * w.row_bytes)
            .unwrap_or(&[])
    };
    if let Some(p) = w.packed.as_deref().filter(|_| repack::handles(w.ty)) {
        return packed_matmul(w.ty, p, k, n, qa, rb, t);
    }
    // every output is written below
    let mut data = take_buf(n * t);
    if w.ty == GgmlType::F16 && t >= TOKEN_TILE && gemm_f16_fast() {
        // packed, cache-blocked kernel: tiles of tokens times chunks of rows in parallel,
        // outputs written in place
        let acts = ActRows {
            bytes: qa,
            stride: rb,
            n: t,
        };
        gemm_f16_par(wb, w.row_bytes, acts, &mut data, n, TOKEN_TILE);
    } else if t >= TOKEN_TILE {
        // prompt: tiles of tokens in parallel; each weight row is decoded once per tile and
        // multiplied against all of its activation rows, outputs written in place
        data.par_chunks_mut(TOKEN_TILE * n)
            .enumerate()
            .for_each(|(gi, o)| {
                let nt = o.len() / n.max(1);
                let acts = qa
                    .get(gi * TOKEN_TILE * rb..(gi * TOKEN_TILE + nt) * rb)
                    .unwrap_or(&[]);
                let mut tmp = [0f32; ROW_TILE * TOKEN_TILE];
                for r0 in (0..n).step_by(ROW_TILE) {
                    let nr = ROW_TILE.min(n - r0);
                    let tmp = &mut tmp[..nr * nt];
                    many(wrows(r0, nr), w.row_bytes, acts, rb, tmp);
                    for (i, tr) in tmp.chunks_exact(nt).enumerate() {
                        for (j, &v) in tr.iter().enumerate() {
                            o[j * n + r0 + i] = v;
                        }
                    }
                }
            });
    } else {
        // few tokens (decoding): tiles of weight rows in parallel, memory-bound
        let mut out_t = if t == 1 {
            std::mem::take(&mut data)
        } else {
            take_buf(n * t)
        };
        out_t
            .par_chunks_mut(ROW_TILE * t)
            .enumerate()
            .for_each(|(ci, o)| {
                let nr = o.len() / t;
                many(wrows(ci * ROW_TILE, nr), w.row_bytes, qa, rb, o);
            });
        if t == 1 {
            data = out_t;
        } else {
            for (ti, row) in data.chunks_mut(n).enumerate() {
                for (r, y) in row.iter_mut().enumerate() {
                    *y = out_t[r * t + ti];
                }
            }
            give_buf(out_t);
        }
    }
    Ok(CpuAct {
        data,
        rows: t,
        cols: n,
    })
}

impl Backend for CpuBackend {
    type Weight = CpuWeight;
    type Act = CpuAct;
    type Cache = CpuCache;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn load_weight(&self, file: &Arc<GgufFile>, t: &TensorInfo) -> Result<CpuWeight> {
        let cols = usize::try_from(t.row_len()).context("row too long")?;
        let rows = usize::try_from(t.n_rows()).context("too many rows")?;
        let row_bytes =
            usize::try_from(t.ty.row_size(t.row_len()).unwrap_or(0)).context("row too large")?;
        let data = file.tensor_data(t);
        if row_bytes == 0 || rows.checked_mul(row_bytes) != Some(data.len()) {
            bail!(
                "tensor {} ({}) has {} bytes, expected {rows} rows of {row_bytes}",
                t.name,
                t.ty,
                data.len()
            );
        }
        // weights the VNNI kernels take are repacked once (a heap copy; the mapped pages are
        // released and only fault back in for products the original layout serves); not the
        // embedding table, of which lookups touch only the rows they need (a tied output head,
        // loaded from the same tensor, keeps the original layout)
        let packed = if t.shape.len() > 1
            && t.name != "token_embd.weight"
            && repack::supported(t.ty, rows, cols)
        {
            let p = repack::repack(t.ty, rows, cols, data);
            file.release(t);
            p
        } else {
            // fault the mapped pages in now (llama.cpp's warm-up run does the same), so the
            // first evaluation does not pay for them
            let mut touch = 0u8;
            for page in data.chunks(4096) {
                touch ^= page[0];
            }
            std::hint::black_box(touch);
            None
        };
        let dense = if t.shape.len() == 1 {
            let mut v = vec![0f32; cols];
            kiln_quant::dequantize_row(t.ty, data, &mut v)
                .with_context(|| format!("decoding {}", t.name))?;
            Some(v)
        } else {
            check_row(t.ty, cols, row_bytes)
                .with_context(|| format!("{} cannot be used in a matrix product", t.name))?;
            None
        };
        Ok(CpuWeight {
            ty: t.ty,
            rows,
            cols,
            row_bytes,
            file: Arc::clone(file),
            info: t.clone(),
            act: act_format(t.ty),
            many: dot_many_fn(t.ty, Isa::current(), false).zip(dot_many_fn(
                t.ty,
                Isa::current(),
                true,
            )),
            dense,
            packed,
        })
    }

    fn new_cache(&self, n_layer: usize, n_ctx: usize, kv_dim: usize) -> Result<CpuCache> {
        let per = n_ctx
            .checked_mul(kv_dim)
            .filter(|&n| n.saturating_mul(4).saturating_mul(n_layer) <= MAX_CACHE_BYTES)
            .with_context(|| {
                format!("a KV cache of {n_ctx} positions × {n_layer} layers is too large")
            })?;
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..n_layer {
            k.push(vec![0u16; per]);
            v.push(vec![0u16; per]);
        }
        Ok(CpuCache {
            n_ctx,
            kv_dim,
            k,
            v,
        })
    }

    fn embed(&self, table: &CpuWeight, tokens: &[u32]) -> Result<CpuAct> {
        let cols = table.cols;
        let mut data = vec![0f32; tokens.len() * cols];
        let bytes = table.bytes();
        for (&t, out) in tokens.iter().zip(data.chunks_exact_mut(cols)) {
            let t = t as usize;
            let row = bytes
                .get(t * table.row_bytes..(t + 1) * table.row_bytes)
                .with_context(|| format!("token {t} is outside the embedding table"))?;
            kiln_quant::dequantize_row(table.ty, row, out)?;
        }
        Ok(CpuAct {
            data,
            rows: tokens.len(),
            cols,
        })
    }

    fn rms_norm(&self, x: &CpuAct, w: &CpuWeight, eps: f32) -> Result<CpuAct> {
        let wv = match &w.dense {
            Some(v) if v.len() == x.cols => v,
            _ => bail!("norm weight does not match rows of {}", x.cols),
        };
        let mut data = take_buf(x.data.len());
        data.par_chunks_mut(x.cols)
            .zip(x.data.par_chunks(x.cols))
            .for_each(|(out, row)| {
                let sum: f64 = row.iter().map(|&v| f64::from(v * v)).sum();
                let mean = (sum / row.len() as f64) as f32;
                let scale = 1.0 / (mean + eps).sqrt();
                for ((y, &v), &g) in out.iter_mut().zip(row).zip(wv) {
                    *y = v * scale * g;
                }
            });
        Ok(CpuAct {
            data,
            rows: x.rows,
            cols: x.cols,
        })
    }

    fn matmul(&self, w: &CpuWeight, x: &CpuAct) -> Result<CpuAct> {
        if x.cols != w.cols {
            bail!(
                "matrix product of rows of {} with a {} weight of rows of {}",
                x.cols,
                w.ty,
                w.cols
            );
        }
        let Some(af) = w.act else {
            bail!("{} weights cannot be multiplied", w.ty);
        };
        let t = x.rows;
        let rb = act_row_bytes(af, w.cols).context("activation row does not fit blocks")?;
        let mut qbuf = ACTS.with(|c| c.take());
        if qbuf.len() < rb * t {
            qbuf.resize(rb * t, 0);
        }
        let r = matmul_acts(w, af, x, &mut qbuf[..rb * t], rb);
        ACTS.with(|c| c.replace(qbuf));
        r
    }

    fn rope(
        &self,
        x: &mut CpuAct,
        n_head: usize,
        head_dim: usize,
        n_rot: usize,
        pos0: usize,
        rope: &Rope,
    ) -> Result<()> {
        let theta_scale = rope.freq_base.powf(-2.0 / n_rot as f32);
        let factors = rope.factors.as_deref();
        let cols = x.cols;
        x.data
            .par_chunks_mut(cols)
            .enumerate()
            .for_each(|(i, row)| {
                // ggml_rope_cache_init: theta multiplied up in f32
                let mut cache = vec![0f32; n_rot];
                let mut theta = (pos0 + i) as f32;
                for (p, c) in cache.chunks_exact_mut(2).enumerate() {
                    // ggml_rope_cache_init: theta / freq_factor[pair] when the model has them
                    let th = match factors.and_then(|f| f.get(p)) {
                        Some(&f) => rope.freq_scale * (theta / f),
                        None => rope.freq_scale * theta,
                    };
                    c[0] = th.cos();
                    c[1] = th.sin();
                    theta *= theta_scale;
                }
                for h in row.chunks_exact_mut(head_dim).take(n_head) {
                    // ggml-cpu's rotate_pairs as GCC contracts it (checked bit for bit against
                    // libggml-cpu)
                    rope_pairs(&mut h[..n_rot], &cache);
                }
            });
        Ok(())
    }

    fn attention(
        &self,
        cache: &mut CpuCache,
        layer: usize,
        qkv: Qkv<'_, CpuAct>,
        n_past: usize,
        s: AttnShape,
    ) -> Result<CpuAct> {
        let Qkv { q, k, v } = qkv;
        let t = k.rows;
        let tq = q.rows;
        let kvd = cache.kv_dim;
        let n_kv = n_past + t;
        if n_kv > cache.n_ctx {
            bail!(
                "context full: {n_kv} positions do not fit the cache of {}",
                cache.n_ctx
            );
        }
        if k.cols != kvd
            || v.cols != kvd
            || tq > t
            || v.rows != t
            || q.cols != s.n_head * s.head_dim
            || kvd != s.n_head_kv * s.head_dim
        {
            bail!("attention inputs do not match the cache");
        }
        let (Some(kc), Some(vc)) = (cache.k.get_mut(layer), cache.v.get_mut(layer)) else {
            bail!("layer {layer} is not in the cache");
        };
        for (c, x) in [(&mut *kc, k), (&mut *vc, v)] {
            c[n_past * kvd..n_kv * kvd]
                .par_chunks_mut(kvd.max(1))
                .zip(x.data.par_chunks(kvd.max(1)))
                .for_each(|(dst, src)| {
                    let dst: &mut [f16] = dst.reinterpret_cast_mut();
                    dst.convert_from_f32_slice(src);
                });
        }
        // ggml-cpu's tiled flash attention order, one head per task, into head-major rows
        let (kc, vc): (&[u16], &[u16]) = (kc, vc);
        let hd = s.head_dim;
        let group = (s.n_head / s.n_head_kv.max(1)).max(1);
        let qc = q.cols;
        // every element is written (attend_head writes all `tq * hd` of its head)
        let mut heads = take_buf(s.n_head * tq * hd);
        heads
            .par_chunks_mut((tq * hd).max(1))
            .enumerate()
            .for_each(|(h, o)| {
                let view = HeadView {
                    k: &kc[..n_kv * kvd],
                    v: &vc[..n_kv * kvd],
                    stride: kvd,
                    off: (h / group) * hd,
                    hd,
                };
                // the queries are the last `tq` positions
                let p0 = n_past + t - tq;
                let qs = Queries {
                    q: &q.data,
                    stride: qc,
                    off: h * hd,
                    t: tq,
                    pos0: p0,
                };
                attend_head(view, qs, s.scale, o);
            });
        // token-major: row i is head 0's row i, head 1's row i, ...
        let mut out = take_buf(tq * qc);
        out.par_chunks_mut(qc.max(1))
            .enumerate()
            .for_each(|(i, orow)| {
                for (h, dst) in orow.chunks_exact_mut(hd.max(1)).enumerate() {
                    dst.copy_from_slice(&heads[(h * tq + i) * hd..][..hd]);
                }
            });
        give_buf(heads);
        Ok(CpuAct {
            data: out,
            rows: tq,
            cols: q.cols,
        })
    }

    fn swiglu(&self, gate: &CpuAct, up: &CpuAct) -> Result<CpuAct> {
        if gate.rows != up.rows || gate.cols != up.cols {
            bail!("swiglu operands differ in shape");
        }
        let mut data = take_buf(gate.data.len());
        data.par_chunks_mut(gate.cols.max(1))
            .zip(gate.data.par_chunks(gate.cols.max(1)))
            .zip(up.data.par_chunks(gate.cols.max(1)))
            .for_each(|((o, g), u)| kiln_quant::dot::swiglu(g, u, o));
        Ok(CpuAct {
            data,
            rows: gate.rows,
            cols: gate.cols,
        })
    }

    fn add(&self, x: &mut CpuAct, y: &CpuAct) -> Result<()> {
        if x.rows != y.rows || x.cols != y.cols {
            bail!("add operands differ in shape");
        }
        x.data
            .par_chunks_mut(x.cols.max(1))
            .zip(y.data.par_chunks(x.cols.max(1)))
            .for_each(|(a, b)| {
                for (a, b) in a.iter_mut().zip(b) {
                    *a += b;
                }
            });
        Ok(())
    }

    fn tail_rows(&self, x: &CpuAct, from: usize) -> Result<CpuAct> {
        let from = from.min(x.rows);
        let src = &x.data[from * x.cols..];
        let mut data = take_buf(src.len());
        data.copy_from_slice(src);
        Ok(CpuAct {
            data,
            rows: x.rows - from,
            cols: x.cols,
        })
    }

    fn to_host(&self, mut x: CpuAct) -> Result<Vec<f32>> {
        Ok(std::mem::take(&mut x.data))
    }

    fn host_view<'a>(&self, x: &'a CpuAct) -> Result<std::borrow::Cow<'a, [f32]>> {
        Ok(std::borrow::Cow::Borrowed(&x.data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_quant::dot::dot_f32_slices as dot_f32;

    #[test]
    fn dot_f32_matches_naive() {
        let a: Vec<f32> = (0..100).map(|i| (i as f32 * 0.3).sin()).collect();
        let b: Vec<f32> = (0..100).map(|i| (i as f32 * 0.7).cos()).collect();
        let naive: f64 = a.iter().zip(&b).map(|(&x, &y)| f64::from(x * y)).sum();
        assert!((f64::from(dot_f32(&a, &b)) - naive).abs() < 1e-4);
    }

    #[test]
    fn the_pool_hands_out_the_best_fit_and_keeps_the_largest() {
        let mut p = Pool(Vec::new());
        assert!(p.take(1).is_none());
        for n in [100, 10, 1000] {
            assert!(p.give(vec![1.0; n]).is_none());
        }
        assert!(p.give(Vec::new()).is_none());
        assert_eq!(p.0.len(), 3);
        let v = p.take(50).unwrap();
        assert_eq!((v.len(), v.capacity()), (50, 100));
        assert!(p.take(2000).is_none());
        // a shorter buffer grows to the length asked for, within its capacity
        assert!(p.give(v).is_none());
        assert_eq!(p.take(80).unwrap().len(), 80);
        for i in 0..2 * POOL_MAX {
            if let Some(d) = p.give(vec![0.0; 20 + i]) {
                assert!(p.0.iter().all(|v| v.capacity() >= d.capacity()));
            }
        }
        assert_eq!(p.0.len(), POOL_MAX);
        assert!(p.0.iter().any(|v| v.capacity() == 1000));
        assert_eq!(take_buf(7).len(), 7);
    }

    #[test]
    fn rope_position_zero_is_identity_and_rotation_preserves_norm() {
        let be = CpuBackend;
        let x0 = CpuAct {
            data: (0..16).map(|i| i as f32 - 7.5).collect(),
            rows: 2,
            cols: 8,
        };
        let mut x = x0.clone();
        let rope = Rope {
            freq_base: 10000.0,
            freq_scale: 1.0,
            factors: None,
        };
        be.rope(&mut x, 2, 4, 4, 0, &rope).unwrap();
        assert_eq!(x.data[..8], x0.data[..8]);
        for (a, b) in x.data[8..].chunks(2).zip(x0.data[8..].chunks(2)) {
            let na = a[0] * a[0] + a[1] * a[1];
            let nb = b[0] * b[0] + b[1] * b[1];
            assert!((na - nb).abs() < 1e-3);
        }
    }

    #[test]
    fn attention_of_one_token_returns_its_value() {
        let be = CpuBackend;
        let mut cache = be.new_cache(1, 4, 4).unwrap();
        let q = CpuAct {
            data: vec![0.3; 8],
            rows: 1,
            cols: 8,
        };
        let k = CpuAct {
            data: vec![0.5; 4],
            rows: 1,
            cols: 4,
        };
        let v = CpuAct {
            data: vec![1.0, 2.0, 3.0, 4.0],
            rows: 1,
            cols: 4,
        };
        let s = AttnShape {
            n_head: 2,
            n_head_kv: 1,
            head_dim: 4,
            scale: 0.5,
        };
        let qkv = Qkv {
            q: &q,
            k: &k,
            v: &v,
        };
        let o = be.attention(&mut cache, 0, qkv, 0, s).unwrap();
        assert_eq!(o.data, vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
        // overflowing the cache is an error, not a panic
        assert!(be.attention(&mut cache, 0, qkv, 4, s).is_err());
        assert!(be.attention(&mut cache, 3, qkv, 0, s).is_err());
    }
}
