//! Low-rank updates `W += scale·(C·B)` (a LoRA merge), with a scalar reference and run-time
//! selected AVX2 / AVX-512 kernels whose results are bit-identical to it.
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
        let mul = |a: usize, b: usize| a.checked_mul(b);
        mul(self.rows, self.cols) == Some(w.len())
            && mul(self.rows, self.r) == Some(coef.len())
            && mul(self.r, self.cols) == Some(basis.len())
    }
}

/// `w += scale·(coef·basis)` with the kernels of [`Isa::current`]. Returns `false` (and leaves
/// `w` untouched) when the slice lengths do not match `shape`.
pub fn add_lowrank(
    shape: LowRankShape,
    w: &mut [f32],
    coef: &[f32],
    basis: &[f32],
    scale: f32,
    fused: bool,
) -> bool {
    add_lowrank_with(Isa::current(), shape, w, coef, basis, scale, fused)
}

/// [`add_lowrank`] on a chosen instruction set (an unavailable one falls back to the reference).
pub fn add_lowrank_with(
    isa: Isa,
    shape: LowRankShape,
    w: &mut [f32],
    coef: &[f32],
    basis: &[f32],
    scale: f32,
    fused: bool,
) -> bool {
    if !shape.fits(w, coef, basis) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if isa != Isa::Scalar && isa.is_available() {
            let done = x86::add_lowrank(isa, shape, w, coef, basis, scale, fused);
            // columns past the last full strip
            add_lowrank_ref_cols(shape, w, coef, basis, scale, fused, done);
            return true;
        }
    }
    let _ = isa;
    add_lowrank_ref_cols(shape, w, coef, basis, scale, fused, 0);
    true
}

/// The reference: columns `from..cols` of every row.
fn add_lowrank_ref_cols(
    shape: LowRankShape,
    w: &mut [f32],
    coef: &[f32],
    basis: &[f32],
    scale: f32,
    fused: bool,
    from: usize,
) {
    let LowRankShape { cols, r, .. } = shape;
    if cols == 0 || from >= cols {
        return;
    }
    for (wr, cr) in w.chunks_exact_mut(cols).zip(coef.chunks_exact(r.max(1))) {
        for (j, x) in wr.iter_mut().enumerate().skip(from) {
            let mut acc = 0.0f32;
            for (k, &ck) in cr.iter().take(r).enumerate() {
                let bv = basis[k * cols + j];
                acc = if fused {
                    ck.mul_add(bv, acc)
                } else {
                    acc + ck * bv
                };
            }
            *x += scale * acc;
        }
    }
}

/// The scalar reference over the whole matrix. Returns `false` when the lengths do not match.
pub fn add_lowrank_ref(
    shape: LowRankShape,
    w: &mut [f32],
    coef: &[f32],
    basis: &[f32],
    scale: f32,
    fused: bool,
) -> bool {
    if !shape.fits(w, coef, basis) {
        return false;
    }
    add_lowrank_ref_cols(shape, w, coef, basis, scale, fused, 0);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(isa: Isa, shape: LowRankShape, seed: u64, fused: bool) {
        let mut s = seed | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        };
        let w: Vec<f32> = (0..shape.rows * shape.cols)
            .map(|_| next() * 10.0)
            .collect();
        let coef: Vec<f32> = (0..shape.rows * shape.r).map(|_| next()).collect();
        let basis: Vec<f32> = (0..shape.r * shape.cols).map(|_| next()).collect();
        let mut want = w.clone();
        assert!(add_lowrank_ref(shape, &mut want, &coef, &basis, 2.0, fused));
        let mut got = w;
        assert!(add_lowrank_with(
            isa, shape, &mut got, &coef, &basis, 2.0, fused
        ));
        let wb: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
        let gb: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
        assert_eq!(wb, gb, "{isa:?} {shape:?} fused={fused}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
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
        for (rows, cols) in [(64usize, 4096usize), (64, 11008)] {
            let r = 64;
            let shape = LowRankShape { rows, cols, r };
            let mut w = vec![0.5f32; rows * cols];
            let coef = vec![0.25f32; rows * r];
            let basis = vec![0.125f32; r * cols];
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
                assert!(add_lowrank(shape, &mut w, &coef, &basis, 1e-9, true));
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
        assert!(!add_lowrank(
            shape,
            &mut w,
            &[1.0, 1.0],
            &[1.0; 3],
            1.0,
            false
        ));
    }
}
