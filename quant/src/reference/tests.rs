//! Tests of the reference quantizers: every test vector of spec §6, round-trip error bounds,
//! and property tests (no panics on any finite input or any bytes).

use proptest::prelude::*;
use sha2::{Digest, Sha256};

use super::*;

const ALL_QUANT: [GgmlType; 14] = GgmlType::ALL;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|v| format!("{v:02x}")).collect()
}

fn sha_hex(b: &[u8]) -> String {
    to_hex(&Sha256::digest(b))
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn quant(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; bytes_for(ty, x.len()).unwrap()];
    quantize_row_ref(ty, x, &mut out).unwrap();
    out
}

fn dequant(ty: GgmlType, b: &[u8], n: usize) -> Vec<f32> {
    let mut y = vec![0f32; n];
    dequantize_row(ty, b, &mut y).unwrap();
    y
}

/// Dequantized values widened to f64, to compare exactly against the spec's decimal expansions.
fn dequant64(ty: GgmlType, b: &[u8], n: usize) -> Vec<f64> {
    dequant(ty, b, n).into_iter().map(f64::from).collect()
}

fn input_a() -> Vec<f32> {
    (0..64)
        .map(|i| (((37 * i + 11) % 101) as f32 - 50.0) / 32.0)
        .collect()
}
fn input_b() -> Vec<f32> {
    (0..32).map(|j| (j as f32 - 40.5) / 8.0).collect()
}
fn input_c() -> Vec<f32> {
    (0..32)
        .map(|j| (j as f32 - 31.0) * 2f32.powi(-20))
        .collect()
}
fn input_d() -> Vec<f32> {
    vec![0.0; 32]
}
fn input_e() -> Vec<f32> {
    (0..32)
        .map(|k| match k {
            5 => 3.0,
            20 => -3.0,
            _ => (k % 5) as f32 * 0.25 - 0.5,
        })
        .collect()
}
fn input_k() -> Vec<f32> {
    (0..256i64)
        .map(|i| {
            let v = ((73 * i + 29) % 257 - 128) as f64 * (1 + (i / 32) % 4) as f64 / 256.0;
            (if i / 32 == 5 { v + 1.0 } else { v }) as f32
        })
        .collect()
}
fn input_r() -> Vec<f32> {
    (0..4096u64)
        .map(|i| {
            let s = ((i * 1_103_515_245 + 12_345) % (1 << 31)) >> 16;
            ((s as f64 - 16384.0) * (1 + (i / 256) % 3) as f64 / 32768.0) as f32
        })
        .collect()
}

#[test]
fn inputs_match_spec_hashes() {
    for (x, prefix) in [
        (input_a(), "ef2af00d6714c2c5"),
        (input_b(), "681f18e90173c9f7"),
        (input_c(), "009f9d604324eaf1"),
        (input_d(), "38723a2e5e8a17aa"),
        (input_e(), "d53fbd68bbe5ddbd"),
    ] {
        assert!(sha_hex(&f32_bytes(&x)).starts_with(prefix), "{prefix}");
    }
    let k = input_k();
    assert_eq!(&k[..4], &[-0.38671875, -0.1015625, 0.18359375, 0.46875]);
    assert_eq!(k[160], 1.125);
    assert_eq!(
        sha_hex(&f32_bytes(&k)),
        "9033264bd5f9a0e4be93fcdc3f72077073b6149d00cda131ec65562a9427e6a2"
    );
    assert_eq!(
        sha_hex(&f32_bytes(&input_r())),
        "0a483bb4d63558e840d801b57f5a23f23ab220bed8072ce6e16e608b91ed283b"
    );
}

#[test]
fn legacy_vectors() {
    use GgmlType::*;
    let cases: &[(Vec<f32>, GgmlType, &str)] = &[
        (input_a(), Q4_0, "4032f258be1379df359bf147ac0268ce248a 40b253fd9731db852fca640ea842fc9630db"),
        (input_a(), Q4_1, "893240bef257bd1379cf358ae146ac0268bd2479 7732e0bdad0368ce248ad0469bf257bd1379cf25"),
        (input_a(), Q8_0, "4d229dfb59b61472d02e8be947a50361be1c7ad73593f14fac0a68c62481df3d9af8 4d2256b41270cd2b89e745a2005ebb1977d53390ee4caa0866c3217fdc3a98f654b1"),
        (input_b(), Q4_0, "103930304041414141515252525262636363"),
        (input_b(), Q4_1, "223410c580809191a2a2b3b3c4c4d5d5e6e6f7f7"),
        (input_b(), Q8_0, "1a298184878a8e9194979a9da0a3a7aaadb0b3b6b9bdc0c3c6c9cccfd3d6d9dcdfe2"),
        (input_c(), Q4_0, "3e0040405151515162626262737373738484"),
        (input_c(), Q4_1, "2100f08180809191a2a2b3b3c4c4d5d5e6e6f7f7"),
        (input_c(), Q8_0, "04008185898d91959a9ea2a6aaaeb2b6babec3c7cbcfd3d7dbdfe3e7ecf0f4f8fc00"),
        (input_e(), Q4_0, "00b699897877f79089787797998978779799"),
        (input_e(), Q4_1, "663600c276878898097f87889869768788986976"),
        (input_e(), Q8_0, "0c26ebf5000b157ff5000b15ebf5000b15ebf5000b1581f5000b15ebf5000b15ebf5"),
        (input_a(), Q5_0, "402eb4b4a525f4bf7b27e3ae5a16d19d4904c08c38f4 40aed29696b4a5ea2e62b6fb3f83c70c4094d91d51a5"),
        (input_a(), Q5_1, "532e40beb4b4a525f3bf6b27e2ae5a16d19d4904c07c38f3 422ee0bd2d69694b5a15d19d4904c07c38f3bf6b26e2ae5a"),
        (input_d(), Q5_0, "0080ffffffff00000000000000000000000000000000"),
    ];
    for (i, (x, ty, want)) in cases.iter().enumerate() {
        assert_eq!(to_hex(&quant(*ty, x)), to_hex(&hex(want)), "case {i} {ty}");
    }
    // vectors 10 and 11: all-zero blocks
    let mut q4_0_zero = vec![0x00, 0x80];
    q4_0_zero.extend([0x88; 16]);
    assert_eq!(quant(Q4_0, &input_d()), q4_0_zero);
    assert_eq!(quant(Q4_1, &input_d()), vec![0u8; 20]);
    assert_eq!(quant(Q8_0, &input_d()), vec![0u8; 34]);
}

#[test]
fn legacy_dequant_checks() {
    let y = dequant(GgmlType::Q4_0, &quant(GgmlType::Q4_0, &input_b()), 32);
    let mut want = vec![-5.0625f32; 3];
    for (v, n) in [
        (-4.4296875f32, 5),
        (-3.796875, 5),
        (-3.1640625, 5),
        (-2.53125, 5),
        (-1.8984375, 5),
        (-1.265625, 4),
    ] {
        want.extend(std::iter::repeat_n(v, n));
    }
    assert_eq!(y, want);
    let y = dequant64(GgmlType::Q4_1, &quant(GgmlType::Q4_1, &input_a()), 64);
    assert_eq!(
        &y[..4],
        &[
            -1.154052734375,
            -0.1329345703125,
            1.0924072265625,
            -0.9498291015625
        ]
    );
    let y = dequant64(GgmlType::Q8_0, &quant(GgmlType::Q8_0, &input_a()), 64);
    assert_eq!(
        &y[..4],
        &[
            -1.2183151245117188,
            -0.06153106689453125,
            1.0952529907226562,
            -0.9106597900390625
        ]
    );
    // vector 12: x[20] = -3 maps to nibble 15 and decodes to -2.625
    let y = dequant(GgmlType::Q4_0, &quant(GgmlType::Q4_0, &input_e()), 32);
    assert_eq!(y[20], -2.625);
    assert_eq!(y[5], 3.0);
}

const K_VECTORS: [(GgmlType, &str); 5] = [
    (
        GgmlType::Q2K,
        "343477788b9bdfdf44440708ababffbf54a9fe4394e93e4499ee4394a93e4499fa0354a93e50a5fa0354a93e50a5fa03
         ea3f50a9fe4f95aa3e50a5fe4f55aa3e4055aa0f55aafe0055aa0f55a9fe0355002d4430",
    ),
    (
        GgmlType::Q3K,
        "dd5302ccdd138add5322ccdd130add57aa445d9b82555faac45d9b82455dbac467f11bb01e64cd67f11bb01ea4ce67c1
         dbb01ba44de741dbb01ba44de74ddbb09836ac4be5533d9836a04be553fd983690ca65c37d9836900a65c36d9b36930a
         9796c3b384c45bb01e1e3df198a4",
    ),
    (
        GgmlType::Q4K,
        "9b1c05280d5aa7f30e1fa6f7fe1fb6ff3186db1f63a8fd3186da1f53a8fd3185da0f53a8fd3085ca0f53a8fc2075ca0f
         53a8fd3186da0f53a8fd3185da0f53a8fd2075ca0f53a8fc2075ca0f52a7fc2087cc2065a9ee4287cb2065a9ee4287cb
         2064a9ed4286cb2064a9ed4286cb1f54ab0f4388cd2065aa0f4388cd2065aa0f4388cd2065aaef4287cc2065aaef4287",
    ),
    (
        GgmlType::Q5K,
        "1f180f284e9dabf94e1fa6f80000cbffe07e0fc1f83f07e07e0fc1f83f07e07e0f81f03f07e0f80f81f03f07e0f81f81
         720ca62fb751fb620ca61fb651eb610b951fb640ea51fb950fa640ea50fa950fb751fb620ba51fb650fa610ba51fb650
         ea51fb950ea64fe950fa940ea54fe9501fa841da63fc861fa741ca53ec851ea731ca52eb850e9730c952db750d963fb9
         751fa630ca51eb750f9620ba51eb750e962fb940da64fe952fb940da64fe851f",
    ),
    (
        GgmlType::Q6K,
        "dab79470412e0aebc8a471523e1bfcd89591633f0b0ddaa6a274401c1eeab6b38c5f1222f5b8cc9b5e2231f4c8dbaa6e
         f0b20447195badefa1f336084a9cdfa0bef1c205472a6bade0b1f446195a9ddfc1f325275a8cbeb1e31517497badafd2
         fe254c638aa1d8ff163c537aa1c8ef06ecb39980583e05fdc3aa80683f15fdd4a3560df06719cca3560df06719cca356
         cd30a7d90c7396c93067da0c7396c930a13344a5f20354a1334495f20354a132845532c3946132845532c39461328755
         e2e33c3fa1a589711f208087565b7f830d10",
    ),
];

#[test]
fn k_vectors() {
    let x = input_k();
    for (ty, want) in K_VECTORS {
        let want = hex(want);
        assert_eq!(want.len(), ty.type_size(), "{ty}");
        assert_eq!(to_hex(&quant(ty, &x)), to_hex(&want), "{ty}");
    }
}

#[test]
fn k_dequant_checks() {
    let x = input_k();
    for (ty, y0, y1, y160) in [
        (
            GgmlType::Q2K,
            -0.39990234375f64,
            -0.08740234375f64,
            1.09375f64,
        ),
        (
            GgmlType::Q3K,
            -0.3768310546875,
            -0.1256103515625,
            1.0048828125,
        ),
        (
            GgmlType::Q4K,
            -0.3811683654785156,
            -0.08882904052734375,
            1.083984375,
        ),
        (
            GgmlType::Q5K,
            -0.38756561279296875,
            -0.1058502197265625,
            1.09466552734375,
        ),
        (
            GgmlType::Q6K,
            -0.3856945037841797,
            -0.10384082794189453,
            1.1392822265625,
        ),
    ] {
        let y = dequant64(ty, &quant(ty, &x), 256);
        assert_eq!((y[0], y[1], y[160]), (y0, y1, y160), "{ty}");
    }
}

#[test]
fn bulk_r_hashes() {
    use GgmlType::*;
    let x = input_r();
    for (ty, want) in [
        (
            Q4_0,
            "2bd5a700cee4355dd33c1f13a76e8de3cd6f50f5fc38f183d64d5aa3aebc6d67",
        ),
        (
            Q4_1,
            "fc138312be71d0636fc5b1fe668e73e617f67487ace15d0d3d63ba68070a3d39",
        ),
        (
            Q5_0,
            "db3c3eeeda4b74d151697cc375832278f6ad8d955d7d714dc251256df15a8c73",
        ),
        (
            Q5_1,
            "39bdfc2f8407157e25df2cae07547a0544399b2bb776f9b900ec776ac74e2702",
        ),
        (
            Q8_0,
            "ce9b74ffc25108883dc2891789fc839ef246012da0ae3bd657776be25530acd0",
        ),
        (
            F16,
            "dd7682a3d6a160d497d3ef50912caff291476747b7807919539f48afa9516b57",
        ),
        (
            Q2K,
            "31f378a2fffdc6ae66626d647e885e459bec0a570ca2574c43bd56d56a15a8af",
        ),
        (
            Q3K,
            "e26a009f313ce177c1c3d492021e4233af3540da34da5a389f78c99334e85e13",
        ),
        (
            Q4K,
            "0dd48c7b8fcd7805fd00228a3e2422a0889e6dec6c1a8f7b9fa6ddb5d2130aa5",
        ),
        (
            Q5K,
            "566c3259e768cb02041fee1545fa8de589390c4f501c5b4d05b41a8cec5bdd28",
        ),
        (
            Q6K,
            "fee65918819161f1c63e96963f9b2dfa64e92b9b3a54459f84a3b0e0fe3790aa",
        ),
        (
            BF16,
            "4f7e2ea39f61337187089733fb6a8d130b5c251162e379f3e332fedfa7bde0d7",
        ),
    ] {
        assert_eq!(sha_hex(&quant(ty, &x)), want, "{ty}");
    }
}

#[test]
fn f32_copy_and_sizes() {
    let x = input_r();
    let b = quant(GgmlType::F32, &x);
    assert_eq!(b, f32_bytes(&x));
    assert_eq!(dequant(GgmlType::F32, &b, x.len()), x);
    for ty in ALL_QUANT {
        assert_eq!(quant(ty, &x).len() as u64, ty.row_size(4096).unwrap());
    }
}

/// ggml's test-quantize-fns signal and metric: `0.1 + 2*cos(i + offset)`, `sqrt(sum d^2) / n`.
#[test]
fn round_trip_error_bounds() {
    let n = 4096;
    let x: Vec<f32> = (0..n).map(|i| 0.1 + 2.0 * (i as f32).cos()).collect();
    for ty in ALL_QUANT {
        let y = dequant(ty, &quant(ty, &x), n);
        let sum: f64 = x
            .iter()
            .zip(&y)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let err = sum.sqrt() / n as f64;
        let max_err = match ty {
            GgmlType::Q2K => 0.0075,
            GgmlType::Q3K => 0.0040,
            _ => 0.002,
        };
        assert!(err < max_err, "{ty}: {err} >= {max_err}");
        // and a plain relative RMS bound per type
        let rms = (sum / n as f64).sqrt();
        let bound = match ty {
            GgmlType::F32 => 0.0,
            GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 | GgmlType::Q8K => 0.02,
            GgmlType::Q6K | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5K => 0.07,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4K => 0.15,
            GgmlType::Q3K => 0.3,
            GgmlType::Q2K => 0.6,
        };
        assert!(rms <= bound, "{ty}: rms {rms} > {bound}");
    }
}

#[test]
fn q8_k_round_trip_and_bsums() {
    let x = input_k();
    let b = quant(GgmlType::Q8K, &x);
    let blk = crate::blocks::BlockQ8K::from_bytes(&b[..].try_into().unwrap());
    for (j, s) in blk.bsums.iter().enumerate() {
        let sum: i32 = blk.qs[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum();
        assert_eq!(*s as i32, sum);
    }
    // the first max-|x| element maps to -127: q = -127 and d = 1 / (-127 / max)
    let (mut imax, mut amax) = (0, 0f32);
    for (i, v) in x.iter().enumerate() {
        if v.abs() > amax {
            (imax, amax) = (i, v.abs());
        }
    }
    assert_eq!(blk.qs[imax], -127);
    assert_eq!(blk.d, 1.0 / (-127.0f32 / x[imax]));
    let y = dequant(GgmlType::Q8K, &b, 256);
    for (a, b) in x.iter().zip(&y) {
        assert!((a - b).abs() <= amax / 127.0 * 0.5 + 1e-6);
    }
    assert_eq!(quant(GgmlType::Q8K, &[0.0; 256]), vec![0u8; 292]);
}

#[test]
fn nearest_int_is_ties_to_even() {
    for (f, want) in [
        (0.5f32, 0),
        (1.5, 2),
        (2.5, 2),
        (-0.5, 0),
        (-1.5, -2),
        (-2.5, -2),
        (0.49999997, 0),
        (3.7, 4),
        (-3.7, -4),
        (4194303.0, 4194303),
        (-4194303.0, -4194303),
    ] {
        assert_eq!(nearest_int(f), want, "{f}");
        assert_eq!(nearest_int(f), f.round_ties_even() as i32);
    }
    assert_eq!(c_trunc_i32(f32::NAN), i32::MIN);
    assert_eq!(c_trunc_i32(f32::INFINITY), i32::MIN);
    assert_eq!(c_trunc_i32(-2147483648.0), i32::MIN);
    assert_eq!(c_trunc_i32(2147483648.0), i32::MIN);
    assert_eq!(c_trunc_i32(-7.9), -7);
    assert_eq!(c_trunc_i32(16.5), 16);
}

#[test]
fn size_errors() {
    let x = [0f32; 64];
    let mut out = [0u8; 100];
    assert_eq!(
        quantize_row_ref(GgmlType::Q4_0, &x[..33], &mut out[..18]),
        Err(QuantError::NotBlockMultiple {
            ty: GgmlType::Q4_0,
            block_size: 32,
            len: 33
        })
    );
    assert_eq!(
        quantize_row_ref(GgmlType::Q4_0, &x, &mut out[..35]),
        Err(QuantError::ByteLength {
            ty: GgmlType::Q4_0,
            what: "destination",
            expected: 36,
            actual: 35
        })
    );
    assert!(quantize_row_ref(GgmlType::Q4K, &x, &mut out).is_err());
    let mut y = [0f32; 256];
    assert!(dequantize_row(GgmlType::Q6K, &out, &mut y).is_err());
    assert!(dequantize_row(GgmlType::Q6K, &out[..10], &mut y[..255]).is_err());
    assert!(dequantize_row(GgmlType::F16, &out[..9], &mut y[..5]).is_err());
    for ty in ALL_QUANT {
        assert!(quantize_row_ref(ty, &[], &mut []).is_ok());
        assert!(dequantize_row(ty, &[], &mut []).is_ok());
    }
}

/// NaN and infinities: never a panic; legacy behaviour follows the x86 cast rules.
#[test]
fn non_finite_inputs_do_not_panic() {
    let specials = [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
    for s in specials {
        for pos in [0usize, 7, 255] {
            let mut x = input_k();
            x[pos] = s;
            for ty in ALL_QUANT {
                let b = quant(ty, &x);
                let _ = dequant(ty, &b, 256);
            }
        }
        for ty in ALL_QUANT {
            let b = quant(ty, &[s; 256]);
            let _ = dequant(ty, &b, 256);
        }
    }
    // Q4_0: a NaN is skipped by the max search and lands on nibble 0 (cvttss2si gives INT_MIN)
    let mut x = input_b();
    x[3] = f32::NAN;
    let b = quant(GgmlType::Q4_0, &x);
    assert_eq!(b[2 + 3] & 0x0F, 0);
    assert_eq!(&b[..2], &quant(GgmlType::Q4_0, &input_b())[..2]);
}

fn block_of(n: usize) -> impl Strategy<Value = Vec<f32>> {
    let elem = prop_oneof![
        4 => -10.0f32..10.0,
        1 => proptest::num::f32::NORMAL | proptest::num::f32::SUBNORMAL | proptest::num::f32::ZERO,
        1 => prop_oneof![Just(1e30f32), Just(-1e30), Just(1e-40), Just(-1e-40), Just(0.0), Just(-0.0),
                         Just(f32::MAX), Just(f32::MIN), Just(65504.0), Just(-65520.0)],
    ];
    prop_oneof![
        3 => proptest::collection::vec(elem, n),
        1 => (prop_oneof![Just(0.0f32), Just(1e30), Just(-1e-40), -1e3f32..1e3])
            .prop_map(move |c| vec![c; n]),
        1 => (-1e-38f32..1e-38).prop_map(move |s| (0..n).map(|i| s * (i as f32 - 100.0)).collect()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn quantize_never_panics(x in block_of(512)) {
        for ty in ALL_QUANT {
            let b = quant(ty, &x);
            let y = dequant(ty, &b, x.len());
            prop_assert_eq!(y.len(), x.len());
        }
    }

    #[test]
    fn dequantize_never_panics(bytes in proptest::collection::vec(any::<u8>(), 292 * 2)) {
        for ty in ALL_QUANT {
            let n = 2 * ty.block_size() * if ty.block_size() == 1 { 64 } else { 1 };
            let need = bytes_for(ty, n).unwrap();
            let mut y = vec![0f32; n];
            dequantize_row(ty, &bytes[..need], &mut y).unwrap();
        }
    }

    /// Finite, moderate inputs give finite outputs that respect a per-block error bound.
    #[test]
    fn moderate_inputs_round_trip(x in proptest::collection::vec(-100.0f32..100.0, 256)) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        for ty in ALL_QUANT {
            let y = dequant(ty, &quant(ty, &x), 256);
            for (a, b) in x.iter().zip(&y) {
                prop_assert!(b.is_finite());
                prop_assert!((a - b).abs() <= amax * 1.01 + 1e-3, "{} {} {}", ty, a, b);
            }
        }
    }
}
