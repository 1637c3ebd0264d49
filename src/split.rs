//! `kiln split`: a GGUF into a split set as `llama-gguf-split --split` writes it (the same bytes),
//! and a split set back into one file as `llama-gguf-split --merge` does. Each set appears only
//! when every file of it is complete.

use crate::progress::{Progress, Unit};
use anyhow::{bail, Context, Result};
use kiln_formats::gguf::split::{self, SplitBy, SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS_COUNT};
use kiln_formats::gguf::{
    ggml_dims, GgufFile, GgufValue, GgufWriter, TensorSpec, DEFAULT_ALIGNMENT,
};
use std::path::{Path, PathBuf};

/// Options of [`split`].
#[derive(Clone, Debug)]
pub struct SplitOptions {
    pub input: PathBuf,
    /// Files are named `PREFIX-00001-of-0000N.gguf`.
    pub out_prefix: PathBuf,
    pub by: SplitBy,
    /// The first file holds the metadata only (`--no-tensor-first-split`).
    pub empty_first: bool,
    /// Plan only; write nothing.
    pub dry_run: bool,
    /// Replace existing files.
    pub force: bool,
}

/// One file of a set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitFile {
    pub path: PathBuf,
    pub n_tensors: usize,
    /// Metadata plus tensor data, in bytes.
    pub bytes: u64,
}

/// Options of [`join`].
#[derive(Clone, Debug)]
pub struct JoinOptions {
    /// The set's first file (`…-00001-of-0000N.gguf`).
    pub first: PathBuf,
    pub out: PathBuf,
    pub dry_run: bool,
    pub force: bool,
}

fn pad(n: u64) -> u64 {
    n.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT
}

fn open(path: &Path) -> Result<GgufFile> {
    let f = GgufFile::open(path).with_context(|| format!("opening {}", path.display()))?;
    if f.header.alignment != DEFAULT_ALIGNMENT {
        bail!(
            "{}: general.alignment is {}; split sets use the default alignment of {DEFAULT_ALIGNMENT} bytes",
            path.display(),
            f.header.alignment
        );
    }
    Ok(f)
}

/// Sets `key` to `v` as ggml's `gguf_set_val_*` does: an existing entry is removed and the key
/// appended, so the last key set is the last in the file.
fn set_kv(meta: &mut Vec<(String, GgufValue)>, key: &str, v: GgufValue) {
    meta.retain(|(k, _)| k != key);
    meta.push((key.to_string(), v));
}

fn refuse_existing(paths: &[PathBuf], force: bool) -> Result<()> {
    if force {
        return Ok(());
    }
    if let Some(p) = paths.iter().find(|p| p.exists()) {
        bail!(
            "{} already exists; remove it or pass --force to replace it",
            p.display()
        );
    }
    Ok(())
}

/// Where a file of a set is written before the whole set is renamed into place.
fn staged(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.kiln-set-partial"))
}

/// Renames every staged file to its final name, or removes them all when `r` failed.
fn publish(finals: &[PathBuf], r: Result<()>) -> Result<()> {
    if let Err(e) = r {
        for p in finals {
            let _ = std::fs::remove_file(staged(p));
        }
        return Err(e);
    }
    for p in finals {
        std::fs::rename(staged(p), p).with_context(|| format!("renaming into {}", p.display()))?;
    }
    Ok(())
}

/// Splits `o.input` into a set as llama-gguf-split does: the first file carries all the metadata,
/// every file carries `split.no`, `split.count` and `split.tensors.count`, and the tensors keep
/// their order.
pub fn split(o: &SplitOptions, progress: &dyn Progress) -> Result<Vec<SplitFile>> {
    let f = open(&o.input)?;
    let tensors = &f.header.tensors;
    let sizes: Vec<u64> = tensors.iter().map(|t| pad(t.n_bytes())).collect();
    let groups = split::plan(&sizes, o.by, o.empty_first)
        .map_err(|e| anyhow::anyhow!("{}: {e}", o.input.display()))?;
    let n = groups.len();
    let total = i32::try_from(tensors.len()).context("too many tensors for split.tensors.count")?;
    let mut files = Vec::with_capacity(n);
    let mut plans = Vec::with_capacity(n);
    for (i, g) in groups.iter().enumerate() {
        let mut meta = if i == 0 {
            f.header.metadata.clone()
        } else {
            Vec::new()
        };
        // llama-gguf-split sets split.count last (its first value is a placeholder)
        set_kv(&mut meta, SPLIT_NO, GgufValue::U16(i as u16));
        set_kv(&mut meta, SPLIT_TENSORS_COUNT, GgufValue::I32(total));
        set_kv(&mut meta, SPLIT_COUNT, GgufValue::U16(n as u16));
        let infos: Vec<TensorSpec> = g
            .iter()
            .map(|&k| {
                let t = &tensors[k];
                (t.name.clone(), ggml_dims(&t.shape), t.ty)
            })
            .collect();
        let meta_size = kiln_formats::gguf::serialize_header(&meta, &infos)
            .with_context(|| format!("{}: split {}", o.input.display(), i + 1))?
            .len() as u64;
        let data: u64 = g.iter().map(|&k| sizes[k]).sum();
        files.push(SplitFile {
            path: split::split_path(&o.out_prefix, i, n),
            n_tensors: g.len(),
            bytes: meta_size + data,
        });
        plans.push((meta, infos));
    }
    if o.dry_run {
        return Ok(files);
    }
    let finals: Vec<PathBuf> = files.iter().map(|s| s.path.clone()).collect();
    refuse_existing(&finals, o.force)?;
    let bar = progress.bar(sizes.iter().sum(), Unit::Bytes);
    let r = (|| -> Result<()> {
        for ((sf, (meta, infos)), g) in files.iter().zip(&plans).zip(&groups) {
            let tmp = staged(&sf.path);
            let mut w = GgufWriter::create(&tmp, meta, infos)
                .with_context(|| format!("creating {}", sf.path.display()))?;
            for &k in g {
                let t = &tensors[k];
                bar.set_message(&t.name);
                w.write_tensor(&t.name, f.tensor_data(t))
                    .with_context(|| format!("writing {}", sf.path.display()))?;
                f.release(t);
                bar.inc(sizes[k]);
            }
            w.finish()
                .with_context(|| format!("finishing {}", sf.path.display()))?;
        }
        Ok(())
    })();
    bar.finish();
    publish(&finals, r)?;
    Ok(files)
}

/// What [`join`] read and wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinDone {
    /// The files of the set.
    pub files: Vec<PathBuf>,
    pub n_tensors: usize,
}

/// Joins a split set into one file as llama-gguf-split --merge does: the first file's metadata
/// (with `split.count` set to 0, so the result is not taken for a set) and every file's tensors
/// in order. The set is opened as every kiln reader opens one (file names, `split.no` of each
/// file and the total tensor count checked).
pub fn join(o: &JoinOptions, progress: &dyn Progress) -> Result<JoinDone> {
    let set = open(&o.first)?;
    if set.get(SPLIT_COUNT).is_none() {
        bail!(
            "{}: no {SPLIT_COUNT} key; this is not the first file of a GGUF split set",
            o.first.display()
        );
    }
    let files: Vec<PathBuf> = set.paths().iter().map(|p| p.to_path_buf()).collect();
    let n_tensors = set.tensors.len();
    if o.dry_run {
        return Ok(JoinDone { files, n_tensors });
    }
    refuse_existing(std::slice::from_ref(&o.out), o.force)?;
    let mut meta = set.header.metadata.clone();
    set_kv(&mut meta, SPLIT_COUNT, GgufValue::U16(0));
    let infos: Vec<TensorSpec> = set
        .tensors
        .iter()
        .map(|t| (t.name.clone(), ggml_dims(&t.shape), t.ty))
        .collect();
    let total: u64 = set.tensors.iter().map(|t| pad(t.n_bytes())).sum();
    let bar = progress.bar(total, Unit::Bytes);
    let mut w = GgufWriter::create(&o.out, &meta, &infos)
        .with_context(|| format!("creating {}", o.out.display()))?;
    for t in &set.tensors {
        bar.set_message(&t.name);
        w.write_tensor(&t.name, set.tensor_data(t))
            .with_context(|| format!("writing {}", o.out.display()))?;
        set.release(t);
        bar.inc(pad(t.n_bytes()));
    }
    w.finish()
        .with_context(|| format!("finishing {}", o.out.display()))?;
    bar.finish();
    Ok(JoinDone { files, n_tensors })
}
