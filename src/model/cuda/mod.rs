//! The CUDA backend's host side so far: a safe probe for a device, the CUDA C kernels (compiled at
//! run time with NVRTC for the device's architecture) and their launch shapes.
//!
//! Everything goes through cudarc with dynamic loading: the build needs no CUDA toolkit, and
//! `libcuda.so` / `libnvrtc.so.13` are opened only when asked for. cudarc panics when a library it
//! needs is missing, so each entry point checks for the library first and returns a [`CudaError`].
//! The evaluator itself (weights on the device, the matmuls, attention) lands in later commits;
//! until then [`super::device::Device::check`] refuses `--device cuda` clearly.

use std::ffi::CString;
use std::path::PathBuf;

use cudarc::driver::CudaContext;
use cudarc::nvrtc::result as nvrtc;

/// Threads per block of every reduction kernel; the kernels get it as `-DKILN_BLOCK` and reduce
/// over exactly this many threads, so the order of every sum is fixed.
pub const BLOCK: u32 = 256;

/// The architectures the kernel-compile check covers (A100, A10/A40, L4/L40, H100/H200).
pub const CHECK_ARCHS: [(u32, u32); 4] = [(8, 0), (8, 6), (8, 9), (9, 0)];

/// The prelude every kernel file is compiled with (prepended, not `#include`d).
pub const PRELUDE: &str = include_str!("kernels/common.cuh");

/// One CUDA C file of kernels and the `extern "C"` functions it defines.
#[derive(Clone, Copy, Debug)]
pub struct KernelFile {
    /// The file name under `src/model/cuda/kernels/`.
    pub file: &'static str,
    /// Its source.
    pub source: &'static str,
    /// The kernels it defines.
    pub functions: &'static [&'static str],
}

impl KernelFile {
    /// The source NVRTC compiles: [`PRELUDE`], then the file.
    pub fn program(&self) -> String {
        format!("{PRELUDE}\n#line 1 \"{}\"\n{}", self.file, self.source)
    }
}

/// Every kernel file (a test checks that each `.cu` file in the folder is listed here).
pub const KERNELS: &[KernelFile] = &[
    KernelFile {
        file: "elementwise.cu",
        source: include_str!("kernels/elementwise.cu"),
        functions: &["add_f32", "swiglu_f32"],
    },
    KernelFile {
        file: "rms_norm.cu",
        source: include_str!("kernels/rms_norm.cu"),
        functions: &["rms_norm_f32"],
    },
    KernelFile {
        file: "rope.cu",
        source: include_str!("kernels/rope.cu"),
        functions: &["rope_f32"],
    },
    KernelFile {
        file: "embed.cu",
        source: include_str!("kernels/embed.cu"),
        functions: &["embed_f32", "embed_f16", "embed_bf16"],
    },
    KernelFile {
        file: "nll.cu",
        source: include_str!("kernels/nll.cu"),
        functions: &["nll_f32"],
    },
];

/// What can go wrong on the way to a CUDA device.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(
        "no NVIDIA driver found: libcuda.so was not found (install the NVIDIA driver, or evaluate \
         with --device cpu, which works everywhere)"
    )]
    NoDriver,
    #[error("{}", no_such_device(*index, *count))]
    NoSuchDevice { index: usize, count: usize },
    #[error("the CUDA driver failed to {what}: {detail}")]
    Driver { what: &'static str, detail: String },
    #[error(
        "NVRTC was not found: libnvrtc.so.13 could not be loaded (put the folder that holds it on \
         LD_LIBRARY_PATH; `bash scripts/cuda-kernels.sh` fetches it)"
    )]
    NoNvrtc,
    #[error("NVRTC could not compile {file} for {arch}: {detail}")]
    Compile {
        file: &'static str,
        arch: String,
        detail: String,
    },
}

fn no_such_device(index: usize, count: usize) -> String {
    let pick = match count {
        0 => String::new(),
        1 => ", or pick cuda:0".to_string(),
        n => format!(", or pick cuda:0..cuda:{}", n - 1),
    };
    let s = if count == 1 { "" } else { "s" };
    format!(
        "there is no CUDA device {index}: the driver sees {count} device{s} (evaluate with \
         --device cpu{pick})"
    )
}

/// The device a probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub index: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (u32, u32),
    pub total_bytes: usize,
}

/// Whether the NVIDIA driver library (`libcuda.so`) can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the driver's library names and closes what it
    // opened; it calls nothing in the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether NVRTC (`libnvrtc.so.13`) can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: as in driver_present: only dlopen / dlclose of NVRTC's library names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

fn driver_error(what: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError {
    move |e| CudaError::Driver {
        what,
        detail: format!("{e:?}"),
    }
}

/// Finds CUDA device `index` and opens its primary context, or says why not. Never panics: the
/// driver library is looked for before cudarc touches it.
pub fn probe(index: usize) -> Result<DeviceInfo, CudaError> {
    if !driver_present() {
        return Err(CudaError::NoDriver);
    }
    let count = match CudaContext::device_count() {
        Ok(n) => usize::try_from(n).unwrap_or(0),
        // cuInit reports "no device" when the driver is installed but no GPU is visible
        Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => 0,
        Err(e) => return Err(driver_error("start")(e)),
    };
    if index >= count {
        return Err(CudaError::NoSuchDevice { index, count });
    }
    let ctx = CudaContext::new(index).map_err(driver_error("open the device"))?;
    let name = ctx.name().map_err(driver_error("name the device"))?;
    let (major, minor) = ctx
        .compute_capability()
        .map_err(driver_error("read the compute capability"))?;
    let total_bytes = ctx
        .total_mem()
        .map_err(driver_error("read the memory size"))?;
    Ok(DeviceInfo {
        index,
        name,
        capability: (
            u32::try_from(major).unwrap_or(0),
            u32::try_from(minor).unwrap_or(0),
        ),
        total_bytes,
    })
}

/// `sm_XY` for a compute capability (ptxas's `-arch`).
pub fn sm_name((major, minor): (u32, u32)) -> String {
    format!("sm_{major}{minor}")
}

/// The NVRTC options of every kernel compile for a compute capability: the virtual architecture
/// (PTX out), the block size, and the arithmetic the kernels' bit-matching relies on (no
/// contraction into fused multiply-adds, IEEE division and square root, no flush to zero).
pub fn nvrtc_options(capability: (u32, u32)) -> Vec<String> {
    vec![
        format!(
            "--gpu-architecture=compute_{}{}",
            capability.0, capability.1
        ),
        format!("-DKILN_BLOCK={BLOCK}"),
        "--fmad=false".to_string(),
        "--prec-div=true".to_string(),
        "--prec-sqrt=true".to_string(),
        "--ftz=false".to_string(),
    ]
}

/// A kernel file compiled to PTX, with NVRTC's log (empty when it had nothing to say; warnings
/// otherwise, which the kernel-compile check refuses).
#[derive(Clone, Debug)]
pub struct Compiled {
    pub ptx: String,
    pub log: String,
}

/// The text of a NUL-terminated buffer NVRTC filled.
fn c_text(buf: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .map(|&c| c as u8)
        .take_while(|&c| c != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// An NVRTC program, destroyed when dropped.
struct Program(cudarc::nvrtc::sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: self.0 came from create_program and is destroyed only here, once.
        let _ = unsafe { nvrtc::destroy_program(self.0) };
    }
}

/// Compiles `kernel` to PTX for `capability` with NVRTC; `include` holds the folders with the CUDA
/// headers (`cuda_fp16.h`). Needs `libnvrtc.so.13` but no GPU and no driver. NVRTC's log comes
/// back too (cudarc's `compile_ptx_with_opts` drops it when the compile succeeds, and with it any
/// warning).
pub fn compile_ptx(
    kernel: &KernelFile,
    capability: (u32, u32),
    include: &[PathBuf],
) -> Result<Compiled, CudaError> {
    if !nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let fail = |detail: String| CudaError::Compile {
        file: kernel.file,
        arch: sm_name(capability),
        detail,
    };
    let mut opts = nvrtc_options(capability);
    opts.extend(
        include
            .iter()
            .map(|p| format!("--include-path={}", p.to_string_lossy())),
    );
    let src =
        CString::new(kernel.program()).map_err(|_| fail("a NUL byte in the source".into()))?;
    let name = CString::new(kernel.file).map_err(|_| fail("a NUL byte in the name".into()))?;
    // src and name outlive the program (dropped after it, at the end of this function)
    let prog =
        Program(nvrtc::create_program(&src, Some(&name)).map_err(|e| fail(format!("{e:?}")))?);
    // SAFETY: prog.0 is a live program from create_program, destroyed only by Program's drop.
    let compiled = unsafe { nvrtc::compile_program(prog.0, &opts) };
    // SAFETY: as above.
    let log = unsafe { nvrtc::get_program_log(prog.0) }
        .map(|l| c_text(&l))
        .unwrap_or_default();
    if let Err(e) = compiled {
        return Err(fail(format!("{e:?}\n{log}")));
    }
    // SAFETY: as above; the program compiled.
    let ptx = unsafe { nvrtc::get_ptx(prog.0) }.map_err(|e| fail(format!("{e:?}")))?;
    Ok(Compiled {
        ptx: c_text(&ptx),
        log: log.trim().to_string(),
    })
}

/// A kernel launch: grid and block sizes (x only) and dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: u32,
    pub block: u32,
    pub shared_bytes: u32,
}

/// Most blocks an element-wise (grid-stride) kernel is launched with; more elements loop.
pub const MAX_ELEMENTWISE_BLOCKS: u32 = 65_535;

/// The launch of an element-wise kernel over `n` elements (`add_f32`, `swiglu_f32`): one thread
/// per element up to [`MAX_ELEMENTWISE_BLOCKS`] blocks, grid-stride beyond. None when `n` is 0
/// (nothing to launch).
pub fn elementwise_launch(n: usize) -> Option<Launch> {
    if n == 0 {
        return None;
    }
    let blocks = n.div_ceil(BLOCK as usize);
    Some(Launch {
        grid: u32::try_from(blocks)
            .unwrap_or(u32::MAX)
            .min(MAX_ELEMENTWISE_BLOCKS),
        block: BLOCK,
        shared_bytes: 0,
    })
}

/// The launch of a one-block-per-row kernel (`rms_norm_f32`, `embed_*`, `nll_f32`) over `rows`
/// rows; None when there are none, an error when there are more rows than a grid holds.
pub fn row_launch(rows: usize) -> Result<Option<Launch>, String> {
    if rows == 0 {
        return Ok(None);
    }
    let grid = u32::try_from(rows)
        .ok()
        .filter(|&g| g <= i32::MAX as u32)
        .ok_or_else(|| format!("{rows} rows do not fit one CUDA grid"))?;
    Ok(Some(Launch {
        grid,
        block: BLOCK,
        shared_bytes: 0,
    }))
}

/// The launch of `rope_f32` over `rows` rows of `n_rot` rotated dimensions per head: a row per
/// block and the row's cos/sin pairs (`n_rot` floats) in dynamic shared memory.
pub fn rope_launch(rows: usize, n_rot: usize) -> Result<Option<Launch>, String> {
    if !n_rot.is_multiple_of(2) || n_rot > 4096 {
        return Err(format!(
            "{n_rot} rotated dimensions cannot be rotated in pairs"
        ));
    }
    Ok(row_launch(rows)?.map(|l| Launch {
        shared_bytes: (n_rot * 4) as u32,
        ..l
    }))
}

/// `theta_scale` of `rope_f32`: `freq_base^(-2/n_rot)` in f32, as the CPU backend computes it.
pub fn rope_theta_scale(freq_base: f32, n_rot: usize) -> f32 {
    freq_base.powf(-2.0 / n_rot as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_file_is_listed_and_defines_its_functions() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/model/cuda/kernels");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cu"))
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = KERNELS.iter().map(|k| k.file.to_string()).collect();
        listed.sort();
        assert_eq!(
            on_disk,
            listed,
            "every .cu file in {} is in KERNELS",
            dir.display()
        );
        for k in KERNELS {
            assert!(k.source.starts_with("// kiln CUDA kernels: "), "{}", k.file);
            for f in k.functions {
                let def = format!("extern \"C\" __global__ void {f}(");
                assert!(k.source.contains(&def), "{} defines {f}", k.file);
            }
            let defined = k.source.matches("__global__").count();
            assert_eq!(
                defined,
                k.functions.len(),
                "{} lists all its kernels",
                k.file
            );
            assert!(!k.source.contains("atomicAdd"), "{}: no atomics", k.file);
        }
        assert!(PRELUDE.starts_with("// kiln CUDA kernels: "));
        assert!(BLOCK.is_power_of_two());
    }

    #[test]
    fn options_name_the_architecture_and_the_arithmetic() {
        let o = nvrtc_options((9, 0));
        for want in [
            "--gpu-architecture=compute_90",
            &format!("-DKILN_BLOCK={BLOCK}"),
            "--fmad=false",
            "--ftz=false",
        ] {
            assert!(o.iter().any(|x| x == want), "{want}: {o:?}");
        }
        assert_eq!(sm_name((8, 6)), "sm_86");
        let names: Vec<String> = CHECK_ARCHS.iter().map(|&c| sm_name(c)).collect();
        assert_eq!(names, ["sm_80", "sm_86", "sm_89", "sm_90"]);
    }

    #[test]
    fn elementwise_launches_cover_every_element() {
        assert_eq!(elementwise_launch(0), None);
        for n in [1usize, 255, 256, 257, 4096 * 512, 1 << 40] {
            let l = elementwise_launch(n).unwrap();
            assert_eq!(l.block, BLOCK);
            assert!(
                l.grid >= 1 && l.grid <= MAX_ELEMENTWISE_BLOCKS,
                "{n}: {l:?}"
            );
            // one thread per element, or the full grid looping over the rest
            let threads = l.grid as usize * l.block as usize;
            assert!(
                threads >= n || l.grid == MAX_ELEMENTWISE_BLOCKS,
                "{n}: {l:?}"
            );
            // no block is entirely idle
            assert!((l.grid as usize - 1) * (BLOCK as usize) < n, "{n}: {l:?}");
        }
        assert_eq!(elementwise_launch(257).unwrap().grid, 2);
    }

    #[test]
    fn row_launches_are_one_block_per_row() {
        assert_eq!(row_launch(0), Ok(None));
        let l = row_launch(512).unwrap().unwrap();
        assert_eq!((l.grid, l.block, l.shared_bytes), (512, BLOCK, 0));
        assert!(row_launch(usize::MAX).is_err());
        let r = rope_launch(7, 128).unwrap().unwrap();
        assert_eq!((r.grid, r.shared_bytes), (7, 512));
        assert!(rope_launch(7, 127).is_err());
        assert_eq!(rope_launch(0, 128), Ok(None));
    }

    #[test]
    fn rope_theta_scale_is_the_cpu_expression() {
        assert_eq!(
            rope_theta_scale(10000.0, 128).to_bits(),
            10000f32.powf(-2.0 / 128.0).to_bits()
        );
        assert_eq!(rope_theta_scale(1.0, 64), 1.0);
    }

    #[test]
    fn probing_never_panics() {
        // this machine and CI have no driver: the error says so; on a GPU machine a missing index
        // is named with the count
        match probe(usize::MAX) {
            Err(CudaError::NoDriver) => assert!(!driver_present()),
            Err(CudaError::NoSuchDevice { count, .. }) => assert!(driver_present(), "{count}"),
            other => panic!("{other:?}"),
        }
        let e = CudaError::NoDriver.to_string();
        assert!(
            e.contains("no NVIDIA driver found") && e.contains("libcuda.so"),
            "{e}"
        );
        assert!(e.contains("--device cpu"), "{e}");
        let e = CudaError::NoSuchDevice { index: 3, count: 2 }.to_string();
        assert!(
            e.contains("device 3") && e.contains("2 devices") && e.contains("cuda:1"),
            "{e}"
        );
        let e = CudaError::NoSuchDevice { index: 1, count: 1 }.to_string();
        assert!(e.contains("1 device ") && e.contains("cuda:0"), "{e}");
        let e = CudaError::NoSuchDevice { index: 0, count: 0 }.to_string();
        assert!(e.contains("0 devices"), "{e}");
    }
}
