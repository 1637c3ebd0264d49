//! The streaming GGUF v3 writer: serializes a validated header with exactly packed offsets,
//! then takes tensor data one tensor at a time into a temp file renamed into place on finish.

use std::collections::HashSet;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use kiln_quant::GgmlType;

use super::reader::{alignment_of, check_tensor, TensorInfo};
use super::value::{GgufArray, GgufValue};
use super::{pad_to, GgufError, GGUF_MAGIC, GGUF_VERSION, MAX_ARRAY_LEN, MAX_STRING_LEN};
use crate::atomic::AtomicFile;

fn put_str(out: &mut Vec<u8>, s: &str, what: &dyn Fn() -> String) -> Result<(), GgufError> {
    if s.len() as u64 > MAX_STRING_LEN {
        return Err(GgufError::StringTooLong {
            what: what(),
            len: s.len() as u64,
            max: MAX_STRING_LEN,
        });
    }
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_value(out: &mut Vec<u8>, key: &str, v: &GgufValue) -> Result<(), GgufError> {
    out.extend_from_slice(&v.value_type().id().to_le_bytes());
    match v {
        GgufValue::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => put_str(out, s, &|| format!("value of '{key}'"))?,
        GgufValue::Array(a) => {
            if a.len() as u64 > MAX_ARRAY_LEN {
                return Err(GgufError::ArrayTooLong {
                    key: key.to_owned(),
                    count: a.len() as u64,
                    max: MAX_ARRAY_LEN,
                });
            }
            out.extend_from_slice(&a.elem_type().id().to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            macro_rules! each {
                ($v:expr) => {
                    for x in $v {
                        out.extend_from_slice(&x.to_le_bytes());
                    }
                };
            }
            match a {
                GgufArray::U8(v) => out.extend_from_slice(v),
                GgufArray::I8(v) => each!(v),
                GgufArray::U16(v) => each!(v),
                GgufArray::I16(v) => each!(v),
                GgufArray::U32(v) => each!(v),
                GgufArray::I32(v) => each!(v),
                GgufArray::F32(v) => each!(v),
                GgufArray::U64(v) => each!(v),
                GgufArray::I64(v) => each!(v),
                GgufArray::F64(v) => each!(v),
                GgufArray::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
                GgufArray::String(v) => {
                    for (i, s) in v.iter().enumerate() {
                        put_str(out, s, &|| format!("element {i} of array '{key}'"))?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Validates the inputs and builds the header bytes (padded to the alignment, so the data
/// section starts right after them), the tensor infos with packed offsets, and the alignment.
fn build(
    metadata: &[(String, GgufValue)],
    tensors: &[(String, Vec<u64>, GgmlType)],
) -> Result<(Vec<u8>, Vec<TensorInfo>, u64), GgufError> {
    let alignment = alignment_of(metadata)?;
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(&GGUF_MAGIC);
    out.extend_from_slice(&GGUF_VERSION.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());

    let mut keys = HashSet::with_capacity(metadata.len());
    for (index, (key, value)) in metadata.iter().enumerate() {
        if key.is_empty() {
            return Err(GgufError::EmptyKey {
                index: index as u64,
            });
        }
        if !keys.insert(key.as_str()) {
            return Err(GgufError::DuplicateKey { key: key.clone() });
        }
        put_str(&mut out, key, &|| format!("metadata key {index}"))?;
        put_value(&mut out, key, value)?;
    }

    let mut names = HashSet::with_capacity(tensors.len());
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for (name, shape, ty) in tensors {
        let n_bytes = check_tensor(name, shape, *ty)?;
        if !names.insert(name.as_str()) {
            return Err(GgufError::DuplicateTensor { name: name.clone() });
        }
        put_str(&mut out, name, &|| format!("tensor name '{name}'"))?;
        out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        for d in shape {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&ty.id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        infos.push(TensorInfo {
            name: name.clone(),
            shape: shape.clone(),
            ty: *ty,
            offset,
            part: 0,
        });
        offset = pad_to(n_bytes, alignment)
            .and_then(|p| offset.checked_add(p))
            .ok_or_else(|| GgufError::Overflow {
                what: format!("data section at tensor '{name}'"),
            })?;
    }
    let padded = pad_to(out.len() as u64, alignment)
        .and_then(|p| usize::try_from(p).ok())
        .ok_or_else(|| GgufError::Overflow {
            what: "header".into(),
        })?;
    out.resize(padded, 0);
    Ok((out, infos, alignment))
}

/// Serializes a GGUF v3 header: magic, version, counts, metadata in the given order, tensor infos
/// with exactly packed offsets (`offset_k = Σ pad(nbytes_i)`), and zero padding up to the
/// alignment (`general.alignment` if present, else 32), so the data section starts right after.
///
/// Validates everything the reader checks (non-empty unique keys, a u32 power-of-two alignment,
/// unique names shorter than 64 bytes, 1 to 4 dimensions, whole blocks per row, size limits).
/// Shapes are written exactly as given. Empty arrays are written (ggml reads them; Python's
/// `gguf` writer would skip them).
pub fn serialize_header(
    metadata: &[(String, GgufValue)],
    tensors: &[(String, Vec<u64>, GgmlType)],
) -> Result<Vec<u8>, GgufError> {
    build(metadata, tensors).map(|(bytes, _, _)| bytes)
}

const ZEROS: [u8; 4096] = [0; 4096];

/// A writer that counts the bytes passed through it.
struct Counted<'a, W: Write> {
    out: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.out.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// A callback that sees every byte of the file, in file order, as it is written.
pub type Tee = Box<dyn FnMut(&[u8]) + Send>;

/// The temporary file, with the optional tee that sees each byte written to it.
struct Sink {
    file: AtomicFile,
    tee: Option<Tee>,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        if let (Some(t), Some(done)) = (self.tee.as_mut(), buf.get(..n)) {
            t(done);
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// A GGUF file being written: header at creation, then every tensor's data in header order.
/// Nothing appears at the output path until [`GgufWriter::finish`] succeeds.
pub struct GgufWriter {
    out: BufWriter<Sink>,
    path: PathBuf,
    infos: Vec<TensorInfo>,
    alignment: u64,
    next: usize,
    poisoned: bool,
}

impl GgufWriter {
    /// Writes the header, computes packed offsets (alignment 32 unless metadata has
    /// general.alignment), pads. See [`serialize_header`] for the validation done.
    pub fn create(
        path: &Path,
        metadata: &[(String, GgufValue)],
        tensors: &[(String, Vec<u64>, GgmlType)],
    ) -> Result<GgufWriter, GgufError> {
        Self::create_inner(path, metadata, tensors, None)
    }

    /// As [`GgufWriter::create`], with `tee` called on every byte of the file in order as it is
    /// written (header, tensor data, padding), e.g. to hash the file without reading it back.
    pub fn create_with_tee(
        path: &Path,
        metadata: &[(String, GgufValue)],
        tensors: &[(String, Vec<u64>, GgmlType)],
        tee: Tee,
    ) -> Result<GgufWriter, GgufError> {
        Self::create_inner(path, metadata, tensors, Some(tee))
    }

    fn create_inner(
        path: &Path,
        metadata: &[(String, GgufValue)],
        tensors: &[(String, Vec<u64>, GgmlType)],
        tee: Option<Tee>,
    ) -> Result<GgufWriter, GgufError> {
        let (header, infos, alignment) = build(metadata, tensors).map_err(|e| e.in_file(path))?;
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = AtomicFile::create(path).map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 20, Sink { file, tee });
        out.write_all(&header).map_err(io)?;
        Ok(GgufWriter {
            out,
            path: path.to_path_buf(),
            infos,
            alignment,
            next: 0,
            poisoned: false,
        })
    }

    /// Next tensor's bytes; must be the next in order and exactly n_bytes long; pads to alignment.
    /// A rejected call (wrong name or size) writes nothing, so the right tensor may follow.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<(), GgufError> {
        self.write_tensor_with(name, data.len() as u64, |out| out.write_all(data))
    }

    /// Next tensor's bytes copied from `src` at `offset` (`n_bytes` of them) by the kernel
    /// (`copy_file_range` where the file system allows), for tensors that pass through unchanged.
    pub fn write_tensor_from_file(
        &mut self,
        name: &str,
        src: &std::fs::File,
        offset: u64,
        n_bytes: u64,
    ) -> Result<(), GgufError> {
        self.write_tensor_with(name, n_bytes, |out| {
            use std::io::{Read, Seek, SeekFrom};
            out.flush()?;
            let mut from = src;
            from.seek(SeekFrom::Start(offset))?;
            let sink = out.get_mut();
            let copied = if sink.tee.is_some() {
                // through the tee, so it sees these bytes too
                std::io::copy(&mut from.take(n_bytes), sink)?
            } else {
                std::io::copy(&mut from.take(n_bytes), sink.file.file())?
            };
            if copied != n_bytes {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("source ended after {copied} of {n_bytes} bytes"),
                ));
            }
            Ok(())
        })
    }

    /// Next tensor's bytes written by `fill` in as many pieces as it likes, so a producer can
    /// encode the tensor in chunks while earlier chunks are being written. `fill` must write exactly
    /// `n_bytes` (the tensor's size); fewer or more poisons the writer and nothing reaches the output
    /// path. An error `fill` returns is passed on (the writer is then poisoned too).
    pub fn write_tensor_streamed(
        &mut self,
        name: &str,
        n_bytes: u64,
        fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<(), GgufError> {
        self.write_tensor_with(name, n_bytes, |out| {
            let mut counted = Counted { out, n: 0 };
            fill(&mut counted)?;
            if counted.n != n_bytes {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "tensor {name}: {} bytes written, expected {n_bytes}",
                        counted.n
                    ),
                ));
            }
            Ok(())
        })
    }

    fn write_tensor_with(
        &mut self,
        name: &str,
        len: u64,
        write: impl FnOnce(&mut BufWriter<Sink>) -> std::io::Result<()>,
    ) -> Result<(), GgufError> {
        if self.poisoned {
            return Err(GgufError::Poisoned.in_file(&self.path));
        }
        let info = match self.infos.get(self.next) {
            Some(i) => i,
            None => {
                return Err(GgufError::ExtraTensor {
                    found: name.to_owned(),
                }
                .in_file(&self.path))
            }
        };
        if info.name != name {
            return Err(GgufError::TensorOrder {
                expected: info.name.clone(),
                found: name.to_owned(),
            }
            .in_file(&self.path));
        }
        let n_bytes = info.n_bytes();
        if len != n_bytes {
            return Err(GgufError::TensorSize {
                tensor: name.to_owned(),
                expected: n_bytes,
                found: len,
            }
            .in_file(&self.path));
        }
        let mut pad = pad_to(n_bytes, self.alignment).unwrap_or(n_bytes) - n_bytes;
        let mut result = write(&mut self.out);
        while result.is_ok() && pad > 0 {
            let n = pad.min(ZEROS.len() as u64) as usize;
            result = self.out.write_all(&ZEROS[..n]);
            pad -= n as u64;
        }
        if let Err(source) = result {
            self.poisoned = true;
            return Err(GgufError::Io {
                path: self.path.clone(),
                source,
            });
        }
        self.next += 1;
        Ok(())
    }

    /// The tensor infos as written in the header (with their data offsets).
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.infos
    }

    /// The output path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks every tensor was written, flushes, renames into place.
    ///
    /// On any error the temporary file is removed and nothing appears at the output path.
    pub fn finish(self) -> Result<(), GgufError> {
        if self.poisoned {
            return Err(GgufError::Poisoned.in_file(&self.path));
        }
        if let Some(next) = self.infos.get(self.next) {
            return Err(GgufError::MissingTensors {
                written: self.next,
                expected: self.infos.len(),
                next: next.name.clone(),
            }
            .in_file(&self.path));
        }
        let path = self.path;
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let sink = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        sink.file.commit().map_err(io)
    }
}

impl std::fmt::Debug for GgufWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufWriter")
            .field("path", &self.path)
            .field("written", &self.next)
            .field("n_tensors", &self.infos.len())
            .field("alignment", &self.alignment)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{GgufFile, TensorSpec, ALIGNMENT_KEY};
    use super::*;

    fn s(k: &str) -> String {
        k.to_owned()
    }

    fn small() -> (Vec<(String, GgufValue)>, Vec<TensorSpec>) {
        (
            vec![(s("general.architecture"), GgufValue::String(s("llama")))],
            vec![
                (s("a"), vec![4], GgmlType::F32),
                (s("b"), vec![32, 2], GgmlType::Q8_0),
            ],
        )
    }

    fn empty_dir(dir: &Path) -> bool {
        std::fs::read_dir(dir).unwrap().count() == 0
    }

    #[test]
    fn writes_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        let (md, ts) = small();
        let mut w = GgufWriter::create(&p, &md, &ts).unwrap();
        assert_eq!(w.tensor_infos()[1].offset, 32);
        assert_eq!(w.path(), p);
        let a: Vec<u8> = (0..16).collect();
        let b: Vec<u8> = (0..68).map(|i| i as u8 ^ 0x5a).collect();
        w.write_tensor("a", &a).unwrap();
        assert!(!p.exists());
        w.write_tensor("b", &b).unwrap();
        w.finish().unwrap();
        let f = GgufFile::open(&p).unwrap();
        assert_eq!(f.tensor_data(&f.tensors[0]), a);
        assert_eq!(f.tensor_data(&f.tensors[1]), b);
        assert_eq!(f.file_size(), f.data_offset + 32 + 96);
        assert_eq!(f.path(), p);
    }

    #[test]
    fn streamed_tensor_in_pieces_equals_one_write() {
        let dir = tempfile::tempdir().unwrap();
        let (md, ts) = small();
        let a: Vec<u8> = (0..16).collect();
        let b: Vec<u8> = (0..68).map(|i| i as u8 ^ 0x5a).collect();
        let whole = dir.path().join("whole.gguf");
        let mut w = GgufWriter::create(&whole, &md, &ts).unwrap();
        w.write_tensor("a", &a).unwrap();
        w.write_tensor("b", &b).unwrap();
        w.finish().unwrap();
        let parts = dir.path().join("parts.gguf");
        let mut w = GgufWriter::create(&parts, &md, &ts).unwrap();
        w.write_tensor_streamed("a", 16, |out| out.write_all(&a))
            .unwrap();
        w.write_tensor_streamed("b", 68, |out| {
            for piece in b.chunks(7) {
                out.write_all(piece)?;
            }
            Ok(())
        })
        .unwrap();
        w.finish().unwrap();
        assert_eq!(
            std::fs::read(&whole).unwrap(),
            std::fs::read(&parts).unwrap()
        );
    }

    #[test]
    fn streamed_tensor_short_or_failed_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        let (md, ts) = small();
        let mut w = GgufWriter::create(&p, &md, &ts).unwrap();
        let e = w
            .write_tensor_streamed("a", 16, |out| out.write_all(&[1; 15]))
            .unwrap_err();
        assert!(
            e.to_string().contains("15 bytes written, expected 16"),
            "{e}"
        );
        assert!(w.write_tensor("b", &[0; 68]).is_err());
        assert!(w.finish().is_err());
        assert!(empty_dir(dir.path()));

        let mut w = GgufWriter::create(&p, &md, &ts).unwrap();
        let e = w
            .write_tensor_streamed("a", 16, |_| Err(std::io::Error::other("producer failed")))
            .unwrap_err();
        assert!(e.to_string().contains("producer failed"), "{e}");
        drop(w);
        assert!(empty_dir(dir.path()));
    }

    #[test]
    fn custom_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        let (mut md, ts) = small();
        md.push((s(ALIGNMENT_KEY), GgufValue::U32(128)));
        let mut w = GgufWriter::create(&p, &md, &ts).unwrap();
        assert_eq!(w.tensor_infos()[1].offset, 128);
        w.write_tensor("a", &[0; 16]).unwrap();
        w.write_tensor("b", &[0; 68]).unwrap();
        w.finish().unwrap();
        let f = GgufFile::open(&p).unwrap();
        assert_eq!((f.alignment, f.data_offset % 128), (128, 0));
        assert_eq!(f.file_size(), f.data_offset + 256);
    }

    #[test]
    fn wrong_order_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        let (md, ts) = small();
        let mut w = GgufWriter::create(&p, &md, &ts).unwrap();
        let e = w.write_tensor("b", &[0; 68]).unwrap_err();
        assert!(
            matches!(e.kind(), GgufError::TensorOrder { expected, found } if expected == "a" && found == "b"),
            "{e}"
        );
        assert!(e.to_string().contains("m.gguf"), "{e}");
        drop(w);
        assert!(empty_dir(dir.path()));
    }

    #[test]
    fn wrong_size_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        let (md, ts) = small();
        let mut w = GgufWriter::create(&p, &md, &ts).unwrap();
        let e = w.write_tensor("a", &[0; 15]).unwrap_err();
        assert!(matches!(
            e.kind(),
            GgufError::TensorSize {
                expected: 16,
                found: 15,
                ..
            }
        ));
        // A rejected call wrote nothing: the right data can still follow.
        w.write_tensor("a", &[0; 16]).unwrap();
        let e = w.write_tensor("b", &[0; 69]).unwrap_err();
        assert!(matches!(e.kind(), GgufError::TensorSize { .. }));
        drop(w);
        assert!(empty_dir(dir.path()));
    }

    #[test]
    fn missing_or_extra_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        let (md, ts) = small();
        let mut w = GgufWriter::create(&p, &md, &ts).unwrap();
        w.write_tensor("a", &[0; 16]).unwrap();
        let e = w.finish().unwrap_err();
        assert!(
            matches!(e.kind(), GgufError::MissingTensors { written: 1, expected: 2, next } if next == "b"),
            "{e}"
        );
        assert!(empty_dir(dir.path()));

        let mut w = GgufWriter::create(&p, &md, &ts).unwrap();
        w.write_tensor("a", &[0; 16]).unwrap();
        w.write_tensor("b", &[0; 68]).unwrap();
        let e = w.write_tensor("c", &[]).unwrap_err();
        assert!(matches!(e.kind(), GgufError::ExtraTensor { .. }));
        w.finish().unwrap();
        assert!(p.exists());
    }

    #[test]
    fn invalid_inputs_are_refused_before_creating_anything() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        let t = |n: &str, shape: Vec<u64>, ty| vec![(s(n), shape, ty)];
        let md = |k: &str, v| vec![(s(k), v)];
        type Case = (Vec<(String, GgufValue)>, Vec<TensorSpec>);
        let cases: Vec<Case> = vec![
            (md("", GgufValue::U8(0)), vec![]),
            (
                vec![(s("k"), GgufValue::U8(0)), (s("k"), GgufValue::U8(1))],
                vec![],
            ),
            (md(ALIGNMENT_KEY, GgufValue::U32(24)), vec![]),
            (md(ALIGNMENT_KEY, GgufValue::U32(0)), vec![]),
            (md(ALIGNMENT_KEY, GgufValue::U64(32)), vec![]),
            (vec![], t(&"n".repeat(64), vec![4], GgmlType::F32)),
            (vec![], t("w", vec![], GgmlType::F32)),
            (vec![], t("w", vec![1, 1, 1, 1, 1], GgmlType::F32)),
            (vec![], t("w", vec![16], GgmlType::Q4_0)),
            (vec![], t("w", vec![1 << 63], GgmlType::F32)),
            (vec![], t("w", vec![1 << 32, 1 << 32], GgmlType::F32)),
            (
                vec![],
                vec![
                    (s("w"), vec![4], GgmlType::F32),
                    (s("w"), vec![4], GgmlType::F32),
                ],
            ),
        ];
        for (md, ts) in cases {
            let e = GgufWriter::create(&p, &md, &ts).unwrap_err();
            assert!(e.to_string().contains("m.gguf"), "{e}");
            assert!(serialize_header(&md, &ts).is_err());
            assert!(empty_dir(dir.path()));
        }
    }

    #[test]
    fn tensor_copied_from_a_file_equals_written_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.bin");
        std::fs::write(&src, (0u8..=255).cycle().take(1000).collect::<Vec<u8>>()).unwrap();
        let meta = vec![];
        let infos = vec![("t".to_string(), vec![10u64], GgmlType::F32)];
        let (a, b) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
        let mut w = GgufWriter::create(&a, &meta, &infos).unwrap();
        w.write_tensor_from_file("t", &std::fs::File::open(&src).unwrap(), 100, 40)
            .unwrap();
        w.finish().unwrap();
        let mut w = GgufWriter::create(&b, &meta, &infos).unwrap();
        w.write_tensor("t", &std::fs::read(&src).unwrap()[100..140])
            .unwrap();
        w.finish().unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        // A source too short is an error and leaves nothing behind.
        let c = dir.path().join("c.gguf");
        let mut w = GgufWriter::create(&c, &meta, &infos).unwrap();
        assert!(w
            .write_tensor_from_file("t", &std::fs::File::open(&src).unwrap(), 990, 40)
            .is_err());
        drop(w);
        assert!(!c.exists());
    }

    #[test]
    fn tee_sees_every_byte_of_the_file_in_order() {
        use std::sync::{Arc, Mutex};
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.bin");
        std::fs::write(&src, (0u8..=255).cycle().take(5000).collect::<Vec<u8>>()).unwrap();
        let (meta, _) = small();
        let infos = vec![
            ("a".to_string(), vec![3u64], GgmlType::F32),
            ("b".to_string(), vec![1000u64], GgmlType::F32),
        ];
        let p = dir.path().join("t.gguf");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = Arc::clone(&seen);
        let tee: Tee = Box::new(move |b: &[u8]| s2.lock().unwrap().extend_from_slice(b));
        let mut w = GgufWriter::create_with_tee(&p, &meta, &infos, tee).unwrap();
        w.write_tensor("a", &[7u8; 12]).unwrap();
        w.write_tensor_from_file("b", &std::fs::File::open(&src).unwrap(), 3, 4000)
            .unwrap();
        w.finish().unwrap();
        assert_eq!(*seen.lock().unwrap(), std::fs::read(&p).unwrap());
    }

    #[test]
    fn empty_arrays_and_strings_are_written() {
        let md = vec![
            (s("e"), GgufValue::Array(GgufArray::String(vec![]))),
            (s("s"), GgufValue::String(String::new())),
        ];
        let bytes = serialize_header(&md, &[]).unwrap();
        let h = super::super::GgufHeader::parse(&bytes).unwrap();
        assert_eq!(h.metadata, md);
    }

    /// Writes a file with kiln and reads it with the Python `gguf` package (a visible skip if missing,
    /// a failure under `KILN_REQUIRE_INTEROP=1`).
    #[test]
    fn python_gguf_reads_our_files() {
        let probe = std::process::Command::new("python3")
            .args(["-c", "import gguf"])
            .output();
        if !matches!(probe, Ok(ref o) if o.status.success()) {
            crate::torch::tests::skip(
                "python3 with the gguf package",
                crate::torch::tests::HOW_PYTHON,
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("py.gguf");
        let md = vec![
            (s("general.architecture"), GgufValue::String(s("llama"))),
            (s("llama.block_count"), GgufValue::U32(2)),
            (s("llama.rope.freq_base"), GgufValue::F32(10000.0)),
            (s("t.i64"), GgufValue::I64(-5)),
            (s("t.bool"), GgufValue::Bool(true)),
            (s("t.f64"), GgufValue::F64(0.25)),
            (
                s("tokenizer.ggml.tokens"),
                GgufValue::Array(GgufArray::String(vec![s("<unk>"), s("▁你好"), s("")])),
            ),
            (
                s("tokenizer.ggml.token_type"),
                GgufValue::Array(GgufArray::I32(vec![2, 1, 1])),
            ),
        ];
        let ts = vec![
            (s("a"), vec![2], GgmlType::F32),
            (s("b"), vec![3, 1], GgmlType::F16),
            (s("q"), vec![32, 2], GgmlType::Q8_0),
        ];
        let mut w = GgufWriter::create(&p, &md, &ts).unwrap();
        w.write_tensor("a", &[0, 0, 0x80, 0x3f, 0, 0, 0, 0x40])
            .unwrap();
        w.write_tensor("b", &[0x00, 0x3c, 0x00, 0x40, 0x00, 0x42])
            .unwrap();
        let q: Vec<u8> = (0..68).map(|i| i as u8).collect();
        w.write_tensor("q", &q).unwrap();
        w.finish().unwrap();

        let script = r#"
import sys, json, gguf
r = gguf.GGUFReader(sys.argv[1])
out = {"fields": {}, "tensors": [], "alignment": int(r.alignment), "data_offset": int(r.data_offset)}
for k, f in r.fields.items():
    if k.startswith("GGUF."):
        continue
    out["fields"][k] = f.contents()
for t in r.tensors:
    out["tensors"].append([t.name, int(t.tensor_type), [int(x) for x in t.shape], int(t.data_offset), t.data.tobytes().hex()])
print(json.dumps(out, ensure_ascii=False))
"#;
        let o = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&p)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let fields = &got["fields"];
        for (k, v) in &md {
            assert_eq!(&fields[k], &v.to_json(), "field {k}");
        }
        assert_eq!(fields.as_object().unwrap().len(), md.len());
        let f = GgufFile::open(&p).unwrap();
        assert_eq!(got["alignment"], 32);
        assert_eq!(got["data_offset"], f.data_offset);
        let tensors = got["tensors"].as_array().unwrap();
        assert_eq!(tensors.len(), 3);
        for (t, py) in f.tensors.iter().zip(tensors) {
            assert_eq!(py[0], t.name.as_str());
            assert_eq!(py[1], t.ty.id());
            assert_eq!(py[2], serde_json::json!(t.shape));
            assert_eq!(py[3], f.data_offset + t.offset);
            let hex: String = f
                .tensor_data(t)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(py[4], hex.as_str(), "tensor {}", t.name);
        }
    }
}
