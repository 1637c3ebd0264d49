//! AVX2 + F16C instantiation of the generic kernels (8 f32 lanes in a `__m256`).

use std::arch::x86_64::*;

use super::{lanes, Simd};
use crate::GgmlType;

/// Proof that this CPU has AVX2 and F16C: only [`Avx2::new`] makes one, after checking.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2(());

impl Avx2 {
    pub(crate) fn new() -> Option<Self> {
        (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")).then_some(Avx2(()))
    }

    /// Quantizes a validated row (`dst` exactly sized); false if `ty` has no kernel here or the
    /// row holds NaN/infinity (the caller then runs the reference).
    pub(crate) fn quantize(self, ty: GgmlType, src: &[f32], dst: &mut [u8]) -> bool {
        // SAFETY: `self` exists only if `Avx2::new` found AVX2 and F16C on this CPU.
        unsafe { quantize_avx2(self, ty, src, dst) }
    }

    /// Dequantizes a validated row; false if `ty` has no kernel here.
    pub(crate) fn dequantize(self, ty: GgmlType, src: &[u8], dst: &mut [f32]) -> bool {
        // SAFETY: `self` exists only if `Avx2::new` found AVX2 and F16C on this CPU.
        unsafe { dequantize_avx2(self, ty, src, dst) }
    }
}

#[target_feature(enable = "avx2,f16c")]
fn quantize_avx2(s: Avx2, ty: GgmlType, src: &[f32], dst: &mut [u8]) -> bool {
    if !super::all_finite(src) {
        return false;
    }
    lanes::quantize_k(s, ty, src, dst)
}

#[target_feature(enable = "avx2,f16c")]
fn dequantize_avx2(_s: Avx2, _ty: GgmlType, _src: &[u8], _dst: &mut [f32]) -> bool {
    false
}

/// Runs `$e` (AVX2 intrinsics on registers and on pointers into 16-element arrays).
macro_rules! v {
    ($e:expr) => {{
        // SAFETY: an `Avx2` token exists only after AVX2/F16C were detected (see `Avx2::new`), and
        // every pointer used comes from a `&[f32; 16]`/`&[i32; 16]` or a slice checked to hold 8.
        unsafe { $e }
    }};
}

impl Simd for Avx2 {
    const N: usize = 8;
    type F = __m256;
    type I = __m256i;
    type M = __m256;

    #[inline(always)]
    fn splat(self, v: f32) -> __m256 {
        v!(_mm256_set1_ps(v))
    }
    #[inline(always)]
    fn splat_i(self, v: i32) -> __m256i {
        v!(_mm256_set1_epi32(v))
    }
    #[inline(always)]
    fn load(self, a: &[f32; 16]) -> __m256 {
        v!(_mm256_loadu_ps(a.as_ptr()))
    }
    #[inline(always)]
    fn store(self, v: __m256, a: &mut [f32; 16]) {
        v!(_mm256_storeu_ps(a.as_mut_ptr(), v))
    }
    #[inline(always)]
    fn load_i(self, a: &[i32; 16]) -> __m256i {
        v!(_mm256_loadu_si256(a.as_ptr().cast()))
    }
    #[inline(always)]
    fn store_i(self, v: __m256i, a: &mut [i32; 16]) {
        v!(_mm256_storeu_si256(a.as_mut_ptr().cast(), v))
    }
    #[inline(always)]
    fn load_slice(self, a: &[f32]) -> __m256 {
        if a.len() < 8 {
            return self.splat(0.0);
        }
        v!(_mm256_loadu_ps(a.as_ptr()))
    }
    #[inline(always)]
    fn store_u8(self, v: __m256i, out: &mut [u8]) {
        if out.len() < 8 {
            return;
        }
        v!({
            let p16 = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
            _mm_storel_epi64(out.as_mut_ptr().cast(), _mm_packus_epi16(p16, p16))
        })
    }
    #[inline(always)]
    fn add(self, a: __m256, b: __m256) -> __m256 {
        v!(_mm256_add_ps(a, b))
    }
    #[inline(always)]
    fn sub(self, a: __m256, b: __m256) -> __m256 {
        v!(_mm256_sub_ps(a, b))
    }
    #[inline(always)]
    fn mul(self, a: __m256, b: __m256) -> __m256 {
        v!(_mm256_mul_ps(a, b))
    }
    #[inline(always)]
    fn div(self, a: __m256, b: __m256) -> __m256 {
        v!(_mm256_div_ps(a, b))
    }
    #[inline(always)]
    fn sqrt(self, a: __m256) -> __m256 {
        v!(_mm256_sqrt_ps(a))
    }
    #[inline(always)]
    fn abs(self, a: __m256) -> __m256 {
        v!(_mm256_andnot_ps(_mm256_set1_ps(-0.0), a))
    }
    #[inline(always)]
    fn neg(self, a: __m256) -> __m256 {
        v!(_mm256_xor_ps(_mm256_set1_ps(-0.0), a))
    }
    #[inline(always)]
    fn gt(self, a: __m256, b: __m256) -> __m256 {
        v!(_mm256_cmp_ps::<_CMP_GT_OQ>(a, b))
    }
    #[inline(always)]
    fn lt(self, a: __m256, b: __m256) -> __m256 {
        v!(_mm256_cmp_ps::<_CMP_LT_OQ>(a, b))
    }
    #[inline(always)]
    fn eq(self, a: __m256, b: __m256) -> __m256 {
        v!(_mm256_cmp_ps::<_CMP_EQ_OQ>(a, b))
    }
    #[inline(always)]
    fn ne(self, a: __m256, b: __m256) -> __m256 {
        v!(_mm256_cmp_ps::<_CMP_NEQ_UQ>(a, b))
    }
    #[inline(always)]
    fn and(self, a: __m256, b: __m256) -> __m256 {
        v!(_mm256_and_ps(a, b))
    }
    #[inline(always)]
    fn or(self, a: __m256, b: __m256) -> __m256 {
        v!(_mm256_or_ps(a, b))
    }
    #[inline(always)]
    fn any(self, m: __m256) -> bool {
        v!(_mm256_movemask_ps(m)) != 0
    }
    #[inline(always)]
    fn sel(self, m: __m256, a: __m256, b: __m256) -> __m256 {
        v!(_mm256_blendv_ps(b, a, m))
    }
    #[inline(always)]
    fn sel_i(self, m: __m256, a: __m256i, b: __m256i) -> __m256i {
        v!(_mm256_castps_si256(_mm256_blendv_ps(
            _mm256_castsi256_ps(b),
            _mm256_castsi256_ps(a),
            m
        )))
    }
    #[inline(always)]
    fn nearest_int(self, a: __m256) -> __m256i {
        v!({
            let val = _mm256_castps_si256(_mm256_add_ps(a, _mm256_set1_ps(12_582_912.0)));
            _mm256_sub_epi32(
                _mm256_and_si256(val, _mm256_set1_epi32(0x007F_FFFF)),
                _mm256_set1_epi32(0x0040_0000),
            )
        })
    }
    #[inline(always)]
    fn to_f(self, a: __m256i) -> __m256 {
        v!(_mm256_cvtepi32_ps(a))
    }
    #[inline(always)]
    fn min_i(self, a: __m256i, b: __m256i) -> __m256i {
        v!(_mm256_min_epi32(a, b))
    }
    #[inline(always)]
    fn max_i(self, a: __m256i, b: __m256i) -> __m256i {
        v!(_mm256_max_epi32(a, b))
    }
    #[inline(always)]
    fn add_i(self, a: __m256i, b: __m256i) -> __m256i {
        v!(_mm256_add_epi32(a, b))
    }
    #[inline(always)]
    fn ne_i(self, a: __m256i, b: __m256i) -> __m256 {
        v!(_mm256_castsi256_ps(_mm256_xor_si256(
            _mm256_cmpeq_epi32(a, b),
            _mm256_set1_epi32(-1)
        )))
    }
}
