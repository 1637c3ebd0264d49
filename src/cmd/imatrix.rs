//! `kiln imatrix`: an importance matrix from a GGUF model and a calibration text, as llama-imatrix
//! computes it (same chunks, BOS handling, tensors and tokens), written in llama.cpp's GGUF imatrix
//! format or the legacy `.dat` format; `--in-file` merges earlier files.

use crate::cmd::eval_args::{ModelArgs, RopeArgs};
use crate::cmd::progress::Terminal;
use crate::Outcome;
use anyhow::Result;
use kiln::eval::job::{self, ImatrixDone, ImatrixFormat, ImatrixOptions};
use kiln::progress::{Progress, Silent};
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `kiln imatrix` (llama-imatrix's flag names).
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  kiln imatrix -m model-f16.gguf -f calibration.txt -o imatrix.gguf -c 512\n  kiln quantize --imatrix imatrix.gguf model-f16.gguf model-q2_k_s.gguf Q2_K_S"
)]
pub struct Args {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Calibration text (its one trailing newline is dropped, as llama-imatrix does). Without it,
    /// the --in-file matrices are only combined.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Output file.
    #[arg(short = 'o', long = "output", default_value = "imatrix.gguf")]
    pub output: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ImatrixFormat::Gguf)]
    pub output_format: ImatrixFormat,
    /// Tokens per chunk.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    pub ctx: usize,
    /// Process at most N chunks.
    #[arg(long, value_name = "N")]
    pub chunks: Option<usize>,
    /// Earlier imatrix files (GGUF or .dat) to start from (repeatable).
    #[arg(long = "in-file", value_name = "FILE")]
    pub in_file: Vec<PathBuf>,
    /// Also save to OUTPUT.at_K every N chunks (0: never).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub save_frequency: usize,
    /// Rewrite OUTPUT every N chunks.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub output_frequency: usize,
    /// Collect output.weight too.
    #[arg(long)]
    pub process_output: bool,
    /// Do not compute the perplexity.
    #[arg(long)]
    pub no_ppl: bool,
    /// No progress output.
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn run(a: Args) -> Result<Outcome> {
    let opts = ImatrixOptions {
        target: a.m.target(&RopeArgs::default())?,
        text: a.file.clone(),
        output: a.output.clone(),
        format: a.output_format,
        n_ctx: a.ctx,
        chunks: a.chunks,
        in_files: a.in_file.clone(),
        save_frequency: a.save_frequency,
        output_frequency: a.output_frequency,
        process_output: a.process_output,
        compute_ppl: !a.no_ppl,
    };
    let term = Terminal::new(a.quiet);
    let progress: &dyn Progress = if a.quiet { &Silent } else { &term };
    let show_ppl = !a.no_ppl;
    let done = job::imatrix(&opts, progress, &mut |k, r| {
        if show_ppl {
            print!("[{k}]{r:.4},");
            let _ = std::io::stdout().flush();
        }
    })?;
    match done {
        ImatrixDone::Combined { files } => eprintln!(
            "imatrix: combined {files} files into {}",
            a.output.display()
        ),
        ImatrixDone::Collected {
            entries,
            n_chunk,
            n_eval,
            ppl,
            seconds: secs,
        } => {
            if let Some((ppl, err)) = ppl {
                println!();
                match err {
                    Some(e) => println!("Final estimate: PPL = {ppl:.4} +/- {e:.5}"),
                    None => println!("Final estimate: PPL = {ppl:.4}"),
                }
            }
            eprintln!(
                "imatrix: {entries} entries from {n_chunk} chunks ({n_eval} tokens) in {secs:.1}s ({:.1} tok/s) -> {}",
                n_eval as f64 / secs.max(1e-9),
                a.output.display()
            );
        }
    }
    Ok(Outcome::Ok)
}
