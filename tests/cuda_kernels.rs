//! The CUDA kernels compile and assemble WITHOUT a GPU: every kernel file through NVRTC (via cudarc)
//! for sm_80, sm_86, sm_89 and sm_90, each PTX through `ptxas -v`, failing on errors, warnings (of
//! NVRTC or ptxas) or local memory (spills or a stack frame), printing registers and shared memory
//! per kernel.
//!
//! Ignored by default: it needs NVIDIA's CUDA 13.0 wheels (NVRTC, headers, ptxas), which
//! `bash scripts/cuda-kernels.sh --check` fetches and runs it with; .ci/run does the same.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::model::cuda::{self, KERNELS};

/// One kernel's resources as ptxas reports them.
#[derive(Debug, Default)]
struct Usage {
    registers: u32,
    shared: u64,
    stack: u64,
    spill_stores: u64,
    spill_loads: u64,
    local: u64,
}

/// The number before `unit` in `line` (`"0 bytes spill stores"` → 0 for "bytes spill stores").
fn number_before(line: &str, unit: &str) -> Option<u64> {
    let at = line.find(unit)?;
    line[..at].split_whitespace().last()?.parse().ok()
}

/// Parses `ptxas -v` output into per-function usage; Err names every warning or error line.
fn parse_ptxas(log: &str) -> Result<Vec<(String, Usage)>, String> {
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("warning") || l.contains("error")
        })
        .collect();
    if !bad.is_empty() {
        return Err(bad.join("\n"));
    }
    let mut out: Vec<(String, Usage)> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push((name, Usage::default()));
        } else if let Some((_, u)) = out.last_mut() {
            if line.contains("bytes stack frame") {
                u.stack = number_before(line, "bytes stack frame").unwrap_or(u64::MAX);
                u.spill_stores = number_before(line, "bytes spill stores").unwrap_or(u64::MAX);
                u.spill_loads = number_before(line, "bytes spill loads").unwrap_or(u64::MAX);
            }
            if line.contains("Used ") && line.contains("registers") {
                u.registers = number_before(line, "registers").unwrap_or(u32::MAX as u64) as u32;
                u.shared = number_before(line, "bytes smem").unwrap_or(0);
                u.local = number_before(line, "bytes lmem").unwrap_or(0);
            }
        }
    }
    Ok(out)
}

#[test]
fn ptxas_output_is_parsed_and_warnings_fail() {
    let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'rms_norm_f32' for 'sm_90'\n\
ptxas info    : Function properties for rms_norm_f32\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 18 registers, used 1 barriers, 2048 bytes smem, 380 bytes cmem[0]\n";
    let u = parse_ptxas(log).unwrap();
    assert_eq!(u.len(), 1);
    assert_eq!(u[0].0, "rms_norm_f32");
    assert_eq!(
        (u[0].1.registers, u[0].1.shared, u[0].1.stack),
        (18, 2048, 0)
    );
    assert_eq!(
        (u[0].1.spill_stores, u[0].1.spill_loads, u[0].1.local),
        (0, 0, 0)
    );
    let spill = log.replace("0 bytes spill stores", "8 bytes spill stores");
    assert_eq!(parse_ptxas(&spill).unwrap()[0].1.spill_stores, 8);
    assert!(parse_ptxas(&format!("{log}ptxas warning : Too big maxrregcount\n")).is_err());
}

fn wheels() -> PathBuf {
    let Some(dir) = std::env::var_os("KILN_CUDA_WHEELS") else {
        panic!(
            "KILN_CUDA_WHEELS is not set: run `bash scripts/cuda-kernels.sh --check` (it fetches \
             the CUDA 13.0 wheels and runs this test with the folder and LD_LIBRARY_PATH set)"
        );
    };
    PathBuf::from(dir)
}

fn ptxas(bin: &Path, ptx: &str, sm: &str, dir: &Path) -> String {
    let src = dir.join(format!("kernel-{sm}.ptx"));
    std::fs::write(&src, ptx).unwrap();
    let o = Command::new(bin)
        .arg(format!("-arch={sm}"))
        .arg("-v")
        .arg(&src)
        .arg("-o")
        .arg(dir.join(format!("kernel-{sm}.cubin")))
        .output()
        .unwrap_or_else(|e| panic!("{} does not run: {e}", bin.display()));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "ptxas -arch={sm} failed:\n{log}");
    log
}

#[test]
#[ignore = "needs the CUDA 13.0 wheels: bash scripts/cuda-kernels.sh --check"]
fn every_kernel_compiles_and_assembles_for_every_architecture() {
    let dir = wheels();
    let include = [dir.join("include")];
    let bin = dir.join("bin/ptxas");
    assert!(
        cuda::nvrtc_present(),
        "libnvrtc.so.13 cannot be loaded: set LD_LIBRARY_PATH={}",
        dir.join("lib").display()
    );
    // the check can see a warning: NVRTC's log of a successful compile comes back
    let noisy = cuda::KernelFile {
        file: "noisy.cu",
        source: "extern \"C\" __global__ void noisy(float* x) { int unused = 1; x[0] = 0.0f; }\n",
        functions: &["noisy"],
    };
    let c = cuda::compile_ptx(&noisy, (9, 0), &include).unwrap();
    assert!(
        c.log.contains("warning") && c.ptx.contains("noisy"),
        "{c:?}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut table = vec![format!(
        "{:<16} {:<14} {:>6} {:>5} {:>10} {:>6} {:>7}",
        "file", "kernel", "arch", "regs", "smem B", "stack", "spill"
    )];
    for k in KERNELS {
        for &cap in &cuda::CHECK_ARCHS {
            let sm = cuda::sm_name(cap);
            let ptx = match cuda::compile_ptx(k, cap, &include) {
                Ok(c) if c.log.is_empty() => c.ptx,
                Ok(c) => {
                    failures.push(format!("{} {sm}: NVRTC says\n{}", k.file, c.log));
                    continue;
                }
                Err(e) => {
                    failures.push(format!("{e}"));
                    continue;
                }
            };
            let log = ptxas(&bin, &ptx, &sm, tmp.path());
            let usage = match parse_ptxas(&log) {
                Ok(u) => u,
                Err(bad) => {
                    failures.push(format!("{} {sm}: ptxas says\n{bad}", k.file));
                    continue;
                }
            };
            for f in k.functions {
                if !usage.iter().any(|(n, _)| n == f) {
                    failures.push(format!("{} {sm}: ptxas did not assemble {f}", k.file));
                }
            }
            for (name, u) in &usage {
                table.push(format!(
                    "{:<16} {:<14} {:>6} {:>5} {:>10} {:>6} {:>7}",
                    k.file,
                    name,
                    sm,
                    u.registers,
                    u.shared,
                    u.stack,
                    u.spill_stores + u.spill_loads
                ));
                // a stack frame is local memory too (an array indexed at run time, a call)
                if u.stack != 0 || u.spill_stores != 0 || u.spill_loads != 0 || u.local != 0 {
                    failures.push(format!(
                        "{} {name} {sm}: local memory or spills: {u:?}",
                        k.file
                    ));
                }
            }
        }
    }
    println!("{}", table.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
