//! Dot products of a weight row (any ggml type) with an activation row, the way ggml's CPU backend
//! computes matrix products: activations are first quantized to the weight type's partner format
//! ([`ActFormat`]: Q8_0, Q8_1 or Q8_K, or kept as f32 for float weights), then each block's integer
//! dot product is scaled in f32.
//!
//! This module chooses the kernels: the scalar reference (module `scalar`, re-exported here) or, on
//! x86-64, the AVX2 and AVX-512 kernels that compute the same bits. Imports run one way: this
//! dispatcher and [`attn`] use the ISA files, which use `scalar`, `format` and `flash`; none of
//! those imports anything above it.

// The kernels index block bytes the way ggml's layouts are documented (element j, j+16, ...).
#![allow(clippy::needless_range_loop)]

use crate::{GgmlType, Isa};

pub mod attn;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod flash;
mod format;
pub mod repack;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use format::{act_format, act_row_bytes, check_row, ActFormat, ActRows};
pub use scalar::{
    axpy, dot_bf16_bf16, dot_f16_f16, dot_f16_f32, dot_f32_f32, dot_f32_slices, dot_fn, dot_fn_for,
    dot_q2_k_q8_k, dot_q2_k_q8_k_tiled, dot_q3_k_q8_k, dot_q3_k_q8_k_tiled, dot_q4_0_q8_0,
    dot_q4_1_q8_1, dot_q4_k_q8_k, dot_q4_k_q8_k_tiled, dot_q5_0_q8_0, dot_q5_1_q8_1, dot_q5_k_q8_k,
    dot_q5_k_q8_k_tiled, dot_q6_k_q8_k, dot_q6_k_q8_k_tiled, dot_q8_0_q8_0, gemm_f16_scalar,
    ggml_v_expf, quantize_row_q8_0, quantize_row_q8_1, quantize_row_q8_k, vec_dot, DotFn,
    DotManyFn, TILED_MIN_ROWS,
};
use scalar::{quantize_act_impl, rope_pairs_impl, scalar_many, swiglu_impl};

/// Converts one activation row `x` into `out` (exactly [`act_row_bytes`] long) in format `f`.
pub fn quantize_act(f: ActFormat, x: &[f32], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() && Isa::current() != Isa::Scalar {
        return avx2::quantize_act(f, x, out);
    }
    quantize_act_impl(f, x, out)
}

/// The tile kernel for weights of type `w` on instruction set `isa` (the scalar loop when `isa`
/// is [`Isa::Scalar`], is unavailable, or has no kernel for `w`), computing each dot as
/// [`dot_fn_for`]`(w, batch)` does.
pub fn dot_many_fn(w: GgmlType, isa: Isa, batch: bool) -> Option<DotManyFn> {
    dot_fn(w)?;
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && isa.is_available() && avx2::available() {
        let wide = isa == Isa::Avx512 && avx512::available();
        if let Some(f) = x86::many_fn(w, wide, batch) {
            return Some(f);
        }
    }
    let _ = isa;
    if batch {
        match w {
            GgmlType::Q2K => {
                return Some(|w, rb, a, s, o| scalar_many(dot_q2_k_q8_k_tiled, w, rb, a, s, o))
            }
            GgmlType::Q3K => {
                return Some(|w, rb, a, s, o| scalar_many(dot_q3_k_q8_k_tiled, w, rb, a, s, o))
            }
            GgmlType::Q4K => {
                return Some(|w, rb, a, s, o| scalar_many(dot_q4_k_q8_k_tiled, w, rb, a, s, o))
            }
            GgmlType::Q5K => {
                return Some(|w, rb, a, s, o| scalar_many(dot_q5_k_q8_k_tiled, w, rb, a, s, o))
            }
            GgmlType::Q6K => {
                return Some(|w, rb, a, s, o| scalar_many(dot_q6_k_q8_k_tiled, w, rb, a, s, o))
            }
            _ => {}
        }
    }
    macro_rules! s {
        ($f:path) => {
            |w, rb, a, s, o| scalar_many($f, w, rb, a, s, o)
        };
    }
    Some(match w {
        GgmlType::F32 => s!(dot_f32_f32),
        GgmlType::F16 => s!(dot_f16_f16),
        GgmlType::BF16 => s!(dot_bf16_bf16),
        GgmlType::Q4_0 => s!(dot_q4_0_q8_0),
        GgmlType::Q4_1 => s!(dot_q4_1_q8_1),
        GgmlType::Q5_0 => s!(dot_q5_0_q8_0),
        GgmlType::Q5_1 => s!(dot_q5_1_q8_1),
        GgmlType::Q8_0 => s!(dot_q8_0_q8_0),
        GgmlType::Q2K => s!(dot_q2_k_q8_k),
        GgmlType::Q3K => s!(dot_q3_k_q8_k),
        GgmlType::Q4K => s!(dot_q4_k_q8_k),
        GgmlType::Q5K => s!(dot_q5_k_q8_k),
        GgmlType::Q6K => s!(dot_q6_k_q8_k),
        GgmlType::Q8K => return None,
    })
}

/// F16 weights (`w`: whole rows of `row_bytes`) times `toks` f16-valued activation rows
/// ([`ActFormat::F16`], `stride` bytes apart in `a`): `out[j * ldo + r] = dot_f16_f16(w_r, a_j)`,
/// bit-identical to [`dot_f16_f16`] (the AVX-512 kernel packs and blocks, keeping every dot's
/// order). Lengths that do not fit never panic: what is there is computed by the scalar loop.
pub fn gemm_f16(
    w: &[u8],
    row_bytes: usize,
    a: &[u8],
    stride: usize,
    toks: usize,
    out: &mut [f32],
    ldo: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if gemm_f16_fast() && avx512::f16_gemm(w, row_bytes, a, stride, toks, out, ldo).is_some() {
        return;
    }
    gemm_f16_scalar(w, row_bytes, a, stride, toks, out, ldo)
}

/// Whether [`gemm_f16`] and [`gemm_f16_par`] have a vector kernel on this CPU (otherwise they run
/// the scalar reference, and the tiled dot kernels of [`dot_many_fn`] are faster).
pub fn gemm_f16_fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    if Isa::current() == Isa::Avx512 {
        return avx512::f16_gemm_available();
    }
    false
}

/// [`gemm_f16`] spread over rayon's threads, with the `acts.n` activation rows of `acts`
/// (`acts.stride` bytes apart): the activations packed once, then tiles of `tile` tokens (each
/// weight is converted once per tile) times chunks of 32 weight rows as tasks, small enough that
/// the threads finish together. Same results.
/// Without the vector kernel ([`gemm_f16_fast`] false) it is the scalar reference on this thread;
/// callers then do better with the tiled dot kernels.
pub fn gemm_f16_par(
    w: &[u8],
    row_bytes: usize,
    acts: ActRows<'_>,
    out: &mut [f32],
    ldo: usize,
    tile: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if gemm_f16_fast() && avx512::f16_gemm_par(w, row_bytes, acts, out, ldo, tile).is_some() {
        return;
    }
    let ActRows {
        bytes: a,
        stride,
        n: toks,
    } = acts;
    gemm_f16_scalar(w, row_bytes, a, stride, toks, out, ldo)
}

/// Rotates the adjacent pairs of `x` by the angles whose cosines and sines `cs` holds
/// interleaved (`cs[2i]`, `cs[2i + 1]` for pair `i`), as ggml-cpu's `rotate_pairs` compiles on
/// x86-64 with GCC: `x0*cos` and `x0*sin` fused into the subtraction and addition, `x1`'s
/// products rounded first. Pairs past the shorter slice are left as they are.
pub fn rope_pairs(x: &mut [f32], cs: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() && Isa::current() != Isa::Scalar {
        return avx2::rope_pairs(x, cs);
    }
    rope_pairs_impl(x, cs)
}

/// ggml's `ggml_vec_swiglu_f32` on x86 with AVX-512: `out = x / (1 + v_expf(0 - x)) * g` over
/// whole 16-lane groups, `x / (1 + expf(-x)) * g` (libm exp) on the tail. Stops at the shortest
/// slice.
pub fn swiglu(x: &[f32], g: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() && Isa::current() != Isa::Scalar {
        return avx2::swiglu(x, g, out);
    }
    swiglu_impl(x, g, out)
}

#[cfg(test)]
mod tests;
