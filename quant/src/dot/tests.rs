//! Tests of the reference dot kernels: each equals the f64 dot of the dequantized operands.

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
        ActFormat::F16 => dequantize_row(GgmlType::F16, b, &mut out).unwrap(),
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

/// Random weight rows (quantized from `w`) against `x.len() / n` activation rows: every ISA's
/// many-row kernel equals the scalar kernel bit for bit.
fn many_matches_scalar(ty: GgmlType, w: &[f32], x: &[f32], n: usize) {
    let k = w.len();
    let mut wb = vec![0u8; ty.row_size(k as u64).unwrap() as usize];
    quantize_row_ref(ty, w, &mut wb).unwrap();
    let f = act_format(ty).unwrap();
    let rb = act_row_bytes(f, k).unwrap();
    let mut ab = vec![0u8; rb * n];
    for (o, r) in ab.chunks_exact_mut(rb).zip(x.chunks_exact(k)) {
        quantize_act(f, r, o);
    }
    let dot = dot_fn(ty).unwrap();
    let want: Vec<u32> = ab.chunks_exact(rb).map(|a| dot(&wb, a).to_bits()).collect();
    for isa in Isa::ALL {
        let many = dot_many_fn(ty, isa).unwrap();
        let mut got = vec![0f32; n];
        many(&wb, &ab, rb, &mut got);
        let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want, "{ty} on {isa:?}");
    }
}

#[test]
fn many_row_kernels_equal_scalar_on_signals() {
    for ty in WEIGHT_TYPES {
        let w = signal(512, 3);
        let x: Vec<f32> = (0..19).flat_map(|s| signal(512, 40 + s)).collect();
        many_matches_scalar(ty, &w, &x, 19);
    }
}

#[test]
fn many_row_kernels_never_panic_on_bad_lengths() {
    for ty in WEIGHT_TYPES {
        for isa in Isa::ALL {
            let many = dot_many_fn(ty, isa).unwrap();
            let mut o = vec![0f32; 3];
            many(&[1, 2, 3], &[4, 5], 7, &mut o);
            many(&[0; 400], &[0; 300], 0, &mut o);
            many(&[0; 420], &[0; 100], 292, &mut o);
            many(&[], &[], 0, &mut []);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn many_row_kernels_equal_scalar(
        ti in 0usize..WEIGHT_TYPES.len(),
        n in 1usize..21,
        w in proptest::collection::vec(-4.0f32..4.0, 512),
        x in proptest::collection::vec(-8.0f32..8.0, 512 * 20),
    ) {
        many_matches_scalar(WEIGHT_TYPES[ti], &w, &x[..512 * n], n);
    }
}
