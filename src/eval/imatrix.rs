//! Importance-matrix collection as llama-imatrix does it: every chunk of `n_ctx` tokens is evaluated
//! from an empty cache with BOS in place of its first token and all logits requested; each weight
//! product whose name starts with `blk.` (and `output.weight` with `process_output`) and whose
//! input has at least 16 rows adds, per input column, the sum of squared activations and the
//! number of rows. The running perplexity is the one llama-perplexity reports.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use kiln_formats::imatrix::{Imatrix, ImatrixEntry};
use kiln_quant::dot::TILED_MIN_ROWS;
use rayon::prelude::*;

use crate::eval::perplexity::{estimate, nll};
use crate::model::{Backend, Model};

/// Columns per parallel task of the accumulation.
const COL_TILE: usize = 64;

/// The accumulated statistics (llama-imatrix's `IMatrixCollector`).
#[derive(Clone, Debug, Default)]
pub struct Collector {
    pub entries: BTreeMap<String, ImatrixEntry>,
    /// Datasets of files merged in with [`Collector::merge`].
    pub datasets: Vec<String>,
    /// Tokens per chunk (`n_ctx`).
    pub chunk_size: u32,
    /// Chunks seen: the largest count divided by `chunk_size`.
    pub last_chunk: u32,
    /// Collect `output.weight` too.
    pub process_output: bool,
}

/// `acc[j] += Σ_rows x[r][j]²`, rows in order for every column (llama.cpp's summation order), the
/// columns split over threads.
fn accumulate(acc: &mut [f32], x: &[f32], cols: usize) {
    acc.par_chunks_mut(COL_TILE).enumerate().for_each(|(t, a)| {
        let c0 = t * COL_TILE;
        for row in x.chunks_exact(cols) {
            if let Some(xs) = row.get(c0..c0 + a.len()) {
                for (s, &v) in a.iter_mut().zip(xs) {
                    *s += v * v;
                }
            }
        }
    });
}

impl Collector {
    pub fn new(chunk_size: u32, process_output: bool) -> Collector {
        Collector {
            chunk_size: chunk_size.max(1),
            process_output,
            ..Default::default()
        }
    }

    /// Whether llama-imatrix collects the product of weight `name` with `rows` input rows.
    pub fn wants(&self, name: &str, rows: usize) -> bool {
        rows >= 16 && (name.starts_with("blk.") || (self.process_output && name == "output.weight"))
    }

    /// Adds one product's input (`x`: rows × `cols`, row-major) for weight `name`.
    pub fn observe(&mut self, name: &str, x: &[f32], cols: usize) -> Result<()> {
        if cols == 0 || !x.len().is_multiple_of(cols) {
            bail!("{name}: {} activations do not form rows of {cols}", x.len());
        }
        let rows = x.len() / cols;
        if !self.wants(name, rows) {
            return Ok(());
        }
        let e = self.entries.entry(name.to_string()).or_default();
        if e.counts.len() > 1 && e.counts.iter().all(|&c| c == e.counts[0]) {
            e.counts.truncate(1);
        }
        if e.sums.is_empty() {
            e.sums = vec![0.0; cols];
            e.counts = vec![0];
        } else if e.sums.len() != cols {
            bail!(
                "inconsistent size for {name} ({} vs {cols}): the imatrix comes from another model",
                e.sums.len()
            );
        }
        accumulate(&mut e.sums, x, cols);
        if let Some(i) = e.sums.iter().position(|v| !v.is_finite()) {
            bail!("non-finite values detected in {name} (column {i})");
        }
        for c in e.counts.iter_mut() {
            *c += rows as i64;
            let n_chunk = (*c / i64::from(self.chunk_size)) as u32;
            self.last_chunk = self.last_chunk.max(n_chunk);
        }
        Ok(())
    }

    /// Adds a loaded file's data (llama-imatrix's `--in-file`).
    pub fn merge(&mut self, m: &Imatrix, what: &str) -> Result<()> {
        for (name, src) in m.raw_entries(self.chunk_size) {
            let e = self.entries.entry(name.clone()).or_default();
            if e.sums.is_empty() {
                e.sums = vec![0.0; src.sums.len()];
            } else if e.sums.len() != src.sums.len() {
                bail!(
                    "{what}: mismatched sums size for {name}: {} != {}",
                    src.sums.len(),
                    e.sums.len()
                );
            }
            if e.counts.is_empty() {
                e.counts = vec![0; src.counts.len()];
            } else if e.counts.len() == 1 && src.counts.len() > 1 {
                e.counts = vec![e.counts[0]; src.counts.len()];
            } else if e.counts.len() != src.counts.len() && !m.is_legacy {
                bail!(
                    "{what}: mismatched counts size for {name}: {} != {}",
                    src.counts.len(),
                    e.counts.len()
                );
            }
            for (a, b) in e.sums.iter_mut().zip(&src.sums) {
                *a += b;
            }
            if m.is_legacy {
                let c = src.counts.first().copied().unwrap_or(0);
                e.counts.iter_mut().for_each(|x| *x += c);
            } else {
                for (a, b) in e.counts.iter_mut().zip(&src.counts) {
                    *a += b;
                }
            }
        }
        self.datasets.extend(m.datasets.iter().cloned());
        let max = self
            .entries
            .values()
            .flat_map(|e| e.counts.iter().copied())
            .max()
            .unwrap_or(0);
        self.last_chunk = (max / i64::from(self.chunk_size)) as u32;
        Ok(())
    }

    /// The GGUF file: datasets of merged files, then `dataset` (the text file, as named).
    pub fn gguf_bytes(&self, dataset: Option<&str>) -> Result<Vec<u8>> {
        let mut ds = self.datasets.clone();
        ds.extend(dataset.map(str::to_string));
        Ok(kiln_formats::imatrix::gguf_bytes(
            &self.entries,
            &ds,
            self.last_chunk,
            self.chunk_size,
        )?)
    }

    /// The legacy `.dat` file (its dataset: the text file, else the last merged dataset).
    pub fn legacy_bytes(&self, dataset: Option<&str>) -> Vec<u8> {
        let d = dataset
            .or(self.datasets.last().map(String::as_str))
            .unwrap_or("");
        kiln_formats::imatrix::legacy_bytes(
            &self.entries,
            self.chunk_size,
            self.last_chunk as i32,
            d,
        )
    }
}

/// Running and final perplexity of an imatrix run.
#[derive(Clone, Debug, PartialEq)]
pub struct ImatrixRun {
    pub running: Vec<f64>,
    pub ppl: f64,
    pub ppl_err: Option<f64>,
    pub n_chunk: usize,
}

/// What [`collect`] evaluates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CollectParams {
    /// Tokens per chunk.
    pub n_ctx: usize,
    /// Chunks to evaluate.
    pub n_chunk: usize,
    /// Score the second half of each chunk (the running PPL).
    pub compute_ppl: bool,
}

/// Collects over `n_chunk` chunks of `n_ctx` tokens of `tokens` (BOS first if the vocabulary adds
/// one; `bos` replaces each chunk's first token when `Some`). `after_chunk(k, running_ppl,
/// collector)` runs after every chunk (progress, periodic saves).
pub fn collect<B: Backend>(
    model: &Model<B>,
    tokens: &[u32],
    bos: Option<u32>,
    p: CollectParams,
    col: &mut Collector,
    mut after_chunk: impl FnMut(usize, f64, &Collector) -> Result<()>,
) -> Result<ImatrixRun> {
    let CollectParams {
        n_ctx,
        n_chunk,
        compute_ppl,
    } = p;
    if n_ctx < 2 || tokens.len() < n_chunk * n_ctx {
        bail!(
            "{} tokens cannot make {n_chunk} chunks of {n_ctx}",
            tokens.len()
        );
    }
    let first = n_ctx / 2;
    // only the scored rows need logits (llama-imatrix computes all of them): the output head
    // multiplies rows `from..` alone, which gives the same values as long as the row count keeps
    // the same kernel (at least TILED_MIN_ROWS); every product is still observed in full
    let from = if n_ctx - first >= TILED_MIN_ROWS {
        first
    } else {
        0
    };
    let n_vocab = model.cfg.shape.n_vocab;
    let mut cache = model.new_cache(n_ctx)?;
    let (mut s1, mut s2, mut count) = (0.0f64, 0.0f64, 0usize);
    let mut running = Vec::with_capacity(n_chunk);
    for k in 0..n_chunk {
        let orig = &tokens[k * n_ctx..(k + 1) * n_ctx];
        let mut input = orig.to_vec();
        if let (Some(b), Some(t0)) = (bos, input.first_mut()) {
            *t0 = b;
        }
        let mut err = None;
        let logits =
            model.forward_observed(&mut cache, &input, 0, from, &mut |name, x, cols| {
                if err.is_none() {
                    err = col.observe(name, x, cols).err();
                }
            })?;
        if let Some(e) = err {
            return Err(e);
        }
        let mut r = f64::NAN;
        if compute_ppl {
            let n_score = n_ctx - 1 - first;
            let vals: Vec<f64> = (0..n_score)
                .into_par_iter()
                .map(|i| {
                    let r = first + i - from;
                    let row = logits.get(r * n_vocab..(r + 1) * n_vocab).unwrap_or(&[]);
                    nll(row, orig[first + i + 1] as usize)
                })
                .collect();
            for v in vals {
                s1 += v;
                s2 += v * v;
            }
            count += n_score;
            r = (s1 / count as f64).exp();
            running.push(r);
        }
        after_chunk(k + 1, r, col)?;
    }
    let (ppl, ppl_err) = if count > 0 {
        estimate(s1, s2, count)
    } else {
        (f64::NAN, None)
    };
    Ok(ImatrixRun {
        running,
        ppl,
        ppl_err,
        n_chunk,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulate_matches_sequential_order() {
        let cols = 150;
        let rows = 20;
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let mut par = vec![0.5f32; cols];
        accumulate(&mut par, &x, cols);
        let mut seq = vec![0.5f32; cols];
        for row in x.chunks(cols) {
            for (s, &v) in seq.iter_mut().zip(row) {
                *s += v * v;
            }
        }
        assert_eq!(par, seq);
    }

    #[test]
    fn observe_filters_and_counts() {
        let mut c = Collector::new(32, false);
        let x = vec![1.0f32; 16 * 4];
        c.observe("blk.0.attn_q.weight", &x, 4).unwrap();
        c.observe("blk.0.attn_q.weight", &x, 4).unwrap();
        c.observe("output.weight", &x, 4).unwrap();
        c.observe("blk.0.ffn_up.weight", &x[..8], 4).unwrap(); // 2 rows: ignored
        assert_eq!(c.entries.len(), 1);
        let e = &c.entries["blk.0.attn_q.weight"];
        assert_eq!(e.sums, vec![32.0; 4]);
        assert_eq!(e.counts, vec![32]);
        assert_eq!(c.last_chunk, 1);
        assert!(c
            .observe("blk.0.attn_q.weight", &vec![1.0f32; 16 * 8], 8)
            .is_err());
        assert!(c.observe("blk.0.attn_q.weight", &x[..5], 4).is_err());
        let mut c = Collector::new(32, true);
        c.observe("output.weight", &x, 4).unwrap();
        assert_eq!(c.entries.len(), 1);
    }

    #[test]
    fn merge_adds_files() {
        let mut c = Collector::new(16, false);
        let x = vec![2.0f32; 16 * 4];
        c.observe("blk.0.attn_q.weight", &x, 4).unwrap();
        let m = Imatrix::parse(&c.gguf_bytes(Some("a.txt")).unwrap()).unwrap();
        let mut d = Collector::new(16, false);
        d.merge(&m, "a").unwrap();
        d.merge(&m, "a").unwrap();
        let e = &d.entries["blk.0.attn_q.weight"];
        assert_eq!(e.sums, vec![128.0; 4]);
        assert_eq!(e.counts, vec![32]);
        assert_eq!(d.last_chunk, 2);
        assert_eq!(d.datasets, vec!["a.txt".to_string(), "a.txt".to_string()]);
        // legacy: values * chunk_size
        let l = Imatrix::parse(&c.legacy_bytes(Some("a.txt"))).unwrap();
        let mut d = Collector::new(16, false);
        d.merge(&l, "l").unwrap();
        assert_eq!(d.entries["blk.0.attn_q.weight"].sums, vec![64.0; 4]);
        assert_eq!(d.entries["blk.0.attn_q.weight"].counts, vec![16]);
        let bad = Imatrix::parse(
            &kiln_formats::imatrix::gguf_bytes(
                &[(
                    "blk.0.attn_q.weight".to_string(),
                    ImatrixEntry {
                        sums: vec![1.0; 3],
                        counts: vec![1],
                    },
                )]
                .into_iter()
                .collect(),
                &[],
                0,
                16,
            )
            .unwrap(),
        )
        .unwrap();
        assert!(d.merge(&bad, "bad").is_err());
    }
}
