//! Low-rank updates `W += scale·(C·B)` (a LoRA merge), on f32 rows or on f16 rows (widened,
//! updated in f32 and rounded back to nearest even in one pass), with a scalar reference and
//! run-time selected AVX2 / AVX-512 kernels whose results are bit-identical to it.
//!
//! Every output element is computed as the reference does: `acc = 0; for k ascending:
//! acc = acc + c[k]·b[k]` (two roundings, or one fused multiply-add when `fused`), then
//! `w = w + scale·acc` (unfused). The SIMD kernels only change which elements are computed
//! together (a few rows by a strip of columns held in registers), never an element's sequence of
//! IEEE operations, so their output equals the reference bit for bit.

#[cfg(target_arch = "x86_64")]
mod x86;

use crate::Isa;

/// Shapes of one low-rank update: `w` is `rows × cols`, `coef` is `rows × r`, `basis` is
/// `r × cols`, all row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LowRankShape {
    pub rows: usize,
    pub cols: usize,
    pub r: usize,
}

impl LowRankShape {
    fn fits(&self, w: &[f32], coef: &[f32], basis: &[f32]) -> bool {
        self.fits_len(w.len(), 1, coef, basis)
    }

    /// `w_len` elements of `elem` units each (bytes of f16 rows: 2) make `rows × cols`.
    fn fits_len(&self, w_len: usize, elem: usize, coef: &[f32], basis: &[f32]) -> bool {
        let mul = |a: usize, b: usize| a.checked_mul(b);
        mul(self.rows, self.cols).and_then(|n| mul(n, elem)) == Some(w_len)
            && mul(self.rows, self.r) == Some(coef.len())
            && mul(self.r, self.cols) == Some(basis.len())
    }
}

/// The factors of one update `scale·(coef·basis)` and how it is summed: what every `add_lowrank*`
/// function, kernel and reference column loop takes.
#[derive(Clone, Copy, Debug)]
pub struct Factors<'a> {
    /// `rows × r` coefficients, row-major.
    pub coef: &'a [f32],
    /// `r × cols` basis rows, row-major.
    pub basis: &'a [f32],
    /// Factor of the whole product.
    pub scale: f32,
    /// Whether each `c[k]·b[k]` is added by one fused multiply-add (else two roundings).
    pub fused: bool,
}

/// `w += scale·(coef·basis)` (the [`Factors`] `f`) with the kernels of [`Isa::current`]. Returns
/// `false` (and leaves `w` untouched) when the slice lengths do not match `shape`.
pub fn add_lowrank(shape: LowRankShape, w: &mut [f32], f: Factors<'_>) -> bool {
    add_lowrank_with(Isa::current(), shape, w, f)
}

/// [`add_lowrank`] on a chosen instruction set (an unavailable one falls back to the reference).
pub fn add_lowrank_with(
    isa: Isa,
    shape: LowRankShape,
    w: &mut [f32],
    factors: Factors<'_>,
) -> bool {
    if !shape.fits(w, factors.coef, factors.basis) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if isa != Isa::Scalar && isa.is_available() {
            let rows = x86::Rows::F32(w.as_mut_ptr());
            // SAFETY: `isa` is available, `w` holds rows × cols values (checked by `fits`),
            // coef and basis match the shape.
            let done = unsafe { x86::add_lowrank(isa, shape, rows, factors) };
            // columns past the last full strip
            add_lowrank_ref_cols(shape, w, factors, done);
            return true;
        }
    }
    let _ = isa;
    add_lowrank_ref_cols(shape, w, factors, 0);
    true
}

/// The reference: columns `from..cols` of every row.
fn add_lowrank_ref_cols(shape: LowRankShape, w: &mut [f32], f: Factors<'_>, from: usize) {
    let Factors {
        coef,
        basis,
        scale,
        fused,
    } = f;
    let LowRankShape { cols, r, .. } = shape;
    if cols == 0 || from >= cols {
        return;
    }
    for (wr, cr) in w.chunks_exact_mut(cols).zip(coef.chunks_exact(r.max(1))) {
        for (j, x) in wr.iter_mut().enumerate().skip(from) {
            *x += scale * dot(cr, basis, cols, j, fused);
        }
    }
}

/// `Σ_k coef_row[k]·basis[k][j]`, k ascending, as every kernel sums it.
fn dot(coef_row: &[f32], basis: &[f32], cols: usize, j: usize, fused: bool) -> f32 {
    let mut acc = 0.0f32;
    for (&ck, bv) in coef_row
        .iter()
        .zip(basis.iter().skip(j).step_by(cols.max(1)))
    {
        acc = if fused {
            ck.mul_add(*bv, acc)
        } else {
            acc + ck * bv
        };
    }
    acc
}

/// The f16 reference: columns `from..cols` of every row, `dst = f16(f32(src) + scale·acc)`
/// (`src` = `dst` when `None`). Lengths are checked by the caller.
fn add_lowrank_f16_ref_cols(
    shape: LowRankShape,
    src: Option<&[u8]>,
    dst: &mut [u8],
    f: Factors<'_>,
    from: usize,
) {
    let Factors {
        coef,
        basis,
        scale,
        fused,
    } = f;
    let LowRankShape { cols, r, .. } = shape;
    if cols == 0 || from >= cols || r == 0 {
        if let Some(s) = src {
            // r = 0: nothing to add, but dst still becomes src
            if from < cols {
                for (d, s) in dst.chunks_exact_mut(2 * cols).zip(s.chunks_exact(2 * cols)) {
                    d[2 * from..].copy_from_slice(&s[2 * from..]);
                }
            }
        }
        return;
    }
    for (i, (dr, cr)) in dst
        .chunks_exact_mut(2 * cols)
        .zip(coef.chunks_exact(r))
        .enumerate()
    {
        for j in from..cols {
            let b = 2 * j;
            let x = match src {
                Some(s) => {
                    let o = 2 * (i * cols + j);
                    [s[o], s[o + 1]]
                }
                None => [dr[b], dr[b + 1]],
            };
            let x = half::f16::from_le_bytes(x).to_f32();
            let v = half::f16::from_f32(x + scale * dot(cr, basis, cols, j, fused));
            dr[b..b + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// Whether f16 rows `dst` (and `src`, when given, of the same length) and the factors match
/// `shape`.
fn f16_fits(
    shape: LowRankShape,
    src: Option<&[u8]>,
    dst: &[u8],
    coef: &[f32],
    basis: &[f32],
) -> bool {
    shape.fits_len(dst.len(), 2, coef, basis) && src.is_none_or(|s| s.len() == dst.len())
}

/// f16 rows (little-endian bytes): `dst = f16(f32(src) + scale·(coef·basis))` (the [`Factors`]
/// `f`), rounded to nearest even, with `src` = `dst` (in place) when `None`, on the kernels of
/// [`Isa::current`]. Returns `false` (and leaves `dst` untouched) when the lengths do not match
/// `shape`.
pub fn add_lowrank_f16(
    shape: LowRankShape,
    src: Option<&[u8]>,
    dst: &mut [u8],
    f: Factors<'_>,
) -> bool {
    add_lowrank_f16_with(Isa::current(), shape, src, dst, f)
}

/// [`add_lowrank_f16`] on a chosen instruction set (an unavailable one falls back to the
/// reference).
pub fn add_lowrank_f16_with(
    isa: Isa,
    shape: LowRankShape,
    src: Option<&[u8]>,
    dst: &mut [u8],
    factors: Factors<'_>,
) -> bool {
    if !f16_fits(shape, src, dst, factors.coef, factors.basis) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if isa != Isa::Scalar && isa.is_available() {
            let d = dst.as_mut_ptr().cast::<u16>();
            let s = src.map_or(d.cast_const(), |s| s.as_ptr().cast::<u16>());
            let rows = x86::Rows::F16 { src: s, dst: d };
            // SAFETY: `isa` is available; `dst` (and `src`, same length) hold rows × cols f16
            // values (checked above; the kernels load and store them unaligned); coef and basis
            // match the shape.
            let done = unsafe { x86::add_lowrank(isa, shape, rows, factors) };
            add_lowrank_f16_ref_cols(shape, src, dst, factors, done);
            return true;
        }
    }
    let _ = isa;
    add_lowrank_f16_ref_cols(shape, src, dst, factors, 0);
    true
}

/// The scalar f16 reference over the whole matrix. Returns `false` when the lengths do not match.
pub fn add_lowrank_f16_ref(
    shape: LowRankShape,
    src: Option<&[u8]>,
    dst: &mut [u8],
    factors: Factors<'_>,
) -> bool {
    if !f16_fits(shape, src, dst, factors.coef, factors.basis) {
        return false;
    }
    add_lowrank_f16_ref_cols(shape, src, dst, factors, 0);
    true
}

/// The scalar reference over the whole matrix. Returns `false` when the lengths do not match.
pub fn add_lowrank_ref(shape: LowRankShape, w: &mut [f32], factors: Factors<'_>) -> bool {
    if !shape.fits(w, factors.coef, factors.basis) {
        return false;
    }
    add_lowrank_ref_cols(shape, w, factors, 0);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Small pseudo-random values in [-0.05, 0.05) from `seed` (xorshift).
    fn values(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        }
    }

    fn run(isa: Isa, shape: LowRankShape, seed: u64, fused: bool) {
        let mut next = values(seed);
        let w: Vec<f32> = (0..shape.rows * shape.cols)
            .map(|_| next() * 10.0)
            .collect();
        let coef: Vec<f32> = (0..shape.rows * shape.r).map(|_| next()).collect();
        let basis: Vec<f32> = (0..shape.r * shape.cols).map(|_| next()).collect();
        let f = Factors {
            coef: &coef,
            basis: &basis,
            scale: 2.0,
            fused,
        };
        let mut want = w.clone();
        assert!(add_lowrank_ref(shape, &mut want, f));
        let mut got = w;
        assert!(add_lowrank_with(isa, shape, &mut got, f));
        let wb: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
        let gb: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
        assert_eq!(wb, gb, "{isa:?} {shape:?} fused={fused}");
    }

    /// f16 rows through every kernel, out of place and in place, against the f16 reference and
    /// against the f32 reference rounded by `half` (what widen, add, narrow did before).
    fn run_f16(isa: Isa, shape: LowRankShape, seed: u64, fused: bool) {
        let mut next = values(seed);
        let src: Vec<u8> = (0..shape.rows * shape.cols)
            .flat_map(|_| half::f16::from_f32(next() * 10.0).to_le_bytes())
            .collect();
        let coef: Vec<f32> = (0..shape.rows * shape.r).map(|_| next()).collect();
        let basis: Vec<f32> = (0..shape.r * shape.cols).map(|_| next()).collect();
        let f = Factors {
            coef: &coef,
            basis: &basis,
            scale: 2.0,
            fused,
        };
        let mut wide: Vec<f32> = src
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        assert!(add_lowrank_ref(shape, &mut wide, f));
        let want: Vec<u8> = wide
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let mut by_ref = vec![0u8; src.len()];
        assert!(add_lowrank_f16_ref(shape, Some(&src), &mut by_ref, f));
        assert_eq!(by_ref, want, "f16 reference {shape:?} fused={fused}");
        let mut got = vec![0u8; src.len()];
        assert!(add_lowrank_f16_with(isa, shape, Some(&src), &mut got, f));
        assert_eq!(got, want, "{isa:?} f16 {shape:?} fused={fused}");
        let mut inplace = src.clone();
        assert!(add_lowrank_f16_with(isa, shape, None, &mut inplace, f));
        assert_eq!(
            inplace, want,
            "{isa:?} f16 in place {shape:?} fused={fused}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn simd_f16_equals_reference(rows in 1usize..15, cols in 1usize..200, r in 1usize..20,
                                     seed in any::<u64>(), fused in any::<bool>()) {
            for isa in Isa::ALL {
                if isa.is_available() {
                    run_f16(isa, LowRankShape { rows, cols, r }, seed, fused);
                }
            }
        }

        #[test]
        fn simd_equals_reference(rows in 1usize..11, cols in 1usize..150, r in 1usize..20,
                                 seed in any::<u64>(), fused in any::<bool>()) {
            for isa in Isa::ALL {
                if isa.is_available() {
                    run(isa, LowRankShape { rows, cols, r }, seed, fused);
                }
            }
        }
    }

    #[test]
    fn wide_rows_match() {
        for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
            run_f16(
                isa,
                LowRankShape {
                    rows: 13,
                    cols: 4096 + 80 + 3,
                    r: 64,
                },
                11,
                true,
            );
            run(
                isa,
                LowRankShape {
                    rows: 9,
                    cols: 1000,
                    r: 64,
                },
                7,
                false,
            );
            run(
                isa,
                LowRankShape {
                    rows: 5,
                    cols: 4096,
                    r: 8,
                },
                9,
                true,
            );
        }
    }

    /// Throughput of the merge's shapes: `cargo test --release -p kiln-quant lowrank_gflops --
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn lowrank_gflops() {
        for (rows, cols) in [(64usize, 4096usize), (64, 11008), (192, 4096), (192, 11008)] {
            let r = 64;
            let shape = LowRankShape { rows, cols, r };
            let mut w = vec![0.5f32; rows * cols];
            let coef = vec![0.25f32; rows * r];
            let basis = vec![0.125f32; r * cols];
            let f = Factors {
                coef: &coef,
                basis: &basis,
                scale: 1e-9,
                fused: true,
            };
            // this thread's CPU seconds (the machine may be shared), from /proc where present
            let cpu = || -> Option<f64> {
                let st = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
                let f: Vec<&str> = st.rsplit_once(')')?.1.split_whitespace().collect();
                let ticks: f64 =
                    f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
                Some(ticks / 100.0)
            };
            let reps = 400;
            let (t, c) = (std::time::Instant::now(), cpu());
            for _ in 0..reps {
                assert!(add_lowrank(shape, &mut w, f));
            }
            let s = match (c, cpu()) {
                (Some(a), Some(b)) if b > a => b - a,
                _ => t.elapsed().as_secs_f64(),
            };
            let flop = 2.0 * (rows * cols * r * reps) as f64;
            println!(
                "{rows}x{cols} r={r} {:?}: {:.1} GFLOP/s per CPU second (one thread)",
                Isa::current(),
                flop / s / 1e9
            );
        }
    }

    #[test]
    fn mismatched_lengths_are_refused() {
        let shape = LowRankShape {
            rows: 2,
            cols: 3,
            r: 1,
        };
        let mut w = vec![0.0; 5];
        let mut h = vec![0u8; 12];
        let f = Factors {
            coef: &[1.0, 1.0],
            basis: &[1.0; 3],
            scale: 1.0,
            fused: false,
        };
        assert!(!add_lowrank_f16(shape, Some(&[0u8; 10]), &mut h, f));
        assert!(!add_lowrank_f16(shape, None, &mut h[..10], f));
        assert!(!add_lowrank(shape, &mut w, f));
    }
}
