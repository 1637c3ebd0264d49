//! End-to-end tests of `kiln pipeline` and `kiln verify` on the demo model (built by
//! `kiln demo --build-only`, no Python needed): outputs equal running merge / quantize / perplexity
//! by hand, the report's numbers and chart, resume and interruption, checksums, hostile inputs.

mod common;

use common::{assert_exit, demo_pipeline_args, kiln, sha256_file, skip_unsupported};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;

const CTX: &str = "128";
const CHUNKS: &str = "3";
const QUANTS: &str = "q4_0,q8_0";

fn run(args: &[&str]) -> Output {
    kiln().args(args).output().expect("kiln runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ps(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Demo inputs (base/, lora/, demo-text.txt) in a fresh folder.
fn demo_inputs(dir: &Path) {
    let o = run(&["demo", "--build-only", "--out", ps(dir)]);
    assert_exit(&o, 0);
}

/// The pipeline arguments used throughout, writing to `out`.
fn pipeline_args(inputs: &Path, out: &Path) -> Vec<String> {
    demo_pipeline_args(inputs, out, QUANTS, CTX, CHUNKS)
}

fn run_pipeline(inputs: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut a = pipeline_args(inputs, out);
    a.extend(extra.iter().map(|s| s.to_string()));
    kiln().args(&a).output().expect("kiln runs")
}

/// One finished run shared by the tests (inputs, out).
struct Finished {
    _dir: tempfile::TempDir,
    inputs: PathBuf,
    out: PathBuf,
}

fn finished() -> &'static Finished {
    static F: OnceLock<Finished> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let inputs = dir.path().join("in");
        demo_inputs(&inputs);
        let out = dir.path().join("zh-demo");
        let o = run_pipeline(&inputs, &out, &[]);
        assert_exit(&o, 0);
        Finished {
            inputs,
            out,
            _dir: dir,
        }
    })
}

/// A copy of the finished run's output folder (modification times kept, so it is up to date).
fn copy_of_finished(to: &Path) -> PathBuf {
    let f = finished();
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(&f.out)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
    to.to_path_buf()
}

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

fn level<'a>(r: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    r["levels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["level"] == name)
        .unwrap_or_else(|| panic!("no level {name}"))
}

fn sums(out: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(out.join("SHA256SUMS"))
        .unwrap()
        .lines()
        .map(|l| {
            let (h, n) = l.split_once("  ").unwrap();
            (h.to_string(), n.to_string())
        })
        .collect()
}

#[test]
fn outputs_equal_merge_quantize_perplexity_by_hand() {
    let f = finished();
    let hand = tempfile::tempdir().unwrap();
    let f16 = hand.path().join("f16.gguf");
    let o = run(&[
        "merge",
        "--base",
        ps(&f.inputs.join("base")),
        "--lora",
        ps(&f.inputs.join("lora")),
        "--gguf",
        ps(&f16),
        "--name",
        "zh-demo",
        "--quiet",
    ]);
    assert_exit(&o, 0);
    assert_eq!(
        std::fs::read(&f16).unwrap(),
        std::fs::read(f.out.join("model-f16.gguf")).unwrap(),
        "model-f16.gguf differs from kiln merge --gguf"
    );
    let r = report(&f.out);
    let text = f.inputs.join("demo-text.txt");
    for (lv, file) in [("Q4_0", "model-q4_0.gguf"), ("Q8_0", "model-q8_0.gguf")] {
        let q = hand.path().join(file);
        let o = run(&["quantize", ps(&f16), ps(&q), lv, "--quiet"]);
        assert_exit(&o, 0);
        assert_eq!(
            std::fs::read(&q).unwrap(),
            std::fs::read(f.out.join(file)).unwrap(),
            "{file} differs from kiln quantize"
        );
    }
    for (lv, file) in [
        ("F16", "model-f16.gguf"),
        ("Q4_0", "model-q4_0.gguf"),
        ("Q8_0", "model-q8_0.gguf"),
    ] {
        let o = run(&[
            "perplexity",
            "-m",
            ps(&hand
                .path()
                .join(if lv == "F16" { "f16.gguf" } else { file })),
            "-f",
            ps(&text),
            "-c",
            CTX,
            "--chunks",
            CHUNKS,
            "--json",
            "--quiet",
        ]);
        assert_exit(&o, 0);
        let p: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let cell = &level(&r, lv)["ppl"][0];
        assert_eq!(cell["ppl"], p["ppl"], "{lv} ppl");
        assert_eq!(cell["ppl_err"], p["ppl_err"], "{lv} ppl_err");
        let rec: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                f.out
                    .join(format!("eval/ppl-{}-demo-text.json", lv.to_lowercase())),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(rec["running"], p["running"], "{lv} running values");
        assert_eq!(rec["n_chunk"], p["n_chunk"]);
        // sizes in the report are the files'
        assert_eq!(
            level(&r, lv)["file_size"].as_u64().unwrap(),
            std::fs::metadata(f.out.join(file)).unwrap().len()
        );
    }
    // ΔPPL is against F16
    let d = level(&r, "Q4_0")["ppl"][0]["delta_ppl"].as_f64().unwrap();
    let want = level(&r, "Q4_0")["ppl"][0]["ppl"].as_f64().unwrap()
        - level(&r, "F16")["ppl"][0]["ppl"].as_f64().unwrap();
    assert_eq!(d, want);
}

#[test]
fn report_states_provenance_and_the_chart_is_svg() {
    let f = finished();
    let r = report(&f.out);
    let p = &r["provenance"];
    assert_eq!(p["kiln_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(p["n_ctx"], 128);
    assert_eq!(p["max_chunks"], 3);
    assert_eq!(p["device"], "cpu");
    let cmd = p["command"].as_str().unwrap();
    assert!(cmd.starts_with("kiln pipeline --base "), "{cmd}");
    assert!(cmd.contains("--quants q4_0,q8_0"), "{cmd}");
    assert!(p["threads"].as_u64().unwrap() >= 1);
    assert!(!p["cpu"].as_str().unwrap().is_empty());
    // every input's hash is the file's
    let inputs = r["inputs"].as_array().unwrap();
    assert!(inputs.len() >= 8, "{inputs:?}");
    for i in inputs {
        let path = PathBuf::from(i["path"].as_str().unwrap());
        assert_eq!(i["sha256"], sha256_file(&path), "{}", path.display());
    }
    let t = &r["texts"][0];
    assert_eq!(t["sha256"], sha256_file(&f.inputs.join("demo-text.txt")));
    let md = std::fs::read_to_string(f.out.join("report.md")).unwrap();
    assert!(md.contains("| level | size MiB | BPW | PPL demo-text | ΔPPL demo-text |"));
    for l in ["| F16 |", "| Q4_0 |", "| Q8_0 |"] {
        assert!(md.contains(l), "{l}");
    }
    assert!(md.contains(t["sha256"].as_str().unwrap()));
    assert!(md.contains(cmd));
    let svg = std::fs::read_to_string(f.out.join("report.svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("report.svg is XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(
        root.tag_name().namespace(),
        Some("http://www.w3.org/2000/svg")
    );
    let texts: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .collect();
    for l in ["F16", "Q4_0", "Q8_0", "file size (MiB)"] {
        assert!(texts.contains(&l), "{l} not labelled in {texts:?}");
    }
    assert_eq!(
        doc.descendants()
            .filter(|n| n.has_tag_name("circle"))
            .count(),
        4
    );
    // SHA256SUMS lists every output, and they all check out
    let listed: Vec<String> = sums(&f.out).into_iter().map(|(_, n)| n).collect();
    for n in [
        "model-f16.gguf",
        "model-q4_0.gguf",
        "model-q8_0.gguf",
        "eval/ppl-f16-demo-text.json",
        "eval/ppl-q4_0-demo-text.json",
        "eval/ppl-q8_0-demo-text.json",
        "report.json",
        "report.md",
        "report.svg",
        "kiln-manifest.json",
    ] {
        assert!(listed.contains(&n.to_string()), "{n} not in SHA256SUMS");
    }
    let o = run(&["verify", ps(&f.out)]);
    assert_exit(&o, 0);
    // nothing temporary is left behind
    for e in std::fs::read_dir(&f.out).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.starts_with('.'), "left over: {n}");
    }
}

#[test]
fn second_run_does_no_work_and_force_redoes_all() {
    let dir = tempfile::tempdir().unwrap();
    let out = copy_of_finished(&dir.path().join("zh-demo"));
    let f = finished();
    let stamp = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    // The copy's report names its own command line (another --out): the first run rewrites only
    // the report.
    let o = run_pipeline(&f.inputs, &out, &[]);
    assert_exit(&o, 0);
    let e = stderr(&o);
    assert!(
        e.contains("] report →") && e.contains("skip quantize q8_0 (up to date)"),
        "{e}"
    );
    let before: Vec<_> = sums(&out)
        .iter()
        .map(|(_, n)| (n.clone(), stamp(&out.join(n))))
        .collect();
    let o = run_pipeline(&f.inputs, &out, &[]);
    assert_exit(&o, 0);
    let e = stderr(&o);
    for id in [
        "merge",
        "quantize q4_0",
        "quantize q8_0",
        "ppl f16 demo-text",
        "ppl q4_0 demo-text",
        "ppl q8_0 demo-text",
        "report",
    ] {
        assert!(e.contains(&format!("skip {id} (up to date)")), "{id}:\n{e}");
    }
    assert!(!e.contains("] merge ") && !e.contains("] quantize ") && !e.contains("] perplexity "));
    let after: Vec<_> = sums(&out)
        .iter()
        .map(|(_, n)| (n.clone(), stamp(&out.join(n))))
        .collect();
    assert_eq!(before, after, "a file was rewritten");
    // the summary table is printed either way
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("Q4_0") && table.contains("PPL demo-text"),
        "{table}"
    );

    // new settings redo only what depends on them
    let mut a = pipeline_args(&f.inputs, &out);
    let i = a.iter().position(|x| x == "--chunks").unwrap();
    a[i + 1] = "2".into();
    let o = kiln().args(&a).output().unwrap();
    assert_exit(&o, 0);
    let e = stderr(&o);
    assert!(e.contains("skip merge (up to date)") && e.contains("skip quantize q4_0 (up to date)"));
    assert!(e.contains("] perplexity Q4_0 on demo-text"), "{e}");
    assert_eq!(report(&out)["provenance"]["max_chunks"], 2);

    let o = run_pipeline(&f.inputs, &out, &["--force"]);
    assert_exit(&o, 0);
    let e = stderr(&o);
    assert!(!e.contains("skip "), "{e}");
    assert!(e.contains("] merge ") && e.contains("] quantize Q8_0"));
    // same inputs, same outputs
    assert_eq!(
        sha256_file(&out.join("model-q4_0.gguf")),
        sha256_file(&f.out.join("model-q4_0.gguf"))
    );
}

/// Runs the pipeline with the test stall hook at step `point` ("quantize q4_0": the quantized file
/// complete in the staging folder, not yet at its final path) and signals it there. Returns the
/// stderr read.
fn interrupt_at_stall(inputs: &Path, out: &Path, point: &str, signal: &str) -> String {
    let mut child = kiln()
        .args(pipeline_args(inputs, out))
        .env("KILN_TEST_STALL", format!("{point}:60000"))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let mut log = String::new();
    for line in BufReader::new(err).lines() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line == format!("stall {point}") {
            let st = std::process::Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status()
                .unwrap();
            assert!(st.success());
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run was not interrupted:\n{log}");
    log
}

#[test]
fn interrupted_quantization_resumes_to_the_uninterrupted_result() {
    let f = finished();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("zh-demo");
    // SIGTERM while the first level (Q4_0) is staged
    let log = interrupt_at_stall(&f.inputs, &out, "quantize q4_0", "TERM");
    assert!(log.contains("] quantize Q4_0"), "{log}");
    assert!(out.join("model-f16.gguf").is_file(), "the merge is kept");
    assert!(
        !out.join("model-q4_0.gguf").exists(),
        "partial Q4_0 at its final path"
    );
    // SIGKILL at the second level: Q4_0 is redone and published, Q8_0 is staged
    let log = interrupt_at_stall(&f.inputs, &out, "quantize q8_0", "KILL");
    assert!(log.contains("skip merge (up to date)"), "{log}");
    assert!(out.join("model-q4_0.gguf").is_file());
    assert!(
        !out.join("model-q8_0.gguf").exists(),
        "partial Q8_0 at its final path"
    );
    for e in std::fs::read_dir(&out).unwrap() {
        let p = e.unwrap().path();
        let n = p.file_name().unwrap().to_string_lossy().into_owned();
        if n.ends_with(".gguf") {
            assert_eq!(
                std::fs::read(&p).unwrap(),
                std::fs::read(f.out.join(&n)).unwrap(),
                "{n} at its final path is not the complete file"
            );
        }
    }
    // the rerun finishes and equals the uninterrupted run
    let o = run_pipeline(&f.inputs, &out, &[]);
    assert_exit(&o, 0);
    let e = stderr(&o);
    assert!(e.contains("skip merge (up to date)") && e.contains("skip quantize q4_0 (up to date)"));
    assert!(e.contains("] quantize Q8_0"), "{e}");
    let (a, b) = (sums(&f.out), sums(&out));
    let files = |v: &[(String, String)]| -> Vec<(String, String)> {
        v.iter()
            .filter(|(_, n)| n.ends_with(".gguf"))
            .cloned()
            .collect()
    };
    assert_eq!(files(&a), files(&b));
    let (ra, rb) = (report(&f.out), report(&out));
    for lv in ["F16", "Q4_0", "Q8_0"] {
        assert_eq!(level(&ra, lv)["ppl"], level(&rb, lv)["ppl"], "{lv}");
        assert_eq!(level(&ra, lv)["sha256"], level(&rb, lv)["sha256"], "{lv}");
    }
    assert!(!out.join(".kiln-staging").exists());
    let o = run(&["verify", ps(&out)]);
    assert_exit(&o, 0);
}

#[test]
fn verify_detects_a_flipped_byte_in_any_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = copy_of_finished(&dir.path().join("zh-demo"));
    let o = run(&["verify", ps(&out), "--json"]);
    assert_exit(&o, 0);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["ok"], true);
    for (_, name) in sums(&out) {
        let p = out.join(&name);
        let orig = std::fs::read(&p).unwrap();
        let mut bad = orig.clone();
        let i = bad.len() / 2;
        bad[i] ^= 0x01;
        std::fs::write(&p, &bad).unwrap();
        let o = run(&["verify", ps(&out)]);
        assert_exit(&o, 1);
        let s = String::from_utf8_lossy(&o.stdout);
        assert!(s.contains(&format!("{name}: FAILED")), "{name}: {s}");
        let o = run(&["verify", ps(&out), "--json"]);
        assert_exit(&o, 1);
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(j["ok"], false);
        assert_eq!(j["failed"], 1);
        std::fs::write(&p, &orig).unwrap();
    }
    std::fs::remove_file(out.join("report.svg")).unwrap();
    let o = run(&["verify", ps(&out)]);
    assert_exit(&o, 1);
    assert!(String::from_utf8_lossy(&o.stdout).contains("report.svg: MISSING"));
    // not a pipeline folder
    let o = run(&["verify", ps(dir.path())]);
    assert_exit(&o, 2);
}

#[test]
fn expect_sha256_refuses_a_wrong_input_before_writing() {
    let f = finished();
    let dir = tempfile::tempdir().unwrap();
    let base = f.inputs.join("base");
    let good: String = ["config.json", "model.safetensors", "tokenizer.model"]
        .iter()
        .map(|n| format!("{}  base/{n}\n", sha256_file(&base.join(n))))
        .collect();
    let mut bad = good.clone();
    bad.push_str(&format!(
        "{}  lora/adapter_model.safetensors\n",
        "0".repeat(64)
    ));
    let list = dir.path().join("SHA256SUMS.published");
    std::fs::write(&list, &bad).unwrap();
    let out = dir.path().join("fresh");
    let o = run_pipeline(&f.inputs, &out, &["--expect-sha256", ps(&list)]);
    assert_exit(&o, 1);
    let e = stderr(&o);
    assert!(
        e.contains("MISMATCH") && e.contains("adapter_model.safetensors"),
        "{e}"
    );
    assert!(!out.exists(), "--out was created before the check");
    // a list naming none of the inputs is an error too
    std::fs::write(&list, format!("{}  other.bin\n", "0".repeat(64))).unwrap();
    let o = run_pipeline(&f.inputs, &out, &["--expect-sha256", ps(&list)]);
    assert_exit(&o, 2);
    assert!(!out.exists());
    // the right list passes (on an up-to-date copy: nothing else to do)
    std::fs::write(&list, &good).unwrap();
    let copy = copy_of_finished(&dir.path().join("zh-demo"));
    let o = run_pipeline(&f.inputs, &copy, &["--expect-sha256", ps(&list)]);
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("3 input(s) match"), "{}", stderr(&o));
}

#[test]
fn hostile_outputs_and_texts_are_clear_errors() {
    let f = finished();
    let dir = tempfile::tempdir().unwrap();
    // --out is a file
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let o = run_pipeline(&f.inputs, &file, &[]);
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("exists and is not a folder"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    // a folder nobody can create
    let o = run_pipeline(&f.inputs, Path::new("/proc/kiln-test/out"), &[]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("/proc/kiln-test/out"), "{}", stderr(&o));
    // a read-only folder (meaningless as root, who may write anyway)
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    if std::fs::write(ro.join("probe"), b"x").is_err() {
        let o = run_pipeline(&f.inputs, &ro.join("out"), &[]);
        assert_exit(&o, 2);
        assert!(stderr(&o).contains("cannot"), "{}", stderr(&o));
        let o = run_pipeline(&f.inputs, &ro, &[]);
        assert_exit(&o, 2);
        assert!(stderr(&o).contains("cannot write"), "{}", stderr(&o));
    } else {
        skip_unsupported("the read-only folder case: running as root");
    }
    // eval text too short for the context: exit 2, finished steps kept
    let out = copy_of_finished(&dir.path().join("zh-demo"));
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "The kiln stands at the end of the lane.\n").unwrap();
    let o = run_pipeline(&f.inputs, &out, &["--eval-text", ps(&short)]);
    assert_exit(&o, 2);
    let e = stderr(&o);
    assert!(e.contains("short.txt") && e.contains("too short"), "{e}");
    let o = run(&["verify", ps(&out)]);
    assert_exit(&o, 0);
    // device and levels
    let o = run_pipeline(&f.inputs, &out, &["--device", "cuda"]);
    assert_exit(&o, 2);
    let e = stderr(&o);
    assert!(
        e.contains("--device cuda:0") && e.contains("--device cpu"),
        "{e}"
    );
    if !kiln::model::cuda::driver_present() {
        assert!(e.contains("no NVIDIA driver found"), "{e}");
    }
    let o = run_pipeline(&f.inputs, &out, &["--quants", "q4_0,q9_9"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("q9_9"));
    // a foreign manifest is not overwritten
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("kiln-manifest.json"), b"{\"not\": \"ours\"}").unwrap();
    let o = run_pipeline(&f.inputs, &foreign, &[]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("not a kiln manifest"), "{}", stderr(&o));
}

#[test]
fn kld_and_bench_fill_their_columns() {
    let f = finished();
    let dir = tempfile::tempdir().unwrap();
    let out = copy_of_finished(&dir.path().join("zh-demo"));
    let o = run_pipeline(&f.inputs, &out, &["--kld", "--bench"]);
    assert_exit(&o, 0);
    let e = stderr(&o);
    assert!(e.contains("skip quantize q4_0 (up to date)") && e.contains("skip ppl q8_0 demo-text"));
    let r = report(&out);
    assert!(level(&r, "F16")["kld"].is_null());
    let base = out.join("eval/kld-base-demo-text.bin");
    for lv in ["Q4_0", "Q8_0"] {
        let k = &level(&r, lv)["kld"];
        let kld = k["mean_kld"].as_f64().unwrap();
        assert!(kld > 0.0 && kld < 1.0, "{lv} {kld}");
        let o = run(&[
            "perplexity",
            "-m",
            ps(&out.join(format!("model-{}.gguf", lv.to_lowercase()))),
            "--kl-divergence-base",
            ps(&base),
            "--kl-divergence",
            "--json",
            "--quiet",
        ]);
        assert_exit(&o, 0);
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(k["mean_kld"], j["kld"]["value"], "{lv}");
        let (a, b) = (
            k["same_top_pct"].as_f64().unwrap(),
            100.0 * j["same_top"]["value"].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-9, "{lv}: {a} vs {b}");
    }
    assert!(
        level(&r, "Q4_0")["kld"]["mean_kld"].as_f64().unwrap()
            > level(&r, "Q8_0")["kld"]["mean_kld"].as_f64().unwrap()
    );
    for lv in ["F16", "Q4_0", "Q8_0"] {
        let b = &level(&r, lv)["bench"];
        assert!(b["pp_tok_s"].as_f64().unwrap() > 0.0, "{lv}");
        assert!(b["tg_ms_tok"].as_f64().unwrap() > 0.0, "{lv}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("mean KLD") && md.contains("pp tok/s") && md.contains("tg ms/tok"));
    let o = run(&["verify", ps(&out)]);
    assert_exit(&o, 0);
    // and the rerun skips them too
    let o = run_pipeline(&f.inputs, &out, &["--kld", "--bench"]);
    assert_exit(&o, 0);
    let e = stderr(&o);
    for id in [
        "kld-base demo-text",
        "kld q4_0 demo-text",
        "bench f16",
        "bench q8_0",
    ] {
        assert!(e.contains(&format!("skip {id} (up to date)")), "{id}: {e}");
    }
}

#[test]
fn model_mode_evaluates_an_existing_gguf() {
    let f = finished();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("eval-only");
    let m = f.out.join("model-f16.gguf");
    let o = run(&[
        "pipeline",
        "--model",
        ps(&m),
        "--out",
        ps(&out),
        "--quants",
        "q8_0",
        "--eval-text",
        ps(&f.inputs.join("demo-text.txt")),
        "-c",
        CTX,
        "--chunks",
        CHUNKS,
        "--quiet",
    ]);
    assert_exit(&o, 0);
    assert!(!out.join("model-f16.gguf").exists());
    assert_eq!(
        std::fs::read(out.join("model-q8_0.gguf")).unwrap(),
        std::fs::read(f.out.join("model-q8_0.gguf")).unwrap()
    );
    let (a, b) = (report(&f.out), report(&out));
    assert_eq!(level(&a, "F16")["ppl"], level(&b, "F16")["ppl"]);
    assert_eq!(level(&a, "Q8_0")["ppl"], level(&b, "Q8_0")["ppl"]);
    assert_eq!(b["inputs"][0]["sha256"], sha256_file(&m));
}

/// `kiln imatrix` on `m` over `text` into `im` at the pipeline's context; must succeed.
fn imatrix_by_hand(m: &Path, text: &Path, im: &Path, chunks: &str) {
    let (m, t, i) = (ps(m), ps(text), ps(im));
    let o = run(&[
        "imatrix", "-m", m, "-f", t, "-o", i, "-c", CTX, "--chunks", chunks, "--quiet",
    ]);
    assert_exit(&o, 0);
}

/// `kiln quantize --imatrix im m out TYPE`; must succeed.
fn quantize_by_hand(im: &Path, m: &Path, out: &Path, ty: &str) {
    let o = run(&[
        "quantize",
        "--imatrix",
        ps(im),
        ps(m),
        ps(out),
        ty,
        "--quiet",
    ]);
    assert_exit(&o, 0);
}

#[test]
fn imatrix_is_an_input_of_the_quantize_steps() {
    let f = finished();
    let dir = tempfile::tempdir().unwrap();
    let m = f.out.join("model-f16.gguf");
    let im = dir.path().join("imatrix.gguf");
    let text = f.inputs.join("demo-text.txt");
    imatrix_by_hand(&m, &text, &im, "2");
    let out = dir.path().join("im");
    let args = |extra: &[&str]| {
        let mut v = vec![
            "pipeline",
            "--model",
            ps(&m),
            "--out",
            ps(&out),
            "--quants",
            "q2_k",
            "--quiet",
        ];
        v.extend_from_slice(extra);
        run(&v)
    };
    let o = args(&["--imatrix", ps(&im)]);
    assert_exit(&o, 0);
    let hand = dir.path().join("q2_k.gguf");
    quantize_by_hand(&im, &m, &hand, "Q2_K");
    assert_eq!(
        std::fs::read(&hand).unwrap(),
        std::fs::read(out.join("model-q2_k.gguf")).unwrap()
    );
    let r = report(&out);
    let listed: Vec<&str> = r["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap())
        .collect();
    assert!(listed.contains(&ps(&im)), "{listed:?}");
    // without the imatrix the level is redone (and differs)
    let o = args(&[]);
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("] quantize Q2_K"), "{}", stderr(&o));
    assert_ne!(
        std::fs::read(&hand).unwrap(),
        std::fs::read(out.join("model-q2_k.gguf")).unwrap()
    );
}

#[test]
fn imatrix_text_quantizes_each_k_level_with_and_without_it() {
    let f = finished();
    let dir = tempfile::tempdir().unwrap();
    let out = copy_of_finished(&dir.path().join("zh-demo"));
    let text = f.inputs.join("demo-text.txt");
    let mut a = pipeline_args(&f.inputs, &out);
    let i = a.iter().position(|x| x == "--quants").unwrap();
    a[i + 1] = "q4_k_m,q2_k_s".into();
    a.extend(["--imatrix-text".to_string(), ps(&text).to_string()]);
    let o = kiln().args(&a).output().unwrap();
    assert_exit(&o, 0);
    let e = stderr(&o);
    assert!(e.contains("skip merge (up to date)"), "{e}");
    for name in [
        "imatrix.gguf",
        "model-q4_k_m.gguf",
        "model-q4_k_m-imatrix.gguf",
        "model-q2_k_s-imatrix.gguf",
        "eval/ppl-q4_k_m-imatrix-demo-text.json",
        "eval/ppl-q2_k_s-imatrix-demo-text.json",
    ] {
        assert!(out.join(name).is_file(), "{name} missing:\n{e}");
    }
    // Q2_K_S needs an imatrix: only its +imatrix variant is made.
    assert!(!out.join("model-q2_k_s.gguf").exists());

    // imatrix.gguf is `kiln imatrix` with the same settings, byte for byte.
    let m = out.join("model-f16.gguf");
    let im = dir.path().join("hand-imatrix.gguf");
    imatrix_by_hand(&m, &text, &im, CHUNKS);
    assert_eq!(
        std::fs::read(&im).unwrap(),
        std::fs::read(out.join("imatrix.gguf")).unwrap(),
        "imatrix.gguf differs from kiln imatrix"
    );
    // model-q4_k_m-imatrix.gguf is `kiln quantize --imatrix <out>/imatrix.gguf`, byte for byte.
    let hand = dir.path().join("q4_k_m-imatrix.gguf");
    quantize_by_hand(&out.join("imatrix.gguf"), &m, &hand, "Q4_K_M");
    assert_eq!(
        std::fs::read(&hand).unwrap(),
        std::fs::read(out.join("model-q4_k_m-imatrix.gguf")).unwrap()
    );
    assert_ne!(
        std::fs::read(out.join("model-q4_k_m.gguf")).unwrap(),
        std::fs::read(out.join("model-q4_k_m-imatrix.gguf")).unwrap()
    );

    // The report has a row with and without the imatrix.
    let r = report(&out);
    let names: Vec<&str> = r["levels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["level"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["F16", "Q4_K_M", "Q4_K_M+imatrix", "Q2_K_S+imatrix"]);
    let row = level(&r, "Q4_K_M+imatrix");
    assert_eq!(row["file"], "model-q4_k_m-imatrix.gguf");
    assert!(row["ppl"][0]["ppl"].as_f64().unwrap() > 1.0, "{row}");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("Q4_K_M+imatrix") && md.contains("Q2_K_S+imatrix"));
    let listed: Vec<&str> = r["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap())
        .collect();
    assert!(listed.contains(&ps(&text)), "{listed:?}");
    let s = sums(&out);
    assert!(s.iter().any(|(_, n)| n == "imatrix.gguf"), "{s:?}");

    // A rerun skips everything.
    let o = kiln().args(&a).output().unwrap();
    assert_exit(&o, 0);
    let e = stderr(&o);
    for id in [
        "merge",
        "imatrix",
        "quantize q4_k_m",
        "quantize q4_k_m-imatrix",
        "quantize q2_k_s-imatrix",
        "ppl q4_k_m-imatrix demo-text",
        "ppl q2_k_s-imatrix demo-text",
        "report",
    ] {
        assert!(e.contains(&format!("skip {id} (up to date)")), "{id}:\n{e}");
    }
    assert!(
        !e.contains("] importance matrix")
            && !e.contains("] quantize ")
            && !e.contains("] perplexity "),
        "{e}"
    );

    // --imatrix and --imatrix-text conflict.
    a.extend(["--imatrix".to_string(), ps(&im).to_string()]);
    let o = kiln().args(&a).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}
