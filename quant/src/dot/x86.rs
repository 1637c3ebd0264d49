//! The x86 tile-kernel table: for each weight type, the AVX2 entry point and the AVX-512 one
//! (each checks the CPU and every length, falling back to the narrower kernel or the scalar loop),
//! and [`many_fn`], which picks among them.

use super::format::{ActFormat, Q8_1_BYTES};
use super::scalar::{self, scalar_many, DotManyFn};
use super::{avx2, avx512};
use crate::blocks::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0,
};
use crate::GgmlType;

/// A one-weight-row kernel: `(row, activations, stride, out)`.
type RowFn = unsafe fn(&[u8], &[u8], usize, &mut [f32]);
/// A tile kernel: `(rows, row_bytes, activations, stride, out)`.
type TileFn = unsafe fn(&[u8], usize, &[u8], usize, &mut [f32]);

/// Calls the one-row kernel `f` for every weight row.
///
/// # Safety
/// The CPU must run `f` and the lengths must have passed [`avx2::fits`].
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
            if !avx2::available() || avx2::fits(w, row_bytes, $wbs, a, $abs, stride, out).is_none()
            {
                return scalar_many($scalar, w, row_bytes, a, stride, out);
            }
            let f: TileFn = $t2;
            // SAFETY: the CPU has AVX2/FMA/F16C and every length was validated by `fits`.
            unsafe { f(w, row_bytes, a, stride, out) }
        }
        fn $name512(w: &[u8], row_bytes: usize, a: &[u8], stride: usize, out: &mut [f32]) {
            if !avx512::available()
                || avx2::fits(w, row_bytes, $wbs, a, $abs, stride, out).is_none()
            {
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
            |w, rb, a, s, o| unsafe { avx2::legacy_many::<$ty, $one>($wbs, w, rb, a, s, o) },
            |w, rb, a, s, o| unsafe {
                if avx512::vnni_available() {
                    avx512::legacy_many_vnni::<$ty, $one>($wbs, w, rb, a, s, o)
                } else {
                    avx512::legacy_many_512::<$ty, $one>($wbs, w, rb, a, s, o)
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
            BlockQ8K::BYTES,
            $scalar,
            |w, rb, a, s, o| unsafe {
                per_row(
                    |w, a, s, o| avx2::k_many::<$ty, false>($wbs, w, a, s, o),
                    w,
                    rb,
                    a,
                    s,
                    o,
                )
            },
            |w, rb, a, s, o| unsafe {
                if avx512::vnni_available() {
                    per_row(
                        |w, a, s, o| avx512::k_many_vnni::<$ty, false>($wbs, w, a, s, o),
                        w,
                        rb,
                        a,
                        s,
                        o,
                    )
                } else {
                    per_row(
                        |w, a, s, o| avx2::k_many::<$ty, false>($wbs, w, a, s, o),
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
            BlockQ8K::BYTES,
            $tscalar,
            |w, rb, a, s, o| unsafe {
                per_row(
                    |w, a, s, o| avx2::k_many::<$ty, true>($wbs, w, a, s, o),
                    w,
                    rb,
                    a,
                    s,
                    o,
                )
            },
            |w, rb, a, s, o| unsafe {
                if avx512::vnni_available() {
                    per_row(
                        |w, a, s, o| avx512::k_many_vnni::<$ty, true>($wbs, w, a, s, o),
                        w,
                        rb,
                        a,
                        s,
                        o,
                    )
                } else {
                    per_row(
                        |w, a, s, o| avx2::k_many::<$ty, true>($wbs, w, a, s, o),
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

legacy!(
    q4_0,
    q4_0_512,
    0,
    false,
    BlockQ4_0::BYTES,
    BlockQ8_0::BYTES,
    scalar::dot_q4_0_q8_0
);
legacy!(
    q5_0,
    q5_0_512,
    1,
    false,
    BlockQ5_0::BYTES,
    BlockQ8_0::BYTES,
    scalar::dot_q5_0_q8_0
);
legacy!(
    q8_0,
    q8_0_512,
    2,
    false,
    BlockQ8_0::BYTES,
    BlockQ8_0::BYTES,
    scalar::dot_q8_0_q8_0
);
legacy!(
    q4_1,
    q4_1_512,
    3,
    true,
    BlockQ4_1::BYTES,
    Q8_1_BYTES,
    scalar::dot_q4_1_q8_1
);
legacy!(
    q5_1,
    q5_1_512,
    4,
    true,
    BlockQ5_1::BYTES,
    Q8_1_BYTES,
    scalar::dot_q5_1_q8_1
);
kquant!(
    q2_k,
    q2_k_512,
    q2_k_t,
    q2_k_t512,
    2,
    BlockQ2K::BYTES,
    scalar::dot_q2_k_q8_k,
    scalar::dot_q2_k_q8_k_tiled
);
kquant!(
    q3_k,
    q3_k_512,
    q3_k_t,
    q3_k_t512,
    3,
    BlockQ3K::BYTES,
    scalar::dot_q3_k_q8_k,
    scalar::dot_q3_k_q8_k_tiled
);
kquant!(
    q4_k,
    q4_k_512,
    q4_k_t,
    q4_k_t512,
    4,
    BlockQ4K::BYTES,
    scalar::dot_q4_k_q8_k,
    scalar::dot_q4_k_q8_k_tiled
);
kquant!(
    q5_k,
    q5_k_512,
    q5_k_t,
    q5_k_t512,
    5,
    BlockQ5K::BYTES,
    scalar::dot_q5_k_q8_k,
    scalar::dot_q5_k_q8_k_tiled
);
kquant!(
    q6_k,
    q6_k_512,
    q6_k_t,
    q6_k_t512,
    6,
    BlockQ6K::BYTES,
    scalar::dot_q6_k_q8_k,
    scalar::dot_q6_k_q8_k_tiled
);
kernel!(
    f16,
    f16_512,
    GgmlType::F16.type_size(),
    ActFormat::F16.block_bytes(),
    scalar::dot_f16_f16,
    |w, rb, a, s, o| unsafe { per_row(|w, a, s, o| avx2::f16_many(w, a, s, o), w, rb, a, s, o) },
    |w, rb, a, s, o| unsafe { avx512::f16_many_512(w, rb, a, s, o) }
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
