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

/// A GGUF file being written: header at creation, then every tensor's data in header order.
/// Nothing appears at the output path until [`GgufWriter::finish`] succeeds.
pub struct GgufWriter {
    out: BufWriter<AtomicFile>,
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
        let (header, infos, alignment) = build(metadata, tensors).map_err(|e| e.in_file(path))?;
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = AtomicFile::create(path).map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
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
        if data.len() as u64 != n_bytes {
            return Err(GgufError::TensorSize {
                tensor: name.to_owned(),
                expected: n_bytes,
                found: data.len() as u64,
            }
            .in_file(&self.path));
        }
        let mut pad = pad_to(n_bytes, self.alignment).unwrap_or(n_bytes) - n_bytes;
        let mut result = self.out.write_all(data);
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
        let file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        file.commit().map_err(io)
    }
}
