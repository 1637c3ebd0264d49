//! End-to-end tests of `kiln quantize`: byte-identical tensors and equal metadata against
//! llama-quantize for every level on three fixture models, and hostile inputs.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const TYPES: [&str; 17] = [
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M",
    "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
];

fn f16_of(fx: &Path, model: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{model}.f16.gguf"));
    let o = run_kiln(&[
        "convert",
        fx.join(model).join("st").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-q",
    ]);
    assert_exit(&o, 0);
    out
}

fn compare_with_llama_quantize(model: &str) {
    let Some(fx) = fixtures() else { return };
    let Some(bin) = llamacpp_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let f16 = f16_of(&fx, model, tmp.path());
    for ty in TYPES {
        let ours = tmp.path().join(format!("kiln-{ty}.gguf"));
        let theirs = tmp.path().join(format!("llama-{ty}.gguf"));
        let o = run_kiln(&[
            "quantize",
            f16.to_str().unwrap(),
            ours.to_str().unwrap(),
            ty,
            "2",
            "-q",
        ]);
        assert_exit(&o, 0);
        let o = Command::new(bin.join("llama-quantize"))
            .args([f16.to_str().unwrap(), theirs.to_str().unwrap(), ty, "2"])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "llama-quantize {ty}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_same_gguf(&ours, &theirs);
        if ty == "Q4_K_M" {
            // The independent (gguf-py) comparison once per model.
            py_check("compare_gguf.py", &[ours.as_os_str(), theirs.as_os_str()]);
        }
        std::fs::remove_file(&ours).unwrap();
        std::fs::remove_file(&theirs).unwrap();
    }
}

#[test]
fn identical_to_llama_quantize_dims_multiple_of_256() {
    compare_with_llama_quantize("mha-llama2");
}

#[test]
fn identical_to_llama_quantize_ffn_not_multiple_of_256() {
    compare_with_llama_quantize("odd-ffn");
}

#[test]
fn identical_to_llama_quantize_gqa_chinese_vocab() {
    compare_with_llama_quantize("gqa-zh");
}

#[test]
fn hostile_inputs_fail_cleanly() {
    let Some(fx) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let f16 = f16_of(&fx, "mha-llama2", tmp.path());
    let out = tmp.path().join("out.gguf");
    let fail = |args: &[&str], needle: &str| {
        let o = run_kiln(args);
        assert_exit(&o, 2);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "expected {needle:?} in: {err}");
        assert!(!out.exists());
    };
    let (f, o) = (f16.to_str().unwrap(), out.to_str().unwrap());
    fail(&["quantize", f, o, "Q7_K"], "unknown TYPE");
    // Truncated input.
    let trunc = tmp.path().join("trunc.gguf");
    let bytes = std::fs::read(&f16).unwrap();
    std::fs::write(&trunc, &bytes[..bytes.len() / 3]).unwrap();
    fail(
        &["quantize", trunc.to_str().unwrap(), o, "Q4_0"],
        "trunc.gguf",
    );
    // A quantized input needs --allow-requantize.
    let q8 = tmp.path().join("q8.gguf");
    assert_exit(
        &run_kiln(&["quantize", f, q8.to_str().unwrap(), "Q8_0", "-q"]),
        0,
    );
    fail(
        &["quantize", q8.to_str().unwrap(), o, "Q4_0"],
        "--allow-requantize",
    );
    assert_exit(
        &run_kiln(&[
            "quantize",
            q8.to_str().unwrap(),
            o,
            "Q4_0",
            "--allow-requantize",
            "-q",
        ]),
        0,
    );
    std::fs::remove_file(&out).unwrap();
    // NaN in a weight.
    let v: serde_json::Value =
        serde_json::from_slice(&run_kiln(&["inspect", f, "--json"]).stdout).unwrap();
    let t = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "blk.0.attn_q.weight")
        .unwrap();
    let off = t["offset"].as_u64().unwrap() as usize;
    let mut nan = bytes.clone();
    nan[off + 20..off + 22].copy_from_slice(&0x7e00u16.to_le_bytes());
    let nanf = tmp.path().join("nan.gguf");
    std::fs::write(&nanf, &nan).unwrap();
    fail(
        &["quantize", nanf.to_str().unwrap(), o, "Q4_K_M"],
        "blk.0.attn_q.weight",
    );
    // Dry run writes nothing and prints the plan.
    let o2 = run_kiln(&["quantize", f, "--dry-run", "Q4_K_M"]);
    assert_exit(&o2, 0);
    assert!(String::from_utf8_lossy(&o2.stdout).contains("BPW"));
}
