//! Tests of the reference dot kernels: each equals the f64 dot of the dequantized operands.

use half::f16;

use super::scalar::{quantize_act_impl, rd_f16, rope_pairs_impl, swiglu_impl};
use super::*;
use crate::{dequantize_row, quantize_row_ref};
use proptest::prelude::*;

const WEIGHT_TYPES: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// Dequantizes an activation row.
fn deq_act(f: ActFormat, b: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    match f {
        ActFormat::F32 => dequantize_row(GgmlType::F32, b, &mut out).unwrap(),
        ActFormat::F16 => dequantize_row(GgmlType::F32, b, &mut out).unwrap(),
        ActFormat::BF16 => dequantize_row(GgmlType::BF16, b, &mut out).unwrap(),
        ActFormat::Q8_0 => dequantize_row(GgmlType::Q8_0, b, &mut out).unwrap(),
        ActFormat::Q8K => dequantize_row(GgmlType::Q8K, b, &mut out).unwrap(),
        ActFormat::Q8_1 => {
            for (blk, o) in b.chunks_exact(36).zip(out.chunks_exact_mut(32)) {
                let d = rd_f16(blk, 0);
                for (k, v) in o.iter_mut().enumerate() {
                    *v = d * f32::from(blk[4 + k] as i8);
                }
            }
        }
    }
    out
}

fn check(ty: GgmlType, w: &[f32], x: &[f32]) {
    let n = w.len();
    let wb = vec![0u8; ty.row_size(n as u64).unwrap() as usize];
    let mut wb = wb;
    quantize_row_ref(ty, w, &mut wb).unwrap();
    check_row(ty, n, wb.len()).unwrap();
    let f = act_format(ty).unwrap();
    let mut ab = vec![0u8; act_row_bytes(f, n).unwrap()];
    quantize_act(f, x, &mut ab);
    let mut wd = vec![0f32; n];
    dequantize_row(ty, &wb, &mut wd).unwrap();
    let ad = deq_act(f, &ab, n);
    let exact: f64 = wd.iter().zip(&ad).map(|(&a, &b)| a as f64 * b as f64).sum();
    let mag: f64 = wd
        .iter()
        .zip(&ad)
        .map(|(&a, &b)| (a as f64 * b as f64).abs())
        .sum();
    let got = vec_dot(ty, &wb, &ab) as f64;
    // Q8_1 keeps s = d*Σq in f16, so Q4_1/Q5_1 agree only to f16 precision on the min term.
    let tol = if f == ActFormat::Q8_1 { 2e-3 } else { 2e-6 } * mag.max(1e-30);
    assert!(
        (got - exact).abs() <= tol,
        "{ty}: got {got}, exact {exact}, mag {mag}"
    );
}

fn signal(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let t = (i as f32 + seed as f32 * 0.731) * 0.37;
            t.sin() * (1.0 + ((i * 7 + seed as usize) % 13) as f32 * 0.1) - 0.1
        })
        .collect()
}

#[test]
fn every_type_matches_dequantized_dot() {
    for ty in WEIGHT_TYPES {
        for seed in 0..4 {
            check(ty, &signal(512, seed), &signal(512, seed + 100));
        }
    }
}

#[test]
fn zero_rows_give_zero() {
    for ty in WEIGHT_TYPES {
        let z = vec![0f32; 256];
        let mut wb = vec![0u8; ty.row_size(256).unwrap() as usize];
        quantize_row_ref(ty, &z, &mut wb).unwrap();
        let f = act_format(ty).unwrap();
        let mut ab = vec![0u8; act_row_bytes(f, 256).unwrap()];
        quantize_act(f, &z, &mut ab);
        assert_eq!(vec_dot(ty, &wb, &ab), 0.0, "{ty}");
    }
}

#[test]
fn q8_0_activations_round_half_even() {
    // amax 127 -> id 1: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2
    let mut x = vec![0f32; 32];
    x[0] = 127.0;
    x[1] = 0.5;
    x[2] = 1.5;
    x[3] = -2.5;
    let mut b = [0u8; 34];
    quantize_row_q8_0(&x, &mut b);
    assert_eq!(&b[2..6], &[127u8, 0, 2, (-2i8) as u8]);
    let mut b1 = [0u8; 36];
    quantize_row_q8_1(&x, &mut b1);
    assert_eq!(&b1[4..8], &[127u8, 0, 2, (-2i8) as u8]);
    assert_eq!(rd_f16(&b1, 2), f16::from_f32(127.0).to_f32());
}

#[test]
fn bad_rows_are_rejected_and_short_rows_never_panic() {
    assert!(check_row(GgmlType::Q4_0, 33, 18).is_err());
    assert!(check_row(GgmlType::Q4_0, 64, 18).is_err());
    assert!(check_row(GgmlType::Q8K, 256, 292).is_err());
    assert!(check_row(GgmlType::Q4K, 256, 144).is_ok());
    for ty in WEIGHT_TYPES {
        let _ = vec_dot(ty, &[1, 2, 3], &[4, 5]);
        let _ = vec_dot(ty, &[], &[]);
    }
    assert_eq!(act_row_bytes(ActFormat::Q8K, 100), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_rows_match(
        ti in 0usize..WEIGHT_TYPES.len(),
        w in proptest::collection::vec(-4.0f32..4.0, 256),
        x in proptest::collection::vec(-8.0f32..8.0, 256),
    ) {
        check(WEIGHT_TYPES[ti], &w, &x);
    }
}

/// Weight rows of `k` values (quantized from `w`, `w.len() / k` rows) against `x.len() / k`
/// activation rows: every ISA's tile kernel equals the scalar kernel bit for bit.
fn many_matches_scalar(ty: GgmlType, k: usize, w: &[f32], x: &[f32]) {
    let rows = w.len() / k;
    let n = x.len() / k;
    let wrb = ty.row_size(k as u64).unwrap() as usize;
    let mut wb = vec![0u8; wrb * rows];
    for (o, r) in wb.chunks_exact_mut(wrb).zip(w.chunks_exact(k)) {
        quantize_row_ref(ty, r, o).unwrap();
    }
    let f = act_format(ty).unwrap();
    let rb = act_row_bytes(f, k).unwrap();
    let mut ab = vec![0u8; rb * n];
    for (o, r) in ab.chunks_exact_mut(rb).zip(x.chunks_exact(k)) {
        quantize_act(f, r, o);
    }
    for batch in [false, true] {
        let dot = dot_fn_for(ty, batch).unwrap();
        let mut want = Vec::new();
        for wr in wb.chunks_exact(wrb) {
            want.extend(ab.chunks_exact(rb).map(|a| dot(wr, a).to_bits()));
        }
        for isa in Isa::ALL {
            let many = dot_many_fn(ty, isa, batch).unwrap();
            let mut got = vec![0f32; n * rows];
            many(&wb, wrb, &ab, rb, &mut got);
            let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "{ty} on {isa:?} (batch {batch})");
        }
    }
}

#[test]
fn many_row_kernels_equal_scalar_on_signals() {
    for ty in WEIGHT_TYPES {
        let w: Vec<f32> = (0..7).flat_map(|s| signal(512, 3 + s)).collect();
        let x: Vec<f32> = (0..19).flat_map(|s| signal(512, 40 + s)).collect();
        many_matches_scalar(ty, 512, &w, &x);
    }
}

#[test]
fn many_row_kernels_never_panic_on_bad_lengths() {
    for ty in WEIGHT_TYPES {
        for isa in Isa::ALL {
            let many = dot_many_fn(ty, isa, true).unwrap();
            let mut o = vec![0f32; 3];
            many(&[1, 2, 3], 3, &[4, 5], 7, &mut o);
            many(&[0; 400], 400, &[0; 300], 0, &mut o);
            many(&[0; 420], 210, &[0; 100], 292, &mut o);
            many(&[0; 420], 0, &[0; 100], 292, &mut o);
            many(&[0; 420], 7, &[0; 100], 292, &mut o);
            many(&[], 0, &[], 0, &mut []);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn many_row_kernels_equal_scalar(
        ti in 0usize..WEIGHT_TYPES.len(),
        n in 1usize..11,
        rows in 1usize..10,
        w in proptest::collection::vec(-4.0f32..4.0, 256 * 9),
        x in proptest::collection::vec(-8.0f32..8.0, 256 * 10),
    ) {
        many_matches_scalar(WEIGHT_TYPES[ti], 256, &w[..256 * rows], &x[..256 * n]);
    }
}

#[test]
fn v_expf_is_close_to_exp_and_flushes() {
    for i in -1600..1700 {
        let x = i as f32 * 0.05;
        let want = (x as f64).exp();
        let got = ggml_v_expf(x) as f64;
        assert!((got - want).abs() <= 4e-7 * want, "{x}: {got} vs {want}");
    }
    assert_eq!(ggml_v_expf(-200.0), 0.0);
    assert_eq!(ggml_v_expf(200.0), f32::INFINITY);
    assert_eq!(ggml_v_expf(0.0), 1.0);
    let mut o = [0f32; 20];
    swiglu(&[1.0; 20], &[2.0; 20], &mut o);
    assert!((o[0] - 2.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-6);
    assert_eq!(o[17], 2.0 / (1.0 + (-1.0f32).exp()));
}

/// Plain softmax attention in f64 over the same f16 keys and values.
fn naive_attention(k: &[u16], v: &[u16], q: &[f32], hd: usize, t: usize, pos0: usize) -> Vec<f64> {
    let f = |b: u16| f64::from(f16::from_bits(b).to_f32());
    let mut out = vec![0f64; t * hd];
    for i in 0..t {
        let n = pos0 + i + 1;
        let sc: Vec<f64> = (0..n)
            .map(|j| {
                (0..hd)
                    .map(|d| q[i * hd + d] as f64 * f(k[j * hd + d]))
                    .sum::<f64>()
                    * 0.25
            })
            .collect();
        let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = sc.iter().map(|s| (s - mx).exp()).collect();
        let z: f64 = e.iter().sum();
        for d in 0..hd {
            out[i * hd + d] = (0..n).map(|j| e[j] * f(v[j * hd + d])).sum::<f64>() / z;
        }
    }
    out
}

#[test]
fn tiled_attention_matches_plain_softmax() {
    let hd = 16;
    for (t, pos0) in [(1usize, 0usize), (5, 70), (130, 0), (64, 64)] {
        let n = pos0 + t;
        let k: Vec<u16> = signal(n * hd, 1)
            .iter()
            .map(|&x| f16::from_f32(x).to_bits())
            .collect();
        let v: Vec<u16> = signal(n * hd, 2)
            .iter()
            .map(|&x| f16::from_f32(x).to_bits())
            .collect();
        let q = signal(t * hd, 3);
        let want = naive_attention(&k, &v, &q, hd, t, pos0);
        let view = attn::HeadView {
            k: &k,
            v: &v,
            stride: hd,
            off: 0,
            hd,
        };
        let mut got = vec![0f32; t * hd];
        let qs = attn::Queries {
            q: &q,
            stride: hd,
            off: 0,
            t,
            pos0,
        };
        attn::attend_head(view, qs, 0.25, &mut got);
        let mut plain = vec![0f32; t * hd];
        flash::attend_head_impl(view, qs, 0.25, &mut plain);
        assert_eq!(got, plain, "vectorized and plain builds differ");
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (*g as f64 - w).abs() < 1e-5,
                "t {t} pos0 {pos0}: {g} vs {w}"
            );
        }
    }
}

/// The attention loop as first written (one query at a time, scores and values as plain fused
/// multiply-add loops in memory), over the kernel's tile loading and online-softmax step: the
/// reference the paired, register-blocked version must equal bit for bit.
fn attend_head_old(kv: attn::HeadView<'_>, qs: flash::Queries<'_>, scale: f32, out: &mut [f32]) {
    let flash::Queries {
        q,
        stride: q_stride,
        off: q_off,
        t,
        pos0,
    } = qs;
    let (hd, kvn) = (kv.hd, attn::KV_TILE);
    let mut m = vec![f32::NEG_INFINITY; t];
    let mut s = vec![0f32; t];
    let (mut kt, mut krow, mut vt) = (vec![0f32; hd * kvn], vec![0f32; hd], vec![0f32; kvn * hd]);
    out.iter_mut().take(t * hd).for_each(|o| *o = 0.0);
    for ic in (0..pos0 + t).step_by(kvn) {
        let kvt = kvn.min(pos0 + t - ic);
        flash::load_tile(kv, ic, kvt, &mut kt, &mut krow, &mut vt);
        for i in (ic.saturating_sub(pos0))..t {
            let mut kq = [0f32; attn::KV_TILE];
            for dk in 0..hd {
                let qd = q.get(i * q_stride + q_off + dk).copied().unwrap_or(0.0);
                for (a, &kk) in kq.iter_mut().zip(&kt[dk * kvn..(dk + 1) * kvn]) {
                    *a = kk.mul_add(qd, *a);
                }
            }
            let visible = (pos0 + i + 1 - ic).min(kvt);
            let Some(o) = out.get_mut(i * hd..(i + 1) * hd) else {
                continue;
            };
            if flash::softmax_tile(&mut kq, visible, scale, &mut m[i], &mut s[i], o) {
                for (tk, &pw) in kq.iter().enumerate().take(visible) {
                    for (x, &vv) in o.iter_mut().zip(&vt[tk * hd..(tk + 1) * hd]) {
                        *x = vv.mul_add(pw, *x);
                    }
                }
            }
        }
    }
    flash::normalize(out, &s, hd);
}

#[test]
fn attention_equals_first_version() {
    for (hd, t, pos0) in [
        (128usize, 130usize, 0usize),
        (128, 7, 200),
        (16, 65, 3),
        (100, 33, 64),
        (160, 64, 64),
        (256, 3, 1),
    ] {
        let n = pos0 + t;
        let stride = 2 * hd + 8;
        let k: Vec<u16> = signal(n * stride, 11)
            .iter()
            .map(|&x| f16::from_f32(x).to_bits())
            .collect();
        let v: Vec<u16> = signal(n * stride, 12)
            .iter()
            .map(|&x| f16::from_f32(x).to_bits())
            .collect();
        let q = signal(t * (hd + 5), 13);
        let view = attn::HeadView {
            k: &k,
            v: &v,
            stride,
            off: hd / 2,
            hd,
        };
        let mut got = vec![0f32; t * hd];
        let qs = attn::Queries {
            q: &q,
            stride: hd + 5,
            off: 3,
            t,
            pos0,
        };
        attn::attend_head(view, qs, 0.125, &mut got);
        let mut plain = vec![0f32; t * hd];
        flash::attend_head_impl(view, qs, 0.125, &mut plain);
        let mut old = vec![0f32; t * hd];
        attend_head_old(view, qs, 0.125, &mut old);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&old), "hd {hd} t {t} pos0 {pos0}");
        assert_eq!(bits(&plain), bits(&old), "hd {hd} t {t} pos0 {pos0}");
    }
}

proptest! {
    #[test]
    fn f16_activations_equal_scalar(bits in proptest::collection::vec(any::<u32>(), 0..70)) {
        let x: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let mut fast = vec![0u8; 4 * x.len()];
        let mut slow = vec![1u8; 4 * x.len()];
        quantize_act(ActFormat::F16, &x, &mut fast);
        quantize_act_impl(ActFormat::F16, &x, &mut slow);
        prop_assert_eq!(fast, slow);
    }
}

#[test]
fn f16_activations_edge_values_equal_scalar() {
    let x: Vec<f32> = [
        0.0,
        -0.0,
        1.0,
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        6.0e-8,
        2.98e-8,
        2.99e-8,
        1e-10,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        0.33333334,
        1.0009766,
        1.0004883,
        -2.5e-5,
        3.0e5,
    ]
    .to_vec();
    let mut fast = vec![0u8; 4 * x.len()];
    let mut slow = vec![1u8; 4 * x.len()];
    quantize_act(ActFormat::F16, &x, &mut fast);
    quantize_act_impl(ActFormat::F16, &x, &mut slow);
    assert_eq!(fast, slow);
}

/// Compares with dots computed by ggml itself: `KILN_DOT_ORACLE=DIR:TYPE_ID:N:ROWS` where DIR
/// holds `w.bin`, `a.bin`, `r.bin` written by a small C program over libggml-cpu (rows of `N`
/// values; `r[i*ROWS+j] = vec_dot(w_i, a_j)`).
#[test]
#[ignore]
fn oracle_dots_equal_ggml() {
    let Ok(spec) = std::env::var("KILN_DOT_ORACLE") else {
        return;
    };
    let p: Vec<&str> = spec.split(':').collect();
    let ty = match p[1] {
        "1" => GgmlType::F16,
        "2" => GgmlType::Q4_0,
        "3" => GgmlType::Q4_1,
        "6" => GgmlType::Q5_0,
        "7" => GgmlType::Q5_1,
        "8" => GgmlType::Q8_0,
        "10" => GgmlType::Q2K,
        "11" => GgmlType::Q3K,
        "12" => GgmlType::Q4K,
        "13" => GgmlType::Q5K,
        _ => GgmlType::Q6K,
    };
    let n: usize = p[2].parse().unwrap();
    let rows: usize = p[3].parse().unwrap();
    let rd = |f: &str| std::fs::read(format!("{}/{f}", p[0])).unwrap();
    let (w, a, r) = (rd("w.bin"), rd("a.bin"), rd("r.bin"));
    let wrs = ty.row_size(n as u64).unwrap() as usize;
    let ars = act_row_bytes(act_format(ty).unwrap(), n).unwrap();
    let mut bad = 0;
    let x = rd("x.bin");
    let f = act_format(ty).unwrap();
    for j in 0..rows {
        let xr: Vec<f32> = x[4 * n * j..4 * n * (j + 1)]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut q = vec![0u8; ars];
        quantize_act(f, &xr, &mut q);
        if q != a[j * ars..(j + 1) * ars] {
            bad += 1;
            eprintln!("{ty}: activation row {j} differs");
        }
    }
    let dq = rd("dq.bin");
    for i in 0..rows {
        let mut d = vec![0f32; n];
        crate::dequantize_row(ty, &w[i * wrs..(i + 1) * wrs], &mut d).unwrap();
        let want: Vec<f32> = dq[4 * n * i..4 * n * (i + 1)]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if d.iter().zip(&want).any(|(a, b)| a.to_bits() != b.to_bits()) {
            bad += 1;
            eprintln!("{ty}: dequantized row {i} differs");
        }
    }
    let many = dot_many_fn(ty, Isa::current(), false).unwrap();
    for i in 0..rows {
        let mut row = vec![0f32; rows];
        many(&w[i * wrs..(i + 1) * wrs], wrs, &a, ars, &mut row);
        for j in 0..rows {
            let got = vec_dot(ty, &w[i * wrs..(i + 1) * wrs], &a[j * ars..(j + 1) * ars]);
            if got.to_bits() != row[j].to_bits() {
                bad += 1;
                eprintln!("{ty} ({i},{j}): many {} scalar {got}", row[j]);
            }
            let o = 4 * (i * rows + j);
            let want = f32::from_le_bytes([r[o], r[o + 1], r[o + 2], r[o + 3]]);
            if got.to_bits() != want.to_bits() {
                bad += 1;
                eprintln!("{ty} ({i},{j}): kiln {got} ggml {want}");
            }
        }
    }
    assert_eq!(bad, 0);
}

/// Compares a whole matrix product with ggml's CPU graph: `KILN_MM_ORACLE=DIR:TYPE:K:M:N` (DIR
/// holds `w.bin` = M rows of K, `x.bin` = N f32 rows of K, `y.bin` = N rows of M results).
#[test]
#[ignore]
fn oracle_matmul_equals_ggml() {
    let Ok(spec) = std::env::var("KILN_MM_ORACLE") else {
        return;
    };
    let p: Vec<&str> = spec.split(':').collect();
    let ty = match p[1] {
        "1" => GgmlType::F16,
        "2" => GgmlType::Q4_0,
        "3" => GgmlType::Q4_1,
        "6" => GgmlType::Q5_0,
        "7" => GgmlType::Q5_1,
        "8" => GgmlType::Q8_0,
        "10" => GgmlType::Q2K,
        "11" => GgmlType::Q3K,
        "12" => GgmlType::Q4K,
        "13" => GgmlType::Q5K,
        _ => GgmlType::Q6K,
    };
    let (k, m, n): (usize, usize, usize) = (
        p[2].parse().unwrap(),
        p[3].parse().unwrap(),
        p[4].parse().unwrap(),
    );
    let rd = |f: &str| std::fs::read(format!("{}/{f}", p[0])).unwrap();
    let f32s = |b: Vec<u8>| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let (w, x, y) = (rd("w.bin"), f32s(rd("x.bin")), f32s(rd("y.bin")));
    let wrs = ty.row_size(k as u64).unwrap() as usize;
    let f = act_format(ty).unwrap();
    let ars = act_row_bytes(f, k).unwrap();
    let mut a = vec![0u8; ars * n];
    for (o, r) in a.chunks_exact_mut(ars).zip(x.chunks_exact(k)) {
        quantize_act(f, r, o);
    }
    let mut bad = 0;
    let dot = dot_fn_for(ty, n >= TILED_MIN_ROWS).unwrap();
    for i in 0..m {
        for j in 0..n {
            let got = dot(&w[i * wrs..(i + 1) * wrs], &a[j * ars..(j + 1) * ars]);
            let want = y[j * m + i];
            if got.to_bits() != want.to_bits() {
                bad += 1;
                if bad < 5 {
                    eprintln!("{ty} ({i},{j}): kiln {got} ggml {want}");
                }
            }
        }
    }
    assert_eq!(bad, 0, "{bad} of {} differ", m * n);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// The vectorized builds of the activation quantizers, swiglu and rope's pair rotation give
    /// the plain build's bytes.
    #[test]
    fn vectorized_helpers_equal_plain(x in proptest::collection::vec(-50.0f32..50.0, 512)) {
        for f in [ActFormat::F32, ActFormat::F16, ActFormat::BF16, ActFormat::Q8_0, ActFormat::Q8_1, ActFormat::Q8K] {
            let n = act_row_bytes(f, 512).unwrap();
            let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
            quantize_act(f, &x, &mut a);
            quantize_act_impl(f, &x, &mut b);
            prop_assert_eq!(&a, &b);
        }
        let g: Vec<f32> = x.iter().rev().copied().collect();
        let (mut a, mut b) = (vec![0f32; 500], vec![0f32; 500]);
        swiglu(&x[..500], &g[..500], &mut a);
        swiglu_impl(&x[..500], &g[..500], &mut b);
        prop_assert_eq!(a, b);
        // rope's pair rotation, with angles' cosines and sines
        let cs: Vec<f32> = g.iter().map(|&v| if v > 0.0 { v.cos() } else { v.sin() }).collect();
        let (mut a, mut b) = (x[..300].to_vec(), x[..300].to_vec());
        rope_pairs(&mut a, &cs[..256]);
        rope_pairs_impl(&mut b, &cs[..256]);
        prop_assert_eq!(a, b);
    }
}

/// Runs [`gemm_f16`] and its scalar reference on `rows` weight rows and `toks` activation rows of
/// `k` values (activation rows `pad` values apart beyond `k`, outputs `ldo_pad` apart beyond
/// `rows`) and requires bit-identical outputs, each also equal to [`dot_f16_f16`].
fn gemm_matches_scalar(k: usize, rows: usize, toks: usize, pad: usize, ldo_pad: usize, seed: u32) {
    let w: Vec<f32> = signal(k * rows, seed);
    let x: Vec<f32> = signal(k * toks, seed.wrapping_add(7));
    let mut wb = vec![0u8; 2 * k * rows];
    for (o, v) in wb.chunks_exact_mut(2).zip(&w) {
        o.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
    }
    let stride = 4 * (k + pad);
    let mut ab = vec![0u8; stride * toks];
    for (o, r) in ab.chunks_exact_mut(stride).zip(x.chunks_exact(k)) {
        quantize_act(ActFormat::F16, r, &mut o[..4 * k]);
    }
    let ldo = rows + ldo_pad;
    let mut fast = vec![f32::NAN; ldo * toks];
    let mut slow = fast.clone();
    gemm_f16(&wb, 2 * k, &ab, stride, toks, &mut fast, ldo);
    #[cfg(target_arch = "x86_64")]
    if avx512::f16_gemm_available() {
        // the vector kernel itself, whatever KILN_FORCE_SCALAR says
        fast.fill(f32::NAN);
        assert!(avx512::f16_gemm(&wb, 2 * k, &ab, stride, toks, &mut fast, ldo).is_some());
    }
    gemm_f16_scalar(&wb, 2 * k, &ab, stride, toks, &mut slow, ldo);
    // the parallel version, with tiles of tokens that do and do not divide `toks`
    for tile in [1, 7, 128] {
        let mut par = vec![f32::NAN; ldo * toks];
        let acts = ActRows {
            bytes: &ab,
            stride,
            n: toks,
        };
        gemm_f16_par(&wb, 2 * k, acts, &mut par, ldo, tile);
        let same = par
            .iter()
            .zip(&slow)
            .all(|(p, s)| p.to_bits() == s.to_bits());
        assert!(
            same,
            "gemm_f16_par k {k} rows {rows} toks {toks} tile {tile}"
        );
    }
    for j in 0..toks {
        for r in 0..ldo {
            let (f, s) = (fast[j * ldo + r], slow[j * ldo + r]);
            assert_eq!(
                f.to_bits(),
                s.to_bits(),
                "k {k} rows {rows} toks {toks}: [{j}][{r}]"
            );
            if r < rows {
                let d = dot_f16_f16(&wb[r * 2 * k..(r + 1) * 2 * k], &ab[j * stride..]);
                assert_eq!(f.to_bits(), d.to_bits());
            }
        }
    }
}

#[test]
fn gemm_f16_equals_scalar_on_model_shapes() {
    gemm_matches_scalar(2048, 37, 131, 0, 0, 1);
    gemm_matches_scalar(5504, 18, 13, 3, 5, 2);
    // several passes of packed activations per tile, with and without a K tail
    gemm_matches_scalar(5504, 18, 131, 3, 5, 4);
    gemm_matches_scalar(5500, 9, 100, 1, 2, 5);
    gemm_matches_scalar(7, 5, 3, 0, 0, 3);
    // bad lengths never panic
    let mut o = [0f32; 8];
    gemm_f16(&[0; 10], 4, &[0; 12], 8, 3, &mut o, 2);
    gemm_f16(&[], 0, &[], 0, 0, &mut [], 0);
    gemm_f16(&[0; 64], 64, &[0; 8], 128, 5, &mut o, 1);
    let acts = |bytes, stride, n| ActRows { bytes, stride, n };
    gemm_f16_par(&[0; 10], 4, acts(&[0; 12], 8, 3), &mut o, 2, 2);
    gemm_f16_par(&[], 0, acts(&[], 0, 0), &mut [], 0, 0);
    gemm_f16_par(&[0; 64], 64, acts(&[0; 8], 128, 5), &mut o, 1, 128);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    #[test]
    fn gemm_f16_equals_scalar(
        k in 1usize..700,
        rows in 1usize..40,
        toks in 1usize..20,
        pad in 0usize..3,
        ldo_pad in 0usize..3,
        seed in 0u32..1000,
    ) {
        gemm_matches_scalar(k, rows, toks, pad, ldo_pad, seed);
    }
}

/// Timing of the F16 prompt kernels (`cargo test --release -p kiln-quant -- --ignored f16_speed
/// --nocapture`): the tiled dot kernel against [`gemm_f16`] (one thread) and [`gemm_f16_par`] (all
/// of rayon's threads), best of many short runs. `GEMM_K`, `GEMM_ROWS`, `GEMM_TOKS` set the shape.
#[test]
#[ignore]
fn f16_speed() {
    let (k, rows, toks) = match std::env::var("GEMM_K") {
        Ok(v) => (v.parse().unwrap(), 512, 128),
        Err(_) => (2048, 256, 128),
    };
    let env = |n: &str, d: usize| std::env::var(n).map_or(d, |v| v.parse().unwrap());
    let (rows, toks) = (env("GEMM_ROWS", rows), env("GEMM_TOKS", toks));
    let mut wb = vec![0u8; 2 * k * rows];
    for (o, v) in wb.chunks_exact_mut(2).zip(signal(k * rows, 3)) {
        o.copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
    }
    let mut ab = vec![0u8; 4 * k * toks];
    for (o, r) in ab
        .chunks_exact_mut(4 * k)
        .zip(signal(k * toks, 5).chunks_exact(k))
    {
        quantize_act(ActFormat::F16, r, o);
    }
    let flops = 2.0 * (k * rows * toks) as f64;
    let best = |f: &mut dyn FnMut()| {
        let mut b = f64::MAX;
        for _ in 0..30 {
            let t = std::time::Instant::now();
            f();
            b = b.min(t.elapsed().as_secs_f64());
        }
        b
    };
    let many = dot_many_fn(GgmlType::F16, Isa::current(), true).unwrap();
    let mut out = vec![0f32; rows * toks];
    let t_many = best(&mut || {
        let mut tmp = vec![0f32; 16 * toks];
        for r0 in (0..rows).step_by(16) {
            let r1 = rows.min(r0 + 16);
            let tmp = &mut tmp[..(r1 - r0) * toks];
            many(&wb[r0 * 2 * k..r1 * 2 * k], 2 * k, &ab, 4 * k, tmp);
            for (i, tr) in tmp.chunks_exact(toks).enumerate() {
                for (j, &v) in tr.iter().enumerate() {
                    out[j * rows + r0 + i] = v;
                }
            }
        }
    });
    let mut out2 = vec![0f32; rows * toks];
    let t_gemm = best(&mut || gemm_f16(&wb, 2 * k, &ab, 4 * k, toks, &mut out2, rows));
    let acts = ActRows {
        bytes: &ab,
        stride: 4 * k,
        n: toks,
    };
    let t_par = best(&mut || gemm_f16_par(&wb, 2 * k, acts, &mut out2, rows, 128));
    println!(
        "par ({} threads): {:.1} GFLOP/s",
        rayon::current_num_threads(),
        flops / t_par / 1e9
    );
    assert_eq!(out, out2);
    println!(
        "many: {:.2} ms {:.1} GFLOP/s; gemm: {:.2} ms {:.1} GFLOP/s",
        t_many * 1e3,
        flops / t_many / 1e9,
        t_gemm * 1e3,
        flops / t_gemm / 1e9
    );
}
