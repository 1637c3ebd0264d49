//! Perplexity with llama-perplexity's method (spec §5.1): fixed chunks of `n_ctx` tokens, each
//! evaluated from an empty cache with BOS in place of its first token, only the second half of each
//! chunk scored, running `[k]` values and the delta-method error of the final estimate.

use std::io::Write;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

pub use crate::eval::chunks::{check_memory, for_each_chunk, memory_needed};
use crate::eval::kld;
use crate::model::{Backend, Model};

/// What to evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PplParams {
    /// Tokens per chunk (`-c`).
    pub n_ctx: usize,
    /// Tokens per forward call (`-b`, capped at `n_ctx`).
    pub n_batch: usize,
    /// At most this many chunks (`--chunks`).
    pub max_chunks: Option<usize>,
}

/// The outcome of a perplexity run.
#[derive(Clone, Debug, PartialEq)]
pub struct PplResult {
    /// Running perplexity after each chunk (`[k]` values).
    pub running: Vec<f64>,
    pub ppl: f64,
    /// Delta-method uncertainty of `ppl`, None when the variance is not positive.
    pub ppl_err: Option<f64>,
    pub n_chunk: usize,
    /// Scored tokens.
    pub n_scored: usize,
    /// Tokens evaluated (`n_chunk * n_ctx`).
    pub n_eval: usize,
}

/// Number of chunks llama-perplexity uses for `ntok` tokens, or an error like its own.
pub fn n_chunks(ntok: usize, p: &PplParams) -> Result<usize> {
    if p.n_ctx < 2 {
        bail!("context size must be at least 2 (got {})", p.n_ctx);
    }
    if ntok < 2 * p.n_ctx {
        bail!(
            "you need at least {} tokens to evaluate perplexity with a context of {}; the text tokenizes to only {ntok} tokens",
            2 * p.n_ctx,
            p.n_ctx
        );
    }
    let max = ntok / p.n_ctx;
    Ok(match p.max_chunks {
        Some(c) if c > 0 => c.min(max),
        _ => max,
    })
}

/// `-(log softmax(logits)[tok])` exactly as perplexity.cpp's `log_softmax`: f32 max, f64 sum of
/// `expf` of f32 differences, log in f64.
pub fn nll(logits: &[f32], tok: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from((l - max).exp())).sum();
    let lt = logits.get(tok).copied().unwrap_or(f32::NEG_INFINITY);
    -(f64::from(lt - max) - sum.ln())
}

/// The final estimate: `(ppl, Some(err))` from `S1 = Σnll`, `S2 = Σnll²` over `n` tokens.
pub fn estimate(s1: f64, s2: f64, n: usize) -> (f64, Option<f64>) {
    let nf = n as f64;
    let mean = s1 / nf;
    let ppl = mean.exp();
    let var = s2 / nf - mean * mean;
    if var > 0.0 && n > 1 {
        (ppl, Some((var / (nf - 1.0)).sqrt() * ppl))
    } else {
        (ppl, None)
    }
}

/// Runs the evaluation over `tokens` (the whole tokenized text, BOS first if the vocabulary adds
/// one). `bos` replaces each chunk's first token when `Some`. `on_chunk(k, running_ppl)` is called
/// after every chunk.
pub fn perplexity<B: Backend>(
    model: &Model<B>,
    tokens: &[u32],
    bos: Option<u32>,
    p: &PplParams,
    on_chunk: impl FnMut(usize, f64),
) -> Result<PplResult> {
    run(model, tokens, bos, p, None, on_chunk)
}

/// [`perplexity`] that also writes the base log-probability file of `--kl-divergence-base`
/// (llama-perplexity's format, spec §5.2) to `out`. The negative log-likelihoods are then
/// computed as llama-perplexity does in that mode (log of the sum rounded to f32).
pub fn perplexity_save_base<B: Backend>(
    model: &Model<B>,
    tokens: &[u32],
    bos: Option<u32>,
    p: &PplParams,
    out: &mut dyn Write,
    on_chunk: impl FnMut(usize, f64),
) -> Result<PplResult> {
    run(model, tokens, bos, p, Some(out), on_chunk)
}

fn run<B: Backend>(
    model: &Model<B>,
    tokens: &[u32],
    bos: Option<u32>,
    p: &PplParams,
    mut out: Option<&mut dyn Write>,
    mut on_chunk: impl FnMut(usize, f64),
) -> Result<PplResult> {
    let n_chunk = n_chunks(tokens.len(), p)?;
    let n_ctx = p.n_ctx;
    let first = n_ctx / 2;
    let n_vocab = model.cfg.shape.n_vocab;
    let nv = kld::row_len(n_vocab);
    let n_score = n_ctx - 1 - first;
    if let Some(w) = out.as_mut() {
        kld::write_header(w, n_ctx, n_vocab, n_chunk, tokens)?;
    }
    let mut rows: Vec<u16> = Vec::new();
    let (mut s1, mut s2, mut count) = (0.0f64, 0.0f64, 0usize);
    let mut running = Vec::with_capacity(n_chunk);
    for_each_chunk(
        model,
        tokens,
        bos,
        n_ctx,
        p.n_batch,
        n_chunk,
        |k, orig, logits| {
            // logits row i is position first+i and scores token first+i+1
            let row = |i: usize| logits.get(i * n_vocab..(i + 1) * n_vocab).unwrap_or(&[]);
            let tok = |i: usize| orig.get(first + i + 1).copied().unwrap_or(0) as usize;
            let vals: Vec<f64> = match out.as_mut() {
                None => (0..n_score)
                    .into_par_iter()
                    .map(|i| nll(row(i), tok(i)))
                    .collect(),
                Some(w) => {
                    rows.clear();
                    rows.resize(n_score * nv, 0);
                    let vals = rows
                        .par_chunks_mut(nv)
                        .enumerate()
                        .map(|(i, r)| kld::encode_row(row(i), tok(i), r))
                        .collect();
                    let bytes: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
                    w.write_all(&bytes)
                        .context("writing the base log-probabilities")?;
                    vals
                }
            };
            for v in vals {
                s1 += v;
                s2 += v * v;
            }
            count += n_score;
            let r = (s1 / count as f64).exp();
            running.push(r);
            on_chunk(k + 1, r);
            Ok(())
        },
    )?;
    if let Some(w) = out.as_mut() {
        w.flush().context("writing the base log-probabilities")?;
    }
    let (ppl, ppl_err) = estimate(s1, s2, count);
    Ok(PplResult {
        running,
        ppl,
        ppl_err,
        n_chunk,
        n_scored: count,
        n_eval: n_chunk * n_ctx,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Hparams;

    #[test]
    fn chunk_count_follows_llama_perplexity() {
        let p = PplParams {
            n_ctx: 128,
            n_batch: 2048,
            max_chunks: None,
        };
        assert!(n_chunks(255, &p).is_err());
        assert_eq!(n_chunks(256, &p).unwrap(), 2);
        assert_eq!(n_chunks(1000, &p).unwrap(), 7);
        let p3 = PplParams {
            max_chunks: Some(3),
            ..p
        };
        assert_eq!(n_chunks(1000, &p3).unwrap(), 3);
        assert_eq!(n_chunks(300, &p3).unwrap(), 2);
        let p1 = PplParams { n_ctx: 1, ..p };
        assert!(n_chunks(100, &p1).is_err());
    }

    #[test]
    fn nll_of_uniform_logits_is_log_vocab() {
        let l = vec![0.25f32; 1000];
        assert!((nll(&l, 3) - 1000f64.ln()).abs() < 1e-9);
        let mut l2 = vec![0.0f32; 4];
        l2[1] = 100.0;
        assert!(nll(&l2, 1) < 1e-6);
        assert!(nll(&l2, 9).is_infinite());
    }

    fn cfg() -> Hparams {
        Hparams {
            shape: crate::shape::ModelShape {
                n_vocab: 32000,
                n_embd: 4096,
                n_layer: 32,
                n_ff: 11008,
                n_head: 32,
                n_head_kv: 32,
                head_dim: 128,
                tied: false,
            },
            n_rot: 128,
            rms_eps: 1e-5,
            rope: crate::model::Rope {
                freq_base: 10000.0,
                freq_scale: 1.0,
                factors: None,
            },
            n_ctx_train: 4096,
        }
    }

    #[test]
    fn memory_estimate_counts_the_kv_cache_and_logits() {
        let c = cfg();
        // Llama-2-7B at 4096: f16 KV cache 2 GiB, kept logits 2048*32000*4
        let need = memory_needed(&c, 4096, 512);
        let kv = 2 * 32 * 4096 * 4096 * 2u128;
        let logits = (2048 + 512) * 32000 * 4u128;
        assert!(
            need > kv + logits && need < kv + logits + (1 << 30),
            "{need}"
        );
        assert!(memory_needed(&c, 8192, 512) > need);
        // no overflow, and refused, for absurd contexts
        assert!(memory_needed(&c, usize::MAX, usize::MAX) > 1 << 64);
        let e = check_memory(&c, 1 << 40, 2048).unwrap_err().to_string();
        assert!(e.contains("GiB"), "{e}");
    }

    #[test]
    fn estimate_uses_the_delta_method() {
        // two tokens with nll 1 and 3: mean 2, var 1, err = sqrt(1/1) * e^2
        let (ppl, err) = estimate(4.0, 10.0, 2);
        assert!((ppl - 2f64.exp()).abs() < 1e-12);
        assert!((err.unwrap() - 2f64.exp()).abs() < 1e-12);
        assert_eq!(estimate(2.0, 2.0, 2).1, None);
    }
}
