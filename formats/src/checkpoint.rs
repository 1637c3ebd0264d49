//! Unified read-only view of a Hugging Face / PEFT checkpoint: safetensors (single or sharded) or
//! PyTorch zip `.bin` (single or sharded). Tensors are borrowed straight from the memory maps.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::mmap::MappedFile;

// The shared leaf types live in `tensor` and `checkpoint_error` (so the format readers need not
// import this module back); they keep their public paths here.
pub use crate::checkpoint_error::CheckpointError;
pub use crate::tensor::{DType, FileTensor, TensorData, TensorMeta};

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

#[cfg(test)]
mod tests {
    use super::*;

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
