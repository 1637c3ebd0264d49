//! AVX2 and AVX-512 low-rank update kernels: `R` rows by a strip of columns held in registers.

use std::arch::x86_64::*;

use super::LowRankShape;
use crate::Isa;

/// Runs the kernel of `isa` (AVX2 or AVX-512, which the caller checked is available) over the
/// columns that fill whole strips and returns how many columns it did (`cols - cols % strip`).
pub(super) fn add_lowrank(
    isa: Isa,
    shape: LowRankShape,
    w: &mut [f32],
    coef: &[f32],
    basis: &[f32],
    scale: f32,
    fused: bool,
) -> usize {
    match isa {
        // SAFETY: the caller checked `isa.is_available()` (AVX-512F / AVX2+FMA present), and
        // `shape` matches the slice lengths (checked by `LowRankShape::fits`).
        Isa::Avx512 => unsafe { avx512(shape, w, coef, basis, scale, fused) },
        // SAFETY: as above, and FMA was detected just now.
        Isa::Avx2 if is_x86_feature_detected!("fma") => unsafe {
            avx2(shape, w, coef, basis, scale, fused)
        },
        _ => 0,
    }
}

macro_rules! kernel {
    ($name:ident, $strip_fn:ident, $feat:literal, $vec:ty, $lanes:expr, $nv:expr,
     $load:ident, $store:ident, $set1:ident, $zero:ident, $add:ident, $mul:ident, $fmadd:ident) => {
        /// One block of `R` rows × `NV` vectors of columns starting at column `j`.
        ///
        /// # Safety
        /// The target features are present; rows `i0..i0+R` and columns `j..j+NV*LANES` are in
        /// bounds of `w` (`rows × cols`), `coef` (`rows × r`) and `basis` (`r × cols`).
        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $strip_fn<const R: usize>(
            w: *mut f32,
            coef: *const f32,
            basis: *const f32,
            cols: usize,
            r: usize,
            i0: usize,
            j: usize,
            scale: f32,
            fused: bool,
        ) {
            // SAFETY: (whole body) every pointer offset stays inside the bounds stated above.
            unsafe {
                let mut acc = [[$zero(); $nv]; R];
                for k in 0..r {
                    let bp = basis.add(k * cols + j);
                    let mut b = [$zero(); $nv];
                    for (v, bv) in b.iter_mut().enumerate() {
                        *bv = $load(bp.add(v * $lanes));
                    }
                    for (ri, a) in acc.iter_mut().enumerate() {
                        let c = $set1(*coef.add((i0 + ri) * r + k));
                        for v in 0..$nv {
                            a[v] = if fused {
                                $fmadd(c, b[v], a[v])
                            } else {
                                $add(a[v], $mul(c, b[v]))
                            };
                        }
                    }
                }
                let s = $set1(scale);
                for (ri, a) in acc.iter().enumerate() {
                    let wp = w.add((i0 + ri) * cols + j);
                    for (v, av) in a.iter().enumerate() {
                        let p = wp.add(v * $lanes);
                        $store(p, $add($load(p), $mul(s, *av)));
                    }
                }
            }
        }

        #[target_feature(enable = $feat)]
        unsafe fn $name(
            shape: LowRankShape,
            w: &mut [f32],
            coef: &[f32],
            basis: &[f32],
            scale: f32,
            fused: bool,
        ) -> usize {
            const STRIP: usize = $lanes * $nv;
            // Columns per panel: every row block runs over one panel of `basis` (r × PANEL,
            // 64 KB at r = 64 with AVX-512) while it sits in L2, instead of streaming the whole
            // basis (2.8 MB for down_proj, past L2) once per block of four rows: 23 -> ~45
            // GFLOP/s per core on [64, 11008] with r = 64.
            const PANEL: usize = 8 * STRIP;
            let LowRankShape { rows, cols, r } = shape;
            let done = cols - cols % STRIP;
            let (wp, cp, bp) = (w.as_mut_ptr(), coef.as_ptr(), basis.as_ptr());
            let mut j0 = 0;
            while j0 < done {
                let j1 = (j0 + PANEL).min(done);
                let mut i = 0;
                while i + 4 <= rows {
                    let mut j = j0;
                    while j < j1 {
                        // SAFETY: rows i..i+4 < rows, columns j..j+STRIP <= j1 <= done <= cols.
                        unsafe { $strip_fn::<4>(wp, cp, bp, cols, r, i, j, scale, fused) };
                        j += STRIP;
                    }
                    i += 4;
                }
                while i < rows {
                    let mut j = j0;
                    while j < j1 {
                        // SAFETY: row i < rows, columns j..j+STRIP <= j1 <= done <= cols.
                        unsafe { $strip_fn::<1>(wp, cp, bp, cols, r, i, j, scale, fused) };
                        j += STRIP;
                    }
                    i += 1;
                }
                j0 = j1;
            }
            done
        }
    };
}

kernel!(
    avx512,
    strip512,
    "avx512f",
    __m512,
    16,
    2,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_set1_ps,
    _mm512_setzero_ps,
    _mm512_add_ps,
    _mm512_mul_ps,
    _mm512_fmadd_ps
);

kernel!(
    avx2,
    strip256,
    "avx2,fma",
    __m256,
    8,
    2,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_setzero_ps,
    _mm256_add_ps,
    _mm256_mul_ps,
    _mm256_fmadd_ps
);
