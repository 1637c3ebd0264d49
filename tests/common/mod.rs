//! Shared helpers of the CLI end-to-end tests: the kiln binary, ../shared, generated fixture models,
//! llama.cpp's reference tools, and the one way a test skips when one of those is missing.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

/// Runs kiln with `args` and returns its output.
pub fn run_kiln(args: &[&str]) -> Output {
    kiln().args(args).output().expect("kiln runs")
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// How to provide ../shared.
pub const HOW_SHARED: &str =
    "put the shared fixtures beside the checkout as ../shared or set KILN_SHARED";
/// How to provide the Python packages of the fixture generator and the independent checks.
pub const HOW_PYTHON: &str = "pip install numpy safetensors sentencepiece protobuf gguf";
/// How to provide llama.cpp's tools.
pub const HOW_LLAMACPP: &str = "export KILN_LLAMACPP_BIN=$(bash scripts/llamacpp-tools.sh)";

/// Whether `KILN_REQUIRE_INTEROP=1`: every fixture and external tool must be present (CI sets it
/// where it built llama.cpp's tools), so a missing one fails the test instead of skipping it.
pub fn interop_required() -> bool {
    std::env::var("KILN_REQUIRE_INTEROP").as_deref() == Ok("1")
}

fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string()
}

/// The one way a test skips for a missing fixture or external tool: `what` is missing, `how` says
/// how to provide it. Prints `SKIPPED <test>: ...` to stderr, or panics under
/// `KILN_REQUIRE_INTEROP=1`. The caller then returns.
pub fn skip(what: &str, how: &str) {
    let name = test_name();
    if interop_required() {
        panic!("KILN_REQUIRE_INTEROP=1 but {name} needs {what}: {how}");
    }
    visible(&format!(
        "SKIPPED {name}: {what} ({how}; KILN_REQUIRE_INTEROP=1 makes this a failure)"
    ));
}

/// Writes a line straight to the process's stderr: libtest captures `eprintln!` of passing tests,
/// not writes to the stream itself, so a skip shows in a plain `cargo test`.
fn visible(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// [`skip`], then None: for the helpers that hand a test what it needs.
fn missing<T>(what: &str, how: &str) -> Option<T> {
    skip(what, how);
    None
}

/// A visible skip for something of the machine rather than a fixture or tool (a CPU feature,
/// running as root): never a failure, not even under `KILN_REQUIRE_INTEROP=1`.
pub fn skip_unsupported(why: &str) {
    visible(&format!(
        "SKIPPED {}: {why} (a property of this machine, not a missing fixture or tool)",
        test_name()
    ));
}

/// `$KILN_SHARED` when set (only that folder), else the first `shared/` with `spec/llamacpp.md`
/// walking up from the checkout.
fn find_shared() -> Option<PathBuf> {
    if let Some(s) = std::env::var_os("KILN_SHARED") {
        let s = PathBuf::from(s);
        return s.join("spec/llamacpp.md").is_file().then_some(s);
    }
    let mut d = root();
    loop {
        let cand = d.join("shared");
        if cand.join("spec/llamacpp.md").is_file() {
            return Some(cand);
        }
        if !d.pop() {
            return None;
        }
    }
}

/// `../shared` (or `$KILN_SHARED`): the tokenizers, texts and spec beside the checkout; None after
/// a [`skip`] when it is missing.
pub fn shared_dir() -> Option<PathBuf> {
    find_shared().or_else(|| missing("../shared", HOW_SHARED))
}

fn python_ok() -> bool {
    Command::new("python3")
        .args(["-c", "import numpy, safetensors, sentencepiece, gguf"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs a fixture generator (`python3 SCRIPT OUT --shared SHARED`) once into `target/NAME`, again
/// whenever one of the generator scripts changed. Err(what is missing, how to provide it) when
/// Python or ../shared is missing.
fn generated(
    name: &str,
    script: &str,
    generators: &[&str],
) -> Result<PathBuf, (&'static str, &'static str)> {
    let shared = find_shared().ok_or(("../shared", HOW_SHARED))?;
    if !python_ok() {
        return Err((
            "python3 with numpy, safetensors, sentencepiece and gguf",
            HOW_PYTHON,
        ));
    }
    let out = root().join("target").join(name);
    let stamp = generators
        .iter()
        .map(|f| sha256_file(&root().join(f)))
        .collect::<Vec<_>>()
        .join("\n");
    if std::fs::read_to_string(out.join(".complete"))
        .ok()
        .as_deref()
        == Some(stamp.as_str())
    {
        return Ok(out);
    }
    let tmp = root()
        .join("target")
        .join(format!("{name}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let st = Command::new("python3")
        .arg(root().join(script))
        .arg(&tmp)
        .arg("--shared")
        .arg(&shared)
        .status()
        .expect("python3 runs");
    assert!(st.success(), "{script} failed");
    std::fs::write(tmp.join(".complete"), &stamp).unwrap();
    let _ = std::fs::remove_dir_all(&out);
    // Another test binary may have won the race; either copy is complete.
    if std::fs::rename(&tmp, &out).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    assert!(out.join(".complete").is_file());
    Ok(out)
}

/// The generated fixture models (`fixtures/gen_models.py`), made once per target folder; None after
/// a [`skip`] when Python or ../shared is missing.
pub fn fixtures() -> Option<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, (&str, &str)>> = OnceLock::new();
    DIR.get_or_init(|| {
        generated(
            "kiln-fixtures",
            "fixtures/gen_models.py",
            &["fixtures/gen_models.py", "fixtures/torchsave.py"],
        )
    })
    .clone()
    .map_or_else(|(what, how)| missing(what, how), Some)
}

/// The folder of llama.cpp's tools: `$KILN_LLAMACPP_BIN` when set (only that folder), else the
/// cache of scripts/llamacpp-tools.sh. None after a [`skip`] naming the first of llama-quantize,
/// llama-perplexity and `extra` that it lacks.
pub fn llamacpp_tools(extra: &[&str]) -> Option<PathBuf> {
    let dir = match std::env::var_os("KILN_LLAMACPP_BIN") {
        Some(d) => PathBuf::from(d),
        None => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".cache/llamacpp-oracle/0.3.36/build-cpu-noamx/bin"),
            None => {
                return missing(
                    "llama.cpp's tools (KILN_LLAMACPP_BIN unset, no HOME)",
                    HOW_LLAMACPP,
                )
            }
        },
    };
    for tool in ["llama-quantize", "llama-perplexity"].iter().chain(extra) {
        if !dir.join(tool).is_file() {
            return missing(
                &format!("llama.cpp's {tool} (not in {})", dir.display()),
                HOW_LLAMACPP,
            );
        }
    }
    Some(dir)
}

/// [`llamacpp_tools`] with llama-quantize and llama-perplexity.
pub fn llamacpp_bin() -> Option<PathBuf> {
    llamacpp_tools(&[])
}

/// Runs a Python check script from tests/interop and asserts it succeeds.
pub fn py_check<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(script: &str, args: &[S]) {
    let out = Command::new("python3")
        .arg(root().join("tests/interop").join(script))
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{script} {:?} failed:\n{}\n{}",
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn sha256_file(p: &Path) -> String {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(p).unwrap();
    format!("{:x}", Sha256::digest(bytes))
}

/// The generated LoRA fixtures (`fixtures/gen_lora.py`: a GQA base and PEFT adapters), made once per
/// target folder; None after a [`skip`] when Python or ../shared is missing.
pub fn lora_fixtures() -> Option<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, (&str, &str)>> = OnceLock::new();
    DIR.get_or_init(|| {
        generated(
            "kiln-lora-fixtures",
            "fixtures/gen_lora.py",
            &[
                "fixtures/gen_lora.py",
                "fixtures/gen_models.py",
                "fixtures/torchsave.py",
            ],
        )
    })
    .clone()
    .map_or_else(|(what, how)| missing(what, how), Some)
}

/// Compares two GGUF files: equal metadata values (order-insensitive), the same tensor names,
/// types and shapes, and byte-identical tensor data. Panics naming the first difference.
pub fn assert_same_gguf(a: &Path, b: &Path) {
    use kiln_formats::gguf::GgufFile;
    let fa = GgufFile::open(a).unwrap();
    let fb = GgufFile::open(b).unwrap();
    let mut ka: Vec<_> = fa.metadata.iter().collect();
    let mut kb: Vec<_> = fb.metadata.iter().collect();
    ka.sort_by(|x, y| x.0.cmp(&y.0));
    kb.sort_by(|x, y| x.0.cmp(&y.0));
    let names_a: Vec<_> = ka.iter().map(|x| &x.0).collect();
    let names_b: Vec<_> = kb.iter().map(|x| &x.0).collect();
    assert_eq!(
        names_a,
        names_b,
        "metadata keys differ: {} vs {}",
        a.display(),
        b.display()
    );
    for ((k, va), (_, vb)) in ka.iter().zip(&kb) {
        assert!(va == vb, "metadata {k} differs: {va:?} vs {vb:?}");
    }
    assert_eq!(fa.tensors.len(), fb.tensors.len(), "tensor count differs");
    for ta in &fa.tensors {
        let tb = fb
            .tensor(&ta.name)
            .unwrap_or_else(|| panic!("{} has no tensor {}", b.display(), ta.name));
        assert_eq!(
            (ta.ty, &ta.shape),
            (tb.ty, &tb.shape),
            "tensor {} type/shape",
            ta.name
        );
        let (da, db) = (fa.tensor_data(ta), fb.tensor_data(tb));
        if da != db {
            let bs = ta.ty.type_size();
            let first = da
                .chunks(bs)
                .zip(db.chunks(bs))
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            panic!(
                "tensor {} ({}) differs, first at block {first}",
                ta.name, ta.ty
            );
        }
    }
}

/// `../shared/fixtures/texts/zh-libai.txt`, the Chinese evaluation text; None after a [`skip`] when
/// it is missing.
pub fn zh_text() -> Option<PathBuf> {
    shared_file("fixtures/texts/zh-libai.txt")
}

/// `rel` inside ../shared; None after a [`skip`] when ../shared or the file is missing.
pub fn shared_file(rel: &str) -> Option<PathBuf> {
    let t = shared_dir()?.join(rel);
    if !t.is_file() {
        return missing(&format!("../shared/{rel}"), HOW_SHARED);
    }
    Some(t)
}

/// The GQA fixture model (55,296 vocabulary) converted to F16 GGUF in `dir` by `kiln convert`.
pub fn gqa_f16(fx: &Path, dir: &Path) -> PathBuf {
    let out = dir.join("gqa-zh.f16.gguf");
    let o = run_kiln(&[
        "convert",
        fx.join("gqa-zh/st").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-q",
    ]);
    assert_exit(&o, 0);
    out
}

/// `kiln pipeline` over the demo inputs in `inputs` (base/, lora/, demo-text.txt), writing to
/// `out`, for the comma-separated `quants`, evaluated at context `ctx` over `chunks` chunks, quiet.
pub fn demo_pipeline_args(
    inputs: &Path,
    out: &Path,
    quants: &str,
    ctx: &str,
    chunks: &str,
) -> Vec<String> {
    let p = |p: &Path| p.to_string_lossy().into_owned();
    let mut v: Vec<String> = vec!["pipeline".into(), "--base".into(), p(&inputs.join("base"))];
    v.extend([
        "--lora".into(),
        p(&inputs.join("lora")),
        "--out".into(),
        p(out),
    ]);
    v.extend(["--quants".into(), quants.into(), "--eval-text".into()]);
    v.push(p(&inputs.join("demo-text.txt")));
    v.extend(["-c".into(), ctx.into(), "--chunks".into(), chunks.into()]);
    v.push("--quiet".into());
    v
}
