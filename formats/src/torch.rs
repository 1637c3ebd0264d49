//! PyTorch zip checkpoints (`torch.save` since 1.6): `<prefix>/data.pkl` (a state dict, read with
//! the restricted unpickler) plus one uncompressed `<prefix>/data/<key>` entry per storage, sliced
//! straight out of the memory map. Legacy (pre-zip) checkpoints are refused with advice.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::Path;

use zip::{CompressionMethod, ZipArchive};

use crate::checkpoint_error::CheckpointError;
use crate::pickle::{load_state_dict, PickledTensor, MAX_PICKLE_BYTES};
use crate::tensor::{checked_numel, DType, FileTensor, TensorMeta};

/// `torch.save`'s legacy magic number 0x1950a86a20f9469cfc6c, as the LONG1 it pickles first.
const LEGACY_MAGIC: [u8; 14] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];

/// A tensor of a PyTorch zip checkpoint, located in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TorchTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Strides in elements (always the contiguous row-major strides once accepted).
    pub stride: Vec<usize>,
    /// Storage entry key (`<prefix>/data/<key>`).
    pub storage_key: String,
    /// Offset into the storage, in elements.
    pub storage_offset: usize,
    /// Absolute byte offset of the tensor's first element in the file.
    pub file_offset: usize,
    /// Byte length of the tensor.
    pub byte_len: usize,
}

struct Storage {
    start: usize,
    len: usize,
    dtype: DType,
}

fn zip_err(path: &Path) -> impl Fn(zip::result::ZipError) -> CheckpointError + '_ {
    move |source| CheckpointError::Zip {
        path: path.to_path_buf(),
        source,
    }
}

/// Parses a PyTorch zip checkpoint held in `bytes` (the mapped file at `path`) and returns its
/// tensors in file-offset order, each validated against its storage entry.
pub fn read_tensors(path: &Path, bytes: &[u8]) -> Result<Vec<TorchTensor>, CheckpointError> {
    let not_zip = |what: &str| CheckpointError::NotTorchZip {
        path: path.to_path_buf(),
        what: what.to_string(),
    };
    if bytes.starts_with(&LEGACY_MAGIC) || bytes.first() == Some(&0x80) {
        return Err(CheckpointError::LegacyTorch {
            path: path.to_path_buf(),
        });
    }
    if !bytes.starts_with(b"PK\x03\x04") {
        return Err(not_zip("no zip signature at the start of the file"));
    }
    let mut zip = ZipArchive::new(Cursor::new(bytes)).map_err(zip_err(path))?;

    // The archive prefix is the folder holding data.pkl (torch names it after the file stem).
    let pkls: Vec<String> = zip
        .file_names()
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(str::to_string)
        .collect();
    let pkl_name = match pkls.as_slice() {
        [one] => one.clone(),
        [] => return Err(not_zip("no `<prefix>/data.pkl` entry")),
        _ => return Err(not_zip("more than one `<prefix>/data.pkl` entry")),
    };
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();

    if let Some(i) = zip.index_for_name(&format!("{prefix}byteorder")) {
        let entry = zip.by_index(i).map_err(zip_err(path))?;
        let mut s = String::new();
        entry
            .take(64)
            .read_to_string(&mut s)
            .map_err(|source| CheckpointError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if s.trim() != "little" {
            return Err(CheckpointError::BigEndian {
                path: path.to_path_buf(),
                found: s.trim().to_string(),
            });
        }
    }

    let pkl = {
        let i = zip
            .index_for_name(&pkl_name)
            .ok_or_else(|| not_zip("data.pkl vanished"))?;
        let entry = zip.by_index(i).map_err(zip_err(path))?;
        if entry.size() > MAX_PICKLE_BYTES as u64 {
            return Err(CheckpointError::Pickle {
                path: path.to_path_buf(),
                source: crate::pickle::PickleError::TooLarge {
                    len: usize::try_from(entry.size()).unwrap_or(usize::MAX),
                    max: MAX_PICKLE_BYTES,
                },
            });
        }
        let mut buf = Vec::with_capacity(entry.size() as usize);
        entry
            .take(MAX_PICKLE_BYTES as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|source| CheckpointError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        buf
    };
    let state = load_state_dict(&pkl).map_err(|source| CheckpointError::Pickle {
        path: path.to_path_buf(),
        source,
    })?;

    let mut storages: HashMap<String, Storage> = HashMap::new();
    let mut out = Vec::with_capacity(state.len());
    for PickledTensor { name, tensor: t } in state {
        let key = t.storage.key.clone();
        let dtype = t.storage.dtype;
        let esize = dtype.size() as u64;
        if !storages.contains_key(&key) {
            let entry_name = format!("{prefix}data/{key}");
            let i =
                zip.index_for_name(&entry_name)
                    .ok_or_else(|| CheckpointError::MissingStorage {
                        path: path.to_path_buf(),
                        tensor: name.clone(),
                        entry: entry_name.clone(),
                    })?;
            let entry = zip.by_index_raw(i).map_err(zip_err(path))?;
            if entry.encrypted() {
                return Err(CheckpointError::EncryptedEntry {
                    path: path.to_path_buf(),
                    entry: entry_name,
                });
            }
            if entry.compression() != CompressionMethod::Stored {
                return Err(CheckpointError::CompressedEntry {
                    path: path.to_path_buf(),
                    entry: entry_name,
                    method: entry.compression().to_string(),
                });
            }
            let oob = || CheckpointError::EntryOutOfBounds {
                path: path.to_path_buf(),
                entry: entry_name.clone(),
            };
            let start = usize::try_from(entry.data_start()).map_err(|_| oob())?;
            let len = usize::try_from(entry.size()).map_err(|_| oob())?;
            if entry.compressed_size() != entry.size()
                || start.checked_add(len).is_none_or(|e| e > bytes.len())
            {
                return Err(oob());
            }
            let declared = t.storage.numel.checked_mul(esize);
            if declared.is_none_or(|d| d > len as u64) {
                return Err(CheckpointError::StorageTooSmall {
                    path: path.to_path_buf(),
                    tensor: name,
                    key,
                    need_start: 0,
                    need_end: declared.unwrap_or(u64::MAX),
                    have: len as u64,
                });
            }
            storages.insert(key.clone(), Storage { start, len, dtype });
        }
        let Some(st) = storages.get(&key) else {
            continue;
        };
        if st.dtype != dtype {
            return Err(CheckpointError::StorageDTypeConflict {
                path: path.to_path_buf(),
                key,
                first: st.dtype,
                second: dtype,
            });
        }
        let overflow = || CheckpointError::ShapeOverflow {
            path: path.to_path_buf(),
            tensor: name.clone(),
            shape: t.shape.clone(),
        };
        let numel = checked_numel(&t.shape).ok_or_else(overflow)?;
        // Contiguous row-major strides (dims of size 1 may carry any stride).
        if numel > 0 {
            let mut expect = 1u64;
            for (&d, &s) in t.shape.iter().zip(&t.stride).rev() {
                if d != 1 && s != expect {
                    return Err(CheckpointError::NonContiguous {
                        path: path.to_path_buf(),
                        tensor: name,
                        shape: t.shape,
                        stride: t.stride,
                    });
                }
                expect = expect.checked_mul(d).ok_or_else(overflow)?;
            }
        }
        let need_start = t.storage_offset.checked_mul(esize);
        let need_end = t
            .storage_offset
            .checked_add(numel)
            .and_then(|e| e.checked_mul(esize));
        let storage_bytes = t.storage.numel.saturating_mul(esize).min(st.len as u64);
        let (need_start, need_end) = match (need_start, need_end) {
            (Some(s), Some(e)) if e <= storage_bytes => (s, e),
            (s, e) => {
                return Err(CheckpointError::StorageTooSmall {
                    path: path.to_path_buf(),
                    tensor: name,
                    key,
                    need_start: s.unwrap_or(u64::MAX),
                    need_end: e.unwrap_or(u64::MAX),
                    have: storage_bytes,
                })
            }
        };
        // All within the entry (<= bytes.len()), so these fit in usize.
        let conv = |v: u64| usize::try_from(v).map_err(|_| overflow());
        let shape = t
            .shape
            .iter()
            .map(|&d| conv(d))
            .collect::<Result<Vec<_>, _>>()?;
        let stride = t
            .stride
            .iter()
            .map(|&d| conv(d))
            .collect::<Result<Vec<_>, _>>()?;
        let file_offset = st
            .start
            .checked_add(conv(need_start)?)
            .ok_or_else(overflow)?;
        out.push(TorchTensor {
            name: name.clone(),
            dtype,
            shape,
            stride,
            storage_key: key,
            storage_offset: conv(t.storage_offset)?,
            file_offset,
            byte_len: conv(need_end - need_start)?,
        });
    }
    out.sort_by_key(|t| t.file_offset);
    Ok(out)
}

/// Lists the tensors of one PyTorch zip file for [`crate::checkpoint::Checkpoint`].
pub fn scan(path: &Path, bytes: &[u8]) -> Result<Vec<FileTensor>, CheckpointError> {
    Ok(read_tensors(path, bytes)?
        .into_iter()
        .map(|t| FileTensor {
            offset: t.file_offset,
            len: t.byte_len,
            meta: TensorMeta {
                name: t.name,
                dtype: t.dtype,
                shape: t.shape,
            },
        })
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;
    use crate::pickle::tests::{tensor_pickle, TestEntry as Entry};
    use std::io::Write;
    use std::path::PathBuf;
    use zip::write::SimpleFileOptions;

    /// The shared fixtures folder: `$KILN_SHARED` when set (only that folder), else the first
    /// `shared/` with `spec/llamacpp.md` walking up from the crate.
    pub(crate) fn shared_dir() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("KILN_SHARED") {
            let p = PathBuf::from(p);
            return p.join("spec/llamacpp.md").is_file().then_some(p);
        }
        let mut d = Some(Path::new(env!("CARGO_MANIFEST_DIR")));
        while let Some(p) = d {
            let s = p.join("shared");
            if s.join("spec/llamacpp.md").is_file() {
                return Some(s);
            }
            d = p.parent();
        }
        None
    }

    /// How to provide ../shared and the Python packages, for [`skip`].
    pub(crate) const HOW_SHARED: &str =
        "put the shared fixtures beside the checkout as ../shared or set KILN_SHARED";
    pub(crate) const HOW_PYTHON: &str = "pip install numpy safetensors sentencepiece protobuf gguf";

    /// The crate's one way to skip a test for a missing fixture or tool (as the workspace's
    /// tests/common does): prints `SKIPPED <test>: ...`, or panics under `KILN_REQUIRE_INTEROP=1`.
    pub(crate) fn skip(what: &str, how: &str) {
        let name = std::thread::current()
            .name()
            .unwrap_or("<unnamed test>")
            .to_string();
        if std::env::var("KILN_REQUIRE_INTEROP").as_deref() == Ok("1") {
            panic!("KILN_REQUIRE_INTEROP=1 but {name} needs {what}: {how}");
        }
        // Straight to stderr: libtest captures `eprintln!` of passing tests, not the stream.
        let line =
            format!("SKIPPED {name}: {what} ({how}; KILN_REQUIRE_INTEROP=1 makes this a failure)");
        let _ = writeln!(std::io::stderr(), "{line}");
    }

    /// `rel` inside the shared fixtures folder; None after a [`skip`] when that folder is missing.
    pub(crate) fn shared_path(rel: &str) -> Option<PathBuf> {
        let d = shared_dir();
        if d.is_none() {
            skip("../shared", HOW_SHARED);
        }
        Some(d?.join(rel))
    }

    fn fixture() -> Option<PathBuf> {
        let rel = "fixtures/torch-save-llama/pytorch_model.bin";
        let p = shared_path(rel)?;
        if !p.is_file() {
            skip(&format!("../shared/{rel}"), HOW_SHARED);
            return None;
        }
        Some(p)
    }

    /// Writes a torch-style zip: data.pkl, byteorder, data/<key> storages.
    fn write_zip(
        path: &Path,
        pkl: Option<&[u8]>,
        storages: &[(&str, Vec<u8>)],
        method: CompressionMethod,
    ) {
        let f = std::fs::File::create(path).unwrap();
        let mut z = zip::ZipWriter::new(f);
        let stored = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
        if let Some(p) = pkl {
            z.start_file("archive/data.pkl", stored).unwrap();
            z.write_all(p).unwrap();
        }
        z.start_file("archive/byteorder", stored).unwrap();
        z.write_all(b"little").unwrap();
        for (k, b) in storages {
            z.start_file(
                format!("archive/data/{k}"),
                SimpleFileOptions::default().compression_method(method),
            )
            .unwrap();
            z.write_all(b).unwrap();
        }
        z.start_file("archive/version", stored).unwrap();
        z.write_all(b"3\n").unwrap();
        z.finish().unwrap();
    }

    fn f16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect()
    }

    fn open_one(
        entries: &[Entry],
        storages: &[(&str, Vec<u8>)],
    ) -> Result<Checkpoint, CheckpointError> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pytorch_model.bin");
        write_zip(
            &p,
            Some(&tensor_pickle(entries)),
            storages,
            CompressionMethod::Stored,
        );
        Checkpoint::open(&p)
    }

    #[test]
    fn small_zip_roundtrip_with_shared_storage() {
        let vals = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let ck = open_one(
            &[
                ("b", "HalfStorage", "0", 6, 2, &[2, 2], &[2, 1]),
                ("a", "HalfStorage", "0", 6, 0, &[2], &[1]),
            ],
            &[("0", f16_bytes(&vals))],
        )
        .unwrap();
        assert_eq!(ck.format(), "pytorch zip");
        let names: Vec<&str> = ck.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(ck.data("b").unwrap().to_f32(), vec![3.0, 4.0, 5.0, 6.0]);
        assert_eq!(ck.data("a").unwrap().to_f32(), vec![1.0, 2.0]);
        assert_eq!(ck.get("b").unwrap().shape, vec![2, 2]);
    }

    #[test]
    fn storage_beyond_entry() {
        // Storage claims 8 elements but the entry holds 6.
        let e = open_one(
            &[("w", "HalfStorage", "0", 8, 0, &[6], &[1])],
            &[("0", f16_bytes(&[0.0; 6]))],
        )
        .unwrap_err();
        assert!(
            matches!(e, CheckpointError::StorageTooSmall { .. }),
            "{e:?}"
        );
        // Offset + extent beyond the storage.
        let e = open_one(
            &[("w", "HalfStorage", "0", 6, 4, &[3], &[1])],
            &[("0", f16_bytes(&[0.0; 6]))],
        )
        .unwrap_err();
        assert!(
            matches!(&e, CheckpointError::StorageTooSmall { tensor, need_end: 14, have: 12, .. } if tensor == "w"),
            "{e:?}"
        );
        // Huge offset.
        let e = open_one(
            &[("w", "HalfStorage", "0", 6, u32::MAX, &[1], &[1])],
            &[("0", f16_bytes(&[0.0; 6]))],
        )
        .unwrap_err();
        assert!(
            matches!(e, CheckpointError::StorageTooSmall { .. }),
            "{e:?}"
        );
    }

    #[test]
    fn non_contiguous_stride() {
        let e = open_one(
            &[("w.t", "FloatStorage", "0", 6, 0, &[2, 3], &[1, 2])],
            &[("0", vec![0u8; 24])],
        )
        .unwrap_err();
        assert!(
            matches!(&e, CheckpointError::NonContiguous { tensor, .. } if tensor == "w.t"),
            "{e:?}"
        );
        assert!(e.to_string().contains("w.t"));
        // Size-1 dims may carry any stride.
        open_one(
            &[("w", "FloatStorage", "0", 6, 0, &[1, 6], &[77, 1])],
            &[("0", vec![0u8; 24])],
        )
        .unwrap();
    }

    #[test]
    fn shape_product_overflow() {
        let big = u32::MAX;
        let e = open_one(
            &[("w", "HalfStorage", "0", 6, 0, &[big, big, big], &[1, 1, 1])],
            &[("0", f16_bytes(&[0.0; 6]))],
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                CheckpointError::ShapeOverflow { .. } | CheckpointError::StorageTooSmall { .. }
            ),
            "{e:?}"
        );
        let e = open_one(
            &[(
                "w",
                "HalfStorage",
                "0",
                6,
                0,
                &[big, big, big, big, big],
                &[1, 1, 1, 1, 1],
            )],
            &[("0", f16_bytes(&[0.0; 6]))],
        )
        .unwrap_err();
        assert!(matches!(e, CheckpointError::ShapeOverflow { .. }), "{e:?}");
        // Storage numel * element size overflowing is caught too (numel is u32 here, so just too big).
        let e = open_one(
            &[("w", "FloatStorage", "0", big, 0, &[1], &[1])],
            &[("0", vec![0u8; 4])],
        )
        .unwrap_err();
        assert!(
            matches!(e, CheckpointError::StorageTooSmall { .. }),
            "{e:?}"
        );
    }

    #[test]
    fn compressed_storage_rejected() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pytorch_model.bin");
        let pkl = tensor_pickle(&[("w", "HalfStorage", "0", 6, 0, &[6], &[1])]);
        write_zip(
            &p,
            Some(&pkl),
            &[("0", f16_bytes(&[0.0; 6]))],
            CompressionMethod::Deflated,
        );
        let e = Checkpoint::open(&p).unwrap_err();
        assert!(
            matches!(&e, CheckpointError::CompressedEntry { entry, .. } if entry == "archive/data/0"),
            "{e:?}"
        );
        assert!(e.to_string().contains("uncompressed"));
    }

    #[test]
    fn missing_storage_and_data_pkl() {
        let e = open_one(&[("w", "HalfStorage", "7", 6, 0, &[6], &[1])], &[]).unwrap_err();
        assert!(
            matches!(&e, CheckpointError::MissingStorage { entry, tensor, .. } if entry == "archive/data/7" && tensor == "w"),
            "{e:?}"
        );
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pytorch_model.bin");
        write_zip(&p, None, &[("0", vec![0; 4])], CompressionMethod::Stored);
        let e = Checkpoint::open(&p).unwrap_err();
        assert!(matches!(e, CheckpointError::NotTorchZip { .. }), "{e:?}");
    }

    #[test]
    fn dangerous_pickle_inside_zip() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pytorch_model.bin");
        write_zip(
            &p,
            Some(b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00lsq\x00\x85R."),
            &[],
            CompressionMethod::Stored,
        );
        let e = Checkpoint::open(&p).unwrap_err();
        assert!(
            matches!(&e, CheckpointError::Pickle { source: crate::pickle::PickleError::DisallowedGlobal { module, name, .. }, .. } if module == "posix" && name == "system"),
            "{e:?}"
        );
        assert!(e.to_string().contains("posix.system"));
    }

    #[test]
    fn legacy_and_garbage_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pytorch_model.bin");
        let mut legacy = LEGACY_MAGIC.to_vec();
        legacy.extend_from_slice(b".\x80\x02M\xe9\x03.");
        std::fs::write(&p, &legacy).unwrap();
        let e = Checkpoint::open(&p).unwrap_err();
        assert!(matches!(e, CheckpointError::LegacyTorch { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("torch>=1.6") && msg.contains("safetensors"),
            "{msg}"
        );
        for junk in [
            &b""[..],
            b"PK\x03\x04garbage",
            b"hello world",
            b"PK\x05\x06",
        ] {
            std::fs::write(&p, junk).unwrap();
            assert!(Checkpoint::open(&p).is_err());
        }
    }

    #[test]
    fn big_endian_rejected() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pytorch_model.bin");
        let f = std::fs::File::create(&p).unwrap();
        let mut z = zip::ZipWriter::new(f);
        let o = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
        z.start_file("a/data.pkl", o).unwrap();
        z.write_all(b"\x80\x02}.").unwrap();
        z.start_file("a/byteorder", o).unwrap();
        z.write_all(b"big").unwrap();
        z.finish().unwrap();
        assert!(matches!(
            Checkpoint::open(&p),
            Err(CheckpointError::BigEndian { .. })
        ));
    }

    #[test]
    fn sharded_torch_and_adapter_bin() {
        let d = tempfile::tempdir().unwrap();
        let s1 = d.path().join("pytorch_model-00001-of-00002.bin");
        let s2 = d.path().join("pytorch_model-00002-of-00002.bin");
        write_zip(
            &s1,
            Some(&tensor_pickle(&[(
                "x",
                "HalfStorage",
                "0",
                2,
                0,
                &[2],
                &[1],
            )])),
            &[("0", f16_bytes(&[1.0, 2.0]))],
            CompressionMethod::Stored,
        );
        write_zip(
            &s2,
            Some(&tensor_pickle(&[(
                "y",
                "FloatStorage",
                "0",
                1,
                0,
                &[1],
                &[1],
            )])),
            &[("0", 7.5f32.to_le_bytes().to_vec())],
            CompressionMethod::Stored,
        );
        let idx = serde_json::json!({"weight_map": {
            "x": "pytorch_model-00001-of-00002.bin",
            "y": "pytorch_model-00002-of-00002.bin"}});
        std::fs::write(
            d.path().join("pytorch_model.bin.index.json"),
            idx.to_string(),
        )
        .unwrap();
        let ck = Checkpoint::open(d.path()).unwrap();
        assert_eq!(ck.format(), "pytorch zip (sharded)");
        assert_eq!(ck.files().len(), 2);
        assert_eq!(ck.data("y").unwrap().to_f32(), vec![7.5]);
        assert_eq!(ck.data("x").unwrap().to_f32(), vec![1.0, 2.0]);
        // Wrong shard claimed.
        let idx = serde_json::json!({"weight_map": {
            "x": "pytorch_model-00002-of-00002.bin",
            "y": "pytorch_model-00002-of-00002.bin"}});
        std::fs::write(
            d.path().join("pytorch_model.bin.index.json"),
            idx.to_string(),
        )
        .unwrap();
        assert!(matches!(
            Checkpoint::open(d.path()),
            Err(CheckpointError::TensorNotInShard { .. } | CheckpointError::MissingShard { .. })
        ));

        let d = tempfile::tempdir().unwrap();
        std::fs::copy(&s1, d.path().join("adapter_model.bin")).unwrap();
        let ck = Checkpoint::open(d.path()).unwrap();
        assert_eq!(ck.tensors()[0].name, "x");
    }

    #[test]
    fn real_torch_save_fixture() {
        let Some(p) = fixture() else { return };
        let ck = Checkpoint::open(p.parent().unwrap()).unwrap();
        assert_eq!(ck.format(), "pytorch zip");
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(p.with_file_name("config.json")).unwrap())
                .unwrap();
        let g = |k: &str| cfg[k].as_u64().unwrap() as usize;
        let (h, ff, v, nl) = (
            g("hidden_size"),
            g("intermediate_size"),
            g("vocab_size"),
            g("num_hidden_layers"),
        );
        let hd = g("head_dim");
        let kv = g("num_key_value_heads") * hd;
        let q = g("num_attention_heads") * hd;
        let mut expect: Vec<(String, Vec<usize>)> = vec![
            ("model.embed_tokens.weight".into(), vec![v, h]),
            ("model.norm.weight".into(), vec![h]),
            ("lm_head.weight".into(), vec![v, h]),
        ];
        for l in 0..nl {
            let pre = format!("model.layers.{l}.");
            for (n, s) in [
                ("self_attn.q_proj.weight", vec![q, h]),
                ("self_attn.k_proj.weight", vec![kv, h]),
                ("self_attn.v_proj.weight", vec![kv, h]),
                ("self_attn.o_proj.weight", vec![h, q]),
                ("mlp.gate_proj.weight", vec![ff, h]),
                ("mlp.up_proj.weight", vec![ff, h]),
                ("mlp.down_proj.weight", vec![h, ff]),
                ("input_layernorm.weight", vec![h]),
                ("post_attention_layernorm.weight", vec![h]),
            ] {
                expect.push((format!("{pre}{n}"), s));
            }
        }
        assert_eq!(ck.tensors().len(), expect.len());
        for (n, s) in &expect {
            let t = ck.get(n).unwrap_or_else(|| panic!("missing {n}"));
            assert_eq!(&t.shape, s, "{n}");
            assert_eq!(t.dtype, DType::F16);
        }
        let norm = ck.data("model.norm.weight").unwrap().to_f32();
        assert!(norm.iter().all(|x| x.is_finite()) && norm.len() == h);

        // Compare every tensor with an independent Python reader (zipfile + pickle + numpy).
        let Some(py) = python_json(&["read", p.to_str().unwrap()]) else {
            return;
        };
        let obj = py.as_object().unwrap();
        assert_eq!(obj.len(), expect.len());
        for (n, info) in obj {
            let td = ck.data(n).unwrap();
            let shape: Vec<usize> = info["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(td.shape, &shape[..], "{n}");
            let vals = td.to_f32();
            let head = bits_of(&info["head"]);
            let tail = bits_of(&info["tail"]);
            let got: Vec<u32> = vals.iter().map(|x| x.to_bits()).collect();
            assert_eq!(&got[..head.len()], &head[..], "{n} head");
            assert_eq!(&got[got.len() - tail.len()..], &tail[..], "{n} tail");
            let sum: f64 = vals.iter().map(|&x| f64::from(x)).sum();
            let abs: f64 = vals.iter().map(|&x| f64::from(x).abs()).sum();
            let psum = info["sum"].as_f64().unwrap();
            assert!(
                (sum - psum).abs() <= 1e-9 * abs.max(1.0),
                "{n}: {sum} vs {psum}"
            );
            let bits: u64 = td.bytes.iter().map(|&b| u64::from(b)).sum();
            assert_eq!(bits, info["byte_sum"].as_u64().unwrap(), "{n} bytes");
        }
    }

    fn bits_of(v: &serde_json::Value) -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }

    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/torch_bin.py")
    }

    /// Runs the Python helper; None after a [`skip`] when python3 or numpy is unavailable.
    fn python_json(args: &[&str]) -> Option<serde_json::Value> {
        let out = match std::process::Command::new("python3")
            .arg(script())
            .args(args)
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                skip(&format!("python3 ({e})"), HOW_PYTHON);
                return None;
            }
        };
        if out.status.code() == Some(77) {
            let why = String::from_utf8_lossy(&out.stderr);
            skip(&format!("python3 with numpy ({})", why.trim()), HOW_PYTHON);
            return None;
        }
        assert!(
            out.status.success(),
            "python failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(serde_json::from_slice(&out.stdout).unwrap())
    }

    #[test]
    fn python_written_bin_without_torch() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pytorch_model.bin");
        let Some(expected) = python_json(&["write", p.to_str().unwrap()]) else {
            return;
        };
        let ck = Checkpoint::open(&p).unwrap();
        let obj = expected.as_object().unwrap();
        assert_eq!(ck.tensors().len(), obj.len());
        for (n, info) in obj {
            let td = ck.data(n).unwrap();
            let dt = info["dtype"].as_str().unwrap();
            assert_eq!(td.dtype.name(), dt, "{n}");
            let shape: Vec<usize> = info["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(td.shape, &shape[..]);
            let got: Vec<u32> = td.to_f32().iter().map(|x| x.to_bits()).collect();
            assert_eq!(got, bits_of(&info["values"]), "{n}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_zip_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = read_tensors(Path::new("x.bin"), &data);
            let mut pk = b"PK\x03\x04".to_vec();
            pk.extend_from_slice(&data);
            let _ = read_tensors(Path::new("x.bin"), &pk);
        }
    }
}
