//! SIMD kernels vs the reference: byte equality for every type on every instruction set this CPU
//! has, over random, constant, zero, subnormal, huge, tie-heavy and mixed rows of several blocks.

use proptest::prelude::*;

use super::*;
use crate::reference::quantize_row_ref;

fn isas() -> Vec<Isa> {
    let v: Vec<Isa> = Isa::ALL
        .into_iter()
        .filter(|i| *i != Isa::Scalar && i.is_available())
        .collect();
    if v.is_empty() {
        eprintln!("no SIMD instruction set on this CPU; SIMD kernels untested");
    }
    v
}

fn reference(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; bytes_for(ty, x.len()).unwrap()];
    quantize_row_ref(ty, x, &mut out).unwrap();
    out
}

/// Checks every SIMD instruction set against the reference for every type; returns a message on
/// the first difference.
fn check_all(x: &[f32]) -> Result<(), String> {
    for ty in GgmlType::ALL {
        if !x.len().is_multiple_of(ty.block_size()) {
            continue;
        }
        let want = reference(ty, x);
        for isa in isas() {
            let mut got = vec![0u8; want.len()];
            quantize_row_with(isa, ty, x, &mut got).unwrap();
            if got != want {
                let bb = ty.type_size();
                let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                let blk = first / bb;
                return Err(format!(
                    "{ty} on {isa:?}: first difference at byte {first} (block {blk}); input block {:?}",
                    &x[blk * ty.block_size()..(blk + 1) * ty.block_size()]
                ));
            }
        }
    }
    Ok(())
}

/// Deterministic generator (splitmix64).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// 32 values of one "kind" of block.
fn block(kind: u8, seed: u64, exp: i32) -> Vec<f32> {
    let mut r = Rng(seed);
    let scale = 2f32.powi(exp);
    (0..32)
        .map(|i| match kind {
            0 => r.unit() * scale,
            1 => {
                // roughly gaussian, like trained weights
                let s: f32 = (0..4).map(|_| r.unit()).sum();
                s * scale * 0.02
            }
            2 => 0.0,
            3 => scale * 0.37,
            4 => f32::from_bits((r.next() as u32) & 0x807F_FFFF), // subnormals and zeros
            5 => [1e30, -1e30, f32::MAX / 2.0, -f32::MAX / 2.0, 1e20, -3e37][i % 6] * r.unit(),
            6 => ((r.next() % 17) as f32 - 8.0) * 0.25, // grid: many ties and repeats
            7 => ((r.next() % 9) as f32 - 4.0) * scale, // few distinct values, exact multiples
            8 => {
                if i == 5 {
                    scale
                } else if i == 20 {
                    -scale
                } else {
                    r.unit() * scale * 0.01
                }
            }
            _ => {
                if r.next().is_multiple_of(4) {
                    -0.0
                } else {
                    r.unit() * 1e-30
                }
            }
        })
        .collect()
}

fn row_strategy() -> impl Strategy<Value = Vec<f32>> {
    (1usize..=5)
        .prop_flat_map(|sb| proptest::collection::vec((0u8..10, any::<u64>(), -20i32..20), sb * 8))
        .prop_map(|blocks| {
            blocks
                .into_iter()
                .flat_map(|(k, seed, e)| block(k, seed, e))
                .collect()
        })
}

fn uniform_kind_row() -> impl Strategy<Value = Vec<f32>> {
    (1usize..=4, 0u8..10, any::<u64>(), -20i32..20).prop_map(|(sb, k, seed, e)| {
        (0..sb * 8)
            .flat_map(|j| block(k, seed.wrapping_add(j as u64), e))
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn simd_equals_reference_mixed(x in row_strategy()) {
        if let Err(e) = check_all(&x) { prop_assert!(false, "{}", e); }
    }

    #[test]
    fn simd_equals_reference_uniform(x in uniform_kind_row()) {
        if let Err(e) = check_all(&x) { prop_assert!(false, "{}", e); }
    }

    #[test]
    fn simd_equals_reference_any_finite(
        x in proptest::collection::vec(
            proptest::num::f32::NORMAL | proptest::num::f32::SUBNORMAL | proptest::num::f32::ZERO,
            256,
        )
    ) {
        if let Err(e) = check_all(&x) { prop_assert!(false, "{}", e); }
    }
}

#[test]
fn every_kind_and_length() {
    for kind in 0..10u8 {
        for exp in [-30, -8, 0, 8, 30] {
            for sb in 1..=3usize {
                let x: Vec<f32> = (0..sb * 8)
                    .flat_map(|j| block(kind, 1000 * u64::from(kind) + j as u64, exp))
                    .collect();
                check_all(&x).unwrap();
            }
        }
    }
    // legacy-only lengths (not whole super-blocks)
    for n in [32usize, 64, 96, 160, 480] {
        let x: Vec<f32> = (0..n / 32).flat_map(|j| block(1, j as u64, 0)).collect();
        check_all(&x).unwrap();
    }
}

#[test]
fn non_finite_rows_fall_back() {
    let mut x: Vec<f32> = (0..512).flat_map(|j| block(0, j, 0)).take(512).collect();
    for (i, v) in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY]
        .iter()
        .enumerate()
    {
        x[37 * i + 3] = *v;
        check_all(&x).unwrap();
    }
}

#[test]
fn current_isa_is_available() {
    assert!(Isa::current().is_available());
    assert!(Isa::detect().is_available());
}

/// The kernels really run (rather than silently falling back to the reference).
#[cfg(target_arch = "x86_64")]
#[test]
fn kernels_are_used() {
    let x: Vec<f32> = (0..24).flat_map(|j| block(1, j, 0)).collect();
    let k = [
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];
    for ty in GgmlType::ALL {
        if matches!(ty, GgmlType::F32 | GgmlType::Q8K) {
            continue;
        }
        let mut out = vec![0u8; bytes_for(ty, x.len()).unwrap()];
        if let Some(s) = avx2::Avx2::new() {
            assert!(s.quantize(ty, &x, &mut out), "{ty} avx2");
        }
        if let Some(s) = avx512::Avx512::new() {
            assert_eq!(s.quantize(ty, &x, &mut out), k.contains(&ty), "{ty} avx512");
        }
        assert_eq!(out, reference(ty, &x));
    }
}

#[test]
fn f16_widening_all_values() {
    let src: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    let mut want = vec![0f32; 65536];
    reference::dequantize_row(GgmlType::F16, &src, &mut want).unwrap();
    for isa in isas() {
        let mut got = vec![0f32; 65536];
        dequantize_row_with(isa, GgmlType::F16, &src, &mut got).unwrap();
        for (h, (g, w)) in got.iter().zip(&want).enumerate() {
            if w.is_nan() {
                assert!(g.is_nan(), "{h:#x} {isa:?}");
            } else {
                assert_eq!(g.to_bits(), w.to_bits(), "{h:#x} {isa:?}");
            }
        }
        // odd lengths take the scalar tail
        let mut tail = vec![0f32; 13];
        dequantize_row_with(isa, GgmlType::F16, &src[2000..2026], &mut tail).unwrap();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&tail), bits(&want[1000..1013]));
    }
}

#[test]
fn f16_bf16_narrowing_specials_and_tails() {
    let mut x: Vec<f32> = (0..4099u32)
        .map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)))
        .collect();
    x.extend([
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7fa0_0000),
        f32::from_bits(0xff80_0001),
        f32::INFINITY,
        f32::NEG_INFINITY,
        65504.0,
        65519.996,
        65520.0,
        -0.0,
        2f32.powi(-25),
        2f32.powi(-24),
        f32::MAX,
        f32::from_bits(0x7f7f_8000),
    ]);
    for n in [x.len(), 7, 8, 15, 16, 17, 1] {
        check_all(&x[..n]).unwrap();
    }
}
