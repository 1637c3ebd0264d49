//! An append-only output file written with O_DIRECT (Linux): the bytes go from an aligned
//! staging buffer straight to the device, skipping the page cache copy, the dirty-page
//! writeback and the reclaim that a buffered write of a 14 GB model costs in CPU time. Where
//! the file system refuses O_DIRECT the same writes are buffered.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Offset, length and address alignment of every direct write (the largest logical block size
/// of common devices, and the page size).
const ALIGN: usize = 4096;
/// Bytes staged per write.
const CHUNK: usize = 8 << 20;
/// EINVAL: what Linux returns for O_DIRECT where the file system does not support it.
const INVAL: i32 = rustix::io::Errno::INVAL.raw_os_error();

/// A new file written front to back.
pub struct DirectFile {
    file: File,
    /// `CHUNK + ALIGN` bytes; the staging area starts at `start`, an aligned address
    buf: Vec<u8>,
    start: usize,
    /// bytes staged in `buf[start..start + fill]`
    fill: usize,
    /// file offset of the staging area's first byte (a multiple of ALIGN)
    pos: u64,
}

impl DirectFile {
    /// Creates `path` (which must not exist) for writing, with O_DIRECT where the file system
    /// allows it.
    pub fn create_new(path: &Path) -> io::Result<DirectFile> {
        let open = |flags: i32| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(flags)
                .open(path)
        };
        let direct = rustix::fs::OFlags::DIRECT.bits() as i32;
        let file = match open(direct) {
            Ok(f) => f,
            // no O_DIRECT on this file system (the file was not created)
            Err(e) if e.raw_os_error() == Some(INVAL) => open(0)?,
            Err(e) => return Err(e),
        };
        let buf = vec![0u8; CHUNK + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
        Ok(DirectFile {
            file,
            buf,
            start,
            fill: 0,
            pos: 0,
        })
    }

    /// Bytes appended so far.
    pub fn len(&self) -> u64 {
        self.pos + self.fill as u64
    }

    /// Appends `bytes` at the end of the file.
    pub fn append(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let room = CHUNK - self.fill;
            let n = room.min(bytes.len());
            let at = self.start + self.fill;
            self.buf[at..at + n].copy_from_slice(&bytes[..n]);
            self.fill += n;
            bytes = &bytes[n..];
            if self.fill == CHUNK {
                self.flush_staged(CHUNK)?;
            }
        }
        Ok(())
    }

    /// Writes the staged bytes rounded up to `len` (a multiple of ALIGN) at `pos`.
    fn flush_staged(&mut self, len: usize) -> io::Result<()> {
        let bytes = &self.buf[self.start..self.start + len];
        match self.file.write_all_at(bytes, self.pos) {
            // a file system that accepted O_DIRECT at open but refuses direct writes (some
            // network and FUSE file systems): buffered writes from here on, this block again
            Err(e) if e.raw_os_error() == Some(INVAL) && self.stop_direct()? => {
                self.file.write_all_at(bytes, self.pos)?
            }
            r => r?,
        }
        self.pos += len as u64;
        self.fill = 0;
        Ok(())
    }

    /// Clears O_DIRECT on the open file; false when it was not set.
    fn stop_direct(&self) -> io::Result<bool> {
        let flags = rustix::fs::fcntl_getfl(&self.file)?;
        if !flags.contains(rustix::fs::OFlags::DIRECT) {
            return Ok(false);
        }
        rustix::fs::fcntl_setfl(&self.file, flags - rustix::fs::OFlags::DIRECT)?;
        Ok(true)
    }

    /// Writes what is staged and cuts the file to the bytes appended (nothing may be appended
    /// after this).
    pub fn finish(&mut self) -> io::Result<()> {
        let end = self.len();
        if self.fill > 0 {
            // the last block is written whole (zero padded), then the padding cut off
            let padded = self.fill.div_ceil(ALIGN) * ALIGN;
            let at = self.start + self.fill;
            self.buf[at..self.start + padded].fill(0);
            self.flush_staged(padded)?;
        }
        self.file.set_len(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_in_any_sizes_make_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..CHUNK * 2 + 12_345)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        for (k, cuts) in [
            vec![0, 7, 4096, 4100, CHUNK - 1, CHUNK + 5, data.len()],
            vec![0, data.len()],
            vec![0, 0, 1, data.len()],
        ]
        .iter()
        .enumerate()
        {
            let p = dir.path().join(format!("f{k}"));
            let mut f = DirectFile::create_new(&p).unwrap();
            for w in cuts.windows(2) {
                f.append(&data[w[0]..w[1]]).unwrap();
            }
            assert_eq!(f.len(), data.len() as u64);
            f.finish().unwrap();
            drop(f);
            assert_eq!(std::fs::read(&p).unwrap(), data);
        }
        // after a switch to buffered writes (as on EINVAL) the file is the same
        let p = dir.path().join("switched");
        let mut f = DirectFile::create_new(&p).unwrap();
        f.append(&data[..CHUNK + 3]).unwrap();
        let was_direct = f.stop_direct().unwrap();
        assert!(!f.stop_direct().unwrap(), "cleared once");
        f.append(&data[CHUNK + 3..]).unwrap();
        f.finish().unwrap();
        drop(f);
        assert_eq!(
            std::fs::read(&p).unwrap(),
            data,
            "direct at first: {was_direct}"
        );
        let p = dir.path().join("empty");
        DirectFile::create_new(&p).unwrap().finish().unwrap();
        assert_eq!(std::fs::read(&p).unwrap().len(), 0);
        assert!(DirectFile::create_new(&p).is_err(), "exists already");
    }
}
