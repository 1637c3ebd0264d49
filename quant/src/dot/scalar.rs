//! The scalar reference dot kernels: plain safe Rust over ggml's little-endian block bytes
//! (spec §3), written so the compiler can vectorize the integer inner loops. The integer parts are
//! exact, so results equal ggml's (`ggml_vec_dot_*`) up to the order of the f32 additions; the
//! vector kernels ([`super::avx2`], [`super::avx512`]) keep each kernel's order exactly.
//!
//! The kernels take rows whose lengths the caller has validated once ([`super::check_row`],
//! [`super::act_row_bytes`]); on mismatched lengths they never panic, they only use the common
//! prefix of whole blocks.

use half::f16;

use super::format::{ActFormat, Q8_1_BYTES};
use crate::blocks::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, QK, QK_K,
};
use crate::GgmlType;

#[inline]
pub(super) fn rd_f16(b: &[u8], off: usize) -> f32 {
    match b.get(off..off + 2) {
        Some(s) => f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32(),
        None => 0.0,
    }
}

#[inline]
pub(super) fn rd_f32(b: &[u8], off: usize) -> f32 {
    match b.get(off..off + 4) {
        Some(s) => f32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        None => 0.0,
    }
}

/// `round()` of the x86 `_mm256_round_ps(_, _MM_ROUND_NEAREST)`: ties to even.
#[inline(always)]
fn round_even(x: f32) -> f32 {
    x.round_ties_even()
}

/// Max |x| over a block, as ggml's SIMD max reduction computes it (NaN-free input assumed).
#[inline(always)]
fn absmax(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// ggml-cpu's x86 `quantize_row_q8_0`: `d = amax/127`, `id = 127/amax`, round half to even.
/// (This is what the CPU backend uses for activations; it differs from `quantize_row_q8_0_ref` in
/// `id` and in the rounding of ties.)
#[inline(always)]
pub fn quantize_row_q8_0(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x
        .chunks_exact(QK)
        .zip(out.chunks_exact_mut(BlockQ8_0::BYTES))
    {
        let amax = absmax(xb);
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        ob[0..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        for (q, &v) in ob[2..BlockQ8_0::BYTES].iter_mut().zip(xb) {
            *q = (round_even(v * id) as i32).clamp(-128, 127) as i8 as u8;
        }
    }
}

/// ggml-cpu's x86 `quantize_row_q8_1`: as [`quantize_row_q8_0`] plus `s = f16(d * Σq)`.
#[inline(always)]
pub fn quantize_row_q8_1(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q8_1_BYTES)) {
        let amax = absmax(xb);
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in ob[4..Q8_1_BYTES].iter_mut().zip(xb) {
            let qi = (round_even(v * id) as i32).clamp(-128, 127);
            sum += qi;
            *q = qi as i8 as u8;
        }
        ob[0..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        ob[2..4].copy_from_slice(&f16::from_f32(d * sum as f32).to_bits().to_le_bytes());
    }
}

/// `quantize_row_q8_K` (ggml-cpu uses the reference on x86).
pub fn quantize_row_q8_k(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x
        .chunks_exact(QK_K)
        .zip(out.chunks_exact_mut(BlockQ8K::BYTES))
    {
        if let Ok(a) = <&[f32; QK_K]>::try_from(xb) {
            let b = crate::reference::kquants::quantize_q8_k(a);
            ob.copy_from_slice(&b.to_bytes());
        }
    }
}

/// [`super::quantize_act`] without the choice of instruction set.
#[inline(always)]
pub(crate) fn quantize_act_impl(f: ActFormat, x: &[f32], out: &mut [u8]) {
    match f {
        ActFormat::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        ActFormat::F16 => {
            for (o, &v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&f16::from_f32(v).to_f32().to_le_bytes());
            }
        }
        ActFormat::BF16 => {
            for (o, &v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&crate::f32_to_bf16_bits(v).to_le_bytes());
            }
        }
        ActFormat::Q8_0 => quantize_row_q8_0(x, out),
        ActFormat::Q8_1 => quantize_row_q8_1(x, out),
        ActFormat::Q8K => quantize_row_q8_k(x, out),
    }
}

/// A dot-product kernel: `(weight row bytes, activation row bytes) -> f32`.
pub type DotFn = fn(&[u8], &[u8]) -> f32;

/// A tile kernel: `out[r * acts + j] = dot(w_r, a_j)` for the weight rows `w_r` (`w` holds whole
/// rows of `row_bytes`) and `acts = out.len() / rows` activation rows `a_j = a[j*stride..]`, each
/// dot in the arithmetic order of the scalar [`DotFn`] of the same type (bit-identical results).
/// Mismatched lengths never panic: such calls use the scalar kernel on what is there.
pub type DotManyFn = fn(&[u8], usize, &[u8], usize, &mut [f32]);

pub(super) fn scalar_many(
    dot: DotFn,
    w: &[u8],
    row_bytes: usize,
    a: &[u8],
    stride: usize,
    out: &mut [f32],
) {
    let rows = w.len().checked_div(row_bytes).unwrap_or(0).max(1);
    let acts = out.len() / rows;
    if acts == 0 {
        return;
    }
    for (r, o) in out.chunks_mut(acts).enumerate() {
        let wr = w
            .get(r.saturating_mul(row_bytes)..(r + 1).saturating_mul(row_bytes))
            .unwrap_or(&[]);
        for (j, v) in o.iter_mut().enumerate() {
            *v = dot(wr, a.get(j.saturating_mul(stride)..).unwrap_or(&[]));
        }
    }
}

/// The scalar reference kernel for weights of type `w` (activations in [`super::act_format`]`(w)`).
pub fn dot_fn(w: GgmlType) -> Option<DotFn> {
    Some(match w {
        GgmlType::F32 => dot_f32_f32,
        GgmlType::F16 => dot_f16_f16,
        GgmlType::BF16 => dot_bf16_bf16,
        GgmlType::Q4_0 => dot_q4_0_q8_0,
        GgmlType::Q4_1 => dot_q4_1_q8_1,
        GgmlType::Q5_0 => dot_q5_0_q8_0,
        GgmlType::Q5_1 => dot_q5_1_q8_1,
        GgmlType::Q8_0 => dot_q8_0_q8_0,
        GgmlType::Q2K => dot_q2_k_q8_k,
        GgmlType::Q3K => dot_q3_k_q8_k,
        GgmlType::Q4K => dot_q4_k_q8_k,
        GgmlType::Q5K => dot_q5_k_q8_k,
        GgmlType::Q6K => dot_q6_k_q8_k,
        GgmlType::Q8K => return None,
    })
}

/// Dot product of weight row `w` (type `ty`) with activation row `a` (already in
/// [`super::act_format`]`(ty)`). Returns 0 for Q8_K weights.
pub fn vec_dot(ty: GgmlType, w: &[u8], a: &[u8]) -> f32 {
    dot_fn(ty).map_or(0.0, |f| f(w, a))
}

/// f32 lanes of the 512-bit reductions the kernels reproduce.
pub(super) const LANES: usize = 16;

pub(super) fn lanes_sum(acc: [f32; LANES]) -> f32 {
    // pairwise, as a 512-bit horizontal add does
    let mut v = acc;
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            v[i] += v[i + n];
        }
    }
    v[0]
}

/// F32 weights · f32 activations.
pub fn dot_f32_f32(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; LANES];
    for (wc, ac) in w.chunks_exact(4 * LANES).zip(a.chunks_exact(4 * LANES)) {
        for (l, s) in acc.iter_mut().enumerate() {
            *s += rd_f32(wc, 4 * l) * rd_f32(ac, 4 * l);
        }
    }
    let mut tail = 0.0f32;
    let done = (w.len().min(a.len()) / (4 * LANES)) * 4 * LANES;
    for (wc, ac) in w[done.min(w.len())..]
        .chunks_exact(4)
        .zip(a[done.min(a.len())..].chunks_exact(4))
    {
        tail += rd_f32(wc, 0) * rd_f32(ac, 0);
    }
    lanes_sum(acc) + tail
}

/// F16 weights · f32 activations, accumulated in f32 (ggml's AMX F16 kernel).
pub fn dot_f16_f32(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; LANES];
    for (wc, ac) in w.chunks_exact(2 * LANES).zip(a.chunks_exact(4 * LANES)) {
        for (l, s) in acc.iter_mut().enumerate() {
            *s += rd_f16(wc, 2 * l) * rd_f32(ac, 4 * l);
        }
    }
    let blocks = (w.len() / 2).min(a.len() / 4) / LANES * LANES;
    let mut tail = 0.0f32;
    for (wc, ac) in w[(2 * blocks).min(w.len())..]
        .chunks_exact(2)
        .zip(a[(4 * blocks).min(a.len())..].chunks_exact(4))
    {
        tail += rd_f16(wc, 0) * rd_f32(ac, 0);
    }
    lanes_sum(acc) + tail
}

/// F16 weights · f16-valued activations (stored as f32, see [`ActFormat::F16`]): llamafile's `tinyBLAS<16, __m512>` order (16 f32 lanes of
/// fused multiply-adds over the widened values, pairwise reduction); a tail that is not a whole
/// 16 values is added in f32 after the reduction.
pub fn dot_f16_f16(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; LANES];
    for (wc, ac) in w.chunks_exact(2 * LANES).zip(a.chunks_exact(4 * LANES)) {
        for (l, s) in acc.iter_mut().enumerate() {
            *s = rd_f16(wc, 2 * l).mul_add(rd_f32(ac, 4 * l), *s);
        }
    }
    let blocks = (w.len() / 2).min(a.len() / 4) / LANES * LANES;
    let mut tail = 0.0f32;
    for (wc, ac) in w[2 * blocks..]
        .chunks_exact(2)
        .zip(a[4 * blocks..].chunks_exact(4))
    {
        tail += rd_f16(wc, 0) * rd_f32(ac, 0);
    }
    lanes_sum(acc) + tail
}

/// The scalar reference of [`super::gemm_f16`]: one [`dot_f16_f16`] per output.
pub fn gemm_f16_scalar(
    w: &[u8],
    row_bytes: usize,
    a: &[u8],
    stride: usize,
    toks: usize,
    out: &mut [f32],
    ldo: usize,
) {
    if row_bytes == 0 || ldo == 0 {
        return;
    }
    for (j, orow) in out.chunks_mut(ldo).take(toks).enumerate() {
        let arow = a.get(j.saturating_mul(stride)..).unwrap_or(&[]);
        let arow = arow.get(..row_bytes.saturating_mul(2)).unwrap_or(arow);
        for (o, wr) in orow.iter_mut().zip(w.chunks_exact(row_bytes)) {
            *o = dot_f16_f16(wr, arow);
        }
    }
}

/// BF16 weights · bf16 activations, accumulated in f32.
pub fn dot_bf16_bf16(w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for (wc, ac) in w.chunks_exact(2).zip(a.chunks_exact(2)) {
        let x = crate::bf16_bits_to_f32(u16::from_le_bytes([wc[0], wc[1]]));
        let y = crate::bf16_bits_to_f32(u16::from_le_bytes([ac[0], ac[1]]));
        sum += x * y;
    }
    sum
}

#[inline]
fn i8_at(b: &[u8], i: usize) -> i32 {
    i32::from(b.get(i).copied().unwrap_or(0) as i8)
}

/// llamafile's tinyBLAS_Q0_AVX accumulation (what ggml-cpu uses on x86 for Q4_0, Q5_0 and Q8_0
/// weights with two or more activation rows): per block, eight i32 lanes of four products each,
/// converted to f32 and fused-multiply-added with `dx*dy` into eight f32 lanes; then the 256-bit
/// horizontal sum. `vals(x, e)` is weight element `e` of block `x`.
#[inline]
fn dot_q0_lanes(w: &[u8], a: &[u8], wbs: usize, vals: impl Fn(&[u8], &mut [i32; QK])) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut xv = [0i32; QK];
    for (x, y) in w.chunks_exact(wbs).zip(a.chunks_exact(BlockQ8_0::BYTES)) {
        vals(x, &mut xv);
        let d = rd_f16(x, 0) * rd_f16(y, 0);
        let q8 = &y[2..BlockQ8_0::BYTES];
        for (m, c) in acc.iter_mut().enumerate() {
            let mut lane = 0i32;
            for e in 4 * m..4 * m + 4 {
                lane += xv[e] * i8_at(q8, e);
            }
            *c = d.mul_add(lane as f32, *c);
        }
    }
    hsum8(acc)
}

/// The x86 `hsum` of a `__m256`: `((c0+c4)+(c2+c6)) + ((c1+c5)+(c3+c7))`.
#[inline]
pub(super) fn hsum8(c: [f32; 8]) -> f32 {
    let t = [c[4] + c[0], c[5] + c[1], c[6] + c[2], c[7] + c[3]];
    (t[0] + t[2]) + (t[1] + t[3])
}

/// Q4_0 · Q8_0.
pub fn dot_q4_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    dot_q0_lanes(w, a, BlockQ4_0::BYTES, |x, v| {
        for j in 0..16 {
            v[j] = i32::from(x[2 + j] & 0x0F) - 8;
            v[j + 16] = i32::from(x[2 + j] >> 4) - 8;
        }
    })
}

/// ggml's AVX2 `ggml_vec_dot_q4_1_q8_1`/`q5_1`: eight i32 lanes of four products each, fused
/// into eight f32 lanes with `dx*dy` per block, the min term `m*s` fused into a scalar; result
/// `hsum8(lanes) + summs`.
#[inline]
fn dot_q1_lanes(w: &[u8], a: &[u8], wbs: usize, vals: impl Fn(&[u8], &mut [i32; QK])) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut summs = 0.0f32;
    let mut xv = [0i32; QK];
    for (x, y) in w.chunks_exact(wbs).zip(a.chunks_exact(Q8_1_BYTES)) {
        vals(x, &mut xv);
        summs = rd_f16(x, 2).mul_add(rd_f16(y, 2), summs);
        let d = rd_f16(x, 0) * rd_f16(y, 0);
        let q8 = &y[4..Q8_1_BYTES];
        for (m, c) in acc.iter_mut().enumerate() {
            let mut lane = 0i32;
            for e in 4 * m..4 * m + 4 {
                lane += xv[e] * i8_at(q8, e);
            }
            *c = d.mul_add(lane as f32, *c);
        }
    }
    hsum8(acc) + summs
}

/// Q4_1 · Q8_1.
pub fn dot_q4_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    dot_q1_lanes(w, a, BlockQ4_1::BYTES, |x, v| {
        for j in 0..16 {
            v[j] = i32::from(x[4 + j] & 0x0F);
            v[j + 16] = i32::from(x[4 + j] >> 4);
        }
    })
}

#[inline]
fn q5_vals(qh: u32, qs: &[u8], j: usize) -> (i32, i32) {
    let xh0 = ((qh >> j) << 4) & 0x10;
    let xh1 = (qh >> (j + 12)) & 0x10;
    let b = u32::from(qs.get(j).copied().unwrap_or(0));
    (((b & 0x0F) | xh0) as i32, ((b >> 4) | xh1) as i32)
}

/// Q5_0 · Q8_0.
pub fn dot_q5_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    dot_q0_lanes(w, a, BlockQ5_0::BYTES, |x, v| {
        let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
        for j in 0..16 {
            let (v0, v1) = q5_vals(qh, &x[6..BlockQ5_0::BYTES], j);
            v[j] = v0 - 16;
            v[j + 16] = v1 - 16;
        }
    })
}

/// Q5_1 · Q8_1.
pub fn dot_q5_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    dot_q1_lanes(w, a, BlockQ5_1::BYTES, |x, v| {
        let qh = u32::from_le_bytes([x[4], x[5], x[6], x[7]]);
        for j in 0..16 {
            let (v0, v1) = q5_vals(qh, &x[8..BlockQ5_1::BYTES], j);
            v[j] = v0;
            v[j + 16] = v1;
        }
    })
}

/// Q8_0 · Q8_0.
pub fn dot_q8_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    dot_q0_lanes(w, a, BlockQ8_0::BYTES, |x, v| {
        for (o, &b) in v.iter_mut().zip(&x[2..BlockQ8_0::BYTES]) {
            *o = i32::from(b as i8);
        }
    })
}

/// A Q8_K activation block, borrowed.
pub(crate) struct Q8K<'a> {
    pub(crate) d: f32,
    pub(crate) qs: &'a [u8],
    pub(crate) bsums: [i32; 16],
}

pub(crate) fn q8k(y: &[u8]) -> Q8K<'_> {
    let mut bsums = [0i32; 16];
    for (k, s) in bsums.iter_mut().enumerate() {
        let o = 260 + 2 * k;
        *s = i32::from(i16::from_le_bytes([y[o], y[o + 1]]));
    }
    Q8K {
        d: rd_f32(y, 0),
        qs: &y[4..260],
        bsums,
    }
}

/// The eight i32 lanes of ggml's AVX2 K-quant kernels: element `e` of the super-block goes to
/// lane `(e % 32) / 4` (the `maddubs` + `madd` pairing of each 32-byte vector), weighted by the
/// scale of its group of 16 (`scales[e / 16]`). Integer arithmetic, so exact.
#[inline]
fn k_lanes(vals: &[i32; QK_K], q8: &[u8], scales: &[i32; 16]) -> [i32; 8] {
    let mut lanes = [0i32; 8];
    for (e, &v) in vals.iter().enumerate() {
        lanes[(e % 32) / 4] += scales[e / 16] * v * i8_at(q8, e);
    }
    lanes
}

/// The decoded values (ggml's element order) and 16-group scales of one K-quant block.
pub(crate) struct KBlock {
    pub(crate) vals: [i32; QK_K],
    pub(crate) scales: [i32; 16],
}

/// Q2_K: unsigned 2-bit values, scales = low nibbles; mins (high nibbles) returned apart.
pub(crate) fn decode_q2_k(x: &[u8], kb: &mut KBlock) -> [i32; 16] {
    let sc = &x[0..16];
    let q2 = &x[16..80];
    for (e, v) in kb.vals.iter_mut().enumerate() {
        let byte = q2[(e / 128) * 32 + e % 32];
        *v = i32::from((byte >> (2 * ((e % 128) / 32))) & 3);
    }
    let mut mins = [0i32; 16];
    for j in 0..16 {
        kb.scales[j] = i32::from(sc[j] & 0x0F);
        mins[j] = i32::from(sc[j] >> 4);
    }
    mins
}

/// Q2_K · Q8_K (ggml's AVX2 order: per block the min term, then the scaled sums, fused into
/// eight lanes).
pub fn dot_q2_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut kb = KBlock {
        vals: [0; QK_K],
        scales: [0; 16],
    };
    for (x, y) in w
        .chunks_exact(BlockQ2K::BYTES)
        .zip(a.chunks_exact(BlockQ8K::BYTES))
    {
        let y = q8k(y);
        let mins = decode_q2_k(x, &mut kb);
        let d = y.d * rd_f16(x, 80);
        let dmin = -y.d * rd_f16(x, 82);
        let lanes = k_lanes(&kb.vals, y.qs, &kb.scales);
        for k in 0..8 {
            let prod = mins[2 * k] * y.bsums[2 * k] + mins[2 * k + 1] * y.bsums[2 * k + 1];
            acc[k] = dmin.mul_add(prod as f32, acc[k]);
            acc[k] = d.mul_add(lanes[k] as f32, acc[k]);
        }
    }
    hsum8(acc)
}

/// Q3_K: signed 3-bit values, signed 6-bit scales.
pub(crate) fn decode_q3_k(x: &[u8], kb: &mut KBlock) {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let hm = &x[0..32];
    let q3 = &x[32..96];
    let sb = &x[96..108];
    for (e, v) in kb.vals.iter_mut().enumerate() {
        let c = e / 128;
        let j = (e % 128) / 32;
        let l = e % 32;
        let low = i32::from((q3[c * 32 + l] >> (2 * j)) & 3);
        let bit = 1u8 << (c * 4 + j);
        *v = low - if hm[l] & bit != 0 { 0 } else { 4 };
    }
    let mut aux = [0u32; 4];
    for (k, s) in aux.iter_mut().take(3).enumerate() {
        *s = u32::from_le_bytes([sb[4 * k], sb[4 * k + 1], sb[4 * k + 2], sb[4 * k + 3]]);
    }
    let tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4);
    aux[3] = ((aux[1] >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4);
    aux[0] = (aux[0] & KMASK2) | ((tmp & KMASK1) << 4);
    aux[1] = (aux[1] & KMASK2) | (((tmp >> 2) & KMASK1) << 4);
    for (j, s) in kb.scales.iter_mut().enumerate() {
        let byte = aux[j / 4].to_le_bytes()[j % 4] as i8;
        *s = i32::from(byte) - 32;
    }
}

/// Q3_K · Q8_K.
pub fn dot_q3_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut kb = KBlock {
        vals: [0; QK_K],
        scales: [0; 16],
    };
    for (x, y) in w
        .chunks_exact(BlockQ3K::BYTES)
        .zip(a.chunks_exact(BlockQ8K::BYTES))
    {
        let y = q8k(y);
        decode_q3_k(x, &mut kb);
        let d = y.d * rd_f16(x, 108);
        let lanes = k_lanes(&kb.vals, y.qs, &kb.scales);
        for k in 0..8 {
            acc[k] = d.mul_add(lanes[k] as f32, acc[k]);
        }
    }
    hsum8(acc)
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block (ggml's `get_scale_min_k4`).
#[inline]
pub(super) fn scale_min_k4(j: usize, q: &[u8]) -> (i32, i32) {
    if j < 4 {
        (i32::from(q[j] & 63), i32::from(q[j + 4] & 63))
    } else {
        (
            i32::from((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4)),
            i32::from((q[j + 4] >> 4) | ((q[j] >> 6) << 4)),
        )
    }
}

/// Q4_K / Q5_K: unsigned 4- or 5-bit values, 6-bit scales per 32 (repeated per 16); mins apart.
pub(crate) fn decode_q45_k(x: &[u8], five: bool, kb: &mut KBlock) -> [i32; 8] {
    let sc = &x[4..16];
    let (qh, q4) = if five {
        (&x[16..48], &x[48..BlockQ5K::BYTES])
    } else {
        (&x[0..0], &x[16..BlockQ4K::BYTES])
    };
    for (e, v) in kb.vals.iter_mut().enumerate() {
        let chunk = e / 64;
        let hi = (e % 64) >= 32;
        let l = e % 32;
        let b = q4[chunk * 32 + l];
        let mut q = if hi { b >> 4 } else { b & 0x0F };
        if five {
            let bit = 1u8 << (2 * chunk + usize::from(hi));
            if qh[l] & bit != 0 {
                q += 16;
            }
        }
        *v = i32::from(q);
    }
    let mut mins = [0i32; 8];
    for (j, m) in mins.iter_mut().enumerate() {
        let (s, mm) = scale_min_k4(j, sc);
        kb.scales[2 * j] = s;
        kb.scales[2 * j + 1] = s;
        *m = mm;
    }
    mins
}

/// The min products of ggml's AVX2 Q4_K/Q5_K kernels: four i32 lanes,
/// `mins[2m]*(b[4m]+b[4m+1]) + mins[2m+1]*(b[4m+2]+b[4m+3])`.
#[inline]
pub(crate) fn k4_min_prods(mins: &[i32; 8], bsums: &[i32; 16]) -> [i32; 4] {
    let mut p = [0i32; 4];
    for (m, v) in p.iter_mut().enumerate() {
        let s0 = bsums[4 * m] + bsums[4 * m + 1];
        let s1 = bsums[4 * m + 2] + bsums[4 * m + 3];
        *v = mins[2 * m] * s0 + mins[2 * m + 1] * s1;
    }
    p
}

/// Q4_K · Q8_K: eight fused lanes for the scaled sums, four fused lanes for the mins.
pub fn dot_q4_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut acc_m = [0.0f32; 4];
    let mut kb = KBlock {
        vals: [0; QK_K],
        scales: [0; 16],
    };
    for (x, y) in w
        .chunks_exact(BlockQ4K::BYTES)
        .zip(a.chunks_exact(BlockQ8K::BYTES))
    {
        let y = q8k(y);
        let mins = decode_q45_k(x, false, &mut kb);
        let d = y.d * rd_f16(x, 0);
        let dmin = -y.d * rd_f16(x, 2);
        let p = k4_min_prods(&mins, &y.bsums);
        for m in 0..4 {
            acc_m[m] = dmin.mul_add(p[m] as f32, acc_m[m]);
        }
        let lanes = k_lanes(&kb.vals, y.qs, &kb.scales);
        for k in 0..8 {
            acc[k] = d.mul_add(lanes[k] as f32, acc[k]);
        }
    }
    hsum8(acc) + ((acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3]))
}

/// Q5_K · Q8_K: eight fused lanes for the scaled sums, the mins fused into a scalar.
pub fn dot_q5_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut summs = 0.0f32;
    let mut kb = KBlock {
        vals: [0; QK_K],
        scales: [0; 16],
    };
    for (x, y) in w
        .chunks_exact(BlockQ5K::BYTES)
        .zip(a.chunks_exact(BlockQ8K::BYTES))
    {
        let y = q8k(y);
        let mins = decode_q45_k(x, true, &mut kb);
        let d = y.d * rd_f16(x, 0);
        let dmin = -y.d * rd_f16(x, 2);
        let p = k4_min_prods(&mins, &y.bsums);
        summs = (((p[0] + p[1]) + (p[2] + p[3])) as f32).mul_add(dmin, summs);
        let lanes = k_lanes(&kb.vals, y.qs, &kb.scales);
        for k in 0..8 {
            acc[k] = d.mul_add(lanes[k] as f32, acc[k]);
        }
    }
    hsum8(acc) + summs
}

/// Q6_K: unsigned 6-bit values (the -32 is subtracted through the activation sums), signed
/// scales per 16.
pub(crate) fn decode_q6_k(x: &[u8], kb: &mut KBlock) {
    let ql = &x[0..128];
    let qh = &x[128..192];
    let sc = &x[192..208];
    for c in 0..2 {
        for l in 0..32 {
            let h = qh[c * 32 + l];
            let a0 = ql[c * 64 + l];
            let a1 = ql[c * 64 + l + 32];
            let base = c * 128 + l;
            kb.vals[base] = i32::from((a0 & 0x0F) | ((h & 3) << 4));
            kb.vals[base + 32] = i32::from((a1 & 0x0F) | (((h >> 2) & 3) << 4));
            kb.vals[base + 64] = i32::from((a0 >> 4) | (((h >> 4) & 3) << 4));
            kb.vals[base + 96] = i32::from((a1 >> 4) | (((h >> 6) & 3) << 4));
        }
    }
    for (s, &b) in kb.scales.iter_mut().zip(sc) {
        *s = i32::from(b as i8);
    }
}

/// Q6_K · Q8_K: lanes of unsigned products minus `32 * (b[2k]*sc[2k] + b[2k+1]*sc[2k+1])`.
pub fn dot_q6_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut kb = KBlock {
        vals: [0; QK_K],
        scales: [0; 16],
    };
    for (x, y) in w
        .chunks_exact(BlockQ6K::BYTES)
        .zip(a.chunks_exact(BlockQ8K::BYTES))
    {
        let y = q8k(y);
        decode_q6_k(x, &mut kb);
        let d = y.d * rd_f16(x, 208);
        let lanes = k_lanes(&kb.vals, y.qs, &kb.scales);
        for k in 0..8 {
            let sub = 32
                * (y.bsums[2 * k] * kb.scales[2 * k] + y.bsums[2 * k + 1] * kb.scales[2 * k + 1]);
            acc[k] = d.mul_add((lanes[k] - sub) as f32, acc[k]);
        }
    }
    hsum8(acc)
}

/// The K-quant dot products of ggml-cpu's tiled matrix product (`ggml_compute_forward_mul_mat_
/// tiled`, what ggml uses for K-quant weights against 8 or more activation rows): per super-block
/// the exact integer `S1 = Σ scale·value·q8` (and `S2 = Σ min·bsum` for the types with mins),
/// `res = d·S1` (`res = fma(-dmin, S2, res)`), accumulated as `acc = fma(res, y.d, acc)`.
/// `TY`: 2..=6 for Q2_K..Q6_K.
fn dot_k_tiled<const TY: u8>(w: &[u8], a: &[u8]) -> f32 {
    let wbs = match TY {
        2 => BlockQ2K::BYTES,
        3 => BlockQ3K::BYTES,
        4 => BlockQ4K::BYTES,
        5 => BlockQ5K::BYTES,
        _ => BlockQ6K::BYTES,
    };
    let mut acc = 0f32;
    let mut kb = KBlock {
        vals: [0; QK_K],
        scales: [0; 16],
    };
    for (x, y) in w.chunks_exact(wbs).zip(a.chunks_exact(BlockQ8K::BYTES)) {
        let y = q8k(y);
        let (d, dmin, s2) = match TY {
            2 => {
                let mins = decode_q2_k(x, &mut kb);
                let s2: i32 = (0..16).map(|k| mins[k] * y.bsums[k]).sum();
                (rd_f16(x, 80), rd_f16(x, 82), s2)
            }
            3 => {
                decode_q3_k(x, &mut kb);
                (rd_f16(x, 108), 0.0, 0)
            }
            4 | 5 => {
                let mins = decode_q45_k(x, TY == 5, &mut kb);
                let s2: i32 = k4_min_prods(&mins, &y.bsums).iter().sum();
                (rd_f16(x, 0), rd_f16(x, 2), s2)
            }
            _ => {
                decode_q6_k(x, &mut kb);
                (rd_f16(x, 208), 0.0, 0)
            }
        };
        let mut s1: i32 = k_lanes(&kb.vals, y.qs, &kb.scales).iter().sum();
        if TY == 6 {
            s1 -= 32 * (0..16).map(|k| y.bsums[k] * kb.scales[k]).sum::<i32>();
        }
        let mut res = d * s1 as f32;
        if TY == 2 || TY == 4 || TY == 5 {
            res = (-dmin).mul_add(s2 as f32, res);
        }
        acc = res.mul_add(y.d, acc);
    }
    acc
}

/// Q2_K · Q8_K in ggml-cpu's tiled order (batches of 8 or more rows).
pub fn dot_q2_k_q8_k_tiled(w: &[u8], a: &[u8]) -> f32 {
    dot_k_tiled::<2>(w, a)
}
/// Q3_K · Q8_K in ggml-cpu's tiled order.
pub fn dot_q3_k_q8_k_tiled(w: &[u8], a: &[u8]) -> f32 {
    dot_k_tiled::<3>(w, a)
}
/// Q4_K · Q8_K in ggml-cpu's tiled order.
pub fn dot_q4_k_q8_k_tiled(w: &[u8], a: &[u8]) -> f32 {
    dot_k_tiled::<4>(w, a)
}
/// Q5_K · Q8_K in ggml-cpu's tiled order.
pub fn dot_q5_k_q8_k_tiled(w: &[u8], a: &[u8]) -> f32 {
    dot_k_tiled::<5>(w, a)
}
/// Q6_K · Q8_K in ggml-cpu's tiled order.
pub fn dot_q6_k_q8_k_tiled(w: &[u8], a: &[u8]) -> f32 {
    dot_k_tiled::<6>(w, a)
}

/// The scalar kernel in the order ggml-cpu uses for a product with `batch` = at least
/// [`TILED_MIN_ROWS`] activation rows: the tiled order for K-quant weights, otherwise [`dot_fn`].
pub fn dot_fn_for(w: GgmlType, batch: bool) -> Option<DotFn> {
    if batch {
        match w {
            GgmlType::Q2K => return Some(dot_q2_k_q8_k_tiled),
            GgmlType::Q3K => return Some(dot_q3_k_q8_k_tiled),
            GgmlType::Q4K => return Some(dot_q4_k_q8_k_tiled),
            GgmlType::Q5K => return Some(dot_q5_k_q8_k_tiled),
            GgmlType::Q6K => return Some(dot_q6_k_q8_k_tiled),
            _ => {}
        }
    }
    dot_fn(w)
}

/// Activation rows from which ggml-cpu switches K-quant products to its tiled kernel.
pub const TILED_MIN_ROWS: usize = 8;

/// 16-lane f32 dot product of two f32 slices (the lanes and pairwise reduction of a 512-bit FMA
/// loop); the common prefix is used when the lengths differ.
pub fn dot_f32_slices(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    lanes_sum(acc) + tail
}

/// ggml's vectorized `expf` (`ggml_v_expf`, the AVX-512 variant its x86 builds use), one lane:
/// a degree-5 polynomial on the reduced argument, scaled by `2^n`; flushes to 0 / infinity past
/// |n| > 192. Differs from a correctly rounded exp by up to ~1.5 ulp, so kiln uses it wherever
/// ggml does.
#[inline(always)]
pub fn ggml_v_expf(x: f32) -> f32 {
    let c = f32::from_bits;
    let r = c(0x4b40_0000);
    let z = x.mul_add(c(0x3fb8_aa3b), r);
    let n = z - r;
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x));
    let u = b * b;
    let j = c(0x3c07_2010)
        .mul_add(b, c(0x3d2b_9f17))
        .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)));
    let j = j.mul_add(u, c(0x3f7f_fff6).mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    if n.is_nan() || j.is_nan() {
        return f32::NAN;
    }
    // scalef: j * 2^n rounded once (exact in f64, then one rounding to f32); |n| <= 192
    let p2 = f64::from_bits(((n as i64 + 1023) as u64) << 52);
    (f64::from(j) * p2) as f32
}

/// The arithmetic of [`super::rope_pairs`] (compiled for each instruction set by its callers).
#[inline(always)]
pub(crate) fn rope_pairs_impl(x: &mut [f32], cs: &[f32]) {
    for (p, c) in x.chunks_exact_mut(2).zip(cs.chunks_exact(2)) {
        let (x0, x1) = (p[0], p[1]);
        p[0] = x0.mul_add(c[0], -(x1 * c[1]));
        p[1] = x0.mul_add(c[1], x1 * c[0]);
    }
}

/// The arithmetic of [`super::swiglu`] (compiled for each instruction set by its callers).
#[inline(always)]
pub(crate) fn swiglu_impl(x: &[f32], g: &[f32], out: &mut [f32]) {
    let n = x.len().min(g.len()).min(out.len());
    let full = n / 16 * 16;
    for i in 0..full {
        let v = x[i];
        out[i] = v / (1.0 + ggml_v_expf(0.0 - v)) * g[i];
    }
    for i in full..n {
        let v = x[i];
        out[i] = v / (1.0 + (-v).exp()) * g[i];
    }
}

/// `y += a * x` over the common prefix.
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (v, &u) in y.iter_mut().zip(x) {
        *v += a * u;
    }
}
