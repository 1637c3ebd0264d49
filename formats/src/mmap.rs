//! Read-only memory maps of input files, with page release for tensors already consumed.
//! This is the only module of the crate with `unsafe`.

use std::fs::File;
use std::io;
use std::path::Path;

/// A whole file mapped read-only.
pub struct MappedFile {
    map: memmap2::Mmap,
}

impl MappedFile {
    /// Maps `path` read-only. An empty file maps to an empty slice.
    pub fn open(path: &Path) -> io::Result<MappedFile> {
        let file = File::open(path)?;
        // SAFETY: the map is read-only; kiln never writes to its inputs, and a concurrent writer
        // truncating the file is outside what any mmap-based reader can guard against.
        let map = unsafe { memmap2::MmapOptions::new().map(&file)? };
        Ok(MappedFile { map })
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Tells the kernel the pages of `offset..offset+len` are no longer needed, so a streaming
    /// pass over a large model keeps its resident set bounded. Out-of-range spans are clipped.
    pub fn release(&self, offset: usize, len: usize) {
        let end = offset.saturating_add(len).min(self.map.len());
        let page = 4096;
        let start = offset.div_ceil(page) * page;
        if start >= end {
            return;
        }
        #[cfg(unix)]
        {
            // SAFETY: MADV_DONTNEED on a private read-only file mapping only drops clean pages; later
            // reads fault them back in from the file, so no slice handed out can observe a change.
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_and_releases() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 3 * 4096 + 5]).unwrap();
        let m = MappedFile::open(&p).unwrap();
        m.release(0, 1 << 20);
        assert!(m.bytes().iter().all(|&b| b == 7));
        let e = dir.path().join("empty");
        std::fs::write(&e, b"").unwrap();
        assert_eq!(MappedFile::open(&e).unwrap().bytes().len(), 0);
    }
}
