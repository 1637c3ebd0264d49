//! Generic lane-parallel kernels: one lane per K-quant sub-block, each lane running the reference
//! search (`make_qkx2_quants`, `make_qx_quants`, `make_q3_quants`) in its exact operation order.
//! Per super-block, the scale quantization and packing are the reference's own code; the
//! element-wise requantization pass is vectorized along the elements.

use super::Simd;
use crate::blocks::QK_K;
use crate::reference::kquants::{
    pack_q2_k, pack_q3_k, pack_q4_k, pack_q5_k, pack_q6_k, prepare_k4_k5, prepare_q2_k,
    prepare_q3_k, prepare_q6_k, Qkx2, Requant, GROUP_MAX_EPS, Q2K_PARAMS, Q4K_PARAMS, Q5K_PARAMS,
    Q6K_ZERO,
};
use crate::types::GgmlType;

/// Element `i` of every lane's sub-block: `cols[i][lane]`.
type Cols = [[f32; 16]; 32];
type ICols = [[i32; 16]; 32];

/// Super-blocks handled per pass (so that 16 lanes of 32-element sub-blocks fill up).
const CHUNK: usize = 2 * QK_K;

/// Copies sub-blocks `first..first + count` (each `sub` long) of `x` into columns; lanes past
/// `count` get zeros (a harmless degenerate sub-block whose results are dropped).
#[inline(always)]
fn transpose(x: &[f32], sub: usize, first: usize, count: usize, xt: &mut Cols) {
    for lane in 0..16 {
        let start = (first + lane) * sub;
        match x.get(start..start + sub).filter(|_| lane < count) {
            Some(src) => {
                for (row, &v) in xt.iter_mut().zip(src) {
                    row[lane] = v;
                }
            }
            None => {
                for row in xt.iter_mut().take(sub) {
                    row[lane] = 0.0;
                }
            }
        }
    }
}

/// Writes lanes `0..count` of columns `lt` back as bytes (C's modular narrowing) of sub-blocks
/// `first..first + count` in `out`.
#[inline(always)]
fn untranspose(lt: &ICols, sub: usize, first: usize, count: usize, out: &mut [u8]) {
    for lane in 0..count {
        let start = (first + lane) * sub;
        if let Some(dst) = out.get_mut(start..start + sub) {
            for (o, row) in dst.iter_mut().zip(lt) {
                *o = row[lane] as u8;
            }
        }
    }
}

/// Copies lanes `0..count` of `v` to `out[first..]`.
#[inline(always)]
fn store_lanes<S: Simd>(s: S, v: S::F, first: usize, count: usize, out: &mut [f32]) {
    let mut a = [0f32; 16];
    s.store(v, &mut a);
    if let Some(dst) = out.get_mut(first..first + count) {
        dst.copy_from_slice(&a[..count]);
    }
}

/// `N` contiguous values of `src` from `off` as a fixed array (zeros if out of range).
#[inline(always)]
fn arr<T: Copy + Default, const N: usize>(src: &[T], off: usize) -> [T; N] {
    let mut a = [T::default(); N];
    if let Some(s) = src.get(off..off + N) {
        a.copy_from_slice(s);
    }
    a
}

/// The error of one element: `|d|` (MAD) or `d*d`.
#[inline(always)]
fn err<S: Simd>(s: S, mad: bool, d: S::F) -> S::F {
    if mad {
        s.abs(d)
    } else {
        s.mul(d, d)
    }
}

/// `make_qkx2_quants` in every lane: returns `(scale, the_min)`, L in `lout` (`n` rows).
#[inline(always)]
fn qkx2<S: Simd>(s: S, p: &Qkx2, n: usize, x: &Cols, w: &Cols, lout: &mut ICols) -> (S::F, S::F) {
    let zero = s.splat(0.0);
    let nmaxf = p.nmax as f32;
    let (lo, hi) = (s.splat_i(0), s.splat_i(p.nmax));
    let x0 = s.load(&x[0]);
    let mut min = x0;
    let mut max = x0;
    let mut sum_w = s.load(&w[0]);
    let mut sum_x = s.mul(sum_w, x0);
    for (xr, wr) in x.iter().zip(w).take(n).skip(1) {
        let v = s.load(xr);
        min = s.sel(s.lt(v, min), v, min);
        max = s.sel(s.gt(v, max), v, max);
        sum_w = s.add(sum_w, s.load(wr));
        sum_x = s.add(sum_x, s.mul(s.load(wr), v));
    }
    min = s.sel(s.gt(min, zero), zero, min);
    let degenerate = s.eq(max, min);
    let min0 = min;
    let iscale = s.div(s.splat(nmaxf), s.sub(max, min));
    let mut scale = s.div(s.splat(1.0), iscale);
    let mut best = zero;
    for ((xr, wr), lr) in x.iter().zip(w).zip(lout.iter_mut()).take(n) {
        let v = s.load(xr);
        let l = s.nearest_int(s.mul(iscale, s.sub(v, min)));
        let l = s.min_i(s.max_i(l, lo), hi);
        s.store_i(l, lr);
        let diff = s.sub(s.add(s.mul(scale, s.to_f(l)), min), v);
        best = s.add(best, s.mul(s.load(wr), err(s, p.use_mad, diff)));
    }
    let mut laux: ICols = [[0; 16]; 32];
    for is in 0..=p.nstep {
        let c = p.rmin + p.rdelta * is as f32 + nmaxf;
        let iscale = s.div(s.splat(c), s.sub(max, min));
        let mut sum_l = zero;
        let mut sum_l2 = zero;
        let mut sum_xl = zero;
        for ((xr, wr), lr) in x.iter().zip(w).zip(laux.iter_mut()).take(n) {
            let v = s.load(xr);
            let l = s.nearest_int(s.mul(iscale, s.sub(v, min)));
            let l = s.min_i(s.max_i(l, lo), hi);
            s.store_i(l, lr);
            let lf = s.to_f(l);
            let wl = s.mul(s.load(wr), lf);
            sum_l = s.add(sum_l, wl);
            sum_l2 = s.add(sum_l2, s.mul(wl, lf));
            sum_xl = s.add(sum_xl, s.mul(wl, v));
        }
        let d = s.sub(s.mul(sum_w, sum_l2), s.mul(sum_l, sum_l));
        let dpos = s.gt(d, zero);
        if !s.any(dpos) {
            continue;
        }
        let mut this_scale = s.div(s.sub(s.mul(sum_w, sum_xl), s.mul(sum_x, sum_l)), d);
        let mut this_min = s.div(s.sub(s.mul(sum_l2, sum_x), s.mul(sum_l, sum_xl)), d);
        let pos = s.gt(this_min, zero);
        this_min = s.sel(pos, zero, this_min);
        this_scale = s.sel(pos, s.div(sum_xl, sum_l2), this_scale);
        let mut cur = zero;
        for ((xr, wr), lr) in x.iter().zip(w).zip(&laux).take(n) {
            let diff = s.sub(
                s.add(s.mul(this_scale, s.to_f(s.load_i(lr))), this_min),
                s.load(xr),
            );
            cur = s.add(cur, s.mul(s.load(wr), err(s, p.use_mad, diff)));
        }
        let upd = s.and(dpos, s.lt(cur, best));
        if s.any(upd) {
            for (lr, ar) in lout.iter_mut().zip(&laux).take(n) {
                s.store_i(s.sel_i(upd, s.load_i(ar), s.load_i(lr)), lr);
            }
            best = s.sel(upd, cur, best);
            scale = s.sel(upd, this_scale, scale);
            min = s.sel(upd, this_min, min);
        }
    }
    if s.any(degenerate) {
        let z = s.splat_i(0);
        for lr in lout.iter_mut().take(n) {
            s.store_i(s.sel_i(degenerate, z, s.load_i(lr)), lr);
        }
    }
    (
        s.sel(degenerate, zero, scale),
        s.neg(s.sel(degenerate, min0, min)),
    )
}

/// First element of maximal |x| per lane (strict `>`): returns (signed max, amax).
#[inline(always)]
fn signed_absmax<S: Simd>(s: S, n: usize, x: &Cols) -> (S::F, S::F) {
    let mut max = s.splat(0.0);
    let mut amax = s.splat(0.0);
    for xr in x.iter().take(n) {
        let v = s.load(xr);
        let ax = s.abs(v);
        let u = s.gt(ax, amax);
        amax = s.sel(u, ax, amax);
        max = s.sel(u, v, max);
    }
    (max, amax)
}

/// `make_qx_quants`' sums for one `iscale`, writing L (offset by nmax) to `lq`.
#[inline(always)]
fn qx_sums<S: Simd>(
    s: S,
    nmax: i32,
    n: usize,
    x: &Cols,
    iscale: S::F,
    lq: &mut ICols,
) -> (S::F, S::F) {
    let (lo, hi, off) = (s.splat_i(-nmax), s.splat_i(nmax - 1), s.splat_i(nmax));
    let mut sumlx = s.splat(0.0);
    let mut suml2 = s.splat(0.0);
    for (xr, lr) in x.iter().zip(lq.iter_mut()).take(n) {
        let v = s.load(xr);
        let l = s.min_i(s.max_i(s.nearest_int(s.mul(iscale, v)), lo), hi);
        s.store_i(s.add_i(l, off), lr);
        let lf = s.to_f(l);
        let w = s.mul(v, v);
        sumlx = s.add(sumlx, s.mul(s.mul(w, v), lf));
        suml2 = s.add(suml2, s.mul(s.mul(w, lf), lf));
    }
    (sumlx, suml2)
}

/// `make_qx_quants(n, nmax, x, L, rmse_type = 1, NULL)` in every lane; L (`nmax + q`) in `lout`.
#[inline(always)]
fn qx<S: Simd>(s: S, nmax: i32, n: usize, x: &Cols, lout: &mut ICols) -> S::F {
    let zero = s.splat(0.0);
    let nmaxf = nmax as f32;
    let (max, amax) = signed_absmax(s, n, x);
    let small = s.lt(amax, s.splat(GROUP_MAX_EPS));
    let (sumlx, suml2) = qx_sums(s, nmax, n, x, s.div(s.splat(-nmaxf), max), lout);
    let mut scale = s.sel(s.ne(suml2, zero), s.div(sumlx, suml2), zero);
    let mut best = s.mul(scale, sumlx);
    let mut laux: ICols = [[0; 16]; 32];
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        let c = -(nmaxf + 0.1 * is as f32);
        let (sumlx, suml2) = qx_sums(s, nmax, n, x, s.div(s.splat(c), max), &mut laux);
        let upd = s.and(
            s.gt(suml2, zero),
            s.gt(s.mul(sumlx, sumlx), s.mul(best, suml2)),
        );
        if s.any(upd) {
            for (lr, ar) in lout.iter_mut().zip(&laux).take(n) {
                s.store_i(s.sel_i(upd, s.load_i(ar), s.load_i(lr)), lr);
            }
            scale = s.sel(upd, s.div(sumlx, suml2), scale);
            best = s.sel(upd, s.mul(scale, sumlx), best);
        }
    }
    if s.any(small) {
        let z = s.splat_i(0);
        for lr in lout.iter_mut().take(n) {
            s.store_i(s.sel_i(small, z, s.load_i(lr)), lr);
        }
    }
    s.sel(small, zero, scale)
}

/// `make_q3_quants(n, nmax, x, L, do_rmse = true)` in every lane; L (`nmax + q`) in `lout`.
#[inline(always)]
fn q3<S: Simd>(s: S, nmax: i32, n: usize, x: &Cols, lout: &mut ICols) -> S::F {
    let zero = s.splat(0.0);
    let (lo, hi) = (s.splat_i(-nmax), s.splat_i(nmax - 1));
    let (max, amax) = signed_absmax(s, n, x);
    let small = s.lt(amax, s.splat(GROUP_MAX_EPS));
    let iscale = s.div(s.splat(-(nmax as f32)), max);
    let mut sumlx = zero;
    let mut suml2 = zero;
    for (xr, lr) in x.iter().zip(lout.iter_mut()).take(n) {
        let v = s.load(xr);
        let l = s.min_i(s.max_i(s.nearest_int(s.mul(iscale, v)), lo), hi);
        s.store_i(l, lr);
        let lf = s.to_f(l);
        let w = s.mul(v, v);
        sumlx = s.add(sumlx, s.mul(s.mul(w, v), lf));
        suml2 = s.add(suml2, s.mul(s.mul(w, lf), lf));
    }
    for _ in 0..5 {
        // A lane with no change in a pass is at a fixed point, so running it again is harmless.
        let mut changed = s.gt(zero, zero);
        for (xr, lr) in x.iter().zip(lout.iter_mut()).take(n) {
            let v = s.load(xr);
            let w = s.mul(v, v);
            let li = s.load_i(lr);
            let lif = s.to_f(li);
            let slx = s.sub(sumlx, s.mul(s.mul(w, v), lif));
            let c1 = s.gt(slx, zero);
            let sl2 = s.sub(suml2, s.mul(s.mul(w, lif), lif));
            let new_l = s.nearest_int(s.div(s.mul(v, sl2), slx));
            let new_l = s.min_i(s.max_i(new_l, lo), hi);
            let c2 = s.and(c1, s.ne_i(new_l, li));
            let nl = s.to_f(new_l);
            let slx2 = s.add(slx, s.mul(s.mul(w, v), nl));
            let sl22 = s.add(sl2, s.mul(s.mul(w, nl), nl));
            let better = s.gt(
                s.mul(s.mul(slx2, slx2), suml2),
                s.mul(s.mul(sumlx, sumlx), sl22),
            );
            let c3 = s.and(s.and(c2, s.gt(sl22, zero)), better);
            s.store_i(s.sel_i(c3, new_l, li), lr);
            sumlx = s.sel(c3, slx2, sumlx);
            suml2 = s.sel(c3, sl22, suml2);
            changed = s.or(changed, c3);
        }
        if !s.any(changed) {
            break;
        }
    }
    let off = s.splat_i(nmax);
    let z = s.splat_i(0);
    for lr in lout.iter_mut().take(n) {
        let l = s.add_i(s.load_i(lr), off);
        s.store_i(s.sel_i(small, z, l), lr);
    }
    let scale = s.sel(s.gt(suml2, zero), s.div(sumlx, suml2), zero);
    s.sel(small, zero, scale)
}

/// The requantization pass (see [`Requant`]), `N` contiguous elements at a time (element-wise, so
/// the order does not matter).
#[inline(always)]
fn requant<S: Simd>(s: S, r: &Requant, x: &[f32; QK_K], l: &mut [u8; QK_K]) {
    let (lo, hi, off) = (s.splat_i(r.lo), s.splat_i(r.hi), s.splat_i(r.off));
    for (j, (xs, ls)) in x
        .chunks_exact(r.sub)
        .zip(l.chunks_exact_mut(r.sub))
        .enumerate()
    {
        let dj = r.dj.get(j).copied().unwrap_or(0.0);
        if dj == 0.0 {
            continue;
        }
        let djv = s.splat(dj);
        let dm = r.dm.map(|dm| s.splat(dm.get(j).copied().unwrap_or(0.0)));
        for (xc, lc) in xs.chunks_exact(S::N).zip(ls.chunks_exact_mut(S::N)) {
            let v = s.load_slice(xc);
            let num = match dm {
                Some(m) => s.add(v, m),
                None => v,
            };
            let q = s.min_i(s.max_i(s.nearest_int(s.div(num, djv)), lo), hi);
            s.store_u8(s.add_i(q, off), lc);
        }
    }
}

/// Which search a K-quant type runs per sub-block.
#[derive(Clone, Copy, PartialEq)]
enum Search {
    /// `make_qkx2_quants` with weights `|x|` (Q2_K).
    Qkx2Abs,
    /// `make_qkx2_quants` with weights `sqrt(mean(x^2)) + |x|` (Q4_K, Q5_K).
    Qkx2Rms,
    /// `make_q3_quants(nmax = 4)` (Q3_K).
    Q3,
    /// `make_qx_quants(nmax = 32)` (Q6_K).
    Qx,
}

/// The per-sub-block search of a K-quant type: which search, its parameters (`make_qkx2_quants`)
/// and the sub-block length.
#[derive(Clone, Copy)]
struct SubSearch<'a> {
    kind: Search,
    p: &'a Qkx2,
    sub: usize,
}

/// Runs the per-sub-block search over all `xc.len() / sub` sub-blocks of `xc`.
#[inline(always)]
fn search<S: Simd>(
    s: S,
    plan: SubSearch<'_>,
    xc: &[f32],
    scales: &mut [f32],
    mins: &mut [f32],
    big_l: &mut [u8],
) {
    let SubSearch { kind, p, sub } = plan;
    let nsub = xc.len() / sub;
    let mut g = 0;
    while g < nsub {
        let count = (nsub - g).min(S::N);
        let mut xt: Cols = [[0.0; 16]; 32];
        transpose(xc, sub, g, count, &mut xt);
        let mut lt: ICols = [[0; 16]; 32];
        let (sc, mn) = match kind {
            Search::Qkx2Abs | Search::Qkx2Rms => {
                let mut wt: Cols = [[0.0; 16]; 32];
                if kind == Search::Qkx2Rms {
                    let mut sum_x2 = s.splat(0.0);
                    for xr in xt.iter().take(sub) {
                        let v = s.load(xr);
                        sum_x2 = s.add(sum_x2, s.mul(v, v));
                    }
                    let av_x = s.sqrt(s.div(sum_x2, s.splat(sub as f32)));
                    for (wr, xr) in wt.iter_mut().zip(&xt).take(sub) {
                        s.store(s.add(av_x, s.abs(s.load(xr))), wr);
                    }
                } else {
                    for (wr, xr) in wt.iter_mut().zip(&xt).take(sub) {
                        s.store(s.abs(s.load(xr)), wr);
                    }
                }
                qkx2(s, p, sub, &xt, &wt, &mut lt)
            }
            Search::Q3 => (q3(s, 4, sub, &xt, &mut lt), s.splat(0.0)),
            Search::Qx => (qx(s, 32, sub, &xt, &mut lt), s.splat(0.0)),
        };
        store_lanes(s, sc, g, count, scales);
        store_lanes(s, mn, g, count, mins);
        untranspose(&lt, sub, g, count, big_l);
        g += count;
    }
}

/// Quantizes `src` (whole super-blocks) into `dst` (exact size) for a K-quant type;
/// returns false for other types.
#[inline(always)]
pub(crate) fn quantize_k<S: Simd>(s: S, ty: GgmlType, src: &[f32], dst: &mut [u8]) -> bool {
    let (kind, p, sub) = match ty {
        GgmlType::Q2K => (Search::Qkx2Abs, &Q2K_PARAMS, 16),
        GgmlType::Q3K => (Search::Q3, &Q2K_PARAMS, 16),
        GgmlType::Q4K => (Search::Qkx2Rms, &Q4K_PARAMS, 32),
        GgmlType::Q5K => (Search::Qkx2Rms, &Q5K_PARAMS, 32),
        GgmlType::Q6K => (Search::Qx, &Q2K_PARAMS, 16),
        _ => return false,
    };
    let bb = ty.type_size();
    let per = QK_K / sub;
    for (xc, dc) in src.chunks(CHUNK).zip(dst.chunks_mut(2 * bb)) {
        let mut scales = [0f32; 32];
        let mut mins = [0f32; 32];
        let mut big_l = [0u8; CHUNK];
        search(
            s,
            SubSearch { kind, p, sub },
            xc,
            &mut scales,
            &mut mins,
            &mut big_l,
        );
        for (k, (xb, db)) in xc
            .chunks_exact(QK_K)
            .zip(dc.chunks_exact_mut(bb))
            .enumerate()
        {
            let Ok(xb) = <&[f32; QK_K]>::try_from(xb) else {
                return false;
            };
            let mut l: [u8; QK_K] = arr(&big_l, k * QK_K);
            match ty {
                GgmlType::Q2K => {
                    let (sc, mn) = (arr(&scales, k * per), arr(&mins, k * per));
                    let (sc, d, dmin, r) = prepare_q2_k(&sc, &mn);
                    requant(s, &r, xb, &mut l);
                    db.copy_from_slice(&pack_q2_k(sc, d, dmin, &l).to_bytes());
                }
                GgmlType::Q3K => {
                    let (sc, d, r) = prepare_q3_k(&arr(&scales, k * per));
                    requant(s, &r, xb, &mut l);
                    db.copy_from_slice(&pack_q3_k(sc, d, &l).to_bytes());
                }
                GgmlType::Q6K => match prepare_q6_k(&arr(&scales, k * per)) {
                    None => db.copy_from_slice(&Q6K_ZERO.to_bytes()),
                    Some((sc, d, r)) => {
                        requant(s, &r, xb, &mut l);
                        db.copy_from_slice(&pack_q6_k(sc, d, &l).to_bytes());
                    }
                },
                _ => {
                    let (sc, mn) = (arr(&scales, k * per), arr(&mins, k * per));
                    let (sc, d, dmin, r) = prepare_k4_k5(&sc, &mn, p.nmax);
                    requant(s, &r, xb, &mut l);
                    if ty == GgmlType::Q4K {
                        db.copy_from_slice(&pack_q4_k(d, dmin, sc, &l).to_bytes());
                    } else {
                        db.copy_from_slice(&pack_q5_k(d, dmin, sc, &l).to_bytes());
                    }
                }
            }
        }
    }
    true
}
