//! AVX2 + FMA + F16C dot kernels: one weight row against many activation rows, each dot computed
//! in exactly the arithmetic order of the scalar reference in [`super::scalar`] (which follows
//! ggml's own x86 kernels), so the results are bit-identical to it; and the AVX2 builds of the
//! element-wise operations (attention, RoPE, SwiGLU, activation rounding).
//!
//! Every weight block is decoded once (integer values in ggml's element order, i16 scale vectors)
//! and multiplied against a group of activation rows; the per-dot accumulators live in small
//! arrays. The safe entry points validate every length and fall back to the scalar kernels when a
//! length does not fit or the CPU lacks the instructions. The AVX-512 builds, which reuse the
//! decoders and tile bodies here, are in [`super::avx512`].

use std::arch::x86_64::*;

use super::flash::{self, HeadView, Queries};
use super::format::{ActFormat, Q8_1_BYTES};
use super::scalar::{self, decode_q3_k, hsum8, lanes_sum, rd_f16, rd_f32, scale_min_k4, KBlock};
use crate::blocks::{BlockQ3K, BlockQ8K, BlockQ8_0, QK_K};

/// Whether this CPU runs these kernels.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Activation rows handled together (accumulators kept in stack arrays).
const G: usize = 16;

/// Checks the lengths of a tile call: `w` is whole rows of `row_bytes` (whole blocks of `wbs`
/// bytes), `out` holds `acts` values per row, and every one of the `acts` activation rows
/// (`stride` apart) holds as many blocks of `abs` bytes. Returns `(rows, acts, blocks per row)`.
pub(super) fn fits(
    w: &[u8],
    row_bytes: usize,
    wbs: usize,
    a: &[u8],
    abs: usize,
    stride: usize,
    out: &[f32],
) -> Option<(usize, usize, usize)> {
    if wbs == 0 || row_bytes == 0 || !row_bytes.is_multiple_of(wbs) {
        return None;
    }
    if !w.len().is_multiple_of(row_bytes) || w.is_empty() {
        return None;
    }
    let rows = w.len() / row_bytes;
    if !out.len().is_multiple_of(rows) || out.is_empty() {
        return None;
    }
    let acts = out.len() / rows;
    let nb = row_bytes / wbs;
    let need = nb.checked_mul(abs)?;
    if stride < need {
        return None;
    }
    let total = (acts - 1).checked_mul(stride)?.checked_add(need)?;
    (total <= a.len()).then_some((rows, acts, nb))
}

#[inline(always)]
fn f32_at(p: *const u8) -> f32 {
    // SAFETY: callers pass pointers into validated blocks with four readable bytes.
    let b = unsafe { [p.read(), p.add(1).read(), p.add(2).read(), p.add(3).read()] };
    f32::from_le_bytes(b)
}

#[inline(always)]
pub(super) unsafe fn ld(p: *const u8) -> __m256i {
    // SAFETY: callers guarantee 32 readable bytes at `p`.
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

#[inline(always)]
pub(super) unsafe fn ld128(p: *const u8) -> __m128i {
    // SAFETY: callers guarantee 16 readable bytes at `p`.
    unsafe { _mm_loadu_si128(p as *const __m128i) }
}

#[inline(always)]
pub(super) unsafe fn store8(v: __m256) -> [f32; 8] {
    let mut o = [0f32; 8];
    // SAFETY: `o` has room for eight f32.
    unsafe { _mm256_storeu_ps(o.as_mut_ptr(), v) };
    o
}

// ---------------------------------------------------------------------------------------------
// Q4_0, Q5_0, Q8_0 (× Q8_0) and Q4_1, Q5_1 (× Q8_1)

/// 16 packed nibbles at `p` as 32 bytes: low nibbles first, then high nibbles.
#[inline(always)]
pub(super) unsafe fn nib(p: *const u8) -> __m256i {
    // SAFETY: 16 readable bytes at `p`; AVX2 enabled in every caller.
    unsafe {
        let t = ld128(p);
        _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(t, 4), t),
            _mm256_set1_epi8(0x0F),
        )
    }
}

/// Byte e = 0x10 when bit e of the little-endian u32 at `p` is set, else 0.
#[inline(always)]
pub(super) unsafe fn bits16(p: *const u8) -> __m256i {
    // SAFETY: four readable bytes at `p`; AVX2 enabled in every caller.
    unsafe {
        let x32 = i32::from_le_bytes([p.read(), p.add(1).read(), p.add(2).read(), p.add(3).read()]);
        let shuf = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0,
        );
        let by = _mm256_shuffle_epi8(_mm256_set1_epi32(x32), shuf);
        let bm = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
        let hit = _mm256_cmpeq_epi8(_mm256_and_si256(by, bm), bm);
        _mm256_and_si256(hit, _mm256_set1_epi8(0x10))
    }
}

/// Decodes a legacy block to 32 i8 values in element order (signed for the `_0` types, unsigned
/// for the `_1` types). `TY`: 0 Q4_0, 1 Q5_0, 2 Q8_0, 3 Q4_1, 4 Q5_1.
#[inline(always)]
unsafe fn dec_legacy<const TY: u8>(x: *const u8) -> __m256i {
    // SAFETY: `x` points at a whole block of type `TY` (validated by the caller).
    unsafe {
        let bits = |p| bits16(p);
        match TY {
            0 => _mm256_sub_epi8(nib(x.add(2)), _mm256_set1_epi8(8)),
            1 => _mm256_sub_epi8(
                _mm256_or_si256(nib(x.add(6)), bits(x.add(2))),
                _mm256_set1_epi8(16),
            ),
            2 => ld(x.add(2)),
            3 => nib(x.add(4)),
            _ => _mm256_or_si256(nib(x.add(8)), bits(x.add(4))),
        }
    }
}

/// The f16 at `p` widened (F16C).
#[inline(always)]
pub(super) unsafe fn h2f(p: *const u8) -> f32 {
    // SAFETY: two readable bytes at `p`; F16C enabled in every caller.
    unsafe {
        let bits = i32::from(u16::from_le_bytes([p.read(), p.add(1).read()]));
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }
}

/// Rows of a matrix in memory: row `i` starts `i * stride` bytes after `ptr` (the weight or the
/// activation rows of a register tile).
#[derive(Clone, Copy)]
pub(super) struct RowPtr {
    pub ptr: *const u8,
    pub stride: usize,
}

/// An `RM`×`RN` register tile: weight rows `w.ptr + i*w.stride` (`row_bytes`), activation rows
/// `a.ptr + j*a.stride`, results to `out[i*acts + j]`. `ONE`: the `_1` types (unsigned weights,
/// Q8_1 activations, fused min term).
#[inline(always)]
unsafe fn legacy_tile<const TY: u8, const ONE: bool, const RM: usize, const RN: usize>(
    wbs: usize,
    nb: usize,
    w: RowPtr,
    a: RowPtr,
    out: &mut [f32],
    acts: usize,
) {
    let RowPtr {
        ptr: w,
        stride: row_bytes,
    } = w;
    let RowPtr { ptr: a, stride } = a;
    // SAFETY: the caller validated nb blocks of the RM weight rows and of the RN activation rows.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); RN]; RM];
        let mut summs = [[0f32; RN]; RM];
        let abs = if ONE { Q8_1_BYTES } else { BlockQ8_0::BYTES };
        let qo = if ONE { 4 } else { 2 };
        for b in 0..nb {
            let mut xv = [_mm256_setzero_si256(); RM];
            let mut u = [_mm256_setzero_si256(); RM];
            let mut dx = [_mm256_setzero_ps(); RM];
            let mut mx = [0f32; RM];
            for i in 0..RM {
                let x = w.add(i * row_bytes + b * wbs);
                xv[i] = dec_legacy::<TY>(x);
                u[i] = if ONE {
                    xv[i]
                } else {
                    _mm256_sign_epi8(xv[i], xv[i])
                };
                dx[i] = _mm256_set1_ps(h2f(x));
                if ONE {
                    mx[i] = h2f(x.add(2));
                }
            }
            for j in 0..RN {
                let y = a.add(j * stride + b * abs);
                let q = ld(y.add(qo));
                let dy = _mm256_set1_ps(h2f(y));
                let sy = if ONE { h2f(y.add(2)) } else { 0.0 };
                for i in 0..RM {
                    let s = if ONE { q } else { _mm256_sign_epi8(q, xv[i]) };
                    let p = _mm256_madd_epi16(ones, _mm256_maddubs_epi16(u[i], s));
                    let d = _mm256_mul_ps(dx[i], dy);
                    acc[i][j] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[i][j]);
                    if ONE {
                        summs[i][j] = mx[i].mul_add(sy, summs[i][j]);
                    }
                }
            }
        }
        for i in 0..RM {
            for j in 0..RN {
                out[i * acts + j] = hsum8(store8(acc[i][j])) + if ONE { summs[i][j] } else { 0.0 };
            }
        }
    }
}

/// Drives [`legacy_tile`] over all rows × activations: `RM`×4 tiles, smaller ones at the edges.
#[inline(always)]
pub(super) unsafe fn legacy_drive<const TY: u8, const ONE: bool, const RM: usize>(
    wbs: usize,
    w: &[u8],
    row_bytes: usize,
    a: &[u8],
    stride: usize,
    out: &mut [f32],
) {
    let rows = w.len() / row_bytes;
    let acts = out.len() / rows;
    let nb = row_bytes / wbs;
    let mut r = 0;
    while r < rows {
        let rm = if rows - r >= RM { RM } else { 1 };
        let mut j = 0;
        while j < acts {
            let rn = (acts - j).min(4);
            // SAFETY: rows r..r+rm and activations j..j+rn lie inside the validated slices.
            unsafe {
                let wp = RowPtr {
                    ptr: w.as_ptr().add(r * row_bytes),
                    stride: row_bytes,
                };
                let ap = RowPtr {
                    ptr: a.as_ptr().add(j * stride),
                    stride,
                };
                let o = &mut out[r * acts + j..];
                macro_rules! t {
                    ($m:expr, $n:expr) => {
                        legacy_tile::<TY, ONE, $m, $n>(wbs, nb, wp, ap, o, acts)
                    };
                }
                match (rm == RM, rn) {
                    (true, 4) => t!(RM, 4),
                    (true, 3) => t!(RM, 3),
                    (true, 2) => t!(RM, 2),
                    (true, _) => t!(RM, 1),
                    (false, 4) => t!(1, 4),
                    (false, 3) => t!(1, 3),
                    (false, 2) => t!(1, 2),
                    (false, _) => t!(1, 1),
                }
            }
            j += rn;
        }
        r += rm;
    }
}

/// Legacy types on AVX2: 2×4 tiles (15 of the 16 vector registers).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn legacy_many<const TY: u8, const ONE: bool>(
    wbs: usize,
    w: &[u8],
    row_bytes: usize,
    a: &[u8],
    stride: usize,
    out: &mut [f32],
) {
    // SAFETY: validated by the caller.
    unsafe { legacy_drive::<TY, ONE, 2>(wbs, w, row_bytes, a, stride, out) }
}

// ---------------------------------------------------------------------------------------------
// K-quants × Q8_K

/// A decoded K-quant super-block: eight 32-byte value vectors (element order) and their i16
/// scale vectors (lanes 0..8: group 2v, lanes 8..16: group 2v+1).
struct KDec {
    v: [__m256i; 8],
    s: [__m256i; 8],
    /// Q2_K: 16 mins as i16; Q4_K/Q5_K: 8 mins as i16 in the low half; Q6_K: 16 scales as i16.
    extra: __m256i,
    d: f32,
    dmin: f32,
}

#[inline(always)]
unsafe fn scale_vec(lo: i32, hi: i32) -> __m256i {
    // SAFETY: AVX is enabled in every caller.
    unsafe { _mm256_set_m128i(_mm_set1_epi16(hi as i16), _mm_set1_epi16(lo as i16)) }
}

/// Decodes block `x` of K type `ty` (2..=6).
#[inline(always)]
unsafe fn dec_k<const TY: u8>(x: *const u8, k: &mut KDec) {
    // SAFETY: `x` points at a whole block of type `ty` (validated by the caller).
    unsafe {
        let m3 = _mm256_set1_epi8(3);
        let m4 = _mm256_set1_epi8(0x0F);
        let one = _mm256_set1_epi8(1);
        let bytes = |off: usize, n: usize| std::slice::from_raw_parts(x.add(off), n);
        match TY {
            2 => {
                let sc = bytes(0, 16);
                for j in 0..2 {
                    let bits = ld(x.add(16 + 32 * j));
                    for s in 0..4 {
                        let sh = _mm_cvtsi32_si128(2 * s as i32);
                        k.v[4 * j + s] = _mm256_and_si256(_mm256_srl_epi16(bits, sh), m3);
                        let g = 2 * (4 * j + s);
                        k.s[4 * j + s] =
                            scale_vec(i32::from(sc[g] & 15), i32::from(sc[g + 1] & 15));
                    }
                }
                let mins = _mm_and_si128(_mm_srli_epi16(ld128(x), 4), _mm_set1_epi8(15));
                k.extra = _mm256_cvtepi8_epi16(mins);
                k.d = h2f(x.add(80));
                k.dmin = h2f(x.add(82));
            }
            3 => {
                let mut kb = KBlock {
                    vals: [0; QK_K],
                    scales: [0; 16],
                };
                decode_q3_k(bytes(0, BlockQ3K::BYTES), &mut kb);
                let hm = ld(x);
                for j in 0..2 {
                    let bits = ld(x.add(32 + 32 * j));
                    for s in 0..4 {
                        let sh = _mm_cvtsi32_si128(2 * s as i32);
                        let low = _mm256_and_si256(_mm256_srl_epi16(bits, sh), m3);
                        let hsh = _mm_cvtsi32_si128((4 * j + s) as i32);
                        let h = _mm256_and_si256(_mm256_srl_epi16(hm, hsh), one);
                        let v = _mm256_or_si256(low, _mm256_slli_epi16(h, 2));
                        k.v[4 * j + s] = _mm256_sub_epi8(v, _mm256_set1_epi8(4));
                        let g = 2 * (4 * j + s);
                        k.s[4 * j + s] = scale_vec(kb.scales[g], kb.scales[g + 1]);
                    }
                }
                k.d = h2f(x.add(108));
            }
            4 | 5 => {
                let five = TY == 5;
                let sc = bytes(4, 12);
                let mut mins = [0i16; 8];
                for (j, m) in mins.iter_mut().enumerate() {
                    let (s, mm) = scale_min_k4(j, sc);
                    k.s[j] = _mm256_set1_epi16(s as i16);
                    *m = mm as i16;
                }
                k.extra = _mm256_castsi128_si256(_mm_loadu_si128(mins.as_ptr() as *const __m128i));
                let qs = x.add(if five { 48 } else { 16 });
                let hb = if five {
                    ld(x.add(16))
                } else {
                    _mm256_setzero_si256()
                };
                for j in 0..4 {
                    let bits = ld(qs.add(32 * j));
                    let mut lo = _mm256_and_si256(bits, m4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                    if five {
                        let s0 = _mm_cvtsi32_si128((2 * j) as i32);
                        let s1 = _mm_cvtsi32_si128((2 * j + 1) as i32);
                        let h0 = _mm256_and_si256(_mm256_srl_epi16(hb, s0), one);
                        let h1 = _mm256_and_si256(_mm256_srl_epi16(hb, s1), one);
                        lo = _mm256_or_si256(lo, _mm256_slli_epi16(h0, 4));
                        hi = _mm256_or_si256(hi, _mm256_slli_epi16(h1, 4));
                    }
                    k.v[2 * j] = lo;
                    k.v[2 * j + 1] = hi;
                }
                k.d = h2f(x);
                k.dmin = h2f(x.add(2));
            }
            _ => {
                let sc = bytes(192, 16);
                for j in 0..2 {
                    let b1 = ld(x.add(64 * j));
                    let b2 = ld(x.add(64 * j + 32));
                    let h = ld(x.add(128 + 32 * j));
                    let h0 = _mm256_slli_epi16(_mm256_and_si256(h, m3), 4);
                    let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), m3), 4);
                    let h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), m3), 4);
                    let h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), m3), 4);
                    k.v[4 * j] = _mm256_or_si256(_mm256_and_si256(b1, m4), h0);
                    k.v[4 * j + 1] = _mm256_or_si256(_mm256_and_si256(b2, m4), h1);
                    k.v[4 * j + 2] =
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b1, 4), m4), h2);
                    k.v[4 * j + 3] =
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b2, 4), m4), h3);
                }
                for v in 0..8 {
                    k.s[v] = scale_vec(i32::from(sc[2 * v] as i8), i32::from(sc[2 * v + 1] as i8));
                }
                k.extra = _mm256_cvtepi8_epi16(ld128(x.add(192)));
                k.d = h2f(x.add(208));
            }
        }
    }
}

/// The eight scaled i32 lanes of one block against one Q8_K block's values at `q8`.
#[inline(always)]
unsafe fn k_sumi<const VNNI: bool>(signed: bool, k: &KDec, q8: *const u8) -> __m256i {
    // SAFETY: 256 readable bytes at `q8`; AVX2 enabled in every caller.
    unsafe {
        let mut sumi = _mm256_setzero_si256();
        for v in 0..8 {
            let q = ld(q8.add(32 * v));
            let p16 = if signed {
                _mm256_maddubs_epi16(
                    _mm256_sign_epi8(k.v[v], k.v[v]),
                    _mm256_sign_epi8(q, k.v[v]),
                )
            } else {
                _mm256_maddubs_epi16(k.v[v], q)
            };
            sumi = if VNNI {
                // the same exact i32 sums as madd + add (vpdpwssd does not saturate)
                _mm256_dpwssd_epi32(sumi, k.s[v], p16)
            } else {
                _mm256_add_epi32(sumi, _mm256_madd_epi16(k.s[v], p16))
            };
        }
        sumi
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn k_many<const TY: u8, const TILED: bool>(
    wbs: usize,
    w: &[u8],
    a: &[u8],
    stride: usize,
    out: &mut [f32],
) {
    // SAFETY: forwarded from the caller.
    unsafe { k_body::<TY, false, TILED>(wbs, w, a, stride, out) }
}

/// Sum of the eight i32 lanes (exact).
#[inline(always)]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    // SAFETY: AVX2 enabled in every caller.
    unsafe {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }
}

/// Lane t of the result: the (exact) sum of the eight lanes of `v[t]`.
#[inline(always)]
unsafe fn hsum8x8(v: &[__m256i; 8]) -> __m256i {
    // SAFETY: AVX2 enabled in every caller.
    unsafe {
        let h01 = _mm256_hadd_epi32(v[0], v[1]);
        let h23 = _mm256_hadd_epi32(v[2], v[3]);
        let h45 = _mm256_hadd_epi32(v[4], v[5]);
        let h67 = _mm256_hadd_epi32(v[6], v[7]);
        let h0123 = _mm256_hadd_epi32(h01, h23);
        let h4567 = _mm256_hadd_epi32(h45, h67);
        _mm256_add_epi32(
            _mm256_permute2x128_si256(h0123, h4567, 0x20),
            _mm256_permute2x128_si256(h0123, h4567, 0x31),
        )
    }
}

/// `TILED`: ggml-cpu's tiled order (one exact integer sum per super-block, then
/// `fma(d·S1 [- dmin·S2], y.d, acc)`), else the vec_dot order (eight fused lanes).
#[inline(always)]
pub(super) unsafe fn k_body<const TY: u8, const VNNI: bool, const TILED: bool>(
    wbs: usize,
    w: &[u8],
    a: &[u8],
    stride: usize,
    out: &mut [f32],
) {
    let nb = w.len() / wbs;
    let zero = _mm256_setzero_si256();
    let mut k = KDec {
        v: [zero; 8],
        s: [zero; 8],
        extra: zero,
        d: 0.0,
        dmin: 0.0,
    };
    for (g, og) in out.chunks_mut(G).enumerate() {
        let mut acc = [_mm256_setzero_ps(); G];
        let mut accm = [_mm_setzero_ps(); G];
        let mut summs = [0f32; G];
        let base = g * G * stride;
        // tiled order: whole groups of 8 activations reduce and scale together (as ggml's
        // tiled kernel does, eight columns per vector); the rest one by one below
        let grouped = if TILED { og.len() / 8 * 8 } else { 0 };
        let mut accv = [_mm256_setzero_ps(); G / 8];
        for b in 0..nb {
            // SAFETY: block b of the weight row and of every activation row is in bounds (fits).
            unsafe {
                dec_k::<TY>(w.as_ptr().add(b * wbs), &mut k);
                for (gi, av) in accv.iter_mut().enumerate().take(grouped / 8) {
                    let mut s1 = [zero; 8];
                    let mut s2 = [zero; 8];
                    let mut dy = [0f32; 8];
                    for t in 0..8 {
                        let y = a
                            .as_ptr()
                            .add(base + (gi * 8 + t) * stride + b * BlockQ8K::BYTES);
                        dy[t] = f32_at(y);
                        let bsums = ld(y.add(260));
                        let mut sumi = k_sumi::<VNNI>(TY == 3, &k, y.add(4));
                        if TY == 6 {
                            let sub = _mm256_slli_epi32(_mm256_madd_epi16(bsums, k.extra), 5);
                            sumi = _mm256_sub_epi32(sumi, sub);
                        }
                        s1[t] = sumi;
                        s2[t] = match TY {
                            2 => _mm256_madd_epi16(k.extra, bsums),
                            4 | 5 => {
                                let q8s = _mm_hadd_epi16(
                                    _mm256_castsi256_si128(bsums),
                                    _mm256_extracti128_si256(bsums, 1),
                                );
                                let p = _mm_madd_epi16(_mm256_castsi256_si128(k.extra), q8s);
                                _mm256_zextsi128_si256(p)
                            }
                            _ => zero,
                        };
                    }
                    let mut res =
                        _mm256_mul_ps(_mm256_set1_ps(k.d), _mm256_cvtepi32_ps(hsum8x8(&s1)));
                    if matches!(TY, 2 | 4 | 5) {
                        res = _mm256_fnmadd_ps(
                            _mm256_set1_ps(k.dmin),
                            _mm256_cvtepi32_ps(hsum8x8(&s2)),
                            res,
                        );
                    }
                    *av = _mm256_fmadd_ps(res, _mm256_loadu_ps(dy.as_ptr()), *av);
                }
                for j in grouped..og.len() {
                    let y = a.as_ptr().add(base + j * stride + b * BlockQ8K::BYTES);
                    let yd = f32_at(y);
                    let bsums = ld(y.add(260));
                    let mut sumi = k_sumi::<VNNI>(TY == 3, &k, y.add(4));
                    if TILED {
                        if TY == 6 {
                            let sub = _mm256_slli_epi32(_mm256_madd_epi16(bsums, k.extra), 5);
                            sumi = _mm256_sub_epi32(sumi, sub);
                        }
                        let mut res = k.d * hsum_i32(sumi) as f32;
                        match TY {
                            2 => {
                                let s2 = hsum_i32(_mm256_madd_epi16(k.extra, bsums));
                                res = (-k.dmin).mul_add(s2 as f32, res);
                            }
                            4 | 5 => {
                                let q8s = _mm_hadd_epi16(
                                    _mm256_castsi256_si128(bsums),
                                    _mm256_extracti128_si256(bsums, 1),
                                );
                                let p = _mm_madd_epi16(_mm256_castsi256_si128(k.extra), q8s);
                                let p = _mm_add_epi32(p, _mm_shuffle_epi32(p, 0b01_00_11_10));
                                let p = _mm_add_epi32(p, _mm_shuffle_epi32(p, 0b10_11_00_01));
                                res = (-k.dmin).mul_add(_mm_cvtsi128_si32(p) as f32, res);
                            }
                            _ => {}
                        }
                        summs[j] = res.mul_add(yd, summs[j]);
                        continue;
                    }
                    let d = yd * k.d;
                    match TY {
                        2 => {
                            let dmin = -yd * k.dmin;
                            let prod = _mm256_madd_epi16(k.extra, bsums);
                            acc[j] = _mm256_fmadd_ps(
                                _mm256_set1_ps(dmin),
                                _mm256_cvtepi32_ps(prod),
                                acc[j],
                            );
                        }
                        4 | 5 => {
                            let dmin = -yd * k.dmin;
                            let q8s = _mm_hadd_epi16(
                                _mm256_castsi256_si128(bsums),
                                _mm256_extracti128_si256(bsums, 1),
                            );
                            let prod = _mm_madd_epi16(_mm256_castsi256_si128(k.extra), q8s);
                            if TY == 4 {
                                accm[j] =
                                    _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), accm[j]);
                            } else {
                                let mut p = [0i32; 4];
                                _mm_storeu_si128(p.as_mut_ptr() as *mut __m128i, prod);
                                summs[j] = (((p[0] + p[1]) + (p[2] + p[3])) as f32)
                                    .mul_add(dmin, summs[j]);
                            }
                        }
                        6 => {
                            let sub = _mm256_slli_epi32(_mm256_madd_epi16(bsums, k.extra), 5);
                            sumi = _mm256_sub_epi32(sumi, sub);
                        }
                        _ => {}
                    }
                    acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc[j]);
                }
            }
        }
        for (gi, av) in accv.iter().enumerate().take(grouped / 8) {
            // SAFETY: AVX is enabled.
            summs[gi * 8..gi * 8 + 8].copy_from_slice(&unsafe { store8(*av) });
        }
        for (j, o) in og.iter_mut().enumerate() {
            // SAFETY: AVX is enabled; `m` has room for four f32.
            let (h, m) = unsafe {
                let mut m = [0f32; 4];
                _mm_storeu_ps(m.as_mut_ptr(), accm[j]);
                (hsum8(store8(acc[j])), m)
            };
            *o = match TY {
                _ if TILED => summs[j],
                4 => h + ((m[0] + m[2]) + (m[1] + m[3])),
                5 => h + summs[j],
                _ => h,
            };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// F16 × F16

/// F16 weights against f16-valued f32 activations: 16 f32 lanes (two registers) of fused
/// products per dot, four dots per pass.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_many(w: &[u8], a: &[u8], stride: usize, out: &mut [f32]) {
    let n = w.len() / 2;
    let full = n / 16 * 16;
    for (g, og) in out.chunks_mut(4).enumerate() {
        let base = g * 4 * stride;
        let mut lo = [_mm256_setzero_ps(); 4];
        let mut hi = [_mm256_setzero_ps(); 4];
        let m = og.len();
        let mut i = 0;
        while i < full {
            // SAFETY: elements i..i+16 of the weight row and of every activation row are in bounds.
            unsafe {
                let w0 = _mm256_cvtph_ps(ld128(w.as_ptr().add(2 * i)));
                let w1 = _mm256_cvtph_ps(ld128(w.as_ptr().add(2 * i + 16)));
                for j in 0..m {
                    let y = a.as_ptr().add(base + j * stride + 4 * i) as *const f32;
                    lo[j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(y), lo[j]);
                    hi[j] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(y.add(8)), hi[j]);
                }
            }
            i += 16;
        }
        for j in 0..m {
            let mut l = [0f32; 16];
            // SAFETY: AVX is enabled.
            unsafe {
                l[..8].copy_from_slice(&store8(lo[j]));
                l[8..].copy_from_slice(&store8(hi[j]));
            }
            let row = a.get(base + j * stride..).unwrap_or(&[]);
            let mut tail = 0f32;
            for e in full..n {
                tail += rd_f16(w, 2 * e) * rd_f32(row, 4 * e);
            }
            og[j] = lanes_sum(l) + tail;
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_head_tf(kv: HeadView<'_>, qs: Queries<'_>, scale: f32, out: &mut [f32]) {
    flash::attend_head_impl(kv, qs, scale, out)
}

/// [`super::attn::attend_head`] compiled for AVX2 + FMA (same operations, vectorized: lanes
/// never mix, so the results are the same bits); the plain build when the CPU lacks them.
pub(super) fn attend_head(kv: HeadView<'_>, qs: Queries<'_>, scale: f32, out: &mut [f32]) {
    if !available() {
        return flash::attend_head_impl(kv, qs, scale, out);
    }
    // SAFETY: the CPU has AVX2/FMA/F16C; the body is safe code.
    unsafe { attend_head_tf(kv, qs, scale, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rope_pairs_tf(x: &mut [f32], cs: &[f32]) {
    scalar::rope_pairs_impl(x, cs)
}

/// [`super::rope_pairs`] compiled with FMA (the fused multiply-adds become instructions instead
/// of calls to libm's `fmaf`; the same results).
pub(super) fn rope_pairs(x: &mut [f32], cs: &[f32]) {
    if !available() {
        return scalar::rope_pairs_impl(x, cs);
    }
    // SAFETY: the CPU has AVX2/FMA/F16C; the body is safe code.
    unsafe { rope_pairs_tf(x, cs) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn swiglu_tf(x: &[f32], g: &[f32], out: &mut [f32]) {
    scalar::swiglu_impl(x, g, out)
}

/// [`super::swiglu`] compiled for AVX2 + FMA (same operations).
pub(super) fn swiglu(x: &[f32], g: &[f32], out: &mut [f32]) {
    if !available() {
        return scalar::swiglu_impl(x, g, out);
    }
    // SAFETY: the CPU has AVX2/FMA/F16C; the body is safe code.
    unsafe { swiglu_tf(x, g, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_act_tf(f: ActFormat, x: &[f32], out: &mut [u8]) {
    scalar::quantize_act_impl(f, x, out)
}

/// [`ActFormat::F16`] activations: each value rounded to f16 (nearest, ties to even) and
/// widened back, eight at a time with F16C; the rest as [`scalar::quantize_act_impl`] does.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn round_f16_tf(x: &[f32], out: &mut [u8]) {
    let n = x.len().min(out.len() / 4);
    let whole = n / 8 * 8;
    for (xs, os) in x[..whole]
        .chunks_exact(8)
        .zip(out[..4 * whole].chunks_exact_mut(32))
    {
        // SAFETY: `xs` holds 8 floats and `os` 32 bytes.
        unsafe {
            let v = _mm256_loadu_ps(xs.as_ptr());
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm256_storeu_ps(os.as_mut_ptr() as *mut f32, _mm256_cvtph_ps(h));
        }
    }
    scalar::quantize_act_impl(ActFormat::F16, &x[whole..n], &mut out[4 * whole..4 * n]);
}

/// [`super::quantize_act`] compiled for AVX2 (same operations, same bytes).
pub(super) fn quantize_act(f: ActFormat, x: &[f32], out: &mut [u8]) {
    if !available() {
        return scalar::quantize_act_impl(f, x, out);
    }
    if f == ActFormat::F16 {
        // SAFETY: the CPU has AVX2/FMA/F16C; lengths are checked inside.
        return unsafe { round_f16_tf(x, out) };
    }
    // SAFETY: the CPU has AVX2/FMA/F16C; the body is safe code.
    unsafe { quantize_act_tf(f, x, out) }
}
