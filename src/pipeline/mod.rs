//! `kiln pipeline`: base + LoRA(s) → F16 GGUF (one streaming merge pass) → every requested
//! quantization level → perplexity per eval text and level → report (md, json, svg) and
//! SHA256SUMS, resumable step by step through a manifest in the output folder.
//!
//! Every step writes into `--out/.kiln-staging` and renames into place when complete, then records
//! its settings, input hashes and outputs in `kiln-manifest.json`; a rerun skips a step whose record
//! matches and whose outputs are still there unchanged.

pub mod eval;
pub mod manifest;
pub mod report;
pub mod space;
pub mod svg;

use crate::eval::perplexity::PplParams;
use crate::merge::{self, TOKENIZER_FILES};
use crate::progress::{Bar, Progress, Unit};
use crate::quant_plan::Ftype;
use crate::quantize::{quantize, QuantizeOptions};
use crate::sums;
use anyhow::{anyhow, bail, Context, Result};
use kiln_formats::gguf::GgufFile;
use kiln_formats::hf::LlamaConfig;
use kiln_quant::GgmlType;
use manifest::{record_output, rel_string, write_if_changed, Manifest, StepRecord};
use report::{BenchCell, InputInfo, KldCell, LevelRow, PplCell, Provenance, Report, TextInfo};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    /// "cpu" (the only backend of this build).
    pub device: String,
}

/// How a run ended.
pub enum RunEnd {
    Done(Box<Report>),
    /// --expect-sha256 found a mismatch; nothing was written.
    ExpectMismatch,
}

/// Parses the --quants list.
pub fn parse_quants(list: &[String]) -> Result<Vec<Ftype>> {
    list.iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            Ftype::parse(s).ok_or_else(|| {
                anyhow!(
                    "--quants: unknown level {s:?} (use Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K_S, Q3_K_M, \
                     Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, Q2_K_S with an imatrix)"
                )
            })
        })
        .collect()
}

/// Quant level name used in step ids and file names ("q4_k_m", "f16", "q4_k_m-imatrix").
pub fn level_file_name(level: &str) -> String {
    level.to_ascii_lowercase().replace('+', "-")
}

/// Whether a level is a K-quant mix (Q2_K_S..Q6_K), quantized again with --imatrix-text's matrix.
pub fn is_k_level(ft: Ftype) -> bool {
    matches!(
        ft,
        Ftype::Q2K
            | Ftype::Q2KS
            | Ftype::Q3KS
            | Ftype::Q3KM
            | Ftype::Q3KL
            | Ftype::Q4KS
            | Ftype::Q4KM
            | Ftype::Q5KS
            | Ftype::Q5KM
            | Ftype::Q6K
    )
}

/// The quantizations of a run: (level name, file type, uses the --imatrix-text matrix). With
/// `imatrix_text`, each K level is listed twice (plain, then "+imatrix"), Q2_K_S only with it.
pub fn quant_jobs(quants: &[Ftype], imatrix_text: bool) -> Vec<(String, Ftype, bool)> {
    let mut jobs = Vec::new();
    for &q in quants {
        if !(imatrix_text && q == Ftype::Q2KS) {
            jobs.push((q.name().to_string(), q, false));
        }
        if imatrix_text && is_k_level(q) {
            jobs.push((format!("{}{IMATRIX_SUFFIX}", q.name()), q, true));
        }
    }
    jobs
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

/// Step status lines and progress bars, through the caller's [`Progress`].
struct Log<'p> {
    progress: &'p dyn Progress,
    n_steps: usize,
    k: usize,
}

impl Log<'_> {
    fn step(&mut self, what: &str) {
        self.k += 1;
        self.progress
            .note(&format!("[{}/{}] {what}", self.k, self.n_steps));
    }
    fn skip(&mut self, id: &str) {
        self.k += 1;
        self.progress.note(&format!(
            "[{}/{}] skip {id} (up to date)",
            self.k, self.n_steps
        ));
    }
    fn note(&self, line: &str) {
        self.progress.note(line);
    }
    fn bar(&self, total: u64, unit: Unit) -> Box<dyn Bar> {
        self.progress.bar(total, unit)
    }
}

/// One eval text.
struct Text {
    name: String,
    path: PathBuf,
    text: String,
    sha256: String,
    size: u64,
    n_tokens: usize,
    n_chunk: usize,
}

/// Short, unique, file-name-safe names for the texts (their stems).
fn text_names(texts: &[PathBuf]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for t in texts {
        let stem: String = t
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "text".into())
            .chars()
            .map(|c| {
                if c.is_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let stem = if stem.is_empty() { "text".into() } else { stem };
        let mut name = stem.clone();
        let mut k = 2;
        while names.contains(&name) {
            name = format!("{stem}-{k}");
            k += 1;
        }
        names.push(name);
    }
    names
}

/// Takes the --out folder's lock (an advisory `flock` on the folder itself, released when the
/// returned handle is dropped or the process dies), so a second pipeline on the same folder stops
/// with a clear error instead of both writing the same files. Where folders cannot be locked
/// (a file system without locks, a platform that cannot open folders) there is only a warning.
fn lock_out(out: &Path, log: &Log) -> Result<Option<std::fs::File>> {
    let warn = |e: &dyn std::fmt::Display| {
        log.note(&format!(
            "warning: cannot lock {} ({e}); make sure no other pipeline uses this folder",
            out.display()
        ));
        Ok(None)
    };
    let f = match std::fs::File::open(out) {
        Ok(f) => f,
        Err(e) => return warn(&e),
    };
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "--out {}: another kiln pipeline is working in this folder; wait for it to finish or \
             choose another --out",
            out.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => warn(&e),
    }
}

/// Removes what an interrupted run left: the staging folder and temporary files of atomic writes.
fn clean_leftovers(out: &Path) -> Result<()> {
    let staging = out.join(STAGING);
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("removing {}", staging.display()))?;
    }
    for dir in [out.to_path_buf(), out.join(EVAL_DIR)] {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') && n.ends_with(".kiln-partial") {
                let p = e.path();
                let r = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                r.with_context(|| format!("removing {}", p.display()))?;
            }
        }
    }
    Ok(())
}

/// Moves `staging/rel` to `out/rel` (replacing a file or folder there).
fn publish(out: &Path, rel: &str) -> Result<()> {
    let from = out.join(STAGING).join(rel);
    let to = out.join(rel);
    if let Some(p) = to.parent() {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    if to.is_dir() && from.is_dir() {
        std::fs::remove_dir_all(&to).with_context(|| format!("replacing {}", to.display()))?;
    }
    std::fs::rename(&from, &to).with_context(|| format!("moving {} into place", to.display()))?;
    // Staged files are created private (0600) by the temporary-file writer; outputs are ordinary
    // readable files.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let files = if to.is_dir() {
            files_under(out, &to)?
        } else {
            vec![rel.to_string()]
        };
        for f in files {
            let p = out.join(f);
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))
                .with_context(|| format!("setting the permissions of {}", p.display()))?;
        }
    }
    Ok(())
}

/// All files under `dir`, relative to `base`, sorted.
fn files_under(base: &Path, dir: &Path) -> Result<Vec<String>> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                v.push(rel_string(base, &p));
            }
        }
    }
    v.sort();
    Ok(v)
}

/// Size estimate of a quantized GGUF made from `f16`: each matrix at the level's default type
/// (+10% for the mixes' larger types), output.weight at up to Q8_0, other tensors as they are.
fn estimate_quant_size(f16: &GgufFile, ft: Ftype) -> u64 {
    let base = ft.default_type();
    let mut total = f16.data_offset;
    for t in &f16.tensors {
        let rows = t.n_rows();
        let row = t.row_len();
        let keep = t.n_bytes();
        let bytes = if t.shape.len() < 2 || row % base.block_size() as u64 != 0 {
            keep
        } else {
            let ty = if t.name == "output.weight" {
                GgmlType::Q8_0
            } else {
                base
            };
            ty.row_size(row)
                .map(|r| r.saturating_mul(rows).saturating_mul(11) / 10)
                .unwrap_or(keep)
                .min(keep)
        };
        total = total.saturating_add(bytes + 32);
    }
    total
}

/// Parameters and tensor bytes of a GGUF (for bits per weight).
fn gguf_stats(path: &Path) -> Result<(u64, u64, u64)> {
    let f = GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?;
    let n: u64 = f.tensors.iter().map(|t| t.n_elements()).sum();
    let b: u64 = f.tensors.iter().map(|t| t.n_bytes()).sum();
    Ok((n, b, f.file_size()))
}

#[cfg(debug_assertions)]
fn test_stall(point: &str) {
    // Test hook (debug builds only): `KILN_TEST_STALL="quantize q4_0:MS"` sleeps once that level's
    // file is complete in the staging folder and before it is moved into place, so the tests can
    // interrupt the step at a known point.
    if let Ok(v) = std::env::var("KILN_TEST_STALL") {
        if let Some((p, ms)) = v.rsplit_once(':') {
            if p == point {
                eprintln!("stall {point}");
                std::thread::sleep(std::time::Duration::from_millis(ms.parse().unwrap_or(0)));
            }
        }
    }
}

#[cfg(not(debug_assertions))]
fn test_stall(_point: &str) {}

/// The merge of a run, opened and planned once, and its input files (base config, weights,
/// tokenizer files; each adapter's files).
fn merge_inputs(base: &Path, loras: &[PathBuf]) -> Result<(Vec<PathBuf>, merge::MergeJob)> {
    let cfg_path = base.join("config.json");
    if !cfg_path.is_file() {
        bail!(
            "--base {}: no config.json (expected a Hugging Face Llama folder)",
            base.display()
        );
    }
    let job = merge::MergeJob::open(&merge::MergeInputs {
        base: base.to_path_buf(),
        loras: loras.to_vec(),
        vocab_size: None,
    })?;
    let mut files = vec![cfg_path];
    files.extend(job.base.files().iter().cloned());
    for f in ["generation_config.json"]
        .iter()
        .chain(TOKENIZER_FILES.iter())
    {
        let p = base.join(f);
        if p.is_file() {
            files.push(p);
        }
    }
    for a in &job.adapters {
        files.extend(a.files());
    }
    files.dedup();
    Ok((files, job))
}

/// The folder whose tokenizer a merge uses: the last adapter with a tokenizer.model, else the base.
fn merge_tokenizer_dir(base: &Path, loras: &[PathBuf]) -> PathBuf {
    loras
        .iter()
        .rev()
        .find(|d| d.join("tokenizer.model").is_file())
        .cloned()
        .unwrap_or_else(|| base.to_path_buf())
}

/// How a step names an input: files inside --out by their relative path (so the folder can be
/// moved or copied and stay up to date), others as given.
fn input_key(out: &Path, p: &Path) -> String {
    match p.strip_prefix(out) {
        Ok(rel) => format!("out:{}", rel_string(Path::new(""), rel)),
        Err(_) => p.display().to_string(),
    }
}

/// The importance matrix of `m` on the text at `text_path` (chunks of `s.n_ctx`, at most
/// `s.chunks`), as `kiln imatrix -m MODEL -f TEXT -c N --chunks M` writes it (dataset: `dataset`).
fn make_imatrix(
    m: &eval::Loaded,
    text_path: &Path,
    dataset: &str,
    s: &Settings,
    log: &Log,
) -> Result<Vec<u8>> {
    use crate::eval::imatrix::{collect, CollectParams, Collector};
    let text = eval::read_text(text_path)?;
    let (tokens, bos) = eval::tokenize(&m.tok, &text)?;
    let params = PplParams {
        n_ctx: s.n_ctx,
        n_batch: s.n_ctx,
        max_chunks: s.chunks,
    };
    let n_chunk = eval::check_length(text_path, tokens.len(), &params)?;
    let chunk_size = u32::try_from(s.n_ctx).context("-c is too large")?;
    let mut col = Collector::new(chunk_size, false);
    let pb = log.bar(n_chunk as u64, Unit::Chunks);
    let r = collect(
        &m.model,
        &tokens,
        bos,
        CollectParams {
            n_ctx: s.n_ctx,
            n_chunk,
            compute_ppl: true,
        },
        &mut col,
        |k, _, _| {
            pb.set_position(k as u64);
            Ok(())
        },
    )?;
    pb.finish();
    log.note(&format!(
        "  {} entries from {n_chunk} chunks, PPL {:.4}",
        col.entries.len(),
        r.ppl
    ));
    col.gguf_bytes(Some(dataset))
}

/// Loads the model at `path` unless it is already loaded.
fn load_once<'a>(slot: &'a mut Option<eval::Loaded>, path: &Path) -> Result<&'a eval::Loaded> {
    if slot.is_none() {
        *slot = Some(eval::load(path)?);
    }
    slot.as_ref().ok_or_else(|| anyhow!("model not loaded"))
}

/// A step whose output is one JSON file: reused when up to date, else computed, written through
/// the staging folder, moved into place and recorded.
#[allow(clippy::too_many_arguments)]
fn json_step<T: serde::Serialize + serde::de::DeserializeOwned>(
    man: &mut Manifest,
    out: &Path,
    log: &mut Log,
    id: &str,
    rel: &str,
    settings: &serde_json::Value,
    inputs: BTreeMap<String, String>,
    compute: impl FnOnce(&mut Log) -> Result<T>,
) -> Result<T> {
    if man.up_to_date(out, id, settings, &inputs) {
        let cached = std::fs::read_to_string(out.join(rel))
            .ok()
            .and_then(|j| serde_json::from_str::<T>(&j).ok());
        if let Some(r) = cached {
            log.skip(id);
            return Ok(r);
        }
    }
    let r = compute(log)?;
    let mut bytes = serde_json::to_vec_pretty(&r)?;
    bytes.push(b'\n');
    manifest::write_atomic(&out.join(STAGING).join(rel), &bytes)?;
    publish(out, rel)?;
    man.steps.insert(
        id.to_string(),
        StepRecord {
            settings: settings.clone(),
            inputs,
            outputs: vec![record_output(out, rel)?],
        },
    );
    man.save(out)?;
    // What later runs will read back (JSON floats do not always round-trip to the last bit): the
    // report is built from the same values on the first run and on every rerun.
    serde_json::from_slice(&bytes).with_context(|| format!("reading back {rel}"))
}

/// Runs the pipeline.
pub fn run(s: &Settings, progress: &dyn Progress) -> Result<RunEnd> {
    let mut log = Log {
        progress,
        n_steps: 0,
        k: 0,
    };
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
    let (input_files, merge_job) = match &s.source {
        Source::Merge { base, loras } => {
            let (files, job) = merge_inputs(base, loras)?;
            (files, Some(job))
        }
        Source::Model(m) => {
            if !m.is_file() {
                bail!("--model {}: no such file", m.display());
            }
            (vec![m.clone()], None)
        }
    };
    let tok = match &s.source {
        Source::Merge { base, loras } => {
            let cfg = LlamaConfig::load(&base.join("config.json"))
                .with_context(|| format!("reading {}", base.join("config.json").display()))?;
            let dir = merge_tokenizer_dir(base, loras);
            eval::tokenizer_of_dir(&dir, &cfg)
                .with_context(|| format!("reading the tokenizer in {}", dir.display()))?
        }
        Source::Model(m) => {
            let f = GgufFile::open(m).with_context(|| format!("opening {}", m.display()))?;
            crate::tokenizer::Tokenizer::from_gguf(&f)
                .with_context(|| format!("reading the vocabulary of {}", m.display()))?
        }
    };
    let names = text_names(&s.texts);
    let mut texts = Vec::new();
    for (path, name) in s.texts.iter().zip(names) {
        let text = eval::read_text(path)?;
        let (tokens, _) = eval::tokenize(&tok, &text)?;
        let n_chunk = eval::check_length(path, tokens.len(), &params)?;
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        texts.push(Text {
            name,
            path: path.clone(),
            text,
            sha256: String::new(),
            size,
            n_tokens: tokens.len(),
            n_chunk,
        });
    }
    if let Some(path) = &s.imatrix_text {
        if s.imatrix.is_some() {
            bail!("--imatrix and --imatrix-text conflict: give one importance matrix source");
        }
        // Checked now, before anything is written: readable and long enough for one chunk.
        let text = eval::read_text(path)?;
        let (tokens, _) = eval::tokenize(&tok, &text)?;
        let p = PplParams {
            n_ctx: s.n_ctx,
            n_batch: s.n_ctx,
            max_chunks: s.chunks,
        };
        eval::check_length(path, tokens.len(), &p)?;
    }
    drop(tok);

    // 2. Hashes of every input and text (cached in the manifest by size and mtime).
    let mut man = if out.is_dir() {
        Manifest::load(&out)?
    } else {
        Manifest::empty()
    };
    let to_hash: Vec<PathBuf> = input_files
        .iter()
        .cloned()
        .chain(texts.iter().map(|t| t.path.clone()))
        .chain(s.imatrix.iter().cloned())
        .chain(s.imatrix_text.iter().cloned())
        .collect();
    let total: u64 = to_hash
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    log.note(&format!(
        "hashing {} input files ({})",
        to_hash.len(),
        space::human(total)
    ));
    let pb = log.bar(total, Unit::Bytes);
    let mut hashes: Vec<(PathBuf, String)> = Vec::new();
    for p in &to_hash {
        pb.set_message(
            &p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let h = man.hash_input(p, &mut |n| pb.inc(n))?;
        hashes.push((p.clone(), h));
    }
    pb.finish();
    for (t, (_, h)) in texts.iter_mut().zip(hashes[input_files.len()..].iter()) {
        t.sha256 = h.clone();
    }
    let imatrix: Option<(PathBuf, String)> = s
        .imatrix
        .as_ref()
        .and_then(|_| hashes.get(input_files.len() + texts.len()).cloned());
    let imatrix_text: Option<(PathBuf, String)> = s.imatrix_text.as_ref().and_then(|_| {
        hashes
            .get(input_files.len() + texts.len() + usize::from(s.imatrix.is_some()))
            .cloned()
    });

    // 3. --expect-sha256: a published list, checked before anything is written.
    if let Some(list_path) = &s.expect_sha256 {
        let list = sums::read(list_path)?;
        let res = sums::check_expected(&list, &hashes, list_path)?;
        let mut bad = 0;
        let mut unlisted = 0;
        for ((p, actual), r) in hashes.iter().zip(&res) {
            match r {
                Some(sums::Expect::Ok) => log.note(&format!("OK        {}", p.display())),
                Some(sums::Expect::Mismatch { expected }) => {
                    bad += 1;
                    log.note(&format!(
                        "MISMATCH  {}: sha256 {actual}, {} expects {expected}",
                        p.display(),
                        list_path.display()
                    ));
                }
                None => unlisted += 1,
            }
        }
        if bad > 0 {
            log.note(&format!(
                "error: {bad} input file(s) differ from {}; nothing was written",
                list_path.display()
            ));
            return Ok(RunEnd::ExpectMismatch);
        }
        log.note(&format!(
            "--expect-sha256: {} input(s) match {}{}",
            res.iter().filter(|r| r.is_some()).count(),
            list_path.display(),
            if unlisted > 0 {
                format!(" ({unlisted} not listed there)")
            } else {
                String::new()
            }
        ));
    }

    // 4. The output folder.
    std::fs::create_dir_all(&out)
        .with_context(|| format!("--out {}: cannot create the folder", out.display()))?;
    let _lock = lock_out(&out, &log)?;
    clean_leftovers(&out)?;
    let staging = out.join(STAGING);
    std::fs::create_dir_all(staging.join(EVAL_DIR)).with_context(|| {
        format!(
            "--out {}: cannot write in this folder ({})",
            out.display(),
            staging.display()
        )
    })?;
    man.save(&out)
        .with_context(|| format!("--out {}: cannot write in this folder", out.display()))?;
    if s.force {
        man.steps.clear();
    }

    let has_merge = matches!(s.source, Source::Merge { .. });
    let jobs = quant_jobs(&s.quants, s.imatrix_text.is_some());
    let levels: Vec<String> = std::iter::once("F16".to_string())
        .chain(jobs.iter().map(|j| j.0.clone()))
        .collect();
    log.n_steps = usize::from(has_merge)
        + usize::from(s.imatrix_text.is_some())
        + jobs.len()
        + levels.len() * texts.len()
        + if s.kld { levels.len() * texts.len() } else { 0 }
        + if s.bench { levels.len() } else { 0 }
        + 1;

    let mut run_steps: Vec<String> = Vec::new();

    // 5. Merge → F16 GGUF.
    let input_map: BTreeMap<String, String> = hashes[..input_files.len()]
        .iter()
        .map(|(p, h)| (p.display().to_string(), h.clone()))
        .collect();
    let (f16_path, f16_rel, f16_sha) = match &s.source {
        Source::Merge { loras, .. } => {
            let id = "merge";
            let name = s.name.clone().unwrap_or_else(|| {
                std::path::absolute(&out)
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .unwrap_or_else(|| "model".into())
            });
            let settings = json!({
                "loras": loras.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                "outtype": "f16",
                "keep_hf": s.keep_hf,
                "name": name,
            });
            if man.up_to_date(&out, id, &settings, &input_map) {
                log.skip(id);
            } else {
                log.step(&format!("merge {} LoRA(s) → {F16_FILE}", loras.len()));
                let job = merge_job
                    .as_ref()
                    .ok_or_else(|| anyhow!("merge inputs were not opened"))?;
                let mut need = job.n_elements() * 2 + (8 << 20);
                if s.keep_hf {
                    need += job.hf_bytes();
                }
                space::check_dir(&out, "the merged model", need)?;
                let t0 = Instant::now();
                let r = job.write(
                    &merge::MergeOutputs {
                        out: s.keep_hf.then(|| staging.join("hf")),
                        gguf: Some(staging.join(F16_FILE)),
                        kind: merge::GgufKind::Float(crate::convert::OutType::F16),
                        max_shard_size: merge::parse_size("5GB")?,
                        name: Some(name),
                        force: false,
                        hash_inputs: false,
                    },
                    log.progress,
                )?;
                for w in &r.written {
                    log.note(&format!("  {w}"));
                }
                // merge writes a SHA256SUMS beside its GGUF; the pipeline writes its own.
                let _ = std::fs::remove_file(staging.join(sums::SUMS));
                publish(&out, F16_FILE)?;
                let mut outputs = vec![record_output(&out, F16_FILE)?];
                if s.keep_hf {
                    publish(&out, "hf")?;
                    for rel in files_under(&out, &out.join("hf"))? {
                        outputs.push(record_output(&out, &rel)?);
                    }
                }
                man.steps.insert(
                    id.into(),
                    StepRecord {
                        settings,
                        inputs: input_map.clone(),
                        outputs,
                    },
                );
                man.save(&out)?;
                log.note(&format!("  done in {:.1}s", t0.elapsed().as_secs_f64()));
            }
            let sha = man
                .output(id, F16_FILE)
                .map(|o| o.file.sha256.clone())
                .ok_or_else(|| anyhow!("the manifest lost the merge's output"))?;
            run_steps.push(id.to_string());
            (out.join(F16_FILE), F16_FILE.to_string(), sha)
        }
        Source::Model(m) => {
            let sha = input_map
                .values()
                .next()
                .cloned()
                .ok_or_else(|| anyhow!("--model was not hashed"))?;
            (m.clone(), m.display().to_string(), sha)
        }
    };

    // 6a. --imatrix-text: the importance matrix of the F16 model on that text.
    let made_imatrix: Option<(PathBuf, String)> = match &imatrix_text {
        None => None,
        Some((text_path, text_sha)) => {
            let id = "imatrix";
            let rel = IMATRIX_FILE;
            let dataset = text_path.to_string_lossy().into_owned();
            let settings = json!({
                "n_ctx": s.n_ctx,
                "max_chunks": s.chunks,
                "dataset": dataset,
                "process_output": false,
            });
            let inputs: BTreeMap<String, String> = [
                (input_key(&out, &f16_path), f16_sha.clone()),
                (text_path.display().to_string(), text_sha.clone()),
            ]
            .into();
            if man.up_to_date(&out, id, &settings, &inputs) {
                log.skip(id);
            } else {
                log.step(&format!("importance matrix of F16 on {dataset} → {rel}"));
                let t0 = Instant::now();
                let m = eval::load(&f16_path)?;
                let bytes = make_imatrix(&m, text_path, &dataset, s, &log)?;
                drop(m);
                space::check_dir(&out, rel, bytes.len() as u64)?;
                kiln_formats::imatrix::write_file(&staging.join(rel), &bytes)?;
                publish(&out, rel)?;
                man.steps.insert(
                    id.into(),
                    StepRecord {
                        settings,
                        inputs,
                        outputs: vec![record_output(&out, rel)?],
                    },
                );
                man.save(&out)?;
                log.note(&format!("  done in {:.1}s", t0.elapsed().as_secs_f64()));
            }
            let sha = man
                .output(id, rel)
                .map(|o| o.file.sha256.clone())
                .ok_or_else(|| anyhow!("the manifest lost {rel}"))?;
            run_steps.push(id.to_string());
            Some((out.join(rel), sha))
        }
    };

    // 6b. Quantize each level from the F16 GGUF.
    let mut level_files: Vec<(String, PathBuf, String, String)> =
        vec![("F16".into(), f16_path.clone(), f16_rel, f16_sha.clone())];
    for (level, ft, own_imatrix) in &jobs {
        let q = ft;
        let imatrix = if *own_imatrix {
            made_imatrix.as_ref().map(|(p, h)| (p.clone(), h.clone()))
        } else {
            imatrix.clone()
        };
        let lname = level_file_name(level);
        let id = format!("quantize {lname}");
        let rel = format!("model-{lname}.gguf");
        let settings = json!({"ftype": q.name(), "imatrix": imatrix.is_some()});
        let mut inputs: BTreeMap<String, String> =
            [(input_key(&out, &f16_path), f16_sha.clone())].into();
        if let Some((p, h)) = &imatrix {
            inputs.insert(input_key(&out, p), h.clone());
        }
        if man.up_to_date(&out, &id, &settings, &inputs) {
            log.skip(&id);
        } else {
            log.step(&format!("quantize {level} → {rel}"));
            let need = {
                let f = GgufFile::open(&f16_path)
                    .with_context(|| format!("reading {}", f16_path.display()))?;
                estimate_quant_size(&f, *q)
            };
            space::check_dir(&out, &rel, need)?;
            let t0 = Instant::now();
            let mut qo = QuantizeOptions::new(f16_path.clone(), *q);
            qo.imatrix = imatrix.as_ref().map(|(p, _)| p.clone());
            quantize(&qo)?.write(&staging.join(&rel), log.progress)?;
            test_stall(&id);
            publish(&out, &rel)?;
            man.steps.insert(
                id.clone(),
                StepRecord {
                    settings,
                    inputs,
                    outputs: vec![record_output(&out, &rel)?],
                },
            );
            man.save(&out)?;
            log.note(&format!("  done in {:.1}s", t0.elapsed().as_secs_f64()));
        }
        let sha = man
            .output(&id, &rel)
            .map(|o| o.file.sha256.clone())
            .ok_or_else(|| anyhow!("the manifest lost {rel}"))?;
        run_steps.push(id);
        level_files.push((level.clone(), out.join(&rel), rel, sha));
    }

    // 7. Perplexity of every level on every text; KLD against F16 and speed with --kld / --bench.
    let eval_settings = json!({
        "n_ctx": params.n_ctx,
        "n_batch": params.n_batch,
        "max_chunks": params.max_chunks,
        "device": s.device,
    });
    let mut ppl: BTreeMap<(String, String), eval::PplRecord> = BTreeMap::new();
    let mut klds: BTreeMap<(String, String), eval::KldRecord> = BTreeMap::new();
    let mut benches: BTreeMap<String, eval::BenchRecord> = BTreeMap::new();
    let mut kld_bases: BTreeMap<String, (PathBuf, String)> = BTreeMap::new();
    for (level, path, _, sha) in &level_files {
        let lname = level_file_name(level);
        let is_f16 = level == "F16";
        let mut loaded: Option<eval::Loaded> = None;
        let model_in = (input_key(&out, path), sha.clone());
        for t in &texts {
            let text_in = (t.path.display().to_string(), t.sha256.clone());
            let id = format!("ppl {lname} {}", t.name);
            let rel = format!("{EVAL_DIR}/ppl-{lname}-{}.json", t.name);
            let inputs: BTreeMap<String, String> = [model_in.clone(), text_in.clone()].into();
            let rec = json_step(
                &mut man,
                &out,
                &mut log,
                &id,
                &rel,
                &eval_settings,
                inputs,
                |log| {
                    log.step(&format!("perplexity {level} on {}", t.name));
                    let m = load_once(&mut loaded, path)?;
                    let pb = log.bar((t.n_chunk * params.n_ctx) as u64, Unit::Tokens);
                    let r = eval::ppl(m, &t.text, &params, |n| pb.set_position(n))?;
                    pb.finish();
                    let err = r.ppl_err.map(|e| format!(" ± {e:.4}")).unwrap_or_default();
                    log.note(&format!(
                        "  PPL {:.4}{err} ({} chunks, {:.1} tok/s)",
                        r.ppl, r.n_chunk, r.tokens_per_second
                    ));
                    Ok(r)
                },
            )?;
            run_steps.push(id);
            ppl.insert((level.clone(), t.name.clone()), rec);
            if !s.kld {
                continue;
            }
            if is_f16 {
                // The F16 log-probabilities every level is compared with.
                let id = format!("kld-base {}", t.name);
                let rel = format!("{EVAL_DIR}/kld-base-{}.bin", t.name);
                let inputs: BTreeMap<String, String> = [model_in.clone(), text_in.clone()].into();
                if man.up_to_date(&out, &id, &eval_settings, &inputs) {
                    log.skip(&id);
                } else {
                    log.step(&format!("F16 log-probabilities of {} (KLD base)", t.name));
                    let m = load_once(&mut loaded, path)?;
                    let need = eval::kld_base_size(t.n_chunk, params.n_ctx, m.model.cfg.shape.n_vocab);
                    space::check_dir(&out, &rel, need)?;
                    let pb = log.bar((t.n_chunk * params.n_ctx) as u64, Unit::Tokens);
                    eval::kld_base(m, &t.text, &params, &out.join(STAGING).join(&rel), |n| {
                        pb.set_position(n)
                    })?;
                    pb.finish();
                    publish(&out, &rel)?;
                    man.steps.insert(
                        id.clone(),
                        StepRecord {
                            settings: eval_settings.clone(),
                            inputs,
                            outputs: vec![record_output(&out, &rel)?],
                        },
                    );
                    man.save(&out)?;
                }
                let bsha = man
                    .output(&id, &rel)
                    .map(|o| o.file.sha256.clone())
                    .ok_or_else(|| anyhow!("the manifest lost {rel}"))?;
                run_steps.push(id);
                kld_bases.insert(t.name.clone(), (out.join(&rel), bsha));
            } else {
                let (bpath, bsha) = kld_bases
                    .get(&t.name)
                    .cloned()
                    .ok_or_else(|| anyhow!("no KLD base for {}", t.name))?;
                let id = format!("kld {lname} {}", t.name);
                let rel = format!("{EVAL_DIR}/kld-{lname}-{}.json", t.name);
                let inputs: BTreeMap<String, String> =
                    [model_in.clone(), (input_key(&out, &bpath), bsha)].into();
                let rec = json_step(
                    &mut man,
                    &out,
                    &mut log,
                    &id,
                    &rel,
                    &eval_settings,
                    inputs,
                    |log| {
                        log.step(&format!("KLD {level} vs F16 on {}", t.name));
                        let m = load_once(&mut loaded, path)?;
                        let pb = log.bar((t.n_chunk * params.n_ctx) as u64, Unit::Tokens);
                        let r = eval::kld(m, &bpath, &params, |n| pb.set_position(n))?;
                        pb.finish();
                        log.note(&format!(
                            "  mean KLD {:.6} ± {:.6}, same top {:.2}%",
                            r.mean_kld,
                            r.mean_kld_unc,
                            100.0 * r.same_top
                        ));
                        Ok(r)
                    },
                )?;
                run_steps.push(id);
                klds.insert((level.clone(), t.name.clone()), rec);
            }
        }
        if s.bench {
            let id = format!("bench {lname}");
            let rel = format!("{EVAL_DIR}/bench-{lname}.json");
            let inputs: BTreeMap<String, String> = [model_in.clone()].into();
            let settings = json!({"device": s.device, "threads": rayon::current_num_threads()});
            let rec = json_step(
                &mut man,
                &out,
                &mut log,
                &id,
                &rel,
                &settings,
                inputs,
                |log| {
                    log.step(&format!("speed of {level}"));
                    let m = load_once(&mut loaded, path)?;
                    let bp = eval::bench_params(m.model.cfg.n_ctx_train);
                    let r = eval::speed(m, &bp)?;
                    log.note(&format!(
                        "  pp{} {:.2} tok/s, tg{} {:.2} ms/tok",
                        r.pp_tokens, r.pp_tok_s, r.tg_tokens, r.tg_ms_tok
                    ));
                    Ok(r)
                },
            )?;
            run_steps.push(id);
            benches.insert(level.clone(), rec);
        }
    }

    // 8. The report.
    let mut rows = Vec::new();
    for (level, path, rel, sha) in &level_files {
        let (n_params, tensor_bytes, file_size) = gguf_stats(path)?;
        let cells = texts
            .iter()
            .map(|t| {
                let r = ppl.get(&(level.clone(), t.name.clone()))?;
                let base = ppl.get(&("F16".to_string(), t.name.clone()));
                Some(PplCell {
                    ppl: r.ppl,
                    ppl_err: r.ppl_err,
                    delta_ppl: base.map(|b| r.ppl - b.ppl),
                })
            })
            .collect();
        // KLD over all texts: token-weighted means.
        let ks: Vec<&eval::KldRecord> = texts
            .iter()
            .filter_map(|t| klds.get(&(level.clone(), t.name.clone())))
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
        let bench = benches.get(level).map(|b| BenchCell {
            pp_tok_s: b.pp_tok_s,
            tg_ms_tok: b.tg_ms_tok,
            pp_tokens: b.pp_tokens,
            tg_tokens: b.tg_tokens,
        });
        rows.push(LevelRow {
            level: level.clone(),
            file: rel.clone(),
            file_size,
            bits_per_weight: tensor_bytes as f64 * 8.0 / n_params.max(1) as f64,
            n_params,
            sha256: sha.clone(),
            ppl: cells,
            kld,
            bench,
        });
    }
    let threads = ppl
        .values()
        .next()
        .map(|r| r.threads)
        .unwrap_or_else(rayon::current_num_threads);
    let report = Report {
        provenance: Provenance {
            kiln_version: env!("CARGO_PKG_VERSION").into(),
            command: s.command.clone(),
            device: s.device.clone(),
            cpu: cpu_model(),
            threads,
            n_ctx: params.n_ctx,
            n_batch: params.n_batch,
            max_chunks: params.max_chunks,
        },
        inputs: hashes[..input_files.len()]
            .iter()
            .chain(imatrix.iter())
            .chain(imatrix_text.iter())
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
    };
    let files = [
        ("report.json", report.json()),
        ("report.md", report.markdown()),
        ("report.svg", svg::render(&report)),
    ];
    let unchanged = files
        .iter()
        .all(|(n, c)| std::fs::read(out.join(n)).ok().as_deref() == Some(c.as_bytes()));
    if unchanged {
        log.skip("report");
    } else {
        log.step("report → report.md, report.json, report.svg");
        for (n, c) in &files {
            write_if_changed(&out.join(n), c.as_bytes())?;
        }
    }

    // 9. SHA256SUMS of every output of this run (and the manifest).
    man.save(&out)?;
    let mut entries = Vec::new();
    for id in &run_steps {
        if let Some(r) = man.steps.get(id) {
            for o in &r.outputs {
                entries.push(sums::Entry {
                    sha256: o.file.sha256.clone(),
                    name: o.path.clone(),
                });
            }
        }
    }
    for n in ["report.json", "report.md", "report.svg", manifest::MANIFEST] {
        entries.push(sums::Entry {
            sha256: manifest::sha256_file(&out.join(n), &mut |_| {})?,
            name: n.into(),
        });
    }
    write_if_changed(&out.join(sums::SUMS), sums::format(&entries).as_bytes())?;
    let _ = std::fs::remove_dir_all(&staging);
    log.note(&format!(
        "pipeline finished in {:.1}s: {} (kiln verify {} re-checks every file)",
        t_start.elapsed().as_secs_f64(),
        out.display(),
        out.display()
    ));
    Ok(RunEnd::Done(Box::new(report)))
}

#[cfg(test)]
mod tests {
    fn quiet_log() -> super::Log<'static> {
        super::Log {
            progress: &crate::progress::Silent,
            n_steps: 0,
            k: 0,
        }
    }
    use super::*;

    #[test]
    fn text_names_are_unique_and_safe() {
        let v = text_names(&[
            PathBuf::from("/a/wiki.test.raw"),
            PathBuf::from("/b/wiki.test.raw"),
            PathBuf::from("/c/中文 text.txt"),
        ]);
        assert_eq!(v, ["wiki.test", "wiki.test-2", "中文_text"]);
    }

    #[test]
    fn imatrix_text_doubles_the_k_levels() {
        let names = quant_jobs;
        let q = [Ftype::Q4_0, Ftype::Q4KM, Ftype::Q2KS, Ftype::Q6K];
        assert_eq!(
            names(&q, false),
            [
                ("Q4_0".to_string(), Ftype::Q4_0, false),
                ("Q4_K_M".into(), Ftype::Q4KM, false),
                ("Q2_K_S".into(), Ftype::Q2KS, false),
                ("Q6_K".into(), Ftype::Q6K, false),
            ]
        );
        assert_eq!(
            names(&q, true),
            [
                ("Q4_0".to_string(), Ftype::Q4_0, false),
                ("Q4_K_M".into(), Ftype::Q4KM, false),
                ("Q4_K_M+imatrix".into(), Ftype::Q4KM, true),
                ("Q2_K_S+imatrix".into(), Ftype::Q2KS, true),
                ("Q6_K".into(), Ftype::Q6K, false),
                ("Q6_K+imatrix".into(), Ftype::Q6K, true),
            ]
        );
        assert_eq!(level_file_name("Q4_K_M+imatrix"), "q4_k_m-imatrix");
        assert!(!is_k_level(Ftype::Q8_0) && is_k_level(Ftype::Q3KL));
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("--out"), "--out");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn leftovers_are_removed() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join(STAGING).join("x")).unwrap();
        std::fs::write(d.path().join(".model-q4_0.gguf.abc.kiln-partial"), b"x").unwrap();
        std::fs::write(d.path().join("model-q4_0.gguf"), b"keep").unwrap();
        clean_leftovers(d.path()).unwrap();
        let left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["model-q4_0.gguf"]);
    }

    #[test]
    fn second_pipeline_on_one_folder_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let held = lock_out(d.path(), &quiet_log()).unwrap();
        assert!(held.is_some());
        let e = lock_out(d.path(), &quiet_log()).unwrap_err().to_string();
        assert!(e.contains("another kiln pipeline"), "{e}");
        drop(held);
        assert!(lock_out(d.path(), &quiet_log()).unwrap().is_some());
    }
}
