//! `kiln quantize`: a GGUF file to any llama.cpp quantization level, byte-identical to llama-quantize.

use crate::progress;
use crate::quant_plan::{self, Ftype, ModelShape, Overrides, PlanTensor, Planner};
use crate::Outcome;
use anyhow::{anyhow, bail, Context, Result};
use kiln_formats::gguf::{GgufFile, GgufWriter, TensorInfo};
use kiln_quant::GgmlType;
use regex::Regex;
use std::path::PathBuf;
use std::time::Instant;

const TYPES_HELP: &str =
    "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, \
Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K (aliases Q3_K, Q4_K, Q5_K; case-insensitive)";

/// Arguments of `kiln quantize` (llama-quantize's positional form and flag names).
#[derive(clap::Args)]
#[command(after_help = format!("TYPE is one of {TYPES_HELP}.\n\nExample:\n  kiln quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M 8"))]
pub struct Args {
    /// Input GGUF (normally F16).
    pub input: PathBuf,
    /// Output GGUF (not needed with --dry-run).
    pub output: Option<PathBuf>,
    /// Quantization level, e.g. Q4_K_M.
    #[arg(value_name = "TYPE")]
    pub ftype: Option<String>,
    /// Threads (default: all cores).
    #[arg(value_name = "THREADS")]
    pub nthreads: Option<usize>,
    /// Threads (same as the positional THREADS).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// No mix rules: every quantizable tensor gets TYPE's default type (shape fallbacks still apply).
    #[arg(long)]
    pub pure: bool,
    /// Type of output.weight.
    #[arg(long, value_name = "T")]
    pub output_tensor_type: Option<String>,
    /// Type of token_embd.weight.
    #[arg(long, value_name = "T")]
    pub token_embedding_type: Option<String>,
    /// REGEX=TYPE: tensors whose name matches REGEX get TYPE (repeatable; first match wins).
    #[arg(long, value_name = "REGEX=TYPE")]
    pub tensor_type: Vec<String>,
    /// Leave output.weight unquantized.
    #[arg(long)]
    pub leave_output_tensor: bool,
    /// Allow an input whose tensors are already quantized.
    #[arg(long)]
    pub allow_requantize: bool,
    /// Print the per-tensor plan with sizes and bits per weight; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
}

fn parse_type(s: &str, flag: &str) -> Result<GgmlType> {
    GgmlType::from_name(s)
        .filter(|t| *t != GgmlType::Q8K)
        .ok_or_else(|| {
            anyhow!("{flag}: unknown tensor type {s:?} (use a ggml type such as Q8_0, Q6_K, F16)")
        })
}

/// The model facts the mix rules need, from the GGUF metadata.
fn model_shape(f: &GgufFile) -> Result<ModelShape> {
    let arch = f
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .ok_or_else(|| anyhow!("{}: no general.architecture key", f.path().display()))?
        .to_string();
    if arch != "llama" {
        bail!(
            "{}: architecture {arch:?} is not supported; kiln quantizes Llama-family models (general.architecture = \"llama\")",
            f.path().display()
        );
    }
    let get = |k: &str| f.get(k).and_then(|v| v.as_u32());
    let n_layer = get("llama.block_count")
        .ok_or_else(|| anyhow!("{}: no llama.block_count key", f.path().display()))?;
    let n_head = get("llama.attention.head_count")
        .ok_or_else(|| anyhow!("{}: no llama.attention.head_count key", f.path().display()))?;
    let n_head_kv = get("llama.attention.head_count_kv").unwrap_or(n_head);
    Ok(ModelShape {
        n_layer,
        n_head,
        n_head_kv,
    })
}

/// ggml's n_dims: trailing dimensions of size 1 dropped (at least one kept), as llama-quantize writes.
fn c_shape(shape: &[u64]) -> Vec<u64> {
    let n = shape
        .iter()
        .rposition(|&d| d != 1)
        .map(|i| i + 1)
        .unwrap_or(1);
    shape[..n].to_vec()
}

pub fn run(a: Args) -> Result<Outcome> {
    let t0 = Instant::now();
    let ftype_s = a
        .ftype
        .as_deref()
        .or(if a.dry_run {
            a.output.as_ref().and_then(|o| o.to_str())
        } else {
            None
        })
        .ok_or_else(|| anyhow!("missing TYPE: one of {TYPES_HELP}"))?;
    let ftype = Ftype::parse(ftype_s)
        .ok_or_else(|| anyhow!("unknown TYPE {ftype_s:?}: use one of {TYPES_HELP}"))?;
    let mut ov = Overrides {
        pure: a.pure,
        leave_output_tensor: a.leave_output_tensor,
        ..Default::default()
    };
    if let Some(t) = &a.output_tensor_type {
        ov.output_tensor_type = Some(parse_type(t, "--output-tensor-type")?);
    }
    if let Some(t) = &a.token_embedding_type {
        ov.token_embedding_type = Some(parse_type(t, "--token-embedding-type")?);
    }
    for spec in &a.tensor_type {
        let (re, t) = spec
            .rsplit_once('=')
            .ok_or_else(|| anyhow!("--tensor-type {spec:?}: expected REGEX=TYPE"))?;
        let re = Regex::new(re).with_context(|| format!("--tensor-type {spec:?}: bad regex"))?;
        ov.tensor_types.push((re, parse_type(t, "--tensor-type")?));
    }
    if let Some(n) = a.threads.or(a.nthreads) {
        if n == 0 {
            bail!("threads must be at least 1");
        }
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }

    let input =
        GgufFile::open(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let shape = model_shape(&input)?;
    let mut order: Vec<&TensorInfo> = input.tensors.iter().collect();
    order.sort_by(|x, y| {
        quant_plan::loader_order_key(&x.name).cmp(&quant_plan::loader_order_key(&y.name))
    });
    let plan_in: Vec<PlanTensor> = order
        .iter()
        .map(|t| PlanTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            ty: t.ty,
        })
        .collect();
    let types = Planner::plan(ftype, shape, &ov, &plan_in);

    if !a.allow_requantize {
        if let Some((t, _)) = order
            .iter()
            .zip(&types)
            .find(|(t, ty)| t.ty.is_quantized() && **ty != t.ty)
        {
            bail!(
                "{}: tensor {} is already quantized ({}); requantizing loses quality twice, so it needs --allow-requantize (better: quantize from the F16 file)",
                a.input.display(),
                t.name,
                t.ty
            );
        }
    }

    let n_elements: u64 = order.iter().map(|t| t.n_elements()).sum();
    let new_sizes: Vec<u64> = order
        .iter()
        .zip(&types)
        .map(|(t, ty)| {
            ty.row_size(t.row_len()).unwrap_or(0) * (t.n_elements() / t.row_len().max(1))
        })
        .collect();
    let total_in: u64 = order.iter().map(|t| t.n_bytes()).sum();
    let total_out: u64 = new_sizes.iter().sum();
    let bpw = |b: u64| b as f64 * 8.0 / n_elements.max(1) as f64;

    if a.dry_run {
        println!(
            "{:<36} {:>22} {:>6} -> {:<6} {:>12} {:>12}",
            "tensor", "shape", "type", "new", "MiB in", "MiB out"
        );
        for ((t, ty), ns) in order.iter().zip(&types).zip(&new_sizes) {
            println!(
                "{:<36} {:>22} {:>6} -> {:<6} {:>12.3} {:>12.3}",
                t.name,
                format!("{:?}", t.shape),
                t.ty.name(),
                ty.name(),
                t.n_bytes() as f64 / (1 << 20) as f64,
                *ns as f64 / (1 << 20) as f64
            );
        }
        println!(
            "{ftype} ({}): model size {:.2} MiB ({:.2} BPW) -> quant size {:.2} MiB ({:.2} BPW)",
            ftype.description(),
            total_in as f64 / (1 << 20) as f64,
            bpw(total_in),
            total_out as f64 / (1 << 20) as f64,
            bpw(total_out)
        );
        return Ok(Outcome::Ok);
    }
    let out_path = a
        .output
        .as_ref()
        .ok_or_else(|| anyhow!("missing OUTPUT path"))?;
    if a.ftype.is_none() {
        bail!("missing TYPE: one of {TYPES_HELP}");
    }

    let meta = quant_plan::quantized_metadata(input.metadata.iter().cloned(), ftype);
    let infos: Vec<(String, Vec<u64>, GgmlType)> = order
        .iter()
        .zip(&types)
        .map(|(t, ty)| (t.name.clone(), c_shape(&t.shape), *ty))
        .collect();
    let mut w = GgufWriter::create(out_path, &meta, &infos)
        .with_context(|| format!("creating {}", out_path.display()))?;
    let in_file =
        std::fs::File::open(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let pb = progress::bytes_bar(total_in, a.quiet);
    let mut bytes = Vec::new();
    for (t, ty) in order.iter().zip(&types) {
        pb.set_message(format!("{} {} -> {}", t.name, t.ty, ty));
        let src = input.tensor_data(t);
        let rows = (t.n_elements() / t.row_len().max(1)) as usize;
        if t.ty == *ty {
            // A tensor that keeps its type is copied file to file by the kernel.
            w.write_tensor_from_file(&t.name, &in_file, input.data_offset + t.offset, t.n_bytes())
                .with_context(|| format!("writing {}", out_path.display()))?;
            input.release(t);
            pb.inc(t.n_bytes());
            continue;
        }
        crate::transcode::transcode_into(
            &t.name,
            t.ty,
            src,
            *ty,
            rows,
            t.row_len() as usize,
            &crate::transcode::same_row,
            &mut bytes,
        )?;
        w.write_tensor(&t.name, &bytes)
            .with_context(|| format!("writing {}", out_path.display()))?;
        input.release(t);
        pb.inc(t.n_bytes());
    }
    w.finish()
        .with_context(|| format!("finishing {}", out_path.display()))?;
    pb.finish_and_clear();
    eprintln!(
        "{ftype}: {} -> {}: {:.2} MiB ({:.2} BPW) -> {:.2} MiB ({:.2} BPW) in {:.1}s",
        a.input.display(),
        out_path.display(),
        total_in as f64 / (1 << 20) as f64,
        bpw(total_in),
        total_out as f64 / (1 << 20) as f64,
        bpw(total_out),
        t0.elapsed().as_secs_f64()
    );
    Ok(Outcome::Ok)
}
