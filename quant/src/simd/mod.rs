//! Run-time selected SIMD quantizers (AVX-512, AVX2) whose bytes equal the reference quantizers'.
//!
//! The kernels are written once, generically over the `Simd` trait (private module `lanes`), and
//! instantiated per instruction set inside `#[target_feature]` functions (private modules `avx2`,
//! `avx512`). They vectorize
//! *across* blocks or sub-blocks: each lane runs exactly the scalar sequence of one (sub-)block, in
//! the reference's operation order, with data-dependent branches turned into lane masks, so every
//! rounding step is the same IEEE operation the reference performs. Rows holding NaN or infinity
//! are handed to the reference (their bytes depend on NaN payload propagation, see
//! [`crate::reference`]).
//!
//! The instruction set is chosen once per process ([`Isa::current`]); `KILN_FORCE_SCALAR=1` forces
//! the reference.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod lanes;
#[cfg(test)]
mod tests;

use std::sync::OnceLock;

use crate::error::QuantError;
use crate::reference::{self, bytes_for, check_len};
use crate::types::GgmlType;

/// An instruction set the quantizers can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// The scalar reference quantizers.
    Scalar,
    /// AVX2 + F16C kernels (8 lanes).
    Avx2,
    /// AVX-512 (F, BW, VL) + F16C kernels (16 lanes).
    Avx512,
}

impl Isa {
    /// Every instruction set, slowest first.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    /// Whether this CPU can run `self`.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::Avx2::new().is_some(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::Avx512::new().is_some(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest instruction set this CPU supports.
    pub fn detect() -> Isa {
        Isa::ALL
            .into_iter()
            .rev()
            .find(|i| i.is_available())
            .unwrap_or(Isa::Scalar)
    }

    /// The instruction set used by [`crate::quantize_row`]: [`Isa::detect`], or [`Isa::Scalar`]
    /// when the environment variable `KILN_FORCE_SCALAR` is `1`. Decided once per process.
    pub fn current() -> Isa {
        static CURRENT: OnceLock<Isa> = OnceLock::new();
        *CURRENT.get_or_init(|| {
            if std::env::var_os("KILN_FORCE_SCALAR").is_some_and(|v| v == "1") {
                Isa::Scalar
            } else {
                Isa::detect()
            }
        })
    }
}

/// Whether every value is finite (no NaN, no infinity).
#[inline(always)]
fn all_finite(x: &[f32]) -> bool {
    // written as a branch-free fold so that it vectorizes inside the `#[target_feature]` callers
    let mut acc = 0u32;
    for c in x.chunks(64) {
        let mut m = 0u32;
        for v in c {
            m |= u32::from(v.to_bits() & 0x7f80_0000 == 0x7f80_0000);
        }
        acc |= m;
        if acc != 0 {
            return false;
        }
    }
    true
}

/// Quantizes one row (any whole number of blocks) with the kernels of `isa`; the bytes always equal
/// [`reference::quantize_row_ref`]'s. An `isa` this CPU lacks falls back to the reference.
pub fn quantize_row_with(
    isa: Isa,
    ty: GgmlType,
    src: &[f32],
    dst: &mut [u8],
) -> Result<(), QuantError> {
    let expected = bytes_for(ty, src.len())?;
    check_len(ty, "destination", expected, dst.len())?;
    let done = match isa {
        Isa::Scalar => false,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::Avx2::new().is_some_and(|s| s.quantize(ty, src, dst)),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            // AVX-512 kernels exist for the K-quants; the other types use the AVX2 ones
            avx512::Avx512::new().is_some_and(|s| s.quantize(ty, src, dst))
                || avx2::Avx2::new().is_some_and(|s| s.quantize(ty, src, dst))
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => false,
    };
    if done {
        Ok(())
    } else {
        reference::quantize_row_ref(ty, src, dst)
    }
}

/// Dequantizes `src` (whole blocks of `ty`) into `dst` with the kernels of `isa` (F16 widening is
/// vectorized; other types use the reference). Values are identical to
/// [`reference::dequantize_row`]'s.
pub fn dequantize_row_with(
    isa: Isa,
    ty: GgmlType,
    src: &[u8],
    dst: &mut [f32],
) -> Result<(), QuantError> {
    let expected = bytes_for(ty, dst.len())?;
    check_len(ty, "source", expected, src.len())?;
    let done = match isa {
        Isa::Scalar => false,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::Avx2::new().is_some_and(|s| s.dequantize(ty, src, dst)),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx2::Avx2::new().is_some_and(|s| s.dequantize(ty, src, dst)),
        #[cfg(not(target_arch = "x86_64"))]
        _ => false,
    };
    if done {
        Ok(())
    } else {
        reference::dequantize_row(ty, src, dst)
    }
}

/// A vector of `N` f32 lanes (`N` = 8 or 16) and its companion i32 vector and lane mask.
///
/// Implementations are zero-sized tokens whose existence proves the CPU supports the instructions;
/// every method is `#[inline(always)]` so that, instantiated inside a `#[target_feature]` function,
/// the intrinsics inline. Arithmetic is plain IEEE f32 (no FMA); comparisons are ordered and
/// quiet (`ne` is unordered), as C's operators on floats.
pub(crate) trait Simd: Copy {
    /// Lanes per vector (8 or 16; arrays passed in always have 16 slots).
    const N: usize;
    type F: Copy;
    type I: Copy;
    type M: Copy;

    fn splat(self, v: f32) -> Self::F;
    fn splat_i(self, v: i32) -> Self::I;
    fn load(self, a: &[f32; 16]) -> Self::F;
    fn store(self, v: Self::F, a: &mut [f32; 16]);
    fn load_i(self, a: &[i32; 16]) -> Self::I;
    fn store_i(self, v: Self::I, a: &mut [i32; 16]);
    /// The first `N` values of `a`, or zeros if `a` is shorter.
    fn load_slice(self, a: &[f32]) -> Self::F;
    /// Stores the low byte of each lane (callers guarantee lanes hold 0..=255) to `out[..N]`;
    /// nothing if `out` is shorter.
    fn store_u8(self, v: Self::I, out: &mut [u8]);

    fn add(self, a: Self::F, b: Self::F) -> Self::F;
    fn sub(self, a: Self::F, b: Self::F) -> Self::F;
    fn mul(self, a: Self::F, b: Self::F) -> Self::F;
    fn div(self, a: Self::F, b: Self::F) -> Self::F;
    fn sqrt(self, a: Self::F) -> Self::F;
    /// Clears the sign bit.
    fn abs(self, a: Self::F) -> Self::F;
    /// Flips the sign bit.
    fn neg(self, a: Self::F) -> Self::F;

    fn gt(self, a: Self::F, b: Self::F) -> Self::M;
    fn lt(self, a: Self::F, b: Self::F) -> Self::M;
    fn eq(self, a: Self::F, b: Self::F) -> Self::M;
    /// `a != b` as in C: true when either is NaN.
    fn ne(self, a: Self::F, b: Self::F) -> Self::M;
    fn and(self, a: Self::M, b: Self::M) -> Self::M;
    fn or(self, a: Self::M, b: Self::M) -> Self::M;
    fn any(self, m: Self::M) -> bool;
    /// `m ? a : b` per lane.
    fn sel(self, m: Self::M, a: Self::F, b: Self::F) -> Self::F;
    fn sel_i(self, m: Self::M, a: Self::I, b: Self::I) -> Self::I;

    /// ggml's `nearest_int` bit trick, per lane (see [`reference::nearest_int`]).
    fn nearest_int(self, a: Self::F) -> Self::I;
    /// Exact i32 -> f32 for the small integers used here.
    fn to_f(self, a: Self::I) -> Self::F;
    fn min_i(self, a: Self::I, b: Self::I) -> Self::I;
    fn max_i(self, a: Self::I, b: Self::I) -> Self::I;
    fn add_i(self, a: Self::I, b: Self::I) -> Self::I;
    fn ne_i(self, a: Self::I, b: Self::I) -> Self::M;
}
