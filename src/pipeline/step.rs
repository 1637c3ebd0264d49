//! The pipeline's step runner: the one place that skips a step whose manifest record is up to
//! date, shows the step lines, times the step, moves its outputs from the staging folder into
//! place, hashes them and records the step in `kiln-manifest.json`. The steps themselves (in
//! `steps.rs`) only say what they are and call the library.

use super::manifest::{self, record_output, rel_string, write_if_changed, Manifest, StepRecord};
use super::{EVAL_DIR, STAGING};
use crate::progress::{Bar, Progress, Unit};
use crate::sums;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Step status lines and progress bars, through the caller's [`Progress`].
pub(super) struct Log<'p> {
    progress: &'p dyn Progress,
    n_steps: usize,
    k: usize,
}

impl<'p> Log<'p> {
    pub(super) fn new(progress: &'p dyn Progress) -> Log<'p> {
        Log {
            progress,
            n_steps: 0,
            k: 0,
        }
    }
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
    pub(super) fn note(&self, line: &str) {
        self.progress.note(line);
    }
    pub(super) fn bar(&self, total: u64, unit: Unit) -> Box<dyn Bar> {
        self.progress.bar(total, unit)
    }
    pub(super) fn progress(&self) -> &'p dyn Progress {
        self.progress
    }
}

/// A file the steps read: a step's output or a file given on the command line.
#[derive(Clone, Debug)]
pub(super) struct File {
    pub path: PathBuf,
    /// Relative to --out for a step's output, as given otherwise (the report's file column).
    pub rel: String,
    /// How the manifest names it as a step's input (see [`input_key`]).
    pub key: String,
    pub sha256: String,
}

/// What every step says about itself: how the manifest knows it and what decides its outputs.
pub(super) trait Step {
    /// Its id in the manifest and in the skip lines ("quantize q4_0").
    fn id(&self) -> String;
    /// Everything besides the input files that decides the outputs.
    fn settings(&self) -> serde_json::Value;
    /// Its input files: name as the manifest records it → sha256.
    fn inputs(&self) -> BTreeMap<String, String>;
    /// Its status line when it runs.
    fn what(&self) -> String;
}

/// A step that writes files (a GGUF, a folder, a KLD base) that later steps read.
pub(super) trait Makes: Step {
    /// Its output later steps read, relative to --out.
    fn output(&self) -> String;
    /// The error when the manifest has no record of [`Makes::output`].
    fn lost(&self) -> String {
        format!("the manifest lost {}", self.output())
    }
    /// Whether the run says how long the step took.
    fn timed(&self) -> bool {
        true
    }
    /// Writes the outputs under the staging folder; returns what to move into place (files or
    /// folders relative to --out), in that order.
    fn make(&self, cx: &Cx) -> Result<Vec<String>>;
}

/// A step whose result is one JSON record (`eval/*.json`), reused while it is up to date.
pub(super) trait Measures: Step {
    type Record: serde::Serialize + serde::de::DeserializeOwned;
    /// Where the record is kept, relative to --out.
    fn output(&self) -> String;
    fn measure(&self, cx: &Cx) -> Result<Self::Record>;
}

/// What a step's body gets: the folders and the log.
pub(super) struct Cx<'a> {
    pub out: &'a Path,
    pub log: &'a Log<'a>,
}

impl Cx<'_> {
    /// Where the step writes `rel` before it is moved into place.
    pub(super) fn staged(&self, rel: &str) -> PathBuf {
        self.out.join(STAGING).join(rel)
    }
}

/// Runs the steps of one pipeline in its --out folder, which it holds locked.
pub(super) struct Runner<'p> {
    out: PathBuf,
    man: Manifest,
    log: Log<'p>,
    /// The ids of this run's steps, run or skipped (their outputs go into SHA256SUMS).
    done: Vec<String>,
    _lock: Option<std::fs::File>,
}

impl<'p> Runner<'p> {
    /// Creates and locks --out, removes what an interrupted run left, makes the staging folder and
    /// writes the manifest (so an unwritable folder fails now); `force` forgets every record.
    pub(super) fn open(
        out: &Path,
        mut man: Manifest,
        log: Log<'p>,
        force: bool,
    ) -> Result<Runner<'p>> {
        std::fs::create_dir_all(out)
            .with_context(|| format!("--out {}: cannot create the folder", out.display()))?;
        let lock = lock_out(out, &log)?;
        clean_leftovers(out)?;
        let staging = out.join(STAGING);
        std::fs::create_dir_all(staging.join(EVAL_DIR)).with_context(|| {
            format!(
                "--out {}: cannot write in this folder ({})",
                out.display(),
                staging.display()
            )
        })?;
        man.save(out)
            .with_context(|| format!("--out {}: cannot write in this folder", out.display()))?;
        if force {
            man.steps.clear();
        }
        Ok(Runner {
            out: out.to_path_buf(),
            man,
            log,
            done: Vec::new(),
            _lock: lock,
        })
    }

    /// Sets the number of steps the status lines count to.
    pub(super) fn count_steps(&mut self, n: usize) {
        self.log.n_steps = n;
    }

    pub(super) fn note(&self, line: &str) {
        self.log.note(line);
    }

    /// A file given on the command line (--model, --imatrix) with its sha256.
    pub(super) fn given(&self, path: &Path, sha256: &str) -> File {
        File {
            path: path.to_path_buf(),
            rel: path.display().to_string(),
            key: input_key(&self.out, path),
            sha256: sha256.to_string(),
        }
    }

    /// Runs a step that writes files unless it is up to date; its main output either way.
    pub(super) fn file(&mut self, step: &dyn Makes) -> Result<File> {
        let (id, settings, inputs) = (step.id(), step.settings(), step.inputs());
        if self.man.up_to_date(&self.out, &id, &settings, &inputs) {
            self.log.skip(&id);
        } else {
            self.log.step(&step.what());
            let t0 = Instant::now();
            let made = step.make(&Cx {
                out: &self.out,
                log: &self.log,
            })?;
            let mut outputs = Vec::new();
            for rel in &made {
                publish(&self.out, rel)?;
                let at = self.out.join(rel);
                if at.is_dir() {
                    for f in files_under(&self.out, &at)? {
                        outputs.push(record_output(&self.out, &f)?);
                    }
                } else {
                    outputs.push(record_output(&self.out, rel)?);
                }
            }
            self.record(&id, settings, inputs, outputs)?;
            if step.timed() {
                self.log
                    .note(&format!("  done in {:.1}s", t0.elapsed().as_secs_f64()));
            }
        }
        let rel = step.output();
        let sha256 = self
            .man
            .output(&id, &rel)
            .map(|o| o.file.sha256.clone())
            .ok_or_else(|| anyhow!(step.lost()))?;
        self.done.push(id);
        let path = self.out.join(&rel);
        Ok(File {
            key: input_key(&self.out, &path),
            path,
            rel,
            sha256,
        })
    }

    /// Runs a step whose output is one JSON record, unless it is up to date and its record reads
    /// back; the record either way.
    pub(super) fn json<S: Measures>(&mut self, step: &S) -> Result<S::Record> {
        let (id, settings, inputs) = (step.id(), step.settings(), step.inputs());
        let rel = step.output();
        if self.man.up_to_date(&self.out, &id, &settings, &inputs) {
            let cached = std::fs::read_to_string(self.out.join(&rel))
                .ok()
                .and_then(|j| serde_json::from_str::<S::Record>(&j).ok());
            if let Some(r) = cached {
                self.log.skip(&id);
                self.done.push(id);
                return Ok(r);
            }
        }
        self.log.step(&step.what());
        let r = step.measure(&Cx {
            out: &self.out,
            log: &self.log,
        })?;
        let mut bytes = serde_json::to_vec_pretty(&r)?;
        bytes.push(b'\n');
        manifest::write_atomic(&self.out.join(STAGING).join(&rel), &bytes)?;
        publish(&self.out, &rel)?;
        let outputs = vec![record_output(&self.out, &rel)?];
        self.record(&id, settings, inputs, outputs)?;
        // What later runs will read back (JSON floats do not always round-trip to the last bit): the
        // report is built from the same values on the first run and on every rerun.
        let r = serde_json::from_slice(&bytes).with_context(|| format!("reading back {rel}"))?;
        self.done.push(id);
        Ok(r)
    }

    fn record(
        &mut self,
        id: &str,
        settings: serde_json::Value,
        inputs: BTreeMap<String, String>,
        outputs: Vec<manifest::Output>,
    ) -> Result<()> {
        self.man.steps.insert(
            id.to_string(),
            StepRecord {
                settings,
                inputs,
                outputs,
            },
        );
        self.man.save(&self.out)
    }

    /// Writes files that no step records (the report) into --out, counted as one step `id` that
    /// is skipped when every file already holds these bytes.
    pub(super) fn write_unrecorded(
        &mut self,
        id: &str,
        what: &str,
        files: &[(&str, String)],
    ) -> Result<()> {
        let unchanged = files
            .iter()
            .all(|(n, c)| std::fs::read(self.out.join(n)).ok().as_deref() == Some(c.as_bytes()));
        if unchanged {
            self.log.skip(id);
        } else {
            self.log.step(what);
            for (n, c) in files {
                write_if_changed(&self.out.join(n), c.as_bytes())?;
            }
        }
        Ok(())
    }

    /// Ends the run: SHA256SUMS of every output of this run's steps, then of `extra` files in --out
    /// and the manifest; the staging folder is removed.
    pub(super) fn finish(&mut self, extra: &[&str]) -> Result<()> {
        self.man.save(&self.out)?;
        let mut entries = Vec::new();
        for id in &self.done {
            if let Some(r) = self.man.steps.get(id) {
                for o in &r.outputs {
                    entries.push(sums::Entry {
                        sha256: o.file.sha256.clone(),
                        name: o.path.clone(),
                    });
                }
            }
        }
        for n in extra.iter().chain([&manifest::MANIFEST]) {
            entries.push(sums::Entry {
                sha256: manifest::sha256_file(&self.out.join(n), &mut |_| {})?,
                name: n.to_string(),
            });
        }
        write_if_changed(
            &self.out.join(sums::SUMS),
            sums::format(&entries).as_bytes(),
        )?;
        let _ = std::fs::remove_dir_all(self.out.join(STAGING));
        Ok(())
    }
}

/// How a step names an input: files inside --out by their relative path (so the folder can be
/// moved or copied and stay up to date), others as given.
fn input_key(out: &Path, p: &Path) -> String {
    match p.strip_prefix(out) {
        Ok(rel) => format!("out:{}", rel_string(Path::new(""), rel)),
        Err(_) => p.display().to_string(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet_log() -> Log<'static> {
        Log::new(&crate::progress::Silent)
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
