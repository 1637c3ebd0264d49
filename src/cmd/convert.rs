//! `kiln convert`: a Hugging Face Llama folder (safetensors or .bin, single or sharded) to GGUF.

use crate::cmd::progress::Terminal;
use crate::Outcome;
use anyhow::Result;
use kiln::convert::{self, ConvertOptions, OutType};
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `kiln convert`.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  kiln convert Llama-2-7b-hf -o llama-2-7b.f16.gguf --outtype f16"
)]
pub struct Args {
    /// Hugging Face model folder (config.json, tokenizer.model, weights).
    pub hf_dir: PathBuf,
    /// Output GGUF file.
    #[arg(short = 'o', long = "outfile")]
    pub out: PathBuf,
    /// Type of the 2-D weights (norms stay F32).
    #[arg(long, value_enum, default_value = "f16")]
    pub outtype: OutType,
    /// Folder with tokenizer.model and tokenizer_config.json, if not the model folder.
    #[arg(long)]
    pub tokenizer_dir: Option<PathBuf>,
    /// general.name (default: the folder's name).
    #[arg(long)]
    pub name: Option<String>,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn run(a: Args) -> Result<Outcome> {
    let t0 = Instant::now();
    let opts = ConvertOptions {
        hf_dir: a.hf_dir,
        out: a.out,
        outtype: a.outtype,
        tokenizer_dir: a.tokenizer_dir,
        name: a.name,
    };
    let done = convert::convert(&opts, &Terminal::new(a.quiet))?;
    eprintln!(
        "wrote {} ({} tensors, {:.1} MiB, {}) in {:.1}s",
        opts.out.display(),
        done.n_tensors,
        done.bytes as f64 / (1 << 20) as f64,
        done.format,
        t0.elapsed().as_secs_f64()
    );
    Ok(Outcome::Ok)
}
