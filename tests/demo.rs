//! `kiln demo`: builds its inputs without downloads, deterministically, and prints a table where
//! the model really predicts its text (F16 perplexity far below the vocabulary size) and quality
//! falls with the bits (Q2_K worse than Q8_0).

mod common;

use common::{assert_exit, kiln};
use std::path::Path;

fn ps(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn demo_prints_a_meaningful_table() {
    let dir = tempfile::tempdir().unwrap();
    let o = kiln()
        .args(["demo", "--out", ps(dir.path()), "--quiet"])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    let header = table
        .lines()
        .find(|l| l.starts_with("level"))
        .unwrap_or_else(|| panic!("no table:\n{table}"));
    assert!(header.contains("PPL demo-text"), "{table}");
    let vocab: f64 = table
        .split("vocabulary ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no vocabulary size:\n{table}"));
    let ppl = |level: &str| -> f64 {
        let line = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(level))
            .unwrap_or_else(|| panic!("no {level} row:\n{table}"));
        line.split_whitespace().nth(3).unwrap().parse().unwrap()
    };
    for l in [
        "F16", "Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0",
    ] {
        assert!(ppl(l).is_finite(), "{l}");
    }
    let f16 = ppl("F16");
    assert!(vocab > 900.0, "{table}");
    assert!(
        f16 < vocab / 50.0,
        "F16 PPL {f16} is not far below the vocabulary ({vocab})"
    );
    assert!(ppl("Q2_K") > ppl("Q8_0"), "{table}");
    assert!(ppl("Q2_K") > ppl("Q4_K_M"), "{table}");
    assert!((ppl("Q8_0") - f16).abs() < 0.01 * f16, "{table}");
    // mean KLD against F16 (column after ΔPPL) falls as the bits rise
    assert!(
        header.contains("mean KLD") && header.contains("same top %"),
        "{table}"
    );
    let kld = |level: &str| -> f64 {
        let line = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(level))
            .unwrap();
        line.split_whitespace().nth(6).unwrap().parse().unwrap()
    };
    assert!(
        kld("Q2_K") > kld("Q4_K_M") && kld("Q4_K_M") > kld("Q8_0"),
        "{table}"
    );
    assert!(kld("Q3_K_M") > kld("Q6_K"), "{table}");
    // the report and the checksums are there
    let out = dir.path().join("pipeline");
    for f in ["report.md", "report.json", "report.svg", "SHA256SUMS"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    assert_exit(&kiln().args(["verify", ps(&out)]).output().unwrap(), 0);
    // a second demo run reuses everything
    let o = kiln()
        .args(["demo", "--out", ps(dir.path()), "--quiet"])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("skip merge (up to date)") && e.contains("skip ppl q2_k demo-text"),
        "{e}"
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with("Q"))
            .count(),
        7
    );
}

#[test]
fn demo_inputs_are_deterministic_and_in_the_real_layouts() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for d in [&a, &b] {
        let o = kiln()
            .args(["demo", "--build-only", "--out", ps(d.path())])
            .output()
            .unwrap();
        assert_exit(&o, 0);
    }
    let files = [
        "base/config.json",
        "base/generation_config.json",
        "base/model.safetensors",
        "base/tokenizer.model",
        "base/tokenizer_config.json",
        "base/special_tokens_map.json",
        "lora/adapter_config.json",
        "lora/adapter_model.safetensors",
        "lora/tokenizer.model",
        "lora/tokenizer_config.json",
        "lora/special_tokens_map.json",
        "demo-text.txt",
    ];
    for f in files {
        assert_eq!(
            std::fs::read(a.path().join(f)).unwrap(),
            std::fs::read(b.path().join(f)).unwrap(),
            "{f} differs between two builds"
        );
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.path().join("lora/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["embed_tokens", "lm_head"])
    );
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
    assert_eq!(cfg["peft_type"], "LORA");
    // PEFT key names and the extended vocabulary, as kiln inspect reads them
    let o = kiln()
        .args([
            "inspect",
            ps(&a.path().join("lora/adapter_model.safetensors")),
        ])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let s = String::from_utf8_lossy(&o.stdout);
    for k in [
        "base_model.model.model.embed_tokens.weight",
        "base_model.model.lm_head.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight",
    ] {
        assert!(s.contains(k), "{k} not in:\n{s}");
    }
    // the LoRA's tokenizer extends the base's: same first pieces, more of them
    let base =
        kiln_formats::sentencepiece::SpModel::open(&a.path().join("base/tokenizer.model")).unwrap();
    let ext =
        kiln_formats::sentencepiece::SpModel::open(&a.path().join("lora/tokenizer.model")).unwrap();
    assert!(ext.len() > base.len());
    assert!(base.byte_fallback && ext.byte_fallback);
    for (x, y) in base.pieces.iter().zip(&ext.pieces) {
        assert_eq!(x.piece, y.piece);
    }
    assert!(ext.piece_to_id("窑").is_some() && base.piece_to_id("窑").is_none());
}
