//! The pipeline's inputs, opened, checked and hashed before anything is written: the merge's (or
//! --model's) files, the eval texts, --imatrix or --imatrix-text, and the --expect-sha256 check.

use super::manifest::Manifest;
use super::measure;
use super::space;
use super::step::Log;
use super::{Settings, Source};
use crate::eval::perplexity::PplParams;
use crate::merge::{self, TOKENIZER_FILES};
use crate::progress::Unit;
use crate::sums;
use anyhow::{bail, Context, Result};
use kiln_formats::gguf::GgufFile;
use kiln_formats::hf::LlamaConfig;
use std::path::{Path, PathBuf};

/// One eval text.
pub(super) struct Text {
    pub name: String,
    pub path: PathBuf,
    pub text: String,
    pub sha256: String,
    pub size: u64,
    pub n_tokens: usize,
    pub n_chunk: usize,
}

/// Every input of a run.
pub(super) struct Inputs {
    /// The merge, opened and planned once (None with --model).
    pub merge: Option<merge::MergeJob>,
    /// The merge's input files (base config, weights, tokenizer files; each adapter's files), or
    /// --model.
    model_files: Vec<PathBuf>,
    pub texts: Vec<Text>,
    /// Every input file with its sha256, in this order: the model files, the texts, --imatrix,
    /// --imatrix-text.
    pub hashes: Vec<(PathBuf, String)>,
    pub imatrix: Option<(PathBuf, String)>,
    pub imatrix_text: Option<(PathBuf, String)>,
}

impl Inputs {
    /// Opens and checks every input: the merge or --model, the vocabulary the texts are measured
    /// with, each text long enough for one chunk of `params`.
    pub(super) fn open(s: &Settings, params: &PplParams) -> Result<Inputs> {
        let (model_files, merge) = match &s.source {
            Source::Merge { base, loras } => {
                let (files, job) = merge_inputs(base, loras)?;
                (files, Some(job))
            }
            Source::Model(m) => {
                if !m.is_file() {
                    bail!("--model {}: no such file", m.display());
                }
                // a split set: every member is an input (hashed, checked by --expect-sha256)
                let f = GgufFile::open(m).with_context(|| format!("opening {}", m.display()))?;
                (f.paths().iter().map(|p| p.to_path_buf()).collect(), None)
            }
        };
        let tok = match &s.source {
            Source::Merge { base, loras } => {
                let cfg = LlamaConfig::load(&base.join("config.json"))
                    .with_context(|| format!("reading {}", base.join("config.json").display()))?;
                let dir = merge_tokenizer_dir(base, loras);
                measure::tokenizer_of_dir(&dir, &cfg)
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
            let text = measure::read_text(path)?;
            let (tokens, _) = measure::tokenize(&tok, &text)?;
            let n_chunk = measure::check_length(path, tokens.len(), params)?;
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
            let text = measure::read_text(path)?;
            let (tokens, _) = measure::tokenize(&tok, &text)?;
            let p = PplParams {
                n_ctx: s.n_ctx,
                n_batch: s.n_ctx,
                max_chunks: s.chunks,
            };
            measure::check_length(path, tokens.len(), &p)?;
        }
        Ok(Inputs {
            merge,
            model_files,
            texts,
            hashes: Vec::new(),
            imatrix: None,
            imatrix_text: None,
        })
    }

    /// Hashes every input file and text (cached in the manifest by size and mtime).
    pub(super) fn hash(&mut self, man: &mut Manifest, s: &Settings, log: &Log) -> Result<()> {
        let to_hash: Vec<PathBuf> = self
            .model_files
            .iter()
            .cloned()
            .chain(self.texts.iter().map(|t| t.path.clone()))
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
        let n_files = self.model_files.len();
        for (t, (_, h)) in self.texts.iter_mut().zip(hashes[n_files..].iter()) {
            t.sha256 = h.clone();
        }
        let n_texts = self.texts.len();
        self.imatrix = s
            .imatrix
            .as_ref()
            .and_then(|_| hashes.get(n_files + n_texts).cloned());
        self.imatrix_text = s.imatrix_text.as_ref().and_then(|_| {
            hashes
                .get(n_files + n_texts + usize::from(s.imatrix.is_some()))
                .cloned()
        });
        self.hashes = hashes;
        Ok(())
    }

    /// The model files with their sha256 (after [`Inputs::hash`]).
    pub(super) fn model_files(&self) -> &[(PathBuf, String)] {
        &self.hashes[..self.model_files.len()]
    }

    /// --expect-sha256: checks every hashed input against the published list at `list_path`,
    /// noting each; false when any differs (then nothing may be written).
    pub(super) fn match_expected(&self, list_path: &Path, log: &Log) -> Result<bool> {
        let list = sums::read(list_path)?;
        let res = sums::check_expected(&list, &self.hashes, list_path)?;
        let mut bad = 0;
        let mut unlisted = 0;
        for ((p, actual), r) in self.hashes.iter().zip(&res) {
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
            return Ok(false);
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
        Ok(true)
    }
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

/// The identity of a `--model` input: its sha256, or for a split set the sha256 of its
/// members' `SHA256SUMS` lines (so a change in any member reruns what depends on it).
pub(super) fn set_sha256(files: &[(PathBuf, String)]) -> Option<String> {
    use sha2::{Digest, Sha256};
    match files {
        [] => None,
        [(_, one)] => Some(one.clone()),
        many => {
            let mut h = Sha256::new();
            for (p, sha) in many {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default();
                h.update(format!("{sha}  {name}\n").as_bytes());
            }
            Some(format!("{:x}", h.finalize()))
        }
    }
}

#[cfg(test)]
mod tests {
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
    fn a_set_is_identified_by_all_its_members() {
        let f = |n: &str, h: &str| (PathBuf::from(n), h.to_string());
        assert_eq!(super::set_sha256(&[]), None);
        assert_eq!(super::set_sha256(&[f("a.gguf", "x")]).as_deref(), Some("x"));
        let a = super::set_sha256(&[
            f("m-00001-of-00002.gguf", "x"),
            f("m-00002-of-00002.gguf", "y"),
        ]);
        let b = super::set_sha256(&[
            f("m-00001-of-00002.gguf", "x"),
            f("m-00002-of-00002.gguf", "z"),
        ]);
        assert!(a.is_some() && a != b && a.as_deref() != Some("x"));
    }
}
