//! KL divergence against a base model, as llama-perplexity computes it (spec §5.2, §5.3): the
//! base log-probability file (`_logits_`, n_ctx, n_vocab, n_chunk, the tokens, then per scored
//! position an f32 scale and minimum followed by one u16 per vocabulary entry), and the
//! statistics of `--kl-divergence` (PPL ratio, KLD, Δp percentiles, RMS Δp, same top token).

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use crate::eval::chunks::for_each_chunk;
use crate::model::{Backend, Model};

/// The first 8 bytes of a base log-probability file.
pub const MAGIC: &[u8; 8] = b"_logits_";

/// u16 values stored per scored position: 4 for the two f32, then n_vocab rounded up to even.
pub fn row_len(n_vocab: usize) -> usize {
    2 * n_vocab.div_ceil(2) + 4
}

/// Scored positions per chunk of `n_ctx` tokens.
pub fn scored_per_chunk(n_ctx: usize) -> usize {
    n_ctx.saturating_sub(1 + n_ctx / 2)
}

/// ggml's `nearest_int`: round to nearest, ties to even, through the f32 mantissa trick.
fn nearest_int(f: f32) -> i32 {
    let v = f + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Max, first index of the max, and f64 sum of `expf(l - max)` of a logits row.
fn max_and_sum(logits: &[f32]) -> (f32, usize, f64) {
    let mut max = logits.first().copied().unwrap_or(0.0);
    let mut imax = 0;
    for (i, &l) in logits.iter().enumerate().skip(1) {
        if l > max {
            max = l;
            imax = i;
        }
    }
    let sum: f64 = logits.iter().map(|&l| f64::from((l - max).exp())).sum();
    (max, imax, sum)
}

/// Encodes one logits row as perplexity.cpp's base-writing `log_softmax` does into `out`
/// (`row_len(n_vocab)` values) and returns the token's negative log-likelihood as it does
/// (`max + (f32)ln(sum) - logit[tok]`).
pub fn encode_row(logits: &[f32], tok: usize, out: &mut [u16]) -> f64 {
    let (maxl, _, sum) = max_and_sum(logits);
    let minl = logits.iter().copied().fold(maxl, f32::min).max(maxl - 16.0);
    let lse = sum.ln() as f32;
    let min_log_prob = minl - maxl - lse;
    let scale = (maxl - minl) / 65535.0;
    let (head, q) = out.split_at_mut(4.min(out.len()));
    let sb = scale.to_le_bytes();
    let mb = min_log_prob.to_le_bytes();
    for (i, h) in head.iter_mut().enumerate() {
        let b = if i < 2 { &sb } else { &mb };
        let j = (i % 2) * 2;
        *h = u16::from_le_bytes([b[j], b[j + 1]]);
    }
    q.fill(0);
    if scale != 0.0 {
        let inv = 1.0 / scale;
        for (qi, &l) in q.iter_mut().zip(logits) {
            if l > minl {
                *qi = nearest_int(inv * (l - minl)) as u16;
            }
        }
    }
    let lt = logits.get(tok).copied().unwrap_or(f32::NEG_INFINITY);
    f64::from(maxl + lse - lt)
}

/// `(scale, min_log_prob)` of an encoded row.
fn row_params(row: &[u16]) -> (f32, f32) {
    let w = |i: usize| row.get(i).copied().unwrap_or(0).to_le_bytes();
    let (a, b, c, d) = (w(0), w(1), w(2), w(3));
    (
        f32::from_le_bytes([a[0], a[1], b[0], b[1]]),
        f32::from_le_bytes([c[0], c[1], d[0], d[1]]),
    )
}

/// Decoded base log-probabilities of one encoded row (`scale*q + min_log_prob`).
#[cfg(test)]
pub fn decode_row(row: &[u16], n_vocab: usize) -> Vec<f32> {
    let (scale, min) = row_params(row);
    row.iter()
        .skip(4)
        .take(n_vocab)
        .map(|&q| scale * f32::from(q) + min)
        .collect()
}

/// Writes the file header: magic, n_ctx, n_vocab, n_chunk and the first `n_chunk*n_ctx` tokens.
pub fn write_header(
    w: &mut impl Write,
    n_ctx: usize,
    n_vocab: usize,
    n_chunk: usize,
    tokens: &[u32],
) -> Result<()> {
    let i32_of = |v: usize, what: &str| -> Result<i32> {
        i32::try_from(v).with_context(|| format!("{what} {v} does not fit the file's i32"))
    };
    let n_tok = n_chunk.checked_mul(n_ctx).context("too many tokens")?;
    let toks = tokens.get(..n_tok).context("fewer tokens than chunks")?;
    w.write_all(MAGIC)?;
    for (v, what) in [(n_ctx, "n_ctx"), (n_vocab, "n_vocab"), (n_chunk, "n_chunk")] {
        w.write_all(&i32_of(v, what)?.to_le_bytes())?;
    }
    let mut buf = Vec::with_capacity(toks.len() * 4);
    for &t in toks {
        buf.extend_from_slice(&i32_of(t as usize, "token")?.to_le_bytes());
    }
    w.write_all(&buf)?;
    Ok(())
}

/// An opened base log-probability file, positioned at its first row.
pub struct BaseLogits {
    pub path: PathBuf,
    pub n_ctx: usize,
    pub n_vocab: usize,
    pub n_chunk: usize,
    /// The evaluated tokens (`n_chunk*n_ctx`, BOS first if the base model added one).
    pub tokens: Vec<u32>,
    reader: BufReader<File>,
}

impl BaseLogits {
    /// Opens and checks a file written by `--kl-divergence-base` (kiln's or llama-perplexity's):
    /// header values in range and the file size exactly what they imply.
    pub fn open(path: &Path) -> Result<BaseLogits> {
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = f
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        let mut r = BufReader::new(f);
        let mut head = [0u8; 20];
        r.read_exact(&mut head).map_err(|_| {
            anyhow::anyhow!(
                "{} is too short to be a base log-probability file",
                path.display()
            )
        })?;
        if &head[..8] != MAGIC {
            bail!(
                "{} does not look like a file of log-probabilities (no _logits_ magic)",
                path.display()
            );
        }
        let rd = |i: usize| i32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let (n_ctx, n_vocab, n_chunk) = (rd(8), rd(12), rd(16));
        if n_ctx < 2 || n_vocab < 1 || n_chunk < 1 {
            bail!(
                "{}: bad header (n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk})",
                path.display()
            );
        }
        let (n_ctx, n_vocab, n_chunk) = (n_ctx as u64, n_vocab as u64, n_chunk as u64);
        let n_tok = n_ctx * n_chunk;
        let rows = u128::from(n_chunk) * scored_per_chunk(n_ctx as usize) as u128;
        let want = 20 + u128::from(n_tok) * 4 + rows * row_len(n_vocab as usize) as u128 * 2;
        if u128::from(len) != want {
            bail!(
                "{}: {len} bytes, but n_ctx {n_ctx}, n_vocab {n_vocab} and n_chunk {n_chunk} need {want} (truncated or not a base file)",
                path.display()
            );
        }
        let mut raw = vec![0u8; n_tok as usize * 4];
        r.read_exact(&mut raw)
            .with_context(|| format!("reading the tokens of {}", path.display()))?;
        let mut tokens = Vec::with_capacity(n_tok as usize);
        for c in raw.chunks_exact(4) {
            let t = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            if t < 0 || t as u64 >= n_vocab {
                bail!(
                    "{}: token id {t} is outside the vocabulary of {n_vocab}",
                    path.display()
                );
            }
            tokens.push(t as u32);
        }
        Ok(BaseLogits {
            path: path.to_path_buf(),
            n_ctx: n_ctx as usize,
            n_vocab: n_vocab as usize,
            n_chunk: n_chunk as usize,
            tokens,
            reader: r,
        })
    }

    /// Reads the next chunk's rows (`scored_per_chunk(n_ctx) * row_len(n_vocab)` values).
    pub fn next_chunk(&mut self, out: &mut Vec<u16>) -> Result<()> {
        let n = scored_per_chunk(self.n_ctx) * row_len(self.n_vocab);
        let mut raw = vec![0u8; n * 2];
        self.reader
            .read_exact(&mut raw)
            .with_context(|| format!("reading log-probs from {}", self.path.display()))?;
        out.clear();
        out.extend(
            raw.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]])),
        );
        Ok(())
    }
}

/// Running sums of one KLD evaluation (perplexity.cpp's `kl_divergence_result`).
#[derive(Clone, Debug, Default)]
struct Acc {
    sum_nll: f64,
    sum_nll2: f64,
    sum_nll_base: f64,
    sum_nll_base2: f64,
    sum_nll_nll_base: f64,
    sum_kld: f64,
    sum_kld2: f64,
    sum_p_diff: f64,
    sum_p_diff2: f64,
    sum_p_diff4: f64,
    max_p_diff: f32,
    n_same_top: usize,
    count: usize,
}

/// One scored token: what perplexity.cpp's KLD `log_softmax` computes (its f32/f64 mix).
#[derive(Clone, Copy, Debug)]
struct TokenKld {
    nll: f32,
    nll_base: f32,
    kld: f64,
    p_diff: f32,
    same_top: bool,
}

fn token_kld(logits: &[f32], base: &[u16], tok: usize) -> TokenKld {
    let (maxl, imax, sum) = max_and_sum(logits);
    let lse = sum.ln() as f32;
    let (scale, min_log_prob) = row_params(base);
    let q = base.get(4..).unwrap_or(&[]);
    let lt = logits.get(tok).copied().unwrap_or(f32::NEG_INFINITY);
    let nll = maxl + lse - lt;
    let nll_base = -(scale * f32::from(q.get(tok).copied().unwrap_or(0)) + min_log_prob);
    let shift = maxl + lse;
    let mut kld = 0.0f64;
    let mut imax_base = 0;
    let mut pmax = 0.0f32;
    for (i, (&qi, &l)) in q.iter().zip(logits).enumerate() {
        let lp = scale * f32::from(qi) + min_log_prob;
        if i == 0 || lp > pmax {
            pmax = lp;
            imax_base = i;
        }
        if lp > -16.0 {
            kld += f64::from(lp.exp() * (lp - l + shift));
        }
    }
    let p_diff = (-nll).exp() - (-nll_base).exp();
    TokenKld {
        nll,
        nll_base,
        kld,
        p_diff,
        same_top: imax == imax_base,
    }
}

impl Acc {
    fn add(&mut self, t: &TokenKld) {
        self.sum_nll += f64::from(t.nll);
        self.sum_nll2 += f64::from(t.nll * t.nll);
        self.sum_nll_base += f64::from(t.nll_base);
        self.sum_nll_base2 += f64::from(t.nll_base * t.nll_base);
        self.sum_nll_nll_base += f64::from(t.nll * t.nll_base);
        self.sum_kld += t.kld;
        self.sum_kld2 += t.kld * t.kld;
        self.sum_p_diff += f64::from(t.p_diff);
        let d2 = f64::from(t.p_diff * t.p_diff);
        self.sum_p_diff2 += d2;
        self.sum_p_diff4 += d2 * d2;
        self.max_p_diff = self.max_p_diff.max(t.p_diff.abs());
        self.n_same_top += usize::from(t.same_top);
        self.count += 1;
    }
}

/// A value and its uncertainty.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Estimate {
    pub value: f64,
    pub unc: f64,
}

/// perplexity.cpp's `mean_and_uncertainty`.
fn mean_unc(sum: f64, sum2: f64, n: usize) -> Estimate {
    if n < 1 {
        return Estimate::default();
    }
    let nf = n as f64;
    let f = sum / nf;
    let df = sum2 / nf - f * f;
    let unc = if df > 0.0 && n > 10 {
        (df / (nf - 1.0)).sqrt()
    } else {
        0.0
    };
    Estimate { value: f, unc }
}

/// perplexity.cpp's `covariance`.
fn covariance(sa: f64, sb: f64, sab: f64, n: usize) -> f64 {
    if n < 10 {
        return 0.0;
    }
    let nf = n as f64;
    (sab / nf - (sa / nf) * (sb / nf)) / (nf - 1.0)
}

/// The statistics after each chunk (one row of llama-perplexity's KLD table; Δp RMS and same-top
/// as fractions, not %).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct KldChunkRow {
    pub chunk: usize,
    pub ppl: Estimate,
    pub ln_ppl_ratio: Estimate,
    pub kld: Estimate,
    pub rms_dp: Estimate,
    pub same_top: Estimate,
}

fn row_stats(chunk: usize, a: &Acc) -> KldChunkRow {
    let lp = mean_unc(a.sum_nll, a.sum_nll2, a.count);
    let ppl = lp.value.exp();
    let lb = mean_unc(a.sum_nll_base, a.sum_nll_base2, a.count);
    let cov = covariance(a.sum_nll, a.sum_nll_base, a.sum_nll_nll_base, a.count);
    let mse = mean_unc(a.sum_p_diff2, a.sum_p_diff4, a.count);
    let rms = mse.value.sqrt();
    let top = a.n_same_top as f64 / a.count as f64;
    KldChunkRow {
        chunk,
        ppl: Estimate {
            value: ppl,
            unc: ppl * lp.unc,
        },
        ln_ppl_ratio: Estimate {
            value: lp.value - lb.value,
            unc: (lp.unc * lp.unc + lb.unc * lb.unc - 2.0 * cov).sqrt(),
        },
        kld: mean_unc(a.sum_kld, a.sum_kld2, a.count),
        rms_dp: Estimate {
            value: rms,
            unc: 0.5 / rms * mse.unc,
        },
        same_top: Estimate {
            value: top,
            unc: (top * (1.0 - top) / (a.count as f64 - 1.0)).sqrt(),
        },
    }
}

/// perplexity.cpp's percentile: linear interpolation at `fraction*(n-1)`, in f32.
fn percentile(sorted: &[f32], fraction: f32) -> f32 {
    let (Some(&first), Some(&last)) = (sorted.first(), sorted.last()) else {
        return f32::NAN;
    };
    if fraction <= 0.0 {
        return first;
    }
    if fraction >= 1.0 {
        return last;
    }
    let mut p = fraction * (sorted.len() - 1) as f32;
    let ip = p as usize;
    p -= ip as f32;
    let a = sorted.get(ip).copied().unwrap_or(last);
    let b = sorted.get(ip + 1).copied().unwrap_or(last);
    (1.0 - p) * a + p * b
}

fn median(sorted: &[f32]) -> f32 {
    let n = sorted.len();
    if n == 0 {
        return f32::NAN;
    }
    if n.is_multiple_of(2) {
        0.5 * (sorted[n / 2] + sorted[n / 2 - 1])
    } else {
        sorted[n / 2]
    }
}

/// Labels and fractions of the KLD quantiles llama-perplexity prints (besides max, median, min).
pub const KLD_QUANTILES: [(&str, f32); 8] = [
    ("99.9%", 0.999),
    ("99.0%", 0.990),
    ("95.0%", 0.950),
    ("90.0%", 0.900),
    ("10.0%", 0.100),
    (" 5.0%", 0.050),
    (" 1.0%", 0.010),
    (" 0.1%", 0.001),
];

/// The same for Δp (75% and 25% added).
pub const DP_QUANTILES: [(&str, f32); 10] = [
    ("99.9%", 0.999),
    ("99.0%", 0.990),
    ("95.0%", 0.950),
    ("90.0%", 0.900),
    ("75.0%", 0.750),
    ("25.0%", 0.250),
    ("10.0%", 0.100),
    (" 5.0%", 0.050),
    (" 1.0%", 0.010),
    (" 0.1%", 0.001),
];

/// Distribution summary of per-token values: maximum, quantiles (labels as printed), median,
/// minimum.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Spread {
    pub max: f64,
    #[serde(serialize_with = "as_map")]
    pub quantiles: Vec<(String, f64)>,
    pub median: f64,
    pub min: f64,
}

/// Labelled values as a JSON object, in order.
fn as_map<S: serde::Serializer>(v: &[(String, f64)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(v.iter().map(|(k, x)| (k, x)))
}

fn spread(sorted: &[f32], q: &[(&str, f32)]) -> Spread {
    Spread {
        max: f64::from(sorted.last().copied().unwrap_or(f32::NAN)),
        quantiles: q
            .iter()
            .map(|&(l, f)| (l.trim().to_string(), f64::from(percentile(sorted, f))))
            .collect(),
        median: f64::from(median(sorted)),
        min: f64::from(sorted.first().copied().unwrap_or(f32::NAN)),
    }
}

/// Everything `--kl-divergence` reports (fractions, not %; llama-perplexity prints the final
/// statistics only when `count >= 100`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct KldResult {
    pub n_ctx: usize,
    pub n_chunk: usize,
    /// Scored tokens.
    pub count: usize,
    pub chunks: Vec<KldChunkRow>,
    pub ppl: Estimate,
    pub ppl_base: Estimate,
    /// Correlation of ln PPL(Q) and ln PPL(base).
    pub cor: f64,
    pub ln_ppl_ratio: Estimate,
    pub ppl_ratio: Estimate,
    pub ppl_diff: Estimate,
    pub kld: Estimate,
    pub kld_spread: Spread,
    pub dp: Estimate,
    pub dp_spread: Spread,
    pub rms_dp: Estimate,
    pub same_top: Estimate,
}

fn final_stats(
    n_ctx: usize,
    chunks: Vec<KldChunkRow>,
    a: &Acc,
    kld_values: &mut [f32],
    dp_values: &mut [f32],
) -> KldResult {
    kld_values.sort_by(f32::total_cmp);
    dp_values.sort_by(f32::total_cmp);
    let last = chunks.last().copied().unwrap_or(row_stats(0, a));
    let lp = mean_unc(a.sum_nll, a.sum_nll2, a.count);
    let lb = mean_unc(a.sum_nll_base, a.sum_nll_base2, a.count);
    let ppl = lp.value.exp();
    let ppl_base = lb.value.exp();
    let (pu, bu) = (ppl * lp.unc, ppl_base * lb.unc);
    let cov = covariance(a.sum_nll, a.sum_nll_base, a.sum_nll_nll_base, a.count);
    let ratio = last.ln_ppl_ratio.value.exp();
    KldResult {
        n_ctx,
        n_chunk: chunks.len(),
        count: a.count,
        ppl: Estimate {
            value: ppl,
            unc: pu,
        },
        ppl_base: Estimate {
            value: ppl_base,
            unc: bu,
        },
        cor: cov / (lp.unc * lb.unc),
        ln_ppl_ratio: last.ln_ppl_ratio,
        ppl_ratio: Estimate {
            value: ratio,
            unc: ratio * last.ln_ppl_ratio.unc,
        },
        ppl_diff: Estimate {
            value: ppl - ppl_base,
            unc: (pu * pu + bu * bu - 2.0 * ppl * ppl_base * cov).sqrt(),
        },
        kld: last.kld,
        kld_spread: spread(kld_values, &KLD_QUANTILES),
        dp: mean_unc(a.sum_p_diff, a.sum_p_diff2, a.count),
        dp_spread: spread(dp_values, &DP_QUANTILES),
        rms_dp: last.rms_dp,
        same_top: last.same_top,
        chunks,
    }
}

/// Evaluates `model` on the tokens of `base` and compares its log-probabilities with the base
/// model's, exactly as `llama-perplexity --kl-divergence --kl-divergence-base FILE` does: the
/// file's chunks of its `n_ctx`, BOS (`bos`) in place of each chunk's first token, the second half
/// of each chunk scored. `max_chunks` limits the chunks (llama-perplexity always does them all).
/// `on_chunk` gets the running statistics after every chunk.
pub fn kld_stats<B: Backend>(
    model: &Model<B>,
    base: &mut BaseLogits,
    bos: Option<u32>,
    n_batch: usize,
    max_chunks: Option<usize>,
    mut on_chunk: impl FnMut(&KldChunkRow),
) -> Result<KldResult> {
    let n_vocab = model.cfg.shape.n_vocab;
    if base.n_vocab != n_vocab {
        bail!(
            "{} was computed with a vocabulary of {}, the model has {n_vocab}",
            base.path.display(),
            base.n_vocab
        );
    }
    let n_ctx = base.n_ctx;
    let n_chunk = match max_chunks {
        Some(c) if c > 0 => c.min(base.n_chunk),
        _ => base.n_chunk,
    };
    let per = scored_per_chunk(n_ctx);
    let nv = row_len(n_vocab);
    let cap = n_chunk.saturating_mul(per);
    let mut kld_values = Vec::with_capacity(cap);
    let mut dp_values = Vec::with_capacity(cap);
    let mut acc = Acc::default();
    let mut chunks = Vec::with_capacity(n_chunk);
    let mut rows = Vec::new();
    let tokens = std::mem::take(&mut base.tokens);
    let res = for_each_chunk(
        model,
        &tokens,
        bos,
        n_ctx,
        n_batch,
        n_chunk,
        |k, orig, logits| {
            base.next_chunk(&mut rows)?;
            let first = n_ctx / 2;
            let toks: Vec<TokenKld> = (0..per)
                .into_par_iter()
                .map(|i| {
                    let l = logits.get(i * n_vocab..(i + 1) * n_vocab).unwrap_or(&[]);
                    let b = rows.get(i * nv..(i + 1) * nv).unwrap_or(&[]);
                    let tok = orig.get(first + i + 1).copied().unwrap_or(0) as usize;
                    token_kld(l, b, tok)
                })
                .collect();
            for t in &toks {
                acc.add(t);
                kld_values.push(t.kld as f32);
                dp_values.push(t.p_diff);
            }
            let row = row_stats(k + 1, &acc);
            on_chunk(&row);
            chunks.push(row);
            Ok(())
        },
    );
    base.tokens = tokens;
    res?;
    Ok(final_stats(
        n_ctx,
        chunks,
        &acc,
        &mut kld_values,
        &mut dp_values,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 1e6)
            .map(|x| (x % 12.0) - 6.0)
            .collect()
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(65534.6), 65535);
        assert_eq!(nearest_int(-0.4), 0);
    }

    #[test]
    fn encode_decode_round_trip_within_one_step() {
        let l = logits(1001, 7);
        let mut row = vec![0u16; row_len(1001)];
        assert_eq!(row.len(), 1006);
        let nll = encode_row(&l, 5, &mut row);
        assert_eq!(row[1005], 0, "padding stays zero");
        let (scale, _) = row_params(&row);
        let dec = decode_row(&row, 1001);
        let (maxl, _, sum) = max_and_sum(&l);
        for (i, (&d, &x)) in dec.iter().zip(&l).enumerate() {
            let lp = x - maxl - sum.ln() as f32;
            assert!((d - lp).abs() <= scale * 0.51 + 1e-5, "{i}: {d} vs {lp}");
        }
        assert!((nll + f64::from(dec[5])).abs() < 1e-3);
    }

    #[test]
    fn kld_of_a_model_with_itself_is_about_zero() {
        let mut a = Acc::default();
        for s in 0..20 {
            let l = logits(500, s);
            let mut row = vec![0u16; row_len(500)];
            encode_row(&l, 3, &mut row);
            let t = token_kld(&l, &row, 3);
            assert!(t.kld.abs() < 1e-3, "{}", t.kld);
            assert!(t.same_top);
            assert!(t.p_diff.abs() < 1e-3);
            a.add(&t);
        }
        let r = row_stats(1, &a);
        assert!(r.kld.value.abs() < 1e-3);
        assert_eq!(r.same_top.value, 1.0);
    }

    #[test]
    fn kld_matches_the_closed_form() {
        // base uniform over 4 tokens (scale 0: every q is 0, all decode to -ln 4);
        // model q = [2/5, 1/5, 1/5, 1/5]: KLD(p||q) = 0.25 ln(0.25/0.4) + 0.75 ln(0.25/0.2)
        let mut row = vec![0u16; row_len(4)];
        encode_row(&[0.0; 4], 1, &mut row);
        let t = token_kld(&[2f32.ln(), 0.0, 0.0, 0.0], &row, 1);
        let want = 0.25 * (0.25f64 / 0.4).ln() + 0.75 * (0.25f64 / 0.2).ln();
        assert!((t.kld - want).abs() < 1e-6, "{} vs {want}", t.kld);
        assert!((f64::from(t.p_diff) - (0.2 - 0.25)).abs() < 1e-6);
        assert!((f64::from(t.nll) - 5f64.ln()).abs() < 1e-6);
        assert!((f64::from(t.nll_base) - 4f64.ln()).abs() < 1e-6);
        // top token: model 0, base 0 (first of equal maxima)
        assert!(t.same_top);
        let t = token_kld(&[0.0, 1.0, 0.0, 0.0], &row, 1);
        assert!(!t.same_top);
    }

    #[test]
    fn statistics_helpers_follow_perplexity_cpp() {
        assert_eq!(mean_unc(1.0, 1.0, 0), Estimate::default());
        // 11 values, 0..=10: mean 5, population var 10, unc sqrt(10/10)
        let s: f64 = (0..=10).map(f64::from).sum();
        let s2: f64 = (0..=10).map(|x| f64::from(x * x)).sum();
        let e = mean_unc(s, s2, 11);
        assert_eq!(e.value, 5.0);
        assert!((e.unc - 1.0).abs() < 1e-12);
        // at most 10 values: no uncertainty
        assert_eq!(mean_unc(3.0, 5.0, 10).unc, 0.0);
        assert_eq!(covariance(1.0, 1.0, 1.0, 9), 0.0);
        let v = [1.0f32, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 2.5);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 1.0), 4.0);
        assert_eq!(median(&v), 2.5);
        assert_eq!(median(&v[..3]), 2.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn header_round_trips_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("base.kld");
        let (n_ctx, n_vocab, n_chunk) = (8usize, 5usize, 2usize);
        let toks: Vec<u32> = (0..16).map(|i| i % 5).collect();
        let mut buf = Vec::new();
        write_header(&mut buf, n_ctx, n_vocab, n_chunk, &toks).unwrap();
        let rows = n_chunk * scored_per_chunk(n_ctx) * row_len(n_vocab);
        buf.extend(std::iter::repeat_n(0u8, rows * 2));
        std::fs::write(&p, &buf).unwrap();
        let mut b = BaseLogits::open(&p).unwrap();
        assert_eq!((b.n_ctx, b.n_vocab, b.n_chunk), (8, 5, 2));
        assert_eq!(b.tokens, toks);
        let mut r = Vec::new();
        b.next_chunk(&mut r).unwrap();
        assert_eq!(r.len(), 3 * 10);
        // truncated
        std::fs::write(&p, &buf[..buf.len() - 1]).unwrap();
        let e = BaseLogits::open(&p).err().unwrap().to_string();
        assert!(e.contains("bytes"), "{e}");
        // bad magic, too short, negative header, token outside the vocabulary
        std::fs::write(&p, b"_logitz_00000000000000000000").unwrap();
        assert!(BaseLogits::open(&p).is_err());
        std::fs::write(&p, b"_logits_").unwrap();
        assert!(BaseLogits::open(&p).is_err());
        let mut bad = buf.clone();
        bad[8..12].copy_from_slice(&(-5i32).to_le_bytes());
        std::fs::write(&p, &bad).unwrap();
        assert!(BaseLogits::open(&p).is_err());
        let mut bad = buf.clone();
        bad[20..24].copy_from_slice(&7i32.to_le_bytes());
        std::fs::write(&p, &bad).unwrap();
        let e = BaseLogits::open(&p).err().unwrap().to_string();
        assert!(e.contains("outside the vocabulary"), "{e}");
        // a huge header claiming terabytes is refused by the size check before allocating
        let mut bad = buf.clone();
        bad[16..20].copy_from_slice(&i32::MAX.to_le_bytes());
        std::fs::write(&p, &bad).unwrap();
        assert!(BaseLogits::open(&p).is_err());
    }
}
