//! `kiln pipeline`: from a Llama base and PEFT LoRA(s) (or an F16 GGUF) to a folder of GGUF files at
//! every requested quantization level, with perplexity per level and a reproducible report.

use crate::cmd::progress::Terminal;
use crate::Outcome;
use anyhow::{bail, Result};
use kiln::pipeline::{self, RunEnd, Settings, Source};
use std::path::PathBuf;

/// Arguments of `kiln pipeline`.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
kiln pipeline --base Llama-2-7b-hf --lora chinese-llama-2-lora-7b --out zh-7b \\\n      \
--quants q4_0,q4_k_m,q5_k_m,q6_k,q8_0 --eval-text wiki.test.raw --eval-text zh-eval.txt\n  \
kiln pipeline --model zh-7b/model-f16.gguf --out zh-7b-eval --quants q4_k_m --eval-text zh-eval.txt -c 512 --chunks 40\n\n\
Writes into --out: model-f16.gguf, model-<level>.gguf, eval/*.json, report.md, report.json, report.svg,\n\
SHA256SUMS and kiln-manifest.json (and imatrix.gguf, model-<level>-imatrix.gguf with --imatrix-text). Rerunning skips every step that is up to date; --force redoes all.")]
pub struct Args {
    /// Base model: HF Llama folder (as for kiln merge).
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    pub base: Option<PathBuf>,
    /// PEFT LoRA folder; repeat to apply several in order.
    #[arg(long = "lora", requires = "base")]
    pub lora: Vec<PathBuf>,
    /// Evaluate an existing F16 GGUF instead of merging.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Quantization levels, comma-separated.
    #[arg(
        long,
        default_value = "q4_0,q4_1,q4_k_m,q5_k_m,q6_k,q8_0",
        value_delimiter = ','
    )]
    pub quants: Vec<String>,
    /// Text to measure perplexity on (repeatable).
    #[arg(long = "eval-text", value_name = "FILE")]
    pub eval_text: Vec<PathBuf>,
    /// Tokens per perplexity chunk.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    pub ctx: usize,
    /// Tokens per forward pass (capped at the context size).
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048)]
    pub batch: usize,
    /// Evaluate at most N chunks of each text.
    #[arg(long, value_name = "N")]
    pub chunks: Option<usize>,
    /// Where to evaluate: cpu, cuda[:N] or auto (CUDA when kiln has a GPU backend, else CPU).
    #[arg(long, value_name = "DEV", default_value = "auto")]
    pub device: kiln::model::device::Device,
    /// KL divergence of each level against F16.
    #[arg(long)]
    pub kld: bool,
    /// Prompt-processing and generation speed of each level.
    #[arg(long)]
    pub bench: bool,
    /// Also keep the merged model as an HF folder (--out/hf).
    #[arg(long)]
    pub keep_hf: bool,
    /// Redo every step, even those that are up to date.
    #[arg(long)]
    pub force: bool,
    /// No progress bars.
    #[arg(short, long)]
    pub quiet: bool,
    /// Check the inputs against a published sha256sum list before writing anything.
    #[arg(long, value_name = "FILE")]
    pub expect_sha256: Option<PathBuf>,
    /// Importance matrix for the quantizers (from kiln imatrix or llama-imatrix).
    #[arg(long, value_name = "FILE")]
    pub imatrix: Option<PathBuf>,
    /// Compute an importance matrix (--out/imatrix.gguf) from the F16 model on this text (with -c
    /// and --chunks) and quantize every K level a second time with it (model-<level>-imatrix.gguf,
    /// reported as <LEVEL>+imatrix); Q2_K_S is made only this way.
    #[arg(long, value_name = "FILE", conflicts_with = "imatrix")]
    pub imatrix_text: Option<PathBuf>,
    /// general.name of the merged GGUF (default: the --out folder's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

/// The exact command line, shell-quoted.
pub fn command_line() -> String {
    std::env::args()
        .enumerate()
        .map(|(i, a)| {
            if i == 0 {
                "kiln".to_string()
            } else {
                pipeline::shell_quote(&a)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Builds the run settings from the arguments.
pub fn settings(a: Args) -> Result<Settings> {
    a.device.check()?;
    let quants = pipeline::parse_quants(&a.quants)?;
    crate::cmd::global_threads(a.threads)?;
    let source = match (a.base, a.model) {
        (Some(base), None) => {
            if a.lora.is_empty() {
                bail!("--base needs at least one --lora (or use --model with an F16 GGUF)");
            }
            Source::Merge {
                base,
                loras: a.lora,
            }
        }
        (None, Some(m)) => Source::Model(m),
        _ => bail!("give --base DIR --lora DIR, or --model GGUF"),
    };
    Ok(Settings {
        source,
        out: a.out,
        quants,
        texts: a.eval_text,
        n_ctx: a.ctx,
        n_batch: a.batch,
        chunks: a.chunks,
        kld: a.kld,
        bench: a.bench,
        keep_hf: a.keep_hf,
        force: a.force,
        quiet: a.quiet,
        expect_sha256: a.expect_sha256,
        imatrix: a.imatrix,
        imatrix_text: a.imatrix_text,
        name: a.name,
        command: command_line(),
        device: a.device,
    })
}

/// The pipeline's progress sink: bars indented under the step lines, hidden with --quiet.
pub fn terminal(s: &Settings) -> Terminal {
    Terminal {
        quiet: s.quiet,
        indent: true,
    }
}

pub fn run(a: Args) -> Result<Outcome> {
    let s = settings(a)?;
    match pipeline::run(&s, &terminal(&s))? {
        RunEnd::Done(report) => {
            print!("{}", report.summary());
            Ok(Outcome::Ok)
        }
        RunEnd::ExpectMismatch => Ok(Outcome::CheckFailed),
    }
}
