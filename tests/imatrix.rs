//! End-to-end tests of `kiln imatrix` and `kiln quantize --imatrix` against llama.cpp on the GQA
//! fixture model: byte-identical quantized files with the same imatrix, imatrix values close to
//! llama-imatrix's, and files that load in both directions.

mod common;
use common::*;
use kiln_formats::imatrix::Imatrix;
use std::path::{Path, PathBuf};
use std::process::Command;

const CTX: &str = "128";
const CHUNKS: &str = "4";

fn llama_imatrix(bin: &Path, model: &Path, text: &Path, out: &Path, extra: &[&str]) {
    let o = Command::new(bin.join("llama-imatrix"))
        .args(["-m", model.to_str().unwrap(), "-f"])
        .arg(text)
        .args(["-o", out.to_str().unwrap(), "-c", CTX, "--chunks", CHUNKS])
        .args(["-t", "2", "-nr"])
        .args(extra)
        .output()
        .unwrap();
    assert_exit(&o, 0);
}

fn kiln_imatrix(model: &Path, text: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "imatrix",
        "-m",
        model.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-c",
        CTX,
        "--chunks",
        CHUNKS,
        "-q",
    ];
    args.extend_from_slice(extra);
    let o = run_kiln(&args);
    assert_exit(&o, 0);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn llama_quantize(bin: &Path, args: &[&str]) -> String {
    let o = Command::new(bin.join("llama-quantize"))
        .args(args)
        .output()
        .unwrap();
    assert_exit(&o, 0);
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `kiln quantize --imatrix` writes the same bytes as `llama-quantize --imatrix` with the same
/// (llama-imatrix-made) file, GGUF and legacy, with and without include/exclude filters.
#[test]
fn quantize_with_imatrix_is_byte_identical() {
    let Some(fx) = fixtures() else { return };
    let Some(bin) = llamacpp_tools(&["llama-imatrix"]) else {
        return;
    };
    let Some(text) = zh_text() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let f16 = gqa_f16(&fx, d);
    let im = d.join("llama.gguf");
    llama_imatrix(&bin, &f16, &text, &im, &[]);
    let dat = d.join("llama.dat");
    llama_imatrix(&bin, &f16, &text, &dat, &["--output-format", "dat"]);
    let p = |s: &Path| s.to_str().unwrap().to_string();
    let mut cases: Vec<(String, PathBuf, Vec<String>)> = [
        "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "Q2_K_S", "Q4_1", "Q5_1",
    ]
    .iter()
    .map(|t| (t.to_string(), im.clone(), vec![]))
    .collect();
    cases.push((
        "Q4_K_M".into(),
        dat.clone(),
        vec!["--exclude-weights".into(), "attn_q".into()],
    ));
    cases.push((
        "Q3_K_S".into(),
        im.clone(),
        vec!["--include-weights".into(), "ffn".into()],
    ));
    for (i, (ty, imf, filt)) in cases.iter().enumerate() {
        let theirs = d.join(format!("llama-{i}-{ty}.gguf"));
        let ours = d.join(format!("kiln-{i}-{ty}.gguf"));
        let mut la: Vec<String> = vec!["--imatrix".into(), p(imf)];
        la.extend(filt.iter().cloned());
        la.extend([p(&f16), p(&theirs), ty.clone(), "2".into()]);
        llama_quantize(&bin, &la.iter().map(String::as_str).collect::<Vec<_>>());
        let mut ka: Vec<String> = vec!["quantize".into(), "--imatrix".into(), p(imf)];
        ka.extend(filt.iter().cloned());
        ka.extend([p(&f16), p(&ours), ty.clone(), "-q".into()]);
        let o = run_kiln(&ka.iter().map(String::as_str).collect::<Vec<_>>());
        assert_exit(&o, 0);
        assert_same_gguf(&ours, &theirs);
        assert!(
            std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
            "{ty} {filt:?}: files differ"
        );
    }
    // Q2_K_S needs an imatrix, in both tools
    let o = run_kiln(&["quantize", &p(&f16), &p(&d.join("x.gguf")), "Q2_K_S"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("importance matrix"));
    assert!(!d.join("x.gguf").exists());
}

/// `kiln imatrix` matches llama-imatrix: same entries, counts and metadata, and the values agree
/// (see the tolerance note); each tool loads the other's files.
#[test]
fn imatrix_matches_llama_imatrix() {
    let Some(fx) = fixtures() else { return };
    let Some(bin) = llamacpp_tools(&["llama-imatrix"]) else {
        return;
    };
    let Some(text) = zh_text() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let f16 = gqa_f16(&fx, d);
    let theirs_p = d.join("llama.gguf");
    llama_imatrix(&bin, &f16, &text, &theirs_p, &[]);
    let ours_p = d.join("kiln.gguf");
    let stdout = kiln_imatrix(&f16, &text, &ours_p, &[]);
    assert!(
        stdout.starts_with("[1]") && stdout.contains("Final estimate: PPL = "),
        "{stdout}"
    );
    let theirs = Imatrix::read(&theirs_p).unwrap();
    let ours = Imatrix::read(&ours_p).unwrap();
    assert!(ours.has_metadata && !ours.is_legacy);
    assert_eq!(ours.datasets, theirs.datasets);
    assert_eq!(ours.chunk_count, theirs.chunk_count);
    assert_eq!(ours.chunk_size, theirs.chunk_size);
    assert_eq!(
        ours.entries.keys().collect::<Vec<_>>(),
        theirs.entries.keys().collect::<Vec<_>>()
    );
    assert_eq!(ours.entries.len(), 14); // 7 products x 2 layers, output excluded
                                        // The same layout byte for byte (header, names, shapes, offsets): only values may differ.
    let (a, b) = (
        std::fs::read(&ours_p).unwrap(),
        std::fs::read(&theirs_p).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    // Values: kiln's CPU backend follows ggml-cpu's arithmetic (f16 activations for F16 weights,
    // tiled flash attention), so the activations are llama.cpp's and every value must agree to the
    // issue's 1e-4 relative (measured: max 3.6e-6 on the 400M benchmark model).
    let mut report = Vec::new();
    for (name, e) in &theirs.entries {
        let o = &ours.entries[name];
        assert_eq!(o.counts, e.counts, "{name}");
        let mut rels: Vec<f64> = o
            .sums
            .iter()
            .zip(&e.sums)
            .map(|(&x, &y)| ((f64::from(x) - f64::from(y)) / f64::from(y)).abs())
            .collect();
        rels.sort_by(f64::total_cmp);
        let (max, med) = (rels[rels.len() - 1], rels[rels.len() / 2]);
        report.push(format!("{name}: max {max:.2e} median {med:.2e}"));
        let tol = 1e-4;
        assert!(
            max <= tol,
            "{name}: max rel {max:e} > {tol:e}\n{}",
            report.join("\n")
        );
    }
    eprintln!("{}", report.join("\n"));
    // llama-quantize loads kiln's files, GGUF and legacy
    for (fmt, name) in [("gguf", "kiln2.gguf"), ("dat", "kiln.dat")] {
        let f = d.join(name);
        kiln_imatrix(&f16, &text, &f, &["--output-format", fmt, "--no-ppl"]);
        let out = llama_quantize(
            &bin,
            &[
                "--imatrix",
                f.to_str().unwrap(),
                f16.to_str().unwrap(),
                d.join("q.gguf").to_str().unwrap(),
                "Q2_K_S",
                "2",
            ],
        );
        assert!(out.contains("loaded 14 importance matrix entries"), "{out}");
    }
    // --in-file: a legacy and a GGUF file combined without text
    let comb = d.join("comb.gguf");
    let o = run_kiln(&[
        "imatrix",
        "-m",
        f16.to_str().unwrap(),
        "--in-file",
        theirs_p.to_str().unwrap(),
        "--in-file",
        d.join("kiln.dat").to_str().unwrap(),
        "-c",
        CTX,
        "-o",
        comb.to_str().unwrap(),
    ]);
    assert_exit(&o, 0);
    let c = Imatrix::read(&comb).unwrap();
    assert_eq!(c.chunk_count, 8);
    assert_eq!(c.datasets.len(), 2);
    let k = "blk.0.attn_q.weight";
    assert_eq!(c.entries[k].counts, vec![1024]);
}
