//! The arithmetic of [`super::attn::attend_head`], safe code generic over the instruction set (each
//! ISA file compiles it with its features enabled).
//!
//! Causal attention of one head over an f16 KV cache, in the arithmetic order of ggml-cpu's tiled
//! flash attention (`ggml_compute_forward_flash_attn_ext_tiled`, what llama.cpp runs for batches
//! of 64 or more queries): keys in tiles of 64; per query, scores are sequential fused
//! multiply-adds over the head dimension times the scale; online softmax per tile (running max
//! `M`, rescale by libm `expf(Mold - Mnew)`, probabilities by [`super::ggml_v_expf`], their sum in
//! f64 from 16-lane pairwise partial sums); values accumulated by sequential fused
//! multiply-adds over the tile; the output scaled by `1/S`.

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use super::scalar::{ggml_v_expf, lanes_sum};

/// Keys per tile.
pub const KV_TILE: usize = 64;

/// One head's geometry inside the cache rows.
#[derive(Clone, Copy, Debug)]
pub struct HeadView<'a> {
    /// K rows (f16 bits), `stride` values per position.
    pub k: &'a [u16],
    /// V rows (f16 bits), `stride` values per position.
    pub v: &'a [u16],
    /// Values per cache row (all KV heads).
    pub stride: usize,
    /// Offset of this head inside a row.
    pub off: usize,
    /// Head dimension.
    pub hd: usize,
}

/// The query rows of one [`super::attn::attend_head`] call, `t` of them: row `i` at
/// `q[i * stride + off..]` (values past the end of `q` read as 0), at cache position `pos0 + i`.
#[derive(Clone, Copy, Debug)]
pub struct Queries<'a> {
    /// Query rows (f32), `stride` values apart.
    pub q: &'a [f32],
    /// Values per query row (all heads).
    pub stride: usize,
    /// Offset of this head inside a row.
    pub off: usize,
    /// Number of query rows.
    pub t: usize,
    /// Cache position of the first query row.
    pub pos0: usize,
}

fn widen(bits: &[u16], dst: &mut [f32]) {
    let n = bits.len().min(dst.len());
    let src: &[f16] = bits[..n].reinterpret_cast();
    src.convert_to_f32_slice(&mut dst[..n]);
}

/// [`super::attn::attend_head`] on any instruction set: attention of the `qs.t` query rows of
/// [`Queries`] over cache positions `0..qs.pos0 + qs.t`; writes `hd` values per query at
/// `out[i * hd..]`. Short slices are never indexed past their end (missing values read as 0).
#[inline(always)]
pub(super) fn attend_head_impl(kv: HeadView<'_>, qs: Queries<'_>, scale: f32, out: &mut [f32]) {
    let Queries {
        q,
        stride: q_stride,
        off: q_off,
        t,
        pos0,
    } = qs;
    let hd = kv.hd;
    let n_kv = pos0 + t;
    let mut m = vec![f32::NEG_INFINITY; t];
    let mut s = vec![0f32; t];
    let mut kt = vec![0f32; hd * KV_TILE];
    let mut krow = vec![0f32; hd];
    let mut vt = vec![0f32; KV_TILE * hd];
    let mut qv = vec![0f32; hd];
    let mut qv2 = vec![0f32; hd];
    for o in out.iter_mut().take(t * hd) {
        *o = 0.0;
    }
    let mut ic = 0;
    while ic < n_kv {
        let kvt = KV_TILE.min(n_kv - ic);
        load_tile(kv, ic, kvt, &mut kt, &mut krow, &mut vt);
        // queries in pairs: their score chains are independent, so the two interleave
        let mut i = 0;
        while i < t {
            let p = pos0 + i;
            if ic > p {
                i += 1;
                continue;
            }
            let load = |i: usize, qv: &mut [f32]| {
                for (dk, x) in qv.iter_mut().enumerate() {
                    *x = q.get(i * q_stride + q_off + dk).copied().unwrap_or(0.0);
                }
            };
            load(i, &mut qv);
            let pair = i + 1 < t;
            let mut kq2 = [0f32; KV_TILE];
            let kq = if pair {
                load(i + 1, &mut qv2);
                let (a, b) = scores2(&kt, &qv, &qv2);
                kq2 = b;
                a
            } else {
                scores(&kt, &qv)
            };
            let rows = if pair { 2 } else { 1 };
            for (r, mut kq) in [kq, kq2].into_iter().enumerate().take(rows) {
                let i = i + r;
                let visible = (pos0 + i + 1 - ic).min(kvt);
                let Some(o) = out.get_mut(i * hd..(i + 1) * hd) else {
                    continue;
                };
                if softmax_tile(&mut kq, visible, scale, &mut m[i], &mut s[i], o) {
                    accumulate_values(o, &vt, hd, &kq[..visible]);
                }
            }
            i += rows;
        }
        ic += KV_TILE;
    }
    normalize(out, &s, hd);
}

/// Widens tile `ic..ic + kvt` of the head's keys (transposed into `kt`, [`KV_TILE`] values per
/// head dimension) and values (`vt`, `hd` per key); missing cache rows read as 0.
#[inline(always)]
pub(super) fn load_tile<'a>(
    kv: HeadView<'a>,
    ic: usize,
    kvt: usize,
    kt: &mut [f32],
    krow: &mut [f32],
    vt: &mut [f32],
) {
    let hd = kv.hd;
    let row = |c: &'a [u16], p: usize| -> &'a [u16] {
        c.get(p * kv.stride + kv.off..p * kv.stride + kv.off + hd)
            .unwrap_or(&[])
    };
    for tk in 0..kvt {
        krow.iter_mut().for_each(|x| *x = 0.0);
        widen(row(kv.k, ic + tk), krow);
        for (dk, &x) in krow.iter().enumerate() {
            kt[dk * KV_TILE + tk] = x;
        }
        widen(row(kv.v, ic + tk), &mut vt[tk * hd..(tk + 1) * hd]);
    }
}

/// One query's online-softmax step over a tile: scores scaled, keys from `visible` on masked,
/// the running max `m` and sum `s` updated (output `o` rescaled when the max grows), and `kq`
/// turned into the tile's probabilities. `false` when every key is masked (nothing to add).
#[inline(always)]
pub(super) fn softmax_tile(
    kq: &mut [f32; KV_TILE],
    visible: usize,
    scale: f32,
    m: &mut f32,
    s: &mut f32,
    o: &mut [f32],
) -> bool {
    let mut tile_max = f32::NEG_INFINITY;
    for (tk, a) in kq.iter_mut().enumerate() {
        *a = if tk < visible {
            *a * scale
        } else {
            f32::NEG_INFINITY
        };
        tile_max = tile_max.max(*a);
    }
    if tile_max == f32::NEG_INFINITY {
        return false;
    }
    let mnew = m.max(tile_max);
    if mnew > *m {
        let ms = (*m - mnew).exp();
        for x in o.iter_mut() {
            *x *= ms;
        }
        *s *= ms;
    }
    *m = mnew;
    let mut sum = 0f64;
    for g in kq.chunks_exact_mut(16) {
        let mut e = [0f32; 16];
        for (x, y) in e.iter_mut().zip(g.iter()) {
            *x = ggml_v_expf(*y - mnew);
        }
        g.copy_from_slice(&e);
        sum += f64::from(lanes_sum(e));
    }
    *s = (f64::from(*s) + sum) as f32;
    true
}

/// Divides each query's output row by its softmax sum (rows whose sum is 0 become 0).
#[inline(always)]
pub(super) fn normalize(out: &mut [f32], s: &[f32], hd: usize) {
    for (o, &si) in out.chunks_mut(hd.max(1)).zip(s) {
        let inv = if si == 0.0 { 0.0 } else { 1.0 / si };
        for x in o.iter_mut() {
            *x *= inv;
        }
    }
}

/// One query's scores over a tile: per key, fused multiply-adds over the head dimension in order.
#[inline(always)]
fn scores(kt: &[f32], qv: &[f32]) -> [f32; KV_TILE] {
    let mut kq = [0f32; KV_TILE];
    for (kr, &qd) in kt.chunks_exact(KV_TILE).zip(qv) {
        for (a, &kk) in kq.iter_mut().zip(kr) {
            *a = kk.mul_add(qd, *a);
        }
    }
    kq
}

/// [`scores`] of two queries at once (the same operations per query, two independent chains).
#[inline(always)]
fn scores2(kt: &[f32], qa: &[f32], qb: &[f32]) -> ([f32; KV_TILE], [f32; KV_TILE]) {
    let mut ka = [0f32; KV_TILE];
    let mut kb = [0f32; KV_TILE];
    for ((kr, &da), &db) in kt.chunks_exact(KV_TILE).zip(qa).zip(qb) {
        for ((a, b), &kk) in ka.iter_mut().zip(kb.iter_mut()).zip(kr) {
            *a = kk.mul_add(da, *a);
            *b = kk.mul_add(db, *b);
        }
    }
    (ka, kb)
}

/// Values per register block of [`accumulate_values`].
const V_BLOCK: usize = 128;

/// `o += sum over keys tk of pw[tk] * vt[tk]` as sequential fused multiply-adds over the keys,
/// `V_BLOCK` values of `o` at a time held in locals (registers) across the keys.
#[inline(always)]
fn accumulate_values(o: &mut [f32], vt: &[f32], hd: usize, pw: &[f32]) {
    let mut c = 0;
    while c + V_BLOCK <= o.len() {
        let mut acc = [0f32; V_BLOCK];
        acc.copy_from_slice(&o[c..c + V_BLOCK]);
        for (tk, &w) in pw.iter().enumerate() {
            let vr = &vt[tk * hd + c..][..V_BLOCK];
            for (x, &vv) in acc.iter_mut().zip(vr) {
                *x = vv.mul_add(w, *x);
            }
        }
        o[c..c + V_BLOCK].copy_from_slice(&acc);
        c += V_BLOCK;
    }
    if c < o.len() {
        for (tk, &w) in pw.iter().enumerate() {
            let vr = &vt[tk * hd + c..(tk + 1) * hd];
            for (x, &vv) in o[c..].iter_mut().zip(vr) {
                *x = vv.mul_add(w, *x);
            }
        }
    }
}
