//! Importance-matrix files of llama.cpp: the current GGUF format (`<name>.in_sum2` and
//! `<name>.counts` F32 tensors, `general.type = imatrix`, `imatrix.datasets`,
//! `imatrix.chunk_count`, `imatrix.chunk_size`) and the legacy `.dat` format; reading both (as
//! `common_imatrix_load` does), writing both (as llama-imatrix's `save_imatrix` /
//! `save_imatrix_legacy` do), and the per-column weights llama-quantize derives from them.
//!
//! In memory an entry is what llama-imatrix accumulates: `sums[m*ncols + j]`, the sum over tokens of
//! the squared input activation of column `j` of matrix `m` (one matrix for a dense weight, one per
//! expert for a merged MoE tensor), and `counts[m]`, the number of tokens. A legacy file holds
//! `sums/count * ncall` and `counts = [ncall]` instead ([`Imatrix::is_legacy`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_quant::GgmlType;

use crate::atomic::AtomicFile;
use crate::gguf::{serialize_header, GgufArray, GgufError, GgufHeader, GgufValue};

/// `imatrix.datasets`.
pub const KEY_DATASETS: &str = "imatrix.datasets";
/// `imatrix.chunk_count`.
pub const KEY_CHUNK_COUNT: &str = "imatrix.chunk_count";
/// `imatrix.chunk_size`.
pub const KEY_CHUNK_SIZE: &str = "imatrix.chunk_size";

/// Largest entry count, name length or value count accepted from a legacy file.
const MAX_LEGACY: i64 = 1 << 28;

/// What can go wrong reading or writing an imatrix file.
#[derive(Debug, thiserror::Error)]
pub enum ImatrixError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<ImatrixError>,
    },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("imatrix file holds no entries")]
    NoData,
    #[error("legacy imatrix: {what} at offset {offset} is cut short")]
    Truncated { what: String, offset: usize },
    #[error("legacy imatrix: {what} is {value}, outside 1..={max}")]
    BadSize { what: String, value: i64, max: i64 },
    #[error(
        "imatrix entry {name}: {missing} tensor is missing (both .in_sum2 and .counts are needed)"
    )]
    Unpaired { name: String, missing: &'static str },
    #[error("imatrix tensor {tensor} is {ty}, expected F32")]
    NotF32 { tensor: String, ty: GgmlType },
    #[error("imatrix entry {name}: {sums} sums do not split into {counts} matrices")]
    Shape {
        name: String,
        sums: usize,
        counts: usize,
    },
    #[error("imatrix entry {name}: count {value} is not a finite number")]
    BadCount { name: String, value: f32 },
    #[error("metadata {key} has type {found}, expected {expected}")]
    KeyType {
        key: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error("imatrix entry {name}: {what}")]
    Invalid { name: String, what: String },
}

impl ImatrixError {
    fn in_file(self, path: &Path) -> ImatrixError {
        match self {
            e @ (ImatrixError::Io { .. } | ImatrixError::InFile { .. }) => e,
            e => ImatrixError::InFile {
                path: path.to_path_buf(),
                source: Box::new(e),
            },
        }
    }
}

/// One weight's statistics (see the module docs).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImatrixEntry {
    pub sums: Vec<f32>,
    pub counts: Vec<i64>,
}

/// A loaded imatrix file (`common_imatrix`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Imatrix {
    /// Entries by weight name (`blk.0.attn_q.weight`), sorted.
    pub entries: BTreeMap<String, ImatrixEntry>,
    pub datasets: Vec<String>,
    pub chunk_count: u32,
    pub chunk_size: u32,
    /// Read from a legacy `.dat` file: sums are `sum/count * ncall`, counts `[ncall]`.
    pub is_legacy: bool,
    /// A GGUF file with all three `imatrix.*` keys (llama-quantize refuses GGUF files without).
    pub has_metadata: bool,
}

fn le_f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A C string from bytes: up to the first NUL (as `std::string{ptr}` reads it).
fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

struct Cur<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], ImatrixError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| ImatrixError::Truncated {
                what: what(),
                offset: self.pos,
            })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn i32(&mut self, what: &dyn Fn() -> String) -> Result<i32, ImatrixError> {
        let s = self.take(4, what)?;
        Ok(i32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn size(&mut self, what: &dyn Fn() -> String, min: i64) -> Result<usize, ImatrixError> {
        let v = i64::from(self.i32(what)?);
        if v < min || v > MAX_LEGACY {
            return Err(ImatrixError::BadSize {
                what: what(),
                value: v,
                max: MAX_LEGACY,
            });
        }
        Ok(v as usize)
    }
    fn at_end(&self) -> bool {
        self.pos >= self.b.len()
    }
}

impl Imatrix {
    /// Reads a file: GGUF when it starts with the GGUF magic, else the legacy format.
    pub fn read(path: &Path) -> Result<Imatrix, ImatrixError> {
        let bytes = std::fs::read(path).map_err(|source| ImatrixError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Imatrix::parse(&bytes).map_err(|e| e.in_file(path))
    }

    /// Parses a whole file's bytes (GGUF or legacy).
    pub fn parse(bytes: &[u8]) -> Result<Imatrix, ImatrixError> {
        if bytes.starts_with(b"GGUF") {
            Imatrix::parse_gguf(bytes)
        } else {
            Imatrix::parse_legacy(bytes)
        }
    }

    /// Parses the GGUF format.
    pub fn parse_gguf(bytes: &[u8]) -> Result<Imatrix, ImatrixError> {
        let h = GgufHeader::parse(bytes)?;
        if h.tensors.is_empty() {
            return Err(ImatrixError::NoData);
        }
        let mut m = Imatrix::default();
        if let Some(GgufValue::Array(GgufArray::String(v))) = h.get(KEY_DATASETS) {
            m.datasets = v.clone();
        }
        let u32_key = |key: &'static str| -> Result<Option<u32>, ImatrixError> {
            match h.get(key) {
                None => Ok(None),
                Some(GgufValue::U32(v)) => Ok(Some(*v)),
                Some(other) => Err(ImatrixError::KeyType {
                    key,
                    found: format!("{:?}", other.value_type()),
                    expected: "u32",
                }),
            }
        };
        let cc = u32_key(KEY_CHUNK_COUNT)?;
        let cs = u32_key(KEY_CHUNK_SIZE)?;
        m.has_metadata = h.get(KEY_DATASETS).is_some() && cc.is_some() && cs.is_some();
        m.chunk_count = cc.unwrap_or(0);
        m.chunk_size = cs.unwrap_or(0);
        type Pair<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);
        let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();
        for t in &h.tensors {
            let (base, is_sums) = if let Some(b) = t.name.strip_suffix(".in_sum2") {
                (b, true)
            } else if let Some(b) = t.name.strip_suffix(".counts") {
                (b, false)
            } else {
                continue;
            };
            if t.ty != GgmlType::F32 {
                return Err(ImatrixError::NotF32 {
                    tensor: t.name.clone(),
                    ty: t.ty,
                });
            }
            let start = h.data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.n_bytes()));
            let data = match (start, end) {
                (Some(s), Some(e)) => usize::try_from(s)
                    .ok()
                    .zip(usize::try_from(e).ok())
                    .and_then(|(s, e)| bytes.get(s..e)),
                _ => None,
            }
            .ok_or_else(|| ImatrixError::Invalid {
                name: t.name.clone(),
                what: "data lies outside the file".into(),
            })?;
            let p = pairs.entry(base.to_string()).or_default();
            if is_sums {
                p.0 = Some(data);
            } else {
                p.1 = Some(data);
            }
        }
        for (name, (sums, counts)) in pairs {
            let (sums, counts) = match (sums, counts) {
                (Some(s), Some(c)) => (s, c),
                (None, _) => {
                    return Err(ImatrixError::Unpaired {
                        name,
                        missing: ".in_sum2",
                    })
                }
                (_, None) => {
                    return Err(ImatrixError::Unpaired {
                        name,
                        missing: ".counts",
                    })
                }
            };
            let sums = le_f32s(sums);
            let mut cs = Vec::with_capacity(counts.len() / 4);
            for c in le_f32s(counts) {
                if !c.is_finite() || c.abs() > 9.0e18 {
                    return Err(ImatrixError::BadCount { name, value: c });
                }
                cs.push(c.round() as i64); // lround: halves away from zero
            }
            if cs.is_empty() || !sums.len().is_multiple_of(cs.len()) {
                return Err(ImatrixError::Shape {
                    name,
                    sums: sums.len(),
                    counts: cs.len(),
                });
            }
            m.entries.insert(name, ImatrixEntry { sums, counts: cs });
        }
        if m.entries.is_empty() {
            return Err(ImatrixError::NoData);
        }
        Ok(m)
    }

    /// Parses the legacy format: `i32 n_entries`, then per entry `i32 len, name, i32 ncall,
    /// i32 nval, f32[nval]`, then optionally `i32 chunk_count, i32 len, dataset`.
    pub fn parse_legacy(bytes: &[u8]) -> Result<Imatrix, ImatrixError> {
        let mut c = Cur { b: bytes, pos: 0 };
        let n = c.size(&|| "entry count".into(), 1)?;
        let mut m = Imatrix {
            is_legacy: true,
            ..Default::default()
        };
        for i in 0..n {
            let len = c.size(&|| format!("name length of entry {i}"), 0)?;
            let name = c_string(c.take(len, &|| format!("name of entry {i}"))?);
            let ncall = c.i32(&|| format!("ncall of {name}"))?;
            let nval = c.size(&|| format!("value count of {name}"), 1)?;
            let data = c.take(nval * 4, &|| format!("values of {name}"))?;
            m.entries.insert(
                name,
                ImatrixEntry {
                    sums: le_f32s(data),
                    counts: vec![i64::from(ncall)],
                },
            );
        }
        if !c.at_end() {
            if let Ok(n_calls) = c.i32(&String::new) {
                m.chunk_count = n_calls as u32;
                if let Ok(len) = c.i32(&String::new) {
                    if len > 0 {
                        if let Ok(d) = c.take(len as usize, &String::new) {
                            m.datasets.push(c_string(d));
                        }
                    }
                }
            }
        }
        Ok(m)
    }

    /// The per-column importance weights llama-quantize derives (its `load_imatrix`): for GGUF,
    /// `sums / count` per matrix (1 where a matrix has no tokens); for legacy files, `sums / ncall`
    /// (the sums as they are when `ncall <= 0`).
    pub fn quant_weights(&self) -> BTreeMap<String, Vec<f32>> {
        let mut out = BTreeMap::new();
        for (name, e) in &self.entries {
            let mut w = vec![0f32; e.sums.len()];
            if self.is_legacy {
                let ncall = e.counts.first().copied().unwrap_or(0);
                for (o, &s) in w.iter_mut().zip(&e.sums) {
                    *o = if ncall > 0 { s / ncall as f32 } else { s };
                }
            } else if !e.counts.is_empty() {
                let ne0 = e.sums.len() / e.counts.len();
                for ((ws, ss), &c) in w
                    .chunks_mut(ne0.max(1))
                    .zip(e.sums.chunks(ne0.max(1)))
                    .zip(&e.counts)
                {
                    let count = c as f32;
                    for (o, &s) in ws.iter_mut().zip(ss) {
                        *o = if count > 0.0 { s / count } else { 1.0 };
                    }
                }
            }
            out.insert(name.clone(), w);
        }
        out
    }

    /// This file's data as raw accumulators, as llama-imatrix's `--in-file` loads it: GGUF
    /// entries as they are; legacy entries times `chunk_size` (`sums*chunk_size`,
    /// `counts = [ncall*chunk_size]`).
    pub fn raw_entries(&self, chunk_size: u32) -> BTreeMap<String, ImatrixEntry> {
        if !self.is_legacy {
            return self.entries.clone();
        }
        let cs = chunk_size as f32;
        self.entries
            .iter()
            .map(|(n, e)| {
                let c = e.counts.first().copied().unwrap_or(0);
                (
                    n.clone(),
                    ImatrixEntry {
                        sums: e.sums.iter().map(|&s| s * cs).collect(),
                        counts: vec![c.saturating_mul(i64::from(chunk_size))],
                    },
                )
            })
            .collect()
    }
}

/// Serializes raw accumulators in llama-imatrix's GGUF format (`save_imatrix`): metadata
/// `general.type`, `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`; tensors in name
/// order, `<name>.in_sum2` (`[ncols, nmat]`) then `<name>.counts` (`[1, nmat]`), trailing unit
/// dimensions dropped as ggml writes them. Entries without values or counts are skipped.
pub fn gguf_bytes(
    entries: &BTreeMap<String, ImatrixEntry>,
    datasets: &[String],
    chunk_count: u32,
    chunk_size: u32,
) -> Result<Vec<u8>, ImatrixError> {
    let meta = vec![
        (
            "general.type".to_string(),
            GgufValue::String("imatrix".into()),
        ),
        (
            KEY_DATASETS.to_string(),
            GgufValue::Array(GgufArray::String(datasets.to_vec())),
        ),
        (KEY_CHUNK_COUNT.to_string(), GgufValue::U32(chunk_count)),
        (KEY_CHUNK_SIZE.to_string(), GgufValue::U32(chunk_size)),
    ];
    let dims = |a: u64, b: u64| if b == 1 { vec![a] } else { vec![a, b] };
    let mut infos = Vec::new();
    let mut data: Vec<Vec<u8>> = Vec::new();
    for (name, e) in entries {
        let (nval, nmat) = (e.sums.len(), e.counts.len());
        if nval == 0 || nmat == 0 {
            continue;
        }
        if !nval.is_multiple_of(nmat) {
            return Err(ImatrixError::Shape {
                name: name.clone(),
                sums: nval,
                counts: nmat,
            });
        }
        infos.push((
            format!("{name}.in_sum2"),
            dims((nval / nmat) as u64, nmat as u64),
            GgmlType::F32,
        ));
        data.push(e.sums.iter().flat_map(|v| v.to_le_bytes()).collect());
        infos.push((
            format!("{name}.counts"),
            dims(1, nmat as u64),
            GgmlType::F32,
        ));
        data.push(
            e.counts
                .iter()
                .flat_map(|&c| (c as f32).to_le_bytes())
                .collect(),
        );
    }
    let mut out = serialize_header(&meta, &infos)?;
    for d in data {
        out.extend_from_slice(&d);
        out.resize(out.len().next_multiple_of(32), 0);
    }
    Ok(out)
}

/// Serializes raw accumulators in the legacy format (`save_imatrix_legacy`): entries with no
/// tokens at all are skipped; per entry `ncall = ceil(max(counts) / chunk_size)` and values
/// `sums/count * ncall` (1 where a matrix has no tokens); then `chunk_count` and `dataset`.
pub fn legacy_bytes(
    entries: &BTreeMap<String, ImatrixEntry>,
    chunk_size: u32,
    chunk_count: i32,
    dataset: &str,
) -> Vec<u8> {
    let cs = i64::from(chunk_size.max(1));
    let stored: Vec<(&String, &ImatrixEntry)> = entries
        .iter()
        .filter(|(_, e)| !e.counts.is_empty() && e.counts.iter().any(|&c| c != 0))
        .collect();
    let mut out = Vec::new();
    out.extend_from_slice(&(stored.len() as i32).to_le_bytes());
    for (name, e) in stored {
        out.extend_from_slice(&(name.len() as i32).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        let max = e.counts.iter().copied().max().unwrap_or(0);
        let ncall = (max.saturating_add(cs - 1) / cs) as i32;
        out.extend_from_slice(&ncall.to_le_bytes());
        let nval = e.sums.len();
        let nmat = e.counts.len();
        out.extend_from_slice(&(nval as i32).to_le_bytes());
        let per = (nval / nmat).max(1);
        for (i, &v) in e.sums.iter().enumerate() {
            let mut count = e.counts.get(i / per).copied().unwrap_or(0) as f32;
            let mut value = v;
            if count == 0.0 {
                value = 1.0;
                count = 1.0;
            }
            out.extend_from_slice(&((value / count) * ncall as f32).to_le_bytes());
        }
    }
    out.extend_from_slice(&chunk_count.to_le_bytes());
    out.extend_from_slice(&(dataset.len() as i32).to_le_bytes());
    out.extend_from_slice(dataset.as_bytes());
    out
}

/// Writes `bytes` to `path` atomically (nothing appears there unless the write succeeds).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ImatrixError> {
    let io = |source| ImatrixError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = AtomicFile::create(path).map_err(io)?;
    f.file().write_all(bytes).map_err(io)?;
    f.commit().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> BTreeMap<String, ImatrixEntry> {
        let mut m = BTreeMap::new();
        m.insert(
            "blk.0.attn_q.weight".to_string(),
            ImatrixEntry {
                sums: vec![1.0, 4.0, 9.0, 16.0],
                counts: vec![512],
            },
        );
        m.insert(
            "blk.0.ffn_down_exps.weight".to_string(),
            ImatrixEntry {
                sums: vec![2.0, 2.0, 3.0, 3.0, 5.0, 5.0],
                counts: vec![4, 0, 10],
            },
        );
        m
    }

    #[test]
    fn gguf_round_trip_and_weights() {
        let e = sample();
        let b = gguf_bytes(&e, &["a.txt".into()], 1, 512).unwrap();
        let m = Imatrix::parse(&b).unwrap();
        assert!(!m.is_legacy && m.has_metadata);
        assert_eq!(m.entries, e);
        assert_eq!(m.datasets, vec!["a.txt".to_string()]);
        assert_eq!((m.chunk_count, m.chunk_size), (1, 512));
        let h = GgufHeader::parse(&b).unwrap();
        assert_eq!(h.get("general.type").unwrap().as_str(), Some("imatrix"));
        assert_eq!(h.tensors[0].name, "blk.0.attn_q.weight.in_sum2");
        assert_eq!(h.tensors[0].shape, vec![4]);
        assert_eq!(h.tensors[1].shape, vec![1]);
        assert_eq!(h.tensors[2].shape, vec![2, 3]);
        assert_eq!(h.tensors[3].shape, vec![1, 3]);
        let w = m.quant_weights();
        assert_eq!(
            w["blk.0.attn_q.weight"],
            vec![1.0 / 512.0, 4.0 / 512.0, 9.0 / 512.0, 16.0 / 512.0]
        );
        assert_eq!(
            w["blk.0.ffn_down_exps.weight"],
            vec![0.5, 0.5, 1.0, 1.0, 0.5, 0.5]
        );
        assert_eq!(m.raw_entries(512), e);
    }

    #[test]
    fn legacy_round_trip_and_weights() {
        let e = sample();
        let b = legacy_bytes(&e, 512, 3, "calib.txt");
        let m = Imatrix::parse(&b).unwrap();
        assert!(m.is_legacy && !m.has_metadata);
        assert_eq!(m.chunk_count, 3);
        assert_eq!(m.datasets, vec!["calib.txt".to_string()]);
        let q = &m.entries["blk.0.attn_q.weight"];
        assert_eq!(q.counts, vec![1]);
        assert_eq!(
            q.sums,
            vec![1.0 / 512.0, 4.0 / 512.0, 9.0 / 512.0, 16.0 / 512.0]
        );
        // experts: ncall = ceil(10/512) = 1; the empty expert stores 1
        let x = &m.entries["blk.0.ffn_down_exps.weight"];
        assert_eq!(x.sums, vec![0.5, 0.5, 1.0, 1.0, 0.5, 0.5]);
        assert_eq!(m.quant_weights()["blk.0.attn_q.weight"], q.sums);
        let raw = m.raw_entries(512);
        assert_eq!(raw["blk.0.attn_q.weight"].counts, vec![512]);
        assert_eq!(raw["blk.0.attn_q.weight"].sums, vec![1.0, 4.0, 9.0, 16.0]);
        // no trailer is fine
        let m2 = Imatrix::parse(&b[..b.len() - 4 - 4 - 9]).unwrap();
        assert_eq!(m2.chunk_count, 0);
        assert!(m2.datasets.is_empty());
    }

    #[test]
    fn hostile_legacy() {
        let e = sample();
        let b = legacy_bytes(&e, 512, 3, "calib.txt");
        // every truncation inside the entries fails cleanly
        let body = b.len() - 4 - 4 - 9;
        for n in 0..body {
            assert!(Imatrix::parse(&b[..n]).is_err(), "{n}");
        }
        // absurd sizes
        let mut bad = b.clone();
        bad[4..8].copy_from_slice(&(-5i32).to_le_bytes());
        assert!(matches!(
            Imatrix::parse(&bad),
            Err(ImatrixError::BadSize { .. })
        ));
        let mut bad = b.clone();
        bad[0..4].copy_from_slice(&i32::MAX.to_le_bytes());
        assert!(matches!(
            Imatrix::parse(&bad),
            Err(ImatrixError::BadSize { .. })
        ));
        assert!(matches!(
            Imatrix::parse(&0i32.to_le_bytes()),
            Err(ImatrixError::BadSize { .. })
        ));
        let nlen = "blk.0.attn_q.weight".len();
        let mut bad = b.clone();
        let at = 8 + nlen + 4;
        bad[at..at + 4].copy_from_slice(&0x7fff_fff0i32.to_le_bytes());
        assert!(Imatrix::parse(&bad).is_err());
    }

    #[test]
    fn hostile_gguf() {
        let e = sample();
        let b = gguf_bytes(&e, &[], 0, 512).unwrap();
        for n in [0, 3, 4, 10, 40, b.len() / 2, b.len() - 21] {
            assert!(Imatrix::parse_gguf(&b[..n]).is_err(), "{n}");
        }
        // an unpaired tensor
        let mut one = BTreeMap::new();
        one.insert("x".to_string(), e["blk.0.attn_q.weight"].clone());
        let meta = vec![("imatrix.chunk_size".to_string(), GgufValue::U32(512))];
        let infos = vec![("x.in_sum2".to_string(), vec![4], GgmlType::F32)];
        let mut only = serialize_header(&meta, &infos).unwrap();
        only.extend_from_slice(&[0u8; 32]);
        assert!(matches!(
            Imatrix::parse(&only),
            Err(ImatrixError::Unpaired {
                missing: ".counts",
                ..
            })
        ));
        // wrong key type
        let meta = vec![("imatrix.chunk_size".to_string(), GgufValue::I32(512))];
        let infos = vec![
            ("x.in_sum2".to_string(), vec![4], GgmlType::F32),
            ("x.counts".to_string(), vec![1], GgmlType::F32),
        ];
        let mut f = serialize_header(&meta, &infos).unwrap();
        f.extend_from_slice(&[0u8; 64]);
        assert!(matches!(
            Imatrix::parse(&f),
            Err(ImatrixError::KeyType { .. })
        ));
        // non-finite count, shape mismatch
        let meta: Vec<(String, GgufValue)> = vec![];
        let infos = vec![
            ("x.counts".to_string(), vec![3], GgmlType::F32),
            ("x.in_sum2".to_string(), vec![4], GgmlType::F32),
        ];
        let mut f = serialize_header(&meta, &infos).unwrap();
        f.extend_from_slice(&[0u8; 64]);
        assert!(matches!(
            Imatrix::parse(&f),
            Err(ImatrixError::Shape { .. })
        ));
        let mut g = f.clone();
        let d = g.len() - 64;
        g[d..d + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(
            Imatrix::parse(&g),
            Err(ImatrixError::BadCount { .. })
        ));
        // no tensors
        let f = serialize_header(&[], &[]).unwrap();
        assert!(matches!(Imatrix::parse(&f), Err(ImatrixError::NoData)));
    }

    proptest! {
        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Imatrix::parse(&b);
            let mut g = b"GGUF".to_vec();
            g.extend_from_slice(&b);
            let _ = Imatrix::parse(&g);
        }
    }
}
