//! AVX-512 (F/BW/VL, and VNNI where the CPU has it) builds of the dot kernels of
//! [`super::avx2`]: the same decoders and f32 operations with 32 vector registers (larger tiles),
//! `vpdpbusd`/`vpdpwssd` for the exact integer sums, the packed F16 matrix product over a prompt,
//! and the AVX-512 build of attention. Every result is bit-identical to the scalar reference.

use std::arch::x86_64::*;

use super::avx2::{self, bits16, h2f, ld, legacy_drive, nib, store8, RowPtr};
use super::flash::{self, HeadView, Queries};
use super::format::{ActRows, Q8_1_BYTES};
use super::scalar::{hsum8, lanes_sum, rd_f16, rd_f32};
use crate::blocks::BlockQ8_0;

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

/// `legacy_tile` of [`super::avx2`] with AVX-512 VNNI: one `vpdpbusd` per block and pair (started from
/// `-OFF * Σq`) yields the same eight exact i32 lanes as ggml's `maddubs` + `madd`; the scale
/// products `dx*dy` are formed four rows at a time. Same f32 operations, same results.
#[inline(always)]
unsafe fn legacy_tile_vnni<const TY: u8, const ONE: bool, const RM: usize, const RN: usize>(
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
    // SAFETY: the caller validated nb blocks of the RM weight rows and of the RN activation rows;
    // AVX-512 VNNI/VL enabled in the caller.
    unsafe {
        let zero = _mm256_setzero_si256();
        let mut acc = [[_mm256_setzero_ps(); RN]; RM];
        let mut summs = [[0f32; RN]; RM];
        let abs = if ONE { Q8_1_BYTES } else { BlockQ8_0::BYTES };
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
pub(super) unsafe fn legacy_many_vnni<const TY: u8, const ONE: bool>(
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
                        legacy_tile_vnni::<TY, ONE, $m, $n>(wbs, nb, wp, ap, o, acts)
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
pub(super) fn vnni_available() -> bool {
    available() && is_x86_feature_detected!("avx512vnni")
}

/// Legacy types with AVX-512VL's 32 vector registers: 4×4 tiles, the same AVX2 operations.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn legacy_many_512<const TY: u8, const ONE: bool>(
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

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn k_many_vnni<const TY: u8, const TILED: bool>(
    wbs: usize,
    w: &[u8],
    a: &[u8],
    stride: usize,
    out: &mut [f32],
) {
    // SAFETY: forwarded from the caller.
    unsafe { avx2::k_body::<TY, true, TILED>(wbs, w, a, stride, out) }
}

/// F16 weights against f16-valued f32 activations with AVX-512: one 16-lane register per dot
/// (llamafile's `tinyBLAS<16, __m512>`), 4×4 tiles.
#[inline(always)]
unsafe fn f16_tile_512<const RM: usize, const RN: usize>(
    n: usize,
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
pub(super) unsafe fn f16_many_512(
    w: &[u8],
    row_bytes: usize,
    a: &[u8],
    stride: usize,
    out: &mut [f32],
) {
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
                        f16_tile_512::<$m, $n>(n, wp, ap, o, acts)
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
/// the `toks = acts.n` activation rows of `row_bytes * 2` bytes lie `stride` apart in `a =
/// acts.bytes`, and `out` is valid for writes of `(toks - 1) * ldo + rows` floats (of which only
/// `out[j * ldo + r]`, `r < rows`, are written; nothing else may access those during the call)
/// with `ldo >= rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn f16_gemm_512(
    w: &[u8],
    row_bytes: usize,
    acts: ActRows<'_>,
    pa: &[f32],
    out: *mut f32,
    ldo: usize,
) {
    let ActRows {
        bytes: a,
        stride,
        n: toks,
    } = acts;
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
                    *t += rd_f16(wr, 2 * e) * rd_f32(arow, 4 * e);
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
    available()
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
unsafe fn f16_gemm_passes(
    w: &[u8],
    row_bytes: usize,
    acts: ActRows<'_>,
    pa: &[f32],
    out: *mut f32,
    ldo: usize,
) {
    let ActRows {
        bytes: a,
        stride,
        n: toks,
    } = acts;
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
                ActRows {
                    bytes: &a[t0 * stride..],
                    stride,
                    n: tn,
                },
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
            let acts = ActRows {
                bytes: a,
                stride,
                n: toks,
            };
            f16_gemm_passes(w, row_bytes, acts, pa, out.as_mut_ptr(), ldo)
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
pub(super) fn f16_gemm_par(
    w: &[u8],
    row_bytes: usize,
    acts: ActRows<'_>,
    out: &mut [f32],
    ldo: usize,
    tile: usize,
) -> Option<()> {
    use rayon::prelude::*;
    let ActRows {
        bytes: a,
        stride,
        n: toks,
    } = acts;
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
                    ActRows {
                        bytes: &a[t0 * stride..],
                        stride,
                        n: tn,
                    },
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
pub(super) fn available() -> bool {
    avx2::available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn attend_head_tf512(kv: HeadView<'_>, qs: Queries<'_>, scale: f32, out: &mut [f32]) {
    flash::attend_head_impl(kv, qs, scale, out)
}

/// [`super::attn::attend_head`] compiled for AVX-512 (same operations, the same bits); the AVX2
/// build when the CPU lacks it.
pub(super) fn attend_head(kv: HeadView<'_>, qs: Queries<'_>, scale: f32, out: &mut [f32]) {
    if !available() {
        return avx2::attend_head(kv, qs, scale, out);
    }
    // SAFETY: the CPU has AVX-512 F/BW/VL, AVX2, FMA, F16C; the body is safe code.
    unsafe { attend_head_tf512(kv, qs, scale, out) }
}
