//! Importance-weighted quantizers: ggml's `quantize_row_*_impl` paths taken when llama-quantize
//! passes per-column weights (an imatrix), bit-exact, for Q4_0, Q4_1, Q5_0, Q5_1 and Q2_K…Q6_K.
//!
//! The weight of element `i` is `qw[i] * sqrt(sigma2 + x[i]^2)` (Q6_K uses `qw[i]` alone), where
//! `sigma2` is the mean square of the whole row (legacy types) or `2x` / `1x` the mean square of the
//! 256-element super-block (Q3_K…Q5_K / Q2_K). The searches are `make_qx_quants` (symmetric, given
//! weights), `make_qkx3_quants` (asymmetric grid of 37 steps) and `make_qp_quants` (the super-block
//! scales, weighted by each sub-block's weight sum). The arithmetic follows the C operation order
//! with no fused multiply-adds, and integer narrowing mirrors C's modular conversions.
//!
//! Types without a weighted path (F32, F16, BF16, Q8_0, Q8_K) quantize exactly as without weights,
//! as `ggml_quantize_chunk` does.

use half::f16;

use super::float::f32_to_f16_bits;
use super::kquants::{
    finish_q6_k, get_scale_min_k4, make_qx_quants_weighted, pack_q2_k, pack_q3_k, pack_q4_k,
    pack_q5_k, requant_ref, Requant, GROUP_MAX_EPS,
};
use super::{bytes_for, check_len, nearest_int, quantize_row_ref};
use crate::blocks::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ6K, QK, QK_K,
};
use crate::error::QuantError;
use crate::types::GgmlType;

fn to_f16(v: f32) -> f16 {
    f16::from_bits(f32_to_f16_bits(v))
}

/// Whether ggml quantizes `ty` differently when importance weights are given.
pub fn uses_weights(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q2K
            | GgmlType::Q3K
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
    )
}

/// Sequential f32 sum of squares (C's `for (...) s += x[i]*x[i]`).
fn sum_sq(x: &[f32]) -> f32 {
    let mut s = 0f32;
    for &v in x {
        s += v * v;
    }
    s
}

/// Sequential f32 sum.
fn sum(x: &[f32]) -> f32 {
    let mut s = 0f32;
    for &v in x {
        s += v;
    }
    s
}

/// `weight[i] = qw[i] * sqrtf(sigma2 + x[i]*x[i])`.
fn sigma_weights(x: &[f32], qw: &[f32], sigma2: f32, out: &mut [f32]) {
    for ((o, &v), &q) in out.iter_mut().zip(x).zip(qw) {
        *o = q * (sigma2 + v * v).sqrt();
    }
}

/// `make_qkx3_quants(n, nmax, x, weights, L, &the_min, Laux, -0.9, 0.05, 36, false)`: returns
/// `(scale, the_min)` with `the_min = -min`. `x`, `w`, `big_l` have equal length `<= 32`.
fn make_qkx3_quants(nmax: i32, x: &[f32], w: &[f32], big_l: &mut [u8]) -> (f32, f32) {
    const RMIN: f32 = -0.9;
    const RDELTA: f32 = 0.05;
    const NSTEP: i32 = 36;
    let (Some(&x0), Some(&w0)) = (x.first(), w.first()) else {
        return (0.0, 0.0);
    };
    let nmaxf = nmax as f32;
    let mut min = x0;
    let mut max = x0;
    let mut sum_w = w0;
    let mut sum_x = sum_w * x0;
    for (&v, &wi) in x.iter().zip(w).skip(1) {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
        sum_w += wi;
        sum_x += wi * v;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max <= min {
        big_l.fill(0);
        return (0.0, -min);
    }
    let iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_mad = 0f32;
    for ((q, &v), &wi) in big_l.iter_mut().zip(x).zip(w) {
        *q = nearest_int(iscale * (v - min)).clamp(0, nmax) as u8;
        let diff = scale * *q as f32 + min - v;
        best_mad += wi * (diff * diff);
    }
    let mut laux = [0u8; 32];
    let laux = &mut laux[..x.len()];
    for is in 0..=NSTEP {
        let iscale = (RMIN + RDELTA * is as f32 + nmaxf) / (max - min);
        let mut sum_l = 0f32;
        let mut sum_l2 = 0f32;
        let mut sum_xl = 0f32;
        for ((q, &v), &wi) in laux.iter_mut().zip(x).zip(w) {
            let l = nearest_int(iscale * (v - min)).clamp(0, nmax);
            *q = l as u8;
            let lf = l as f32;
            sum_l += wi * lf;
            sum_l2 += wi * lf * lf;
            sum_xl += wi * lf * v;
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut mad = 0f32;
            for ((&q, &v), &wi) in laux.iter().zip(x).zip(w) {
                let diff = this_scale * q as f32 + this_min - v;
                mad += wi * (diff * diff);
            }
            if mad < best_mad {
                big_l.copy_from_slice(laux);
                best_mad = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `make_qp_quants(n, nmax, x, L, quant_weights)`: quantizes the non-negative sub-block scales
/// `x` to `0..=nmax` (L is `uint8_t` in C; negative values wrap as there).
fn make_qp_quants(nmax: i32, x: &[f32], big_l: &mut [u8], qw: &[f32]) -> f32 {
    let mut max = 0f32;
    for &v in x {
        max = if max > v { max } else { v };
    }
    if max < GROUP_MAX_EPS {
        big_l.fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / max;
    for (q, &v) in big_l.iter_mut().zip(x) {
        *q = nearest_int(iscale * v) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0f32;
    for ((&q, &v), &w) in big_l.iter().zip(x).zip(qw) {
        let diff = v - scale * q as f32;
        best_mse += w * diff * diff;
    }
    for is in -4i32..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmaxf) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0f32;
        for (&v, &w) in x.iter().zip(qw) {
            let l = nearest_int(iscale_is * v).min(nmax);
            let diff = v - scale_is * l as f32;
            mse += w * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let mut sumlx = 0f32;
    let mut suml2 = 0f32;
    for ((q, &v), &w) in big_l.iter_mut().zip(x).zip(qw) {
        let l = nearest_int(iscale * v).min(nmax);
        *q = l as u8;
        let lf = l as f32;
        sumlx += w * v * lf;
        suml2 += w * lf * lf;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for ((q, &v), &w) in big_l.iter_mut().zip(x).zip(qw) {
            let li = *q as f32;
            let mut slx = sumlx - w * v * li;
            let mut sl2 = suml2 - w * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(v * sl2 / slx).min(nmax);
                if new_l != i32::from(*q) {
                    let nl = new_l as f32;
                    slx += w * v * nl;
                    sl2 += w * nl * nl;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *q = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Packs 5-bit values L (0..=31) of a 32-element block into `(qh, qs)`.
fn pack5(big_l: &[u8; QK]) -> ([u8; 4], [u8; QK / 2]) {
    let mut qs = [0u8; QK / 2];
    let mut qh = 0u32;
    for (j, q) in qs.iter_mut().enumerate() {
        let (xi0, xi1) = (big_l[j], big_l[j + QK / 2]);
        *q = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4);
        qh |= (u32::from(xi0 & 0x10) >> 4) << j;
        qh |= (u32::from(xi1 & 0x10) >> 4) << (j + QK / 2);
    }
    (qh.to_le_bytes(), qs)
}

fn pack4(big_l: &[u8; QK]) -> [u8; QK / 2] {
    let mut qs = [0u8; QK / 2];
    for (j, q) in qs.iter_mut().enumerate() {
        *q = big_l[j] | (big_l[j + QK / 2] << 4);
    }
    qs
}

/// One legacy row: `sigma2` over the whole row, then each 32-element block.
fn legacy_row(ty: GgmlType, x: &[f32], qw: &[f32], dst: &mut [u8]) {
    let sigma2 = sum_sq(x) / x.len() as f32;
    let bs = ty.type_size();
    for ((xb, wb), out) in x
        .chunks_exact(QK)
        .zip(qw.chunks_exact(QK))
        .zip(dst.chunks_exact_mut(bs))
    {
        let mut weight = [0f32; QK];
        sigma_weights(xb, wb, sigma2, &mut weight);
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 => {
                let nmax = if ty == GgmlType::Q4_0 { 8 } else { 16 };
                let mut l = [0i8; QK];
                let d = make_qx_quants_weighted(nmax, xb, &weight, &mut l);
                let l = l.map(|v| v as u8);
                if ty == GgmlType::Q4_0 {
                    let b = BlockQ4_0 {
                        d: to_f16(d),
                        qs: pack4(&l),
                    };
                    out.copy_from_slice(&b.to_bytes());
                } else {
                    let (qh, qs) = pack5(&l);
                    let b = BlockQ5_0 {
                        d: to_f16(d),
                        qh,
                        qs,
                    };
                    out.copy_from_slice(&b.to_bytes());
                }
            }
            _ => {
                let nmax = if ty == GgmlType::Q4_1 { 15 } else { 31 };
                let mut l = [0u8; QK];
                let (d, the_min) = make_qkx3_quants(nmax, xb, &weight, &mut l);
                if ty == GgmlType::Q4_1 {
                    let b = BlockQ4_1 {
                        d: to_f16(d),
                        m: to_f16(-the_min),
                        qs: pack4(&l),
                    };
                    out.copy_from_slice(&b.to_bytes());
                } else {
                    let (qh, qs) = pack5(&l);
                    let b = BlockQ5_1 {
                        d: to_f16(d),
                        m: to_f16(-the_min),
                        qh,
                        qs,
                    };
                    out.copy_from_slice(&b.to_bytes());
                }
            }
        }
    }
}

/// `quantize_row_q2_K_impl` for one super-block.
fn q2_k_block(x: &[f32; QK_K], qw: &[f32]) -> [u8; BlockQ2K::BYTES] {
    let sigma2 = sum_sq(x) / QK_K as f32;
    let mut big_l = [0u8; QK_K];
    let mut scales = [0f32; 16];
    let mut mins = [0f32; 16];
    let mut sw = [0f32; 16];
    for (j, ((xs, ws), ls)) in x
        .chunks_exact(16)
        .zip(qw.chunks_exact(16))
        .zip(big_l.chunks_exact_mut(16))
        .enumerate()
    {
        let mut weight = [0f32; 16];
        sigma_weights(xs, ws, sigma2, &mut weight);
        sw[j] = sum(&weight);
        let (s, m) = make_qkx3_quants(3, xs, &weight, ls);
        scales[j] = s;
        mins[j] = m;
    }
    let mut ls = [0u8; 16];
    let mut lm = [0u8; 16];
    let dm = make_qp_quants(15, &scales, &mut ls, &sw);
    let mm = make_qp_quants(15, &mins, &mut lm, &sw);
    let d = to_f16(dm);
    let dmin = to_f16(mm);
    let mut sc = [0u8; 16];
    let mut dj = [0f32; 16];
    let mut dmj = [0f32; 16];
    for j in 0..16 {
        sc[j] = ls[j] | (lm[j] << 4);
        dj[j] = d.to_f32() * (sc[j] & 0xF) as f32;
        dmj[j] = dmin.to_f32() * (sc[j] >> 4) as f32;
    }
    let r = Requant {
        sub: 16,
        dj,
        dm: Some(dmj),
        lo: 0,
        hi: 3,
        off: 0,
    };
    requant_ref(&r, x, &mut big_l);
    pack_q2_k(sc, d, dmin, &big_l).to_bytes()
}

/// `quantize_row_q3_K_impl` for one super-block.
fn q3_k_block(x: &[f32; QK_K], qw: &[f32]) -> [u8; BlockQ3K::BYTES] {
    let sigma2 = 2.0 * sum_sq(x) / QK_K as f32;
    let mut big_l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let mut sw = [0f32; 16];
    for (j, ((xs, ws), ls)) in x
        .chunks_exact(16)
        .zip(qw.chunks_exact(16))
        .zip(big_l.chunks_exact_mut(16))
        .enumerate()
    {
        let mut weight = [0f32; 16];
        sigma_weights(xs, ws, sigma2, &mut weight);
        sw[j] = sum(&weight);
        scales[j] = make_qx_quants_weighted(4, xs, &weight, ls);
    }
    let mut lsc = [0i8; 16];
    let d_block = make_qx_quants_weighted(32, &scales, &sw, &mut lsc);
    let mut sc = [0u8; 12];
    for (j, &l) in lsc.iter().enumerate() {
        let l = i32::from(l);
        if j < 8 {
            sc[j] = (l & 0xF) as u8;
        } else {
            sc[j - 8] |= ((l & 0xF) << 4) as u8;
        }
        sc[j % 4 + 8] |= ((l >> 4) << (2 * (j / 4))) as u8;
    }
    let d = to_f16(d_block);
    let mut dj = [0f32; 16];
    for (j, a) in dj.iter_mut().enumerate() {
        let lo = if j < 8 { sc[j] & 0xF } else { sc[j - 8] >> 4 };
        let hi = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
        let s = i32::from(lo | (hi << 4)) - 32;
        *a = d.to_f32() * s as f32;
    }
    let r = Requant {
        sub: 16,
        dj,
        dm: None,
        lo: -4,
        hi: 3,
        off: 4,
    };
    let mut big_l = big_l.map(|v| v as u8);
    requant_ref(&r, x, &mut big_l);
    pack_q3_k(sc, d, &big_l).to_bytes()
}

/// `quantize_row_q4_K_impl` / `quantize_row_q5_K_impl` for one super-block: `(d, dmin, scales, L)`.
fn k4_k5_block(x: &[f32; QK_K], qw: &[f32], nmax: i32) -> (f16, f16, [u8; 12], [u8; QK_K]) {
    let sigma2 = 2.0 * sum_sq(x) / QK_K as f32;
    let mut big_l = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut sw = [0f32; 8];
    for (j, ((xs, ws), ls)) in x
        .chunks_exact(32)
        .zip(qw.chunks_exact(32))
        .zip(big_l.chunks_exact_mut(32))
        .enumerate()
    {
        let mut weight = [0f32; 32];
        sigma_weights(xs, ws, sigma2, &mut weight);
        sw[j] = sum(&weight);
        let (s, m) = make_qkx3_quants(nmax, xs, &weight, ls);
        scales[j] = s;
        mins[j] = m;
    }
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    let d_block = make_qp_quants(63, &scales, &mut ls, &sw);
    let m_block = make_qp_quants(63, &mins, &mut lm, &sw);
    let mut sc = [0u8; 12];
    for j in 0..8 {
        let (mut a, mut b) = (ls[j], lm[j]);
        if nmax == 31 {
            // Q5_K clamps the 6-bit scales; Q4_K stores them as they are
            a = a.min(63);
            b = b.min(63);
        }
        if j < 4 {
            sc[j] = a;
            sc[j + 4] = b;
        } else {
            sc[j + 4] = (a & 0xF) | ((b & 0xF) << 4);
            sc[j - 4] |= (a >> 4) << 6;
            sc[j] |= (b >> 4) << 6;
        }
    }
    let d = to_f16(d_block);
    let dmin = to_f16(m_block);
    let mut dj = [0f32; 16];
    let mut dmj = [0f32; 16];
    for j in 0..8 {
        let (s, m) = get_scale_min_k4(j, &sc);
        dj[j] = d.to_f32() * s as f32;
        dmj[j] = dmin.to_f32() * m as f32;
    }
    let r = Requant {
        sub: 32,
        dj,
        dm: Some(dmj),
        lo: 0,
        hi: nmax,
        off: 0,
    };
    requant_ref(&r, x, &mut big_l);
    (d, dmin, sc, big_l)
}

/// `quantize_row_q6_K_impl` for one super-block (the weights are the imatrix values as they are).
fn q6_k_block(x: &[f32; QK_K], qw: &[f32]) -> [u8; BlockQ6K::BYTES] {
    let mut big_l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    for (j, ((xs, ws), ls)) in x
        .chunks_exact(16)
        .zip(qw.chunks_exact(16))
        .zip(big_l.chunks_exact_mut(16))
        .enumerate()
    {
        scales[j] = make_qx_quants_weighted(32, xs, ws, ls);
    }
    finish_q6_k(x, &scales, &mut big_l.map(|v| v as u8)).to_bytes()
}

fn k_row<const B: usize>(
    x: &[f32],
    qw: &[f32],
    dst: &mut [u8],
    f: impl Fn(&[f32; QK_K], &[f32]) -> [u8; B],
) {
    for ((xb, wb), out) in x
        .chunks_exact(QK_K)
        .zip(qw.chunks_exact(QK_K))
        .zip(dst.chunks_exact_mut(B))
    {
        if let Ok(xb) = <&[f32; QK_K]>::try_from(xb) {
            out.copy_from_slice(&f(xb, wb));
        }
    }
}

/// Quantizes ONE row `src` of `ty` with importance weights `weights` (one per column, the
/// imatrix values llama-quantize passes as `quant_weights`), as ggml's `quantize_*(src, dst, 1,
/// n_per_row, weights)`.
///
/// A row is the unit here: the legacy types scale their weights by the mean square of the whole
/// row, so quantizing a matrix in one call would differ (use [`crate::quantize_rows_weighted`]).
/// `weights.len()` must equal `src.len()`, which must be a multiple of `ty.block_size()`, and
/// `dst.len()` the row's byte size. Types without a weighted path ignore `weights`.
pub fn quantize_row_weighted(
    ty: GgmlType,
    src: &[f32],
    weights: &[f32],
    dst: &mut [u8],
) -> Result<(), QuantError> {
    let expected = bytes_for(ty, src.len())?;
    check_len(ty, "destination", expected, dst.len())?;
    if weights.len() != src.len() {
        return Err(QuantError::ElementCount {
            what: "importance weights",
            expected: src.len(),
            actual: weights.len(),
        });
    }
    if src.is_empty() {
        return Ok(());
    }
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
            legacy_row(ty, src, weights, dst)
        }
        GgmlType::Q2K => k_row(src, weights, dst, q2_k_block),
        GgmlType::Q3K => k_row(src, weights, dst, q3_k_block),
        GgmlType::Q4K => k_row(src, weights, dst, |x, w| {
            let (d, dmin, sc, l) = k4_k5_block(x, w, 15);
            pack_q4_k(d, dmin, sc, &l).to_bytes()
        }),
        GgmlType::Q5K => k_row(src, weights, dst, |x, w| {
            let (d, dmin, sc, l) = k4_k5_block(x, w, 31);
            pack_q5_k(d, dmin, sc, &l).to_bytes()
        }),
        GgmlType::Q6K => k_row(src, weights, dst, q6_k_block),
        _ => return quantize_row_ref(ty, src, dst),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::{Digest, Sha256};

    /// The LCG of the vector generator: `(s >> 8) / 2^24 - 0.5`, exact in f32.
    fn lcg(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / 16_777_216.0 - 0.5
            })
            .collect()
    }

    const ROWS: usize = 8;
    const N: usize = 512;

    fn inputs() -> (Vec<f32>, Vec<f32>) {
        let mut x = lcg(ROWS * N, 1);
        for (r, row) in x.chunks_mut(N).enumerate() {
            let s = 2f32.powi(r as i32 - 3);
            row.iter_mut().for_each(|v| *v *= s);
        }
        x[5 * N..5 * N + 32].fill(0.0);
        x[6 * N + 100] = 40.0;
        x[7 * N + 256..7 * N + 272].fill(-0.25);
        let mut w: Vec<f32> = lcg(N, 7).iter().map(|u| u * u * 8.0).collect();
        w[32..48].fill(0.0);
        w[300] = 1000.0;
        (x, w)
    }

    /// SHA-256 of `ggml_quantize_chunk(type, x, dst, 0, 8, 512, w)` from the oracle build's
    /// x86-64 `libggml-base.so` (llama.cpp 0.3.36), called through Python ctypes on the inputs of
    /// [`inputs`] (same LCG in numpy float32).
    const ORACLE: [(GgmlType, &str); 10] = [
        (
            GgmlType::Q4_0,
            "642fdeeaa5eea647e19180c02d1a3b2f192249b9810954a395596cb999429724",
        ),
        (
            GgmlType::Q4_1,
            "abf09dc52f754bc0af7b9680d6e5855cafd393a863b6c031def21c350005ae23",
        ),
        (
            GgmlType::Q5_0,
            "14198f5db69335539b0a51b3ddf1f383c9913d4c62b8bae4b37943f798f997ca",
        ),
        (
            GgmlType::Q5_1,
            "66ace4a9d156c396dacc350f344393448f6cb1863f693268d51cefc93e7c1e68",
        ),
        (
            GgmlType::Q8_0,
            "0f8a691005fb9e211d1473e2080048fde150287a4fc0b79789927647510c52a2",
        ),
        (
            GgmlType::Q2K,
            "142bf12f308b8ef4521e30b567d0ca42711a90885f12788c12c6fcfcd14d9ac4",
        ),
        (
            GgmlType::Q3K,
            "900eddb3024665404150883dcf1ced2fffdbbf07d2706b71710f380cba3dd385",
        ),
        (
            GgmlType::Q4K,
            "fee5b756aef80f0766fa15e2c55b59585fdb3bd4b8366c7c46d4f1769f0fbbb1",
        ),
        (
            GgmlType::Q5K,
            "3e292823b9348fe7bca0f3a01d05afb893b33763396629ef788343426ef584b2",
        ),
        (
            GgmlType::Q6K,
            "d13e41be23b8d2af52ae53c1c8a44d3b415007abc59803782acd362d82503d2c",
        ),
    ];

    #[test]
    fn matches_ggml_quantize_chunk_with_imatrix() {
        let (x, w) = inputs();
        for (ty, want) in ORACLE {
            let rb = bytes_for(ty, N).unwrap();
            let mut out = vec![0u8; rb * ROWS];
            for (s, d) in x.chunks(N).zip(out.chunks_mut(rb)) {
                quantize_row_weighted(ty, s, &w, d).unwrap();
            }
            let got: String = Sha256::digest(&out)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(got, want, "{ty}");
        }
    }

    #[test]
    fn unweighted_types_equal_reference() {
        let (x, w) = inputs();
        for ty in [GgmlType::F16, GgmlType::Q8_0, GgmlType::F32, GgmlType::BF16] {
            let rb = bytes_for(ty, N).unwrap();
            let mut a = vec![0u8; rb];
            let mut b = vec![0u8; rb];
            quantize_row_weighted(ty, &x[..N], &w, &mut a).unwrap();
            quantize_row_ref(ty, &x[..N], &mut b).unwrap();
            assert_eq!(a, b, "{ty}");
            assert!(!uses_weights(ty));
        }
    }

    #[test]
    fn length_errors() {
        let x = vec![0.5f32; 256];
        let mut out = vec![0u8; 144];
        assert!(matches!(
            quantize_row_weighted(GgmlType::Q4K, &x, &x[..255], &mut out),
            Err(QuantError::ElementCount { actual: 255, .. })
        ));
        assert!(matches!(
            quantize_row_weighted(GgmlType::Q4K, &x, &x, &mut out[..10]),
            Err(QuantError::ByteLength { .. })
        ));
        assert!(matches!(
            quantize_row_weighted(GgmlType::Q4K, &x[..100], &x[..100], &mut out),
            Err(QuantError::NotBlockMultiple { .. })
        ));
        assert!(quantize_row_weighted(GgmlType::Q4K, &[], &[], &mut []).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any input, finite or not, any weights: no panic, and the bytes round-trip through the
        /// dequantizer without a length error.
        #[test]
        fn never_panics(
            x in proptest::collection::vec(prop_oneof![
                -1e4f32..1e4f32, Just(0.0f32), Just(f32::NAN), Just(f32::INFINITY)], 256),
            w in proptest::collection::vec(prop_oneof![0f32..1e6f32, Just(0.0f32)], 256),
        ) {
            for ty in GgmlType::ALL {
                let mut out = vec![0u8; bytes_for(ty, 256).unwrap()];
                quantize_row_weighted(ty, &x, &w, &mut out).unwrap();
                let mut y = vec![0f32; 256];
                super::super::dequantize_row(ty, &out, &mut y).unwrap();
            }
        }
    }
}
