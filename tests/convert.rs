//! End-to-end tests of `kiln convert` and `kiln inspect` on generated fixture models: identical bytes
//! across input layouts, an independent Python re-computation, llama.cpp loading the output, and
//! hostile inputs.

mod common;
use common::*;
use std::path::Path;

const MODELS: [&str; 4] = ["mha-llama2", "gqa-zh", "odd-ffn", "odd-dim"];
const LAYOUTS: [&str; 4] = ["st", "st-sharded", "bin", "bin-sharded"];

fn convert(src: &Path, out: &Path, outtype: &str) {
    let o = run_kiln(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--outtype",
        outtype,
        "--name",
        "fixture",
        "--quiet",
    ]);
    assert_exit(&o, 0);
}

#[test]
fn every_layout_gives_identical_bytes_and_matches_independent_check() {
    let Some(fx) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for m in MODELS {
        let mut hashes = Vec::new();
        for l in LAYOUTS {
            let out = tmp.path().join(format!("{m}-{l}.gguf"));
            convert(&fx.join(m).join(l), &out, "f16");
            hashes.push((l, sha256_file(&out)));
        }
        for (l, h) in &hashes {
            assert_eq!(
                h, &hashes[0].1,
                "{m}: layout {l} differs from {}",
                hashes[0].0
            );
        }
        let out = tmp.path().join(format!("{m}-st.gguf"));
        py_check(
            "expected_gguf.py",
            &[
                fx.join(m).join("st").as_os_str(),
                out.as_os_str(),
                "--outtype".as_ref(),
                "f16".as_ref(),
                "--ignore-order".as_ref(),
            ],
        );
    }
}

#[test]
fn outtypes_and_input_dtypes_match_independent_check() {
    let Some(fx) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for (model, outtype) in [
        ("mha-llama2", "f32"),
        ("mha-llama2", "bf16"),
        ("gqa-zh", "q8_0"),
        ("mha-llama2-bf16", "f16"),
        ("mha-llama2-f32", "f16"),
        ("mha-llama2-bf16", "bf16"),
    ] {
        let src = fx.join(model).join("st");
        let out = tmp.path().join(format!("{model}-{outtype}.gguf"));
        convert(&src, &out, outtype);
        py_check(
            "expected_gguf.py",
            &[
                src.as_os_str(),
                out.as_os_str(),
                "--outtype".as_ref(),
                outtype.as_ref(),
                "--ignore-order".as_ref(),
            ],
        );
    }
}

#[test]
fn llama_cpp_loads_converted_models() {
    let Some(fx) = fixtures() else { return };
    let Some(bin) = llamacpp_bin() else { return };
    let shared = shared_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for m in ["gqa-zh", "mha-llama2"] {
        let out = tmp.path().join(format!("{m}.gguf"));
        convert(&fx.join(m).join("st"), &out, "f16");
        let o = std::process::Command::new(bin.join("llama-perplexity"))
            .args(["-m", out.to_str().unwrap(), "-f"])
            .arg(shared.join("fixtures/texts/zh-libai.txt"))
            .args(["-c", "128", "--chunks", "2", "-t", "2"])
            .output()
            .unwrap();
        let text =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && text.contains("Final estimate"),
            "{m}: llama-perplexity failed:\n{text}"
        );
    }
}

#[test]
fn inspect_reads_every_input_kind() {
    let Some(fx) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("m.gguf");
    convert(&fx.join("gqa-zh/st"), &gguf, "f16");
    let inputs = [
        gguf.clone(),
        fx.join("gqa-zh/st/model.safetensors"),
        fx.join("gqa-zh/bin/pytorch_model.bin"),
        fx.join("gqa-zh/st/tokenizer.model"),
        fx.join("gqa-zh/st"),
        fx.join("gqa-zh/bin-sharded"),
    ];
    for p in &inputs {
        let o = run_kiln(&["inspect", p.to_str().unwrap()]);
        assert_exit(&o, 0);
        let o = run_kiln(&["inspect", p.to_str().unwrap(), "--json"]);
        assert_exit(&o, 0);
        let v: serde_json::Value =
            serde_json::from_slice(&o.stdout).expect("inspect --json parses");
        assert!(v.get("kind").is_some(), "{}", p.display());
    }
    let o = run_kiln(&["inspect", gguf.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["metadata"]["general.architecture"], "llama");
    assert_eq!(v["metadata"]["tokenizer.ggml.tokens"]["len"], 55296);
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

#[test]
fn hostile_inputs_fail_cleanly_and_write_nothing() {
    let Some(fx) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.gguf");
    let check = |dir: &Path, needle: &str| {
        let o = run_kiln(&[
            "convert",
            dir.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "-q",
        ]);
        assert_exit(&o, 2);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "expected {needle:?} in: {err}");
        assert!(!out.exists(), "nothing may be left at the output path");
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("out.gguf"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "temporary files left behind: {leftovers:?}"
        );
    };
    // Truncated safetensors.
    let d = tmp.path().join("trunc");
    copy_dir(&fx.join("mha-llama2/st"), &d);
    let f = d.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    check(&d, "model.safetensors");
    // Tokenizer larger than the vocabulary (the Chinese-LLaMA mistake: 55,296 pieces, 32,000 rows).
    let d = tmp.path().join("vocab");
    copy_dir(&fx.join("mha-llama2/st"), &d);
    std::fs::copy(
        shared_dir()
            .unwrap()
            .join("fixtures/chinese-llama-2-tokenizer/tokenizer.model"),
        d.join("tokenizer.model"),
    )
    .unwrap();
    check(&d, "55296 pieces");
    // config.json that disagrees with the weights.
    let d = tmp.path().join("shape");
    copy_dir(&fx.join("mha-llama2/st"), &d);
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"intermediate_size\": 512", "\"intermediate_size\": 1024"),
    )
    .unwrap();
    check(&d, "mlp");
    // Missing folder.
    check(&tmp.path().join("nope"), "config.json");
}
