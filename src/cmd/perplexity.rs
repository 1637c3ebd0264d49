//! `kiln perplexity`: perplexity of a GGUF model on a text file, computed as llama-perplexity does
//! (same chunks, BOS substitution, second-half scoring and output format).

use crate::eval::perplexity::{n_chunks, perplexity, PplParams};
use crate::model::cpu::CpuBackend;
use crate::model::{Backend, Model};
use crate::tokenizer::Tokenizer;
use crate::Outcome;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_formats::gguf::GgufFile;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Largest text file read (bytes).
const MAX_TEXT_BYTES: u64 = 1 << 30;

/// Arguments of `kiln perplexity` (llama-perplexity's flag names).
#[derive(clap::Args)]
#[command(after_help = "Example:\n  kiln perplexity -m model-q4_k_m.gguf -f wiki.test.raw -c 512")]
pub struct Args {
    /// The GGUF model.
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// The text file (its one trailing newline is dropped, as llama-perplexity does).
    #[arg(short = 'f', long = "file", required_unless_present = "token_ids")]
    pub file: Option<PathBuf>,
    /// Tokens per chunk.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    pub ctx: usize,
    /// Tokens per forward pass (capped at the context size).
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048)]
    pub batch: usize,
    /// Evaluate at most N chunks.
    #[arg(long, value_name = "N")]
    pub chunks: Option<usize>,
    /// Threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
    /// Read token ids (whitespace, comma or bracket separated, BOS included) instead of
    /// tokenizing -f (for testing against `llama-tokenize --ids`).
    #[arg(long, value_name = "FILE", hide = true)]
    pub token_ids: Option<PathBuf>,
}

fn read_ids(path: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading token ids from {}", path.display()))?;
    text.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .with_context(|| format!("{}: '{s}' is not a token id", path.display()))
        })
        .collect()
}

/// BOS id and whether it is added, from the model's vocabulary.
fn bos_of(tok: &Tokenizer) -> (u32, bool) {
    (tok.bos().unwrap_or(1), tok.add_bos() && tok.bos().is_some())
}

pub fn run(a: Args) -> Result<Outcome> {
    let file = Arc::new(
        GgufFile::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?,
    );
    if file.get("tokenizer.ggml.tokens").is_none() {
        bail!(
            "{} has no vocabulary (tokenizer.ggml.tokens is missing)",
            a.model.display()
        );
    }
    let tok = Tokenizer::from_gguf(&file)
        .with_context(|| format!("reading the vocabulary of {}", a.model.display()))?;
    if tok.add_eos() {
        bail!("the vocabulary adds EOS; llama-perplexity refuses such models too");
    }
    let (bos, add_bos) = bos_of(&tok);
    let tokens = match (&a.token_ids, &a.file) {
        (Some(ids), _) => read_ids(ids)?,
        (None, Some(f)) => {
            let meta = std::fs::metadata(f).with_context(|| format!("reading {}", f.display()))?;
            if meta.len() > MAX_TEXT_BYTES {
                bail!("{} is larger than {MAX_TEXT_BYTES} bytes", f.display());
            }
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            let mut text = String::from_utf8(bytes)
                .with_context(|| format!("{} is not UTF-8 text", f.display()))?;
            if text.ends_with('\n') {
                text.pop();
            }
            if text.is_empty() {
                bail!("{} is empty", f.display());
            }
            tok.encode(&text, true, false)
        }
        (None, None) => bail!("give the text with -f"),
    };
    if a.ctx == 0 {
        bail!("-c must be positive");
    }
    let params = PplParams {
        n_ctx: a.ctx,
        n_batch: a.batch.min(a.ctx),
        max_chunks: a.chunks,
    };
    let n_chunk = n_chunks(tokens.len(), &params)?;

    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(t) = a.threads {
        pool = pool.num_threads(t.max(1));
    }
    let pool = pool.build().context("starting threads")?;
    let model = Model::load(Arc::clone(&file), CpuBackend)
        .with_context(|| format!("loading {}", a.model.display()))?;
    eprintln!(
        "perplexity: {} tokens, calculating perplexity over {n_chunk} chunks, n_ctx={}, batch_size={}, {}",
        tokens.len(),
        a.ctx,
        params.n_batch,
        pool.install(|| model.backend.name())
    );

    let pb = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some(n_chunk as u64), ProgressDrawTarget::stderr())
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} chunk {pos}/{len} {msg} ETA {eta}",
        )
        .context("progress template")?,
    );
    let t0 = Instant::now();
    let ctx = a.ctx;
    let result = pool.install(|| {
        perplexity(&model, &tokens, add_bos.then_some(bos), &params, |k, r| {
            let secs = t0.elapsed().as_secs_f64().max(1e-9);
            pb.set_position(k as u64);
            pb.set_message(format!("[{k}]{r:.4} {:.1} tok/s", (k * ctx) as f64 / secs));
        })
    })?;
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let tps = result.n_eval as f64 / secs.max(1e-9);

    if a.json {
        let j = serde_json::json!({
            "model": a.model.display().to_string(),
            "n_ctx": a.ctx,
            "n_batch": params.n_batch,
            "n_chunk": result.n_chunk,
            "n_tokens": tokens.len(),
            "n_scored": result.n_scored,
            "running": result.running,
            "ppl": result.ppl,
            "ppl_err": result.ppl_err,
            "seconds": secs,
            "tokens_per_second": tps,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        let line: String = result
            .running
            .iter()
            .enumerate()
            .map(|(i, r)| format!("[{}]{r:.4},", i + 1))
            .collect();
        println!("{line}");
        match result.ppl_err {
            Some(e) => println!("Final estimate: PPL = {:.4} +/- {e:.5}", result.ppl),
            None => println!(
                "Final estimate: PPL = {:.4} (the variance of log(prob) is not positive)",
                result.ppl
            ),
        }
        eprintln!(
            "perplexity: {} tokens in {secs:.2} s ({tps:.1} tokens/s)",
            result.n_eval
        );
    }
    Ok(Outcome::Ok)
}
