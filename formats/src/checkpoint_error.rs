//! The error type of the checkpoint readers (safetensors, PyTorch zip, sharded indexes).

use std::path::PathBuf;

use crate::pickle::PickleError;
use crate::tensor::DType;

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
