//! Free-space check before each large write: the estimated output size against the space the file
//! system reports for the output folder (fs4's `available_space`, i.e. statvfs's f_bavail: the space
//! an unprivileged writer may use).

use anyhow::{bail, Context, Result};
use std::path::Path;

/// Headroom kept free beyond the estimate (metadata, the estimate's slack).
const MARGIN: u64 = 16 << 20;

/// Fails with a clear message when `needed` bytes (plus a small margin) exceed `available`.
pub fn check(dir: &Path, what: &str, needed: u64, available: u64) -> Result<()> {
    if needed
        .checked_add(MARGIN)
        .is_none_or(|want| want > available)
    {
        bail!(
            "not enough disk space in {}: {what} needs about {} ({needed} bytes, plus {} kept free), \
             but only {} ({available} bytes) are available; free some space or choose another --out",
            dir.display(),
            human(needed),
            human(MARGIN),
            human(available),
        );
    }
    Ok(())
}

/// [`check`] against the file system's free space in `dir`.
pub fn check_dir(dir: &Path, what: &str, needed: u64) -> Result<()> {
    let available = fs4::available_space(dir)
        .with_context(|| format!("reading the free space of {}", dir.display()))?;
    check(dir, what, needed, available)
}

/// Bytes in binary units ("3.82 GiB").
pub fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_when_the_estimate_does_not_fit() {
        let dir = Path::new("/data/out");
        let e = check(dir, "model-f16.gguf", 13 << 30, 2 << 30).unwrap_err();
        let s = format!("{e}");
        assert!(s.contains("/data/out"), "{s}");
        assert!(s.contains("model-f16.gguf"), "{s}");
        assert!(s.contains(&(13u64 << 30).to_string()), "{s}");
        assert!(s.contains(&(2u64 << 30).to_string()), "{s}");
        assert!(s.contains("13.00 GiB") && s.contains("2.00 GiB"), "{s}");
        // the margin counts
        assert!(check(dir, "x", 100, 100).is_err());
        assert!(check(dir, "x", 100, 100 + MARGIN).is_ok());
        assert!(check(dir, "x", u64::MAX, u64::MAX).is_err());
    }

    #[test]
    fn real_folder_has_some_space() {
        let d = tempfile::tempdir().unwrap();
        check_dir(d.path(), "a small file", 1).unwrap();
        assert!(check_dir(d.path(), "an impossible file", u64::MAX / 2).is_err());
    }

    #[test]
    fn human_units() {
        assert_eq!(human(5), "5 B");
        assert_eq!(human(1536), "1.50 KiB");
        assert_eq!(human(3 << 30), "3.00 GiB");
    }
}
