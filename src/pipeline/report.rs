//! The pipeline's report: one data model written as `report.json`, as the `report.md` table with
//! the provenance of every number (version, command, input hashes, settings, machine), and as the
//! plain-text summary table printed at the end; built from the levels and what their evaluation
//! steps measured.

use super::inputs::Inputs;
use super::measure::{BenchRecord, KldRecord, PplRecord};
use super::steps::Level;
use super::{cpu_model, Settings};
use crate::eval::perplexity::PplParams;
use anyhow::{Context, Result};
use kiln_formats::gguf::GgufFile;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// An input file with its hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputInfo {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// An eval text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextInfo {
    /// Short name used in file names and table headers (the file stem).
    pub name: String,
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub n_tokens: usize,
    pub n_chunk: usize,
}

/// Perplexity of one level on one text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PplCell {
    pub ppl: f64,
    pub ppl_err: Option<f64>,
    /// ppl − ppl(F16); 0 for F16 itself.
    pub delta_ppl: Option<f64>,
}

/// KL divergence of one level against F16 (averaged over the texts' scored tokens).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KldCell {
    pub mean_kld: f64,
    pub mean_kld_err: Option<f64>,
    /// Share of tokens where the top token equals F16's, in percent.
    pub same_top_pct: f64,
}

/// Speed of one level.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchCell {
    /// Prompt processing, tokens per second.
    pub pp_tok_s: f64,
    /// Text generation, milliseconds per token.
    pub tg_ms_tok: f64,
    pub pp_tokens: usize,
    pub tg_tokens: usize,
}

/// One quantization level (F16 first).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LevelRow {
    /// "F16", "Q4_K_M", ...
    pub level: String,
    /// The GGUF, relative to --out (or the --model path).
    pub file: String,
    pub file_size: u64,
    /// Tensor data bits per weight (llama.cpp's "BPW": tensor bytes × 8 / parameters).
    pub bits_per_weight: f64,
    pub n_params: u64,
    pub sha256: String,
    /// One entry per eval text, in the order of `texts`.
    pub ppl: Vec<Option<PplCell>>,
    pub kld: Option<KldCell>,
    pub bench: Option<BenchCell>,
}

/// How the numbers were made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub kiln_version: String,
    /// The exact command line (shell-quoted).
    pub command: String,
    pub device: String,
    pub cpu: String,
    pub threads: usize,
    pub n_ctx: usize,
    pub n_batch: usize,
    /// --chunks (None: every chunk of each text).
    pub max_chunks: Option<usize>,
}

/// The whole report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub provenance: Provenance,
    pub inputs: Vec<InputInfo>,
    pub texts: Vec<TextInfo>,
    pub levels: Vec<LevelRow>,
}

const MIB: f64 = (1u64 << 20) as f64;

fn ppl_cell(c: &Option<PplCell>) -> String {
    match c {
        Some(PplCell {
            ppl,
            ppl_err: Some(e),
            ..
        }) => format!("{ppl:.4} ± {e:.4}"),
        Some(PplCell { ppl, .. }) => format!("{ppl:.4}"),
        None => "-".into(),
    }
}

fn delta_cell(c: &Option<PplCell>) -> String {
    match c.as_ref().and_then(|c| c.delta_ppl) {
        Some(d) => format!("{d:+.4}"),
        None => "-".into(),
    }
}

impl Report {
    /// Column headers and rows of the results table (shared by report.md and the summary).
    pub fn table(&self) -> (Vec<String>, Vec<Vec<String>>) {
        let mut head: Vec<String> = vec!["level".into(), "size MiB".into(), "BPW".into()];
        for t in &self.texts {
            head.push(format!("PPL {}", t.name));
            head.push(format!("ΔPPL {}", t.name));
        }
        let any_kld = self.levels.iter().any(|l| l.kld.is_some());
        let any_bench = self.levels.iter().any(|l| l.bench.is_some());
        if any_kld {
            head.push("mean KLD".into());
            head.push("same top %".into());
        }
        if any_bench {
            head.push("pp tok/s".into());
            head.push("tg ms/tok".into());
        }
        let rows = self
            .levels
            .iter()
            .map(|l| {
                let mut r = vec![
                    l.level.clone(),
                    format!("{:.2}", l.file_size as f64 / MIB),
                    format!("{:.2}", l.bits_per_weight),
                ];
                for c in &l.ppl {
                    r.push(ppl_cell(c));
                    r.push(delta_cell(c));
                }
                if any_kld {
                    match &l.kld {
                        Some(k) => {
                            r.push(format!("{:.6}", k.mean_kld));
                            r.push(format!("{:.2}", k.same_top_pct));
                        }
                        None => r.extend(["-".to_string(), "-".to_string()]),
                    }
                }
                if any_bench {
                    match &l.bench {
                        Some(b) => {
                            r.push(format!("{:.2}", b.pp_tok_s));
                            r.push(format!("{:.2}", b.tg_ms_tok));
                        }
                        None => r.extend(["-".to_string(), "-".to_string()]),
                    }
                }
                r
            })
            .collect();
        (head, rows)
    }

    /// The plain-text summary table (aligned columns) printed on stdout at the end.
    pub fn summary(&self) -> String {
        let (head, rows) = self.table();
        let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                if let Some(x) = w.get_mut(i) {
                    *x = (*x).max(c.chars().count());
                }
            }
        }
        let line = |cells: &[String]| -> String {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate() {
                let pad = w
                    .get(i)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(c.chars().count());
                if i == 0 {
                    s.push_str(c);
                    s.push_str(&" ".repeat(pad));
                } else {
                    s.push_str("  ");
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                }
            }
            s.trim_end().to_string() + "\n"
        };
        let mut out = line(&head);
        let total: usize = w.iter().sum::<usize>() + 2 * w.len().saturating_sub(1);
        out.push_str(&"-".repeat(total));
        out.push('\n');
        for r in &rows {
            out.push_str(&line(r));
        }
        out
    }

    /// report.md.
    pub fn markdown(&self) -> String {
        let p = &self.provenance;
        let mut s = String::new();
        let _ = writeln!(s, "# kiln pipeline report\n");
        let (head, rows) = self.table();
        let _ = writeln!(s, "| {} |", head.join(" | "));
        let _ = writeln!(
            s,
            "|{}",
            head.iter()
                .enumerate()
                .map(|(i, _)| if i == 0 { "---|" } else { "---:|" })
                .collect::<String>()
        );
        for r in &rows {
            let _ = writeln!(s, "| {} |", r.join(" | "));
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "![PPL against file size](report.svg)\n");
        let _ = writeln!(s, "## How these numbers were made\n");
        let _ = writeln!(s, "- kiln {}", p.kiln_version);
        let _ = writeln!(s, "- command: `{}`", p.command.replace('`', "'"));
        let _ = writeln!(
            s,
            "- device: {}; CPU: {}; threads: {}",
            p.device, p.cpu, p.threads
        );
        let chunks = match p.max_chunks {
            Some(c) => format!("at most {c}"),
            None => "all".into(),
        };
        let _ = writeln!(
            s,
            "- perplexity as llama-perplexity computes it: context {} tokens, batch {}, chunks: {chunks} \
             (second half of each chunk scored; ± is the delta-method standard error)",
            p.n_ctx, p.n_batch
        );
        if self.levels.iter().any(|l| l.kld.is_some()) {
            let _ = writeln!(
                s,
                "- KLD: mean KL divergence of each level's token distribution from F16's over the same scored tokens; \
                 same top %: tokens whose most likely next token equals F16's"
            );
        }
        if self.levels.iter().any(|l| l.bench.is_some()) {
            let _ = writeln!(
                s,
                "- speed: pp = prompt processing (tokens per second), tg = generation (milliseconds per token)"
            );
        }
        let _ = writeln!(
            s,
            "- size: the GGUF file; BPW: tensor data bits per weight, as llama.cpp reports it\n"
        );
        if !self.texts.is_empty() {
            let _ = writeln!(s, "### Eval texts\n");
            let _ = writeln!(s, "| name | file | bytes | tokens | chunks | sha256 |");
            let _ = writeln!(s, "|---|---|---:|---:|---:|---|");
            for t in &self.texts {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | `{}` |",
                    t.name, t.path, t.size, t.n_tokens, t.n_chunk, t.sha256
                );
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(s, "### Inputs\n");
        let _ = writeln!(s, "| file | bytes | sha256 |");
        let _ = writeln!(s, "|---|---:|---|");
        for i in &self.inputs {
            let _ = writeln!(s, "| {} | {} | `{}` |", i.path, i.size, i.sha256);
        }
        let _ = writeln!(s, "\n### Outputs\n");
        let _ = writeln!(s, "| level | file | bytes | sha256 |");
        let _ = writeln!(s, "|---|---|---:|---|");
        for l in &self.levels {
            let _ = writeln!(
                s,
                "| {} | {} | {} | `{}` |",
                l.level, l.file, l.file_size, l.sha256
            );
        }
        let _ = writeln!(
            s,
            "\nEvery output is listed with its sha256 in SHA256SUMS; `kiln verify <this folder>` re-checks them."
        );
        s
    }

    /// report.json.
    pub fn json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".into());
        s.push('\n');
        s
    }
}

/// What the evaluation steps measured: perplexity and KLD by (level, text), speed by level.
#[derive(Default)]
pub(super) struct Measured {
    pub ppl: BTreeMap<(String, String), PplRecord>,
    pub kld: BTreeMap<(String, String), KldRecord>,
    pub bench: BTreeMap<String, BenchRecord>,
}

/// The report of a run: its provenance, inputs and texts, and one row per level.
pub(super) fn build(
    s: &Settings,
    params: &PplParams,
    inputs: &Inputs,
    levels: &[Level],
    m: &Measured,
) -> Result<Report> {
    let texts = &inputs.texts;
    let mut rows = Vec::new();
    for Level { name: level, file } in levels {
        let (n_params, tensor_bytes, file_size) = gguf_stats(&file.path)?;
        let cells = texts
            .iter()
            .map(|t| {
                let r = m.ppl.get(&(level.clone(), t.name.clone()))?;
                let base = m.ppl.get(&("F16".to_string(), t.name.clone()));
                Some(PplCell {
                    ppl: r.ppl,
                    ppl_err: r.ppl_err,
                    delta_ppl: base.map(|b| r.ppl - b.ppl),
                })
            })
            .collect();
        // KLD over all texts: token-weighted means.
        let ks: Vec<&KldRecord> = texts
            .iter()
            .filter_map(|t| m.kld.get(&(level.clone(), t.name.clone())))
            .collect();
        let n: usize = ks.iter().map(|k| k.count).sum();
        let kld = match ks.as_slice() {
            [] => None,
            [k] => Some(KldCell {
                mean_kld: k.mean_kld,
                mean_kld_err: Some(k.mean_kld_unc),
                same_top_pct: 100.0 * k.same_top,
            }),
            _ if n > 0 => Some(KldCell {
                mean_kld: ks.iter().map(|k| k.mean_kld * k.count as f64).sum::<f64>() / n as f64,
                mean_kld_err: None,
                same_top_pct: 100.0 * ks.iter().map(|k| k.same_top * k.count as f64).sum::<f64>()
                    / n as f64,
            }),
            _ => None,
        };
        let bench = m.bench.get(level).map(|b| BenchCell {
            pp_tok_s: b.pp_tok_s,
            tg_ms_tok: b.tg_ms_tok,
            pp_tokens: b.pp_tokens,
            tg_tokens: b.tg_tokens,
        });
        rows.push(LevelRow {
            level: level.clone(),
            file: file.rel.clone(),
            file_size,
            bits_per_weight: tensor_bytes as f64 * 8.0 / n_params.max(1) as f64,
            n_params,
            sha256: file.sha256.clone(),
            ppl: cells,
            kld,
            bench,
        });
    }
    let threads = m
        .ppl
        .values()
        .next()
        .map(|r| r.threads)
        .unwrap_or_else(rayon::current_num_threads);
    Ok(Report {
        provenance: Provenance {
            kiln_version: env!("CARGO_PKG_VERSION").into(),
            command: s.command.clone(),
            device: s.device.name().into(),
            cpu: cpu_model(),
            threads,
            n_ctx: params.n_ctx,
            n_batch: params.n_batch,
            max_chunks: params.max_chunks,
        },
        inputs: inputs
            .model_files()
            .iter()
            .chain(inputs.imatrix.iter())
            .chain(inputs.imatrix_text.iter())
            .map(|(p, h)| InputInfo {
                path: p.display().to_string(),
                size: std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
                sha256: h.clone(),
            })
            .collect(),
        texts: texts
            .iter()
            .map(|t| TextInfo {
                name: t.name.clone(),
                path: t.path.display().to_string(),
                size: t.size,
                sha256: t.sha256.clone(),
                n_tokens: t.n_tokens,
                n_chunk: t.n_chunk,
            })
            .collect(),
        levels: rows,
    })
}

/// Parameters and tensor bytes of a GGUF (for bits per weight).
fn gguf_stats(path: &Path) -> Result<(u64, u64, u64)> {
    let f = GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?;
    let n: u64 = f.tensors.iter().map(|t| t.n_elements()).sum();
    let b: u64 = f.tensors.iter().map(|t| t.n_bytes()).sum();
    Ok((n, b, f.file_size()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> Report {
        let cell = |ppl: f64, d: f64| {
            Some(PplCell {
                ppl,
                ppl_err: Some(0.1),
                delta_ppl: Some(d),
            })
        };
        let row = |level: &str, size: u64, ppl: f64, d: f64| LevelRow {
            level: level.into(),
            file: format!("model-{}.gguf", level.to_lowercase()),
            file_size: size,
            bits_per_weight: size as f64 * 8.0 / 1e6,
            n_params: 1_000_000,
            sha256: "ab".repeat(32),
            ppl: vec![cell(ppl, d)],
            kld: None,
            bench: None,
        };
        Report {
            provenance: Provenance {
                kiln_version: "0.1.0".into(),
                command: "kiln pipeline --model m.gguf --out o".into(),
                device: "cpu".into(),
                cpu: "Test CPU".into(),
                threads: 2,
                n_ctx: 128,
                n_batch: 128,
                max_chunks: None,
            },
            inputs: vec![InputInfo {
                path: "m.gguf".into(),
                size: 2_000_000,
                sha256: "cd".repeat(32),
            }],
            texts: vec![TextInfo {
                name: "wiki".into(),
                path: "wiki.txt".into(),
                size: 5000,
                sha256: "ef".repeat(32),
                n_tokens: 1500,
                n_chunk: 11,
            }],
            levels: vec![
                row("F16", 2_000_000, 5.0, 0.0),
                row("Q8_0", 1_060_000, 5.01, 0.01),
                row("Q4_0", 560_000, 5.5, 0.5),
                row("Q2_K", 330_000, 9.0, 4.0),
            ],
        }
    }

    #[test]
    fn markdown_has_the_table_and_the_provenance() {
        let r = sample();
        let md = r.markdown();
        assert!(md.contains("| level | size MiB | BPW | PPL wiki | ΔPPL wiki |"));
        assert!(md.contains("| Q4_0 | 0.53 | 4.48 | 5.5000 ± 0.1000 | +0.5000 |"));
        assert!(md.contains("kiln 0.1.0"));
        assert!(md.contains("`kiln pipeline --model m.gguf --out o`"));
        assert!(md.contains("Test CPU; threads: 2"));
        assert!(md.contains(&"cd".repeat(32)));
        assert!(md.contains(&"ef".repeat(32)));
        assert!(!md.contains("KLD"));
    }

    #[test]
    fn json_round_trips() {
        let r = sample();
        let back: Report = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn summary_aligns_and_shows_optional_columns() {
        let mut r = sample();
        r.levels[2].kld = Some(KldCell {
            mean_kld: 0.0123,
            mean_kld_err: None,
            same_top_pct: 97.5,
        });
        r.levels[1].bench = Some(BenchCell {
            pp_tok_s: 100.0,
            tg_ms_tok: 12.5,
            pp_tokens: 512,
            tg_tokens: 128,
        });
        let s = r.summary();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 2 + r.levels.len());
        assert!(lines[0].contains("mean KLD") && lines[0].contains("tg ms/tok"));
        assert!(s.contains("0.012300") && s.contains("97.50") && s.contains("12.50"));
        // right-aligned columns: every line is as wide as the header
        let n = lines[0].chars().count();
        for l in lines.iter().skip(1) {
            assert_eq!(l.chars().count(), n, "{l}");
        }
    }
}
