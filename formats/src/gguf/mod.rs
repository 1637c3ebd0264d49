//! GGUF v3: value types, a validating mmap reader and a streaming writer (spec §1.1).
//!
//! The reader applies every check of ggml's `gguf.cpp` (and a few stricter ones: strings must be
//! UTF-8, bools must be 0 or 1, n_dims must be 1..=4, tensor types must be ones kiln knows), so a
//! file it accepts is one llama.cpp loads. The writer lays tensors out exactly packed
//! (`offset_k = Σ pad(nbytes_i)`), the only layout current llama.cpp accepts.

use std::path::PathBuf;

use kiln_quant::GgmlType;

mod reader;
pub mod split;
mod value;
mod writer;

pub use reader::{GgufFile, GgufHeader, TensorInfo};
pub use value::{GgufArray, GgufValue, GgufValueType};
pub use writer::{serialize_header, GgufWriter, Tee};

/// ggml's `n_dims` applied to a shape: trailing dimensions of size 1 dropped (at least one kept),
/// as llama.cpp's tools write tensor infos.
pub fn ggml_dims(shape: &[u64]) -> Vec<u64> {
    let n = shape
        .iter()
        .rposition(|&d| d != 1)
        .map(|i| i + 1)
        .unwrap_or(1);
    shape[..n.min(shape.len())].to_vec()
}

/// A tensor to write: name, ggml shape (`ne`, innermost first) and type.
pub type TensorSpec = (String, Vec<u64>, GgmlType);

/// The four magic bytes at offset 0.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The version kiln writes. It reads versions 2 and 3, whose layouts are identical.
pub const GGUF_VERSION: u32 = 3;
/// Alignment of the data section and of each tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that overrides the alignment (must be a u32 power of two).
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Longest string accepted, in bytes (ggml's `GGUF_MAX_STRING_LENGTH`).
pub const MAX_STRING_LEN: u64 = 1 << 30;
/// Most elements accepted in one array (ggml's `GGUF_MAX_ARRAY_ELEMENTS`).
pub const MAX_ARRAY_LEN: u64 = 1 << 30;
/// Tensor names must be shorter than this many bytes (ggml's `GGML_MAX_NAME`).
pub const MAX_NAME_LEN: usize = 64;
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;

/// Everything that can go wrong reading or writing a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// An error inside a named file (wraps any other variant).
    #[error("{}: {source}", path.display())]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<GgufError>,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file: magic bytes are {found:02x?}, expected 'GGUF'")]
    BadMagic { found: [u8; 4] },
    #[error("GGUF version {version} is not supported (kiln reads versions 2 and 3)")]
    UnsupportedVersion { version: u32 },
    #[error(
        "GGUF version field reads {version:#010x}: the file looks byte-swapped \
         (big-endian GGUF); only little-endian files are supported"
    )]
    WrongEndianness { version: u32 },
    #[error("truncated file: {what} at offset {offset} needs {needed} bytes but only {available} remain")]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error("{what} is {count}, more than the {max} the remaining {remaining} bytes could hold")]
    CountTooLarge {
        what: &'static str,
        count: u64,
        max: u64,
        remaining: u64,
    },
    #[error("{what} is {len} bytes long, over the limit of {max}")]
    StringTooLong { what: String, len: u64, max: u64 },
    #[error("array '{key}' has {count} elements, over the limit of {max}")]
    ArrayTooLong { key: String, count: u64, max: u64 },
    #[error("{what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: u64 },
    #[error("metadata key {index} is empty")]
    EmptyKey { index: u64 },
    #[error("duplicate metadata key '{key}'")]
    DuplicateKey { key: String },
    #[error("metadata key '{key}' has unknown value type id {type_id}")]
    UnknownValueType { key: String, type_id: u32 },
    #[error("metadata key '{key}' is an array of arrays, which GGUF does not allow")]
    NestedArray { key: String },
    #[error("metadata key '{key}' has bool byte {value} at offset {offset}; expected 0 or 1")]
    InvalidBool { key: String, offset: u64, value: u8 },
    #[error("metadata key '{key}' must be of type {expected} but is {found}")]
    WrongValueType {
        key: String,
        expected: GgufValueType,
        found: GgufValueType,
    },
    #[error("alignment {alignment} is not a power of two")]
    BadAlignment { alignment: u64 },
    #[error("tensor name '{name}' is {len} bytes long; names must be shorter than {max} bytes")]
    TensorNameTooLong {
        name: String,
        len: usize,
        max: usize,
    },
    #[error("duplicate tensor name '{name}'")]
    DuplicateTensor { name: String },
    #[error("tensor '{tensor}' has {n_dims} dimensions; expected 1 to {max}")]
    BadDimCount {
        tensor: String,
        n_dims: u64,
        max: usize,
    },
    #[error("tensor '{tensor}' dimension {dim} is {value}, which does not fit in an int64")]
    BadDimension {
        tensor: String,
        dim: usize,
        value: u64,
    },
    #[error("tensor '{tensor}' with shape {shape:?} has too many elements (must be < 2^63)")]
    TooManyElements { tensor: String, shape: Vec<u64> },
    #[error("tensor '{tensor}' has unknown ggml type id {type_id}")]
    UnknownTensorType { tensor: String, type_id: u32 },
    #[error(
        "tensor '{tensor}' of type {ty} has {ne0} elements per row, \
         not a multiple of the block size {block_size}"
    )]
    NotBlockMultiple {
        tensor: String,
        ty: GgmlType,
        ne0: u64,
        block_size: u64,
    },
    #[error("tensor '{tensor}' has data offset {found}; expected {expected} (tensors must be packed in order)")]
    BadOffset {
        tensor: String,
        expected: u64,
        found: u64,
    },
    #[error(
        "data section would start at {data_offset}, past the end of the {file_size}-byte file"
    )]
    DataSectionOutOfFile { data_offset: u64, file_size: u64 },
    #[error("tensor '{tensor}' data spans bytes {start}..{end}, past the end of the {file_size}-byte file")]
    TensorOutOfFile {
        tensor: String,
        start: u64,
        end: u64,
        file_size: u64,
    },
    #[error("size of {what} overflows")]
    Overflow { what: String },
    #[error("expected tensor '{expected}' next, got '{found}'")]
    TensorOrder { expected: String, found: String },
    #[error("all tensors have been written; unexpected tensor '{found}'")]
    ExtraTensor { found: String },
    #[error("tensor '{tensor}' needs {expected} bytes of data, got {found}")]
    TensorSize {
        tensor: String,
        expected: u64,
        found: u64,
    },
    #[error("only {written} of {expected} tensors were written; next missing is '{next}'")]
    MissingTensors {
        written: usize,
        expected: usize,
        next: String,
    },
    #[error("an earlier write failed; the output is incomplete")]
    Poisoned,
    /// A split set whose files do not fit together.
    #[error("GGUF split set: {reason}")]
    SplitSet { reason: String },
}

impl GgufError {
    /// Wraps `self` with the file it concerns (no-op for errors that already name a path).
    pub fn in_file(self, path: impl Into<PathBuf>) -> GgufError {
        match self {
            e @ (GgufError::InFile { .. } | GgufError::Io { .. }) => e,
            e => GgufError::InFile {
                path: path.into(),
                source: Box::new(e),
            },
        }
    }

    /// The underlying error, without the file wrapper.
    pub fn kind(&self) -> &GgufError {
        match self {
            GgufError::InFile { source, .. } => source.kind(),
            e => e,
        }
    }
}

/// Rounds `x` up to a multiple of `align` (a power of two), or `None` on overflow.
pub(crate) fn pad_to(x: u64, align: u64) -> Option<u64> {
    let mask = align.checked_sub(1)?;
    Some(x.checked_add(mask)? & !mask)
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Helpers shared by the GGUF tests: a raw byte builder for hostile files and the spec's
    //! worked example.

    use super::*;

    /// Builds GGUF bytes by hand, so tests can write what the writer refuses to.
    #[derive(Clone, Default)]
    pub struct Raw(pub Vec<u8>);

    impl Raw {
        pub fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
            Raw(b"GGUF".to_vec()).u32(version).u64(n_tensors).u64(n_kv)
        }
        pub fn bytes(mut self, b: &[u8]) -> Raw {
            self.0.extend_from_slice(b);
            self
        }
        pub fn u32(self, v: u32) -> Raw {
            self.bytes(&v.to_le_bytes())
        }
        pub fn u64(self, v: u64) -> Raw {
            self.bytes(&v.to_le_bytes())
        }
        pub fn str(self, s: &[u8]) -> Raw {
            self.u64(s.len() as u64).bytes(s)
        }
        pub fn kv_u32(self, key: &str, v: u32) -> Raw {
            self.str(key.as_bytes()).u32(4).u32(v)
        }
        pub fn tensor(self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Raw {
            let mut r = self.str(name.as_bytes()).u32(dims.len() as u32);
            for d in dims {
                r = r.u64(*d);
            }
            r.u32(ty).u64(offset)
        }
        /// Zero padding to a multiple of `align`, then `data` zero bytes.
        pub fn pad_data(mut self, align: usize, data: usize) -> Raw {
            let n = self.0.len().div_ceil(align) * align + data;
            self.0.resize(n, 0);
            self
        }
    }

    /// Parses `bytes`, expecting an error; returns it (without file wrapper).
    pub fn parse_err(bytes: &[u8]) -> GgufError {
        match GgufHeader::parse(bytes) {
            Ok(h) => panic!("expected an error, parsed {h:?}"),
            Err(e) => e,
        }
    }

    /// The spec §1.1 worked example's metadata and tensors.
    pub fn example_inputs() -> (Vec<(String, GgufValue)>, Vec<TensorSpec>) {
        (
            vec![
                (
                    "general.architecture".into(),
                    GgufValue::String("llama".into()),
                ),
                ("llama.block_count".into(), GgufValue::U32(1)),
            ],
            vec![
                ("a".into(), vec![2], GgmlType::F32),
                ("b".into(), vec![3, 1], GgmlType::F16),
            ],
        )
    }

    /// The spec §1.1 worked example, 256 bytes, transcribed from the spec's listing.
    pub fn example_bytes() -> Vec<u8> {
        let hex = concat!(
            "47475546",
            "03000000",
            "0200000000000000",
            "0200000000000000",
            "1400000000000000",
            "67656e6572616c2e617263686974656374757265", // general.architecture
            "08000000",
            "0500000000000000",
            "6c6c616d61", // "llama"
            "1100000000000000",
            "6c6c616d612e626c6f636b5f636f756e74", // llama.block_count
            "04000000",
            "01000000",
            "0100000000000000",
            "61",
            "01000000",
            "0200000000000000",
            "00000000",
            "0000000000000000",
            "0100000000000000",
            "62",
            "02000000",
            "0300000000000000",
            "0100000000000000",
            "01000000",
            "2000000000000000",
        );
        let mut v: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        assert_eq!(v.len(), 0xb0);
        v.resize(0xc0, 0);
        v.extend_from_slice(&[0, 0, 0x80, 0x3f, 0, 0, 0, 0x40]);
        v.resize(0xe0, 0);
        v.extend_from_slice(&[0x00, 0x3c, 0x00, 0x40, 0x00, 0x42]);
        v.resize(0x100, 0);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn worked_example_serializes_byte_for_byte_and_parses_back() {
        let (md, ts) = example_inputs();
        let expected = example_bytes();
        let header = serialize_header(&md, &ts).unwrap();
        assert_eq!(header.len(), 0xc0);
        assert_eq!(header[..], expected[..0xc0]);

        // Through the writer and reader too.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ex.gguf");
        let mut w = GgufWriter::create(&p, &md, &ts).unwrap();
        assert_eq!(w.tensor_infos()[1].offset, 32);
        w.write_tensor("a", &expected[0xc0..0xc8]).unwrap();
        w.write_tensor("b", &expected[0xe0..0xe6]).unwrap();
        w.finish().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), expected);

        let f = GgufFile::open(&p).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.alignment, 32);
        assert_eq!(f.data_offset, 0xc0);
        assert_eq!(f.file_size(), 256);
        assert_eq!(f.metadata, md);
        assert_eq!(f.get("llama.block_count").and_then(|v| v.as_u32()), Some(1));
        let b = f.tensor("b").unwrap();
        assert_eq!(
            (b.n_elements(), b.n_rows(), b.row_len(), b.n_bytes()),
            (3, 1, 3, 6)
        );
        assert_eq!(f.tensor_data(b), &[0x00, 0x3c, 0x00, 0x40, 0x00, 0x42]);
        assert_eq!(f.tensor_data(f.tensor("a").unwrap()), &expected[0xc0..0xc8]);
        f.release(b);
        assert!(f.tensor("c").is_none());
    }

    fn finite_f32() -> impl Strategy<Value = f32> {
        any::<f32>().prop_filter("NaN", |x| !x.is_nan())
    }
    fn finite_f64() -> impl Strategy<Value = f64> {
        any::<f64>().prop_filter("NaN", |x| !x.is_nan())
    }

    fn array_strategy() -> impl Strategy<Value = GgufArray> {
        use proptest::collection::vec;
        prop_oneof![
            vec(any::<u8>(), 0..8).prop_map(GgufArray::U8),
            vec(any::<i8>(), 0..8).prop_map(GgufArray::I8),
            vec(any::<u16>(), 0..8).prop_map(GgufArray::U16),
            vec(any::<i16>(), 0..8).prop_map(GgufArray::I16),
            vec(any::<u32>(), 0..8).prop_map(GgufArray::U32),
            vec(any::<i32>(), 0..8).prop_map(GgufArray::I32),
            vec(finite_f32(), 0..8).prop_map(GgufArray::F32),
            vec(any::<bool>(), 0..8).prop_map(GgufArray::Bool),
            vec(".{0,12}", 0..8).prop_map(GgufArray::String),
            vec(any::<u64>(), 0..8).prop_map(GgufArray::U64),
            vec(any::<i64>(), 0..8).prop_map(GgufArray::I64),
            vec(finite_f64(), 0..8).prop_map(GgufArray::F64),
        ]
    }

    fn value_strategy() -> impl Strategy<Value = GgufValue> {
        prop_oneof![
            any::<u8>().prop_map(GgufValue::U8),
            any::<i8>().prop_map(GgufValue::I8),
            any::<u16>().prop_map(GgufValue::U16),
            any::<i16>().prop_map(GgufValue::I16),
            any::<u32>().prop_map(GgufValue::U32),
            any::<i32>().prop_map(GgufValue::I32),
            finite_f32().prop_map(GgufValue::F32),
            any::<bool>().prop_map(GgufValue::Bool),
            ".{0,20}".prop_map(GgufValue::String),
            array_strategy().prop_map(GgufValue::Array),
            any::<u64>().prop_map(GgufValue::U64),
            any::<i64>().prop_map(GgufValue::I64),
            finite_f64().prop_map(GgufValue::F64),
        ]
    }

    fn tensor_strategy() -> impl Strategy<Value = (Vec<u64>, GgmlType)> {
        (
            proptest::sample::select(GgmlType::ALL.to_vec()),
            0u64..4,
            proptest::collection::vec(0u64..4, 0..4),
        )
            .prop_map(|(ty, blocks, rest)| {
                let mut shape = vec![blocks * ty.block_size() as u64];
                shape.extend(rest);
                (shape, ty)
            })
    }

    proptest! {
        #[test]
        fn round_trip(
            values in proptest::collection::vec(("[a-z.]{1,12}", value_strategy()), 0..12),
            tensors in proptest::collection::vec(tensor_strategy(), 0..6),
            align_log2 in proptest::option::of(0u32..8),
        ) {
            let mut md: Vec<(String, GgufValue)> = values
                .into_iter()
                .enumerate()
                .map(|(i, (k, v))| (format!("{k}{i}"), v))
                .collect();
            let alignment = match align_log2 {
                Some(l) => {
                    md.push((ALIGNMENT_KEY.into(), GgufValue::U32(1 << l)));
                    1u64 << l
                }
                None => DEFAULT_ALIGNMENT,
            };
            let ts: Vec<(String, Vec<u64>, GgmlType)> = tensors
                .into_iter()
                .enumerate()
                .map(|(i, (s, t))| (format!("blk.{i}.w"), s, t))
                .collect();
            let mut bytes = serialize_header(&md, &ts).unwrap();
            let data_offset = bytes.len() as u64;
            prop_assert_eq!(data_offset % alignment, 0);
            let mut infos = Vec::new();
            let mut off = 0u64;
            for (name, shape, ty) in &ts {
                let info = TensorInfo { name: name.clone(), shape: shape.clone(), ty: *ty, offset: off, part: 0 };
                off += pad_to(info.n_bytes(), alignment).unwrap();
                infos.push(info);
            }
            bytes.resize((data_offset + off) as usize, 0);
            let h = GgufHeader::parse(&bytes).unwrap();
            prop_assert_eq!(h.version, 3);
            prop_assert_eq!(&h.metadata, &md);
            prop_assert_eq!(&h.tensors, &infos);
            prop_assert_eq!(h.alignment, alignment);
            if !ts.is_empty() {
                prop_assert_eq!(h.data_offset, data_offset);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = GgufHeader::parse(&bytes);
        }

        #[test]
        fn arbitrary_bodies_never_panic(
            n_tensors in 0u64..4,
            n_kv in 0u64..4,
            body in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let bytes = Raw::header(3, n_tensors, n_kv).bytes(&body).0;
            let _ = GgufHeader::parse(&bytes);
        }

        #[test]
        fn mutations_of_a_valid_file_never_panic(
            edits in proptest::collection::vec((0usize..256, any::<u8>()), 1..6),
        ) {
            let mut bytes = example_bytes();
            for (i, b) in edits {
                bytes[i] = b;
            }
            let _ = GgufHeader::parse(&bytes);
        }
    }
}
