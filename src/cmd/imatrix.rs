//! `kiln imatrix`: an importance matrix from a GGUF model and a calibration text, as llama-imatrix
//! computes it (same chunks, BOS handling, tensors and tokens), written in llama.cpp's GGUF imatrix
//! format or the legacy `.dat` format; `--in-file` merges earlier files.

use crate::Outcome;
use anyhow::{bail, Context, Result};
use kiln::eval::imatrix::{collect, CollectParams, Collector};
use kiln::eval::perplexity::{n_chunks, PplParams};
use kiln::eval::read_text;
use kiln::model::device;
use kiln::model::Backend;
use kiln::tokenizer::Tokenizer;
use kiln_formats::gguf::GgufFile;
use kiln_formats::imatrix::{write_file, Imatrix};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// File format of the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutFormat {
    Gguf,
    Dat,
}

/// Arguments of `kiln imatrix` (llama-imatrix's flag names).
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  kiln imatrix -m model-f16.gguf -f calibration.txt -o imatrix.gguf -c 512\n  kiln quantize --imatrix imatrix.gguf model-f16.gguf model-q2_k_s.gguf Q2_K_S"
)]
pub struct Args {
    /// The GGUF model (normally F16).
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// Where to evaluate: cpu, cuda[:N] or auto (CUDA when kiln has a GPU backend, else CPU).
    #[arg(long, value_name = "DEV", default_value = "auto")]
    pub device: kiln::model::device::Device,
    /// Calibration text (its one trailing newline is dropped, as llama-imatrix does). Without it,
    /// the --in-file matrices are only combined.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Output file.
    #[arg(short = 'o', long = "output", default_value = "imatrix.gguf")]
    pub output: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutFormat::Gguf)]
    pub output_format: OutFormat,
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
    /// Threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// No progress output.
    #[arg(short, long)]
    pub quiet: bool,
}

fn save(col: &Collector, fmt: OutFormat, path: &Path, dataset: Option<&str>) -> Result<()> {
    let bytes = match fmt {
        OutFormat::Gguf => col.gguf_bytes(dataset)?,
        OutFormat::Dat => col.legacy_bytes(dataset),
    };
    write_file(path, &bytes)?;
    Ok(())
}

pub fn run(a: Args) -> Result<Outcome> {
    a.device.check()?;
    if a.ctx == 0 {
        bail!("-c must be positive");
    }
    let chunk_size = u32::try_from(a.ctx).context("-c is too large")?;
    let mut col = Collector::new(chunk_size, a.process_output);
    for f in &a.in_file {
        let m = Imatrix::read(f)?;
        col.merge(&m, &f.display().to_string())?;
        if !a.quiet {
            eprintln!(
                "imatrix: loaded {} entries from {}",
                m.entries.len(),
                f.display()
            );
        }
    }
    let Some(text_path) = &a.file else {
        if a.in_file.is_empty() {
            bail!("no text (-f) and no --in-file matrices to combine");
        }
        save(&col, a.output_format, &a.output, None)?;
        eprintln!(
            "imatrix: combined {} files into {}",
            a.in_file.len(),
            a.output.display()
        );
        return Ok(Outcome::Ok);
    };
    let dataset = text_path.to_string_lossy().into_owned();

    let file = Arc::new(
        GgufFile::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?,
    );
    let tok = Tokenizer::from_gguf(&file)
        .with_context(|| format!("reading the vocabulary of {}", a.model.display()))?;
    if tok.add_eos() {
        bail!("the vocabulary adds EOS; llama-imatrix refuses such models too");
    }
    let bos = tok.bos().filter(|_| tok.add_bos());
    let tokens = tok.encode(&read_text(text_path)?, true, false);
    let params = PplParams {
        n_ctx: a.ctx,
        n_batch: a.ctx,
        max_chunks: a.chunks,
    };
    let n_chunk = n_chunks(tokens.len(), &params)?;

    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(t) = a.threads {
        pool = pool.num_threads(t.max(1));
    }
    let pool = pool.build().context("starting threads")?;
    let model = device::load(Arc::clone(&file), &a.device)
        .with_context(|| format!("loading {}", a.model.display()))?;
    if !a.quiet {
        eprintln!(
            "imatrix: {} tokens, computing over {n_chunk} chunks, n_ctx={}, {}",
            tokens.len(),
            a.ctx,
            model.backend.name()
        );
    }
    let t0 = Instant::now();
    let (fmt, out) = (a.output_format, a.output.clone());
    let (save_freq, out_freq) = (a.save_frequency, a.output_frequency.max(1));
    let run = pool.install(|| {
        collect(
            &model,
            &tokens,
            bos,
            CollectParams {
                n_ctx: a.ctx,
                n_chunk,
                compute_ppl: !a.no_ppl,
            },
            &mut col,
            |k, r, c| {
                if !a.no_ppl {
                    print!("[{k}]{r:.4},");
                    let _ = std::io::stdout().flush();
                }
                if k % out_freq == 0 && k < n_chunk {
                    save(c, fmt, &out, Some(&dataset))?;
                }
                if save_freq > 0 && k % save_freq == 0 {
                    let mut p = out.clone().into_os_string();
                    p.push(format!(".at_{}", c.last_chunk));
                    save(c, fmt, Path::new(&p), Some(&dataset))?;
                }
                Ok(())
            },
        )
    })?;
    if !a.no_ppl {
        println!();
    }
    save(&col, a.output_format, &a.output, Some(&dataset))?;
    if !a.no_ppl {
        match run.ppl_err {
            Some(e) => println!("Final estimate: PPL = {:.4} +/- {e:.5}", run.ppl),
            None => println!("Final estimate: PPL = {:.4}", run.ppl),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "imatrix: {} entries from {n_chunk} chunks ({} tokens) in {secs:.1}s ({:.1} tok/s) -> {}",
        col.entries.len(),
        n_chunk * a.ctx,
        (n_chunk * a.ctx) as f64 / secs.max(1e-9),
        a.output.display()
    );
    Ok(Outcome::Ok)
}
