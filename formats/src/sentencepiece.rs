//! SentencePiece `tokenizer.model` reader and writer: a small protobuf wire reader for `ModelProto`
//! (pieces, trainer spec, normalizer spec) that honours proto2 defaults and rejects malformed input,
//! and [`SpModel::to_bytes`], which serializes the same fields back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Largest `tokenizer.model` file [`SpModel::open`] reads (real ones are 0.5 to 5 MiB).
pub const MAX_MODEL_FILE_BYTES: u64 = 256 << 20;

/// Most pieces a model may have (real vocabularies stay under 300k).
pub const MAX_PIECES: usize = 1 << 24;

/// Deepest nesting of (unknown) protobuf groups that is skipped before giving up.
const MAX_GROUP_DEPTH: usize = 64;

/// Errors from reading a SentencePiece model.
#[derive(Debug, thiserror::Error)]
pub enum SpError {
    #[error("{path}: cannot read SentencePiece model: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: file is {size} bytes, more than the {max} a SentencePiece model may have")]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("{path}: {source}")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<SpError>,
    },
    #[error("truncated protobuf in {what} at byte {offset}: needs {needed} more bytes, {available} left")]
    Truncated {
        what: &'static str,
        offset: usize,
        needed: u64,
        available: usize,
    },
    #[error("malformed varint in {what} at byte {offset}")]
    BadVarint { what: &'static str, offset: usize },
    #[error("bad protobuf field key {key:#x} in {what} at byte {offset}")]
    BadKey {
        what: &'static str,
        key: u64,
        offset: usize,
    },
    #[error("field {field} of {what} has wire type {got}, expected {expected} (byte {offset})")]
    WrongWireType {
        what: &'static str,
        field: u32,
        got: u8,
        expected: u8,
        offset: usize,
    },
    #[error("unbalanced or too deeply nested protobuf group in {what} at byte {offset}")]
    BadGroup { what: &'static str, offset: usize },
    #[error("piece {index} is not valid UTF-8")]
    PieceNotUtf8 { index: usize },
    #[error("piece {index} is empty")]
    EmptyPiece { index: usize },
    #[error("piece {index} ({piece:?}) repeats piece {first}")]
    DuplicatePiece {
        index: usize,
        first: usize,
        piece: String,
    },
    #[error("piece {index} has unknown type {value} (expected 1..=6)")]
    UnknownPieceType { index: usize, value: i64 },
    #[error("field {field} is not valid UTF-8")]
    NotUtf8 { field: &'static str },
    #[error("model has no pieces")]
    NoPieces,
    #[error("model has {count} pieces or more, above the limit of {MAX_PIECES}")]
    TooManyPieces { count: usize },
}

/// Kind of a vocabulary piece (`ModelProto.SentencePiece.Type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    /// The protobuf enum value (1..=6) as a piece type.
    pub fn from_proto(v: i64) -> Option<PieceType> {
        Some(match v {
            1 => PieceType::Normal,
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => return None,
        })
    }

    /// The protobuf enum value.
    pub fn proto_value(self) -> i32 {
        match self {
            PieceType::Normal => 1,
            PieceType::Unknown => 2,
            PieceType::Control => 3,
            PieceType::UserDefined => 4,
            PieceType::Unused => 5,
            PieceType::Byte => 6,
        }
    }

    /// The llama.cpp `llama_token_type` value written to `tokenizer.ggml.token_type`
    /// (NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6).
    pub fn gguf_token_type(self) -> i32 {
        // The two enums happen to share their numbering.
        self.proto_value()
    }
}

/// One vocabulary entry.
#[derive(Clone, Debug)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

/// A parsed SentencePiece model: the vocabulary plus the trainer and normalizer settings that
/// matter for tokenizing and for GGUF conversion. Fields absent from the file carry the proto2
/// defaults.
#[derive(Clone, Debug)]
pub struct SpModel {
    pub pieces: Vec<Piece>,
    // TrainerSpec
    /// 1 UNIGRAM, 2 BPE, 3 WORD, 4 CHAR (raw value kept even if unknown).
    pub model_type: i32,
    pub vocab_size: i32,
    pub unk_id: i32,
    pub bos_id: i32,
    pub eos_id: i32,
    pub pad_id: i32,
    pub unk_piece: String,
    pub bos_piece: String,
    pub eos_piece: String,
    pub pad_piece: String,
    pub unk_surface: String,
    pub byte_fallback: bool,
    pub split_digits: bool,
    pub split_by_unicode_script: bool,
    pub split_by_number: bool,
    pub split_by_whitespace: bool,
    pub treat_whitespace_as_suffix: bool,
    pub allow_whitespace_only_pieces: bool,
    pub max_piece_length: i32,
    // NormalizerSpec
    pub normalizer_name: String,
    pub precompiled_charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
    /// Whether the file carries a `denormalizer_spec`.
    pub has_denormalizer: bool,
    /// piece -> id, built at parse time; [`SpModel::piece_to_id`] falls back to a scan if
    /// `pieces` was edited afterwards.
    index: HashMap<String, u32>,
}

impl Default for SpModel {
    fn default() -> Self {
        SpModel {
            pieces: Vec::new(),
            model_type: 1,
            vocab_size: 8000,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
            unk_piece: "<unk>".into(),
            bos_piece: "<s>".into(),
            eos_piece: "</s>".into(),
            pad_piece: "<pad>".into(),
            unk_surface: " \u{2047} ".into(),
            byte_fallback: false,
            split_digits: false,
            split_by_unicode_script: true,
            split_by_number: true,
            split_by_whitespace: true,
            treat_whitespace_as_suffix: false,
            allow_whitespace_only_pieces: false,
            max_piece_length: 16,
            normalizer_name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
            has_denormalizer: false,
            index: HashMap::new(),
        }
    }
}

impl SpModel {
    /// Reads and parses a `tokenizer.model` file.
    pub fn open(path: &Path) -> Result<SpModel, SpError> {
        let io_err = |source| SpError::Io {
            path: path.to_path_buf(),
            source,
        };
        let size = std::fs::metadata(path).map_err(io_err)?.len();
        if size > MAX_MODEL_FILE_BYTES {
            return Err(SpError::TooLarge {
                path: path.to_path_buf(),
                size,
                max: MAX_MODEL_FILE_BYTES,
            });
        }
        let bytes = std::fs::read(path).map_err(io_err)?;
        SpModel::parse(&bytes).map_err(|e| SpError::InFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Parses a serialized `ModelProto`.
    pub fn parse(bytes: &[u8]) -> Result<SpModel, SpError> {
        let mut m = SpModel::default();
        let mut r = Reader::new(bytes, 0, "ModelProto");
        while let Some((field, wt)) = r.key()? {
            match field {
                1 => {
                    let index = m.pieces.len();
                    if index >= MAX_PIECES {
                        return Err(SpError::TooManyPieces { count: index + 1 });
                    }
                    let (buf, base) = r.message(field, wt)?;
                    m.pieces.push(parse_piece(buf, base, index)?);
                }
                2 => {
                    let (buf, base) = r.message(field, wt)?;
                    parse_trainer(&mut m, buf, base)?;
                }
                3 => {
                    let (buf, base) = r.message(field, wt)?;
                    parse_normalizer(&mut m, buf, base)?;
                }
                5 => {
                    // Validate its framing; its contents are not needed.
                    r.message(field, wt)?;
                    m.has_denormalizer = true;
                }
                _ => r.skip(field, wt)?,
            }
        }
        if m.pieces.is_empty() {
            return Err(SpError::NoPieces);
        }
        let mut index = HashMap::with_capacity(m.pieces.len());
        for (i, p) in m.pieces.iter().enumerate() {
            if p.piece.is_empty() {
                return Err(SpError::EmptyPiece { index: i });
            }
            // i < pieces.len() <= MAX_PIECES < u32::MAX.
            let id = i as u32;
            if let Some(&first) = index.get(&p.piece) {
                return Err(SpError::DuplicatePiece {
                    index: i,
                    first: first as usize,
                    piece: p.piece.clone(),
                });
            }
            index.insert(p.piece.clone(), id);
        }
        m.index = index;
        Ok(m)
    }

    /// Number of pieces.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// True when there are no pieces (never for a parsed model).
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The id of a piece, if it is in the vocabulary.
    pub fn piece_to_id(&self, s: &str) -> Option<u32> {
        if let Some(&id) = self.index.get(s) {
            if self.pieces.get(id as usize).is_some_and(|p| p.piece == s) {
                return Some(id);
            }
        }
        // `pieces` was edited after parsing: scan.
        self.pieces
            .iter()
            .position(|p| p.piece == s)
            .and_then(|i| u32::try_from(i).ok())
    }
}

impl SpModel {
    /// A model of `pieces` with the proto2 defaults for every setting (callers set the public
    /// fields they need before [`SpModel::to_bytes`]).
    pub fn with_pieces(pieces: Vec<Piece>) -> SpModel {
        let index = pieces
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((p.piece.clone(), u32::try_from(i).ok()?)))
            .collect();
        SpModel {
            pieces,
            index,
            ..SpModel::default()
        }
    }

    /// Serializes the model as a `ModelProto` (pieces, then the trainer spec, the normalizer spec
    /// and, when [`SpModel::has_denormalizer`], an identity denormalizer spec): the fields
    /// [`SpModel::parse`] reads, every one written explicitly so no reader depends on defaults.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for p in &self.pieces {
            let mut m = Vec::new();
            w_bytes(&mut m, 1, p.piece.as_bytes());
            w_float(&mut m, 2, p.score);
            if p.kind != PieceType::Normal {
                w_int(&mut m, 3, i64::from(p.kind.proto_value()));
            }
            w_bytes(&mut out, 1, &m);
        }
        let mut t = Vec::new();
        w_int(&mut t, 3, i64::from(self.model_type));
        w_int(&mut t, 4, i64::from(self.vocab_size));
        w_int(&mut t, 20, i64::from(self.max_piece_length));
        w_int(&mut t, 21, i64::from(self.split_by_unicode_script));
        w_int(&mut t, 22, i64::from(self.split_by_whitespace));
        w_int(&mut t, 23, i64::from(self.split_by_number));
        w_int(&mut t, 24, i64::from(self.treat_whitespace_as_suffix));
        w_int(&mut t, 25, i64::from(self.split_digits));
        w_int(&mut t, 26, i64::from(self.allow_whitespace_only_pieces));
        w_int(&mut t, 35, i64::from(self.byte_fallback));
        w_int(&mut t, 40, i64::from(self.unk_id));
        w_int(&mut t, 41, i64::from(self.bos_id));
        w_int(&mut t, 42, i64::from(self.eos_id));
        w_int(&mut t, 43, i64::from(self.pad_id));
        w_bytes(&mut t, 44, self.unk_surface.as_bytes());
        w_bytes(&mut t, 45, self.unk_piece.as_bytes());
        w_bytes(&mut t, 46, self.bos_piece.as_bytes());
        w_bytes(&mut t, 47, self.eos_piece.as_bytes());
        w_bytes(&mut t, 48, self.pad_piece.as_bytes());
        w_bytes(&mut out, 2, &t);
        let mut n = Vec::new();
        w_bytes(&mut n, 1, self.normalizer_name.as_bytes());
        w_bytes(&mut n, 2, &self.precompiled_charsmap);
        w_int(&mut n, 3, i64::from(self.add_dummy_prefix));
        w_int(&mut n, 4, i64::from(self.remove_extra_whitespaces));
        w_int(&mut n, 5, i64::from(self.escape_whitespaces));
        w_bytes(&mut out, 3, &n);
        if self.has_denormalizer {
            let mut d = Vec::new();
            w_bytes(&mut d, 1, b"identity");
            w_bytes(&mut out, 5, &d);
        }
        out
    }
}

fn w_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn w_key(out: &mut Vec<u8>, field: u32, wt: u8) {
    w_varint(out, (u64::from(field) << 3) | u64::from(wt));
}

fn w_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    w_key(out, field, WT_LEN);
    w_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// An int32/enum/bool field: negative values sign-extended to ten bytes, as protobuf writes them.
fn w_int(out: &mut Vec<u8>, field: u32, v: i64) {
    w_key(out, field, WT_VARINT);
    w_varint(out, v as u64);
}

fn w_float(out: &mut Vec<u8>, field: u32, v: f32) {
    w_key(out, field, WT_I32);
    out.extend_from_slice(&v.to_le_bytes());
}

fn parse_piece(buf: &[u8], base: usize, index: usize) -> Result<Piece, SpError> {
    let mut r = Reader::new(buf, base, "SentencePiece");
    let mut piece: &[u8] = b"";
    let mut score = 0.0f32;
    let mut kind = PieceType::Normal;
    while let Some((field, wt)) = r.key()? {
        match field {
            1 => piece = r.bytes(field, wt)?,
            2 => score = r.float(field, wt)?,
            3 => {
                let v = r.int32(field, wt)?;
                kind = PieceType::from_proto(i64::from(v)).ok_or(SpError::UnknownPieceType {
                    index,
                    value: i64::from(v),
                })?;
            }
            _ => r.skip(field, wt)?,
        }
    }
    let piece = std::str::from_utf8(piece)
        .map_err(|_| SpError::PieceNotUtf8 { index })?
        .to_owned();
    Ok(Piece { piece, score, kind })
}

fn utf8(b: &[u8], field: &'static str) -> Result<String, SpError> {
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| SpError::NotUtf8 { field })
}

fn parse_trainer(m: &mut SpModel, buf: &[u8], base: usize) -> Result<(), SpError> {
    let mut r = Reader::new(buf, base, "TrainerSpec");
    while let Some((field, wt)) = r.key()? {
        match field {
            3 => m.model_type = r.int32(field, wt)?,
            4 => m.vocab_size = r.int32(field, wt)?,
            20 => m.max_piece_length = r.int32(field, wt)?,
            21 => m.split_by_unicode_script = r.bool(field, wt)?,
            22 => m.split_by_whitespace = r.bool(field, wt)?,
            23 => m.split_by_number = r.bool(field, wt)?,
            24 => m.treat_whitespace_as_suffix = r.bool(field, wt)?,
            25 => m.split_digits = r.bool(field, wt)?,
            26 => m.allow_whitespace_only_pieces = r.bool(field, wt)?,
            35 => m.byte_fallback = r.bool(field, wt)?,
            40 => m.unk_id = r.int32(field, wt)?,
            41 => m.bos_id = r.int32(field, wt)?,
            42 => m.eos_id = r.int32(field, wt)?,
            43 => m.pad_id = r.int32(field, wt)?,
            44 => m.unk_surface = utf8(r.bytes(field, wt)?, "trainer_spec.unk_surface")?,
            45 => m.unk_piece = utf8(r.bytes(field, wt)?, "trainer_spec.unk_piece")?,
            46 => m.bos_piece = utf8(r.bytes(field, wt)?, "trainer_spec.bos_piece")?,
            47 => m.eos_piece = utf8(r.bytes(field, wt)?, "trainer_spec.eos_piece")?,
            48 => m.pad_piece = utf8(r.bytes(field, wt)?, "trainer_spec.pad_piece")?,
            _ => r.skip(field, wt)?,
        }
    }
    Ok(())
}

fn parse_normalizer(m: &mut SpModel, buf: &[u8], base: usize) -> Result<(), SpError> {
    let mut r = Reader::new(buf, base, "NormalizerSpec");
    while let Some((field, wt)) = r.key()? {
        match field {
            1 => m.normalizer_name = utf8(r.bytes(field, wt)?, "normalizer_spec.name")?,
            2 => m.precompiled_charsmap = r.bytes(field, wt)?.to_vec(),
            3 => m.add_dummy_prefix = r.bool(field, wt)?,
            4 => m.remove_extra_whitespaces = r.bool(field, wt)?,
            5 => m.escape_whitespaces = r.bool(field, wt)?,
            _ => r.skip(field, wt)?,
        }
    }
    Ok(())
}

const WT_VARINT: u8 = 0;
const WT_I64: u8 = 1;
const WT_LEN: u8 = 2;
const WT_SGROUP: u8 = 3;
const WT_EGROUP: u8 = 4;
const WT_I32: u8 = 5;

/// Protobuf wire-format cursor over one message's bytes. `base` is the message's offset in the
/// whole input, for error messages.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize, what: &'static str) -> Self {
        Reader {
            buf,
            pos: 0,
            base,
            what,
        }
    }

    fn offset(&self) -> usize {
        self.base.saturating_add(self.pos)
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], SpError> {
        let available = self.remaining();
        let out = usize::try_from(n)
            .ok()
            .filter(|&n| n <= available)
            .and_then(|n| self.buf.get(self.pos..self.pos + n));
        match out {
            Some(out) => {
                self.pos += out.len();
                Ok(out)
            }
            None => Err(SpError::Truncated {
                what: self.what,
                offset: self.offset(),
                needed: n,
                available,
            }),
        }
    }

    fn varint(&mut self) -> Result<u64, SpError> {
        let start = self.offset();
        let mut v = 0u64;
        for i in 0..10u32 {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(SpError::Truncated {
                    what: self.what,
                    offset: self.offset(),
                    needed: 1,
                    available: 0,
                });
            };
            self.pos += 1;
            // The tenth byte may only carry the top bit of a u64.
            if i == 9 && b > 1 {
                break;
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(SpError::BadVarint {
            what: self.what,
            offset: start,
        })
    }

    /// Next field key, or `None` at the end of the message.
    fn key(&mut self) -> Result<Option<(u32, u8)>, SpError> {
        if self.remaining() == 0 {
            return Ok(None);
        }
        let offset = self.offset();
        let key = self.varint()?;
        let field = key >> 3;
        let wt = (key & 7) as u8;
        if field == 0 || field > (1 << 29) - 1 || wt > WT_I32 {
            return Err(SpError::BadKey {
                what: self.what,
                key,
                offset,
            });
        }
        // field < 2^29 fits a u32.
        Ok(Some((field as u32, wt)))
    }

    fn expect(&self, field: u32, got: u8, expected: u8) -> Result<(), SpError> {
        if got == expected {
            Ok(())
        } else {
            Err(SpError::WrongWireType {
                what: self.what,
                field,
                got,
                expected,
                offset: self.offset(),
            })
        }
    }

    fn bytes(&mut self, field: u32, wt: u8) -> Result<&'a [u8], SpError> {
        self.expect(field, wt, WT_LEN)?;
        let n = self.varint()?;
        self.take(n)
    }

    /// An embedded message: its bytes and their offset in the whole input.
    fn message(&mut self, field: u32, wt: u8) -> Result<(&'a [u8], usize), SpError> {
        self.expect(field, wt, WT_LEN)?;
        let n = self.varint()?;
        let base = self.offset();
        Ok((self.take(n)?, base))
    }

    fn int32(&mut self, field: u32, wt: u8) -> Result<i32, SpError> {
        self.expect(field, wt, WT_VARINT)?;
        // int32/enum: negative values are sign-extended to 64 bits; keep the low 32 as protobuf does.
        Ok(self.varint()? as u32 as i32)
    }

    fn bool(&mut self, field: u32, wt: u8) -> Result<bool, SpError> {
        self.expect(field, wt, WT_VARINT)?;
        Ok(self.varint()? != 0)
    }

    fn float(&mut self, field: u32, wt: u8) -> Result<f32, SpError> {
        self.expect(field, wt, WT_I32)?;
        let b = self.take(4)?;
        let mut a = [0u8; 4];
        a.copy_from_slice(b);
        Ok(f32::from_le_bytes(a))
    }

    /// Skips the value of an unknown field.
    fn skip(&mut self, field: u32, wt: u8) -> Result<(), SpError> {
        self.skip_depth(field, wt, 0)
    }

    fn skip_depth(&mut self, field: u32, wt: u8, depth: usize) -> Result<(), SpError> {
        match wt {
            WT_VARINT => {
                self.varint()?;
            }
            WT_I64 => {
                self.take(8)?;
            }
            WT_LEN => {
                let n = self.varint()?;
                self.take(n)?;
            }
            WT_I32 => {
                self.take(4)?;
            }
            WT_SGROUP => {
                if depth >= MAX_GROUP_DEPTH {
                    return Err(SpError::BadGroup {
                        what: self.what,
                        offset: self.offset(),
                    });
                }
                loop {
                    let Some((f, w)) = self.key()? else {
                        return Err(SpError::BadGroup {
                            what: self.what,
                            offset: self.offset(),
                        });
                    };
                    if w == WT_EGROUP {
                        if f == field {
                            break;
                        }
                        return Err(SpError::BadGroup {
                            what: self.what,
                            offset: self.offset(),
                        });
                    }
                    self.skip_depth(f, w, depth + 1)?;
                }
            }
            _ => {
                // A stray end-group.
                return Err(SpError::BadGroup {
                    what: self.what,
                    offset: self.offset(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::torch::tests::{shared_path as fixture, skip, HOW_PYTHON};

    // ---- synthetic models, written with the module's protobuf writer ----
    fn piece_msg(piece: &[u8], score: Option<f32>, kind: Option<i64>) -> Vec<u8> {
        let mut p = Vec::new();
        w_bytes(&mut p, 1, piece);
        if let Some(s) = score {
            w_float(&mut p, 2, s);
        }
        if let Some(k) = kind {
            w_int(&mut p, 3, k);
        }
        p
    }

    /// A small model: 4 pieces, trainer spec (BPE, byte_fallback, pad_id 3), normalizer spec.
    fn synthetic() -> Vec<u8> {
        synthetic_with_boundaries().0
    }

    /// The synthetic model and the byte offsets where its top-level fields end.
    fn synthetic_with_boundaries() -> (Vec<u8>, Vec<usize>) {
        let mut m = Vec::new();
        let mut ends = Vec::new();
        w_bytes(&mut m, 1, &piece_msg(b"<unk>", Some(0.0), Some(2)));
        ends.push(m.len());
        w_bytes(&mut m, 1, &piece_msg(b"<s>", None, Some(3)));
        ends.push(m.len());
        w_bytes(&mut m, 1, &piece_msg("▁a".as_bytes(), Some(-1.5), None));
        ends.push(m.len());
        w_bytes(&mut m, 1, &piece_msg(b"<0x41>", Some(0.0), Some(6)));
        ends.push(m.len());
        let mut t = Vec::new();
        w_int(&mut t, 3, 2);
        w_int(&mut t, 4, 4);
        w_bytes(&mut t, 2, b"prefix"); // unknown to us: skipped
        w_int(&mut t, 35, 1);
        w_int(&mut t, 43, 3);
        w_int(&mut t, 41, -1);
        w_key(&mut t, 51, WT_I32); // float, skipped
        t.extend_from_slice(&0.5f32.to_le_bytes());
        w_key(&mut t, 52, WT_I64); // uint64 as fixed? skipped either way
        t.extend_from_slice(&[0; 8]);
        w_bytes(&mut m, 2, &t);
        ends.push(m.len());
        let mut n = Vec::new();
        w_bytes(&mut n, 1, b"identity");
        w_int(&mut n, 3, 0);
        w_bytes(&mut m, 3, &n);
        ends.push(m.len());
        // an unknown extension field with a group inside
        w_key(&mut m, 200, WT_SGROUP);
        w_int(&mut m, 1, 5);
        w_key(&mut m, 200, WT_EGROUP);
        ends.push(m.len());
        (m, ends)
    }

    #[test]
    fn synthetic_model_parses_with_defaults() {
        let m = SpModel::parse(&synthetic()).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m.pieces[0].kind, PieceType::Unknown);
        assert_eq!(m.pieces[1].kind, PieceType::Control);
        assert_eq!(m.pieces[1].score, 0.0);
        assert_eq!(m.pieces[2].kind, PieceType::Normal);
        assert_eq!(m.pieces[2].piece, "▁a");
        assert_eq!(m.pieces[2].score, -1.5);
        assert_eq!(m.pieces[3].kind, PieceType::Byte);
        assert_eq!(m.pieces[3].kind.gguf_token_type(), 6);
        assert_eq!(m.model_type, 2);
        assert_eq!(m.vocab_size, 4);
        assert!(m.byte_fallback);
        assert_eq!((m.unk_id, m.bos_id, m.eos_id, m.pad_id), (0, -1, 2, 3));
        assert_eq!(m.normalizer_name, "identity");
        assert!(!m.add_dummy_prefix);
        assert!(m.remove_extra_whitespaces && m.escape_whitespaces);
        assert!(!m.split_digits && m.split_by_whitespace);
        assert_eq!(m.max_piece_length, 16);
        assert_eq!(m.piece_to_id("▁a"), Some(2));
        assert_eq!(m.piece_to_id("zz"), None);
    }

    fn same_settings(a: &SpModel, b: &SpModel) {
        assert_eq!(a.pieces.len(), b.pieces.len());
        for (x, y) in a.pieces.iter().zip(&b.pieces) {
            assert_eq!(
                (&x.piece, x.score.to_bits(), x.kind),
                (&y.piece, y.score.to_bits(), y.kind)
            );
        }
        assert_eq!(
            (
                a.model_type,
                a.vocab_size,
                a.unk_id,
                a.bos_id,
                a.eos_id,
                a.pad_id
            ),
            (
                b.model_type,
                b.vocab_size,
                b.unk_id,
                b.bos_id,
                b.eos_id,
                b.pad_id
            )
        );
        assert_eq!(
            (
                &a.unk_piece,
                &a.bos_piece,
                &a.eos_piece,
                &a.pad_piece,
                &a.unk_surface
            ),
            (
                &b.unk_piece,
                &b.bos_piece,
                &b.eos_piece,
                &b.pad_piece,
                &b.unk_surface
            )
        );
        assert_eq!(
            (
                a.byte_fallback,
                a.split_digits,
                a.split_by_unicode_script,
                a.split_by_number
            ),
            (
                b.byte_fallback,
                b.split_digits,
                b.split_by_unicode_script,
                b.split_by_number
            )
        );
        assert_eq!(
            (
                a.split_by_whitespace,
                a.treat_whitespace_as_suffix,
                a.allow_whitespace_only_pieces
            ),
            (
                b.split_by_whitespace,
                b.treat_whitespace_as_suffix,
                b.allow_whitespace_only_pieces
            )
        );
        assert_eq!(a.max_piece_length, b.max_piece_length);
        assert_eq!(
            (
                &a.normalizer_name,
                &a.precompiled_charsmap,
                a.has_denormalizer
            ),
            (
                &b.normalizer_name,
                &b.precompiled_charsmap,
                b.has_denormalizer
            )
        );
        assert_eq!(
            (
                a.add_dummy_prefix,
                a.remove_extra_whitespaces,
                a.escape_whitespaces
            ),
            (
                b.add_dummy_prefix,
                b.remove_extra_whitespaces,
                b.escape_whitespaces
            )
        );
    }

    #[test]
    fn writer_round_trips_the_synthetic_model() {
        let m = SpModel::parse(&synthetic()).unwrap();
        let again = SpModel::parse(&m.to_bytes()).unwrap();
        same_settings(&m, &again);
        assert_eq!(again.to_bytes(), m.to_bytes());
    }

    #[test]
    fn writer_round_trips_the_llama_tokenizers() {
        for rel in [
            "fixtures/llama-2-tokenizer/tokenizer.model",
            "fixtures/chinese-llama-2-tokenizer/tokenizer.model",
        ] {
            let Some(p) = fixture(rel) else { return };
            let m = SpModel::open(&p).unwrap();
            let again = SpModel::parse(&m.to_bytes()).unwrap();
            same_settings(&m, &again);
        }
    }

    #[test]
    fn with_pieces_indexes_its_pieces() {
        let mut m = SpModel::with_pieces(vec![
            Piece {
                piece: "<unk>".into(),
                score: 0.0,
                kind: PieceType::Unknown,
            },
            Piece {
                piece: "▁x".into(),
                score: -2.0,
                kind: PieceType::Normal,
            },
        ]);
        m.byte_fallback = true;
        m.pad_id = -1;
        assert_eq!(m.piece_to_id("▁x"), Some(1));
        let again = SpModel::parse(&m.to_bytes()).unwrap();
        same_settings(&m, &again);
        assert_eq!(again.pad_id, -1);
    }

    proptest! {
        #[test]
        fn writer_round_trips_any_model(
            pieces in proptest::collection::btree_set("[a-z\u{4e00}-\u{4e10}▁]{1,6}", 1..40),
            scores in proptest::collection::vec(-100.0f32..0.0, 40),
            kinds in proptest::collection::vec(1i64..=6, 40),
            ids in proptest::collection::vec(-1i32..100, 4),
            flags in proptest::collection::vec(any::<bool>(), 12),
            name in "[a-z_]{0,12}",
        ) {
            let list: Vec<Piece> = pieces.into_iter().enumerate().map(|(i, p)| Piece {
                piece: p,
                score: scores[i % scores.len()],
                kind: PieceType::from_proto(kinds[i % kinds.len()]).unwrap(),
            }).collect();
            let mut m = SpModel::with_pieces(list);
            m.unk_id = ids[0];
            m.bos_id = ids[1];
            m.eos_id = ids[2];
            m.pad_id = ids[3];
            m.byte_fallback = flags[0];
            m.split_digits = flags[1];
            m.split_by_unicode_script = flags[2];
            m.split_by_number = flags[3];
            m.split_by_whitespace = flags[4];
            m.treat_whitespace_as_suffix = flags[5];
            m.allow_whitespace_only_pieces = flags[6];
            m.add_dummy_prefix = flags[7];
            m.remove_extra_whitespaces = flags[8];
            m.escape_whitespaces = flags[9];
            m.has_denormalizer = flags[10];
            m.normalizer_name = name;
            let again = SpModel::parse(&m.to_bytes()).unwrap();
            same_settings(&m, &again);
        }
    }

    #[test]
    fn bare_pieces_use_proto_defaults() {
        let mut m = Vec::new();
        w_bytes(&mut m, 1, &piece_msg(b"x", None, None));
        let m = SpModel::parse(&m).unwrap();
        assert_eq!(m.pieces[0].kind, PieceType::Normal);
        assert_eq!(m.pieces[0].score, 0.0);
        assert_eq!(m.model_type, 1);
        assert_eq!((m.unk_id, m.bos_id, m.eos_id, m.pad_id), (0, 1, 2, -1));
        assert!(m.add_dummy_prefix && !m.byte_fallback);
        assert_eq!(m.unk_surface, " \u{2047} ");
    }

    #[test]
    fn stale_index_falls_back_to_scan() {
        let mut m = SpModel::parse(&synthetic()).unwrap();
        m.pieces.swap(0, 2);
        assert_eq!(m.piece_to_id("▁a"), Some(0));
        assert_eq!(m.piece_to_id("<unk>"), Some(2));
    }

    #[test]
    fn gguf_token_types() {
        let all = [
            (PieceType::Normal, 1),
            (PieceType::Unknown, 2),
            (PieceType::Control, 3),
            (PieceType::UserDefined, 4),
            (PieceType::Unused, 5),
            (PieceType::Byte, 6),
        ];
        for (t, v) in all {
            assert_eq!(t.gguf_token_type(), v);
            assert_eq!(PieceType::from_proto(i64::from(v)), Some(t));
        }
        assert_eq!(PieceType::from_proto(0), None);
        assert_eq!(PieceType::from_proto(7), None);
    }

    #[test]
    fn truncation_at_every_byte_is_an_error() {
        // A cut exactly where a top-level field ends is a valid (smaller) message; every other
        // cut must fail (n = 0 with NoPieces).
        let (full, ends) = synthetic_with_boundaries();
        assert_eq!(ends.last(), Some(&full.len()));
        for n in 0..full.len() {
            let r = SpModel::parse(&full[..n]);
            if ends.contains(&n) {
                assert!(r.is_ok(), "prefix of {n} bytes (a field boundary): {r:?}");
            } else {
                assert!(r.is_err(), "prefix of {n} bytes parsed");
            }
        }
        assert!(matches!(SpModel::parse(&[]), Err(SpError::NoPieces)));
        // Truncating inside the nested pieces too: cut a piece message short but keep the outer
        // length consistent, so the inner reader sees the truncation.
        let p = piece_msg(b"abc", Some(1.0), Some(1));
        for n in 1..p.len() {
            let mut m = Vec::new();
            w_bytes(&mut m, 1, &p[..n]);
            let r = SpModel::parse(&m);
            // Only cuts after the piece string (5) or the score (10) are valid.
            assert_eq!(r.is_ok(), n == 5 || n == 10, "inner cut at {n}: {r:?}");
        }
    }

    #[test]
    fn hostile_inputs() {
        // Huge length prefix.
        let mut m = Vec::new();
        w_key(&mut m, 1, WT_LEN);
        w_varint(&mut m, u64::MAX >> 1);
        assert!(matches!(SpModel::parse(&m), Err(SpError::Truncated { .. })));
        // Huge length in an unknown field.
        let mut m = Vec::new();
        w_key(&mut m, 99, WT_LEN);
        w_varint(&mut m, 1 << 40);
        assert!(matches!(SpModel::parse(&m), Err(SpError::Truncated { .. })));
        // Over-long varint.
        let mut m = Vec::new();
        w_key(&mut m, 99, WT_VARINT);
        m.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert!(matches!(SpModel::parse(&m), Err(SpError::BadVarint { .. })));
        // Wire types 6 and 7 do not exist.
        assert!(matches!(
            SpModel::parse(&[(1 << 3) | 6, 0]),
            Err(SpError::BadKey { .. })
        ));
        assert!(matches!(
            SpModel::parse(&[(1 << 3) | 7, 0]),
            Err(SpError::BadKey { .. })
        ));
        // Field number 0.
        assert!(matches!(
            SpModel::parse(&[0x02, 0x00]),
            Err(SpError::BadKey { .. })
        ));
        // Known field with the wrong wire type (pieces as varint).
        assert!(matches!(
            SpModel::parse(&[0x08, 0x01]),
            Err(SpError::WrongWireType { field: 1, .. })
        ));
        // Score as varint.
        let mut m = Vec::new();
        let mut p = Vec::new();
        w_bytes(&mut p, 1, b"a");
        w_int(&mut p, 2, 1);
        w_bytes(&mut m, 1, &p);
        assert!(matches!(
            SpModel::parse(&m),
            Err(SpError::WrongWireType { field: 2, .. })
        ));
        // Non-UTF-8 piece names its index.
        let mut m = Vec::new();
        w_bytes(&mut m, 1, &piece_msg(b"ok", None, None));
        w_bytes(&mut m, 1, &piece_msg(b"\xff\xfe", None, None));
        let e = SpModel::parse(&m).unwrap_err();
        assert!(matches!(e, SpError::PieceNotUtf8 { index: 1 }), "{e}");
        assert!(e.to_string().contains("piece 1"));
        // Unknown piece type 7.
        let mut m = Vec::new();
        w_bytes(&mut m, 1, &piece_msg(b"a", None, Some(7)));
        assert!(matches!(
            SpModel::parse(&m),
            Err(SpError::UnknownPieceType { index: 0, value: 7 })
        ));
        // Empty and duplicate pieces.
        let mut m = Vec::new();
        w_bytes(&mut m, 1, &piece_msg(b"", None, None));
        assert!(matches!(
            SpModel::parse(&m),
            Err(SpError::EmptyPiece { index: 0 })
        ));
        let mut m = Vec::new();
        w_bytes(&mut m, 1, &piece_msg(b"a", None, None));
        w_bytes(&mut m, 1, &piece_msg(b"a", None, None));
        assert!(matches!(
            SpModel::parse(&m),
            Err(SpError::DuplicatePiece {
                index: 1,
                first: 0,
                ..
            })
        ));
        // Only a trainer spec: no pieces.
        let mut m = Vec::new();
        w_bytes(&mut m, 2, &[]);
        assert!(matches!(SpModel::parse(&m), Err(SpError::NoPieces)));
        // Unbalanced and deeply nested groups.
        let mut m = Vec::new();
        w_key(&mut m, 9, WT_SGROUP);
        w_key(&mut m, 8, WT_EGROUP);
        assert!(matches!(SpModel::parse(&m), Err(SpError::BadGroup { .. })));
        let mut m = Vec::new();
        w_key(&mut m, 9, WT_EGROUP);
        assert!(matches!(SpModel::parse(&m), Err(SpError::BadGroup { .. })));
        let mut m = Vec::new();
        for _ in 0..10_000 {
            w_key(&mut m, 9, WT_SGROUP);
        }
        assert!(matches!(SpModel::parse(&m), Err(SpError::BadGroup { .. })));
    }

    #[test]
    fn open_reports_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.model");
        std::fs::write(&p, b"").unwrap();
        let e = SpModel::open(&p).unwrap_err();
        assert!(e.to_string().contains("tokenizer.model"), "{e}");
        assert!(e.to_string().contains("no pieces"), "{e}");
        let e = SpModel::open(&dir.path().join("missing.model")).unwrap_err();
        assert!(matches!(e, SpError::Io { .. }));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = SpModel::parse(&bytes);
        }

        #[test]
        fn mutated_model_never_panics(idx in 0usize..1000, val in any::<u8>()) {
            let mut m = synthetic();
            let n = m.len();
            m[idx % n] = val;
            let _ = SpModel::parse(&m);
        }
    }

    // ---- real tokenizers ----

    fn check_common(m: &SpModel) {
        assert_eq!(m.pieces[0].piece, "<unk>");
        assert_eq!(m.pieces[1].piece, "<s>");
        assert_eq!(m.pieces[2].piece, "</s>");
        assert_eq!(m.pieces[0].kind, PieceType::Unknown);
        assert_eq!(m.pieces[1].kind, PieceType::Control);
        assert_eq!(m.pieces[2].kind, PieceType::Control);
        for b in 0..=255u32 {
            let p = &m.pieces[3 + b as usize];
            assert_eq!(p.piece, format!("<0x{b:02X}>"));
            assert_eq!(p.kind, PieceType::Byte);
        }
        assert_eq!(m.pieces[259].kind, PieceType::Normal);
        assert_eq!(m.model_type, 2, "BPE");
        assert!(m.byte_fallback);
        assert_eq!((m.unk_id, m.bos_id, m.eos_id, m.pad_id), (0, 1, 2, -1));
        assert_eq!(m.piece_to_id("<0x0A>"), Some(13));
        assert_eq!(m.piece_to_id("▁▁"), Some(259));
        assert_eq!(m.pieces[259].score, -1e9);
    }

    #[test]
    fn llama2_tokenizer() {
        let Some(p) = fixture("fixtures/llama-2-tokenizer/tokenizer.model") else {
            return;
        };
        let m = SpModel::open(&p).unwrap();
        assert_eq!(m.len(), 32000);
        check_common(&m);
        compare_with_python(&p, &m);
    }

    #[test]
    fn chinese_llama2_tokenizer() {
        let Some(p) = fixture("fixtures/chinese-llama-2-tokenizer/tokenizer.model") else {
            return;
        };
        let m = SpModel::open(&p).unwrap();
        assert_eq!(m.len(), 55296);
        check_common(&m);
        compare_with_python(&p, &m);
    }

    const PY_VOCAB: &str = r#"
import json, sys
import sentencepiece as spm
sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
out = []
for i in range(sp.get_piece_size()):
    out.append([sp.id_to_piece(i), sp.get_score(i), sp.is_unknown(i), sp.is_control(i),
                sp.is_unused(i), sp.is_byte(i)])
json.dump(out, sys.stdout)
"#;

    const PY_PROTO: &str = r#"
import json, sys
from sentencepiece import sentencepiece_model_pb2 as pb
m = pb.ModelProto()
m.ParseFromString(open(sys.argv[1], 'rb').read())
t, n = m.trainer_spec, m.normalizer_spec
json.dump({
  "types": [p.type for p in m.pieces],
  "model_type": t.model_type, "vocab_size": t.vocab_size,
  "unk_id": t.unk_id, "bos_id": t.bos_id, "eos_id": t.eos_id, "pad_id": t.pad_id,
  "unk_piece": t.unk_piece, "bos_piece": t.bos_piece, "eos_piece": t.eos_piece,
  "pad_piece": t.pad_piece, "unk_surface": t.unk_surface,
  "byte_fallback": t.byte_fallback, "split_digits": t.split_digits,
  "split_by_unicode_script": t.split_by_unicode_script, "split_by_number": t.split_by_number,
  "split_by_whitespace": t.split_by_whitespace,
  "treat_whitespace_as_suffix": t.treat_whitespace_as_suffix,
  "allow_whitespace_only_pieces": t.allow_whitespace_only_pieces,
  "max_sentencepiece_length": t.max_sentencepiece_length,
  "name": n.name, "charsmap_len": len(n.precompiled_charsmap),
  "add_dummy_prefix": n.add_dummy_prefix, "remove_extra_whitespaces": n.remove_extra_whitespaces,
  "escape_whitespaces": n.escape_whitespaces, "has_denormalizer": m.HasField("denormalizer_spec"),
}, sys.stdout)
"#;

    fn run_python(script: &str, model: &Path) -> Option<serde_json::Value> {
        let out = match std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(model)
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                skip(&format!("python3 ({e})"), HOW_PYTHON);
                return None;
            }
        };
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err.lines().last().unwrap_or("");
            skip(
                &format!("python3 with sentencepiece and protobuf ({last})"),
                HOW_PYTHON,
            );
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).unwrap())
    }

    fn compare_with_python(path: &Path, m: &SpModel) {
        if let Some(v) = run_python(PY_VOCAB, path) {
            let v = v.as_array().unwrap();
            assert_eq!(v.len(), m.len());
            for (i, (row, p)) in v.iter().zip(&m.pieces).enumerate() {
                let row = row.as_array().unwrap();
                assert_eq!(row[0].as_str().unwrap(), p.piece, "piece {i}");
                let score = row[1].as_f64().unwrap() as f32;
                assert_eq!(score.to_bits(), p.score.to_bits(), "score {i}");
                let flags: Vec<bool> = row[2..].iter().map(|b| b.as_bool().unwrap()).collect();
                let want = [
                    p.kind == PieceType::Unknown,
                    p.kind == PieceType::Control,
                    p.kind == PieceType::Unused,
                    p.kind == PieceType::Byte,
                ];
                assert_eq!(flags, want, "type flags {i}");
            }
        }
        if let Some(v) = run_python(PY_PROTO, path) {
            let types = v["types"].as_array().unwrap();
            assert_eq!(types.len(), m.len());
            for (i, (t, p)) in types.iter().zip(&m.pieces).enumerate() {
                assert_eq!(
                    t.as_i64().unwrap(),
                    i64::from(p.kind.proto_value()),
                    "type {i}"
                );
            }
            let int = |k: &str| v[k].as_i64().unwrap();
            let b = |k: &str| v[k].as_bool().unwrap();
            let s = |k: &str| v[k].as_str().unwrap().to_owned();
            assert_eq!(int("model_type"), i64::from(m.model_type));
            assert_eq!(int("vocab_size"), i64::from(m.vocab_size));
            assert_eq!(int("unk_id"), i64::from(m.unk_id));
            assert_eq!(int("bos_id"), i64::from(m.bos_id));
            assert_eq!(int("eos_id"), i64::from(m.eos_id));
            assert_eq!(int("pad_id"), i64::from(m.pad_id));
            assert_eq!(s("unk_piece"), m.unk_piece);
            assert_eq!(s("bos_piece"), m.bos_piece);
            assert_eq!(s("eos_piece"), m.eos_piece);
            assert_eq!(s("pad_piece"), m.pad_piece);
            assert_eq!(s("unk_surface"), m.unk_surface);
            assert_eq!(b("byte_fallback"), m.byte_fallback);
            assert_eq!(b("split_digits"), m.split_digits);
            assert_eq!(b("split_by_unicode_script"), m.split_by_unicode_script);
            assert_eq!(b("split_by_number"), m.split_by_number);
            assert_eq!(b("split_by_whitespace"), m.split_by_whitespace);
            assert_eq!(
                b("treat_whitespace_as_suffix"),
                m.treat_whitespace_as_suffix
            );
            assert_eq!(
                b("allow_whitespace_only_pieces"),
                m.allow_whitespace_only_pieces
            );
            assert_eq!(
                int("max_sentencepiece_length"),
                i64::from(m.max_piece_length)
            );
            assert_eq!(s("name"), m.normalizer_name);
            assert_eq!(int("charsmap_len") as usize, m.precompiled_charsmap.len());
            assert_eq!(b("add_dummy_prefix"), m.add_dummy_prefix);
            assert_eq!(b("remove_extra_whitespaces"), m.remove_extra_whitespaces);
            assert_eq!(b("escape_whitespaces"), m.escape_whitespaces);
            assert_eq!(b("has_denormalizer"), m.has_denormalizer);
        }
    }
}
