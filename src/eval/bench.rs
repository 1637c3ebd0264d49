//! Speed measurement as llama-bench does it: prompt processing (`pp`: one prompt of `n_prompt`
//! tokens, BOS then random ids, from an empty cache, logits of the last token only) and text
//! generation (`tg`: `n_gen` single-token decode steps through the KV cache, from position 0),
//! each after a warm-up run and repeated `reps` times; tokens/s per run, mean and sample s.d.

use std::time::Instant;

use anyhow::{bail, Result};

use crate::model::{Backend, Model};

/// What to measure (`-p`, `-n`, `-r`, `-b`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchParams {
    /// Prompt tokens (0: no pp test).
    pub n_prompt: usize,
    /// Generated tokens (0: no tg test).
    pub n_gen: usize,
    /// Timed repetitions.
    pub reps: usize,
    /// Tokens per forward call while processing the prompt.
    pub n_batch: usize,
    /// One untimed run of each test first (llama-bench's default).
    pub warmup: bool,
}

/// Timings of one test (`pp512` or `tg128`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BenchStat {
    /// `pp512`, `tg128`.
    pub test: String,
    pub n_prompt: usize,
    pub n_gen: usize,
    /// Wall time of each timed run.
    pub samples_ns: Vec<u64>,
    pub avg_ns: f64,
    pub stddev_ns: f64,
    /// Tokens per second: mean and sample s.d. over runs (llama-bench's `avg_ts`, `stddev_ts`).
    pub avg_ts: f64,
    pub stddev_ts: f64,
    /// Milliseconds per token: mean and sample s.d. over runs.
    pub avg_ms_per_token: f64,
    pub stddev_ms_per_token: f64,
}

/// Mean and sample standard deviation (llama-bench's `avg`, `stdev`; 0 for one value).
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, 0.0);
    }
    let sq: f64 = v.iter().map(|x| x * x).sum();
    let var = sq / (n - 1.0) - mean * mean * n / (n - 1.0);
    (mean, var.max(0.0).sqrt())
}

impl BenchStat {
    fn new(test: String, n_prompt: usize, n_gen: usize, samples_ns: Vec<u64>) -> BenchStat {
        let n_tok = (n_prompt + n_gen) as f64;
        let ns: Vec<f64> = samples_ns.iter().map(|&t| t as f64).collect();
        let ts: Vec<f64> = ns.iter().map(|&t| 1e9 * n_tok / t.max(1.0)).collect();
        let ms: Vec<f64> = ns.iter().map(|&t| t / 1e6 / n_tok).collect();
        let (avg_ns, stddev_ns) = mean_sd(&ns);
        let (avg_ts, stddev_ts) = mean_sd(&ts);
        let (avg_ms_per_token, stddev_ms_per_token) = mean_sd(&ms);
        BenchStat {
            test,
            n_prompt,
            n_gen,
            samples_ns,
            avg_ns,
            stddev_ns,
            avg_ts,
            stddev_ts,
            avg_ms_per_token,
            stddev_ms_per_token,
        }
    }
}

/// A small xorshift generator for the random token ids (the ids do not change the work done).
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: usize) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as u32
    }
}

/// Processes an `n_prompt`-token prompt from position 0 in batches of `n_batch`.
fn prompt<B: Backend>(
    model: &Model<B>,
    cache: &mut B::Cache,
    bos: Option<u32>,
    n_prompt: usize,
    n_batch: usize,
    rng: &mut Rng,
) -> Result<()> {
    let n_vocab = model.cfg.shape.n_vocab;
    let mut done = 0;
    while done < n_prompt {
        let n = (n_prompt - done).min(n_batch.max(1));
        let toks: Vec<u32> = (0..n)
            .map(|i| match bos {
                Some(b) if done == 0 && i == 0 => b,
                _ => rng.next(n_vocab),
            })
            .collect();
        model.forward(cache, &toks, done, n - 1)?;
        done += n;
    }
    Ok(())
}

/// `n_gen` decode steps from position 0: BOS (or a random id) first, then random ids.
fn generate<B: Backend>(
    model: &Model<B>,
    cache: &mut B::Cache,
    bos: Option<u32>,
    n_gen: usize,
    rng: &mut Rng,
) -> Result<()> {
    let n_vocab = model.cfg.shape.n_vocab;
    let mut tok = bos.unwrap_or_else(|| rng.next(n_vocab));
    for pos in 0..n_gen {
        model.forward(cache, &[tok], pos, 0)?;
        tok = rng.next(n_vocab);
    }
    Ok(())
}

/// Runs the pp test (if `n_prompt > 0`) and the tg test (if `n_gen > 0`) as llama-bench runs
/// `-p n_prompt -n n_gen -r reps`. `bos` is the vocabulary's BOS when it adds one.
/// `on_run(test, rep)` is called before every timed run (rep 0 is the warm-up).
pub fn bench<B: Backend>(
    model: &Model<B>,
    bos: Option<u32>,
    p: &BenchParams,
    mut on_run: impl FnMut(&str, usize),
) -> Result<Vec<BenchStat>> {
    if p.reps == 0 {
        bail!("the number of repetitions must be positive");
    }
    if p.n_prompt == 0 && p.n_gen == 0 {
        bail!("nothing to measure: both the prompt and the generation length are 0");
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::new();
    if p.n_prompt > 0 {
        let test = format!("pp{}", p.n_prompt);
        crate::eval::perplexity::check_memory(&model.cfg, p.n_prompt, p.n_batch)?;
        let mut cache = model.new_cache(p.n_prompt)?;
        if p.warmup {
            on_run(&test, 0);
            prompt(model, &mut cache, bos, p.n_prompt, p.n_batch, &mut rng)?;
        }
        let mut samples = Vec::with_capacity(p.reps);
        for r in 0..p.reps {
            on_run(&test, r + 1);
            let t0 = Instant::now();
            prompt(model, &mut cache, bos, p.n_prompt, p.n_batch, &mut rng)?;
            samples.push(t0.elapsed().as_nanos() as u64);
        }
        out.push(BenchStat::new(test, p.n_prompt, 0, samples));
    }
    if p.n_gen > 0 {
        let test = format!("tg{}", p.n_gen);
        crate::eval::perplexity::check_memory(&model.cfg, p.n_gen, 1)?;
        let mut cache = model.new_cache(p.n_gen)?;
        if p.warmup {
            on_run(&test, 0);
            generate(model, &mut cache, bos, 1, &mut rng)?;
        }
        let mut samples = Vec::with_capacity(p.reps);
        for r in 0..p.reps {
            on_run(&test, r + 1);
            let t0 = Instant::now();
            generate(model, &mut cache, bos, p.n_gen, &mut rng)?;
            samples.push(t0.elapsed().as_nanos() as u64);
        }
        out.push(BenchStat::new(test, 0, p.n_gen, samples));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_sd() {
        assert_eq!(mean_sd(&[]), (0.0, 0.0));
        assert_eq!(mean_sd(&[4.0]), (4.0, 0.0));
        let (m, s) = mean_sd(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((s - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn stat_converts_times_to_rates() {
        // 512 tokens in 0.5 s and 0.25 s: 1024 and 2048 tokens/s
        let s = BenchStat::new("pp512".into(), 512, 0, vec![500_000_000, 250_000_000]);
        assert!((s.avg_ts - 1536.0).abs() < 1e-9);
        assert!((s.avg_ms_per_token - (0.5 / 512.0 + 0.25 / 512.0) / 2.0 * 1e3).abs() < 1e-12);
        assert!(s.stddev_ts > 0.0);
    }

    #[test]
    fn random_ids_stay_in_the_vocabulary() {
        let mut r = Rng(1);
        assert!((0..1000).all(|_| r.next(7) < 7));
        assert_eq!(r.next(0), 0);
    }
}
