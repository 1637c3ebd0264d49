//! AVX-512 (F, BW, VL) + F16C instantiation of the generic kernels (16 f32 lanes in a `__m512`,
//! masks in `__mmask16`).
//!
//! The AVX-512 intrinsics are stable since Rust 1.89, above the workspace's declared MSRV; building
//! kiln-quant therefore needs Rust >= 1.89 until the workspace `rust-version` is raised.

use std::arch::x86_64::*;

use super::{lanes, Simd};
use crate::types::GgmlType;

/// Proof that this CPU has AVX-512 F/BW/VL, AVX2 and F16C: only [`Avx512::new`] makes one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512(());

impl Avx512 {
    pub(crate) fn new() -> Option<Self> {
        (is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("f16c"))
        .then_some(Avx512(()))
    }

    /// Quantizes a validated row (`dst` exactly sized) of a K-quant type; false for other types
    /// or if the row holds NaN/infinity (the caller then runs another kernel or the reference).
    pub(crate) fn quantize(self, ty: GgmlType, src: &[f32], dst: &mut [u8]) -> bool {
        // SAFETY: `self` exists only if `Avx512::new` found every enabled feature on this CPU.
        unsafe { quantize_avx512(self, ty, src, dst) }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
fn quantize_avx512(s: Avx512, ty: GgmlType, src: &[f32], dst: &mut [u8]) -> bool {
    let k = [
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];
    if !k.contains(&ty) || !super::all_finite(src) {
        return false;
    }
    lanes::quantize_k(s, ty, src, dst)
}

/// Runs `$e` (AVX-512 intrinsics on registers and on pointers into 16-element arrays).
macro_rules! v {
    ($e:expr) => {{
        // SAFETY: an `Avx512` token exists only after AVX-512 F/BW/VL were detected (see
        // `Avx512::new`), and every pointer used comes from a `&[f32; 16]`/`&[i32; 16]` or a
        // slice checked to hold 16 elements.
        unsafe { $e }
    }};
}

impl Simd for Avx512 {
    const N: usize = 16;
    type F = __m512;
    type I = __m512i;
    type M = __mmask16;

    #[inline(always)]
    fn splat(self, v: f32) -> __m512 {
        v!(_mm512_set1_ps(v))
    }
    #[inline(always)]
    fn splat_i(self, v: i32) -> __m512i {
        v!(_mm512_set1_epi32(v))
    }
    #[inline(always)]
    fn load(self, a: &[f32; 16]) -> __m512 {
        v!(_mm512_loadu_ps(a.as_ptr()))
    }
    #[inline(always)]
    fn store(self, v: __m512, a: &mut [f32; 16]) {
        v!(_mm512_storeu_ps(a.as_mut_ptr(), v))
    }
    #[inline(always)]
    fn load_i(self, a: &[i32; 16]) -> __m512i {
        v!(_mm512_loadu_si512(a.as_ptr().cast()))
    }
    #[inline(always)]
    fn store_i(self, v: __m512i, a: &mut [i32; 16]) {
        v!(_mm512_storeu_si512(a.as_mut_ptr().cast(), v))
    }
    #[inline(always)]
    fn load_slice(self, a: &[f32]) -> __m512 {
        if a.len() < 16 {
            return self.splat(0.0);
        }
        v!(_mm512_loadu_ps(a.as_ptr()))
    }
    #[inline(always)]
    fn store_u8(self, v: __m512i, out: &mut [u8]) {
        if out.len() < 16 {
            return;
        }
        v!(_mm_storeu_si128(
            out.as_mut_ptr().cast(),
            _mm512_cvtepi32_epi8(v)
        ))
    }
    #[inline(always)]
    fn add(self, a: __m512, b: __m512) -> __m512 {
        v!(_mm512_add_ps(a, b))
    }
    #[inline(always)]
    fn sub(self, a: __m512, b: __m512) -> __m512 {
        v!(_mm512_sub_ps(a, b))
    }
    #[inline(always)]
    fn mul(self, a: __m512, b: __m512) -> __m512 {
        v!(_mm512_mul_ps(a, b))
    }
    #[inline(always)]
    fn div(self, a: __m512, b: __m512) -> __m512 {
        v!(_mm512_div_ps(a, b))
    }
    #[inline(always)]
    fn sqrt(self, a: __m512) -> __m512 {
        v!(_mm512_sqrt_ps(a))
    }
    #[inline(always)]
    fn abs(self, a: __m512) -> __m512 {
        v!(_mm512_castsi512_ps(_mm512_and_si512(
            _mm512_castps_si512(a),
            _mm512_set1_epi32(0x7FFF_FFFF)
        )))
    }
    #[inline(always)]
    fn neg(self, a: __m512) -> __m512 {
        v!(_mm512_castsi512_ps(_mm512_xor_si512(
            _mm512_castps_si512(a),
            _mm512_set1_epi32(i32::MIN)
        )))
    }
    #[inline(always)]
    fn gt(self, a: __m512, b: __m512) -> __mmask16 {
        v!(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, b))
    }
    #[inline(always)]
    fn lt(self, a: __m512, b: __m512) -> __mmask16 {
        v!(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, b))
    }
    #[inline(always)]
    fn eq(self, a: __m512, b: __m512) -> __mmask16 {
        v!(_mm512_cmp_ps_mask::<_CMP_EQ_OQ>(a, b))
    }
    #[inline(always)]
    fn ne(self, a: __m512, b: __m512) -> __mmask16 {
        v!(_mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(a, b))
    }
    #[inline(always)]
    fn and(self, a: __mmask16, b: __mmask16) -> __mmask16 {
        a & b
    }
    #[inline(always)]
    fn or(self, a: __mmask16, b: __mmask16) -> __mmask16 {
        a | b
    }
    #[inline(always)]
    fn any(self, m: __mmask16) -> bool {
        m != 0
    }
    #[inline(always)]
    fn sel(self, m: __mmask16, a: __m512, b: __m512) -> __m512 {
        v!(_mm512_mask_blend_ps(m, b, a))
    }
    #[inline(always)]
    fn sel_i(self, m: __mmask16, a: __m512i, b: __m512i) -> __m512i {
        v!(_mm512_mask_blend_epi32(m, b, a))
    }
    #[inline(always)]
    fn nearest_int(self, a: __m512) -> __m512i {
        v!({
            let val = _mm512_castps_si512(_mm512_add_ps(a, _mm512_set1_ps(12_582_912.0)));
            _mm512_sub_epi32(
                _mm512_and_si512(val, _mm512_set1_epi32(0x007F_FFFF)),
                _mm512_set1_epi32(0x0040_0000),
            )
        })
    }
    #[inline(always)]
    fn to_f(self, a: __m512i) -> __m512 {
        v!(_mm512_cvtepi32_ps(a))
    }
    #[inline(always)]
    fn min_i(self, a: __m512i, b: __m512i) -> __m512i {
        v!(_mm512_min_epi32(a, b))
    }
    #[inline(always)]
    fn max_i(self, a: __m512i, b: __m512i) -> __m512i {
        v!(_mm512_max_epi32(a, b))
    }
    #[inline(always)]
    fn add_i(self, a: __m512i, b: __m512i) -> __m512i {
        v!(_mm512_add_epi32(a, b))
    }
    #[inline(always)]
    fn ne_i(self, a: __m512i, b: __m512i) -> __mmask16 {
        v!(_mm512_cmpneq_epi32_mask(a, b))
    }
}
