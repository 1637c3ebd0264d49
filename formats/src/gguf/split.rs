//! GGUF split sets as llama.cpp's `llama-gguf-split` writes and its model loader reads them: the
//! file names (`PREFIX-00001-of-00003.gguf`), the `split.*` keys, and how tensors are shared out
//! among the files (by a tensor count or a size per file).

use std::path::{Path, PathBuf};

/// Metadata key: index of this file in its set (u16, from 0).
pub const SPLIT_NO: &str = "split.no";
/// Metadata key: number of files in the set (u16; 0 in a file merged back from a set).
pub const SPLIT_COUNT: &str = "split.count";
/// Metadata key: tensors in the whole set (i32).
pub const SPLIT_TENSORS_COUNT: &str = "split.tensors.count";

/// Most files a set may have (`split.no` and `split.count` are u16).
pub const MAX_SPLITS: usize = u16::MAX as usize;

/// The name of file `i` (from 0) of an `n`-file set: `PREFIX-0000{i+1}-of-0000{n}.gguf`.
pub fn split_path(prefix: &Path, i: usize, n: usize) -> PathBuf {
    let mut s = prefix.as_os_str().to_os_string();
    s.push(format!("-{:05}-of-{:05}.gguf", i + 1, n));
    PathBuf::from(s)
}

/// The prefix of `path` when it is file `i` of an `n`-file set, None when its name does not end
/// in that file's `-0000{i+1}-of-0000{n}.gguf`.
pub fn split_prefix(path: &Path, i: usize, n: usize) -> Option<PathBuf> {
    let s = path.to_str()?;
    let post = format!("-{:05}-of-{:05}.gguf", i + 1, n);
    let prefix = s.strip_suffix(&post)?;
    (!prefix.is_empty()).then(|| PathBuf::from(prefix))
}

/// How a split shares the tensors out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitBy {
    /// At most this many tensors per file (`--split-max-tensors`, default 128).
    Tensors(usize),
    /// At most this many bytes of (padded) tensor data per file (`--split-max-size`); a tensor
    /// larger than that gets a file of its own.
    Bytes(u64),
}

/// Parses `--split-max-size` as llama-gguf-split does: a positive whole number followed by `M`
/// (10^6 bytes) or `G` (10^9 bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.char_indices().last() {
        Some((i, 'M')) => (&s[..i], 1_000_000u64),
        Some((i, 'G')) => (&s[..i], 1_000_000_000u64),
        _ => {
            return Err(format!(
                "{s:?}: give a size in M (megabytes) or G (gigabytes), e.g. 4G or 500M"
            ))
        }
    };
    match num.parse::<u64>() {
        Ok(n) if n > 0 => n
            .checked_mul(unit)
            .ok_or_else(|| format!("{s:?} is too large")),
        _ => Err(format!("{s:?}: the size must be a positive whole number")),
    }
}

/// Shares `n_bytes` (the padded data size of each tensor, in file order) out among files as
/// llama-gguf-split does, returning each file's tensor indices. `empty_first` makes the first
/// file hold metadata only (`--no-tensor-first-split`). An error when a file would get no
/// tensor (a limit too small).
pub fn plan(n_bytes: &[u64], by: SplitBy, empty_first: bool) -> Result<Vec<Vec<usize>>, String> {
    if let SplitBy::Tensors(0) = by {
        return Err("--split-max-tensors must be at least 1".into());
    }
    let mut files: Vec<Vec<usize>> = vec![Vec::new()];
    if empty_first {
        files.push(Vec::new());
    }
    let mut cur = 0u64;
    for (i, &b) in n_bytes.iter().enumerate() {
        let next = cur.saturating_add(b);
        let new_file = match by {
            SplitBy::Bytes(max) => next > max,
            SplitBy::Tensors(k) => i > 0 && i % k == 0,
        };
        if new_file {
            if files.last().is_some_and(Vec::is_empty) {
                return Err(
                    "one of the files would hold no tensor: the size or tensor limit is too small"
                        .into(),
                );
            }
            files.push(Vec::new());
            cur = b;
        } else {
            cur = next;
        }
        if let Some(f) = files.last_mut() {
            f.push(i);
        }
    }
    if files.len() > MAX_SPLITS {
        return Err(format!(
            "the set would have {} files; at most {MAX_SPLITS} fit split.count",
            files.len()
        ));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let p = split_path(Path::new("out/model"), 1, 3);
        assert_eq!(p, PathBuf::from("out/model-00002-of-00003.gguf"));
        assert_eq!(split_prefix(&p, 1, 3), Some(PathBuf::from("out/model")));
        assert_eq!(split_prefix(&p, 0, 3), None);
        assert_eq!(split_prefix(Path::new("-00001-of-00001.gguf"), 0, 1), None);
    }

    #[test]
    fn sizes_parse_like_llama_gguf_split() {
        assert_eq!(parse_size("4G"), Ok(4_000_000_000));
        assert_eq!(parse_size("500M"), Ok(500_000_000));
        for bad in ["", "4", "4K", "0M", "-1G", "1.5G", "G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plans_follow_the_tensor_and_size_rules() {
        let b = [10u64, 10, 10, 10, 10];
        assert_eq!(
            plan(&b, SplitBy::Tensors(2), false).unwrap(),
            vec![vec![0, 1], vec![2, 3], vec![4]]
        );
        assert_eq!(
            plan(&b, SplitBy::Tensors(2), true).unwrap(),
            vec![vec![], vec![0, 1], vec![2, 3], vec![4]]
        );
        assert_eq!(
            plan(&b, SplitBy::Bytes(25), false).unwrap(),
            vec![vec![0, 1], vec![2, 3], vec![4]]
        );
        // a tensor larger than the limit gets a file of its own
        assert_eq!(
            plan(&[5, 50, 5], SplitBy::Bytes(20), false).unwrap(),
            vec![vec![0], vec![1], vec![2]]
        );
        // the first tensor alone over the limit leaves an empty first file: refused
        assert!(plan(&[50, 5], SplitBy::Bytes(20), false).is_err());
        assert!(plan(&b, SplitBy::Tensors(0), false).is_err());
        assert_eq!(
            plan(&[], SplitBy::Tensors(3), false).unwrap(),
            vec![Vec::<usize>::new()]
        );
    }

    /// Writes a member of a set: `keys` as split.* values, one F32 tensor per name.
    fn member(dir: &Path, name: &str, keys: &[(&str, crate::gguf::GgufValue)], tensors: &[&str]) {
        use crate::gguf::GgufWriter;
        let meta: Vec<(String, crate::gguf::GgufValue)> = keys
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let infos: Vec<crate::gguf::TensorSpec> = tensors
            .iter()
            .map(|t| (t.to_string(), vec![4], kiln_quant::GgmlType::F32))
            .collect();
        let mut w = GgufWriter::create(&dir.join(name), &meta, &infos).unwrap();
        for t in tensors {
            w.write_tensor(t, &[0u8; 16]).unwrap();
        }
        w.finish().unwrap();
    }

    #[test]
    fn sets_open_through_their_first_file_and_bad_sets_are_refused() {
        use crate::gguf::{GgufFile, GgufValue::*};
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let keys = |no: u16, n: u16, t: i32| {
            vec![
                (SPLIT_NO, U16(no)),
                (SPLIT_TENSORS_COUNT, I32(t)),
                (SPLIT_COUNT, U16(n)),
            ]
        };
        member(d, "a-00001-of-00002.gguf", &keys(0, 2, 3), &["x", "y"]);
        member(d, "a-00002-of-00002.gguf", &keys(1, 2, 3), &["z"]);
        let f = GgufFile::open(&d.join("a-00001-of-00002.gguf")).unwrap();
        assert_eq!(f.paths().len(), 2);
        let parts: Vec<u16> = f.tensors.iter().map(|t| t.part).collect();
        assert_eq!(parts, vec![0, 0, 1]);
        assert_eq!(f.tensor_data(&f.tensors[2]).len(), 16);
        let err = |p: &str| GgufFile::open(&d.join(p)).unwrap_err().to_string();
        // a later member alone
        assert!(err("a-00002-of-00002.gguf").contains("first file"));
        // a missing member, named
        member(d, "b-00001-of-00003.gguf", &keys(0, 3, 3), &["x"]);
        member(d, "b-00002-of-00003.gguf", &keys(1, 3, 3), &["y"]);
        assert!(err("b-00001-of-00003.gguf").contains("b-00003-of-00003.gguf"));
        // a member of another set (wrong split.no)
        member(d, "c-00001-of-00002.gguf", &keys(0, 2, 2), &["x"]);
        member(d, "c-00002-of-00002.gguf", &keys(0, 2, 2), &["y"]);
        assert!(err("c-00001-of-00002.gguf").contains("split.no"));
        // the same tensor twice
        member(d, "e-00001-of-00002.gguf", &keys(0, 2, 2), &["x"]);
        member(d, "e-00002-of-00002.gguf", &keys(1, 2, 2), &["x"]);
        assert!(err("e-00001-of-00002.gguf").contains("two files"));
        // a wrong tensor count
        member(d, "g-00001-of-00002.gguf", &keys(0, 2, 5), &["x"]);
        member(d, "g-00002-of-00002.gguf", &keys(1, 2, 5), &["y"]);
        assert!(err("g-00001-of-00002.gguf").contains("split.tensors.count"));
        // a first file whose name does not say it is one
        member(d, "plain.gguf", &keys(0, 2, 2), &["x"]);
        assert!(err("plain.gguf").contains("PREFIX-00001-of-00002.gguf"));
    }
}
