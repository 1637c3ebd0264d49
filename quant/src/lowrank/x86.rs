//! AVX2 and AVX-512 low-rank update kernels: up to six rows by a strip of columns held in
//! registers, on f32 rows or on f16 rows (widened and rounded back in the kernel).

use std::arch::x86_64::*;

use super::{Factors, LowRankShape};
use crate::Isa;

/// Where a tile's results go: f32 rows updated in place, or f16 rows read from `src` and written
/// (rounded to nearest even) to `dst`, which may be the same memory as `src`.
#[derive(Clone, Copy)]
pub(super) enum Rows {
    F32(*mut f32),
    F16 { src: *const u16, dst: *mut u16 },
}

/// Runs the kernel of `isa` (AVX2 or AVX-512, which the caller checked is available) over the
/// columns that fill whole vectors and returns how many columns it did (`cols - cols % lanes`),
/// or 0 when this CPU lacks a feature the kernel needs (FMA, F16C).
///
/// # Safety
/// `rows` points at `shape.rows × shape.cols` elements (readable, and writable at the
/// destination), `f.coef` holds `rows × r` and `f.basis` `r × cols` values.
pub(super) unsafe fn add_lowrank(
    isa: Isa,
    shape: LowRankShape,
    rows: Rows,
    f: Factors<'_>,
) -> usize {
    let Factors {
        coef,
        basis,
        scale,
        fused,
    } = f;
    let (cp, bp) = (coef.as_ptr(), basis.as_ptr());
    match (isa, fused) {
        // SAFETY: the caller checked `isa.is_available()` (AVX-512F/BW/VL, AVX2 and F16C, see
        // `Avx512::new`) and the bounds stated above.
        (Isa::Avx512, true) => unsafe { avx512::<true>(shape, rows, cp, bp, scale) },
        // SAFETY: as above.
        (Isa::Avx512, false) => unsafe { avx512::<false>(shape, rows, cp, bp, scale) },
        (Isa::Avx2, _)
            if !(is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")) =>
        {
            0
        }
        // SAFETY: AVX2 checked by the caller, FMA and F16C just now; bounds as above.
        (Isa::Avx2, true) => unsafe { avx2::<true>(shape, rows, cp, bp, scale) },
        // SAFETY: as above.
        (Isa::Avx2, false) => unsafe { avx2::<false>(shape, rows, cp, bp, scale) },
        _ => 0,
    }
}

/// What every tile of one kernel call shares: the rows updated (`rows × cols`), the coefficients
/// (`coef`, `rows × r`) and the scale.
#[derive(Clone, Copy)]
struct Update {
    rows: Rows,
    coef: *const f32,
    cols: usize,
    r: usize,
    scale: f32,
}

/// The widest row block of a tile.
const MAX_R: usize = 6;

/// Dispatches `n` rows (1..=MAX_R) to the const-generic tile.
macro_rules! tile_rows {
    ($f:ident, $n:expr, $nv:expr, $fused:ident, $($arg:expr),*) => {
        match $n {
            1 => $f::<1, { $nv }, $fused>($($arg),*),
            2 => $f::<2, { $nv }, $fused>($($arg),*),
            3 => $f::<3, { $nv }, $fused>($($arg),*),
            4 => $f::<4, { $nv }, $fused>($($arg),*),
            5 => $f::<5, { $nv }, $fused>($($arg),*),
            _ => $f::<MAX_R, { $nv }, $fused>($($arg),*),
        }
    };
}

macro_rules! kernel {
    ($name:ident, $strip_fn:ident, $feat:literal, $vec:ty, $lanes:expr, $nv:expr,
     $load:ident, $store:ident, $set1:ident, $zero:ident, $add:ident, $mul:ident, $fmadd:ident,
     $hload:expr, $hstore:expr) => {
        /// One tile of `R` rows × `NV` vectors of columns starting at row `i0`, column `j` of
        /// `u.rows`, and at column `jb` of `basis` (`r` rows of `bstride` values). Each element's
        /// sum runs over k ascending, exactly as the reference does.
        ///
        /// # Safety
        /// The target features are present; rows `i0..i0+R` and columns `j..j+NV*LANES` are in
        /// bounds of `u.rows` (`rows × cols`), `u.coef` (`rows × r`), and columns
        /// `jb..jb+NV*LANES` of `basis` (`r × bstride`).
        #[inline(always)]
        unsafe fn $strip_fn<const R: usize, const NV: usize, const FUSED: bool>(
            u: Update,
            basis: *const f32,
            bstride: usize,
            i0: usize,
            j: usize,
            jb: usize,
        ) {
            let Update {
                rows,
                coef,
                cols,
                r,
                scale,
            } = u;
            // SAFETY: (whole body) every pointer offset stays inside the bounds stated above.
            unsafe {
                // the f16 source of the next strip, which arrives from memory (an mmapped input)
                // while this tile computes; prefetching never faults, wrapping_add never
                // dereferences
                if let Rows::F16 { src, .. } = rows {
                    for ri in 0..R {
                        let p = src
                            .wrapping_add((i0 + ri) * cols + j + NV * $lanes)
                            .cast::<i8>();
                        _mm_prefetch::<_MM_HINT_T0>(p);
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64));
                    }
                }
                let mut acc = [[$zero(); NV]; R];
                let cbase = coef.add(i0 * r);
                for k in 0..r {
                    let bp = basis.add(k * bstride + jb);
                    let mut b = [$zero(); NV];
                    for (v, bv) in b.iter_mut().enumerate() {
                        *bv = $load(bp.add(v * $lanes));
                    }
                    for (ri, a) in acc.iter_mut().enumerate() {
                        let c = $set1(*cbase.add(ri * r + k));
                        for v in 0..NV {
                            a[v] = if FUSED {
                                $fmadd(c, b[v], a[v])
                            } else {
                                $add(a[v], $mul(c, b[v]))
                            };
                        }
                    }
                }
                let s = $set1(scale);
                for (ri, a) in acc.iter().enumerate() {
                    let off = (i0 + ri) * cols + j;
                    for (v, av) in a.iter().enumerate() {
                        let o = off + v * $lanes;
                        match rows {
                            Rows::F32(w) => {
                                let p = w.add(o);
                                $store(p, $add($load(p), $mul(s, *av)));
                            }
                            Rows::F16 { src, dst } => {
                                let x = $hload(src.add(o));
                                $hstore(dst.add(o), $add(x, $mul(s, *av)));
                            }
                        }
                    }
                }
            }
        }

        /// Every whole vector of columns of every row: strips of `$nv` vectors, then single
        /// vectors; row blocks of `MAX_R` and one shorter block. Returns the columns done.
        ///
        /// # Safety
        /// The target features are present; bounds as for [`add_lowrank`].
        #[target_feature(enable = $feat)]
        unsafe fn $name<const FUSED: bool>(
            shape: LowRankShape,
            rows: Rows,
            coef: *const f32,
            basis: *const f32,
            scale: f32,
        ) -> usize {
            let LowRankShape { rows: n, cols, r } = shape;
            if r == 0 {
                return 0;
            }
            let u = Update {
                rows,
                coef,
                cols,
                r,
                scale,
            };
            // One strip's basis (r × $nv vectors: 16 KB at r = 64 with AVX-512) stays in L1 while
            // every row block of the call passes over it.
            let wide_end = cols - cols % ($nv * $lanes);
            let done = cols - cols % $lanes;
            // The strip's basis is copied into a contiguous panel first: its rows lie `cols`
            // floats apart (16 KB at 4096 columns), which maps them all to the same few L1 sets.
            const WIDE: usize = $nv * $lanes;
            let mut panel = vec![0f32; if wide_end > 0 { r * WIDE } else { 0 }];
            let pp = panel.as_mut_ptr();
            let mut j = 0;
            while j < wide_end {
                for k in 0..r {
                    // SAFETY: basis row k, columns j..j+WIDE <= cols; panel row k of r.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            basis.add(k * cols + j),
                            pp.add(k * WIDE),
                            WIDE,
                        )
                    };
                }
                // Tiles see the panel as a basis of WIDE columns, their output at column j of
                // `rows`: shift the output pointers by j and give the row stride separately.
                let mut i = 0;
                while i < n {
                    let m = (n - i).min(MAX_R);
                    // SAFETY: rows i..i+m <= n, columns j..j+WIDE <= wide_end <= cols; the panel
                    // holds r × WIDE values.
                    unsafe {
                        tile_rows!(
                            $strip_fn,
                            m,
                            { $nv },
                            FUSED,
                            u,
                            pp.cast_const(),
                            WIDE,
                            i,
                            j,
                            0
                        )
                    };
                    i += m;
                }
                j += WIDE;
            }
            while j < done {
                let mut i = 0;
                while i < n {
                    let m = (n - i).min(MAX_R);
                    // SAFETY: rows i..i+m <= n, columns j..j+$lanes <= done <= cols.
                    unsafe { tile_rows!($strip_fn, m, 1, FUSED, u, basis, cols, i, j, j) };
                    i += m;
                }
                j += $lanes;
            }
            done
        }
    };
}

/// 16 f16 values at `p`, widened.
///
/// # Safety
/// AVX-512F is present and `p..p+16` is readable.
#[inline(always)]
unsafe fn hload512(p: *const u16) -> __m512 {
    // SAFETY: as stated above.
    unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
}

/// `v` rounded to f16 (nearest even) into `p..p+16`.
///
/// # Safety
/// AVX-512F is present and `p..p+16` is writable.
#[inline(always)]
unsafe fn hstore512(p: *mut u16, v: __m512) {
    // SAFETY: as stated above.
    unsafe {
        _mm256_storeu_si256(
            p.cast(),
            _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v),
        )
    }
}

/// 8 f16 values at `p`, widened.
///
/// # Safety
/// F16C is present and `p..p+8` is readable.
#[inline(always)]
unsafe fn hload256(p: *const u16) -> __m256 {
    // SAFETY: as stated above.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
}

/// `v` rounded to f16 (nearest even) into `p..p+8`.
///
/// # Safety
/// F16C is present and `p..p+8` is writable.
#[inline(always)]
unsafe fn hstore256(p: *mut u16, v: __m256) {
    // SAFETY: as stated above.
    unsafe { _mm_storeu_si128(p.cast(), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)) }
}

// AVX-512: tiles of 6 rows × 4 vectors (24 accumulators, 4 basis loads and 6 broadcasts per
// 24 FMAs) over strips of 64 columns.
kernel!(
    avx512,
    strip512,
    "avx512f",
    __m512,
    16,
    4,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_set1_ps,
    _mm512_setzero_ps,
    _mm512_add_ps,
    _mm512_mul_ps,
    _mm512_fmadd_ps,
    hload512,
    hstore512
);

// AVX2: 6 rows × 2 vectors (12 accumulators of the 16 registers) over strips of 16 columns.
kernel!(
    avx2,
    strip256,
    "avx2,fma,f16c",
    __m256,
    8,
    2,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_setzero_ps,
    _mm256_add_ps,
    _mm256_mul_ps,
    _mm256_fmadd_ps,
    hload256,
    hstore256
);
