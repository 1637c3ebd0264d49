//! The validating GGUF reader: parses and checks a whole header against the file's size
//! (every check of ggml's gguf.cpp, plus UTF-8, bool and n_dims checks), and maps files.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use kiln_quant::GgmlType;

use super::value::{GgufArray, GgufValue, GgufValueType};
use super::{
    pad_to, GgufError, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, MAX_ARRAY_LEN,
    MAX_DIMS, MAX_NAME_LEN, MAX_STRING_LEN,
};
use crate::mmap::MappedFile;

/// Smallest possible encoded KV pair: key length, a 1-byte key, type id, a 1-byte value.
const MIN_KV_BYTES: u64 = 8 + 1 + 4 + 1;
/// Smallest possible encoded tensor info: name length, n_dims, one ne, type id, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// One tensor's description from the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml `ne`, innermost (contiguous) dimension first, exactly as stored (1 to 4 entries).
    pub shape: Vec<u64>,
    pub ty: GgmlType,
    /// Byte offset relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements (product of the shape).
    pub fn n_elements(&self) -> u64 {
        self.shape.iter().fold(1u64, |a, &d| a.saturating_mul(d))
    }

    /// Number of rows: the product of every dimension but the first.
    pub fn n_rows(&self) -> u64 {
        self.shape
            .iter()
            .skip(1)
            .fold(1u64, |a, &d| a.saturating_mul(d))
    }

    /// Elements per row (`ne[0]`).
    pub fn row_len(&self) -> u64 {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Bytes of the tensor's data: `(ne0 / block) * type_size * rows`.
    pub fn n_bytes(&self) -> u64 {
        let blocks = self.row_len() / self.ty.block_size() as u64;
        blocks
            .saturating_mul(self.ty.type_size() as u64)
            .saturating_mul(self.n_rows())
    }
}

/// Checks a tensor's name length, rank, dimensions, element count and block divisibility the way
/// ggml does, and returns its size in bytes.
pub(crate) fn check_tensor(name: &str, shape: &[u64], ty: GgmlType) -> Result<u64, GgufError> {
    if name.len() >= MAX_NAME_LEN {
        return Err(GgufError::TensorNameTooLong {
            name: name.to_owned(),
            len: name.len(),
            max: MAX_NAME_LEN,
        });
    }
    if shape.is_empty() || shape.len() > MAX_DIMS {
        return Err(GgufError::BadDimCount {
            tensor: name.to_owned(),
            n_dims: shape.len() as u64,
            max: MAX_DIMS,
        });
    }
    for (dim, &value) in shape.iter().enumerate() {
        if value > i64::MAX as u64 {
            return Err(GgufError::BadDimension {
                tensor: name.to_owned(),
                dim,
                value,
            });
        }
    }
    let too_many = || GgufError::TooManyElements {
        tensor: name.to_owned(),
        shape: shape.to_vec(),
    };
    let n = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(too_many)?;
    if n >= i64::MAX as u64 {
        return Err(too_many());
    }
    let ne0 = shape.first().copied().unwrap_or(1);
    let block = ty.block_size() as u64;
    if ne0 % block != 0 {
        return Err(GgufError::NotBlockMultiple {
            tensor: name.to_owned(),
            ty,
            ne0,
            block_size: block,
        });
    }
    // n < 2^63 and type_size <= block * 4 bytes, so this cannot overflow; check anyway.
    (n / block)
        .checked_mul(ty.type_size() as u64)
        .ok_or_else(|| GgufError::Overflow {
            what: format!("tensor '{name}' data"),
        })
}

/// Checks `general.alignment` (if present) and returns the alignment to use.
pub(crate) fn alignment_of(metadata: &[(String, GgufValue)]) -> Result<u64, GgufError> {
    match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => Ok(DEFAULT_ALIGNMENT),
        Some((_, GgufValue::U32(a))) if a.is_power_of_two() => Ok(u64::from(*a)),
        Some((_, GgufValue::U32(a))) => Err(GgufError::BadAlignment {
            alignment: u64::from(*a),
        }),
        Some((k, v)) => Err(GgufError::WrongValueType {
            key: k.clone(),
            expected: GgufValueType::U32,
            found: v.value_type(),
        }),
    }
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        self.buf.len().saturating_sub(self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        let rest = self.buf.get(self.pos..).unwrap_or(&[]);
        let slice = usize::try_from(n)
            .ok()
            .and_then(|n| rest.get(..n))
            .ok_or_else(|| GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                needed: n,
                available: rest.len() as u64,
            })?;
        self.pos += slice.len();
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A gguf-string: u64 length (capped and checked against the remaining bytes before any
    /// allocation), then UTF-8 bytes.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        if len > MAX_STRING_LEN {
            return Err(GgufError::StringTooLong {
                what: what(),
                len,
                max: MAX_STRING_LEN,
            });
        }
        let offset = self.pos as u64;
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(GgufError::InvalidUtf8 {
                what: what(),
                offset,
            }),
        }
    }

    fn bool(&mut self, key: &str) -> Result<bool, GgufError> {
        let offset = self.pos as u64;
        let [b] = self.array::<1>(&|| format!("bool value of '{key}'"))?;
        match b {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(GgufError::InvalidBool {
                key: key.to_owned(),
                offset,
                value,
            }),
        }
    }

    fn scalar(&mut self, ty: GgufValueType, key: &str) -> Result<GgufValue, GgufError> {
        let w = || format!("value of '{key}'");
        Ok(match ty {
            GgufValueType::U8 => GgufValue::U8(u8::from_le_bytes(self.array(&w)?)),
            GgufValueType::I8 => GgufValue::I8(i8::from_le_bytes(self.array(&w)?)),
            GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.array(&w)?)),
            GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.array(&w)?)),
            GgufValueType::U32 => GgufValue::U32(u32::from_le_bytes(self.array(&w)?)),
            GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.array(&w)?)),
            GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.array(&w)?)),
            GgufValueType::U64 => GgufValue::U64(u64::from_le_bytes(self.array(&w)?)),
            GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.array(&w)?)),
            GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.array(&w)?)),
            GgufValueType::Bool => GgufValue::Bool(self.bool(key)?),
            GgufValueType::String => GgufValue::String(self.string(&w)?),
            GgufValueType::Array => {
                let elem_id = self.u32(&|| format!("array element type of '{key}'"))?;
                let elem = match GgufValueType::from_id(elem_id) {
                    Some(GgufValueType::Array) => {
                        return Err(GgufError::NestedArray {
                            key: key.to_owned(),
                        })
                    }
                    Some(t) => t,
                    None => {
                        return Err(GgufError::UnknownValueType {
                            key: key.to_owned(),
                            type_id: elem_id,
                        })
                    }
                };
                let count = self.u64(&|| format!("array length of '{key}'"))?;
                GgufValue::Array(self.array_value(elem, count, key)?)
            }
        })
    }

    fn array_value(
        &mut self,
        elem: GgufValueType,
        count: u64,
        key: &str,
    ) -> Result<GgufArray, GgufError> {
        if count > MAX_ARRAY_LEN {
            return Err(GgufError::ArrayTooLong {
                key: key.to_owned(),
                count,
                max: MAX_ARRAY_LEN,
            });
        }
        // Every element takes at least this many bytes (strings: their u64 length).
        let min_size = elem.fixed_size().unwrap_or(8) as u64;
        let needed = count.saturating_mul(min_size);
        if needed > self.remaining() {
            return Err(GgufError::Truncated {
                what: format!("{count} elements of array '{key}'"),
                offset: self.pos as u64,
                needed,
                available: self.remaining(),
            });
        }
        let w = || format!("elements of array '{key}'");
        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                const N: usize = std::mem::size_of::<$t>();
                let bytes = self.take(needed, &w)?;
                GgufArray::$variant(
                    bytes
                        .chunks_exact(N)
                        .map(|c| {
                            let mut a = [0u8; N];
                            a.copy_from_slice(c);
                            <$t>::from_le_bytes(a)
                        })
                        .collect(),
                )
            }};
        }
        Ok(match elem {
            GgufValueType::U8 => fixed!(U8, u8),
            GgufValueType::I8 => fixed!(I8, i8),
            GgufValueType::U16 => fixed!(U16, u16),
            GgufValueType::I16 => fixed!(I16, i16),
            GgufValueType::U32 => fixed!(U32, u32),
            GgufValueType::I32 => fixed!(I32, i32),
            GgufValueType::F32 => fixed!(F32, f32),
            GgufValueType::U64 => fixed!(U64, u64),
            GgufValueType::I64 => fixed!(I64, i64),
            GgufValueType::F64 => fixed!(F64, f64),
            GgufValueType::Bool => {
                let mut v = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    v.push(self.bool(key)?);
                }
                GgufArray::Bool(v)
            }
            GgufValueType::String => {
                let mut v = Vec::with_capacity(count as usize);
                for i in 0..count {
                    v.push(self.string(&|| format!("element {i} of array '{key}'"))?);
                }
                GgufArray::String(v)
            }
            GgufValueType::Array => {
                return Err(GgufError::NestedArray {
                    key: key.to_owned(),
                })
            }
        })
    }
}

/// A parsed and validated GGUF header.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, GgufValue)>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    /// `general.alignment`, or 32.
    pub alignment: u64,
    /// Absolute file offset of the data section. As in ggml, it is the end of the tensor infos
    /// padded to the alignment, except that a file with no tensors gets no padding.
    pub data_offset: u64,
}

impl GgufHeader {
    /// Parses and validates a whole file's bytes: header structure, every limit ggml checks, and
    /// that every tensor's data lies inside `bytes`. Never panics, and allocates no more than a
    /// small multiple of `bytes.len()`.
    pub fn parse(bytes: &[u8]) -> Result<GgufHeader, GgufError> {
        let mut c = Cursor { buf: bytes, pos: 0 };
        let magic = c.array::<4>(&|| "magic".into())?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = c.u32(&|| "version".into())?;
        if version == 0 {
            return Err(GgufError::UnsupportedVersion { version });
        }
        if version & 0xFFFF == 0 {
            return Err(GgufError::WrongEndianness { version });
        }
        // v1 used u32 lengths and is gone from ggml; v2 and v3 share one layout (v3 only added
        // big-endian files, which are detected above), and ggml still reads v2.
        if version == 1 || version > GGUF_VERSION {
            return Err(GgufError::UnsupportedVersion { version });
        }
        let n_tensors = c.u64(&|| "tensor count".into())?;
        let n_kv = c.u64(&|| "metadata count".into())?;
        let remaining = c.remaining();
        for (what, count, min) in [
            ("n_tensors", n_tensors, MIN_TENSOR_INFO_BYTES),
            ("n_kv", n_kv, MIN_KV_BYTES),
        ] {
            let max = remaining / min;
            if count > max {
                return Err(GgufError::CountTooLarge {
                    what,
                    count,
                    max,
                    remaining,
                });
            }
        }

        // Both counts are now bounded by the file size, so these capacities are safe.
        let mut metadata: Vec<(String, GgufValue)> = Vec::with_capacity(n_kv as usize);
        let mut keys: HashSet<String> = HashSet::with_capacity(n_kv as usize);
        for index in 0..n_kv {
            let key = c.string(&|| format!("metadata key {index}"))?;
            if key.is_empty() {
                return Err(GgufError::EmptyKey { index });
            }
            if !keys.insert(key.clone()) {
                return Err(GgufError::DuplicateKey { key });
            }
            let type_id = c.u32(&|| format!("value type of '{key}'"))?;
            let ty = GgufValueType::from_id(type_id)
                .ok_or_else(|| GgufError::UnknownValueType {
                    key: key.clone(),
                    type_id,
                })?;
            let value = c.scalar(ty, &key)?;
            metadata.push((key, value));
        }
        let alignment = alignment_of(&metadata)?;

        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors as usize);
        let mut names: HashSet<String> = HashSet::with_capacity(n_tensors as usize);
        for index in 0..n_tensors {
            let name = c.string(&|| format!("name of tensor {index}"))?;
            if name.len() >= MAX_NAME_LEN {
                return Err(GgufError::TensorNameTooLong {
                    len: name.len(),
                    name,
                    max: MAX_NAME_LEN,
                });
            }
            if !names.insert(name.clone()) {
                return Err(GgufError::DuplicateTensor { name });
            }
            let n_dims = c.u32(&|| format!("n_dims of tensor '{name}'"))?;
            if n_dims == 0 || n_dims as usize > MAX_DIMS {
                return Err(GgufError::BadDimCount {
                    tensor: name,
                    n_dims: n_dims.into(),
                    max: MAX_DIMS,
                });
            }
            let mut shape = Vec::with_capacity(n_dims as usize);
            for dim in 0..n_dims {
                shape.push(c.u64(&|| format!("dimension {dim} of tensor '{name}'"))?);
            }
            let type_id = c.u32(&|| format!("type of tensor '{name}'"))?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
                tensor: name.clone(),
                type_id,
            })?;
            check_tensor(&name, &shape, ty)?;
            let offset = c.u64(&|| format!("data offset of tensor '{name}'"))?;
            tensors.push(TensorInfo {
                name,
                shape,
                ty,
                offset,
            });
        }

        let header_end = c.pos as u64;
        let file_size = bytes.len() as u64;
        let data_offset = if tensors.is_empty() {
            header_end
        } else {
            pad_to(header_end, alignment).ok_or_else(|| GgufError::Overflow {
                what: "data section offset".into(),
            })?
        };
        if data_offset > file_size {
            return Err(GgufError::DataSectionOutOfFile {
                data_offset,
                file_size,
            });
        }
        let mut expected = 0u64;
        for t in &tensors {
            if t.offset != expected {
                return Err(GgufError::BadOffset {
                    tensor: t.name.clone(),
                    expected,
                    found: t.offset,
                });
            }
            let n_bytes = t.n_bytes();
            let overflow = || GgufError::Overflow {
                what: format!("data section at tensor '{}'", t.name),
            };
            let start = data_offset.checked_add(t.offset).ok_or_else(overflow)?;
            let end = start.checked_add(n_bytes).ok_or_else(overflow)?;
            if end > file_size {
                return Err(GgufError::TensorOutOfFile {
                    tensor: t.name.clone(),
                    start,
                    end,
                    file_size,
                });
            }
            expected = pad_to(n_bytes, alignment)
                .and_then(|p| expected.checked_add(p))
                .ok_or_else(overflow)?;
        }

        Ok(GgufHeader {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    /// The value of metadata key `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// A memory-mapped, validated GGUF file.
pub struct GgufFile {
    pub header: GgufHeader,
    map: MappedFile,
    path: PathBuf,
}

impl GgufFile {
    /// Maps and validates `path`; errors name the file.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let map = MappedFile::open(path).map_err(|source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let header = GgufHeader::parse(map.bytes()).map_err(|e| e.in_file(path))?;
        Ok(GgufFile {
            header,
            map,
            path: path.to_path_buf(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size in bytes.
    pub fn file_size(&self) -> u64 {
        self.map.bytes().len() as u64
    }

    fn span(&self, t: &TensorInfo) -> Option<(usize, usize)> {
        let start = self.header.data_offset.checked_add(t.offset)?;
        let end = start.checked_add(t.n_bytes())?;
        Some((usize::try_from(start).ok()?, usize::try_from(end).ok()?))
    }

    /// The bytes of tensor `t` (one of this file's infos). A `TensorInfo` that does not fit this
    /// file (e.g. from another file) yields an empty slice.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        self.span(t)
            .and_then(|(s, e)| self.map.bytes().get(s..e))
            .unwrap_or(&[])
    }

    /// Drops the resident pages of tensor `t`'s data (after it has been consumed).
    pub fn release(&self, t: &TensorInfo) {
        if let Some((s, e)) = self.span(t) {
            self.map.release(s, e - s);
        }
    }
}

impl std::ops::Deref for GgufFile {
    type Target = GgufHeader;
    fn deref(&self) -> &GgufHeader {
        &self.header
    }
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("file_size", &self.file_size())
            .field("version", &self.header.version)
            .field("n_kv", &self.header.metadata.len())
            .field("n_tensors", &self.header.tensors.len())
            .finish()
    }
}
