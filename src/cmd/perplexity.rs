//! `kiln perplexity`: perplexity of a GGUF model on a text file, and KL divergence against a base
//! model's saved log-probabilities, computed as llama-perplexity does (same chunks, BOS
//! substitution, second-half scoring, base-file format and statistics).

use crate::Outcome;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln::eval::kld::{self, BaseLogits, KldResult, DP_QUANTILES, KLD_QUANTILES};
use kiln::eval::perplexity::{
    check_memory, n_chunks, perplexity, perplexity_save_base, PplParams, PplResult,
};
use kiln::eval::read_text;
use kiln::eval::rope::{apply_rope, Ntk, RopeOverrides, RopeReport, RopeScaling};
use kiln::model::device::{self, Device, Evaluator};
use kiln::model::{Backend, LlamaConfig};
use kiln::tokenizer::Tokenizer;
use kiln_formats::gguf::GgufFile;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// `-c` when none is given.
const DEFAULT_CTX: usize = 512;

/// RoPE context-extension flags (llama.cpp's names, plus `--ntk`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct RopeArgs {
    /// RoPE base frequency (default: the model's llama.rope.freq_base).
    #[arg(long, value_name = "F")]
    pub rope_freq_base: Option<f32>,
    /// RoPE scaling method (default: the model's, linear when it says nothing).
    #[arg(long, value_enum, value_name = "none|linear")]
    pub rope_scaling: Option<RopeScaling>,
    /// Linear RoPE scale: positions are divided by S (expands the context S times).
    #[arg(long, value_name = "S", conflicts_with = "rope_freq_scale")]
    pub rope_scale: Option<f32>,
    /// RoPE frequency scale factor (1/S).
    #[arg(long, value_name = "F")]
    pub rope_freq_scale: Option<f32>,
    /// NTK-aware RoPE base: base·ALPHA^(d/(d−2)), d the head dimension; `auto` uses
    /// ALPHA = n_ctx/(trained_ctx/2) − 1 beyond the trained context (llama.context_length).
    #[arg(long, value_name = "ALPHA|auto")]
    pub ntk: Option<Ntk>,
}

impl RopeArgs {
    /// The overrides to pass to [`apply_rope`].
    pub fn overrides(&self) -> Result<RopeOverrides> {
        let freq_scale = match (self.rope_scale, self.rope_freq_scale) {
            (Some(s), _) if !(s.is_finite() && s > 0.0) => {
                bail!("--rope-scale must be a positive number (got {s})")
            }
            (Some(s), _) => Some(1.0 / s),
            (None, f) => f,
        };
        Ok(RopeOverrides {
            freq_base: self.rope_freq_base,
            freq_scale,
            scaling: self.rope_scaling,
            ntk: self.ntk,
        })
    }

    /// Whether any RoPE flag was given.
    pub fn any(&self) -> bool {
        self.rope_freq_base.is_some()
            || self.rope_scaling.is_some()
            || self.rope_scale.is_some()
            || self.rope_freq_scale.is_some()
            || self.ntk.is_some()
    }
}

/// Arguments of `kiln perplexity` (llama-perplexity's flag names).
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  kiln perplexity -m model-q4_k_m.gguf -f wiki.test.raw -c 512\n  kiln perplexity -m model-f16.gguf -f wiki.test.raw --kl-divergence-base f16.kld\n  kiln perplexity -m model-q4_k_m.gguf --kl-divergence --kl-divergence-base f16.kld\n  kiln perplexity -m model.gguf -f long.txt -c 8192 --ntk auto"
)]
pub struct Args {
    /// The GGUF model.
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// Where to evaluate: cpu, cuda[:N] or auto (CUDA when kiln has a GPU backend, else CPU).
    #[arg(long, value_name = "DEV", default_value = "auto")]
    pub device: kiln::model::device::Device,
    /// The text file (its one trailing newline is dropped, as llama-perplexity does).
    #[arg(short = 'f', long = "file", required_unless_present_any = ["token_ids", "kl_divergence"])]
    pub file: Option<PathBuf>,
    /// Tokens per chunk [default: 512; with --kl-divergence, the base file's].
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx: Option<usize>,
    /// Tokens per forward pass (capped at the context size).
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048)]
    pub batch: usize,
    /// Evaluate at most N chunks.
    #[arg(long, value_name = "N")]
    pub chunks: Option<usize>,
    /// Threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// The base model's log-probabilities: written here (with -f), or read (with --kl-divergence).
    /// llama-perplexity's file format: files are interchangeable with it.
    #[arg(long, value_name = "FILE")]
    pub kl_divergence_base: Option<PathBuf>,
    /// Compare the model with the base log-probabilities of --kl-divergence-base (KLD, Δp,
    /// same-top-token and PPL-ratio statistics).
    #[arg(long, requires = "kl_divergence_base")]
    pub kl_divergence: bool,
    #[command(flatten)]
    pub rope: RopeArgs,
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

/// A GGUF opened for evaluation: its vocabulary and configuration checked before any weight is
/// touched.
pub struct Opened {
    pub file: Arc<GgufFile>,
    /// None when the file has no vocabulary.
    pub tok: Option<Tokenizer>,
    pub cfg: LlamaConfig,
}

impl Opened {
    /// Opens `path`; `need_vocab` refuses a file without `tokenizer.ggml.tokens`.
    pub fn open(path: &Path, need_vocab: bool) -> Result<Opened> {
        let file =
            Arc::new(GgufFile::open(path).with_context(|| format!("opening {}", path.display()))?);
        let tok = if file.get("tokenizer.ggml.tokens").is_none() {
            if need_vocab {
                bail!(
                    "{} has no vocabulary (tokenizer.ggml.tokens is missing)",
                    path.display()
                );
            }
            None
        } else {
            Some(
                Tokenizer::from_gguf(&file)
                    .with_context(|| format!("reading the vocabulary of {}", path.display()))?,
            )
        };
        let cfg = LlamaConfig::from_gguf(&file).with_context(|| format!("{}", path.display()))?;
        Ok(Opened { file, tok, cfg })
    }

    /// BOS to put first in each chunk, when the vocabulary adds one.
    pub fn bos(&self) -> Option<u32> {
        let t = self.tok.as_ref()?;
        if t.add_bos() {
            Some(t.bos().unwrap_or(1))
        } else {
            None
        }
    }

    /// Loads the weights with the RoPE overrides applied for context `n_ctx`.
    pub fn load(&self, rope: &RopeArgs, n_ctx: usize) -> Result<(Evaluator, RopeReport)> {
        let path = self.file.path().to_path_buf();
        let mut model = device::load(Arc::clone(&self.file), &Device::Cpu)
            .with_context(|| format!("loading {}", path.display()))?;
        let report = apply_rope(&mut model.cfg, &self.file, &rope.overrides()?, n_ctx)?;
        Ok((model, report))
    }
}

/// A rayon pool of `threads` threads (all cores when None).
pub fn thread_pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(t) = threads {
        pool = pool.num_threads(t.max(1));
    }
    pool.build().context("starting threads")
}

/// The chunk progress bar on stderr (hidden with --quiet or when stderr is not a terminal).
fn chunk_bar(n_chunk: usize, quiet: bool) -> Result<ProgressBar> {
    let pb = if quiet {
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
    Ok(pb)
}

pub fn run(a: Args) -> Result<Outcome> {
    a.device.check()?;
    let m = Opened::open(&a.model, true)?;
    if m.tok.as_ref().is_some_and(|t| t.add_eos()) {
        bail!(
            "the vocabulary of {} adds EOS; llama-perplexity refuses such models too",
            a.model.display()
        );
    }
    let pool = thread_pool(a.threads)?;
    if a.kl_divergence {
        return pool.install(|| run_kld(&a, &m));
    }
    let ctx = a.ctx.unwrap_or(DEFAULT_CTX);
    if ctx < 2 {
        bail!("-c must be at least 2");
    }
    let n_batch = a.batch.clamp(1, ctx);
    check_memory(&m.cfg, ctx, n_batch).with_context(|| format!("{}", a.model.display()))?;
    let (tokens, source) = match (&a.token_ids, &a.file) {
        (Some(ids), _) => (read_ids(ids)?, ids),
        (None, Some(f)) => {
            let text = read_text(f)?;
            let tok = m.tok.as_ref().context("no vocabulary")?;
            (tok.encode(&text, true, false), f)
        }
        (None, None) => bail!("give the text with -f"),
    };
    let params = PplParams {
        n_ctx: ctx,
        n_batch,
        max_chunks: a.chunks,
    };
    let n_chunk =
        n_chunks(tokens.len(), &params).with_context(|| format!("{}", source.display()))?;
    let (model, rope) = m.load(&a.rope, ctx)?;
    eprintln!(
        "perplexity: {} tokens, calculating perplexity over {n_chunk} chunks, n_ctx={ctx}, batch_size={n_batch}, {}, {rope}",
        tokens.len(),
        pool.install(|| model.backend.name()),
    );
    if ctx > rope.n_ctx_train && a.rope.ntk.is_none() {
        eprintln!(
            "perplexity: warning: the model was trained on only {} context tokens ({ctx} asked); see --ntk auto",
            rope.n_ctx_train
        );
    }
    let pb = chunk_bar(n_chunk, a.quiet)?;
    let t0 = Instant::now();
    let progress = |k: usize, r: f64| {
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        pb.set_position(k as u64);
        pb.set_message(format!("[{k}]{r:.4} {:.1} tok/s", (k * ctx) as f64 / secs));
    };
    let bos = m.bos();
    let result = pool.install(|| match &a.kl_divergence_base {
        None => perplexity(&model, &tokens, bos, &params, progress),
        Some(path) => {
            let f = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            let mut w = BufWriter::new(f);
            eprintln!(
                "perplexity: saving the log-probabilities to {}",
                path.display()
            );
            let r = perplexity_save_base(&model, &tokens, bos, &params, &mut w, progress)
                .with_context(|| format!("writing {}", path.display()));
            if r.is_err() {
                drop(w);
                // a partial file must not pass for a base
                let _ = std::fs::remove_file(path);
            }
            r
        }
    })?;
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    print_ppl(&a, &result, &rope, tokens.len(), n_batch, secs)?;
    Ok(Outcome::Ok)
}

fn print_ppl(
    a: &Args,
    result: &PplResult,
    rope: &RopeReport,
    n_tokens: usize,
    n_batch: usize,
    secs: f64,
) -> Result<()> {
    let tps = result.n_eval as f64 / secs.max(1e-9);
    if a.json {
        let j = serde_json::json!({
            "model": a.model.display().to_string(),
            "n_ctx": result.n_eval / result.n_chunk.max(1),
            "n_batch": n_batch,
            "n_chunk": result.n_chunk,
            "n_tokens": n_tokens,
            "n_scored": result.n_scored,
            "running": result.running,
            "ppl": result.ppl,
            "ppl_err": result.ppl_err,
            "rope_freq_base": rope.freq_base,
            "rope_freq_scale": rope.freq_scale,
            "ntk_alpha": rope.ntk_alpha,
            "n_ctx_train": rope.n_ctx_train,
            "kl_divergence_base": a.kl_divergence_base.as_ref().map(|p| p.display().to_string()),
            "seconds": secs,
            "tokens_per_second": tps,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
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
    if a.rope.any() {
        println!("{rope}");
    }
    eprintln!(
        "perplexity: {} tokens in {secs:.2} s ({tps:.1} tokens/s)",
        result.n_eval
    );
    Ok(())
}

fn run_kld(a: &Args, m: &Opened) -> Result<Outcome> {
    let Some(base_path) = &a.kl_divergence_base else {
        bail!("--kl-divergence needs --kl-divergence-base FILE");
    };
    let mut base = BaseLogits::open(base_path)?;
    if base.n_vocab != m.cfg.n_vocab {
        bail!(
            "{} was computed with a vocabulary of {} tokens, but {} has {}",
            base_path.display(),
            base.n_vocab,
            a.model.display(),
            m.cfg.n_vocab
        );
    }
    let ctx = base.n_ctx;
    if let Some(c) = a.ctx.filter(|&c| c != ctx) {
        eprintln!(
            "kl-divergence: using the base file's n_ctx={ctx} (not -c {c}), as llama-perplexity does"
        );
    }
    let n_batch = a.batch.clamp(1, ctx);
    check_memory(&m.cfg, ctx, n_batch).with_context(|| format!("{}", a.model.display()))?;
    let n_chunk = match a.chunks {
        Some(c) if c > 0 => c.min(base.n_chunk),
        _ => base.n_chunk,
    };
    let (model, rope) = m.load(&a.rope, ctx)?;
    eprintln!(
        "kl-divergence: computing over {n_chunk} chunks of {}, n_ctx={ctx}, batch_size={n_batch}, {}, {rope}",
        base_path.display(),
        model.backend.name(),
    );
    let pb = chunk_bar(n_chunk, a.quiet)?;
    let t0 = Instant::now();
    let mut rows_text = Vec::new();
    let result = kld::kld_stats(&model, &mut base, m.bos(), n_batch, a.chunks, |row| {
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        pb.set_position(row.chunk as u64);
        pb.set_message(format!(
            "KLD {:.5} {:.1} tok/s",
            row.kld.value,
            (row.chunk * ctx) as f64 / secs
        ));
        rows_text.push(format!(
            "{:4}    {:9.4} ± {:9.4}    {:10.5} ± {:10.5}    {:10.5} ± {:10.5}    {:6.3} ± {:6.3} %    {:6.3} ± {:6.3} %",
            row.chunk,
            row.ppl.value,
            row.ppl.unc,
            row.ln_ppl_ratio.value,
            row.ln_ppl_ratio.unc,
            row.kld.value,
            row.kld.unc,
            100.0 * row.rms_dp.value,
            100.0 * row.rms_dp.unc,
            100.0 * row.same_top.value,
            100.0 * row.same_top.unc,
        ));
    })
    .with_context(|| format!("evaluating {}", a.model.display()))?;
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let tps = (result.n_chunk * ctx) as f64 / secs.max(1e-9);
    if a.json {
        let mut j = serde_json::to_value(&result)?;
        if let Some(o) = j.as_object_mut() {
            o.insert("model".into(), a.model.display().to_string().into());
            o.insert(
                "kl_divergence_base".into(),
                base_path.display().to_string().into(),
            );
            o.insert("rope_freq_base".into(), rope.freq_base.into());
            o.insert("rope_freq_scale".into(), rope.freq_scale.into());
            o.insert("seconds".into(), secs.into());
            o.insert("tokens_per_second".into(), tps.into());
        }
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(Outcome::Ok);
    }
    println!("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p");
    for r in &rows_text {
        println!("{r}");
    }
    println!();
    if result.count < 100 {
        eprintln!(
            "kl-divergence: only {} scored tokens; llama-perplexity prints no statistics below 100",
            result.count
        );
    } else {
        print_kld_stats(&result);
    }
    if a.rope.any() {
        println!("{rope}");
    }
    eprintln!(
        "kl-divergence: {} tokens in {secs:.2} s ({tps:.1} tokens/s)",
        result.n_chunk * ctx
    );
    Ok(Outcome::Ok)
}

/// The final statistics, formatted as llama-perplexity prints them.
fn print_kld_stats(r: &KldResult) {
    println!("====== Perplexity statistics ======");
    let pm = |name: &str, e: kld::Estimate| {
        println!("{name:<30}: {:10.6} ± {:10.6}", e.value, e.unc);
    };
    pm("Mean PPL(Q)", r.ppl);
    pm("Mean PPL(base)", r.ppl_base);
    println!("Cor(ln(PPL(Q)), ln(PPL(base))): {:6.2}%", 100.0 * r.cor);
    pm("Mean ln(PPL(Q)/PPL(base))", r.ln_ppl_ratio);
    pm("Mean PPL(Q)/PPL(base)", r.ppl_ratio);
    pm("Mean PPL(Q)-PPL(base)", r.ppl_diff);
    println!();
    println!("====== KL divergence statistics ======");
    println!("Mean    KLD: {:10.6} ± {:10.6}", r.kld.value, r.kld.unc);
    println!("Maximum KLD: {:10.6}", r.kld_spread.max);
    for ((label, f), (_, v)) in KLD_QUANTILES.iter().zip(&r.kld_spread.quantiles) {
        if *f < 0.5 && *f > 0.099 {
            println!("Median  KLD: {:10.6}", r.kld_spread.median);
        }
        println!("{label:<8}KLD: {v:10.6}");
    }
    println!("Minimum KLD: {:10.6}", r.kld_spread.min);
    println!();
    println!("====== Token probability statistics ======");
    println!(
        "Mean    Δp: {:6.3} ± {:5.3} %",
        100.0 * r.dp.value,
        100.0 * r.dp.unc
    );
    println!("Maximum Δp: {:6.3}%", 100.0 * r.dp_spread.max);
    for ((label, f), (_, v)) in DP_QUANTILES.iter().zip(&r.dp_spread.quantiles) {
        if *f < 0.5 && *f > 0.249 {
            println!("Median  Δp: {:6.3}%", 100.0 * r.dp_spread.median);
        }
        println!("{label:<8}Δp: {:6.3}%", 100.0 * v);
    }
    println!("Minimum Δp: {:6.3}%", 100.0 * r.dp_spread.min);
    println!(
        "RMS Δp    : {:6.3} ± {:5.3} %",
        100.0 * r.rms_dp.value,
        100.0 * r.rms_dp.unc
    );
    println!(
        "Same top p: {:6.3} ± {:5.3} %",
        100.0 * r.same_top.value,
        100.0 * r.same_top.unc
    );
}
