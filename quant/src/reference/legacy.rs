//! Legacy 32-element block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: ggml's `quantize_row_*_ref` and
//! `dequantize_row_*`, one block at a time (spec §3.1–3.5).
//!
//! Rounding: Q4/Q5 add 8.5 / 0.5 / 16.5 and truncate toward zero; Q8_0 uses `roundf` (ties away from
//! zero). All use the *unrounded* f32 scale; only the stored scale is rounded to f16.
//! Float-to-integer casts follow x86-64 `cvttss2si` ([`super::c_trunc_i32`]), so NaN/out-of-range
//! values behave like the x86 build of ggml.

use half::f16;

use super::c_trunc_i32;
use super::float::f32_to_f16_bits;
use crate::blocks::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, QK};

fn to_f16(v: f32) -> f16 {
    f16::from_bits(f32_to_f16_bits(v))
}

/// First element of maximal |x| (strict `<` scan, so the first wins), keeping its sign.
fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0f32;
    let mut max = 0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// (min, max) over x starting from (+FLT_MAX, -FLT_MAX), strict compares as in C.
fn min_max(x: &[f32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// `(int8_t)(v)` then `MIN(cap, .)` then stored into a `uint8_t`.
fn q_i8_capped(v: f32, cap: i32) -> u8 {
    let q = c_trunc_i32(v) as i8 as i32;
    q.min(cap) as u8
}

/// Q4_0 reference quantizer (`quantize_row_q4_0_ref`).
pub fn quantize_q4_0(x: &[f32; QK]) -> BlockQ4_0 {
    let max = signed_absmax(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0u8; QK / 2];
    let (lo, hi) = x.split_at(QK / 2);
    for ((q, &a), &b) in qs.iter_mut().zip(lo).zip(hi) {
        let xi0 = q_i8_capped(a * id + 8.5, 15);
        let xi1 = q_i8_capped(b * id + 8.5, 15);
        *q = xi0 | (xi1 << 4);
    }
    BlockQ4_0 { d: to_f16(d), qs }
}

/// Q4_0 dequantizer: `y = (q - 8) * d`.
pub fn dequantize_q4_0(b: &BlockQ4_0, y: &mut [f32; QK]) {
    let d = b.d.to_f32();
    let (lo, hi) = y.split_at_mut(QK / 2);
    for ((&q, a), c) in b.qs.iter().zip(lo).zip(hi) {
        *a = ((q & 0x0F) as i32 - 8) as f32 * d;
        *c = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1 reference quantizer (`quantize_row_q4_1_ref`).
pub fn quantize_q4_1(x: &[f32; QK]) -> BlockQ4_1 {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0u8; QK / 2];
    let (lo, hi) = x.split_at(QK / 2);
    for ((q, &a), &b) in qs.iter_mut().zip(lo).zip(hi) {
        let xi0 = q_i8_capped((a - min) * id + 0.5, 15);
        let xi1 = q_i8_capped((b - min) * id + 0.5, 15);
        *q = xi0 | (xi1 << 4);
    }
    BlockQ4_1 {
        d: to_f16(d),
        m: to_f16(min),
        qs,
    }
}

/// Q4_1 dequantizer: `y = q*d + m`.
pub fn dequantize_q4_1(b: &BlockQ4_1, y: &mut [f32; QK]) {
    let d = b.d.to_f32();
    let m = b.m.to_f32();
    let (lo, hi) = y.split_at_mut(QK / 2);
    for ((&q, a), c) in b.qs.iter().zip(lo).zip(hi) {
        *a = (q & 0x0F) as f32 * d + m;
        *c = (q >> 4) as f32 * d + m;
    }
}

/// Packs 5-bit values: low nibbles as in Q4_0, bit 4 of element j into bit j of a LE u32.
fn pack5(xi: impl Iterator<Item = (u8, u8)>) -> ([u8; 4], [u8; QK / 2]) {
    let mut qs = [0u8; QK / 2];
    let mut qh = 0u32;
    for (j, (q, (xi0, xi1))) in qs.iter_mut().zip(xi).enumerate() {
        *q = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4);
        qh |= (u32::from(xi0 & 0x10) >> 4) << j;
        qh |= (u32::from(xi1 & 0x10) >> 4) << (j + QK / 2);
    }
    (qh.to_le_bytes(), qs)
}

/// Unpacks 5-bit values (0..=31) of a Q5 block.
fn unpack5(qh: [u8; 4], qs: &[u8; QK / 2], y: &mut [f32; QK], f: impl Fn(i32) -> f32) {
    let qh = u32::from_le_bytes(qh);
    let (lo, hi) = y.split_at_mut(QK / 2);
    for (j, ((&q, a), c)) in qs.iter().zip(lo).zip(hi).enumerate() {
        let xh0 = ((qh >> j) << 4) & 0x10;
        let xh1 = (qh >> (j + 12)) & 0x10;
        *a = f(((q & 0x0F) as u32 | xh0) as i32);
        *c = f(((q >> 4) as u32 | xh1) as i32);
    }
}

/// Q5_0 reference quantizer (`quantize_row_q5_0_ref`).
pub fn quantize_q5_0(x: &[f32; QK]) -> BlockQ5_0 {
    let max = signed_absmax(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let (lo, hi) = x.split_at(QK / 2);
    let (qh, qs) = pack5(lo.iter().zip(hi).map(|(&a, &b)| {
        (
            q_i8_capped(a * id + 16.5, 31),
            q_i8_capped(b * id + 16.5, 31),
        )
    }));
    BlockQ5_0 {
        d: to_f16(d),
        qh,
        qs,
    }
}

/// Q5_0 dequantizer: `y = (q - 16) * d`.
pub fn dequantize_q5_0(b: &BlockQ5_0, y: &mut [f32; QK]) {
    let d = b.d.to_f32();
    unpack5(b.qh, &b.qs, y, |q| (q - 16) as f32 * d);
}

/// Q5_1 reference quantizer (`quantize_row_q5_1_ref`); `(uint8_t)(v + 0.5)`, no explicit clamp.
pub fn quantize_q5_1(x: &[f32; QK]) -> BlockQ5_1 {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let (lo, hi) = x.split_at(QK / 2);
    let (qh, qs) = pack5(lo.iter().zip(hi).map(|(&a, &b)| {
        (
            c_trunc_i32((a - min) * id + 0.5) as u8,
            c_trunc_i32((b - min) * id + 0.5) as u8,
        )
    }));
    BlockQ5_1 {
        d: to_f16(d),
        m: to_f16(min),
        qh,
        qs,
    }
}

/// Q5_1 dequantizer: `y = q*d + m`.
pub fn dequantize_q5_1(b: &BlockQ5_1, y: &mut [f32; QK]) {
    let d = b.d.to_f32();
    let m = b.m.to_f32();
    unpack5(b.qh, &b.qs, y, |q| q as f32 * d + m);
}

/// Q8_0 reference quantizer (`quantize_row_q8_0_ref`): `roundf`, ties away from zero.
pub fn quantize_q8_0(x: &[f32; QK]) -> BlockQ8_0 {
    let mut amax = 0f32;
    for &v in x {
        let a = v.abs();
        // MAX(amax, a) as the C macro: `amax > a ? amax : a`
        amax = if amax > a { amax } else { a };
    }
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = c_trunc_i32((v * id).round()) as i8;
    }
    BlockQ8_0 { d: to_f16(d), qs }
}

/// Q8_0 dequantizer: `y = q*d`.
pub fn dequantize_q8_0(b: &BlockQ8_0, y: &mut [f32; QK]) {
    let d = b.d.to_f32();
    for (o, &q) in y.iter_mut().zip(&b.qs) {
        *o = q as f32 * d;
    }
}
