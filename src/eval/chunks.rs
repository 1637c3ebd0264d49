//! The chunked evaluation loop every llama-perplexity-style measurement shares (perplexity, KLD,
//! importance matrices): chunks of `n_ctx` tokens from an empty cache, BOS first, batches of
//! `n_batch`, logits of the scored half; and the memory check made before it allocates.

use anyhow::{bail, Result};

use crate::model::{Backend, Hparams, Model};

/// Evaluates `n_chunk` chunks of `n_ctx` tokens as llama-perplexity does (empty cache per chunk,
/// `bos` in place of the first token, batches of `n_batch`) and calls `f(k, chunk, logits)` with
/// the chunk's original tokens and the logits of positions `n_ctx/2..n_ctx` (`n_vocab` each).
pub fn for_each_chunk<B: Backend>(
    model: &Model<B>,
    tokens: &[u32],
    bos: Option<u32>,
    n_ctx: usize,
    n_batch: usize,
    n_chunk: usize,
    mut f: impl FnMut(usize, &[u32], &[f32]) -> Result<()>,
) -> Result<()> {
    if n_ctx < 2 {
        bail!("context size must be at least 2 (got {n_ctx})");
    }
    let n_batch = n_batch.clamp(1, n_ctx);
    let first = n_ctx / 2;
    let n_vocab = model.cfg.shape.n_vocab;
    check_memory(&model.cfg, n_ctx, n_batch)?;
    let mut cache = model.new_cache(n_ctx)?;
    let mut logits: Vec<f32> = Vec::with_capacity((n_ctx - first) * n_vocab);
    for k in 0..n_chunk {
        let start = k * n_ctx;
        let Some(orig) = tokens.get(start..start + n_ctx) else {
            bail!("chunk {} needs tokens up to {}", k + 1, start + n_ctx);
        };
        let mut input = orig.to_vec();
        if let (Some(b), Some(t0)) = (bos, input.first_mut()) {
            *t0 = b;
        }
        logits.clear();
        let mut pos = 0;
        while pos < n_ctx {
            let end = (pos + n_batch).min(n_ctx);
            if end > first {
                let from = first.saturating_sub(pos);
                logits.extend(model.forward(&mut cache, &input[pos..end], pos, from)?);
            } else {
                // context-only batch: logits of its last row are computed and dropped
                model.forward(&mut cache, &input[pos..end], pos, end - pos - 1)?;
            }
            pos = end;
        }
        f(k, orig, &logits)?;
    }
    Ok(())
}

/// Bytes an evaluation at `n_ctx` needs besides the weights: the f16 KV cache, its f32 copy in
/// attention, the kept logits of half a chunk, and the activations of one batch.
pub fn memory_needed(cfg: &Hparams, n_ctx: usize, n_batch: usize) -> u128 {
    let (c, b) = (n_ctx as u128, n_batch.min(n_ctx) as u128);
    let m = |xs: &[u128]| xs.iter().fold(1u128, |a, &x| a.saturating_mul(x));
    let kvd = cfg.shape.kv_dim() as u128;
    let kv = m(&[4, cfg.shape.n_layer as u128, c, kvd]);
    let kv_f32 = m(&[8, c, kvd]);
    let logits = m(&[(c - c / 2).saturating_add(b), cfg.shape.n_vocab as u128, 4]);
    let width = (8 * cfg.shape.n_embd as u128 + 4 * cfg.shape.n_ff as u128).saturating_add(c);
    let acts = m(&[b, width, 4]);
    kv.saturating_add(kv_f32)
        .saturating_add(logits)
        .saturating_add(acts)
}

/// `MemAvailable` of /proc/meminfo in bytes, when the system says.
fn mem_available() -> Option<u128> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn gib(b: u128) -> f64 {
    b as f64 / f64::from(1u32 << 30)
}

/// Refuses a context whose cache, logits and activations do not fit the available memory
/// (checked before anything is allocated).
pub fn check_memory(cfg: &Hparams, n_ctx: usize, n_batch: usize) -> Result<()> {
    let need = memory_needed(cfg, n_ctx, n_batch);
    // without /proc/meminfo, still refuse what no machine has (1 TiB)
    let avail = mem_available().unwrap_or(1 << 40);
    if need > avail {
        bail!(
            "a context of {n_ctx} tokens needs about {:.2} GiB for the KV cache, logits and activations, but only {:.2} GiB of memory is available; use a smaller context",
            gib(need),
            gib(avail)
        );
    }
    Ok(())
}
