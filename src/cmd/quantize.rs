//! `kiln quantize`: parses llama-quantize's command line into [`QuantizeOptions`], runs the job
//! and prints the plan (--dry-run) or the summary.

use crate::cmd::progress::Terminal;
use crate::Outcome;
use anyhow::{anyhow, bail, Context, Result};
use kiln::quant_plan::{Ftype, Overrides};
use kiln::quantize::{parse_type, quantize, QuantizeOptions, TYPES_HELP};
use regex::Regex;
use std::path::PathBuf;

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
    /// Importance matrix (llama-imatrix's GGUF or legacy .dat file, or `kiln imatrix`'s): the
    /// weighted quantizers of llama.cpp for Q4_0..Q5_1 and the K-quants.
    #[arg(long, value_name = "FILE")]
    pub imatrix: Option<PathBuf>,
    /// Use the imatrix only for tensors whose name contains NAME (repeatable).
    #[arg(
        long,
        value_name = "NAME",
        requires = "imatrix",
        conflicts_with = "exclude_weights"
    )]
    pub include_weights: Vec<String>,
    /// Do not use the imatrix for tensors whose name contains NAME (repeatable).
    #[arg(long, value_name = "NAME", requires = "imatrix")]
    pub exclude_weights: Vec<String>,
    /// Print the per-tensor plan with sizes and bits per weight; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn run(a: Args) -> Result<Outcome> {
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
    let opts = QuantizeOptions {
        input: a.input.clone(),
        ftype,
        overrides: ov,
        imatrix: a.imatrix.clone(),
        include_weights: a.include_weights.clone(),
        exclude_weights: a.exclude_weights.clone(),
        allow_requantize: a.allow_requantize,
    };
    // imatrix filters are read before the pool is sized, as before
    let threads = a.threads.or(a.nthreads);
    if threads == Some(0) {
        bail!("threads must be at least 1");
    }
    let job = quantize(&opts)?;
    if let Some(n) = threads {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    if a.dry_run {
        println!(
            "{:<36} {:>22} {:>6} -> {:<6} {:>12} {:>12}",
            "tensor", "shape", "type", "new", "MiB in", "MiB out"
        );
        for t in &job.tensors {
            println!(
                "{:<36} {:>22} {:>6} -> {:<6} {:>12.3} {:>12.3}",
                t.name,
                format!("{:?}", t.shape),
                t.from.name(),
                t.to.name(),
                mib(t.bytes_in),
                mib(t.bytes_out)
            );
        }
        println!(
            "{ftype} ({}): model size {:.2} MiB ({:.2} BPW) -> quant size {:.2} MiB ({:.2} BPW)",
            ftype.description(),
            mib(job.total_in),
            job.bpw(job.total_in),
            mib(job.total_out),
            job.bpw(job.total_out)
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
    let done = job.write(out_path, &Terminal::new(a.quiet))?;
    eprintln!(
        "{ftype}: {} -> {}: {:.2} MiB ({:.2} BPW) -> {:.2} MiB ({:.2} BPW) in {:.1}s",
        a.input.display(),
        out_path.display(),
        mib(done.bytes_in),
        done.bpw_in,
        mib(done.bytes_out),
        done.bpw_out,
        done.seconds
    );
    Ok(Outcome::Ok)
}
