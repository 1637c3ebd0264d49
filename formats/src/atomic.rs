//! Output files written under a temporary name beside the destination and renamed into place only
//! when complete, so an interrupted run never leaves a partial file at the final path.

use std::io;
use std::path::{Path, PathBuf};

/// A temporary folder beside `path` (same file system, named `.NAME.*.kiln-partial`, an
/// ordinary folder's mode), to be filled and renamed to `path` when complete.
pub fn temp_dir_beside(path: &Path) -> io::Result<tempfile::TempDir> {
    let mut b = tempfile::Builder::new();
    let prefix = partial_prefix(path);
    b.prefix(&prefix).suffix(".kiln-partial");
    #[cfg(unix)]
    b.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o777));
    b.tempdir_in(parent_of(path))
}

/// The folder holding `path` (`.` for a bare name).
fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `.NAME.`: the start of a partial output's name.
fn partial_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.")
}

/// A file being written; it appears at `path` only after [`AtomicFile::commit`].
/// Dropping it uncommitted deletes the temporary file.
pub struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
}

impl AtomicFile {
    /// Creates a temporary file in the destination's folder (so the final rename stays on one
    /// file system).
    pub fn create(path: &Path) -> io::Result<AtomicFile> {
        let dir = parent_of(path);
        let prefix = partial_prefix(path);
        let mut b = tempfile::Builder::new();
        b.prefix(&prefix).suffix(".kiln-partial");
        // an ordinary file's mode (0666 less the umask), not tempfile's private 0600
        #[cfg(unix)]
        b.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
        let tmp = b.tempfile_in(dir)?;
        Ok(AtomicFile {
            tmp,
            path: path.to_path_buf(),
        })
    }

    /// The open temporary file.
    pub fn file(&mut self) -> &mut std::fs::File {
        self.tmp.as_file_mut()
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the file to its final path. The rename is atomic, so a killed process never leaves
    /// a partial file there; like llama.cpp's tools (and `cp`), kiln leaves flushing to disk to the
    /// kernel rather than paying an fsync of many gigabytes.
    pub fn commit(self) -> io::Result<()> {
        self.tmp.persist(&self.path).map_err(|e| e.error)?;
        Ok(())
    }
}

impl io::Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tmp.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tmp.flush()
    }
}

impl io::Seek for AtomicFile {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        self.tmp.seek(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn nothing_at_final_path_until_commit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.gguf");
        let mut f = AtomicFile::create(&p).unwrap();
        f.write_all(b"hello").unwrap();
        assert!(!p.exists());
        f.commit().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"hello");
    }

    #[test]
    #[cfg(unix)]
    fn committed_file_has_an_ordinary_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.bin");
        let mut f = AtomicFile::create(&p).unwrap();
        f.write_all(b"x").unwrap();
        f.commit().unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_ne!(mode & 0o044, 0, "mode {mode:o} is private");
    }

    #[test]
    fn dropped_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.gguf");
        {
            let mut f = AtomicFile::create(&p).unwrap();
            f.write_all(b"partial").unwrap();
        }
        assert!(!p.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
