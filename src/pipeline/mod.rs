//! `kiln pipeline`: base + LoRA(s) → F16 GGUF (one streaming merge pass) → every requested
//! quantization level → perplexity per eval text and level → report (md, json, svg) and
//! SHA256SUMS, resumable step by step through a manifest in the output folder.
//!
//! Every step writes into `--out/.kiln-staging` and renames into place when complete, then records
//! its settings, input hashes and outputs in `kiln-manifest.json`; a rerun skips a step whose record
//! matches and whose outputs are still there unchanged. [`run`] says the order of the steps; the
//! steps are in `steps.rs`, the runner that skips, times and records them in `step.rs`.

mod inputs;
mod levels;
pub mod manifest;
pub mod measure;
pub mod report;
pub mod space;
mod step;
mod steps;
pub mod svg;

use crate::eval::perplexity::PplParams;
use crate::model::device::Device;
use crate::progress::Progress;
use crate::quant_plan::Ftype;
use anyhow::{anyhow, bail, Result};
use inputs::Inputs;
pub use levels::{is_k_level, level_file_name, parse_quants, quant_jobs};
use manifest::Manifest;
use report::{Measured, Report};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;
use step::{Log, Runner};
use steps::{Level, Model};

/// Staging folder inside --out (removed at the start of every run).
pub const STAGING: &str = ".kiln-staging";
/// Folder of the per-step evaluation results inside --out.
pub const EVAL_DIR: &str = "eval";
/// The F16 GGUF's file name inside --out.
pub const F16_FILE: &str = "model-f16.gguf";
/// The importance matrix made with --imatrix-text, inside --out.
pub const IMATRIX_FILE: &str = "imatrix.gguf";
/// Suffix of the level names quantized with the --imatrix-text matrix ("Q4_K_M+imatrix").
pub const IMATRIX_SUFFIX: &str = "+imatrix";

/// Where the F16 model comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Merge these PEFT LoRAs (in order) into this HF base.
    Merge { base: PathBuf, loras: Vec<PathBuf> },
    /// An existing F16 GGUF.
    Model(PathBuf),
}

/// Everything a run needs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub source: Source,
    pub out: PathBuf,
    pub quants: Vec<Ftype>,
    pub texts: Vec<PathBuf>,
    pub n_ctx: usize,
    pub n_batch: usize,
    pub chunks: Option<usize>,
    pub kld: bool,
    pub bench: bool,
    pub keep_hf: bool,
    pub force: bool,
    pub quiet: bool,
    pub expect_sha256: Option<PathBuf>,
    /// Importance matrix for the quantizers (llama-imatrix or kiln imatrix output).
    pub imatrix: Option<PathBuf>,
    /// Calibration text: compute `--out/imatrix.gguf` from the F16 model on it (with n_ctx and
    /// chunks) and quantize every K level a second time with it.
    pub imatrix_text: Option<PathBuf>,
    /// general.name of the merged GGUF (default: the --out folder's name).
    pub name: Option<String>,
    /// The exact command line, for the report.
    pub command: String,
    /// Where the levels are evaluated (`--device`).
    pub device: Device,
}

/// How a run ended.
pub enum RunEnd {
    Done(Box<Report>),
    /// --expect-sha256 found a mismatch; nothing was written.
    ExpectMismatch,
}

/// The CPU model from /proc/cpuinfo, else the architecture.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Shell-quotes one argument for the recorded command line.
pub fn shell_quote(a: &str) -> String {
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c))
    {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// The report's files inside --out.
const REPORT_FILES: [&str; 3] = ["report.json", "report.md", "report.svg"];

/// Runs the pipeline.
pub fn run(s: &Settings, progress: &dyn Progress) -> Result<RunEnd> {
    let log = Log::new(progress);
    let t_start = Instant::now();
    let out = s.out.clone();
    if out.exists() && !out.is_dir() {
        bail!("--out {}: exists and is not a folder", out.display());
    }
    if s.quants.is_empty() && s.texts.is_empty() {
        log.note("note: no --quants and no --eval-text: only the F16 GGUF will be made");
    }
    for (i, q) in s.quants.iter().enumerate() {
        if s.quants[..i].contains(q) {
            bail!("--quants names {q} twice");
        }
        if matches!(q, Ftype::F16 | Ftype::F32 | Ftype::BF16) {
            bail!("--quants {q}: the F16 model is always made; list quantization levels only (Q4_0, Q4_K_M, ...)");
        }
    }
    let params = PplParams {
        n_ctx: s.n_ctx,
        n_batch: s.n_batch.min(s.n_ctx).max(1),
        max_chunks: s.chunks,
    };
    if s.n_ctx < 2 {
        bail!("-c must be at least 2");
    }

    // 1. Inputs, opened and checked before anything is written.
    let mut inputs = Inputs::open(s, &params)?;

    // 2. Hashes of every input and text (cached in the manifest by size and mtime).
    let mut man = if out.is_dir() {
        Manifest::load(&out)?
    } else {
        Manifest::empty()
    };
    inputs.hash(&mut man, s, &log)?;

    // 3. --expect-sha256: a published list, checked before anything is written.
    if let Some(list_path) = &s.expect_sha256 {
        if !inputs.match_expected(list_path, &log)? {
            return Ok(RunEnd::ExpectMismatch);
        }
    }

    // 4. The output folder.
    let mut run = Runner::open(&out, man, log, s.force)?;
    let has_merge = matches!(s.source, Source::Merge { .. });
    let jobs = quant_jobs(&s.quants, s.imatrix_text.is_some());
    let (n_levels, n_texts) = (1 + jobs.len(), inputs.texts.len());
    run.count_steps(
        usize::from(has_merge)
            + usize::from(s.imatrix_text.is_some())
            + jobs.len()
            + n_levels * n_texts
            + if s.kld { n_levels * n_texts } else { 0 }
            + if s.bench { n_levels } else { 0 }
            + 1,
    );

    // 5. Merge → F16 GGUF.
    let f16 = match &s.source {
        Source::Merge { loras, .. } => run.file(&steps::Merge {
            job: inputs.merge.as_ref(),
            loras,
            files: inputs.model_files(),
            name: steps::model_name(s),
            keep_hf: s.keep_hf,
        })?,
        Source::Model(m) => {
            let sha = inputs::set_sha256(inputs.model_files())
                .ok_or_else(|| anyhow!("--model was not hashed"))?;
            run.given(m, &sha)
        }
    };

    // 6a. --imatrix-text: the importance matrix of the F16 model on that text.
    let made_imatrix = match &inputs.imatrix_text {
        Some(text) => Some(run.file(&steps::Imatrix { f16: &f16, text, s })?),
        None => None,
    };
    let given_imatrix = inputs.imatrix.as_ref().map(|(p, h)| run.given(p, h));

    // 6b. Quantize each level from the F16 GGUF.
    let mut levels = vec![Level {
        name: "F16".into(),
        file: f16.clone(),
    }];
    for (level, ft, own_imatrix) in &jobs {
        let imatrix = if *own_imatrix {
            made_imatrix.as_ref()
        } else {
            given_imatrix.as_ref()
        };
        let file = run.file(&steps::Quantize {
            f16: &f16,
            level,
            ft: *ft,
            imatrix,
        })?;
        levels.push(Level {
            name: level.clone(),
            file,
        });
    }

    // 7. Perplexity of every level on every text; KLD against F16 and speed with --kld / --bench.
    let mut measured = Measured::default();
    let mut kld_bases = BTreeMap::new();
    for level in &levels {
        let model = Model::new(level, &params, &s.device);
        let name = &level.name;
        for text in &inputs.texts {
            let key = (name.clone(), text.name.clone());
            let ppl = run.json(&steps::Ppl {
                model: &model,
                text,
            })?;
            measured.ppl.insert(key.clone(), ppl);
            if !s.kld {
                continue;
            }
            if name == "F16" {
                let base = run.file(&steps::KldBase {
                    model: &model,
                    text,
                })?;
                kld_bases.insert(text.name.clone(), base);
            } else {
                let base = kld_bases
                    .get(&text.name)
                    .ok_or_else(|| anyhow!("no KLD base for {}", text.name))?;
                let kld = run.json(&steps::Kld {
                    model: &model,
                    text,
                    base,
                })?;
                measured.kld.insert(key, kld);
            }
        }
        if s.bench {
            let bench = run.json(&steps::Bench { model: &model })?;
            measured.bench.insert(name.clone(), bench);
        }
    }

    // 8. The report.
    let report = report::build(s, &params, &inputs, &levels, &measured)?;
    let [json, md, svg] = REPORT_FILES;
    run.write_unrecorded(
        "report",
        "report → report.md, report.json, report.svg",
        &[
            (json, report.json()),
            (md, report.markdown()),
            (svg, svg::render(&report)),
        ],
    )?;

    // 9. SHA256SUMS of every output of this run (and the manifest).
    run.finish(&REPORT_FILES)?;
    run.note(&format!(
        "pipeline finished in {:.1}s: {} (kiln verify {} re-checks every file)",
        t_start.elapsed().as_secs_f64(),
        out.display(),
        out.display()
    ));
    Ok(RunEnd::Done(Box::new(report)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("--out"), "--out");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
