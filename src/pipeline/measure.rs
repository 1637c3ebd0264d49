//! The pipeline's evaluation steps: tokenizing the eval texts (with a GGUF's vocabulary, or with an
//! HF/PEFT folder's tokenizer files before any GGUF exists) and perplexity exactly as
//! `kiln perplexity` computes it, written as one small JSON result per model and text.

use crate::eval::bench::{bench, BenchParams};
use crate::eval::job::Opened;
use crate::eval::kld::{kld_stats, row_len, scored_per_chunk, BaseLogits};
use crate::eval::perplexity::{n_chunks, perplexity, perplexity_save_base, PplParams};
use crate::model::device::{self, Device, Evaluator};
use crate::model::Backend;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use kiln_formats::gguf::{serialize_header, GgufHeader};
use kiln_formats::hf::LlamaConfig;
use kiln_formats::sentencepiece::SpModel;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

pub use crate::eval::read_text;

/// The tokenizer kiln would write into a GGUF made from the tokenizer files in `dir`
/// (tokenizer.model, tokenizer_config.json, added_tokens.json) and `config.json`'s special ids.
pub fn tokenizer_of_dir(dir: &Path, cfg: &LlamaConfig) -> Result<Tokenizer> {
    let sp_path = dir.join("tokenizer.model");
    let sp = SpModel::open(&sp_path).with_context(|| format!("reading {}", sp_path.display()))?;
    let mut n_vocab = sp.len();
    let added = dir.join("added_tokens.json");
    if added.is_file() {
        let text = std::fs::read_to_string(&added)
            .with_context(|| format!("reading {}", added.display()))?;
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a JSON object", added.display()))?;
        for id in map.values().filter_map(|v| v.as_u64()) {
            let id = usize::try_from(id).unwrap_or(usize::MAX);
            n_vocab = n_vocab.max(id.saturating_add(1));
        }
    }
    let meta = crate::convert::vocab_metadata(dir, cfg, n_vocab)?;
    let bytes = serialize_header(&meta, &[]).context("building the vocabulary")?;
    let header = GgufHeader::parse(&bytes).context("reading back the vocabulary")?;
    Tokenizer::from_gguf(&header)
}

/// Tokens of `text` with BOS as llama-perplexity adds it, and the BOS to substitute per chunk.
pub fn tokenize(tok: &Tokenizer, text: &str) -> Result<(Vec<u32>, Option<u32>)> {
    if tok.add_eos() {
        bail!("the vocabulary adds EOS; llama-perplexity refuses such models too");
    }
    let bos = tok.bos().unwrap_or(1);
    let add_bos = tok.add_bos() && tok.bos().is_some();
    Ok((tok.encode(text, true, false), add_bos.then_some(bos)))
}

/// Fails with a clear message naming the text when it is too short for the context.
pub fn check_length(name: &Path, n_tokens: usize, p: &PplParams) -> Result<usize> {
    n_chunks(n_tokens, p).with_context(|| {
        format!(
            "eval text {}: too short for -c {} (lower -c or give a longer text)",
            name.display(),
            p.n_ctx
        )
    })
}

/// A perplexity result as the pipeline stores it (`eval/ppl-<level>-<text>.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PplRecord {
    pub ppl: f64,
    pub ppl_err: Option<f64>,
    pub running: Vec<f64>,
    pub n_ctx: usize,
    pub n_batch: usize,
    pub n_chunk: usize,
    pub n_tokens: usize,
    pub n_scored: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub threads: usize,
    pub backend: String,
}

/// A loaded model with its vocabulary.
pub struct Loaded {
    pub model: Evaluator,
    pub tok: Tokenizer,
}

/// Loads a GGUF for evaluation on `device` (its vocabulary is required).
pub fn load(path: &Path, device: &Device) -> Result<Loaded> {
    let opened = Opened::open(path, true)?;
    let model = device::load(Arc::clone(&opened.file), device)
        .with_context(|| format!("loading {}", path.display()))?;
    let tok = opened
        .tok
        .with_context(|| format!("{} has no vocabulary", path.display()))?;
    Ok(Loaded { model, tok })
}

/// Perplexity of `m` on `text`; `on_tokens(done)` after every chunk.
pub fn ppl(
    m: &Loaded,
    text: &str,
    p: &PplParams,
    mut on_tokens: impl FnMut(u64),
) -> Result<PplRecord> {
    let (tokens, bos) = tokenize(&m.tok, text)?;
    let t0 = Instant::now();
    let r = perplexity(&m.model, &tokens, bos, p, |k, _| {
        on_tokens((k * p.n_ctx) as u64)
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    Ok(PplRecord {
        ppl: r.ppl,
        ppl_err: r.ppl_err,
        running: r.running,
        n_ctx: p.n_ctx,
        n_batch: p.n_batch,
        n_chunk: r.n_chunk,
        n_tokens: tokens.len(),
        n_scored: r.n_scored,
        seconds,
        tokens_per_second: r.n_eval as f64 / seconds.max(1e-9),
        threads: rayon::current_num_threads(),
        backend: m.model.backend.name(),
    })
}

/// Size of the base log-probability file `--kld` writes for one text (llama-perplexity's format).
pub fn kld_base_size(n_chunk: usize, n_ctx: usize, n_vocab: usize) -> u64 {
    let rows = (n_chunk as u64).saturating_mul(scored_per_chunk(n_ctx) as u64);
    20u64
        .saturating_add(
            (n_chunk as u64)
                .saturating_mul(n_ctx as u64)
                .saturating_mul(4),
        )
        .saturating_add(
            rows.saturating_mul(row_len(n_vocab) as u64)
                .saturating_mul(2),
        )
}

/// Evaluates the F16 model on `text` and writes its log-probabilities to `out` (the KLD base, as
/// `kiln perplexity --kl-divergence-base` writes it).
pub fn kld_base(
    m: &Loaded,
    text: &str,
    p: &PplParams,
    out: &Path,
    mut on_tokens: impl FnMut(u64),
) -> Result<()> {
    let (tokens, bos) = tokenize(&m.tok, text)?;
    let f = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    perplexity_save_base(&m.model, &tokens, bos, p, &mut w, |k, _| {
        on_tokens((k * p.n_ctx) as u64)
    })?;
    std::io::Write::flush(&mut w).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// The KLD of a level against the F16 base, as the pipeline stores it
/// (`eval/kld-<level>-<text>.json`): the headline numbers plus every statistic kiln perplexity
/// --kl-divergence reports (under `detail`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KldRecord {
    pub mean_kld: f64,
    pub mean_kld_unc: f64,
    /// Share of tokens whose top token equals the base's (0..1).
    pub same_top: f64,
    pub same_top_unc: f64,
    /// Scored tokens.
    pub count: usize,
    pub n_chunk: usize,
    pub detail: serde_json::Value,
}

/// KLD of `m` against the base file at `base` (made by [`kld_base`] with the same parameters).
pub fn kld(
    m: &Loaded,
    base: &Path,
    p: &PplParams,
    mut on_tokens: impl FnMut(u64),
) -> Result<KldRecord> {
    let mut b = BaseLogits::open(base)?;
    let (_, bos) = tokenize(&m.tok, "x")?;
    let r = kld_stats(&m.model, &mut b, bos, p.n_batch, p.max_chunks, |row| {
        on_tokens((row.chunk * p.n_ctx) as u64)
    })?;
    Ok(KldRecord {
        mean_kld: r.kld.value,
        mean_kld_unc: r.kld.unc,
        same_top: r.same_top.value,
        same_top_unc: r.same_top.unc,
        count: r.count,
        n_chunk: r.n_chunk,
        detail: serde_json::to_value(&r)?,
    })
}

/// Speed as the pipeline stores it (`eval/bench-<level>.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchRecord {
    pub pp_tokens: usize,
    pub pp_tok_s: f64,
    pub pp_tok_s_sd: f64,
    pub tg_tokens: usize,
    pub tg_ms_tok: f64,
    pub tg_ms_tok_sd: f64,
    pub reps: usize,
    pub threads: usize,
    pub backend: String,
}

/// The pipeline's speed test: llama-bench's pp512 and tg128 (prompt capped at the model's trained
/// context), three timed runs after a warm-up.
pub fn bench_params(n_ctx_train: usize) -> BenchParams {
    let n_prompt = 512.min(n_ctx_train.max(2));
    BenchParams {
        n_prompt,
        n_gen: 128.min(n_ctx_train.max(2)),
        reps: 3,
        n_batch: n_prompt,
        warmup: true,
    }
}

/// Measures `m`'s speed.
pub fn speed(m: &Loaded, p: &BenchParams) -> Result<BenchRecord> {
    let (_, bos) = tokenize(&m.tok, "x")?;
    let stats = bench(&m.model, bos, p, |_, _| {})?;
    let pp = stats.iter().find(|s| s.n_prompt > 0);
    let tg = stats.iter().find(|s| s.n_gen > 0);
    Ok(BenchRecord {
        pp_tokens: p.n_prompt,
        pp_tok_s: pp.map(|s| s.avg_ts).unwrap_or(0.0),
        pp_tok_s_sd: pp.map(|s| s.stddev_ts).unwrap_or(0.0),
        tg_tokens: p.n_gen,
        tg_ms_tok: tg.map(|s| s.avg_ms_per_token).unwrap_or(0.0),
        tg_ms_tok_sd: tg.map(|s| s.stddev_ms_per_token).unwrap_or(0.0),
        reps: p.reps,
        threads: rayon::current_num_threads(),
        backend: m.model.backend.name(),
    })
}
