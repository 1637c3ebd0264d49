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

/// Every kiln reader takes a split set through its first file, as llama.cpp's loader does:
/// quantizing it gives the same bytes as quantizing the single file (and as llama-quantize on the
/// set), its perplexity is the single file's, and a later member alone is refused.
#[test]
fn readers_take_a_set_through_its_first_file() {
    let Some(fx) = fixtures() else { return };
    let Some(text) = zh_text() else { return };
    let Some(bin) = llamacpp_tools(&[]) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let f16 = gqa_f16(&fx, d);
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let prefix = d.join("set");
    let o = run_kiln(&[
        "split",
        "--split-max-tensors",
        "8",
        &p(&f16),
        &p(&prefix),
        "-q",
    ]);
    assert_exit(&o, 0);
    let set = files_with_prefix(d, "set-");
    assert_eq!(set.len(), 3);
    let first = d.join(&set[0]);
    // quantize: the set and the single file give the same bytes, and llama-quantize agrees
    let (qa, qb, ql) = (d.join("qa.gguf"), d.join("qb.gguf"), d.join("ql.gguf"));
    for (inp, out) in [(&first, &qa), (&f16, &qb)] {
        let o = run_kiln(&["quantize", &p(inp), &p(out), "Q4_K_M", "-q"]);
        assert_exit(&o, 0);
    }
    assert_eq!(sha256_file(&qa), sha256_file(&qb));
    let o = Command::new(bin.join("llama-quantize"))
        .args([p(&first), p(&ql), "Q4_K_M".into(), "2".into()])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert_eq!(
        sha256_file(&qa),
        sha256_file(&ql),
        "llama-quantize of the set differs"
    );
    // perplexity: identical to the single file's
    let ppl = |m: &Path| {
        let o = run_kiln(&[
            "perplexity",
            "-m",
            &p(m),
            "-f",
            &p(&text),
            "-c",
            "128",
            "--chunks",
            "2",
            "--json",
            "-q",
        ]);
        assert_exit(&o, 0);
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        j["ppl"].as_f64().unwrap()
    };
    assert_eq!(ppl(&first).to_bits(), ppl(&f16).to_bits());
    // inspect sees every tensor of the set
    let o = run_kiln(&["inspect", &p(&first), "--json"]);
    assert_exit(&o, 0);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["tensors"].as_array().map(Vec::len), Some(21), "{j}");
    // a later member alone is refused, naming what to open
    let o = run_kiln(&["inspect", &p(&d.join(&set[1]))]);
    assert_exit(&o, 2);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("first file"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `kiln pipeline --model` takes a split set through its first file: every member is hashed as an
/// input, and the levels are the single file's.
#[test]
fn pipeline_takes_a_split_set() {
    let Some(fx) = fixtures() else { return };
    let Some(text) = zh_text() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let f16 = gqa_f16(&fx, d);
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let o = run_kiln(&[
        "split",
        "--split-max-tensors",
        "8",
        &p(&f16),
        &p(&d.join("set")),
        "-q",
    ]);
    assert_exit(&o, 0);
    let set = files_with_prefix(d, "set-");
    let run = |m: &Path, out: &Path| {
        let o = run_kiln(&[
            "pipeline",
            "--model",
            &p(m),
            "--out",
            &p(out),
            "--quants",
            "q8_0",
            "--eval-text",
            &p(&text),
            "-c",
            "128",
            "--chunks",
            "2",
            "--quiet",
        ]);
        assert_exit(&o, 0);
    };
    let (a, b) = (d.join("from-set"), d.join("from-file"));
    run(&d.join(&set[0]), &a);
    run(&f16, &b);
    assert_eq!(
        sha256_file(&a.join("model-q8_0.gguf")),
        sha256_file(&b.join("model-q8_0.gguf"))
    );
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("report.json")).unwrap()).unwrap();
    let inputs = rep["inputs"].as_array().unwrap();
    for (i, name) in set.iter().enumerate() {
        assert_eq!(inputs[i]["sha256"], sha256_file(&d.join(name)), "{name}");
    }
}
