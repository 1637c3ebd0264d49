//! safetensors files (single, sharded via `model.safetensors.index.json`, or a PEFT adapter),
//! parsed with the `safetensors` crate on the memory-mapped bytes; F32/F16/BF16 only.

use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::checkpoint_error::CheckpointError;
use crate::tensor::{DType, FileTensor, TensorMeta};

/// Maps a safetensors dtype to ours, or None for unsupported ones.
pub fn dtype_from_safetensors(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// Checks that every `data_offsets` value in the header is within the file before handing the
/// bytes to the `safetensors` crate (whose end-of-buffer sum could otherwise overflow).
fn precheck(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let Some(head) = bytes.get(..8) else {
        return Ok(()); // the crate reports "header too small"
    };
    let mut b = [0u8; 8];
    b.copy_from_slice(head);
    let n = u64::from_le_bytes(b);
    let Some(json) = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(8))
        .and_then(|end| bytes.get(8..end))
    else {
        return Ok(()); // the crate reports the bad length
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(json) else {
        return Ok(()); // the crate reports the JSON error
    };
    let Some(obj) = v.as_object() else {
        return Ok(());
    };
    let limit = bytes.len() as u64;
    for (name, info) in obj {
        if let Some(offs) = info.get("data_offsets").and_then(|o| o.as_array()) {
            if offs.iter().any(|o| o.as_u64().is_some_and(|o| o > limit)) {
                return Err(CheckpointError::SafetensorsHeader {
                    path: path.to_path_buf(),
                    what: format!("data_offsets of `{name}` point past the end of the file"),
                });
            }
        }
    }
    Ok(())
}

/// Lists the tensors of one safetensors file (its mapped `bytes`), in data-offset order, with
/// absolute byte offsets into the file.
pub fn scan(path: &Path, bytes: &[u8]) -> Result<Vec<FileTensor>, CheckpointError> {
    precheck(path, bytes)?;
    let st_err = |source| CheckpointError::Safetensors {
        path: path.to_path_buf(),
        source,
    };
    let (n, meta) = SafeTensors::read_metadata(bytes).map_err(st_err)?;
    let base = n
        .checked_add(8)
        .ok_or_else(|| CheckpointError::SafetensorsHeader {
            path: path.to_path_buf(),
            what: "header length overflows".to_string(),
        })?;
    let mut out = Vec::new();
    for name in meta.offset_keys() {
        let Some(info) = meta.info(&name) else {
            continue;
        };
        let dtype = dtype_from_safetensors(info.dtype).ok_or_else(|| {
            CheckpointError::UnsupportedDType {
                path: path.to_path_buf(),
                tensor: name.clone(),
                dtype: info.dtype.to_string(),
            }
        })?;
        let (s, e) = info.data_offsets;
        // read_metadata checked e - s == numel * size and that the offsets tile the data section.
        let offset = base
            .checked_add(s)
            .filter(|&o| e >= s && o.checked_add(e - s).is_some_and(|end| end <= bytes.len()))
            .ok_or_else(|| CheckpointError::SafetensorsHeader {
                path: path.to_path_buf(),
                what: format!("data_offsets of `{name}` out of range"),
            })?;
        out.push(FileTensor {
            meta: TensorMeta {
                name,
                dtype,
                shape: info.shape.clone(),
            },
            offset,
            len: e - s,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;
    use safetensors::tensor::TensorView;
    use std::path::PathBuf;

    fn write_st(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let bytes = safetensors::serialize(views, None).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn three_dtypes() -> Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)> {
        let h: Vec<u8> = [1.0f32, -0.5, 3.25]
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        let b: Vec<u8> = [2.0f32, 0.125]
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        vec![
            (
                "a.weight",
                Dtype::F32,
                vec![2, 2],
                f32s(&[1.0, 2.0, 3.0, 4.0]),
            ),
            ("b.weight", Dtype::F16, vec![3], h),
            ("c.weight", Dtype::BF16, vec![1, 2], b),
        ]
    }

    #[test]
    fn single_file_all_dtypes() {
        let d = tempfile::tempdir().unwrap();
        write_st(&d.path().join("model.safetensors"), &three_dtypes());
        let ck = Checkpoint::open(d.path()).unwrap();
        assert_eq!(ck.format(), "safetensors");
        assert_eq!(ck.tensors().len(), 3);
        let a = ck.data("a.weight").unwrap();
        assert_eq!(a.shape, &[2, 2]);
        assert_eq!(a.to_f32(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(ck.data("b.weight").unwrap().to_f32(), vec![1.0, -0.5, 3.25]);
        assert_eq!(ck.data("c.weight").unwrap().to_f32(), vec![2.0, 0.125]);
        assert_eq!(ck.get("c.weight").unwrap().dtype, DType::BF16);
        assert_eq!(ck.total_bytes(), 16 + 6 + 4);
        ck.release("a.weight");
        assert_eq!(ck.data("a.weight").unwrap().to_f32()[3], 4.0);
        assert!(matches!(
            ck.data("zzz"),
            Err(CheckpointError::NoSuchTensor { .. })
        ));
        // Offset order within the file.
        let names: Vec<&str> = ck.tensors().iter().map(|t| t.name.as_str()).collect();
        let mut offs: Vec<usize> = names
            .iter()
            .map(|n| ck.data(n).unwrap().bytes.as_ptr() as usize)
            .collect();
        let sorted = {
            let mut s = offs.clone();
            s.sort();
            s
        };
        assert_eq!(offs, sorted);
        offs.clear();
    }

    #[test]
    fn peft_adapter_and_lone_file() {
        let d = tempfile::tempdir().unwrap();
        write_st(&d.path().join("adapter_model.safetensors"), &three_dtypes());
        assert_eq!(Checkpoint::open(d.path()).unwrap().tensors().len(), 3);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("whatever.safetensors");
        write_st(&p, &three_dtypes());
        assert_eq!(Checkpoint::open(d.path()).unwrap().tensors().len(), 3);
        assert_eq!(
            Checkpoint::open(&p).unwrap().files(),
            std::slice::from_ref(&p)
        );
    }

    #[test]
    fn rejects_i64_naming_file_and_tensor() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model.safetensors");
        let mut t = three_dtypes();
        t.push(("position_ids", Dtype::I64, vec![2], vec![0u8; 16]));
        write_st(&p, &t);
        let e = Checkpoint::open(d.path()).unwrap_err();
        match &e {
            CheckpointError::UnsupportedDType {
                path,
                tensor,
                dtype,
            } => {
                assert_eq!(path, &p);
                assert_eq!(tensor, "position_ids");
                assert_eq!(dtype, "I64");
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("position_ids"));
    }

    #[test]
    fn hostile_headers() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.safetensors");
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![1, 2, 3],
            u64::MAX.to_le_bytes().to_vec(),
            [&100u64.to_le_bytes()[..], b"{}"].concat(),
            [&2u64.to_le_bytes()[..], b"[]"].concat(),
            {
                let h = format!(
                    r#"{{"a":{{"dtype":"U8","shape":[{}],"data_offsets":[0,{}]}}}}"#,
                    usize::MAX / 8,
                    usize::MAX / 8
                );
                [&(h.len() as u64).to_le_bytes()[..], h.as_bytes()].concat()
            },
            {
                // Offsets chaining up to near usize::MAX (would overflow the crate's end check).
                let q = usize::MAX / 9;
                let mut h = String::from("{");
                for i in 0..9 {
                    if i > 0 {
                        h.push(',');
                    }
                    h.push_str(&format!(
                        r#""t{i}":{{"dtype":"U8","shape":[{q}],"data_offsets":[{},{}]}}"#,
                        q * i,
                        q * (i + 1)
                    ));
                }
                h.push('}');
                [&(h.len() as u64).to_le_bytes()[..], h.as_bytes()].concat()
            },
            {
                let h = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#;
                [&(h.len() as u64).to_le_bytes()[..], h.as_bytes(), &[0u8; 8]].concat()
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            std::fs::write(&p, c).unwrap();
            assert!(Checkpoint::open(&p).is_err(), "case {i} accepted");
        }
    }

    fn write_index(dir: &Path, name: &str, map: &[(&str, &str)]) -> PathBuf {
        let wm: serde_json::Map<String, serde_json::Value> = map
            .iter()
            .map(|(t, f)| (t.to_string(), serde_json::Value::from(*f)))
            .collect();
        let v = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": wm});
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
        p
    }

    fn two_shards(dir: &Path) {
        let t = three_dtypes();
        write_st(
            &dir.join("model-00002-of-00002.safetensors"),
            &[t[0].clone()],
        );
        write_st(
            &dir.join("model-00001-of-00002.safetensors"),
            &[t[1].clone(), t[2].clone()],
        );
    }

    #[test]
    fn sharded_ok() {
        let d = tempfile::tempdir().unwrap();
        two_shards(d.path());
        write_index(
            d.path(),
            "model.safetensors.index.json",
            &[
                ("a.weight", "model-00002-of-00002.safetensors"),
                ("b.weight", "model-00001-of-00002.safetensors"),
                ("c.weight", "model-00001-of-00002.safetensors"),
            ],
        );
        let ck = Checkpoint::open(d.path()).unwrap();
        assert_eq!(ck.format(), "safetensors (sharded)");
        assert_eq!(ck.files().len(), 2);
        assert!(ck.files()[0].ends_with("model-00001-of-00002.safetensors"));
        let names: Vec<&str> = ck.tensors().iter().map(|t| t.name.as_str()).collect();
        // Shard 1 first (its tensors in data-offset order), then shard 2.
        assert_eq!(names.len(), 3);
        assert_eq!(names[2], "a.weight");
        let p0 = ck.data(names[0]).unwrap().bytes.as_ptr() as usize;
        let p1 = ck.data(names[1]).unwrap().bytes.as_ptr() as usize;
        assert!(p0 < p1);
        assert_eq!(
            ck.data("a.weight").unwrap().to_f32(),
            vec![1.0, 2.0, 3.0, 4.0]
        );
    }

    #[test]
    fn sharded_missing_shard() {
        let d = tempfile::tempdir().unwrap();
        two_shards(d.path());
        write_index(
            d.path(),
            "model.safetensors.index.json",
            &[
                ("a.weight", "model-00002-of-00002.safetensors"),
                ("b.weight", "model-00001-of-00002.safetensors"),
                ("c.weight", "model-00003-of-00002.safetensors"),
            ],
        );
        let e = Checkpoint::open(d.path()).unwrap_err();
        assert!(
            matches!(&e, CheckpointError::MissingShard { shard, .. } if shard.ends_with("model-00003-of-00002.safetensors")),
            "{e:?}"
        );
        assert!(e.to_string().contains("model-00003-of-00002.safetensors"));
    }

    #[test]
    fn sharded_wrong_shard() {
        let d = tempfile::tempdir().unwrap();
        two_shards(d.path());
        write_index(
            d.path(),
            "model.safetensors.index.json",
            &[
                ("a.weight", "model-00001-of-00002.safetensors"),
                ("b.weight", "model-00001-of-00002.safetensors"),
                ("c.weight", "model-00001-of-00002.safetensors"),
                ("d.weight", "model-00002-of-00002.safetensors"),
            ],
        );
        let e = Checkpoint::open(d.path()).unwrap_err();
        assert!(
            matches!(&e, CheckpointError::TensorNotInShard { tensor, shard, .. }
                if (tensor == "a.weight" || tensor == "d.weight") && shard.to_string_lossy().contains("model-0000")),
            "{e:?}"
        );
    }

    #[test]
    fn sharded_missing_tensor_and_unlisted() {
        let d = tempfile::tempdir().unwrap();
        two_shards(d.path());
        write_index(
            d.path(),
            "model.safetensors.index.json",
            &[
                ("a.weight", "model-00002-of-00002.safetensors"),
                ("b.weight", "model-00001-of-00002.safetensors"),
                ("c.weight", "model-00001-of-00002.safetensors"),
                ("ghost", "model-00001-of-00002.safetensors"),
            ],
        );
        let e = Checkpoint::open(d.path()).unwrap_err();
        assert!(
            matches!(&e, CheckpointError::TensorNotInShard { tensor, .. } if tensor == "ghost"),
            "{e:?}"
        );
        write_index(
            d.path(),
            "model.safetensors.index.json",
            &[
                ("a.weight", "model-00002-of-00002.safetensors"),
                ("b.weight", "model-00001-of-00002.safetensors"),
            ],
        );
        let e = Checkpoint::open(d.path()).unwrap_err();
        assert!(
            matches!(&e, CheckpointError::UnlistedTensor { tensor, .. } if tensor == "c.weight"),
            "{e:?}"
        );
    }

    #[test]
    fn sharded_duplicate_tensor() {
        let d = tempfile::tempdir().unwrap();
        let t = three_dtypes();
        write_st(
            &d.path().join("s1.safetensors"),
            &[t[0].clone(), t[1].clone()],
        );
        write_st(
            &d.path().join("s2.safetensors"),
            &[t[0].clone(), t[2].clone()],
        );
        let idx = write_index(
            d.path(),
            "model.safetensors.index.json",
            &[
                ("a.weight", "s1.safetensors"),
                ("b.weight", "s1.safetensors"),
                ("c.weight", "s2.safetensors"),
            ],
        );
        let e = Checkpoint::open(&idx).unwrap_err();
        match &e {
            CheckpointError::DuplicateTensor {
                tensor,
                first,
                second,
            } => {
                assert_eq!(tensor, "a.weight");
                assert!(first.ends_with("s1.safetensors"));
                assert!(second.ends_with("s2.safetensors"));
            }
            other => panic!("{other:?}"),
        }
    }
}
