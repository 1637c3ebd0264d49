//! Causal attention of one head over an f16 KV cache ([`attend_head`]), in the arithmetic order of
//! ggml-cpu's tiled flash attention (see `flash` for the operations): chooses the AVX-512, AVX2 or
//! plain build of the same code; every build gives the same bits.

use super::flash;
pub use super::flash::{HeadView, Queries, KV_TILE};
#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512};
use crate::Isa;

/// Attention of the `qs.t` query rows of `qs` (row `i` at `qs.stride * i`, head values at
/// `qs.off`, position `qs.pos0 + i`) over cache positions `0..qs.pos0 + qs.t`; writes `hd` values
/// per query at `out[i * hd..]`. Short slices are never indexed past their end (missing values
/// read as 0).
pub fn attend_head(kv: HeadView<'_>, qs: Queries<'_>, scale: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() && Isa::current() != Isa::Scalar {
        if Isa::current() == Isa::Avx512 && avx512::available() {
            return avx512::attend_head(kv, qs, scale, out);
        }
        return avx2::attend_head(kv, qs, scale, out);
    }
    flash::attend_head_impl(kv, qs, scale, out)
}
