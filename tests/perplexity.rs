//! End-to-end tests of `kiln perplexity`: the same PPL as llama-perplexity on F16 and quantized
//! files of the GQA fixture model (55,296 vocabulary), KL-divergence files and statistics
//! interchangeable with llama-perplexity's, RoPE context extension (NTK, linear) matching
//! llama-perplexity's, and clear errors on hostile input.

mod common;
use common::*;
use kiln_formats::gguf::{GgufFile, GgufValue, GgufWriter};
use std::path::Path;
use std::process::Command;

const CTX: &str = "128";
const CHUNKS: &str = "4";

/// Types of the interop check and the largest relative PPL difference allowed.
///
/// kiln's CPU kernels follow ggml-cpu's arithmetic order (f16 activations for F16 weights, tinyBLAS
/// and tiled K-quant orders, tiled flash attention, its RoPE and SiLU rounding), so on this fixture every
/// type gives exactly llama-perplexity's PPL (`-nr`); the tolerance is the 0.01%, which also
/// covers a llama.cpp built for a CPU without AVX-512 (8-lane instead of 16-lane F16 sums).
const TYPES: [(&str, f64); 9] = [
    ("F16", 1e-4),
    ("Q8_0", 1e-4),
    ("Q4_0", 1e-4),
    ("Q4_1", 1e-4),
    ("Q5_K_M", 1e-4),
    ("Q4_K_M", 1e-4),
    ("Q6_K", 1e-4),
    ("Q3_K_M", 1e-4),
    ("Q2_K", 1e-4),
];

/// The number after `Final estimate: PPL = `.
fn final_ppl(s: &str) -> Option<f64> {
    let rest = s.split("Final estimate: PPL = ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn same_ppl_as_llama_perplexity() {
    let Some(fx) = fixtures() else { return };
    let Some(bin) = llamacpp_bin() else { return };
    let Some(text) = zh_text() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let f16 = gqa_f16(&fx, tmp.path());
    let mut report = Vec::new();
    for (ty, tol) in TYPES {
        let model = if ty == "F16" {
            f16.clone()
        } else {
            let m = tmp.path().join(format!("{ty}.gguf"));
            let o = run_kiln(&[
                "quantize",
                f16.to_str().unwrap(),
                m.to_str().unwrap(),
                ty,
                "-q",
            ]);
            assert_exit(&o, 0);
            m
        };
        // -nr: no AMX / repacked weight buffers, the plain ggml-cpu kernels on any x86 CPU
        let o = Command::new(bin.join("llama-perplexity"))
            .args(["-m", model.to_str().unwrap(), "-f"])
            .arg(&text)
            .args(["-c", CTX, "--chunks", CHUNKS, "-t", "2", "-nr"])
            .output()
            .unwrap();
        let theirs_out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let theirs = final_ppl(&theirs_out)
            .unwrap_or_else(|| panic!("llama-perplexity {ty} gave no estimate:\n{theirs_out}"));
        let o = run_kiln(&[
            "perplexity",
            "-m",
            model.to_str().unwrap(),
            "-f",
            text.to_str().unwrap(),
            "-c",
            CTX,
            "--chunks",
            CHUNKS,
            "-q",
        ]);
        assert_exit(&o, 0);
        let stdout = String::from_utf8_lossy(&o.stdout);
        let ours = final_ppl(&stdout).unwrap_or_else(|| panic!("no estimate:\n{stdout}"));
        let rel = (ours - theirs) / theirs;
        report.push(format!("{ty}: llama {theirs} kiln {ours} rel {rel:.2e}"));
        assert!(
            rel.abs() <= tol,
            "{ty}: kiln PPL {ours} vs llama-perplexity {theirs} (rel {rel:.2e} > {tol:e})\n{}",
            report.join("\n")
        );
        // the running values are printed as llama-perplexity prints them
        assert!(stdout.starts_with("[1]"), "{stdout}");
        assert!(stdout.contains(&format!("[{CHUNKS}]")), "{stdout}");
    }
    eprintln!("{}", report.join("\n"));
}

/// Writes a copy of `src` with metadata changed by `edit`.
fn edited(src: &Path, dst: &Path, edit: impl Fn(&mut Vec<(String, GgufValue)>)) {
    let f = GgufFile::open(src).unwrap();
    let mut meta = f.metadata.clone();
    edit(&mut meta);
    let specs: Vec<_> = f
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone(), t.ty))
        .collect();
    let mut w = GgufWriter::create(dst, &meta, &specs).unwrap();
    for t in &f.tensors {
        w.write_tensor(&t.name, f.tensor_data(t)).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn hostile_inputs_fail_cleanly() {
    let Some(fx) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let f16 = gqa_f16(&fx, tmp.path());
    let m = f16.to_str().unwrap();
    let ids = tmp.path().join("few.txt");
    std::fs::write(&ids, "[1, 100, 200, 300]").unwrap();
    let ppl = |args: &[&str]| {
        let mut a = vec!["perplexity", "-q"];
        a.extend_from_slice(args);
        run_kiln(&a)
    };
    // fewer than 2*ctx tokens
    let o = ppl(&["-m", m, "--token-ids", ids.to_str().unwrap(), "-c", "128"]);
    assert_exit(&o, 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("at least 256 tokens"));
    // empty text
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "\n").unwrap();
    let o = ppl(&["-m", m, "-f", empty.to_str().unwrap()]);
    assert_exit(&o, 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("empty"));
    // missing text file
    let o = ppl(&["-m", m, "-f", "/nonexistent/text.txt"]);
    assert_exit(&o, 2);
    // not a GGUF
    let o = ppl(&["-m", ids.to_str().unwrap(), "-f", empty.to_str().unwrap()]);
    assert_exit(&o, 2);
    // no vocabulary
    let novocab = tmp.path().join("novocab.gguf");
    edited(&f16, &novocab, |meta| {
        meta.retain(|(k, _)| !k.starts_with("tokenizer."))
    });
    let o = ppl(&[
        "-m",
        novocab.to_str().unwrap(),
        "--token-ids",
        ids.to_str().unwrap(),
    ]);
    assert_exit(&o, 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no vocabulary"));
    // unsupported architecture
    let gpt2 = tmp.path().join("gpt2.gguf");
    edited(&f16, &gpt2, |meta| {
        for (k, v) in meta.iter_mut() {
            if k == "general.architecture" {
                *v = GgufValue::String("gpt2".into());
            }
        }
    });
    let long_ids = tmp.path().join("long.txt");
    let many: Vec<String> = (0..600).map(|i| (i % 1000 + 1).to_string()).collect();
    std::fs::write(&long_ids, many.join(" ")).unwrap();
    let o = ppl(&[
        "-m",
        gpt2.to_str().unwrap(),
        "--token-ids",
        long_ids.to_str().unwrap(),
        "-c",
        "128",
    ]);
    assert_exit(&o, 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("unsupported architecture"));
    // token id outside the vocabulary
    let bad = tmp.path().join("bad.txt");
    let mut v = many.clone();
    v[10] = "999999".into();
    std::fs::write(&bad, v.join(" ")).unwrap();
    let o = ppl(&["-m", m, "--token-ids", bad.to_str().unwrap(), "-c", "128"]);
    assert_exit(&o, 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("outside the vocabulary"));
    // a context larger than memory allows: refused before allocating, naming the model
    let o = ppl(&["-m", m, "-f", long_ids.to_str().unwrap(), "-c", "50000000"]);
    assert_exit(&o, 2);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("memory") && err.contains("gqa-zh.f16.gguf"),
        "{err}"
    );
    // real text shorter than 2*ctx names the text file
    if let Some(t) = zh_text() {
        let o = ppl(&["-m", m, "-f", t.to_str().unwrap(), "-c", "2048"]);
        assert_exit(&o, 2);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("at least 4096 tokens") && err.contains("zh-libai.txt"),
            "{err}"
        );
    }
    // KLD: missing base, garbage base, base of another vocabulary, --kl-divergence alone
    let o = ppl(&[
        "-m",
        m,
        "--kl-divergence",
        "--kl-divergence-base",
        "/nonexistent.kld",
    ]);
    assert_exit(&o, 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent.kld"));
    let o = ppl(&[
        "-m",
        m,
        "--kl-divergence",
        "--kl-divergence-base",
        ids.to_str().unwrap(),
    ]);
    assert_exit(&o, 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("few.txt"));
    let small = tmp.path().join("small-vocab.kld");
    let mut b = b"_logits_".to_vec();
    for v in [4i32, 5, 1, 1, 2, 3, 4] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend(std::iter::repeat_n(0u8, 2 * 10)); // 1 scored row of 4 + 6 values
    std::fs::write(&small, &b).unwrap();
    let o = ppl(&[
        "-m",
        m,
        "--kl-divergence",
        "--kl-divergence-base",
        small.to_str().unwrap(),
    ]);
    assert_exit(&o, 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("vocabulary of 5"));
    let o = ppl(&["-m", m, "--kl-divergence"]);
    assert_exit(&o, 2);
    // bad rope flags
    let o = ppl(&["-m", m, "-f", long_ids.to_str().unwrap(), "--ntk=-2"]);
    assert_exit(&o, 2);
    let o = ppl(&[
        "-m",
        m,
        "--token-ids",
        long_ids.to_str().unwrap(),
        "-c",
        "64",
        "--rope-scale",
        "0",
    ]);
    assert_exit(&o, 2);
    // a context the model can run, with JSON output
    let o = ppl(&[
        "-m",
        m,
        "--token-ids",
        long_ids.to_str().unwrap(),
        "-c",
        "64",
        "--chunks",
        "2",
        "--json",
    ]);
    assert_exit(&o, 0);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["n_chunk"], 2);
    assert_eq!(j["n_scored"], 2 * (64 - 1 - 32));
    assert!(j["ppl"].as_f64().unwrap() > 1.0);
    assert_eq!(j["rope_freq_base"], 10000.0);
}

/// Runs llama-perplexity with `args` (plus -t 2 -nr) and returns stdout+stderr.
fn llama_perplexity(bin: &Path, args: &[&str]) -> String {
    let o = Command::new(bin.join("llama-perplexity"))
        .args(args)
        .args(["-t", "2", "-nr"])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The first number after `label` in llama-perplexity's output.
fn stat(out: &str, label: &str) -> f64 {
    let rest = out
        .split(label)
        .nth(1)
        .unwrap_or_else(|| panic!("no '{label}' in:\n{out}"));
    rest.trim_start_matches([' ', ':'])
        .split(|c: char| c.is_whitespace() || c == '%')
        .find(|w| !w.is_empty())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no number after '{label}'"))
}

/// `(scale, min, q...)` rows of a base log-probability file, decoded to log-probs.
fn decode_base(p: &Path) -> (Vec<u8>, Vec<Vec<f32>>) {
    let b = std::fs::read(p).unwrap();
    let rd = |i: usize| i32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as usize;
    let (n_ctx, n_vocab, n_chunk) = (rd(8), rd(12), rd(16));
    let head_end = 20 + 4 * n_ctx * n_chunk;
    let nv = 2 * n_vocab.div_ceil(2) + 4;
    let rows = b[head_end..]
        .chunks_exact(2 * nv)
        .map(|r| {
            let f = |i: usize| f32::from_le_bytes(r[i..i + 4].try_into().unwrap());
            let (scale, min) = (f(0), f(4));
            r[8..8 + 2 * n_vocab]
                .chunks_exact(2)
                .map(|q| scale * f32::from(u16::from_le_bytes([q[0], q[1]])) + min)
                .collect()
        })
        .collect();
    (b[..head_end].to_vec(), rows)
}

#[test]
fn kld_files_and_statistics_match_llama_perplexity() {
    let Some(fx) = fixtures() else { return };
    let Some(bin) = llamacpp_bin() else { return };
    let Some(text) = zh_text() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let f16 = gqa_f16(&fx, tmp.path());
    let (kiln_base, llama_base) = (tmp.path().join("kiln.kld"), tmp.path().join("llama.kld"));
    let common = ["-f", text.to_str().unwrap(), "-c", CTX, "--chunks", CHUNKS];
    let mut a = vec!["perplexity", "-q", "-m", f16.to_str().unwrap()];
    a.extend_from_slice(&common);
    a.extend_from_slice(&["--kl-divergence-base", kiln_base.to_str().unwrap()]);
    let o = run_kiln(&a);
    assert_exit(&o, 0);
    let ours = final_ppl(&String::from_utf8_lossy(&o.stdout)).unwrap();
    let mut a = vec!["-m", f16.to_str().unwrap()];
    a.extend_from_slice(&common);
    a.extend_from_slice(&["--kl-divergence-base", llama_base.to_str().unwrap()]);
    let theirs = final_ppl(&llama_perplexity(&bin, &a)).unwrap();
    assert!(
        ((ours - theirs) / theirs).abs() < 1e-4,
        "{ours} vs {theirs}"
    );

    // same header and tokens, log-probs within a small fraction of their range
    let (kh, kr) = decode_base(&kiln_base);
    let (lh, lr) = decode_base(&llama_base);
    assert_eq!(kh, lh, "headers and token lists differ");
    assert_eq!(kr.len(), lr.len());
    assert_eq!(kr.len(), 4 * (128 - 1 - 64));
    let max_diff = kr
        .iter()
        .zip(&lr)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    eprintln!("base log-probs: max |kiln - llama| = {max_diff:e}");
    assert!(max_diff < 5e-3, "{max_diff}");

    for ty in ["Q4_K_M", "Q2_K"] {
        let q = tmp.path().join(format!("{ty}.gguf"));
        let o = run_kiln(&[
            "quantize",
            f16.to_str().unwrap(),
            q.to_str().unwrap(),
            ty,
            "-q",
        ]);
        assert_exit(&o, 0);
        // every pairing of (who writes the base, who computes the KLD)
        let mut report = Vec::new();
        for base in [&llama_base, &kiln_base] {
            let l = llama_perplexity(
                &bin,
                &[
                    "-m",
                    q.to_str().unwrap(),
                    "-c",
                    CTX,
                    "--kl-divergence",
                    "--kl-divergence-base",
                    base.to_str().unwrap(),
                ],
            );
            let o = run_kiln(&[
                "perplexity",
                "-q",
                "-m",
                q.to_str().unwrap(),
                "--kl-divergence",
                "--kl-divergence-base",
                base.to_str().unwrap(),
                "--json",
            ]);
            assert_exit(&o, 0);
            let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let f = |p: &str| j.pointer(p).and_then(|v| v.as_f64()).unwrap();
            assert_eq!(j["count"], 4 * 63);
            let name = base.file_name().unwrap().to_string_lossy();
            // (what, kiln, llama, relative tolerance, absolute tolerance = llama's print resolution)
            let checks = [
                (
                    "mean KLD",
                    f("/kld/value"),
                    stat(&l, "Mean    KLD:"),
                    0.01,
                    1e-6,
                ),
                (
                    "median KLD",
                    f("/kld_spread/median"),
                    stat(&l, "Median  KLD:"),
                    0.01,
                    1e-6,
                ),
                (
                    "99% KLD",
                    f("/kld_spread/quantiles/99.0%"),
                    stat(&l, "99.0%   KLD:"),
                    0.02,
                    1e-6,
                ),
                (
                    "max KLD",
                    f("/kld_spread/max"),
                    stat(&l, "Maximum KLD:"),
                    0.02,
                    1e-6,
                ),
                (
                    "PPL(Q)",
                    f("/ppl/value"),
                    stat(&l, "Mean PPL(Q)  "),
                    1e-3,
                    1e-6,
                ),
                (
                    "PPL(base)",
                    f("/ppl_base/value"),
                    stat(&l, "Mean PPL(base)"),
                    1e-6,
                    1e-6,
                ),
                (
                    "PPL ratio",
                    f("/ppl_ratio/value"),
                    stat(&l, "Mean PPL(Q)/PPL(base)"),
                    1e-3,
                    1e-6,
                ),
                (
                    "RMS dp %",
                    100.0 * f("/rms_dp/value"),
                    stat(&l, "RMS Δp    :"),
                    0.01,
                    1e-3,
                ),
                (
                    "same top %",
                    100.0 * f("/same_top/value"),
                    stat(&l, "Same top p:"),
                    0.03,
                    1e-3,
                ),
            ];
            for (what, k, ll, rel, abs) in checks {
                report.push(format!(
                    "{ty} base {name}: {what} kiln {k:.6} llama {ll:.6}"
                ));
                assert!(
                    (k - ll).abs() <= rel * ll.abs() + abs,
                    "{}",
                    report.join("\n")
                );
            }
            // the text output has llama-perplexity's layout
            let o = run_kiln(&[
                "perplexity",
                "-q",
                "-m",
                q.to_str().unwrap(),
                "--kl-divergence",
                "--kl-divergence-base",
                base.to_str().unwrap(),
            ]);
            assert_exit(&o, 0);
            let out = String::from_utf8_lossy(&o.stdout);
            for label in ["Mean    KLD:", "Median  KLD:", "RMS Δp    :", "Same top p:"] {
                let (k, ll) = (stat(&out, label), stat(&l, label));
                assert!(
                    (k - ll).abs() <= 0.02 * ll.abs() + 2e-6,
                    "{label}: {k} vs {ll}"
                );
            }
        }
        eprintln!("{}", report.join("\n"));
    }
}

/// Writes a copy of the F16 fixture whose llama.context_length is `n`.
fn with_context_length(src: &Path, dst: &Path, n: u32) {
    edited(src, dst, |meta| {
        for (k, v) in meta.iter_mut() {
            if k == "llama.context_length" {
                *v = GgufValue::U32(n);
            }
        }
    });
}

#[test]
fn ntk_and_linear_rope_match_llama_perplexity() {
    let Some(fx) = fixtures() else { return };
    let Some(bin) = llamacpp_bin() else { return };
    let Some(text) = zh_text() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let f16 = gqa_f16(&fx, tmp.path());
    let short = tmp.path().join("ctx64.gguf");
    with_context_length(&f16, &short, 64);
    let m = short.to_str().unwrap();
    let kiln_json = |extra: &[&str]| {
        let mut a = vec!["perplexity", "-q", "--json", "-m", m, "-f"];
        a.push(text.to_str().unwrap());
        a.extend_from_slice(&["-c", CTX, "--chunks", CHUNKS]);
        a.extend_from_slice(extra);
        let o = run_kiln(&a);
        assert_exit(&o, 0);
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let llama = |extra: &[&str]| {
        let mut a = vec![
            "-m",
            m,
            "-f",
            text.to_str().unwrap(),
            "-c",
            CTX,
            "--chunks",
            CHUNKS,
        ];
        a.extend_from_slice(extra);
        let out = llama_perplexity(&bin, &a);
        final_ppl(&out).unwrap_or_else(|| panic!("no estimate:\n{out}"))
    };
    // -c 128 beyond the trained 64: alpha = 128/(64/2) - 1 = 3, d = 256/8 = 32
    let j = kiln_json(&["--ntk", "auto"]);
    let base = j["rope_freq_base"].as_f64().unwrap();
    let want = (10000.0f64 * 3f64.powf(32.0 / 30.0)) as f32;
    assert_eq!(base as f32, want);
    assert_eq!(j["ntk_alpha"], 3.0);
    let ours = j["ppl"].as_f64().unwrap();
    let theirs = llama(&["--rope-freq-base", &(base as f32).to_string()]);
    let plain = kiln_json(&[])["ppl"].as_f64().unwrap();
    eprintln!("NTK auto: base {base}, kiln {ours}, llama {theirs}, without NTK {plain}");
    assert!(
        ((ours - theirs) / theirs).abs() < 1e-4,
        "{ours} vs {theirs}"
    );
    assert!(((ours - plain) / plain).abs() > 1e-4, "NTK changed nothing");
    // a fixed alpha on top of an explicit base
    let j = kiln_json(&["--rope-freq-base", "20000", "--ntk", "2"]);
    let base = j["rope_freq_base"].as_f64().unwrap() as f32;
    assert_eq!(base, (20000.0f64 * 2f64.powf(32.0 / 30.0)) as f32);
    // within the trained context, auto changes nothing
    let o = run_kiln(&[
        "perplexity",
        "-q",
        "--json",
        "-m",
        f16.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "-c",
        CTX,
        "--chunks",
        "2",
        "--ntk",
        "auto",
    ]);
    assert_exit(&o, 0);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["rope_freq_base"], 10000.0);
    assert!(j["ntk_alpha"].is_null());
    // linear scaling, llama.cpp's flags
    let lin = ["--rope-scaling", "linear", "--rope-scale", "2"];
    let j = kiln_json(&lin);
    assert_eq!(j["rope_freq_scale"], 0.5);
    let (ours, theirs) = (j["ppl"].as_f64().unwrap(), llama(&lin));
    eprintln!("linear x2: kiln {ours}, llama {theirs}");
    assert!(
        ((ours - theirs) / theirs).abs() < 1e-4,
        "{ours} vs {theirs}"
    );
}
