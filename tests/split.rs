//! End-to-end tests of `kiln split`: the same files, byte for byte, as llama-gguf-split for split
//! by tensor count, by size and with a metadata-only first file, the same merged file, and clear
//! errors for sets that do not fit together.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

fn gguf_split(bin: &Path, args: &[&str]) {
    let o = Command::new(bin.join("llama-gguf-split"))
        .args(args)
        .output()
        .unwrap();
    assert_exit(&o, 0);
}

fn files_with_prefix(dir: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

#[test]
fn same_sets_and_merge_as_llama_gguf_split() {
    let Some(fx) = fixtures() else { return };
    let Some(bin) = llamacpp_tools(&["llama-gguf-split"]) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let f16 = gqa_f16(&fx, d);
    let f = f16.to_str().unwrap();
    // just above the largest tensor (the 55,296-row embedding and output, about 28 MB each)
    let mb = "30M".to_string();
    let cases: [(&str, Vec<&str>); 3] = [
        ("t", vec!["--split-max-tensors", "7"]),
        ("s", vec!["--split-max-size", &mb]),
        (
            "e",
            vec!["--split-max-tensors", "9", "--no-tensor-first-split"],
        ),
    ];
    for (tag, flags) in &cases {
        let ours = d.join(format!("k{tag}"));
        let theirs = d.join(format!("l{tag}"));
        let mut args = vec!["split"];
        args.extend(flags.iter().copied());
        args.extend([f, ours.to_str().unwrap(), "-q"]);
        let o = run_kiln(&args);
        assert_exit(&o, 0);
        let mut la = vec!["--split"];
        la.extend(flags.iter().copied());
        la.extend([f, theirs.to_str().unwrap()]);
        gguf_split(&bin, &la);
        let (k, l) = (
            files_with_prefix(d, &format!("k{tag}-")),
            files_with_prefix(d, &format!("l{tag}-")),
        );
        assert!(k.len() > 1, "{tag}: {k:?}");
        assert_eq!(k.len(), l.len(), "{tag}");
        for (a, b) in k.iter().zip(&l) {
            assert_eq!(a[1..], b[1..]);
            assert_eq!(
                sha256_file(&d.join(a)),
                sha256_file(&d.join(b)),
                "{tag}: {a} differs from llama-gguf-split's {b}"
            );
        }
        // merged back: the same bytes as llama-gguf-split --merge
        let first = d.join(&k[0]);
        let km = d.join(format!("k{tag}.gguf"));
        let lm = d.join(format!("l{tag}.gguf"));
        let o = run_kiln(&[
            "split",
            "--merge",
            first.to_str().unwrap(),
            km.to_str().unwrap(),
            "-q",
        ]);
        assert_exit(&o, 0);
        gguf_split(
            &bin,
            &[
                "--merge",
                d.join(&l[0]).to_str().unwrap(),
                lm.to_str().unwrap(),
            ],
        );
        assert_eq!(
            sha256_file(&km),
            sha256_file(&lm),
            "{tag}: merged files differ"
        );
        // and the merged file still evaluates to the original's perplexity inputs
        let o = run_kiln(&["inspect", km.to_str().unwrap(), "--json"]);
        assert_exit(&o, 0);
    }
}

#[test]
fn bad_sets_are_clear_errors() {
    let Some(fx) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let f16 = gqa_f16(&fx, d);
    let f = f16.to_str().unwrap();
    let p = d.join("m");
    let ps = p.to_str().unwrap();
    // a dry run writes nothing
    let o = run_kiln(&["split", "--split-max-tensors", "10", "--dry-run", f, ps]);
    assert_exit(&o, 0);
    assert!(String::from_utf8_lossy(&o.stdout).contains("n_split: "));
    assert!(files_with_prefix(d, "m-").is_empty());
    let o = run_kiln(&["split", "--split-max-tensors", "10", f, ps, "-q"]);
    assert_exit(&o, 0);
    let set = files_with_prefix(d, "m-");
    assert!(set.len() > 1);
    // existing files are not replaced without --force
    let o = run_kiln(&["split", "--split-max-tensors", "10", f, ps, "-q"]);
    assert_exit(&o, 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    // merging a file that is not a set's first
    let o = run_kiln(&["split", "--merge", f, d.join("x.gguf").to_str().unwrap()]);
    assert_exit(&o, 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("split.count"));
    // a missing member names the file
    std::fs::remove_file(d.join(&set[1])).unwrap();
    let out = d.join("y.gguf");
    let o = run_kiln(&[
        "split",
        "--merge",
        d.join(&set[0]).to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_exit(&o, 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains(&set[1]));
    assert!(!out.exists());
    // bad sizes
    let o = run_kiln(&["split", "--split-max-size", "4K", f, ps]);
    assert_exit(&o, 2);
    let o = run_kiln(&[
        "split",
        "--split-max-tensors",
        "0",
        f,
        d.join("z").to_str().unwrap(),
    ]);
    assert_exit(&o, 2);
}
