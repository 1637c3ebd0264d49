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
    /// Byte offset relative to the start of the data section of its file.
    pub offset: u64,
    /// Which file of a split set holds the data (0 in a single file).
    pub part: u16,
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
            let ty =
                GgufValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
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
                part: 0,
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
    /// The header of the file (of a split set: the first file's metadata and every file's
    /// tensors, each tagged with its [`TensorInfo::part`]).
    pub header: GgufHeader,
    parts: Vec<Part>,
}

/// One mapped file of a [`GgufFile`].
struct Part {
    map: MappedFile,
    data_offset: u64,
    path: PathBuf,
}

fn map_part(path: &Path) -> Result<(MappedFile, GgufHeader), GgufError> {
    let map = MappedFile::open(path).map_err(|source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let header = GgufHeader::parse(map.bytes()).map_err(|e| e.in_file(path))?;
    Ok((map, header))
}

fn split_err(path: &Path, reason: String) -> GgufError {
    GgufError::SplitSet { reason }.in_file(path)
}

impl GgufFile {
    /// Maps and validates `path`; errors name the file. The first file of a split set
    /// (`split.count` > 1, as llama-gguf-split writes them) opens the whole set, as llama.cpp's
    /// loader does: the other files by name, each checked (`split.no`, alignment, no tensor twice,
    /// `split.tensors.count`).
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        use super::split::{split_path, split_prefix, SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS_COUNT};
        let (map, mut header) = map_part(path)?;
        let count = header
            .get(SPLIT_COUNT)
            .and_then(GgufValue::as_u64)
            .unwrap_or(0);
        let no = header
            .get(SPLIT_NO)
            .and_then(GgufValue::as_u64)
            .unwrap_or(0);
        let mut parts = vec![Part {
            data_offset: header.data_offset,
            map,
            path: path.to_path_buf(),
        }];
        if count <= 1 {
            return Ok(GgufFile { header, parts });
        }
        let n = usize::try_from(count).unwrap_or(usize::MAX);
        if n > super::split::MAX_SPLITS {
            return Err(split_err(
                path,
                format!("{SPLIT_COUNT} = {count} is too large"),
            ));
        }
        if no != 0 {
            return Err(split_err(
                path,
                format!("this is file {} of {n}; open the set's first file", no + 1),
            ));
        }
        let prefix = split_prefix(path, 0, n).ok_or_else(|| {
            split_err(
                path,
                format!("the first of {n} files must be named PREFIX-00001-of-{n:05}.gguf"),
            )
        })?;
        let mut names: HashSet<String> = header.tensors.iter().map(|t| t.name.clone()).collect();
        for i in 1..n {
            let p = split_path(&prefix, i, n);
            let (map, h) = map_part(&p)?;
            let got = h.get(SPLIT_NO).and_then(GgufValue::as_u64);
            if got != Some(i as u64) {
                return Err(split_err(
                    &p,
                    format!("{SPLIT_NO} is {got:?}, expected {i} (files of different sets?)"),
                ));
            }
            if h.alignment != header.alignment {
                return Err(split_err(
                    &p,
                    format!(
                        "alignment {} differs from the first file's {}",
                        h.alignment, header.alignment
                    ),
                ));
            }
            for mut t in h.tensors {
                if !names.insert(t.name.clone()) {
                    return Err(split_err(
                        &p,
                        format!("tensor '{}' is in two files", t.name),
                    ));
                }
                t.part = i as u16;
                header.tensors.push(t);
            }
            parts.push(Part {
                data_offset: h.data_offset,
                map,
                path: p,
            });
        }
        if let Some(want) = header.get(SPLIT_TENSORS_COUNT).and_then(GgufValue::as_u64) {
            if want != header.tensors.len() as u64 {
                return Err(split_err(
                    path,
                    format!(
                        "{SPLIT_TENSORS_COUNT} is {want} but the {n} files hold {} tensors",
                        header.tensors.len()
                    ),
                ));
            }
        }
        Ok(GgufFile { header, parts })
    }

    /// The file's path (of a split set: its first file).
    pub fn path(&self) -> &Path {
        &self.parts[0].path
    }

    /// The files read: one, or every file of a split set in order.
    pub fn paths(&self) -> Vec<&Path> {
        self.parts.iter().map(|p| p.path.as_path()).collect()
    }

    /// The size in bytes (of a split set: all its files).
    pub fn file_size(&self) -> u64 {
        self.parts.iter().map(|p| p.map.bytes().len() as u64).sum()
    }

    fn span(&self, t: &TensorInfo) -> Option<(&Part, usize, usize)> {
        let part = self.parts.get(usize::from(t.part))?;
        let start = part.data_offset.checked_add(t.offset)?;
        let end = start.checked_add(t.n_bytes())?;
        Some((
            part,
            usize::try_from(start).ok()?,
            usize::try_from(end).ok()?,
        ))
    }

    /// Where tensor `t`'s data lies: the file holding it and the absolute offset there.
    pub fn tensor_location(&self, t: &TensorInfo) -> Option<(&Path, u64)> {
        let (part, s, _) = self.span(t)?;
        Some((&part.path, s as u64))
    }

    /// The bytes of tensor `t` (one of this file's infos). A `TensorInfo` that does not fit this
    /// file (e.g. from another file) yields an empty slice.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        self.span(t)
            .and_then(|(p, s, e)| p.map.bytes().get(s..e))
            .unwrap_or(&[])
    }

    /// Drops the resident pages of tensor `t`'s data (after it has been consumed).
    pub fn release(&self, t: &TensorInfo) {
        if let Some((p, s, e)) = self.span(t) {
            p.map.release(s, e - s);
        }
    }

    /// Drops the resident pages of bytes `from..to` of tensor `t`'s data (a part already consumed
    /// by a pass that goes through a large tensor in chunks). Out-of-range spans are clipped.
    pub fn release_part(&self, t: &TensorInfo, from: u64, to: u64) {
        if let Some((p, s, e)) = self.span(t) {
            let a = s
                .saturating_add(usize::try_from(from).unwrap_or(usize::MAX))
                .min(e);
            let b = s
                .saturating_add(usize::try_from(to).unwrap_or(usize::MAX))
                .min(e);
            if a < b {
                p.map.release(a, b - a);
            }
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
            .field("paths", &self.paths())
            .field("file_size", &self.file_size())
            .field("version", &self.header.version)
            .field("n_kv", &self.header.metadata.len())
            .field("n_tensors", &self.header.tensors.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{example_bytes, parse_err, Raw};
    use super::*;

    const F32: u32 = 0;
    const Q4_0: u32 = 2;

    /// One F32 tensor of `n` elements at offset 0, no metadata.
    fn one_tensor(n: u64) -> Raw {
        Raw::header(3, 1, 0)
            .tensor("w", &[n], F32, 0)
            .pad_data(32, 4 * n as usize)
    }

    #[test]
    fn valid_minimal_files_parse() {
        let h = GgufHeader::parse(&one_tensor(4).0).unwrap();
        assert_eq!(h.data_offset, 64);
        assert_eq!(h.tensors[0].n_bytes(), 16);
        // No tensors: ggml puts the data section right after the header, unpadded.
        let h = GgufHeader::parse(&Raw::header(3, 0, 1).kv_u32("x", 7).0).unwrap();
        assert_eq!(h.data_offset, 24 + 8 + 1 + 4 + 4);
        assert_eq!(h.get("x"), Some(&GgufValue::U32(7)));
        // A zero-element tensor is fine.
        let h = GgufHeader::parse(
            &Raw::header(3, 1, 0)
                .tensor("z", &[0, 5], F32, 0)
                .pad_data(32, 0)
                .0,
        )
        .unwrap();
        assert_eq!(h.tensors[0].n_bytes(), 0);
    }

    #[test]
    fn truncation_at_every_offset() {
        let full = example_bytes();
        // Tensor b's data ends at 0xe6; only its trailing padding may be cut (ggml, like us,
        // requires only that each tensor's data lies inside the file).
        for len in 0..full.len() {
            let r = GgufHeader::parse(&full[..len]);
            if len < 0xe6 {
                assert!(r.is_err(), "prefix of {len} bytes parsed");
            } else {
                assert!(r.is_ok(), "prefix of {len} bytes failed: {r:?}");
            }
        }
        let e = parse_err(&full[..0xe5]);
        assert!(
            matches!(e, GgufError::TensorOutOfFile { ref tensor, end: 0xe6, .. } if tensor == "b"),
            "{e}"
        );
        let e = parse_err(&full[..0x5a]);
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("metadata key 1"), "{e}");
        let e = parse_err(&full[..0x50]);
        assert!(
            matches!(
                e,
                GgufError::CountTooLarge {
                    what: "n_tensors",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn bad_magic() {
        let mut b = one_tensor(4).0;
        b[3] = b'X';
        assert!(matches!(parse_err(&b), GgufError::BadMagic { found } if &found == b"GGUX"));
        assert!(matches!(parse_err(b"GG"), GgufError::Truncated { .. }));
    }

    #[test]
    fn versions() {
        for v in [0u32, 1, 4, 0xffff_ffff] {
            let e = parse_err(&Raw::header(v, 0, 0).0);
            assert!(
                matches!(e, GgufError::UnsupportedVersion { version } if version == v),
                "{v}: {e}"
            );
        }
        // Version 2 has the v3 layout and ggml still reads it, so kiln does too.
        assert_eq!(
            GgufHeader::parse(&Raw::header(2, 0, 0).0).unwrap().version,
            2
        );
        // A big-endian v3 file reads its version as 0x03000000.
        let e = parse_err(&Raw::header(0x0300_0000, 0, 0).0);
        assert!(matches!(e, GgufError::WrongEndianness { .. }));
        assert!(e.to_string().contains("byte-swapped"));
    }

    #[test]
    fn huge_counts() {
        let e = parse_err(&Raw::header(3, u64::MAX, 0).0);
        assert!(
            matches!(
                e,
                GgufError::CountTooLarge {
                    what: "n_tensors",
                    ..
                }
            ),
            "{e}"
        );
        let e = parse_err(&Raw::header(3, 0, 1 << 40).bytes(&[0; 100]).0);
        assert!(
            matches!(
                e,
                GgufError::CountTooLarge {
                    what: "n_kv",
                    max: 7,
                    ..
                }
            ),
            "{e}"
        );
        let e = parse_err(&Raw::header(3, 4, 0).bytes(&[0; 100]).0);
        assert!(
            matches!(
                e,
                GgufError::CountTooLarge {
                    what: "n_tensors",
                    max: 3,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn huge_string_lengths() {
        for len in [u64::MAX, MAX_STRING_LEN + 1] {
            let b = Raw::header(3, 0, 1).u64(len).bytes(&[b'a'; 40]).0;
            assert!(matches!(parse_err(&b), GgufError::StringTooLong { len: l, .. } if l == len));
        }
        // Under the cap but longer than the file.
        let b = Raw::header(3, 0, 1).u64(1 << 20).bytes(&[b'a'; 40]).0;
        let e = parse_err(&b);
        assert!(
            matches!(
                e,
                GgufError::Truncated {
                    needed: 1048576,
                    available: 40,
                    ..
                }
            ),
            "{e}"
        );
        // A string value, likewise.
        let b = Raw::header(3, 0, 1).str(b"k").u32(8).u64(u64::MAX).0;
        assert!(matches!(parse_err(&b), GgufError::StringTooLong { .. }));
    }

    #[test]
    fn huge_array_counts() {
        let arr = |elem: u32, n: u64| {
            Raw::header(3, 0, 1)
                .str(b"k")
                .u32(9)
                .u32(elem)
                .u64(n)
                .bytes(&[0; 64])
                .0
        };
        let e = parse_err(&arr(0, u64::MAX));
        assert!(
            matches!(
                e,
                GgufError::ArrayTooLong {
                    count: u64::MAX,
                    ..
                }
            ),
            "{e}"
        );
        let e = parse_err(&arr(10, MAX_ARRAY_LEN + 1));
        assert!(matches!(e, GgufError::ArrayTooLong { .. }), "{e}");
        // Within the cap but more than the file holds: rejected before allocating.
        for elem in [0, 4, 8, 12] {
            let e = parse_err(&arr(elem, MAX_ARRAY_LEN));
            assert!(matches!(e, GgufError::Truncated { .. }), "{elem}: {e}");
        }
        // Strings need at least 8 bytes each: 9 fit in 64 bytes only if... they don't.
        assert!(matches!(parse_err(&arr(8, 9)), GgufError::Truncated { .. }));
    }

    #[test]
    fn alignment_checks() {
        for a in [0u32, 24, 3] {
            let b = Raw::header(3, 0, 1).kv_u32(ALIGNMENT_KEY, a).0;
            assert!(
                matches!(parse_err(&b), GgufError::BadAlignment { alignment } if alignment == a as u64)
            );
        }
        let b = Raw::header(3, 0, 1)
            .str(ALIGNMENT_KEY.as_bytes())
            .u32(10)
            .u64(32)
            .0;
        let e = parse_err(&b);
        assert!(
            matches!(
                e,
                GgufError::WrongValueType {
                    expected: GgufValueType::U32,
                    found: GgufValueType::U64,
                    ..
                }
            ),
            "{e}"
        );
        // A valid alignment moves the data section.
        let b = Raw::header(3, 1, 1)
            .kv_u32(ALIGNMENT_KEY, 64)
            .tensor("w", &[4], F32, 0)
            .pad_data(64, 16)
            .0;
        let h = GgufHeader::parse(&b).unwrap();
        assert_eq!((h.alignment, h.data_offset), (64, 128));
    }

    #[test]
    fn duplicate_and_empty_keys() {
        let b = Raw::header(3, 0, 2).kv_u32("a.b", 1).kv_u32("a.b", 2).0;
        assert!(matches!(parse_err(&b), GgufError::DuplicateKey { key } if key == "a.b"));
        let b = Raw::header(3, 0, 2).kv_u32("a", 1).kv_u32("", 2).0;
        assert!(matches!(parse_err(&b), GgufError::EmptyKey { index: 1 }));
    }

    #[test]
    fn duplicate_tensor_names() {
        let b = Raw::header(3, 2, 0)
            .tensor("w", &[4], F32, 0)
            .tensor("w", &[4], F32, 32)
            .pad_data(32, 64)
            .0;
        assert!(matches!(parse_err(&b), GgufError::DuplicateTensor { name } if name == "w"));
    }

    #[test]
    fn tensor_name_length() {
        let ok = "n".repeat(63);
        let b = Raw::header(3, 1, 0)
            .tensor(&ok, &[4], F32, 0)
            .pad_data(32, 16)
            .0;
        assert!(GgufHeader::parse(&b).is_ok());
        let long = "n".repeat(64);
        let b = Raw::header(3, 1, 0)
            .tensor(&long, &[4], F32, 0)
            .pad_data(32, 16)
            .0;
        assert!(matches!(
            parse_err(&b),
            GgufError::TensorNameTooLong {
                len: 64,
                max: 64,
                ..
            }
        ));
    }

    #[test]
    fn n_dims_out_of_range() {
        for dims in [&[][..], &[1, 1, 1, 1, 4][..]] {
            let b = Raw::header(3, 1, 0)
                .tensor("w", dims, F32, 0)
                .pad_data(32, 16)
                .0;
            let e = parse_err(&b);
            assert!(
                matches!(e, GgufError::BadDimCount { n_dims, .. } if n_dims == dims.len() as u64),
                "{e}"
            );
        }
        let b = Raw::header(3, 1, 0)
            .str(b"w")
            .u32(u32::MAX)
            .bytes(&[0; 64])
            .0;
        assert!(matches!(parse_err(&b), GgufError::BadDimCount { .. }));
        // Four dimensions are fine.
        let b = Raw::header(3, 1, 0)
            .tensor("w", &[2, 1, 2, 1], F32, 0)
            .pad_data(32, 16)
            .0;
        assert_eq!(
            GgufHeader::parse(&b).unwrap().tensors[0].shape,
            [2, 1, 2, 1]
        );
    }

    #[test]
    fn unknown_tensor_types() {
        for id in [4u32, 5, 9, 16, 29, 31, u32::MAX] {
            let b = Raw::header(3, 1, 0)
                .tensor("w", &[32], id, 0)
                .pad_data(32, 128)
                .0;
            let e = parse_err(&b);
            assert!(
                matches!(e, GgufError::UnknownTensorType { type_id, .. } if type_id == id),
                "{e}"
            );
        }
    }

    #[test]
    fn row_not_whole_blocks() {
        let b = Raw::header(3, 1, 0)
            .tensor("w", &[16, 2], Q4_0, 0)
            .pad_data(32, 64)
            .0;
        let e = parse_err(&b);
        assert!(
            matches!(
                e,
                GgufError::NotBlockMultiple {
                    ne0: 16,
                    block_size: 32,
                    ty: GgmlType::Q4_0,
                    ..
                }
            ),
            "{e}"
        );
        let b = Raw::header(3, 1, 0)
            .tensor("w", &[64, 2], Q4_0, 0)
            .pad_data(32, 72)
            .0;
        assert_eq!(GgufHeader::parse(&b).unwrap().tensors[0].n_bytes(), 72);
    }

    #[test]
    fn negative_and_overflowing_dimensions() {
        let b = Raw::header(3, 1, 0)
            .tensor("w", &[4, u64::MAX], F32, 0)
            .pad_data(32, 16)
            .0;
        assert!(matches!(
            parse_err(&b),
            GgufError::BadDimension { dim: 1, .. }
        ));
        let b = Raw::header(3, 1, 0)
            .tensor("w", &[1 << 32, 1 << 32], F32, 0)
            .pad_data(32, 16)
            .0;
        assert!(matches!(parse_err(&b), GgufError::TooManyElements { .. }));
        let b = Raw::header(3, 1, 0)
            .tensor("w", &[1 << 31, 1 << 31, 2], F32, 0)
            .pad_data(32, 16)
            .0;
        assert!(matches!(parse_err(&b), GgufError::TooManyElements { .. }));
        // Representable count, but the data is nowhere near the file.
        let b = Raw::header(3, 1, 0)
            .tensor("w", &[1 << 40], F32, 0)
            .pad_data(32, 16)
            .0;
        assert!(matches!(parse_err(&b), GgufError::TensorOutOfFile { .. }));
    }

    /// Two F32 tensors of 4 elements (16 bytes, padded to 32) with the given offsets.
    fn two(off_a: u64, off_b: u64, data: usize) -> Vec<u8> {
        Raw::header(3, 2, 0)
            .tensor("a", &[4], F32, off_a)
            .tensor("b", &[4], F32, off_b)
            .pad_data(32, data)
            .0
    }

    #[test]
    fn offsets_must_be_packed_and_inside_the_file() {
        assert!(GgufHeader::parse(&two(0, 32, 64)).is_ok());
        assert!(GgufHeader::parse(&two(0, 32, 48)).is_ok());
        let cases = [
            (two(32, 0, 64), "a", 0, 32),  // out of order
            (two(0, 16, 64), "b", 32, 16), // overlapping the padding of a
            (two(0, 0, 64), "b", 32, 0),   // overlapping a
            (two(0, 64, 96), "b", 32, 64), // gap (aligned, but not packed)
            (two(0, 33, 96), "b", 32, 33), // misaligned
        ];
        for (b, name, exp, got) in cases {
            let e = parse_err(&b);
            assert!(
                matches!(e, GgufError::BadOffset { ref tensor, expected, found } if tensor == name && expected == exp && found == got),
                "{e}"
            );
        }
        let e = parse_err(&two(0, 32, 47));
        assert!(
            matches!(e, GgufError::TensorOutOfFile { ref tensor, .. } if tensor == "b"),
            "{e}"
        );
        let e = parse_err(&two(u64::MAX, 32, 64));
        assert!(matches!(e, GgufError::BadOffset { .. }), "{e}");
    }

    #[test]
    fn data_section_past_end_of_file() {
        let mut b = Raw::header(3, 1, 0).tensor("w", &[0], F32, 0).0;
        b.push(0); // header ends at 57; data section would start at 64
        let e = parse_err(&b);
        assert!(
            matches!(
                e,
                GgufError::DataSectionOutOfFile {
                    data_offset: 64,
                    file_size: 58
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn non_utf8_strings() {
        let bad = [b'k', 0xff, 0xfe];
        let b = Raw::header(3, 0, 1).str(&bad).u32(4).u32(1).0;
        let e = parse_err(&b);
        assert!(
            matches!(e, GgufError::InvalidUtf8 { offset: 32, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("metadata key 0"), "{e}");
        let b = Raw::header(3, 0, 1).str(b"k").u32(8).str(&bad).0;
        let e = parse_err(&b);
        assert!(
            matches!(e, GgufError::InvalidUtf8 { .. }) && e.to_string().contains("'k'"),
            "{e}"
        );
        let b = Raw::header(3, 0, 1)
            .str(b"k")
            .u32(9)
            .u32(8)
            .u64(2)
            .str(b"ok")
            .str(&bad)
            .0;
        let e = parse_err(&b);
        assert!(e.to_string().contains("element 1 of array 'k'"), "{e}");
        let b = Raw::header(3, 1, 0)
            .str(&bad)
            .u32(1)
            .u64(4)
            .u32(0)
            .u64(0)
            .pad_data(32, 16)
            .0;
        assert!(matches!(parse_err(&b), GgufError::InvalidUtf8 { .. }));
    }

    #[test]
    fn bools_must_be_zero_or_one() {
        let b = Raw::header(3, 0, 1).str(b"flag").u32(7).bytes(&[2]).0;
        let e = parse_err(&b);
        assert!(
            matches!(e, GgufError::InvalidBool { ref key, value: 2, offset: 40 } if key == "flag"),
            "{e}"
        );
        let b = Raw::header(3, 0, 1)
            .str(b"flags")
            .u32(9)
            .u32(7)
            .u64(3)
            .bytes(&[0, 1, 255])
            .0;
        assert!(matches!(
            parse_err(&b),
            GgufError::InvalidBool { value: 255, .. }
        ));
        let b = Raw::header(3, 0, 1)
            .str(b"flags")
            .u32(9)
            .u32(7)
            .u64(2)
            .bytes(&[0, 1])
            .0;
        let h = GgufHeader::parse(&b).unwrap();
        assert_eq!(
            h.get("flags"),
            Some(&GgufValue::Array(GgufArray::Bool(vec![false, true])))
        );
    }

    #[test]
    fn nested_arrays_and_unknown_value_types() {
        let b = Raw::header(3, 0, 1)
            .str(b"nest")
            .u32(9)
            .u32(9)
            .u64(1)
            .u32(0)
            .u64(0)
            .0;
        assert!(matches!(parse_err(&b), GgufError::NestedArray { key } if key == "nest"));
        let b = Raw::header(3, 0, 1).str(b"k").u32(13).u32(0).0;
        assert!(matches!(
            parse_err(&b),
            GgufError::UnknownValueType { type_id: 13, .. }
        ));
        let b = Raw::header(3, 0, 1).str(b"k").u32(9).u32(99).u64(0).0;
        assert!(matches!(
            parse_err(&b),
            GgufError::UnknownValueType { type_id: 99, .. }
        ));
    }

    #[test]
    fn empty_arrays_are_read() {
        let b = Raw::header(3, 0, 2)
            .str(b"e")
            .u32(9)
            .u32(8)
            .u64(0)
            .str(b"f")
            .u32(9)
            .u32(6)
            .u64(0)
            .0;
        let h = GgufHeader::parse(&b).unwrap();
        assert_eq!(
            h.get("e").and_then(|v| v.as_array()).map(|a| a.is_empty()),
            Some(true)
        );
        assert_eq!(
            h.get("f").and_then(|v| v.as_array()).map(|a| a.elem_type()),
            Some(GgufValueType::F32)
        );
    }

    #[test]
    fn open_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.gguf");
        std::fs::write(&p, b"GGUF\x01\0\0\0").unwrap();
        let e = GgufFile::open(&p).unwrap_err();
        assert!(matches!(
            e.kind(),
            GgufError::UnsupportedVersion { version: 1 }
        ));
        assert!(e.to_string().contains("bad.gguf"), "{e}");
        let e = GgufFile::open(&dir.path().join("missing.gguf")).unwrap_err();
        assert!(
            matches!(e, GgufError::Io { .. }) && e.to_string().contains("missing.gguf"),
            "{e}"
        );
        std::fs::write(&p, b"").unwrap();
        assert!(matches!(
            GgufFile::open(&p).unwrap_err().kind(),
            GgufError::Truncated { .. }
        ));
    }

    #[test]
    fn foreign_tensor_info_gives_empty_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.gguf");
        std::fs::write(&p, one_tensor(4).0).unwrap();
        let f = GgufFile::open(&p).unwrap();
        let mut t = f.tensors[0].clone();
        assert_eq!(f.tensor_data(&t).len(), 16);
        t.offset = u64::MAX;
        assert!(f.tensor_data(&t).is_empty());
        f.release(&t);
        t.shape = vec![1 << 40];
        t.offset = 0;
        assert!(f.tensor_data(&t).is_empty());
        assert!(format!("{f:?}").contains("f.gguf"));
    }

    /// Feeds ~200k random mutations (byte sets, bit flips, truncations, u64 field smashes) of
    /// valid files through the parser. Run with `cargo test -p kiln-formats -- --ignored stress`.
    #[test]
    #[ignore]
    fn stress_mutations() {
        let bases = [
            example_bytes(),
            Raw::header(3, 2, 3)
                .kv_u32(ALIGNMENT_KEY, 64)
                .str(b"tok")
                .u32(9)
                .u32(8)
                .u64(3)
                .str(b"a")
                .str(b"bc")
                .str(b"")
                .str(b"b")
                .u32(9)
                .u32(7)
                .u64(2)
                .bytes(&[1, 0])
                .tensor("x", &[64, 2], Q4_0, 0)
                .tensor("y", &[3], F32, 128)
                .pad_data(64, 140)
                .0,
        ];
        for b in &bases {
            GgufHeader::parse(b).unwrap();
        }
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (mut ok, mut err) = (0u32, 0u32);
        let n = 200_000;
        for i in 0..n {
            let mut b = bases[i % bases.len()].clone();
            for _ in 0..=(next() % 4) {
                let pos = (next() % b.len() as u64) as usize;
                match next() % 5 {
                    0 => b[pos] = next() as u8,
                    1 => b[pos] ^= 1 << (next() % 8),
                    2 => b.truncate(pos),
                    3 => {
                        let v =
                            [0, 1, u64::MAX, 1 << 63, 1 << 30, 64, 0x100][(next() % 7) as usize];
                        let end = (pos + 8).min(b.len());
                        b[pos..end].copy_from_slice(&v.to_le_bytes()[..end - pos]);
                    }
                    _ => b[pos] = b[pos].wrapping_add(1),
                }
                if b.is_empty() {
                    break;
                }
            }
            match GgufHeader::parse(&b) {
                Ok(_) => ok += 1,
                Err(_) => err += 1,
            }
        }
        eprintln!("stress: {n} mutations parsed without panic ({ok} accepted, {err} rejected)");
        assert_eq!((ok + err) as usize, n);
    }
}
