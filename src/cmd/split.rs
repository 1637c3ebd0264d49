//! `kiln split`: a GGUF into a split set, or a set back into one file, with llama-gguf-split's
//! flags and file names (and the same bytes).

use crate::cmd::progress::Terminal;
use crate::Outcome;
use anyhow::{bail, Result};
use kiln::split::{join, split, JoinOptions, SplitOptions};
use kiln_formats::gguf::split::{parse_size, SplitBy};
use std::path::PathBuf;

/// Arguments of `kiln split` (llama-gguf-split's flag names).
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  kiln split --split-max-size 4G model-f16.gguf model-f16\n      (writes model-f16-00001-of-0000N.gguf ...)\n  kiln split --split-max-tensors 64 model.gguf out/model\n  kiln split --merge model-f16-00001-of-00004.gguf model-f16.gguf"
)]
pub struct Args {
    /// The GGUF to split, or with --merge the set's first file (…-00001-of-0000N.gguf).
    pub input: PathBuf,
    /// The prefix of the set's file names, or with --merge the output file.
    pub output: PathBuf,
    /// Join a split set into one file.
    #[arg(long, conflicts_with_all = ["split_max_tensors", "split_max_size", "no_tensor_first_split"])]
    pub merge: bool,
    /// At most N tensors per file [default: 128].
    #[arg(long, value_name = "N", conflicts_with = "split_max_size")]
    pub split_max_tensors: Option<usize>,
    /// At most this much tensor data per file: a whole number with M or G (10^6, 10^9 bytes).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub split_max_size: Option<u64>,
    /// The first file holds the metadata only.
    #[arg(long)]
    pub no_tensor_first_split: bool,
    /// Show the plan; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Replace existing output files.
    #[arg(long)]
    pub force: bool,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn run(a: Args) -> Result<Outcome> {
    let term = Terminal::new(a.quiet);
    if a.merge {
        let done = join(
            &JoinOptions {
                first: a.input,
                out: a.output.clone(),
                dry_run: a.dry_run,
                force: a.force,
            },
            &term,
        )?;
        for f in &done.files {
            println!("{}", f.display());
        }
        let what = if a.dry_run { "would merge" } else { "merged" };
        eprintln!(
            "{} {what} from {} files with {} tensors",
            a.output.display(),
            done.files.len(),
            done.n_tensors
        );
        return Ok(Outcome::Ok);
    }
    let by = match (a.split_max_tensors, a.split_max_size) {
        (Some(n), None) => SplitBy::Tensors(n),
        (None, Some(b)) => SplitBy::Bytes(b),
        (None, None) => SplitBy::Tensors(128),
        (Some(_), Some(_)) => bail!("give --split-max-tensors or --split-max-size, not both"),
    };
    let files = split(
        &SplitOptions {
            input: a.input,
            out_prefix: a.output,
            by,
            empty_first: a.no_tensor_first_split,
            dry_run: a.dry_run,
            force: a.force,
        },
        &term,
    )?;
    println!("n_split: {}", files.len());
    for (i, f) in files.iter().enumerate() {
        println!(
            "split {:05}: n_tensors = {}, total_size = {}M  {}",
            i + 1,
            f.n_tensors,
            f.bytes / 1_000_000,
            f.path.display()
        );
    }
    Ok(Outcome::Ok)
}
