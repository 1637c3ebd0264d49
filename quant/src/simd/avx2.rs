//! AVX2 + F16C instantiation of the generic kernels (8 f32 lanes in a `__m256`).

use std::arch::x86_64::*;

use super::{lanes, Simd};
use crate::types::GgmlType;

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
    match ty {
        GgmlType::F16 => {
            to_f16_row(src, dst);
            return true;
        }
        GgmlType::BF16 => {
            to_bf16_row(src, dst);
            return true;
        }
        _ => {}
    }
    if !super::all_finite(src) {
        return false;
    }
    match ty {
        GgmlType::Q4_0 => blocks(src, dst, 18, |x, o| q4_0(x, o)),
        GgmlType::Q4_1 => blocks(src, dst, 20, |x, o| q4_1(x, o)),
        GgmlType::Q5_0 => blocks(src, dst, 22, |x, o| q5_0(x, o)),
        GgmlType::Q5_1 => blocks(src, dst, 24, |x, o| q5_1(x, o)),
        GgmlType::Q8_0 => blocks(src, dst, 34, |x, o| q8_0(x, o)),
        _ => return lanes::quantize_k(s, ty, src, dst),
    }
    true
}

#[target_feature(enable = "avx2,f16c")]
fn dequantize_avx2(_s: Avx2, ty: GgmlType, src: &[u8], dst: &mut [f32]) -> bool {
    if ty == GgmlType::F16 {
        from_f16_row(src, dst);
        return true;
    }
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

// ---------------------------------------------------------------------------------------------
// Legacy 32-element blocks and F16/BF16: one block at a time, vectorized along its elements.
// Only order-free operations are vectorized (max/min reductions of finite values, element-wise
// quantization); sign-of-zero cases of Q4_1/Q5_1 fall back to the reference block.

use crate::blocks::QK;
use crate::reference::float::{f32_to_bf16_bits, f32_to_f16_bits};
use crate::reference::legacy;

/// The 32 values of a block as four vectors.
#[inline(always)]
fn load32(x: &[f32; QK]) -> [__m256; 4] {
    // SAFETY: `x` has 32 elements, so offsets 0, 8, 16 and 24 each have 8 readable floats, and
    // AVX2 is enabled in every caller (all are `#[target_feature(enable = "avx2,f16c")]`).
    unsafe {
        let p = x.as_ptr();
        [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ]
    }
}

#[target_feature(enable = "avx2,f16c")]
fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
    _mm_cvtss_f32(m)
}

#[target_feature(enable = "avx2,f16c")]
fn hmin(v: __m256) -> f32 {
    let m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_min_ss(m, _mm_shuffle_ps::<1>(m, m));
    _mm_cvtss_f32(m)
}

/// Bit mask of the lanes (32 elements) where `a == b`.
#[target_feature(enable = "avx2,f16c")]
fn eq_mask(a: &[__m256; 4], b: __m256) -> u32 {
    let mut m = 0u32;
    for (k, v) in a.iter().enumerate() {
        m |= (_mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(*v, b)) as u32) << (8 * k);
    }
    m
}

/// The reference's signed absmax of a finite block: the first element of maximal |x|, or +0.
#[target_feature(enable = "avx2,f16c")]
fn signed_absmax(x: &[f32; QK], v: &[__m256; 4]) -> f32 {
    let sign = _mm256_set1_ps(-0.0);
    let a = v.map(|e| _mm256_andnot_ps(sign, e));
    let amax = hmax(_mm256_max_ps(
        _mm256_max_ps(a[0], a[1]),
        _mm256_max_ps(a[2], a[3]),
    ));
    if amax == 0.0 {
        return 0.0;
    }
    let m = eq_mask(&a, _mm256_set1_ps(amax));
    x.get(m.trailing_zeros() as usize).copied().unwrap_or(0.0)
}

/// `(min, max)` of a finite block, or `None` when either is zero (whose sign depends on the
/// element order; the caller then runs the reference).
#[target_feature(enable = "avx2,f16c")]
fn min_max(v: &[__m256; 4]) -> Option<(f32, f32)> {
    let min = hmin(_mm256_min_ps(
        _mm256_min_ps(v[0], v[1]),
        _mm256_min_ps(v[2], v[3]),
    ));
    let max = hmax(_mm256_max_ps(
        _mm256_max_ps(v[0], v[1]),
        _mm256_max_ps(v[2], v[3]),
    ));
    (min != 0.0 && max != 0.0).then_some((min, max))
}

/// `c_trunc_i32(x * id + add)` (or `c_trunc_i32((x - min) * id + add)`) per element; then, if
/// `cap` is given, C's `MIN(cap, (int8_t)q)`. Lanes hold the value whose low byte is stored.
#[target_feature(enable = "avx2,f16c")]
fn quant32(v: &[__m256; 4], min: Option<f32>, id: f32, add: f32, cap: Option<i32>) -> [__m256i; 4] {
    let idv = _mm256_set1_ps(id);
    let addv = _mm256_set1_ps(add);
    v.map(|e| {
        let e = match min {
            Some(m) => _mm256_sub_ps(e, _mm256_set1_ps(m)),
            None => e,
        };
        let q = _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(e, idv), addv));
        match cap {
            Some(c) => {
                let q8 = _mm256_srai_epi32::<24>(_mm256_slli_epi32::<24>(q));
                _mm256_min_epi32(q8, _mm256_set1_epi32(c))
            }
            None => q,
        }
    })
}

/// 16 bytes `lo[j] | (hi[j] << 4)` (u8 arithmetic) from the low bytes of elements j and j+16.
#[target_feature(enable = "avx2,f16c")]
fn nibbles(q: &[__m256i; 4], mask: i32) -> [u8; 16] {
    let m = _mm256_set1_epi32(mask);
    let ff = _mm256_set1_epi32(0xFF);
    let r0 = _mm256_and_si256(
        _mm256_or_si256(
            _mm256_and_si256(q[0], m),
            _mm256_slli_epi32::<4>(_mm256_and_si256(q[2], m)),
        ),
        ff,
    );
    let r1 = _mm256_and_si256(
        _mm256_or_si256(
            _mm256_and_si256(q[1], m),
            _mm256_slli_epi32::<4>(_mm256_and_si256(q[3], m)),
        ),
        ff,
    );
    // values are 0..=255, so the saturating packs are exact
    let p = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(r0, r1));
    let b = _mm256_packus_epi16(p, p);
    let b = _mm256_permute4x64_epi64::<0b00_00_10_00>(b);
    let mut out = [0u8; 16];
    // SAFETY: `out` has 16 writable bytes.
    unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), _mm256_castsi256_si128(b)) };
    out
}

/// Bit 4 of the low byte of every element, element e in bit e (the Q5 `qh` word).
#[target_feature(enable = "avx2,f16c")]
fn high_bits(q: &[__m256i; 4]) -> [u8; 4] {
    let mut h = 0u32;
    for (k, e) in q.iter().enumerate() {
        let m = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_slli_epi32::<27>(*e))) as u32;
        h |= m << (8 * k);
    }
    h.to_le_bytes()
}

fn f16le(v: f32) -> [u8; 2] {
    f32_to_f16_bits(v).to_le_bytes()
}

#[target_feature(enable = "avx2,f16c")]
fn q4_0(x: &[f32; QK], o: &mut [u8]) {
    let v = load32(x);
    let max = signed_absmax(x, &v);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = quant32(&v, None, id, 8.5, Some(15));
    o[..2].copy_from_slice(&f16le(d));
    o[2..18].copy_from_slice(&nibbles(&q, -1));
}

#[target_feature(enable = "avx2,f16c")]
fn q5_0(x: &[f32; QK], o: &mut [u8]) {
    let v = load32(x);
    let max = signed_absmax(x, &v);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = quant32(&v, None, id, 16.5, Some(31));
    o[..2].copy_from_slice(&f16le(d));
    o[2..6].copy_from_slice(&high_bits(&q));
    o[6..22].copy_from_slice(&nibbles(&q, 0xF));
}

#[target_feature(enable = "avx2,f16c")]
fn q4_1(x: &[f32; QK], o: &mut [u8]) {
    let v = load32(x);
    let Some((min, max)) = min_max(&v) else {
        o[..20].copy_from_slice(&legacy::quantize_q4_1(x).to_bytes());
        return;
    };
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = quant32(&v, Some(min), id, 0.5, Some(15));
    o[..2].copy_from_slice(&f16le(d));
    o[2..4].copy_from_slice(&f16le(min));
    o[4..20].copy_from_slice(&nibbles(&q, -1));
}

#[target_feature(enable = "avx2,f16c")]
fn q5_1(x: &[f32; QK], o: &mut [u8]) {
    let v = load32(x);
    let Some((min, max)) = min_max(&v) else {
        o[..24].copy_from_slice(&legacy::quantize_q5_1(x).to_bytes());
        return;
    };
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = quant32(&v, Some(min), id, 0.5, None);
    o[..2].copy_from_slice(&f16le(d));
    o[2..4].copy_from_slice(&f16le(min));
    o[4..8].copy_from_slice(&high_bits(&q));
    o[8..24].copy_from_slice(&nibbles(&q, 0xF));
}

#[target_feature(enable = "avx2,f16c")]
fn q8_0(x: &[f32; QK], o: &mut [u8]) {
    let v = load32(x);
    let sign = _mm256_set1_ps(-0.0);
    let a = v.map(|e| _mm256_andnot_ps(sign, e));
    let amax = hmax(_mm256_max_ps(
        _mm256_max_ps(a[0], a[1]),
        _mm256_max_ps(a[2], a[3]),
    ));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let idv = _mm256_set1_ps(id);
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    // roundf: truncate, then step away from zero when the dropped fraction is >= 0.5 (exact)
    let q = v.map(|e| {
        let p = _mm256_mul_ps(e, idv);
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
        let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(p, t));
        let step = _mm256_or_ps(_mm256_and_ps(p, sign), one);
        let r = _mm256_add_ps(
            t,
            _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half), step),
        );
        _mm256_cvttps_epi32(r)
    });
    // C's `(int8_t)` keeps the low byte (an infinite `x * id` gives 0x80000000 -> 0); masked to
    // 0..=255 first, the unsigned saturating packs are exact
    let ff = _mm256_set1_epi32(0xFF);
    let q = q.map(|e| _mm256_and_si256(e, ff));
    let a = _mm256_packus_epi32(q[0], q[1]);
    let b = _mm256_packus_epi32(q[2], q[3]);
    let p = _mm256_packus_epi16(a, b);
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    o[..2].copy_from_slice(&f16le(d));
    let mut qs = [0u8; 32];
    // SAFETY: `qs` has 32 writable bytes.
    unsafe { _mm256_storeu_si256(qs.as_mut_ptr().cast(), p) };
    o[2..34].copy_from_slice(&qs);
}

/// Runs `f` on every 32-element block of `src` and its `bb`-byte slot in `dst`.
#[inline(always)]
fn blocks(src: &[f32], dst: &mut [u8], bb: usize, f: impl Fn(&[f32; QK], &mut [u8])) {
    for (x, o) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(bb)) {
        if let Ok(x) = <&[f32; QK]>::try_from(x) {
            f(x, o);
        }
    }
}

/// f32 -> f16 (ggml rounding: RNE, NaN -> 0x7E00 | sign): F16C for NaN-free groups of 8.
#[target_feature(enable = "avx2,f16c")]
fn to_f16_row(src: &[f32], dst: &mut [u8]) {
    let mut xs = src.chunks_exact(8);
    let mut os = dst.chunks_exact_mut(16);
    for (x, o) in xs.by_ref().zip(os.by_ref()) {
        // SAFETY: `x` holds 8 floats and `o` 16 bytes.
        unsafe {
            let v = _mm256_loadu_ps(x.as_ptr());
            if _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v)) == 0 {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(o.as_mut_ptr().cast(), h);
                continue;
            }
        }
        for (v, b) in x.iter().zip(o.chunks_exact_mut(2)) {
            b.copy_from_slice(&f32_to_f16_bits(*v).to_le_bytes());
        }
    }
    for (v, b) in xs
        .remainder()
        .iter()
        .zip(os.into_remainder().chunks_exact_mut(2))
    {
        b.copy_from_slice(&f32_to_f16_bits(*v).to_le_bytes());
    }
}

/// f32 -> bf16 as `ggml_compute_fp32_to_bf16`: RNE on the top half, NaN quieted (| 0x40).
#[target_feature(enable = "avx2,f16c")]
fn to_bf16_row(src: &[f32], dst: &mut [u8]) {
    let mut xs = src.chunks_exact(16);
    let mut os = dst.chunks_exact_mut(32);
    let conv = |u: __m256i| {
        let abs = _mm256_and_si256(u, _mm256_set1_epi32(0x7FFF_FFFF));
        let nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7F80_0000));
        let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(u), _mm256_set1_epi32(64));
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(u), _mm256_set1_epi32(1));
        let r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
        let r = _mm256_srli_epi32::<16>(r);
        _mm256_blendv_epi8(r, quiet, nan)
    };
    for (x, o) in xs.by_ref().zip(os.by_ref()) {
        // SAFETY: `x` holds 16 floats and `o` 32 bytes.
        unsafe {
            let a = conv(_mm256_loadu_si256(x.as_ptr().cast()));
            let b = conv(_mm256_loadu_si256(x.as_ptr().add(8).cast()));
            // values are <= 0xFFFF, so the unsigned saturating pack is exact
            let p = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(a, b));
            _mm256_storeu_si256(o.as_mut_ptr().cast(), p);
        }
    }
    for (v, b) in xs
        .remainder()
        .iter()
        .zip(os.into_remainder().chunks_exact_mut(2))
    {
        b.copy_from_slice(&f32_to_bf16_bits(*v).to_le_bytes());
    }
}

/// f16 -> f32 with F16C (exact; NaNs stay NaN).
#[target_feature(enable = "avx2,f16c")]
fn from_f16_row(src: &[u8], dst: &mut [f32]) {
    let mut hs = src.chunks_exact(16);
    let mut ys = dst.chunks_exact_mut(8);
    for (h, y) in hs.by_ref().zip(ys.by_ref()) {
        // SAFETY: `h` holds 16 bytes and `y` 8 floats.
        unsafe {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().cast()));
            _mm256_storeu_ps(y.as_mut_ptr(), v);
        }
    }
    for (b, y) in hs.remainder().chunks_exact(2).zip(ys.into_remainder()) {
        *y = crate::reference::float::f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
}
