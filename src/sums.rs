//! `SHA256SUMS` files (the `sha256sum` format) and the streaming file hash: the lists merge and
//! the pipeline write, reading a published list for `--expect-sha256`, and re-hashing a folder
//! for `kiln verify`.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// File name of the checksum list inside --out.
pub const SUMS: &str = "SHA256SUMS";

/// Largest checksum list read.
const MAX_SUMS_BYTES: u64 = 16 << 20;

/// One `HASH  NAME` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub sha256: String,
    pub name: String,
}

/// The lines of a SHA256SUMS file for `entries` (sorted by name, two spaces, as sha256sum writes).
pub fn format(entries: &[Entry]) -> String {
    let mut v: Vec<&Entry> = entries.iter().collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v.iter()
        .map(|e| format!("{}  {}\n", e.sha256, e.name))
        .collect()
}

/// The lines of a SHA256SUMS file for a name → hash map (sorted by name).
pub fn format_map(entries: &HashMap<String, String>) -> String {
    let v: Vec<Entry> = entries
        .iter()
        .map(|(n, h)| Entry {
            sha256: h.clone(),
            name: n.clone(),
        })
        .collect();
    format(&v)
}

/// Adds or replaces `file`'s line in the SHA256SUMS beside it (lines that are not
/// `HASH  NAME` are dropped).
pub fn upsert_beside(file: &Path, hash: &str) -> Result<()> {
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sums_path = dir.join(SUMS);
    let mut entries: HashMap<String, String> = HashMap::new();
    if let Ok(text) = std::fs::read_to_string(&sums_path) {
        for line in text.lines() {
            if let Some((h, n)) = line.split_once("  ") {
                entries.insert(n.to_string(), h.to_string());
            }
        }
    }
    entries.insert(name, hash.to_string());
    let mut f = kiln_formats::atomic::AtomicFile::create(&sums_path)
        .with_context(|| format!("writing {}", sums_path.display()))?;
    std::io::Write::write_all(&mut f, format_map(&entries).as_bytes())
        .with_context(|| format!("writing {}", sums_path.display()))?;
    f.commit()
        .with_context(|| format!("writing {}", sums_path.display()))
}

/// Streams a file through SHA-256; `on_bytes(n)` after every block read.
pub fn sha256_file(path: &Path, on_bytes: &mut dyn FnMut(u64)) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        on_bytes(n as u64);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Parses sha256sum output: `HASH  NAME` or `HASH *NAME` (binary mode), blank lines and `#`
/// comments skipped. Errors name the file and line.
pub fn parse(text: &str, what: &Path) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || {
            anyhow::anyhow!(
                "{} line {}: expected \"<64 hex digits>  <file name>\" (sha256sum format), got {line:?}",
                what.display(),
                i + 1
            )
        };
        let (hash, rest) = line.split_once(' ').ok_or_else(bad)?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let name = rest
            .strip_prefix(' ')
            .or_else(|| rest.strip_prefix('*'))
            .ok_or_else(bad)?;
        if name.is_empty() {
            return Err(bad());
        }
        out.push(Entry {
            sha256: hash.to_ascii_lowercase(),
            name: name.to_string(),
        });
    }
    Ok(out)
}

/// Reads and parses a checksum list file.
pub fn read(path: &Path) -> Result<Vec<Entry>> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.len() > MAX_SUMS_BYTES {
        bail!(
            "{}: {} bytes, too large for a checksum list",
            path.display(),
            meta.len()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {} (a sha256sum list)", path.display()))?;
    parse(&text, path)
}

/// How one listed input compares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    Ok,
    Mismatch { expected: String },
}

/// Matches each input (path, actual sha256) against a published list: an entry matches an input
/// when the input's path ends with the entry's name, compared by whole path components (so
/// `model-00001-of-00002.safetensors` and `Llama-2-7b-hf/config.json` both work). Returns, per
/// input, None when the list does not name it; errors when no entry names any input (the list is
/// for something else).
pub fn check_expected(
    list: &[Entry],
    inputs: &[(PathBuf, String)],
    list_path: &Path,
) -> Result<Vec<Option<Expect>>> {
    let mut any = false;
    let res = inputs
        .iter()
        .map(|(p, actual)| {
            // The longest matching entry wins (`a/config.json` over `config.json`).
            let best = list
                .iter()
                .filter(|e| p.ends_with(Path::new(&e.name)))
                .max_by_key(|e| Path::new(&e.name).components().count());
            best.map(|e| {
                any = true;
                if e.sha256 == *actual {
                    Expect::Ok
                } else {
                    Expect::Mismatch {
                        expected: e.sha256.clone(),
                    }
                }
            })
        })
        .collect();
    if !any {
        bail!(
            "--expect-sha256 {}: none of its {} entries names an input file of this run",
            list_path.display(),
            list.len()
        );
    }
    Ok(res)
}

/// One file's verification result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verified {
    pub name: String,
    pub expected: String,
    /// None when the file is missing or unreadable.
    pub actual: Option<String>,
    /// "OK", "FAILED" or "MISSING".
    pub status: &'static str,
}

/// Re-hashes every file `dir/SHA256SUMS` lists.
pub fn verify_dir(dir: &Path, on_bytes: &mut dyn FnMut(u64)) -> Result<Vec<Verified>> {
    if !dir.is_dir() {
        bail!("{} is not a folder", dir.display());
    }
    let list_path = dir.join(SUMS);
    if !list_path.is_file() {
        bail!(
            "{} has no {SUMS} (kiln pipeline writes one beside its outputs)",
            dir.display()
        );
    }
    let list = read(&list_path)?;
    let mut out = Vec::with_capacity(list.len());
    for e in list {
        let rel = Path::new(&e.name);
        let safe = rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        let p = dir.join(rel);
        let actual = if safe && p.is_file() {
            sha256_file(&p, on_bytes).ok()
        } else {
            None
        };
        let status = match &actual {
            None => "MISSING",
            Some(a) if *a == e.sha256 => "OK",
            Some(_) => "FAILED",
        };
        out.push(Verified {
            name: e.name,
            expected: e.sha256,
            actual,
            status,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn parses_sha256sum_output() {
        let text = format!(
            "{H}  a.gguf\n\n# comment\n{} *dir/b c.bin\r\n",
            H.to_uppercase()
        );
        let v = parse(&text, Path::new("x")).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].name, "a.gguf");
        assert_eq!(v[1].name, "dir/b c.bin");
        assert_eq!(v[1].sha256, H);
        let entries = vec![
            Entry {
                sha256: H.into(),
                name: "z".into(),
            },
            Entry {
                sha256: H.into(),
                name: "a".into(),
            },
        ];
        let s = format(&entries);
        assert_eq!(s, format!("{H}  a\n{H}  z\n"));
        assert_eq!(parse(&s, Path::new("x")).unwrap().len(), 2);
    }

    #[test]
    fn hostile_lines_are_errors_naming_the_line() {
        for bad in [
            "nothash  a",
            &format!("{H}a"),
            &format!("{H} a"),
            &format!("{H}  "),
            &format!("{}  a", &H[..63]),
            &format!("{}g  a", &H[..63]),
        ] {
            let e = parse(&format!("{H}  ok\n{bad}\n"), Path::new("list")).unwrap_err();
            assert!(format!("{e}").contains("list line 2"), "{e}");
        }
    }

    #[test]
    fn expected_list_matches_by_path_suffix() {
        let list = parse(
            &format!(
                "{H}  config.json\n{}  base/model.safetensors\n",
                "0".repeat(64)
            ),
            Path::new("l"),
        )
        .unwrap();
        let inputs = vec![
            (PathBuf::from("/m/base/config.json"), H.to_string()),
            (PathBuf::from("/m/base/model.safetensors"), H.to_string()),
            (PathBuf::from("/m/base/tokenizer.model"), H.to_string()),
        ];
        let r = check_expected(&list, &inputs, Path::new("l")).unwrap();
        assert_eq!(r[0], Some(Expect::Ok));
        assert_eq!(
            r[1],
            Some(Expect::Mismatch {
                expected: "0".repeat(64)
            })
        );
        assert_eq!(r[2], None);
        // "fig.json" must not match "config.json"
        let list2 = parse(&format!("{H}  fig.json\n"), Path::new("l")).unwrap();
        assert!(check_expected(&list2, &inputs, Path::new("l")).is_err());
    }

    #[test]
    fn verify_reports_ok_failed_missing() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"hello").unwrap();
        std::fs::write(d.path().join("b"), b"hello").unwrap();
        std::fs::write(
            d.path().join(SUMS),
            format!("{H}  a\n{H}  b\n{H}  c\n{H}  ../a\n"),
        )
        .unwrap();
        std::fs::write(d.path().join("b"), b"hellp").unwrap();
        let v = verify_dir(d.path(), &mut |_| {}).unwrap();
        let st: Vec<&str> = v.iter().map(|x| x.status).collect();
        assert_eq!(st, ["OK", "FAILED", "MISSING", "MISSING"]);
        assert!(verify_dir(&d.path().join("nope"), &mut |_| {}).is_err());
    }
}
