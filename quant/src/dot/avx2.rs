//! AVX2 + FMA + F16C dot kernels: one weight row against many activation rows, each dot computed
//! in exactly the arithmetic order of the scalar reference in [`super`] (which follows ggml's own
//! x86 kernels), so the results are bit-identical to it.
//!
//! Every weight block is decoded once (integer values in ggml's element order, i16 scale vectors)
//! and multiplied against a group of activation rows; the per-dot accumulators live in small
//! arrays. The safe entry points validate every length and fall back to the scalar kernels when a
//! length does not fit or the CPU lacks the instructions.

use std::arch::x86_64::*;

use super::{hsum8, lanes_sum, scalar_many, DotManyFn, QK_K};
use crate::GgmlType;

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
unsafe fn ld(p: *const u8) -> __m256i {
    // SAFETY: callers guarantee 32 readable bytes at `p`.
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

#[inline(always)]
unsafe fn ld128(p: *const u8) -> __m128i {
    // SAFETY: callers guarantee 16 readable bytes at `p`.
    unsafe { _mm_loadu_si128(p as *const __m128i) }
}

#[inline(always)]
unsafe fn store8(v: __m256) -> [f32; 8] {
    let mut o = [0f32; 8];
    // SAFETY: `o` has room for eight f32.
    unsafe { _mm256_storeu_ps(o.as_mut_ptr(), v) };
    o
}

// ---------------------------------------------------------------------------------------------
// Q4_0, Q5_0, Q8_0 (× Q8_0) and Q4_1, Q5_1 (× Q8_1)

/// 16 packed nibbles at `p` as 32 bytes: low nibbles first, then high nibbles.
#[inline(always)]
unsafe fn nib(p: *const u8) -> __m256i {
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
unsafe fn bits16(p: *const u8) -> __m256i {
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
unsafe fn h2f(p: *const u8) -> f32 {
    // SAFETY: two readable bytes at `p`; F16C enabled in every caller.
    unsafe {
        let bits = i32::from(u16::from_le_bytes([p.read(), p.add(1).read()]));
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }
}

/// An `RM`×`RN` register tile: weight rows `w + i*row_bytes`, activation rows `a + j*stride`,
/// results to `out[i*acts + j]`. `ONE`: the `_1` types (unsigned weights, Q8_1 activations, fused
/// min term).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn legacy_tile<const TY: u8, const ONE: bool, const RM: usize, const RN: usize>(
    wbs: usize,
    nb: usize,
    w: *const u8,
    row_bytes: usize,
    a: *const u8,
    stride: usize,
    out: &mut [f32],
    acts: usize,
) {
    // SAFETY: the caller validated nb blocks of the RM weight rows and of the RN activation rows.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); RN]; RM];
        let mut summs = [[0f32; RN]; RM];
        let abs = if ONE { 36 } else { 34 };
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
unsafe fn legacy_drive<const TY: u8, const ONE: bool, const RM: usize>(
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
                let wp = w.as_ptr().add(r * row_bytes);
                let ap = a.as_ptr().add(j * stride);
                let o = &mut out[r * acts + j..];
                macro_rules! t {
                    ($m:expr, $n:expr) => {
                        legacy_tile::<TY, ONE, $m, $n>(wbs, nb, wp, row_bytes, ap, stride, o, acts)
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

/// A legacy block as unsigned bytes for `vpdpbusd`: the `_0` types offset by `OFF` (Q4_0 8,
/// Q5_0 16, Q8_0 128; the products are corrected by `OFF * Σq` per lane, exactly).
#[inline(always)]
unsafe fn dec_unsigned<const TY: u8>(x: *const u8) -> (__m256i, i8) {
    // SAFETY: `x` points at a whole block of type `TY` (validated by the caller).
    unsafe {
        match TY {
            0 => (nib(x.add(2)), 8),
            1 => (_mm256_or_si256(nib(x.add(6)), bits16(x.add(2))), 16),
            2 => (_mm256_xor_si256(ld(x.add(2)), _mm256_set1_epi8(-128)), -128),
            3 => (nib(x.add(4)), 0),
            _ => (_mm256_or_si256(nib(x.add(8)), bits16(x.add(4))), 0),
        }
    }
}

/// [`legacy_tile`] with AVX-512 VNNI: one `vpdpbusd` per block and pair (started from
/// `-OFF * Σq`) yields the same eight exact i32 lanes as ggml's `maddubs` + `madd`; the scale
/// products `dx*dy` are formed four rows at a time. Same f32 operations, same results.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn legacy_tile_vnni<const TY: u8, const ONE: bool, const RM: usize, const RN: usize>(
    wbs: usize,
    nb: usize,
    w: *const u8,
    row_bytes: usize,
    a: *const u8,
    stride: usize,
    out: &mut [f32],
    acts: usize,
) {
    // SAFETY: the caller validated nb blocks of the RM weight rows and of the RN activation rows;
    // AVX-512 VNNI/VL enabled in the caller.
    unsafe {
        let zero = _mm256_setzero_si256();
        let mut acc = [[_mm256_setzero_ps(); RN]; RM];
        let mut summs = [[0f32; RN]; RM];
        let abs = if ONE { 36 } else { 34 };
        let qo = if ONE { 4 } else { 2 };
        let idx: [__m256i; 4] = [
            _mm256_set1_epi32(0),
            _mm256_set1_epi32(1),
            _mm256_set1_epi32(2),
            _mm256_set1_epi32(3),
        ];
        for b in 0..nb {
            let mut xu = [zero; RM];
            let mut dxs = [0f32; 8];
            let mut mx = [0f32; RM];
            let mut off = 0i8;
            for i in 0..RM {
                let x = w.add(i * row_bytes + b * wbs);
                let (v, o) = dec_unsigned::<TY>(x);
                xu[i] = v;
                off = o;
                dxs[i] = h2f(x);
                if ONE {
                    mx[i] = h2f(x.add(2));
                }
            }
            let dxv = _mm256_loadu_ps(dxs.as_ptr());
            for j in 0..RN {
                let y = a.add(j * stride + b * abs);
                let q = ld(y.add(qo));
                let dd = _mm256_mul_ps(dxv, _mm256_set1_ps(h2f(y)));
                let base = if ONE {
                    zero
                } else {
                    _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, _mm256_set1_epi8(off), q))
                };
                let sy = if ONE { h2f(y.add(2)) } else { 0.0 };
                for i in 0..RM {
                    let p = _mm256_dpbusd_epi32(base, xu[i], q);
                    let d = _mm256_permutevar8x32_ps(dd, idx[i]);
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

/// Legacy types with AVX-512 VNNI: 4×4 tiles.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn legacy_many_vnni<const TY: u8, const ONE: bool>(
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
        let rm = if rows - r >= 4 { 4 } else { 1 };
        let mut j = 0;
        while j < acts {
            let rn = (acts - j).min(4);
            // SAFETY: rows r..r+rm and activations j..j+rn lie inside the validated slices.
            unsafe {
                let wp = w.as_ptr().add(r * row_bytes);
                let ap = a.as_ptr().add(j * stride);
                let o = &mut out[r * acts + j..];
                macro_rules! t {
                    ($m:expr, $n:expr) => {
                        legacy_tile_vnni::<TY, ONE, $m, $n>(
                            wbs, nb, wp, row_bytes, ap, stride, o, acts,
                        )
                    };
                }
                match (rm, rn) {
                    (4, 4) => t!(4, 4),
                    (4, 3) => t!(4, 3),
                    (4, 2) => t!(4, 2),
                    (4, _) => t!(4, 1),
                    (_, 4) => t!(1, 4),
                    (_, 3) => t!(1, 3),
                    (_, 2) => t!(1, 2),
                    _ => t!(1, 1),
                }
            }
            j += rn;
        }
        r += rm;
    }
}

/// Whether this CPU runs the AVX-512 VNNI variants.
fn vnni_available() -> bool {
    avx512_available() && is_x86_feature_detected!("avx512vnni")
}

/// Legacy types on AVX2: 2×4 tiles (15 of the 16 vector registers).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn legacy_many<const TY: u8, const ONE: bool>(
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

/// Legacy types with AVX-512VL's 32 vector registers: 4×4 tiles, the same AVX2 operations.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn legacy_many_512<const TY: u8, const ONE: bool>(
    wbs: usize,
    w: &[u8],
    row_bytes: usize,
    a: &[u8],
    stride: usize,
    out: &mut [f32],
) {
    // SAFETY: validated by the caller.
    unsafe { legacy_drive::<TY, ONE, 4>(wbs, w, row_bytes, a, stride, out) }
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
                let mut kb = super::KBlock {
                    vals: [0; QK_K],
                    scales: [0; 16],
                };
                super::decode_q3_k(bytes(0, 110), &mut kb);
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
                    let (s, mm) = super::scale_min_k4(j, sc);
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
unsafe fn k_many<const TY: u8, const TILED: bool>(
    wbs: usize,
    w: &[u8],
    a: &[u8],
    stride: usize,
    out: &mut [f32],
) {
    // SAFETY: forwarded from the caller.
    unsafe { k_body::<TY, false, TILED>(wbs, w, a, stride, out) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn k_many_vnni<const TY: u8, const TILED: bool>(
    wbs: usize,
    w: &[u8],
    a: &[u8],
    stride: usize,
    out: &mut [f32],
) {
    // SAFETY: forwarded from the caller.
    unsafe { k_body::<TY, true, TILED>(wbs, w, a, stride, out) }
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
unsafe fn k_body<const TY: u8, const VNNI: bool, const TILED: bool>(
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
                        let y = a.as_ptr().add(base + (gi * 8 + t) * stride + b * 292);
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
                    let y = a.as_ptr().add(base + j * stride + b * 292);
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
unsafe fn f16_many(w: &[u8], a: &[u8], stride: usize, out: &mut [f32]) {
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
                tail += super::rd_f16(w, 2 * e) * super::rd_f32(row, 4 * e);
            }
            og[j] = lanes_sum(l) + tail;
        }
    }
}

/// F16 weights against f16-valued f32 activations with AVX-512: one 16-lane register per dot
/// (llamafile's `tinyBLAS<16, __m512>`), 4×4 tiles.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn f16_tile_512<const RM: usize, const RN: usize>(
    n: usize,
    w: *const u8,
    row_bytes: usize,
    a: *const u8,
    stride: usize,
    out: &mut [f32],
    acts: usize,
) {
    // SAFETY: n elements of the RM weight rows and RN activation rows are readable.
    unsafe {
        let full = n / 16 * 16;
        let mut acc = [[_mm512_setzero_ps(); RN]; RM];
        let mut e = 0;
        while e < full {
            let mut wv = [_mm512_setzero_ps(); RM];
            for (i, v) in wv.iter_mut().enumerate() {
                *v = _mm512_cvtph_ps(ld(w.add(i * row_bytes + 2 * e)));
            }
            for j in 0..RN {
                let av = _mm512_loadu_ps(a.add(j * stride + 4 * e) as *const f32);
                for i in 0..RM {
                    acc[i][j] = _mm512_fmadd_ps(wv[i], av, acc[i][j]);
                }
            }
            e += 16;
        }
        for i in 0..RM {
            for j in 0..RN {
                let mut l = [0f32; 16];
                _mm512_storeu_ps(l.as_mut_ptr(), acc[i][j]);
                let mut tail = 0f32;
                for k in full..n {
                    let x = h2f(w.add(i * row_bytes + 2 * k));
                    let p = a.add(j * stride + 4 * k);
                    let y = f32::from_le_bytes([
                        p.read(),
                        p.add(1).read(),
                        p.add(2).read(),
                        p.add(3).read(),
                    ]);
                    tail += x * y;
                }
                out[i * acts + j] = lanes_sum(l) + tail;
            }
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn f16_many_512(w: &[u8], row_bytes: usize, a: &[u8], stride: usize, out: &mut [f32]) {
    let rows = w.len() / row_bytes;
    let acts = out.len() / rows;
    let n = row_bytes / 2;
    let mut r = 0;
    while r < rows {
        let rm = if rows - r >= 4 { 4 } else { 1 };
        let mut j = 0;
        while j < acts {
            let rn = (acts - j).min(4);
            // SAFETY: rows r..r+rm and activations j..j+rn lie inside the validated slices.
            unsafe {
                let wp = w.as_ptr().add(r * row_bytes);
                let ap = a.as_ptr().add(j * stride);
                let o = &mut out[r * acts + j..];
                macro_rules! t {
                    ($m:expr, $n:expr) => {
                        f16_tile_512::<$m, $n>(n, wp, row_bytes, ap, stride, o, acts)
                    };
                }
                match (rm, rn) {
                    (4, 4) => t!(4, 4),
                    (4, 3) => t!(4, 3),
                    (4, 2) => t!(4, 2),
                    (4, _) => t!(4, 1),
                    (_, 4) => t!(1, 4),
                    (_, 3) => t!(1, 3),
                    (_, 2) => t!(1, 2),
                    _ => t!(1, 1),
                }
            }
            j += rn;
        }
        r += rm;
    }
}

// ---------------------------------------------------------------------------------------------
// F16 × F16 over a prompt: packed, register- and cache-blocked

/// Weight rows per micro-tile of [`f16_gemm_512`].
const GEMM_RM: usize = 4;
/// Tokens per micro-tile of [`f16_gemm_512`].
const GEMM_RN: usize = 6;
/// Elements of K per cache block (a multiple of 16).
const GEMM_KC: usize = 256;
/// Weight rows packed at once (a multiple of [`GEMM_RM`]).
const GEMM_RB: usize = 16;
// reduce16 reduces one token's GEMM_RB accumulators at once
const _: () = assert!(GEMM_RB == 16);
// f16_gemm_tile unrolls a whole K block of 16 steps
const _: () = assert!(GEMM_KC == 256);
/// Floats of accumulators per token in [`f16_gemm_512`] (16 lanes for each of [`GEMM_RB`] rows).
const GEMM_ACC_ROW: usize = GEMM_RB * 16;
/// Bytes of packed activations per pass of [`f16_gemm_512`].
const GEMM_PA_BYTES: usize = 1 << 20;

/// One `GEMM_RM × RN` micro-tile over `steps` 16-element steps of K: `pw` is the packed f32 weight
/// panel (`[step][row][16]`), `a` the packed activations (`[step][token][16]`), `acc` the tile's 16-lane accumulators ([`GEMM_ACC_ROW`] floats between tokens, 16
/// between rows), loaded unless `first` and stored back. Every accumulator gets the same fused
/// multiply-adds in the same K order as [`super::dot_f16_f16`]'s lanes.
#[inline(always)]
unsafe fn f16_gemm_tile<const RN: usize>(
    steps: usize,
    pw: *const f32,
    a: *const f32,
    acc: *mut f32,
    first: bool,
    next_acc: *const f32,
) {
    // SAFETY: the caller guarantees `steps` steps of the panel, of RN activation rows and RN × RM
    // accumulators are in bounds.
    unsafe {
        let mut c = [[_mm512_setzero_ps(); RN]; GEMM_RM];
        if !first {
            for (i, ci) in c.iter_mut().enumerate() {
                for (j, cij) in ci.iter_mut().enumerate() {
                    *cij = _mm512_loadu_ps(acc.add(j * GEMM_ACC_ROW + i * 16));
                }
            }
        }
        if steps == GEMM_KC / 16 {
            // a whole K block: unrolled, so that every address is a constant offset (no integer
            // work competing with the multiply-adds for ports)
            macro_rules! steps {
                ($($s:literal)*) => {
                    $(f16_gemm_step::<RN>($s, pw, a, &mut c, next_acc);)*
                };
            }
            steps!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
        } else {
            for s in 0..steps {
                f16_gemm_step::<RN>(s, pw, a, &mut c, next_acc);
            }
        }
        for (i, ci) in c.iter().enumerate() {
            for (j, cij) in ci.iter().enumerate() {
                _mm512_storeu_ps(acc.add(j * GEMM_ACC_ROW + i * 16), *cij);
            }
        }
    }
}

/// Step `s` of [`f16_gemm_tile`]: four weight vectors times `RN` activation vectors into the
/// accumulators `c`; steps below 12 also fetch two lines of the next tile's accumulators
/// (`next_acc`, never dereferenced here) into L1.
///
/// # Safety
/// Step `s` of the panel and of the packed activations is in bounds.
#[inline(always)]
unsafe fn f16_gemm_step<const RN: usize>(
    s: usize,
    pw: *const f32,
    a: *const f32,
    c: &mut [[__m512; RN]; GEMM_RM],
    next_acc: *const f32,
) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        if 2 * s < GEMM_RN * GEMM_RM {
            for l in [2 * s, 2 * s + 1] {
                let p = next_acc.wrapping_add((l / GEMM_RM) * GEMM_ACC_ROW + (l % GEMM_RM) * 16);
                _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
            }
        }
        let wp = pw.add(s * 16 * GEMM_RM);
        let w0 = _mm512_loadu_ps(wp);
        let w1 = _mm512_loadu_ps(wp.add(16));
        let w2 = _mm512_loadu_ps(wp.add(32));
        let w3 = _mm512_loadu_ps(wp.add(48));
        for j in 0..RN {
            let av = _mm512_loadu_ps(a.add((s * RN + j) * 16));
            c[0][j] = _mm512_fmadd_ps(w0, av, c[0][j]);
            c[1][j] = _mm512_fmadd_ps(w1, av, c[1][j]);
            c[2][j] = _mm512_fmadd_ps(w2, av, c[2][j]);
            c[3][j] = _mm512_fmadd_ps(w3, av, c[3][j]);
        }
    }
}

/// `v` from its first 64-byte aligned element (within its first 16).
fn aligned64(v: &mut [f32]) -> &mut [f32] {
    let o = v.as_ptr().align_offset(64).min(16).min(v.len());
    &mut v[o..]
}

/// The pairwise sums ([`lanes_sum`]) of the 16 accumulators at `p` (16 floats each), lane `r`
/// holding accumulator `r`: the four halving steps done on pairs of registers at once.
///
/// # Safety
/// AVX-512F; 256 floats readable at `p`.
#[inline(always)]
unsafe fn reduce16(p: *const f32) -> __m512 {
    // SAFETY: guaranteed by the caller.
    unsafe {
        let v: [__m512; 16] = std::array::from_fn(|r| _mm512_loadu_ps(p.add(16 * r)));
        // x[i] + x[i + 8]: rows 2m, 2m+1 as two 8-lane halves
        let s: [__m512; 8] = std::array::from_fn(|m| {
            let (a, b) = (v[2 * m], v[2 * m + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
            )
        });
        // x[i] + x[i + 4]: rows 4p..4p+4, one per 128-bit quarter
        let t: [__m512; 4] = std::array::from_fn(|q| {
            let (a, b) = (s[2 * q], s[2 * q + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
            )
        });
        // x[i] + x[i + 2]: quarter q holds rows q and 4 + q (u0), 8 + q and 12 + q (u1)
        let u: [__m512; 2] = std::array::from_fn(|q| {
            let (a, b) = (t[2 * q], t[2 * q + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(a, b),
                _mm512_shuffle_ps::<0xEE>(a, b),
            )
        });
        // x[0] + x[1]: lane 4q + c holds row q + 4c
        let f = _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(u[0], u[1]),
            _mm512_shuffle_ps::<0xDD>(u[0], u[1]),
        );
        let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(idx, f)
    }
}

/// Packs the first `kf` (a multiple of 16) activations of `toks` tokens (`stride` bytes apart in
/// `a`, f32) into `pa` in the order [`f16_gemm_512`] reads them: K blocks of [`GEMM_KC`], in each
/// groups of [`GEMM_RN`] tokens, in each 16-element steps of every token of the group.
///
/// # Safety
/// AVX-512F; `a` holds `toks` rows of `kf` floats `stride` bytes apart and `pa` `toks * kf`
/// floats.
#[target_feature(enable = "avx512f")]
unsafe fn f16_pack_acts(a: &[u8], stride: usize, toks: usize, kf: usize, pa: &mut [f32]) {
    let steps = kf / 16;
    let mut kb = 0;
    while kb < steps {
        let ks = (GEMM_KC / 16).min(steps - kb);
        let mut j0 = 0;
        while j0 < toks {
            let rn = GEMM_RN.min(toks - j0);
            let base = kb * 16 * toks + j0 * ks * 16;
            for s in 0..ks {
                for j in 0..rn {
                    let src = &a[(j0 + j) * stride + 64 * (kb + s)..][..64];
                    let dst = &mut pa[base + (s * rn + j) * 16..][..16];
                    // SAFETY: both slices hold 16 f32 (64 bytes).
                    unsafe {
                        let v = _mm512_loadu_ps(src.as_ptr() as *const f32);
                        _mm512_storeu_ps(dst.as_mut_ptr(), v);
                    }
                }
            }
            j0 += rn;
        }
        kb += ks;
    }
}

/// `out[j * ldo + r] = dot_f16_f16(w_r, a_j)` for every weight row `r` and token `j < toks`:
/// weights converted to f32 once per block of [`GEMM_RB`] rows, `GEMM_RM × GEMM_RN` register tiles
/// over K blocks of [`GEMM_KC`], the 16-lane accumulators kept in memory between K blocks (exact),
/// then reduced pairwise with the scalar tail added as the scalar kernel does.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL, AVX2, FMA and F16C; `w` is whole rows of `row_bytes` (even),
/// `toks` activation rows of `row_bytes * 2` bytes lie `stride` apart in `a`, and `out` is valid for
/// writes of `(toks - 1) * ldo + rows` floats (of which only `out[j * ldo + r]`, `r < rows`, are
/// written; nothing else may access those during the call) with `ldo >= rows`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn f16_gemm_512(
    w: &[u8],
    row_bytes: usize,
    a: &[u8],
    stride: usize,
    toks: usize,
    pa: &[f32],
    out: *mut f32,
    ldo: usize,
) {
    let rows = w.len() / row_bytes;
    let k = row_bytes / 2;
    let steps = k / 16;
    let kf = steps * 16;
    let acc_row = GEMM_ACC_ROW;
    // scratch buffers reused across calls on this thread (fresh large allocations would cost a
    // page fault per 4 KiB every call); every element read below is written first
    thread_local! {
        static SCRATCH: std::cell::RefCell<[Vec<f32>; 2]> = const {
            std::cell::RefCell::new([Vec::new(), Vec::new()])
        };
    }
    let mut own: [Vec<f32>; 2] = SCRATCH.with(|c| c.take());
    let [pw, acc] = &mut own;
    for (v, n) in [(&mut *pw, GEMM_RB * GEMM_KC), (&mut *acc, toks * acc_row)] {
        // 16 floats more, so that a 64-byte aligned start fits (vector loads never split lines)
        if v.len() < n + 16 {
            v.resize(n + 16, 0.0);
        }
    }
    let (pw, acc) = (aligned64(pw), aligned64(acc));
    let ksb = GEMM_KC / 16;
    let mut r0 = 0;
    while r0 < rows {
        let nr = GEMM_RB.min(rows - r0);
        let groups = nr.div_ceil(GEMM_RM);
        // the next block's rows (contiguous bytes) are fetched into L2 while this block computes,
        // a line or two per micro-tile, so that packing them finds them there
        let mut pf = (r0 + nr) * row_bytes;
        let pf_end = rows.min(r0 + 2 * GEMM_RB) * row_bytes;
        let tiles = steps.div_ceil(ksb) * toks.div_ceil(GEMM_RN) * groups;
        let per_tile = pf_end
            .saturating_sub(pf)
            .div_ceil(64)
            .div_ceil(tiles.max(1));
        let wp = w.as_ptr();
        let mut kb = 0;
        while kb < steps {
            let ks = ksb.min(steps - kb);
            // pack this K block: [group][step][row in group][16], rows past `nr` zero
            for g in 0..groups {
                for i in 0..GEMM_RM {
                    let r = g * GEMM_RM + i;
                    for s in 0..ks {
                        let dst = &mut pw[((g * ks + s) * GEMM_RM + i) * 16..][..16];
                        if r < nr {
                            // SAFETY: row r0 + r < rows; elements 16(kb+s).. +16 lie in the row.
                            unsafe {
                                let v = _mm512_cvtph_ps(ld(w
                                    .as_ptr()
                                    .add((r0 + r) * row_bytes + 32 * (kb + s))));
                                _mm512_storeu_ps(dst.as_mut_ptr(), v);
                            }
                        } else {
                            dst.fill(0.0);
                        }
                    }
                }
            }
            let mut j0 = 0;
            while j0 < toks {
                let rn = GEMM_RN.min(toks - j0);
                for g in 0..groups {
                    // the tile after this one: next group of rows, or first of the next tokens
                    let (nj, ng) = if g + 1 < groups {
                        (j0, g + 1)
                    } else {
                        (j0 + rn, 0)
                    };
                    let nacc = acc.as_ptr().wrapping_add(nj * acc_row + ng * GEMM_RM * 16);
                    // SAFETY: the panel holds `groups * ks` steps, tokens j0..j0+rn exist and
                    // hold `kf` elements from offset 64 * kb, the accumulators fit `acc`.
                    unsafe {
                        let p = pw.as_ptr().add(g * ks * 16 * GEMM_RM);
                        let ap = pa.as_ptr().add(kb * 16 * toks + j0 * ks * 16);
                        let cp = acc.as_mut_ptr().add(j0 * acc_row + g * GEMM_RM * 16);
                        let first = kb == 0;
                        match rn {
                            6 => f16_gemm_tile::<6>(ks, p, ap, cp, first, nacc),
                            5 => f16_gemm_tile::<5>(ks, p, ap, cp, first, nacc),
                            4 => f16_gemm_tile::<4>(ks, p, ap, cp, first, nacc),
                            3 => f16_gemm_tile::<3>(ks, p, ap, cp, first, nacc),
                            2 => f16_gemm_tile::<2>(ks, p, ap, cp, first, nacc),
                            _ => f16_gemm_tile::<1>(ks, p, ap, cp, first, nacc),
                        }
                    }
                    for _ in 0..per_tile {
                        if pf < pf_end {
                            // a prefetch never faults
                            _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(pf) as *const i8);
                            pf += 64;
                        }
                    }
                }
                j0 += rn;
            }
            kb += ks;
        }
        for j in 0..toks {
            let arow = &a[j * stride..];
            let mut tail = [0f32; GEMM_RB];
            for (r, t) in tail.iter_mut().enumerate().take(nr) {
                let wr = &w[(r0 + r) * row_bytes..][..row_bytes];
                for e in kf..k {
                    *t += super::rd_f16(wr, 2 * e) * super::rd_f32(arow, 4 * e);
                }
            }
            // SAFETY: token j's outputs r0..r0 + nr are valid for writes (caller's contract).
            let orow = unsafe { std::slice::from_raw_parts_mut(out.add(j * ldo + r0), nr) };
            if steps == 0 {
                for (o, t) in orow.iter_mut().zip(tail) {
                    *o = lanes_sum([0f32; 16]) + t;
                }
                continue;
            }
            // SAFETY: the token's GEMM_RB accumulators are 256 floats of `acc`; the masked
            // store writes the `nr` outputs of `orow`.
            unsafe {
                let r = reduce16(acc.as_ptr().add(j * acc_row));
                let r = _mm512_add_ps(r, _mm512_loadu_ps(tail.as_ptr()));
                _mm512_mask_storeu_ps(orow.as_mut_ptr(), ((1u32 << nr) - 1) as u16, r);
            }
        }
        r0 += nr;
    }
    SCRATCH.with(|c| c.replace(own));
}

/// Whether [`f16_gemm`] has a vector kernel on this CPU.
pub(super) fn f16_gemm_available() -> bool {
    avx512_available()
}

/// Checks the lengths of an F16 gemm call (see [`super::gemm_f16`]); returns the weight rows.
fn f16_gemm_fits(
    w: &[u8],
    row_bytes: usize,
    a: &[u8],
    stride: usize,
    toks: usize,
    out_len: usize,
    ldo: usize,
) -> Option<usize> {
    if !f16_gemm_available() || toks == 0 || row_bytes == 0 || !row_bytes.is_multiple_of(2) {
        return None;
    }
    if w.is_empty() || !w.len().is_multiple_of(row_bytes) {
        return None;
    }
    let rows = w.len() / row_bytes;
    let need = row_bytes.checked_mul(2)?;
    if stride < need || ldo < rows {
        return None;
    }
    if (toks - 1).checked_mul(stride)?.checked_add(need)? > a.len() {
        return None;
    }
    if (toks - 1).checked_mul(ldo)?.checked_add(rows)? > out_len {
        return None;
    }
    toks.checked_mul(GEMM_RB * 16 * 4)?;
    Some(rows)
}

/// Elements of a weight row of `row_bytes` (f16) that whole 16-element steps cover: the packed
/// length of each token's activations (the rest is the scalar tail).
fn f16_whole_steps(row_bytes: usize) -> usize {
    row_bytes / 2 / 16 * 16
}

/// Tokens per pass of [`f16_gemm_512`] over a tile of `toks` tokens: passes whose packed
/// activations (streamed once per block of weight rows) stay within about 1 MiB, i.e. in L2, of
/// (nearly) equal size, since a short last pass would convert every weight for a few tokens.
fn f16_pass_len(row_bytes: usize, toks: usize) -> usize {
    let sub = ((GEMM_PA_BYTES / (2 * row_bytes)) / GEMM_RN * GEMM_RN).max(GEMM_RN);
    let passes = toks.div_ceil(sub).max(1);
    toks.div_ceil(passes).div_ceil(GEMM_RN) * GEMM_RN
}

/// Packs the activations of a tile of `toks` tokens for [`f16_gemm_passes`]: each pass's tokens
/// ([`f16_pass_len`]) as [`f16_pack_acts`] lays them out, at `pa[t0 * kf..]` for the pass from
/// token `t0`.
///
/// # Safety
/// As [`f16_pack_acts`] for all `toks` tokens.
unsafe fn f16_pack_tile(a: &[u8], stride: usize, toks: usize, row_bytes: usize, pa: &mut [f32]) {
    let kf = f16_whole_steps(row_bytes);
    let sub = f16_pass_len(row_bytes, toks);
    let mut t0 = 0;
    while t0 < toks {
        let tn = sub.min(toks - t0);
        // SAFETY: guaranteed by the caller, for tokens t0..t0+tn.
        unsafe { f16_pack_acts(&a[t0 * stride..], stride, tn, kf, &mut pa[t0 * kf..]) };
        t0 += tn;
    }
}

/// Runs [`f16_gemm_512`] in the passes of [`f16_pass_len`], over activations packed by
/// [`f16_pack_tile`] into `pa`.
///
/// # Safety
/// The lengths passed [`f16_gemm_fits`] for an `out` of which `out` points at element 0; `pa` holds
/// the packed activations of all `toks` tokens; the outputs of these rows and tokens are written
/// by nobody else during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn f16_gemm_passes(
    w: &[u8],
    row_bytes: usize,
    a: &[u8],
    stride: usize,
    toks: usize,
    pa: &[f32],
    out: *mut f32,
    ldo: usize,
) {
    let kf = f16_whole_steps(row_bytes);
    let sub = f16_pass_len(row_bytes, toks);
    let mut t0 = 0;
    while t0 < toks {
        let tn = sub.min(toks - t0);
        // SAFETY: the CPU has the features; tokens t0..t0+tn lie in `a`, their packed
        // activations in `pa` and their outputs at `out`, as the caller guarantees for all `toks`.
        unsafe {
            f16_gemm_512(
                w,
                row_bytes,
                &a[t0 * stride..],
                stride,
                tn,
                &pa[t0 * kf..],
                out.add(t0 * ldo),
                ldo,
            )
        };
        t0 += tn;
    }
}

thread_local! {
    /// Packed activations of the F16 gemm calls made from this thread (reused: a fresh
    /// allocation of this size would cost a page fault per 4 KiB on every call).
    static PACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's packed-activation buffer, at least `n` floats from a 64-byte
/// aligned start.
fn with_packed<R>(n: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut v = PACKED.with(|c| c.take());
    if v.len() < n + 16 {
        v.resize(n + 16, 0.0);
    }
    let r = f(&mut aligned64(&mut v)[..n]);
    PACKED.with(|c| c.replace(v));
    r
}

/// [`super::gemm_f16`] with AVX-512; `None` when the CPU lacks it or a length does not fit.
pub(super) fn f16_gemm(
    w: &[u8],
    row_bytes: usize,
    a: &[u8],
    stride: usize,
    toks: usize,
    out: &mut [f32],
    ldo: usize,
) -> Option<()> {
    f16_gemm_fits(w, row_bytes, a, stride, toks, out.len(), ldo)?;
    let kf = f16_whole_steps(row_bytes);
    with_packed(toks * kf, |pa| {
        // SAFETY: the lengths fit (so the CPU has AVX-512), `pa` holds `toks * kf` floats and
        // `out` is borrowed mutably for the call.
        unsafe {
            f16_pack_tile(a, stride, toks, row_bytes, pa);
            f16_gemm_passes(w, row_bytes, a, stride, toks, pa, out.as_mut_ptr(), ldo)
        }
    });
    Some(())
}

/// The output matrix shared by the tasks of [`f16_gemm_par`], each writing only its own rows of
/// its own tokens.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: the tasks write disjoint elements, and `f16_gemm_par` borrows `out` mutably until all of
// them have finished.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// Weight rows per task of [`f16_gemm_par`]: two blocks of [`GEMM_RB`], so that a task fetches its
/// second block while computing the first. Tasks this small (a tenth of a millisecond) keep every
/// thread busy until a product ends, however unevenly other load lets the threads run; chunks of
/// a few hundred rows left one thread idle for up to a task's time at the end of every product.
const GEMM_PAR_ROWS: usize = 2 * GEMM_RB;

/// [`super::gemm_f16_par`] with AVX-512: tiles of `tile` tokens times chunks of
/// [`GEMM_PAR_ROWS`] weight rows as parallel tasks, over activations packed once per call;
/// `None` when the CPU lacks it or a length does not fit.
#[allow(clippy::too_many_arguments)]
pub(super) fn f16_gemm_par(
    w: &[u8],
    row_bytes: usize,
    a: &[u8],
    stride: usize,
    toks: usize,
    out: &mut [f32],
    ldo: usize,
    tile: usize,
) -> Option<()> {
    use rayon::prelude::*;
    let rows = f16_gemm_fits(w, row_bytes, a, stride, toks, out.len(), ldo)?;
    let tile = tile.max(1);
    let tiles = toks.div_ceil(tile);
    let chunk = GEMM_PAR_ROWS;
    let chunks = rows.div_ceil(chunk);
    let kf = f16_whole_steps(row_bytes);
    let o = SharedOut(out.as_mut_ptr());
    with_packed(toks * kf, |pa| {
        // the activations are packed once, a tile per task, and shared by the tile's row chunks
        pa.par_chunks_mut((tile * kf).max(1))
            .enumerate()
            .for_each(|(ti, p)| {
                let t0 = ti * tile;
                // SAFETY: the lengths fit (so the CPU has AVX-512); tokens t0..t0+tn lie in `a`
                // and `p` holds their `tn * kf` floats.
                unsafe {
                    f16_pack_tile(&a[t0 * stride..], stride, tile.min(toks - t0), row_bytes, p)
                }
            });
        let pa: &[f32] = pa;
        (0..tiles * chunks).into_par_iter().for_each(|i| {
            let (t0, r0) = (i / chunks * tile, i % chunks * chunk);
            let (tn, rn) = (tile.min(toks - t0), chunk.min(rows - r0));
            // SAFETY: rows r0..r0+rn and tokens t0..t0+tn lie within what `f16_gemm_fits`
            // validated and the tile's packed activations at `pa[t0 * kf..]`; task i alone
            // writes outputs (t0.., r0..), and `out` stays borrowed until all tasks end.
            unsafe {
                f16_gemm_passes(
                    &w[r0 * row_bytes..(r0 + rn) * row_bytes],
                    row_bytes,
                    &a[t0 * stride..],
                    stride,
                    tn,
                    &pa[t0 * kf..],
                    o.ptr().add(t0 * ldo + r0),
                    ldo,
                )
            }
        });
    });
    Some(())
}

/// Whether this CPU runs the AVX-512 variants.
pub(super) fn avx512_available() -> bool {
    available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
}

/// A one-weight-row kernel: `(row, activations, stride, out)`.
type RowFn = unsafe fn(&[u8], &[u8], usize, &mut [f32]);
/// A tile kernel: `(rows, row_bytes, activations, stride, out)`.
type TileFn = unsafe fn(&[u8], usize, &[u8], usize, &mut [f32]);

/// Calls the one-row kernel `f` for every weight row.
///
/// # Safety
/// The CPU must run `f` and the lengths must have passed [`fits`].
unsafe fn per_row(f: RowFn, w: &[u8], row_bytes: usize, a: &[u8], stride: usize, out: &mut [f32]) {
    let rows = w.len() / row_bytes;
    let acts = out.len() / rows;
    for (wr, o) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(acts)) {
        // SAFETY: guaranteed by the caller.
        unsafe { f(wr, a, stride, o) }
    }
}

macro_rules! kernel {
    ($name:ident, $name512:ident, $wbs:expr, $abs:expr, $scalar:path, $t2:expr, $t512:expr) => {
        fn $name(w: &[u8], row_bytes: usize, a: &[u8], stride: usize, out: &mut [f32]) {
            if !available() || fits(w, row_bytes, $wbs, a, $abs, stride, out).is_none() {
                return scalar_many($scalar, w, row_bytes, a, stride, out);
            }
            let f: TileFn = $t2;
            // SAFETY: the CPU has AVX2/FMA/F16C and every length was validated by `fits`.
            unsafe { f(w, row_bytes, a, stride, out) }
        }
        fn $name512(w: &[u8], row_bytes: usize, a: &[u8], stride: usize, out: &mut [f32]) {
            if !avx512_available() || fits(w, row_bytes, $wbs, a, $abs, stride, out).is_none() {
                return $name(w, row_bytes, a, stride, out);
            }
            let f: TileFn = $t512;
            // SAFETY: the CPU has AVX-512 F/BW/VL, AVX2, FMA, F16C; lengths validated by `fits`.
            unsafe { f(w, row_bytes, a, stride, out) }
        }
    };
}

macro_rules! legacy {
    ($name:ident, $name512:ident, $ty:expr, $one:expr, $wbs:expr, $abs:expr, $scalar:path) => {
        kernel!(
            $name,
            $name512,
            $wbs,
            $abs,
            $scalar,
            |w, rb, a, s, o| unsafe { legacy_many::<$ty, $one>($wbs, w, rb, a, s, o) },
            |w, rb, a, s, o| unsafe {
                if vnni_available() {
                    legacy_many_vnni::<$ty, $one>($wbs, w, rb, a, s, o)
                } else {
                    legacy_many_512::<$ty, $one>($wbs, w, rb, a, s, o)
                }
            }
        );
    };
}

macro_rules! kquant {
    ($name:ident, $name512:ident, $tname:ident, $tname512:ident, $ty:expr, $wbs:expr, $scalar:path, $tscalar:path) => {
        kernel!(
            $name,
            $name512,
            $wbs,
            292,
            $scalar,
            |w, rb, a, s, o| unsafe {
                per_row(
                    |w, a, s, o| k_many::<$ty, false>($wbs, w, a, s, o),
                    w,
                    rb,
                    a,
                    s,
                    o,
                )
            },
            |w, rb, a, s, o| unsafe {
                if vnni_available() {
                    per_row(
                        |w, a, s, o| k_many_vnni::<$ty, false>($wbs, w, a, s, o),
                        w,
                        rb,
                        a,
                        s,
                        o,
                    )
                } else {
                    per_row(
                        |w, a, s, o| k_many::<$ty, false>($wbs, w, a, s, o),
                        w,
                        rb,
                        a,
                        s,
                        o,
                    )
                }
            }
        );
        kernel!(
            $tname,
            $tname512,
            $wbs,
            292,
            $tscalar,
            |w, rb, a, s, o| unsafe {
                per_row(
                    |w, a, s, o| k_many::<$ty, true>($wbs, w, a, s, o),
                    w,
                    rb,
                    a,
                    s,
                    o,
                )
            },
            |w, rb, a, s, o| unsafe {
                if vnni_available() {
                    per_row(
                        |w, a, s, o| k_many_vnni::<$ty, true>($wbs, w, a, s, o),
                        w,
                        rb,
                        a,
                        s,
                        o,
                    )
                } else {
                    per_row(
                        |w, a, s, o| k_many::<$ty, true>($wbs, w, a, s, o),
                        w,
                        rb,
                        a,
                        s,
                        o,
                    )
                }
            }
        );
    };
}

legacy!(q4_0, q4_0_512, 0, false, 18, 34, super::dot_q4_0_q8_0);
legacy!(q5_0, q5_0_512, 1, false, 22, 34, super::dot_q5_0_q8_0);
legacy!(q8_0, q8_0_512, 2, false, 34, 34, super::dot_q8_0_q8_0);
legacy!(q4_1, q4_1_512, 3, true, 20, 36, super::dot_q4_1_q8_1);
legacy!(q5_1, q5_1_512, 4, true, 24, 36, super::dot_q5_1_q8_1);
kquant!(
    q2_k,
    q2_k_512,
    q2_k_t,
    q2_k_t512,
    2,
    84,
    super::dot_q2_k_q8_k,
    super::dot_q2_k_q8_k_tiled
);
kquant!(
    q3_k,
    q3_k_512,
    q3_k_t,
    q3_k_t512,
    3,
    110,
    super::dot_q3_k_q8_k,
    super::dot_q3_k_q8_k_tiled
);
kquant!(
    q4_k,
    q4_k_512,
    q4_k_t,
    q4_k_t512,
    4,
    144,
    super::dot_q4_k_q8_k,
    super::dot_q4_k_q8_k_tiled
);
kquant!(
    q5_k,
    q5_k_512,
    q5_k_t,
    q5_k_t512,
    5,
    176,
    super::dot_q5_k_q8_k,
    super::dot_q5_k_q8_k_tiled
);
kquant!(
    q6_k,
    q6_k_512,
    q6_k_t,
    q6_k_t512,
    6,
    210,
    super::dot_q6_k_q8_k,
    super::dot_q6_k_q8_k_tiled
);
kernel!(
    f16,
    f16_512,
    2,
    4,
    super::dot_f16_f16,
    |w, rb, a, s, o| unsafe { per_row(|w, a, s, o| f16_many(w, a, s, o), w, rb, a, s, o) },
    |w, rb, a, s, o| unsafe { f16_many_512(w, rb, a, s, o) }
);

/// The many-row kernel for weights of type `ty` (AVX-512 variants when `wide`), if there is one.
pub(super) fn many_fn(ty: GgmlType, wide: bool, batch: bool) -> Option<DotManyFn> {
    macro_rules! pick {
        ($a:ident, $b:ident) => {
            if wide {
                $b
            } else {
                $a
            }
        };
    }
    Some(match ty {
        GgmlType::F16 => pick!(f16, f16_512),
        GgmlType::Q4_0 => pick!(q4_0, q4_0_512),
        GgmlType::Q5_0 => pick!(q5_0, q5_0_512),
        GgmlType::Q8_0 => pick!(q8_0, q8_0_512),
        GgmlType::Q4_1 => pick!(q4_1, q4_1_512),
        GgmlType::Q5_1 => pick!(q5_1, q5_1_512),
        GgmlType::Q2K if batch => pick!(q2_k_t, q2_k_t512),
        GgmlType::Q3K if batch => pick!(q3_k_t, q3_k_t512),
        GgmlType::Q4K if batch => pick!(q4_k_t, q4_k_t512),
        GgmlType::Q5K if batch => pick!(q5_k_t, q5_k_t512),
        GgmlType::Q6K if batch => pick!(q6_k_t, q6_k_t512),
        GgmlType::Q2K => pick!(q2_k, q2_k_512),
        GgmlType::Q3K => pick!(q3_k, q3_k_512),
        GgmlType::Q4K => pick!(q4_k, q4_k_512),
        GgmlType::Q5K => pick!(q5_k, q5_k_512),
        GgmlType::Q6K => pick!(q6_k, q6_k_512),
        _ => return None,
    })
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_head_tf(
    kv: super::attn::HeadView<'_>,
    q: &[f32],
    q_stride: usize,
    q_off: usize,
    t: usize,
    pos0: usize,
    scale: f32,
    out: &mut [f32],
) {
    super::attn::attend_head_impl(kv, q, q_stride, q_off, t, pos0, scale, out)
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn attend_head_tf512(
    kv: super::attn::HeadView<'_>,
    q: &[f32],
    q_stride: usize,
    q_off: usize,
    t: usize,
    pos0: usize,
    scale: f32,
    out: &mut [f32],
) {
    super::attn::attend_head_impl(kv, q, q_stride, q_off, t, pos0, scale, out)
}

/// [`super::attn::attend_head`] compiled for AVX2 + FMA, or AVX-512 where the CPU has it and
/// the ISA in use is AVX-512 (same operations, vectorized: lanes never mix, so the results are
/// the same bits).
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_head(
    kv: super::attn::HeadView<'_>,
    q: &[f32],
    q_stride: usize,
    q_off: usize,
    t: usize,
    pos0: usize,
    scale: f32,
    out: &mut [f32],
) {
    if !available() {
        return super::attn::attend_head_impl(kv, q, q_stride, q_off, t, pos0, scale, out);
    }
    if crate::Isa::current() == crate::Isa::Avx512 && avx512_available() {
        // SAFETY: the CPU has AVX-512 F/BW/VL, AVX2, FMA, F16C; the body is safe code.
        return unsafe { attend_head_tf512(kv, q, q_stride, q_off, t, pos0, scale, out) };
    }
    // SAFETY: the CPU has AVX2/FMA/F16C; the body is safe code.
    unsafe { attend_head_tf(kv, q, q_stride, q_off, t, pos0, scale, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rope_pairs_tf(x: &mut [f32], cs: &[f32]) {
    super::rope_pairs_impl(x, cs)
}

/// [`super::rope_pairs`] compiled with FMA (the fused multiply-adds become instructions instead
/// of calls to libm's `fmaf`; the same results).
pub(super) fn rope_pairs(x: &mut [f32], cs: &[f32]) {
    if !available() {
        return super::rope_pairs_impl(x, cs);
    }
    // SAFETY: the CPU has AVX2/FMA/F16C; the body is safe code.
    unsafe { rope_pairs_tf(x, cs) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn swiglu_tf(x: &[f32], g: &[f32], out: &mut [f32]) {
    super::swiglu_impl(x, g, out)
}

/// [`super::swiglu`] compiled for AVX2 + FMA (same operations).
pub(super) fn swiglu(x: &[f32], g: &[f32], out: &mut [f32]) {
    if !available() {
        return super::swiglu_impl(x, g, out);
    }
    // SAFETY: the CPU has AVX2/FMA/F16C; the body is safe code.
    unsafe { swiglu_tf(x, g, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_act_tf(f: super::ActFormat, x: &[f32], out: &mut [u8]) {
    super::quantize_act_impl(f, x, out)
}

/// [`super::ActFormat::F16`] activations: each value rounded to f16 (nearest, ties to even) and
/// widened back, eight at a time with F16C; the rest as [`super::quantize_act_impl`] does.
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
    super::quantize_act_impl(
        super::ActFormat::F16,
        &x[whole..n],
        &mut out[4 * whole..4 * n],
    );
}

/// [`super::quantize_act`] compiled for AVX2 (same operations, same bytes).
pub(super) fn quantize_act(f: super::ActFormat, x: &[f32], out: &mut [u8]) {
    if !available() {
        return super::quantize_act_impl(f, x, out);
    }
    if f == super::ActFormat::F16 {
        // SAFETY: the CPU has AVX2/FMA/F16C; lengths are checked inside.
        return unsafe { round_f16_tf(x, out) };
    }
    // SAFETY: the CPU has AVX2/FMA/F16C; the body is safe code.
    unsafe { quantize_act_tf(f, x, out) }
}
