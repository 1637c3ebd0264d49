//! K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and Q8_K: ggml's `quantize_row_*_ref` (no imatrix) and
//! `dequantize_row_*`, one 256-element super-block at a time (spec §3.6–3.11).
//!
//! Rounding is [`super::nearest_int`] (ties to even). The search helpers keep ggml's quirks: stale L
//! values for sub-blocks whose rounded scale is 0, and `make_qkx2` reusing the updated min in later
//! grid steps. Integer narrowing (`as u8` / `as i8`) mirrors C's modular conversions.

use half::f16;

use super::float::f32_to_f16_bits;
use super::nearest_int;
use crate::blocks::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K, QK_K};

/// ggml's GROUP_MAX_EPS.
pub(crate) const GROUP_MAX_EPS: f32 = 1e-15;

fn to_f16(v: f32) -> f16 {
    f16::from_bits(f32_to_f16_bits(v))
}

/// First element of maximal |x| (strict `>`), keeping its sign; returns (signed, abs).
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    (max, amax)
}

/// `make_qx_quants(n, nmax, x, L, rmse_type = 1, qw = NULL)`: weights `x*x`. `l.len() == x.len() <= 32`.
fn make_qx_quants(nmax: i32, x: &[f32], big_l: &mut [i8]) -> f32 {
    let mut w = [0f32; 32];
    let w = &mut w[..x.len().min(32)];
    for (o, &v) in w.iter_mut().zip(x) {
        *o = v * v;
    }
    make_qx_quants_weighted(nmax, x, w, big_l)
}

/// `make_qx_quants(n, nmax, x, L, rmse_type = 1, qw)` with explicit weights `qw`; L in `0..2*nmax`.
/// (Without an importance matrix ggml uses `qw = x*x`: [`make_qx_quants`].)
pub(super) fn make_qx_quants_weighted(nmax: i32, x: &[f32], qw: &[f32], big_l: &mut [i8]) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        big_l.fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let quant = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let mut sumlx = 0f32;
        let mut suml2 = 0f32;
        for (&v, &w) in x.iter().zip(qw) {
            let l = quant(iscale, v) as f32;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let fill = |iscale: f32, big_l: &mut [i8]| {
        for (q, &v) in big_l.iter_mut().zip(x) {
            *q = (nmax + quant(iscale, v)) as i8;
        }
    };
    let iscale = -nmaxf / max;
    fill(iscale, big_l);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmaxf + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            fill(iscale, big_l);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `make_q3_quants(n, nmax, x, L, do_rmse = true)`: weights `x*x`, iterative refinement.
fn make_q3_quants(nmax: i32, x: &[f32], big_l: &mut [i8]) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        big_l.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let mut sumlx = 0f32;
    let mut suml2 = 0f32;
    for (q, &v) in big_l.iter_mut().zip(x) {
        let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *q = l as i8;
        let w = v * v;
        sumlx += w * v * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for (q, &v) in big_l.iter_mut().zip(x) {
            let w = v * v;
            let li = *q as f32;
            let mut slx = sumlx - w * v * li;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * li * li;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != i32::from(*q) {
                    let nl = new_l as f32;
                    slx += w * v * nl;
                    sl2 += w * nl * nl;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *q = new_l as i8;
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
    for q in big_l.iter_mut() {
        *q = (i32::from(*q) + nmax) as i8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Parameters of one `make_qkx2_quants` call.
pub(crate) struct Qkx2 {
    pub(crate) nmax: i32,
    pub(crate) rmin: f32,
    pub(crate) rdelta: f32,
    pub(crate) nstep: i32,
    pub(crate) use_mad: bool,
}

/// `make_qkx2_quants`: asymmetric grid search; returns `(scale, the_min)` with `the_min = -min >= 0`.
/// `x`, `w`, `big_l` have equal length `<= 32`.
fn make_qkx2_quants(p: &Qkx2, x: &[f32], w: &[f32], big_l: &mut [u8]) -> (f32, f32) {
    let (Some(&x0), Some(&w0)) = (x.first(), w.first()) else {
        return (0.0, 0.0);
    };
    let nmaxf = p.nmax as f32;
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
    if max == min {
        big_l.fill(0);
        return (0.0, -min);
    }
    let err = |d: f32| if p.use_mad { d.abs() } else { d * d };
    let iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for ((q, &v), &wi) in big_l.iter_mut().zip(x).zip(w) {
        let l = nearest_int(iscale * (v - min));
        *q = l.clamp(0, p.nmax) as u8;
        let diff = scale * *q as f32 + min - v;
        best_error += wi * err(diff);
    }
    if p.nstep < 1 {
        return (scale, -min);
    }
    let mut laux = [0u8; 32];
    let laux = &mut laux[..x.len()];
    for is in 0..=p.nstep {
        let iscale = (p.rmin + p.rdelta * is as f32 + nmaxf) / (max - min);
        let mut sum_l = 0f32;
        let mut sum_l2 = 0f32;
        let mut sum_xl = 0f32;
        for ((q, &v), &wi) in laux.iter_mut().zip(x).zip(w) {
            let l = nearest_int(iscale * (v - min)).clamp(0, p.nmax);
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
            let mut cur_error = 0f32;
            for ((&q, &v), &wi) in laux.iter().zip(x).zip(w) {
                let diff = this_scale * q as f32 + this_min - v;
                cur_error += wi * err(diff);
            }
            if cur_error < best_error {
                big_l.copy_from_slice(laux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Packs 2-bit values: byte `32h+l` holds elements `128h+l+32k` in bits `2k..2k+2`.
fn pack2(big_l: &[u8; QK_K], qs: &mut [u8; QK_K / 4]) {
    for (lq, out) in big_l.chunks_exact(128).zip(qs.chunks_exact_mut(32)) {
        for (l, o) in out.iter_mut().enumerate() {
            *o = lq[l] | (lq[l + 32] << 2) | (lq[l + 64] << 4) | (lq[l + 96] << 6);
        }
    }
}

/// 2-bit value of element `e` from pack2 layout.
fn unpack2(qs: &[u8; QK_K / 4], e: usize) -> u8 {
    (qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3
}

/// Q2_K reference quantizer (`quantize_row_q2_K_ref`).
pub fn quantize_q2_k(x: &[f32; QK_K]) -> BlockQ2K {
    let mut big_l = [0u8; QK_K];
    let mut scales = [0f32; QK_K / 16];
    let mut mins = [0f32; QK_K / 16];
    for (j, (xs, ls)) in x
        .chunks_exact(16)
        .zip(big_l.chunks_exact_mut(16))
        .enumerate()
    {
        let mut w = [0f32; 16];
        for (wi, &v) in w.iter_mut().zip(xs) {
            *wi = v.abs();
        }
        let (s, m) = make_qkx2_quants(&Q2K_PARAMS, xs, &w, ls);
        scales[j] = s;
        mins[j] = m;
    }
    finish_q2_k(x, &scales, &mins, &mut big_l)
}

/// `make_qkx2_quants` parameters of Q2_K (weights `|x|`, 16 elements).
pub(crate) const Q2K_PARAMS: Qkx2 = Qkx2 {
    nmax: 3,
    rmin: -0.5,
    rdelta: 0.1,
    nstep: 15,
    use_mad: true,
};

/// What the requantization pass of a K-quant super-block needs: for every sub-block `j` (of `sub`
/// elements) with `dj[j] != 0`, `L = clamp(nearest_int((x + dm[j]) / dj[j]), lo, hi) + off`
/// (`x / dj[j]` when there are no mins); other sub-blocks keep the search's L.
pub(crate) struct Requant {
    pub(crate) sub: usize,
    pub(crate) dj: [f32; 16],
    pub(crate) dm: Option<[f32; 16]>,
    pub(crate) lo: i32,
    pub(crate) hi: i32,
    pub(crate) off: i32,
}

/// The scalar requantization pass (see [`Requant`]).
pub(crate) fn requant_ref(r: &Requant, x: &[f32; QK_K], big_l: &mut [u8; QK_K]) {
    for (j, (xs, ls)) in x
        .chunks_exact(r.sub)
        .zip(big_l.chunks_exact_mut(r.sub))
        .enumerate()
    {
        let dj = r.dj[j];
        if dj == 0.0 {
            continue;
        }
        match r.dm {
            Some(dm) => {
                let m = dm[j];
                for (q, &v) in ls.iter_mut().zip(xs) {
                    *q = (nearest_int((v + m) / dj).clamp(r.lo, r.hi) + r.off) as u8;
                }
            }
            None => {
                for (q, &v) in ls.iter_mut().zip(xs) {
                    *q = (nearest_int(v / dj).clamp(r.lo, r.hi) + r.off) as u8;
                }
            }
        }
    }
}

/// Second half of `quantize_row_q2_K_ref`, after the per-sub-block search: scale quantization,
/// requantization and packing. `big_l` holds the search's L (kept where a scale rounds to 0).
pub(crate) fn finish_q2_k(
    x: &[f32; QK_K],
    scales: &[f32; QK_K / 16],
    mins: &[f32; QK_K / 16],
    big_l: &mut [u8; QK_K],
) -> BlockQ2K {
    let (sc, d, dmin, r) = prepare_q2_k(scales, mins);
    requant_ref(&r, x, big_l);
    pack_q2_k(sc, d, dmin, big_l)
}

/// Q2_K scale quantization: `(scales, d, dmin, requant)`.
pub(crate) fn prepare_q2_k(
    scales: &[f32; QK_K / 16],
    mins: &[f32; QK_K / 16],
) -> ([u8; QK_K / 16], f16, f16, Requant) {
    let mut max_scale = 0f32;
    let mut max_min = 0f32;
    for (&s, &m) in scales.iter().zip(mins) {
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let mut sc = [0u8; QK_K / 16];
    let d = if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for (b, &s) in sc.iter_mut().zip(scales) {
            *b = nearest_int(iscale * s) as u8;
        }
        to_f16(max_scale / 15.0)
    } else {
        to_f16(0.0)
    };
    let dmin = if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for (b, &m) in sc.iter_mut().zip(mins) {
            *b |= (nearest_int(iscale * m) << 4) as u8;
        }
        to_f16(max_min / 15.0)
    } else {
        to_f16(0.0)
    };
    let mut dj = [0f32; 16];
    let mut dm = [0f32; 16];
    for ((a, b), &s) in dj.iter_mut().zip(dm.iter_mut()).zip(&sc) {
        *a = d.to_f32() * (s & 0xF) as f32;
        *b = dmin.to_f32() * (s >> 4) as f32;
    }
    let r = Requant {
        sub: 16,
        dj,
        dm: Some(dm),
        lo: 0,
        hi: 3,
        off: 0,
    };
    (sc, d, dmin, r)
}

/// Packs a finished Q2_K super-block (L in 0..=3).
pub(crate) fn pack_q2_k(sc: [u8; QK_K / 16], d: f16, dmin: f16, big_l: &[u8; QK_K]) -> BlockQ2K {
    let mut qs = [0u8; QK_K / 4];
    pack2(big_l, &mut qs);
    BlockQ2K {
        scales: sc,
        qs,
        d,
        dmin,
    }
}

/// Q2_K dequantizer: `y = (d*sc)*q - dmin*m`.
pub fn dequantize_q2_k(b: &BlockQ2K, y: &mut [f32; QK_K]) {
    let d = b.d.to_f32();
    let min = b.dmin.to_f32();
    for (e, o) in y.iter_mut().enumerate() {
        let sc = b.scales[e / 16];
        let dl = d * (sc & 0xF) as f32;
        let ml = min * (sc >> 4) as f32;
        *o = dl * unpack2(&b.qs, e) as f32 - ml;
    }
}

/// Decodes the 6-bit Q3_K scale `j` (0..=63, offset 32 not removed).
fn q3k_scale(scales: &[u8; 12], j: usize) -> i32 {
    let lo = if j < 8 {
        scales[j] & 0xF
    } else {
        scales[j - 8] >> 4
    };
    let hi = (scales[8 + j % 4] >> (2 * (j / 4))) & 3;
    i32::from(lo | (hi << 4))
}

/// Q3_K reference quantizer (`quantize_row_q3_K_ref`).
pub fn quantize_q3_k(x: &[f32; QK_K]) -> BlockQ3K {
    let mut big_l = [0i8; QK_K];
    let mut scales = [0f32; QK_K / 16];
    for (j, (xs, ls)) in x
        .chunks_exact(16)
        .zip(big_l.chunks_exact_mut(16))
        .enumerate()
    {
        scales[j] = make_q3_quants(4, xs, ls);
    }
    finish_q3_k(x, &scales, &mut big_l.map(|v| v as u8))
}

/// Second half of `quantize_row_q3_K_ref` after the `make_q3_quants` search (L in 0..=7).
pub(crate) fn finish_q3_k(
    x: &[f32; QK_K],
    scales: &[f32; QK_K / 16],
    big_l: &mut [u8; QK_K],
) -> BlockQ3K {
    let (sc, d, r) = prepare_q3_k(scales);
    requant_ref(&r, x, big_l);
    pack_q3_k(sc, d, big_l)
}

/// Q3_K scale quantization: `(scales, d, requant)`.
pub(crate) fn prepare_q3_k(scales: &[f32; QK_K / 16]) -> ([u8; 12], f16, Requant) {
    let mut max_scale = 0f32;
    let mut amax = 0f32;
    for &s in scales {
        if s.abs() > amax {
            amax = s.abs();
            max_scale = s;
        }
    }
    let mut sc = [0u8; 12];
    let d = if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for (j, &s) in scales.iter().enumerate() {
            let l = nearest_int(iscale * s) as i8;
            let l = (i32::from(l).clamp(-32, 31) + 32) as u8;
            if j < 8 {
                sc[j] = l & 0xF;
            } else {
                sc[j - 8] |= (l & 0xF) << 4;
            }
            sc[j % 4 + 8] |= (l >> 4) << (2 * (j / 4));
        }
        to_f16(1.0 / iscale)
    } else {
        to_f16(0.0)
    };
    let mut dj = [0f32; 16];
    for (j, a) in dj.iter_mut().enumerate() {
        let sj = q3k_scale(&sc, j) - 32;
        *a = d.to_f32() * sj as f32;
    }
    let r = Requant {
        sub: 16,
        dj,
        dm: None,
        lo: -4,
        hi: 3,
        off: 4,
    };
    (sc, d, r)
}

/// Packs a finished Q3_K super-block (L in 0..=7): bit 2 into `hmask`, bits 0..2 into `qs`.
pub(crate) fn pack_q3_k(sc: [u8; 12], d: f16, big_l: &[u8; QK_K]) -> BlockQ3K {
    let mut hmask = [0u8; QK_K / 8];
    let mut low = [0u8; QK_K];
    // element e = 32h + m: bit h of hmask[m]
    for (h, (ls, lows)) in big_l
        .chunks_exact(32)
        .zip(low.chunks_exact_mut(32))
        .enumerate()
    {
        for ((hm, lo), &l) in hmask.iter_mut().zip(lows).zip(ls) {
            let high = u8::from(l > 3);
            *hm |= high << h;
            *lo = l - 4 * high;
        }
    }
    let mut qs = [0u8; QK_K / 4];
    pack2(&low, &mut qs);
    BlockQ3K {
        hmask,
        qs,
        scales: sc,
        d,
    }
}

/// Q3_K dequantizer: `y = (d*(s-32)) * (q2 - (hbit ? 0 : 4))`.
pub fn dequantize_q3_k(b: &BlockQ3K, y: &mut [f32; QK_K]) {
    let d = b.d.to_f32();
    for (e, o) in y.iter_mut().enumerate() {
        let dl = d * (q3k_scale(&b.scales, e / 16) - 32) as f32;
        let hbit = b.hmask[e % 32] & (1 << (e / 32)) != 0;
        let q = i32::from(unpack2(&b.qs, e)) - if hbit { 0 } else { 4 };
        *o = dl * q as f32;
    }
}

/// Packs 8 six-bit scales and mins into 12 bytes (Q4_K / Q5_K).
fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut sc = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            sc[j] = ls[j];
            sc[j + 4] = lm[j];
        } else {
            sc[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            sc[j - 4] |= (ls[j] >> 4) << 6;
            sc[j] |= (lm[j] >> 4) << 6;
        }
    }
    sc
}

/// `get_scale_min_k4`: the 6-bit (scale, min) of sub-block `j` (0..8).
pub fn get_scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Shared part of Q4_K and Q5_K: returns (d, dmin, scales, L) with L in `0..=nmax`.
fn quantize_k4_k5(x: &[f32; QK_K], p: &Qkx2) -> (f16, f16, [u8; 12], [u8; QK_K]) {
    let mut big_l = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for (j, (xs, ls)) in x
        .chunks_exact(32)
        .zip(big_l.chunks_exact_mut(32))
        .enumerate()
    {
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut w = [0f32; 32];
        for (wi, &v) in w.iter_mut().zip(xs) {
            *wi = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(p, xs, &w, ls);
        scales[j] = s;
        mins[j] = m;
    }
    finish_k4_k5(x, &scales, &mins, big_l, p.nmax)
}

/// Second half of the Q4_K / Q5_K quantizers after the per-sub-block search.
pub(crate) fn finish_k4_k5(
    x: &[f32; QK_K],
    scales: &[f32; 8],
    mins: &[f32; 8],
    mut big_l: [u8; QK_K],
    nmax: i32,
) -> (f16, f16, [u8; 12], [u8; QK_K]) {
    let (sc, d, dmin, r) = prepare_k4_k5(scales, mins, nmax);
    requant_ref(&r, x, &mut big_l);
    (d, dmin, sc, big_l)
}

/// Q4_K / Q5_K scale quantization: `(scales, d, dmin, requant)`.
pub(crate) fn prepare_k4_k5(
    scales: &[f32; 8],
    mins: &[f32; 8],
    nmax: i32,
) -> ([u8; 12], f16, f16, Requant) {
    let mut max_scale = 0f32;
    let mut max_min = 0f32;
    for (&s, &m) in scales.iter().zip(mins) {
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    let sc = pack_scale_min_k4(&ls, &lm);
    let d = to_f16(max_scale / 63.0);
    let dmin = to_f16(max_min / 63.0);
    let mut dj = [0f32; 16];
    let mut dm = [0f32; 16];
    for (j, (a, b)) in dj.iter_mut().zip(dm.iter_mut()).take(8).enumerate() {
        let (s, m) = get_scale_min_k4(j, &sc);
        *a = d.to_f32() * s as f32;
        *b = dmin.to_f32() * m as f32;
    }
    let r = Requant {
        sub: 32,
        dj,
        dm: Some(dm),
        lo: 0,
        hi: nmax,
        off: 0,
    };
    (sc, d, dmin, r)
}

/// Q4_K reference quantizer (`quantize_row_q4_K_ref`).
pub fn quantize_q4_k(x: &[f32; QK_K]) -> BlockQ4K {
    let (d, dmin, scales, big_l) = quantize_k4_k5(x, &Q4K_PARAMS);
    pack_q4_k(d, dmin, scales, &big_l)
}

/// `make_qkx2_quants` parameters of Q4_K.
pub(crate) const Q4K_PARAMS: Qkx2 = Qkx2 {
    nmax: 15,
    rmin: -1.0,
    rdelta: 0.1,
    nstep: 20,
    use_mad: false,
};

/// `make_qkx2_quants` parameters of Q5_K.
pub(crate) const Q5K_PARAMS: Qkx2 = Qkx2 {
    nmax: 31,
    rmin: -0.5,
    rdelta: 0.1,
    nstep: 15,
    use_mad: false,
};

/// Packs a finished Q4_K super-block (L in 0..=15).
pub(crate) fn pack_q4_k(d: f16, dmin: f16, scales: [u8; 12], big_l: &[u8; QK_K]) -> BlockQ4K {
    let mut qs = [0u8; QK_K / 2];
    for (lq, out) in big_l.chunks_exact(64).zip(qs.chunks_exact_mut(32)) {
        for (l, o) in out.iter_mut().enumerate() {
            *o = lq[l] | (lq[l + 32] << 4);
        }
    }
    BlockQ4K {
        d,
        dmin,
        scales,
        qs,
    }
}

/// Q4_K dequantizer: `y = (d*sc)*q - dmin*m`.
pub fn dequantize_q4_k(b: &BlockQ4K, y: &mut [f32; QK_K]) {
    let d = b.d.to_f32();
    let min = b.dmin.to_f32();
    for (c, (out, qs)) in y
        .chunks_exact_mut(64)
        .zip(b.qs.chunks_exact(32))
        .enumerate()
    {
        let (s1, m1) = get_scale_min_k4(2 * c, &b.scales);
        let (s2, m2) = get_scale_min_k4(2 * c + 1, &b.scales);
        let (d1, m1) = (d * s1 as f32, min * m1 as f32);
        let (d2, m2) = (d * s2 as f32, min * m2 as f32);
        let (lo, hi) = out.split_at_mut(32);
        for ((&q, a), h) in qs.iter().zip(lo).zip(hi) {
            *a = d1 * (q & 0xF) as f32 - m1;
            *h = d2 * (q >> 4) as f32 - m2;
        }
    }
}

/// Q5_K reference quantizer (`quantize_row_q5_K_ref`).
pub fn quantize_q5_k(x: &[f32; QK_K]) -> BlockQ5K {
    let (d, dmin, scales, big_l) = quantize_k4_k5(x, &Q5K_PARAMS);
    pack_q5_k(d, dmin, scales, &big_l)
}

/// Packs a finished Q5_K super-block (L in 0..=31).
pub(crate) fn pack_q5_k(d: f16, dmin: f16, scales: [u8; 12], big_l: &[u8; QK_K]) -> BlockQ5K {
    let mut qs = [0u8; QK_K / 2];
    let mut qh = [0u8; QK_K / 8];
    for (c, (lq, out)) in big_l
        .chunks_exact(64)
        .zip(qs.chunks_exact_mut(32))
        .enumerate()
    {
        let m1 = 1u8 << (2 * c);
        let m2 = 2u8 << (2 * c);
        for (l, (o, h)) in out.iter_mut().zip(qh.iter_mut()).enumerate() {
            let mut l1 = lq[l];
            if l1 > 15 {
                l1 -= 16;
                *h |= m1;
            }
            let mut l2 = lq[l + 32];
            if l2 > 15 {
                l2 -= 16;
                *h |= m2;
            }
            *o = l1 | (l2 << 4);
        }
    }
    BlockQ5K {
        d,
        dmin,
        scales,
        qh,
        qs,
    }
}

/// Q5_K dequantizer: `y = (d*sc)*(q4 + 16*hbit) - dmin*m`.
pub fn dequantize_q5_k(b: &BlockQ5K, y: &mut [f32; QK_K]) {
    let d = b.d.to_f32();
    let min = b.dmin.to_f32();
    for (c, (out, qs)) in y
        .chunks_exact_mut(64)
        .zip(b.qs.chunks_exact(32))
        .enumerate()
    {
        let (s1, m1) = get_scale_min_k4(2 * c, &b.scales);
        let (s2, m2) = get_scale_min_k4(2 * c + 1, &b.scales);
        let (d1, m1) = (d * s1 as f32, min * m1 as f32);
        let (d2, m2) = (d * s2 as f32, min * m2 as f32);
        let u1 = 1u8 << (2 * c);
        let u2 = 2u8 << (2 * c);
        let (lo, hi) = out.split_at_mut(32);
        for (((&q, &h), a), g) in qs.iter().zip(&b.qh).zip(lo).zip(hi) {
            let q1 = (q & 0xF) + if h & u1 != 0 { 16 } else { 0 };
            let q2 = (q >> 4) + if h & u2 != 0 { 16 } else { 0 };
            *a = d1 * q1 as f32 - m1;
            *g = d2 * q2 as f32 - m2;
        }
    }
}

/// Q6_K reference quantizer (`quantize_row_q6_K_ref`).
pub fn quantize_q6_k(x: &[f32; QK_K]) -> BlockQ6K {
    let mut big_l = [0i8; QK_K];
    let mut scales = [0f32; QK_K / 16];
    for (j, (xs, ls)) in x
        .chunks_exact(16)
        .zip(big_l.chunks_exact_mut(16))
        .enumerate()
    {
        scales[j] = make_qx_quants(32, xs, ls);
    }
    finish_q6_k(x, &scales, &mut big_l.map(|v| v as u8))
}

/// Second half of `quantize_row_q6_K_ref` after the `make_qx_quants` search (L in 0..=63).
pub(crate) fn finish_q6_k(
    x: &[f32; QK_K],
    scales: &[f32; QK_K / 16],
    big_l: &mut [u8; QK_K],
) -> BlockQ6K {
    match prepare_q6_k(scales) {
        None => Q6K_ZERO,
        Some((sc, d, r)) => {
            requant_ref(&r, x, big_l);
            pack_q6_k(sc, d, big_l)
        }
    }
}

/// The Q6_K block of a super-block whose scales are all below `GROUP_MAX_EPS`.
pub(crate) const Q6K_ZERO: BlockQ6K = BlockQ6K {
    ql: [0; QK_K / 2],
    qh: [0; QK_K / 4],
    scales: [0; QK_K / 16],
    d: f16::ZERO,
};

/// Q6_K scale quantization: `(scales, d, requant)`, or `None` for an all-zero block.
pub(crate) fn prepare_q6_k(scales: &[f32; QK_K / 16]) -> Option<([i8; QK_K / 16], f16, Requant)> {
    let mut max_scale = 0f32;
    let mut max_abs_scale = 0f32;
    for &s in scales {
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        return None;
    }
    let iscale = -128.0 / max_scale;
    let d = to_f16(1.0 / iscale);
    let mut sc = [0i8; QK_K / 16];
    for (o, &s) in sc.iter_mut().zip(scales) {
        *o = nearest_int(iscale * s).min(127) as i8;
    }
    let mut dj = [0f32; 16];
    for (a, &s) in dj.iter_mut().zip(&sc) {
        *a = d.to_f32() * s as f32;
    }
    let r = Requant {
        sub: 16,
        dj,
        dm: None,
        lo: -32,
        hi: 31,
        off: 32,
    };
    Some((sc, d, r))
}

/// Packs a finished Q6_K super-block (L in 0..=63).
pub(crate) fn pack_q6_k(sc: [i8; QK_K / 16], d: f16, big_l: &[u8; QK_K]) -> BlockQ6K {
    let mut ql = [0u8; QK_K / 2];
    let mut qh = [0u8; QK_K / 4];
    for ((lq, qlo), qho) in big_l
        .chunks_exact(128)
        .zip(ql.chunks_exact_mut(64))
        .zip(qh.chunks_exact_mut(32))
    {
        for l in 0..32 {
            let [a, b, c, e] = [lq[l], lq[l + 32], lq[l + 64], lq[l + 96]];
            qlo[l] = (a & 0xF) | ((c & 0xF) << 4);
            qlo[l + 32] = (b & 0xF) | ((e & 0xF) << 4);
            qho[l] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
        }
    }
    BlockQ6K {
        ql,
        qh,
        scales: sc,
        d,
    }
}

/// Q6_K dequantizer: `y = (d*sc)*(q - 32)`.
pub fn dequantize_q6_k(b: &BlockQ6K, y: &mut [f32; QK_K]) {
    let d = b.d.to_f32();
    for (e, o) in y.iter_mut().enumerate() {
        let h = e / 128;
        let k = (e % 128) / 32;
        let l = e % 32;
        let qlb = b.ql[64 * h + 32 * (k % 2) + l];
        let low = if k < 2 { qlb & 0xF } else { qlb >> 4 };
        let high = (b.qh[32 * h + l] >> (2 * k)) & 3;
        let q = i32::from(low | (high << 4)) - 32;
        *o = d * b.scales[e / 16] as f32 * q as f32;
    }
}

/// Q8_K reference quantizer (`quantize_row_q8_K_ref`). For an all-zero block ggml leaves `bsums`
/// untouched (whatever was in memory); here they are written as 0.
pub fn quantize_q8_k(x: &[f32; QK_K]) -> BlockQ8K {
    let (max, amax) = signed_absmax(x);
    let mut qs = [0i8; QK_K];
    let mut bsums = [0i16; QK_K / 16];
    if amax == 0.0 {
        return BlockQ8K { d: 0.0, qs, bsums };
    }
    let iscale = -127.0 / max;
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    for (s, qc) in bsums.iter_mut().zip(qs.chunks_exact(16)) {
        let sum: i32 = qc.iter().map(|&q| i32::from(q)).sum();
        *s = sum as i16;
    }
    BlockQ8K {
        d: 1.0 / iscale,
        qs,
        bsums,
    }
}

/// Q8_K dequantizer: `y = d*q`.
pub fn dequantize_q8_k(b: &BlockQ8K, y: &mut [f32; QK_K]) {
    for (o, &q) in y.iter_mut().zip(&b.qs) {
        *o = b.d * q as f32;
    }
}
