//! F16 / BF16 conversions exactly as ggml's scalar `ggml_compute_fp32_to_fp16` / `_to_bf16` do them.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::error::QuantError;

/// f32 to IEEE half bits the way ggml-base does it: round to nearest even, subnormals kept,
/// overflow to ±inf, and **every NaN becomes `sign | 0x7E00`** (half would keep payload bits).
pub fn f32_to_f16_bits(v: f32) -> u16 {
    if v.is_nan() {
        ((v.to_bits() >> 16) as u16 & 0x8000) | 0x7E00
    } else {
        f16::from_f32(v).to_bits()
    }
}

/// f32 to bfloat16 bits as `ggml_compute_fp32_to_bf16`: round to nearest even on the top 16 bits,
/// subnormals kept, NaN made quiet by setting bit 6 (payload and sign kept). `half` does exactly this.
pub fn f32_to_bf16_bits(v: f32) -> u16 {
    bf16::from_f32(v).to_bits()
}

/// Exact widening of half bits.
pub fn f16_bits_to_f32(h: u16) -> f32 {
    f16::from_bits(h).to_f32()
}

/// Exact widening of bfloat16 bits.
pub fn bf16_bits_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

const CHUNK: usize = 256;

fn check_pairs(what: &'static str, src_bytes: usize, dst_len: usize) -> Result<(), QuantError> {
    if !src_bytes.is_multiple_of(2) || src_bytes / 2 != dst_len {
        return Err(QuantError::ElementCount {
            what,
            expected: dst_len,
            actual: src_bytes / 2,
        });
    }
    Ok(())
}

/// Widens little-endian f16 values (`src`, 2 bytes each) into `dst`.
/// `src.len()` must be exactly `2 * dst.len()`.
pub fn f16_to_f32_slice(src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check_pairs("f16 source", src.len(), dst.len())?;
    let mut buf = [f16::ZERO; CHUNK];
    for (s, d) in src.chunks(2 * CHUNK).zip(dst.chunks_mut(CHUNK)) {
        let n = d.len();
        for (h, b) in buf.iter_mut().zip(s.chunks_exact(2)) {
            *h = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
        }
        buf[..n].convert_to_f32_slice(d);
    }
    Ok(())
}

/// Widens little-endian bf16 values (`src`, 2 bytes each) into `dst`.
/// `src.len()` must be exactly `2 * dst.len()`.
///
/// This is a plain 16-bit shift like ggml's `ggml_bf16_to_fp32_row`; `half`'s conversion is not
/// used because it sets the quiet bit of signalling NaNs.
pub fn bf16_to_f32_slice(src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check_pairs("bf16 source", src.len(), dst.len())?;
    for (b, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *y = bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
    Ok(())
}

/// Narrows `src` to little-endian f16 bytes in `dst` (ggml rounding, see [`f32_to_f16_bits`]).
pub(crate) fn f32_to_f16_bytes(src: &[f32], dst: &mut [u8]) {
    for (x, o) in src.iter().zip(dst.chunks_exact_mut(2)) {
        o.copy_from_slice(&f32_to_f16_bits(*x).to_le_bytes());
    }
}

/// Narrows `src` to little-endian bf16 bytes in `dst` (ggml rounding, see [`f32_to_bf16_bits`]).
pub(crate) fn f32_to_bf16_bytes(src: &[f32], dst: &mut [u8]) {
    for (x, o) in src.iter().zip(dst.chunks_exact_mut(2)) {
        o.copy_from_slice(&f32_to_bf16_bits(*x).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml_compute_fp32_to_bf16, restated from the spec.
    fn bf16_spec(v: f32) -> u16 {
        let u = v.to_bits();
        if u & 0x7fff_ffff > 0x7f80_0000 {
            return ((u >> 16) | 64) as u16;
        }
        ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
    }

    #[test]
    fn bf16_matches_spec_formula() {
        let mut u: u32 = 0;
        loop {
            let v = f32::from_bits(u);
            assert_eq!(f32_to_bf16_bits(v), bf16_spec(v), "bits {u:#x}");
            match u.checked_add(65_521) {
                Some(n) => u = n,
                None => break,
            }
        }
        for u in [
            0x7f7f_ffffu32,
            0x7f7f_8000,
            0x7f7f_7fff,
            0x0000_8000,
            0x0001_8000,
            0x8000_0001,
            0x7f80_0001,
            0xff80_0001,
            0x7fc0_0000,
        ] {
            let v = f32::from_bits(u);
            assert_eq!(f32_to_bf16_bits(v), bf16_spec(v), "bits {u:#x}");
        }
    }

    #[test]
    fn f16_nan_and_specials() {
        assert_eq!(f32_to_f16_bits(f32::NAN), 0x7E00);
        assert_eq!(f32_to_f16_bits(-f32::NAN), 0xFE00);
        assert_eq!(f32_to_f16_bits(f32::from_bits(0x7fa0_0000)), 0x7E00);
        assert_eq!(f32_to_f16_bits(f32::from_bits(0xff80_0001)), 0xFE00);
        assert_eq!(f32_to_f16_bits(f32::INFINITY), 0x7C00);
        assert_eq!(f32_to_f16_bits(f32::NEG_INFINITY), 0xFC00);
        assert_eq!(f32_to_f16_bits(65504.0), 0x7BFF);
        assert_eq!(f32_to_f16_bits(65519.996), 0x7BFF);
        assert_eq!(f32_to_f16_bits(65520.0), 0x7C00);
        assert_eq!(f32_to_f16_bits(-0.0), 0x8000);
        assert_eq!(f32_to_f16_bits(1e-30), 0);
        // smallest subnormal 2^-24; half of it ties to even (0), a bit more rounds up
        assert_eq!(f32_to_f16_bits(2f32.powi(-24)), 1);
        assert_eq!(f32_to_f16_bits(2f32.powi(-25)), 0);
        assert_eq!(f32_to_f16_bits(2f32.powi(-25) * 1.0001), 1);
    }

    /// Round-to-nearest-even at every midpoint between consecutive finite halves.
    #[test]
    fn f16_rounding_is_rne_everywhere() {
        for h in 0u16..0x7BFF {
            let lo = f16_bits_to_f32(h);
            assert_eq!(f32_to_f16_bits(lo), h);
            assert_eq!(f32_to_f16_bits(-lo), h | 0x8000);
            let hi = f16_bits_to_f32(h + 1);
            let mid = (lo + hi) / 2.0; // exact in f32
            let even = if h % 2 == 0 { h } else { h + 1 };
            assert_eq!(f32_to_f16_bits(mid), even, "mid of {h:#x}");
            assert_eq!(f32_to_f16_bits(f32::from_bits(mid.to_bits() - 1)), h);
            assert_eq!(f32_to_f16_bits(f32::from_bits(mid.to_bits() + 1)), h + 1);
        }
    }

    #[test]
    fn slice_helpers() {
        let vals: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.37).collect();
        let mut b16 = vec![0u8; 2000];
        f32_to_f16_bytes(&vals, &mut b16);
        let mut back = vec![0f32; 1000];
        f16_to_f32_slice(&b16, &mut back).unwrap();
        for (a, b) in vals.iter().zip(&back) {
            assert_eq!(*b, f16::from_f32(*a).to_f32());
        }
        f32_to_bf16_bytes(&vals, &mut b16);
        bf16_to_f32_slice(&b16, &mut back).unwrap();
        for (a, b) in vals.iter().zip(&back) {
            assert_eq!(*b, bf16::from_f32(*a).to_f32());
        }
        assert!(f16_to_f32_slice(&b16[..3], &mut back[..1]).is_err());
        assert!(bf16_to_f32_slice(&b16[..4], &mut back[..1]).is_err());
        assert!(f16_to_f32_slice(&[], &mut []).is_ok());
        // signalling NaNs and payloads pass through unchanged, as in ggml
        let mut y = [0f32; 2];
        bf16_to_f32_slice(&[0x81, 0x7f, 0x01, 0xff], &mut y).unwrap();
        assert_eq!(y.map(f32::to_bits), [0x7f81_0000, 0xff01_0000]);
        f16_to_f32_slice(&[0x01, 0x7c, 0x01, 0xfe], &mut y).unwrap();
        assert!(y[0].is_nan() && y[1].is_nan());
    }
}
