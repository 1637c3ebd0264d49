//! Unified read-only view of a Hugging Face / PEFT checkpoint: safetensors (single or sharded) or
//! PyTorch zip `.bin` (single or sharded). Tensors are borrowed straight from the memory maps.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::mmap::MappedFile;
use crate::pickle::PickleError;

/// Element type of a checkpoint tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Upper-case name as safetensors spells it.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Name, type and shape of a tensor.
#[derive(Clone, Debug)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: DType,
    /// PyTorch order, rows first.
    pub shape: Vec<usize>,
}

/// A tensor's bytes, borrowed from the memory map.
pub struct TensorData<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    /// Contiguous little-endian elements.
    pub bytes: &'a [u8],
}

impl TensorData<'_> {
    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }

    /// The elements widened exactly to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::new();
        self.to_f32_into(&mut out);
        out
    }

    /// The elements widened exactly to f32, replacing the contents of `out` (its capacity is reused).
    pub fn to_f32_into(&self, out: &mut Vec<f32>) {
        out.clear();
        out.reserve(self.n_elements());
        match self.dtype {
            DType::F32 => out.extend(
                self.bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            DType::F16 => out.extend(
                self.bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            DType::BF16 => out.extend(
                self.bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
        }
    }
}

/// Why a checkpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid safetensors file: {source}", path.display())]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{}: safetensors header: {what}", path.display())]
    SafetensorsHeader { path: PathBuf, what: String },
    #[error("{}: tensor `{tensor}` has dtype {dtype}; only F32, F16 and BF16 are supported", path.display())]
    UnsupportedDType {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{}: data.pkl: {source}", path.display())]
    Pickle {
        path: PathBuf,
        #[source]
        source: PickleError,
    },
    #[error("{}: invalid zip archive: {source}", path.display())]
    Zip {
        path: PathBuf,
        #[source]
        source: zip::result::ZipError,
    },
    #[error("{}: legacy (pre-1.6, non-zip) PyTorch checkpoint; re-save it with torch>=1.6 (torch.save) or convert it to safetensors", path.display())]
    LegacyTorch { path: PathBuf },
    #[error("{}: not a PyTorch zip checkpoint: {what}", path.display())]
    NotTorchZip { path: PathBuf, what: String },
    #[error("{}: zip entry `{entry}` is compressed ({method}); PyTorch storages must be stored uncompressed so they can be memory-mapped", path.display())]
    CompressedEntry {
        path: PathBuf,
        entry: String,
        method: String,
    },
    #[error("{}: zip entry `{entry}` is encrypted", path.display())]
    EncryptedEntry { path: PathBuf, entry: String },
    #[error("{}: zip entry `{entry}` lies outside the file", path.display())]
    EntryOutOfBounds { path: PathBuf, entry: String },
    #[error("{}: byteorder is `{found}`; only little-endian checkpoints are supported", path.display())]
    BigEndian { path: PathBuf, found: String },
    #[error("{}: tensor `{tensor}` needs storage entry `{entry}`, which is missing", path.display())]
    MissingStorage {
        path: PathBuf,
        tensor: String,
        entry: String,
    },
    #[error("{}: storage `{key}` is used as both {first} and {second}", path.display())]
    StorageDTypeConflict {
        path: PathBuf,
        key: String,
        first: DType,
        second: DType,
    },
    #[error("{}: tensor `{tensor}` needs bytes {need_start}..{need_end} of storage `{key}`, which has {have} bytes", path.display())]
    StorageTooSmall {
        path: PathBuf,
        tensor: String,
        key: String,
        need_start: u64,
        need_end: u64,
        have: u64,
    },
    #[error("{}: tensor `{tensor}` with shape {shape:?} has stride {stride:?}; only contiguous (row-major) tensors are supported", path.display())]
    NonContiguous {
        path: PathBuf,
        tensor: String,
        shape: Vec<u64>,
        stride: Vec<u64>,
    },
    #[error("{}: tensor `{tensor}` shape {shape:?} overflows", path.display())]
    ShapeOverflow {
        path: PathBuf,
        tensor: String,
        shape: Vec<u64>,
    },
    #[error("{}: invalid index JSON: {what}", path.display())]
    Index { path: PathBuf, what: String },
    #[error("{}: shard `{shard}` named by the index does not exist", index.display())]
    MissingShard { index: PathBuf, shard: PathBuf },
    #[error("{}: shard name `{shard}` is not a plain file name", index.display())]
    BadShardName { index: PathBuf, shard: String },
    #[error("{}: index puts `{tensor}` in {}, but that shard does not contain it", index.display(), shard.display())]
    TensorNotInShard {
        index: PathBuf,
        tensor: String,
        shard: PathBuf,
    },
    #[error("{}: tensor `{tensor}` is in shard {} but the index does not list it there", index.display(), shard.display())]
    UnlistedTensor {
        index: PathBuf,
        tensor: String,
        shard: PathBuf,
    },
    #[error("tensor `{tensor}` appears in both {} and {}", first.display(), second.display())]
    DuplicateTensor {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("{}: no checkpoint found (looked for model.safetensors.index.json, model.safetensors, pytorch_model.bin.index.json, pytorch_model.bin, adapter_model.safetensors, adapter_model.bin, or a single *.safetensors)", dir.display())]
    NotFound { dir: PathBuf },
    #[error("no tensor named `{name}` in the checkpoint")]
    NoSuchTensor { name: String },
}

/// Where a tensor's bytes live.
#[derive(Clone, Debug)]
pub(crate) struct Location {
    pub file: usize,
    pub offset: usize,
    pub len: usize,
}

/// Name → shard file, from a `*.index.json`.
#[derive(Debug)]
pub struct WeightMap {
    pub index: PathBuf,
    /// Shard paths, sorted and deduplicated.
    pub shards: Vec<PathBuf>,
    /// Tensor name → position in `shards`.
    pub map: HashMap<String, usize>,
}

/// Largest index JSON accepted.
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// Parses the text of an index JSON (`index` only names it in errors) into (tensor, shard file
/// name) pairs, checking each shard name is a plain file name. Touches no files.
pub fn parse_weight_map(
    index: &Path,
    json: &[u8],
) -> Result<Vec<(String, String)>, CheckpointError> {
    let bad = |what: String| CheckpointError::Index {
        path: index.to_path_buf(),
        what,
    };
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
    let wm = v
        .get("weight_map")
        .and_then(|w| w.as_object())
        .ok_or_else(|| bad("no `weight_map` object".to_string()))?;
    let mut out = Vec::with_capacity(wm.len());
    for (tensor, shard) in wm {
        let s = shard
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[`{tensor}`] is not a string")))?;
        if s.is_empty() || s.contains(['/', '\\']) || s == "." || s == ".." {
            return Err(CheckpointError::BadShardName {
                index: index.to_path_buf(),
                shard: s.to_string(),
            });
        }
        out.push((tensor.clone(), s.to_string()));
    }
    Ok(out)
}

/// Reads a `model.safetensors.index.json` / `pytorch_model.bin.index.json`, checking that every
/// shard it names is a plain file name that exists next to the index.
pub fn read_weight_map(index: &Path) -> Result<WeightMap, CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: index.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(index).map_err(io)?.len();
    if len > MAX_INDEX_BYTES {
        return Err(CheckpointError::Index {
            path: index.to_path_buf(),
            what: format!("{len} bytes is larger than the {MAX_INDEX_BYTES}-byte limit"),
        });
    }
    let text = std::fs::read(index).map_err(io)?;
    let pairs = parse_weight_map(index, &text)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut names: Vec<&str> = pairs.iter().map(|(_, s)| s.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let shards: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    for s in &shards {
        if !s.is_file() {
            return Err(CheckpointError::MissingShard {
                index: index.to_path_buf(),
                shard: s.clone(),
            });
        }
    }
    let mut map = HashMap::with_capacity(pairs.len());
    for (tensor, shard) in &pairs {
        let i = names.binary_search(&shard.as_str()).unwrap_or_default();
        map.insert(tensor.clone(), i);
    }
    Ok(WeightMap {
        index: index.to_path_buf(),
        shards,
        map,
    })
}

/// One tensor found while scanning a file: meta and absolute byte range within that file.
#[derive(Clone, Debug)]
pub struct FileTensor {
    pub meta: TensorMeta,
    pub offset: usize,
    pub len: usize,
}

/// A checkpoint opened for reading.
pub struct Checkpoint {
    format: &'static str,
    files: Vec<PathBuf>,
    maps: Vec<MappedFile>,
    tensors: Vec<TensorMeta>,
    locs: Vec<Location>,
    by_name: HashMap<String, usize>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Safetensors,
    Torch,
}

impl Kind {
    fn scan(self, path: &Path, map: &MappedFile) -> Result<Vec<FileTensor>, CheckpointError> {
        match self {
            Kind::Safetensors => crate::safetensors::scan(path, map.bytes()),
            Kind::Torch => crate::torch::scan(path, map.bytes()),
        }
    }
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("format", &self.format)
            .field("files", &self.files)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// `path`: a folder (looks for, in this order: model.safetensors.index.json, model.safetensors,
    /// pytorch_model.bin.index.json, pytorch_model.bin, adapter_model.safetensors, adapter_model.bin;
    /// also a lone *.safetensors) or a single .safetensors/.bin file or *.index.json.
    pub fn open(path: &Path) -> Result<Checkpoint, CheckpointError> {
        if path.is_dir() {
            for (name, kind, sharded) in [
                ("model.safetensors.index.json", Kind::Safetensors, true),
                ("model.safetensors", Kind::Safetensors, false),
                ("pytorch_model.bin.index.json", Kind::Torch, true),
                ("pytorch_model.bin", Kind::Torch, false),
                ("adapter_model.safetensors", Kind::Safetensors, false),
                ("adapter_model.bin", Kind::Torch, false),
            ] {
                let p = path.join(name);
                if p.is_file() {
                    return Self::open_as(&p, kind, sharded);
                }
            }
            let rd = std::fs::read_dir(path).map_err(|source| CheckpointError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            let mut lone: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors") && p.is_file())
                .collect();
            if lone.len() == 1 {
                if let Some(p) = lone.pop() {
                    return Self::open_as(&p, Kind::Safetensors, false);
                }
            }
            return Err(CheckpointError::NotFound {
                dir: path.to_path_buf(),
            });
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".json") {
            let kind = if name.contains("safetensors") {
                Kind::Safetensors
            } else {
                Kind::Torch
            };
            return Self::open_as(path, kind, true);
        }
        let kind = if name.ends_with(".safetensors") {
            Kind::Safetensors
        } else {
            Kind::Torch
        };
        Self::open_as(path, kind, false)
    }

    fn open_as(path: &Path, kind: Kind, sharded: bool) -> Result<Checkpoint, CheckpointError> {
        let format = match (kind, sharded) {
            (Kind::Safetensors, false) => "safetensors",
            (Kind::Safetensors, true) => "safetensors (sharded)",
            (Kind::Torch, false) => "pytorch zip",
            (Kind::Torch, true) => "pytorch zip (sharded)",
        };
        let mut ck = Checkpoint {
            format,
            files: Vec::new(),
            maps: Vec::new(),
            tensors: Vec::new(),
            locs: Vec::new(),
            by_name: HashMap::new(),
        };
        if !sharded {
            let map = MappedFile::open(path).map_err(|source| CheckpointError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            let found = kind.scan(path, &map)?;
            ck.push_file(path.to_path_buf(), map, found, None)?;
            return Ok(ck);
        }
        let wm = read_weight_map(path)?;
        for (i, shard) in wm.shards.iter().enumerate() {
            let map = MappedFile::open(shard).map_err(|source| CheckpointError::Io {
                path: shard.clone(),
                source,
            })?;
            let found = kind.scan(shard, &map)?;
            ck.push_file(shard.clone(), map, found, Some((&wm, i)))?;
        }
        // Every tensor the index names must have been found in its shard.
        let mut missing: Vec<(&String, &usize)> = wm
            .map
            .iter()
            .filter(|(t, _)| !ck.by_name.contains_key(*t))
            .collect();
        missing.sort();
        if let Some((t, &i)) = missing.first() {
            return Err(CheckpointError::TensorNotInShard {
                index: wm.index.clone(),
                tensor: (*t).clone(),
                shard: wm.shards.get(i).cloned().unwrap_or_default(),
            });
        }
        Ok(ck)
    }

    fn push_file(
        &mut self,
        path: PathBuf,
        map: MappedFile,
        found: Vec<FileTensor>,
        index: Option<(&WeightMap, usize)>,
    ) -> Result<(), CheckpointError> {
        let file = self.files.len();
        for f in found {
            if let Some(&prev) = self.by_name.get(&f.meta.name) {
                let first = self
                    .locs
                    .get(prev)
                    .and_then(|l| self.files.get(l.file))
                    .cloned()
                    .unwrap_or_default();
                return Err(CheckpointError::DuplicateTensor {
                    tensor: f.meta.name,
                    first,
                    second: path,
                });
            }
            if let Some((wm, i)) = index {
                match wm.map.get(&f.meta.name) {
                    Some(&claimed) if claimed == i => {}
                    Some(&claimed) => {
                        return Err(CheckpointError::TensorNotInShard {
                            index: wm.index.clone(),
                            tensor: f.meta.name,
                            shard: wm.shards.get(claimed).cloned().unwrap_or_default(),
                        })
                    }
                    None => {
                        return Err(CheckpointError::UnlistedTensor {
                            index: wm.index.clone(),
                            tensor: f.meta.name,
                            shard: path,
                        })
                    }
                }
            }
            self.by_name.insert(f.meta.name.clone(), self.tensors.len());
            self.tensors.push(f.meta);
            self.locs.push(Location {
                file,
                offset: f.offset,
                len: f.len,
            });
        }
        self.files.push(path);
        self.maps.push(map);
        Ok(())
    }

    /// "safetensors", "safetensors (sharded)", "pytorch zip" or "pytorch zip (sharded)";
    /// `files().len()` gives the shard count.
    pub fn format(&self) -> &'static str {
        self.format
    }

    /// The files read (shards sorted by name).
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// All tensors: shard files sorted by name, then tensors in data-offset order within each file.
    pub fn tensors(&self) -> &[TensorMeta] {
        &self.tensors
    }

    /// A tensor's meta by name.
    pub fn get(&self, name: &str) -> Option<&TensorMeta> {
        self.by_name.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// A tensor's bytes, borrowed from the memory map (validated when the checkpoint was opened).
    pub fn data(&self, name: &str) -> Result<TensorData<'_>, CheckpointError> {
        let no = || CheckpointError::NoSuchTensor {
            name: name.to_string(),
        };
        let &i = self.by_name.get(name).ok_or_else(no)?;
        let meta = self.tensors.get(i).ok_or_else(no)?;
        let loc = self.locs.get(i).ok_or_else(no)?;
        let map = self.maps.get(loc.file).ok_or_else(no)?;
        let bytes = loc
            .offset
            .checked_add(loc.len)
            .and_then(|end| map.bytes().get(loc.offset..end))
            .ok_or_else(|| CheckpointError::EntryOutOfBounds {
                path: self.files.get(loc.file).cloned().unwrap_or_default(),
                entry: name.to_string(),
            })?;
        Ok(TensorData {
            dtype: meta.dtype,
            shape: &meta.shape,
            bytes,
        })
    }

    /// Drops the resident pages of a tensor already consumed (no-op for unknown names).
    pub fn release(&self, name: &str) {
        if let Some(loc) = self.by_name.get(name).and_then(|&i| self.locs.get(i)) {
            if let Some(map) = self.maps.get(loc.file) {
                map.release(loc.offset, loc.len);
            }
        }
    }

    /// Sum of all tensors' byte sizes.
    pub fn total_bytes(&self) -> u64 {
        self.locs.iter().map(|l| l.len as u64).sum()
    }
}

/// Row-major element count of `shape`, or None on overflow.
pub(crate) fn checked_numel(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_is_exact() {
        let f16s = [
            half::f16::from_f32(1.5),
            half::f16::MAX,
            half::f16::MIN_POSITIVE_SUBNORMAL,
        ];
        let bytes: Vec<u8> = f16s.iter().flat_map(|v| v.to_le_bytes()).collect();
        let td = TensorData {
            dtype: DType::F16,
            shape: &[3],
            bytes: &bytes,
        };
        assert_eq!(td.n_elements(), 3);
        assert_eq!(td.to_f32(), vec![1.5, 65504.0, 2f32.powi(-24)]);
        let b = [
            half::bf16::from_f32(-3.0).to_le_bytes(),
            half::bf16::from_bits(0x3f81).to_le_bytes(),
        ]
        .concat();
        let td = TensorData {
            dtype: DType::BF16,
            shape: &[2],
            bytes: &b,
        };
        assert_eq!(td.to_f32(), vec![-3.0, f32::from_bits(0x3f81_0000)]);
        let b: Vec<u8> = [0.1f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let td = TensorData {
            dtype: DType::F32,
            shape: &[2],
            bytes: &b,
        };
        let mut out = vec![9.0; 10];
        td.to_f32_into(&mut out);
        assert_eq!(out, vec![0.1, -2.0]);
        assert_eq!(DType::BF16.size(), 2);
        assert_eq!(DType::F32.name(), "F32");
    }

    #[test]
    fn empty_dir_is_not_found() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            Checkpoint::open(d.path()),
            Err(CheckpointError::NotFound { .. })
        ));
        assert!(matches!(
            Checkpoint::open(&d.path().join("nope.safetensors")),
            Err(CheckpointError::Io { .. })
        ));
    }

    #[test]
    fn index_rejects_path_traversal_and_bad_json() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model.safetensors.index.json");
        std::fs::write(&p, r#"{"weight_map": {"a": "../etc/passwd"}}"#).unwrap();
        assert!(matches!(
            Checkpoint::open(d.path()),
            Err(CheckpointError::BadShardName { .. })
        ));
        std::fs::write(&p, r#"{"weight_map": 3}"#).unwrap();
        assert!(matches!(
            Checkpoint::open(d.path()),
            Err(CheckpointError::Index { .. })
        ));
        std::fs::write(&p, "not json").unwrap();
        assert!(matches!(
            Checkpoint::open(d.path()),
            Err(CheckpointError::Index { .. })
        ));
    }
}
