//! The pipeline's manifest (`kiln-manifest.json` in --out): for every finished step, the settings and
//! input hashes it ran with and the outputs it wrote, so a rerun can skip what is up to date; plus a
//! cache of input hashes keyed by path, size and modification time, so unchanged inputs are not
//! re-read.

pub use crate::sums::sha256_file;
use anyhow::{bail, Context, Result};
use kiln_formats::atomic::AtomicFile;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// File name of the manifest inside --out.
pub const MANIFEST: &str = "kiln-manifest.json";

/// Format version written to the manifest.
const FORMAT: u32 = 1;

/// Largest manifest read (a real one is a few hundred KiB).
const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// Size and modification time of a file: the cheap fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub size: u64,
    pub mtime_ns: u64,
}

impl Stamp {
    /// The stamp of an existing file, None when it cannot be read.
    pub fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        if !m.is_file() {
            return None;
        }
        let mtime_ns = m
            .modified()
            .ok()?
            .duration_since(UNIX_EPOCH)
            .ok()?
            .as_nanos();
        let mtime_ns = u64::try_from(mtime_ns).unwrap_or(u64::MAX);
        Some(Stamp {
            size: m.len(),
            mtime_ns,
        })
    }
}

/// A hashed file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hashed {
    #[serde(flatten)]
    pub stamp: Stamp,
    pub sha256: String,
}

/// One output of a step, its path relative to --out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    pub path: String,
    #[serde(flatten)]
    pub file: Hashed,
}

/// A finished step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Everything besides the input files that decides the outputs.
    pub settings: serde_json::Value,
    /// Input path (as given) -> sha256.
    pub inputs: BTreeMap<String, String>,
    pub outputs: Vec<Output>,
}

/// The manifest.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Absolute input path -> its stamp and hash when last hashed.
    pub hash_cache: BTreeMap<String, Hashed>,
    /// Step id -> record.
    pub steps: BTreeMap<String, StepRecord>,
}

impl Manifest {
    /// An empty manifest.
    pub fn empty() -> Manifest {
        Manifest {
            format: FORMAT,
            ..Manifest::default()
        }
    }

    /// Reads `dir/kiln-manifest.json`; a missing file is an empty manifest, an unreadable or
    /// foreign one is an error (kiln does not guess which outputs it may replace).
    pub fn load(dir: &Path) -> Result<Manifest> {
        let p = dir.join(MANIFEST);
        let meta = match std::fs::metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Manifest::empty()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        if meta.len() > MAX_MANIFEST_BYTES {
            bail!(
                "{}: {} bytes, larger than a kiln manifest can be",
                p.display(),
                meta.len()
            );
        }
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let m: Manifest = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a kiln manifest; remove it (and the outputs beside it) or choose another --out",
                p.display()
            )
        })?;
        if m.format != FORMAT {
            bail!(
                "{}: manifest format {} (this kiln writes {FORMAT}); rerun with --force",
                p.display(),
                m.format
            );
        }
        Ok(m)
    }

    /// The manifest's bytes (deterministic: sorted maps, no timestamps of its own).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut v = serde_json::to_vec_pretty(self)?;
        v.push(b'\n');
        Ok(v)
    }

    /// Writes the manifest atomically, only when its bytes change.
    pub fn save(&self, dir: &Path) -> Result<()> {
        write_if_changed(&dir.join(MANIFEST), &self.to_bytes()?)
    }

    /// sha256 of an input, from the cache when its size and modification time are unchanged.
    /// `on_bytes` is called with the number of bytes read (for a progress bar).
    pub fn hash_input(&mut self, path: &Path, on_bytes: &mut dyn FnMut(u64)) -> Result<String> {
        let key = std::path::absolute(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string();
        let stamp = Stamp::of(path)
            .with_context(|| format!("{} is not a readable file", path.display()))?;
        if let Some(h) = self.hash_cache.get(&key) {
            if h.stamp == stamp {
                on_bytes(stamp.size);
                return Ok(h.sha256.clone());
            }
        }
        let sha256 = sha256_file(path, on_bytes)?;
        self.hash_cache.insert(
            key,
            Hashed {
                stamp,
                sha256: sha256.clone(),
            },
        );
        Ok(sha256)
    }

    /// Whether step `id` is recorded with exactly these settings and inputs, and every recorded
    /// output is still in `out` with the size and modification time it had when written.
    pub fn up_to_date(
        &self,
        out: &Path,
        id: &str,
        settings: &serde_json::Value,
        inputs: &BTreeMap<String, String>,
    ) -> bool {
        let Some(r) = self.steps.get(id) else {
            return false;
        };
        &r.settings == settings
            && &r.inputs == inputs
            && !r.outputs.is_empty()
            && r.outputs
                .iter()
                .all(|o| Stamp::of(&out.join(&o.path)).as_ref() == Some(&o.file.stamp))
    }

    /// The recorded output `rel` of step `id`.
    pub fn output(&self, id: &str, rel: &str) -> Option<&Output> {
        self.steps.get(id)?.outputs.iter().find(|o| o.path == rel)
    }
}

/// Hashes a freshly written output (relative path `rel` under `out`).
pub fn record_output(out: &Path, rel: &str) -> Result<Output> {
    let p = out.join(rel);
    let sha256 = sha256_file(&p, &mut |_| {})?;
    let stamp = Stamp::of(&p).with_context(|| format!("{} vanished", p.display()))?;
    Ok(Output {
        path: rel.to_string(),
        file: Hashed { stamp, sha256 },
    })
}

/// Writes `bytes` to `path` through a temporary file and a rename, unless the file already holds
/// exactly these bytes (so its modification time stays put).
pub fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Ok(old) = std::fs::read(path) {
        if old == bytes {
            return Ok(());
        }
    }
    write_atomic(path, bytes)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    f.commit()
        .with_context(|| format!("writing {}", path.display()))?;
    // The temporary file was created private (0600); the output is an ordinary readable file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("setting the permissions of {}", path.display()))?;
    }
    Ok(())
}

/// `path` relative to `base` as a '/'-separated string (for SHA256SUMS and the manifest).
pub fn rel_string(base: &Path, path: &Path) -> String {
    let r: PathBuf = path.strip_prefix(base).unwrap_or(path).to_path_buf();
    r.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn missing_manifest_is_empty_and_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let mut m = Manifest::load(d.path()).unwrap();
        assert!(m.steps.is_empty());
        std::fs::write(d.path().join("a.bin"), b"hello").unwrap();
        let h = m.hash_input(&d.path().join("a.bin"), &mut |_| {}).unwrap();
        assert_eq!(
            h,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        let out = record_output(d.path(), "a.bin").unwrap();
        m.steps.insert(
            "s".into(),
            StepRecord {
                settings: json!({"x": 1}),
                inputs: BTreeMap::new(),
                outputs: vec![out],
            },
        );
        m.save(d.path()).unwrap();
        let again = Manifest::load(d.path()).unwrap();
        assert_eq!(again, m);
        assert!(again.up_to_date(d.path(), "s", &json!({"x": 1}), &BTreeMap::new()));
        assert!(!again.up_to_date(d.path(), "s", &json!({"x": 2}), &BTreeMap::new()));
        let mut other = BTreeMap::new();
        other.insert("in".to_string(), "00".to_string());
        assert!(!again.up_to_date(d.path(), "s", &json!({"x": 1}), &other));
        assert!(!again.up_to_date(d.path(), "t", &json!({"x": 1}), &BTreeMap::new()));
        // a changed output is no longer up to date
        std::fs::write(d.path().join("a.bin"), b"hello!").unwrap();
        assert!(!again.up_to_date(d.path(), "s", &json!({"x": 1}), &BTreeMap::new()));
        std::fs::remove_file(d.path().join("a.bin")).unwrap();
        assert!(!again.up_to_date(d.path(), "s", &json!({"x": 1}), &BTreeMap::new()));
    }

    #[test]
    fn hash_cache_is_used_while_the_stamp_holds() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("in.txt");
        std::fs::write(&p, b"abc").unwrap();
        let mut m = Manifest::default();
        let h1 = m.hash_input(&p, &mut |_| {}).unwrap();
        // poison the cache: a hit returns the cached value
        let key = std::path::absolute(&p).unwrap().display().to_string();
        m.hash_cache.get_mut(&key).unwrap().sha256 = "cached".into();
        assert_eq!(m.hash_input(&p, &mut |_| {}).unwrap(), "cached");
        // a new size invalidates it
        std::fs::write(&p, b"abcd").unwrap();
        let h2 = m.hash_input(&p, &mut |_| {}).unwrap();
        assert_ne!(h2, "cached");
        assert_ne!(h1, h2);
    }

    #[test]
    fn hostile_manifests_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        for bad in [
            &b"not json"[..],
            b"{\"format\": 1}",
            b"[]",
            b"{\"format\": 99, \"hash_cache\": {}, \"steps\": {}}",
            b"\xff\xfe",
        ] {
            std::fs::write(d.path().join(MANIFEST), bad).unwrap();
            let e = Manifest::load(d.path()).unwrap_err();
            assert!(format!("{e:#}").contains(MANIFEST), "{e:#}");
        }
    }

    #[test]
    fn write_if_changed_keeps_the_mtime_of_equal_bytes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_if_changed(&p, b"x").unwrap();
        let s1 = Stamp::of(&p).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        write_if_changed(&p, b"x").unwrap();
        assert_eq!(Stamp::of(&p).unwrap(), s1);
        write_if_changed(&p, b"y").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"y");
    }

    #[test]
    fn rel_string_uses_slashes() {
        assert_eq!(
            rel_string(Path::new("/a/b"), Path::new("/a/b/c/d.txt")),
            "c/d.txt"
        );
    }
}
