//! `cargo bench -p kiln-quant`: single-threaded throughput (MB/s of f32 input) of the reference
//! quantizers vs the SIMD kernels of every instruction set this CPU has, per type.
//!
//! Plain `std::time` measurement: each case runs for at least `KILN_BENCH_SECS` (default 0.5 s).
//! Optional argument: a substring of the type names to run (e.g. `cargo bench -p kiln-quant -- q4_k`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use kiln_quant::simd::{dequantize_row_with, quantize_row_with, Isa};
use kiln_quant::GgmlType;

const N_PER_ROW: usize = 4096;
const ROWS: usize = 64;

/// Deterministic weight-like values (sum of uniforms, a few outliers).
fn weights(n: usize) -> Vec<f32> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut unit = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    (0..n)
        .map(|i| {
            let g: f32 = (0..4).map(|_| unit()).sum::<f32>() * 0.02;
            if i % 997 == 0 {
                g * 20.0
            } else {
                g
            }
        })
        .collect()
}

fn time(min: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut iters = 0u32;
    while start.elapsed() < min {
        f();
        iters += 1;
    }
    start.elapsed().as_secs_f64() / f64::from(iters)
}

fn main() {
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(|a| a.to_lowercase());
    let secs: f64 = std::env::var("KILN_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.5);
    let min = Duration::from_secs_f64(secs);
    let x = weights(N_PER_ROW * ROWS);
    let mb = (x.len() * 4) as f64 / 1e6;
    let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.is_available()).collect();
    print!("{:<10}", "type");
    for isa in &isas {
        print!("{:>14}", format!("{isa:?} MB/s"));
    }
    println!("{:>10}", "best/ref");
    let types = [
        GgmlType::Q4K,
        GgmlType::Q6K,
        GgmlType::Q5K,
        GgmlType::Q3K,
        GgmlType::Q2K,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::F16,
        GgmlType::BF16,
    ];
    for ty in types {
        let name = ty.to_string().to_lowercase();
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let rb = ty.row_size(N_PER_ROW as u64).unwrap_or(0) as usize;
        let mut out = vec![0u8; rb * ROWS];
        let mut rates = Vec::new();
        for &isa in &isas {
            let t = time(min, || {
                for (s, d) in x.chunks(N_PER_ROW).zip(out.chunks_mut(rb)) {
                    quantize_row_with(isa, ty, black_box(s), d).unwrap_or(());
                }
                black_box(&out);
            });
            rates.push(mb / t);
        }
        print!("{name:<10}");
        for r in &rates {
            print!("{r:>14.1}");
        }
        let best = rates.iter().cloned().fold(0.0, f64::max);
        println!("{:>9.1}x", best / rates[0]);
    }
    // F16 -> F32 widening (every F16 input row goes through it), MB/s of f32 output
    if filter
        .as_ref()
        .is_none_or(|f| "f16_to_f32".contains(f.as_str()))
    {
        let rb = N_PER_ROW * 2;
        let mut h = vec![0u8; rb * ROWS];
        for (s, d) in x.chunks(N_PER_ROW).zip(h.chunks_mut(rb)) {
            quantize_row_with(Isa::Scalar, GgmlType::F16, s, d).unwrap_or(());
        }
        let mut y = vec![0f32; x.len()];
        print!("{:<10}", "f16->f32");
        let mut rates = Vec::new();
        for &isa in &isas {
            let t = time(min, || {
                for (s, d) in h.chunks(rb).zip(y.chunks_mut(N_PER_ROW)) {
                    dequantize_row_with(isa, GgmlType::F16, black_box(s), d).unwrap_or(());
                }
                black_box(&y);
            });
            rates.push(mb / t);
            print!("{:>14.1}", mb / t);
        }
        let best = rates.iter().cloned().fold(0.0, f64::max);
        println!("{:>9.1}x", best / rates[0]);
    }
}
