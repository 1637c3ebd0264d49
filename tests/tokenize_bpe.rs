//! Interop tests of `kiln tokenize` on a byte-level BPE ("gpt2") vocabulary: the real Llama-3
//! tokenizer written to a GGUF by fixtures/gen_bpe.py, ids identical to the Hugging Face
//! `tokenizers` library (expected ids from the generator) and to llama.cpp's `llama-tokenize`, with
//! and without parsing special tokens; the pre-tokenizer sets against Python's `regex`.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const HOW_BPE: &str = "pip install tokenizers gguf regex";

/// The generator's output (run once into target/kiln-bpe-fixtures), or None after a skip.
fn bpe_fixtures() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let shared = shared_dir()?;
        let ok = Command::new("python3")
            .args(["-c", "import tokenizers, gguf, regex"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            skip("python3 with tokenizers, gguf and regex", HOW_BPE);
            return None;
        }
        let out = root().join("target/kiln-bpe-fixtures");
        let stamp = sha256_file(&root().join("fixtures/gen_bpe.py"));
        if std::fs::read_to_string(out.join(".complete"))
            .ok()
            .as_deref()
            == Some(&stamp)
        {
            return Some(out);
        }
        let tmp = root().join(format!(
            "target/kiln-bpe-fixtures.tmp{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        let st = Command::new("python3")
            .arg(root().join("fixtures/gen_bpe.py"))
            .arg(&tmp)
            .arg("--shared")
            .arg(&shared)
            .status()
            .expect("python3 runs");
        assert!(st.success(), "fixtures/gen_bpe.py failed");
        std::fs::write(tmp.join(".complete"), &stamp).unwrap();
        let _ = std::fs::remove_dir_all(&out);
        if std::fs::rename(&tmp, &out).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Some(out)
    })
    .clone()
}

fn parse_ids(out: &[u8]) -> Vec<u32> {
    let s = String::from_utf8_lossy(out);
    let s = s.trim();
    let inner = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or_else(|| panic!("not an id list: {s:?}"));
    inner
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| x.parse().unwrap())
        .collect()
}

fn kiln_ids(gguf: &Path, file: &Path, extra: &[&str]) -> Vec<u32> {
    let mut args = vec![
        "tokenize",
        "-m",
        gguf.to_str().unwrap(),
        "-f",
        file.to_str().unwrap(),
        "--ids",
    ];
    args.extend_from_slice(extra);
    let o = run_kiln(&args);
    assert_exit(&o, 0);
    parse_ids(&o.stdout)
}

fn expected(dir: &Path) -> serde_json::Map<String, serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    v.as_object().unwrap().clone()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The tokenizer.json has no BOS post-processor, so HF's ids carry none: compare without BOS,
/// and check that the GGUF's add_bos puts 128000 first.
#[test]
fn identical_to_hf_tokenizers() {
    let Some(dir) = bpe_fixtures() else { return };
    let gguf = dir.join("llama3-bpe.gguf");
    for (label, e) in expected(&dir) {
        let file = dir.join(e["file"].as_str().unwrap());
        let plain = ids(&e["plain"]);
        let special = ids(&e["special"]);
        assert_eq!(
            kiln_ids(&gguf, &file, &["--no-bos"]),
            plain,
            "{label}: plain"
        );
        assert_eq!(
            kiln_ids(&gguf, &file, &["--no-bos", "--parse-special"]),
            special,
            "{label}: parse-special"
        );
        let with_bos = kiln_ids(&gguf, &file, &[]);
        assert_eq!(with_bos[0], 128000, "{label}");
        assert_eq!(&with_bos[1..], &plain[..], "{label}");
    }
}

#[test]
fn identical_to_llama_tokenize() {
    let Some(dir) = bpe_fixtures() else { return };
    let Some(bin) = llamacpp_tools(&["llama-tokenize"]) else {
        return;
    };
    let gguf = dir.join("llama3-bpe.gguf");
    for (label, e) in expected(&dir) {
        let file = dir.join(e["file"].as_str().unwrap());
        for (kiln_extra, llama_extra) in [
            (&[][..], &["--no-parse-special"][..]),
            (&["--no-bos"][..], &["--no-parse-special", "--no-bos"][..]),
            (&["--parse-special"][..], &[][..]),
        ] {
            let o = Command::new(bin.join("llama-tokenize"))
                .args(["-m", gguf.to_str().unwrap(), "-f", file.to_str().unwrap()])
                .args(["--log-disable", "--no-escape", "--ids"])
                .args(llama_extra)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "llama-tokenize failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let want = parse_ids(&o.stdout);
            assert_eq!(
                kiln_ids(&gguf, &file, kiln_extra),
                want,
                "{label} {kiln_extra:?}"
            );
        }
    }
}

/// Every pre-tokenizer set on tricky strings, against the words Python's `regex` module cuts
/// them into with llama.cpp's expressions (fixtures/gen_bpe.py).
#[test]
fn pre_tokenizer_sets_match_python_regex() {
    let Some(dir) = bpe_fixtures() else { return };
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("pre_splits.json")).unwrap()).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() > 100);
    for c in cases {
        let set = c["set"].as_str().unwrap();
        let text = c["text"].as_str().unwrap();
        let want: Vec<&str> = c["words"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap())
            .collect();
        let got = kiln::tokenizer::pre_split(set, text).unwrap();
        assert_eq!(got, want, "{set}: {text:?}");
    }
}

#[test]
fn unknown_pre_and_model_are_clear_errors() {
    let Some(dir) = bpe_fixtures() else { return };
    let _ = dir;
    let err = kiln::tokenizer::pre_split("no-such-pre", "x")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no-such-pre") && err.contains("llama-bpe"),
        "{err}"
    );
    let err = kiln::tokenizer::pre_split("kimi-k2", "x")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not supported"), "{err}");
}

/// A model on the BPE vocabulary (fixtures/gen_bpe.py's tiny Llama-3-shaped GGUF: GQA, rope base
/// 500000, tied embeddings) evaluates as llama.cpp does: the same perplexity as
/// `llama-perplexity -nr` at F16, Q8_0 and Q4_K_M (quantized by kiln) and with a rope_freqs.weight
/// tensor (llama3 rope scaling), and bench and imatrix run.
#[test]
fn bpe_model_perplexity_equals_llama_perplexity() {
    let Some(dir) = bpe_fixtures() else { return };
    let Some(bin) = llamacpp_tools(&[]) else {
        return;
    };
    let Some(text) = zh_text() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let f16 = dir.join("llama3-bpe-tiny.gguf");
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let final_ppl = |s: &str| -> f64 {
        s.split("Final estimate: PPL = ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no final PPL in {s}"))
    };
    let args = ["-c", "64", "--chunks", "4", "-t", "2"];
    for ty in ["F16", "Q8_0", "Q4_K_M", "rope_freqs"] {
        let m = if ty == "F16" {
            f16.clone()
        } else if ty == "rope_freqs" {
            dir.join("llama3-bpe-tiny-rope-freqs.gguf")
        } else {
            let m = tmp.path().join(format!("{ty}.gguf"));
            let o = run_kiln(&["quantize", &p(&f16), &p(&m), ty, "-q"]);
            assert_exit(&o, 0);
            m
        };
        let mut ka = vec![
            "perplexity".to_string(),
            "-m".into(),
            p(&m),
            "-f".into(),
            p(&text),
        ];
        ka.extend(args.iter().map(|s| s.to_string()));
        ka.push("-q".into());
        let o = run_kiln(&ka.iter().map(String::as_str).collect::<Vec<_>>());
        assert_exit(&o, 0);
        let ours = final_ppl(&String::from_utf8_lossy(&o.stdout));
        let o = Command::new(bin.join("llama-perplexity"))
            .args(["-m", &p(&m), "-f", &p(&text), "-nr"])
            .args(args)
            .output()
            .unwrap();
        assert_exit(&o, 0);
        let theirs = final_ppl(&format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
        let rel = (ours - theirs).abs() / theirs;
        assert!(
            rel <= 1e-4,
            "{ty}: kiln {ours} vs llama-perplexity {theirs}"
        );
    }
    let o = run_kiln(&[
        "bench",
        "-m",
        &p(&f16),
        "-p",
        "16",
        "-n",
        "4",
        "-r",
        "1",
        "-q",
    ]);
    assert_exit(&o, 0);
    let im = tmp.path().join("im.gguf");
    let o = run_kiln(&[
        "imatrix",
        "-m",
        &p(&f16),
        "-f",
        &p(&text),
        "-o",
        &p(&im),
        "-c",
        "64",
        "--chunks",
        "2",
        "-q",
    ]);
    assert_exit(&o, 0);
    assert!(im.is_file());
}

/// The pipeline takes a BPE model (`--model`): quantizes it, measures PPL and KLD against the F16
/// base, and its F16 perplexity is `kiln perplexity`'s.
#[test]
fn pipeline_runs_on_a_bpe_model() {
    let Some(dir) = bpe_fixtures() else { return };
    let Some(text) = zh_text() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let m = dir.join("llama3-bpe-tiny.gguf");
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let o = run_kiln(&[
        "pipeline",
        "--model",
        &p(&m),
        "--out",
        &p(&out),
        "--quants",
        "q8_0",
        "--eval-text",
        &p(&text),
        "-c",
        "64",
        "--chunks",
        "2",
        "--kld",
        "--quiet",
    ]);
    assert_exit(&o, 0);
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let levels = rep["levels"].as_array().unwrap();
    let f16_ppl = levels[0]["ppl"][0]["ppl"].as_f64().unwrap();
    let q8 = &levels[1];
    assert_eq!(q8["level"], "Q8_0");
    let kld = q8["kld"]["mean_kld"].as_f64().unwrap();
    assert!(kld > 0.0 && kld < 0.01, "{kld}");
    let o = run_kiln(&[
        "perplexity",
        "-m",
        &p(&m),
        "-f",
        &p(&text),
        "-c",
        "64",
        "--chunks",
        "2",
        "--json",
        "-q",
    ]);
    assert_exit(&o, 0);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["ppl"].as_f64().unwrap().to_bits(), f16_ppl.to_bits());
}
