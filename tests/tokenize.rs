//! Interop tests of `kiln tokenize`: ids identical to llama.cpp's `llama-tokenize` and to the Python
//! `sentencepiece` package with the real Chinese-LLaMA-2 (55,296) and Llama-2 (32,000) vocabularies,
//! llama.cpp's own SPM test corpus, the printed format, and hostile inputs.

mod common;
use common::*;
use kiln_formats::gguf::{GgufArray, GgufValue, GgufWriter, TensorSpec};
use kiln_formats::sentencepiece::{PieceType, SpModel};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The shared tokenizers: (name, tokenizer.model).
fn tokenizers(shared: &Path) -> Vec<(&'static str, PathBuf)> {
    vec![
        (
            "chinese-llama-2",
            shared.join("fixtures/chinese-llama-2-tokenizer/tokenizer.model"),
        ),
        (
            "llama-2",
            shared.join("fixtures/llama-2-tokenizer/tokenizer.model"),
        ),
    ]
}

/// Metadata llama.cpp needs to load a vocab-only Llama model.
fn hparams() -> Vec<(String, GgufValue)> {
    let u = |k: &str, v: u32| (k.to_string(), GgufValue::U32(v));
    vec![
        (
            "general.architecture".into(),
            GgufValue::String("llama".into()),
        ),
        ("general.name".into(), GgufValue::String("vocab".into())),
        u("llama.context_length", 512),
        u("llama.embedding_length", 64),
        u("llama.block_count", 1),
        u("llama.feed_forward_length", 128),
        u("llama.attention.head_count", 4),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            GgufValue::F32(1e-5),
        ),
    ]
}

fn write_gguf(path: &Path, md: &[(String, GgufValue)]) {
    let none: &[TensorSpec] = &[];
    GgufWriter::create(path, md, none)
        .unwrap()
        .finish()
        .unwrap();
}

/// A vocab-only GGUF with the tokenizer keys convert_hf_to_gguf writes for `spm` (spec §1.4).
fn vocab_gguf(spm: &Path, out: &Path) {
    let sp = SpModel::open(spm).unwrap();
    let mut md = hparams();
    md.push((
        "tokenizer.ggml.model".into(),
        GgufValue::String("llama".into()),
    ));
    md.push((
        "tokenizer.ggml.pre".into(),
        GgufValue::String("default".into()),
    ));
    md.push((
        "tokenizer.ggml.tokens".into(),
        GgufValue::Array(GgufArray::String(
            sp.pieces.iter().map(|p| p.piece.clone()).collect(),
        )),
    ));
    md.push((
        "tokenizer.ggml.scores".into(),
        GgufValue::Array(GgufArray::F32(sp.pieces.iter().map(|p| p.score).collect())),
    ));
    md.push((
        "tokenizer.ggml.token_type".into(),
        GgufValue::Array(GgufArray::I32(
            sp.pieces
                .iter()
                .map(|p| match p.kind {
                    PieceType::Unknown => 2,
                    PieceType::Control => 3,
                    PieceType::Unused => 5,
                    PieceType::Byte => 6,
                    _ => 1,
                })
                .collect(),
        )),
    ));
    for (k, v) in [
        ("bos_token_id", 1),
        ("eos_token_id", 2),
        ("unknown_token_id", 0),
    ] {
        md.push((format!("tokenizer.ggml.{k}"), GgufValue::U32(v)));
    }
    md.push(("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(true)));
    md.push((
        "tokenizer.ggml.add_eos_token".into(),
        GgufValue::Bool(false),
    ));
    write_gguf(out, &md);
}

/// Deterministic pseudo-random text over a pool of characters that stress the merges.
fn random_text(seed: u64, len: usize) -> String {
    const POOL: &[&str] = &[
        " ", " ", " ", "  ", "\t", "\n", "a", "e", "t", "th", "he", "in", "er", "the", "ing", "中",
        "国", "人", "的", "一", "是", "李", "白", "诗", "。", "，", "！", "?", ".", ",", "'", "-",
        "0", "1", "9", "😀", "🦙", "👍🏽", "é", "ü", "ß", "Ж", "я", "ק", "ع", "ñ", "<", ">", "/",
        "s", "<s>", "</s>", "~", "\u{2581}", "\u{200d}", "\r", "𝄞", "ǅ",
    ];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut s = String::new();
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(POOL[(x % POOL.len() as u64) as usize]);
    }
    s
}

/// The test texts: (label, text).
fn texts(shared: &Path) -> Vec<(String, String)> {
    let mut t: Vec<(String, String)> = vec![
        ("english".into(), "The quick brown fox jumps over the lazy dog. It's 3.14159 — isn't it? \
            Hello, World! e-mail: foo@bar.com; C++ & Rust (2024), \"quoted\" [brackets] {braces} 100%.".into()),
        ("english-multiline".into(), "Once upon a time,\nthere was a llama.\n\nThe End\n".into()),
        ("chinese".into(), std::fs::read_to_string(shared.join("fixtures/texts/zh-libai.txt")).unwrap()),
        ("mixed".into(), "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～ 李白（701年）is a Tang poet. \
            中文English混合123 Ελληνικά русский 日本語のテキスト 한국어".into()),
        ("whitespace".into(), "  leading\tand\t\ttabs  \n\n  multiple   spaces   \r\n trailing   ".into()),
        ("space".into(), " ".into()),
        ("spaces".into(), "   ".into()),
        ("newline".into(), "\n".into()),
        ("tab".into(), "\t".into()),
        ("indented".into(), "    Hello\n    Hello\n\t\tworld \n".into()),
        ("emoji".into(), "🚀 (normal) 😶‍🌫️ (multiple emojis concatenated) ✅ 🦙🦙 👍🏽 🇨🇳 👨‍👩‍👧‍👦 ☕️".into()),
        ("special-text".into(), "<s>hello</s> <unk> [INST] x [/INST] <<SYS>> </s>".into()),
        ("u2581".into(), "a\u{2581}b \u{2581}\u{2581}c".into()),
    ];
    for i in 0..12 {
        t.push((format!("random-{i}"), random_text(i, 40 + 13 * i as usize)));
    }
    t
}

fn write_texts(dir: &Path, texts: &[(String, String)]) -> Vec<PathBuf> {
    texts
        .iter()
        .map(|(l, s)| {
            let p = dir.join(format!("{l}.txt"));
            std::fs::write(&p, s).unwrap();
            p
        })
        .collect()
}

/// Parses `[1, 2, 3]`.
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

fn llama_tokenize(bin: &Path, gguf: &Path, file: &Path, extra: &[&str]) -> Vec<u8> {
    let o = Command::new(bin.join("llama-tokenize"))
        .args(["-m", gguf.to_str().unwrap(), "-f", file.to_str().unwrap()])
        .args(["--log-disable", "--no-escape"])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "llama-tokenize failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// The Python sentencepiece ids (with BOS) of each file.
fn sentencepiece_ids(spm: &Path, files: &[PathBuf]) -> Vec<Vec<u32>> {
    let script = "import sys, json\nimport sentencepiece as spm\n\
        sp = spm.SentencePieceProcessor(model_file=sys.argv[1])\n\
        print(json.dumps([sp.encode(open(f, encoding='utf-8', newline='').read(), add_bos=True) for f in sys.argv[2:]]))\n";
    let o = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(spm)
        .args(files)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "sentencepiece failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn python_sentencepiece() -> bool {
    Command::new("python3")
        .args(["-c", "import sentencepiece"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn identical_to_llama_tokenize() {
    let Some(shared) = shared_dir() else { return };
    let Some(bin) = llamacpp_tools(&["llama-tokenize"]) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let texts = texts(&shared);
    let files = write_texts(tmp.path(), &texts);
    for (name, spm) in tokenizers(&shared) {
        let gguf = tmp.path().join(format!("{name}.gguf"));
        vocab_gguf(&spm, &gguf);
        for ((label, _), file) in texts.iter().zip(&files) {
            for (kiln_extra, llama_extra) in [
                (&[][..], &["--no-parse-special"][..]),
                (&["--no-bos"][..], &["--no-parse-special", "--no-bos"][..]),
                (&["--parse-special"][..], &[][..]),
            ] {
                let want = parse_ids(&llama_tokenize(
                    &bin,
                    &gguf,
                    file,
                    &[llama_extra, &["--ids"][..]].concat(),
                ));
                let got = kiln_ids(&gguf, file, kiln_extra);
                assert_eq!(got, want, "{name}: {label} {kiln_extra:?}");
            }
        }
        // The default listing (`id -> 'piece'`) is byte for byte llama-tokenize's.
        for label in ["mixed", "emoji", "whitespace", "special-text"] {
            let i = texts.iter().position(|t| t.0 == label).unwrap();
            let want = llama_tokenize(&bin, &gguf, &files[i], &["--no-parse-special"]);
            let o = run_kiln(&[
                "tokenize",
                "-m",
                gguf.to_str().unwrap(),
                "-f",
                files[i].to_str().unwrap(),
            ]);
            assert_exit(&o, 0);
            assert!(
                o.stdout == want,
                "{name}: {label} listing differs:\nkiln:\n{}\nllama-tokenize:\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&want)
            );
        }
    }
}

#[test]
fn identical_to_sentencepiece() {
    let Some(shared) = shared_dir() else { return };
    if !python_sentencepiece() {
        skip("python3 with sentencepiece", HOW_PYTHON);
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let texts = texts(&shared);
    let files = write_texts(tmp.path(), &texts);
    for (name, spm) in tokenizers(&shared) {
        let gguf = tmp.path().join(format!("{name}.gguf"));
        vocab_gguf(&spm, &gguf);
        let want = sentencepiece_ids(&spm, &files);
        for (((label, _), file), want) in texts.iter().zip(&files).zip(&want) {
            let got = kiln_ids(&gguf, file, &[]);
            assert_eq!(&got, want, "{name}: {label}");
        }
    }
}

/// llama.cpp's own SPM test corpus (models/ggml-vocab-llama-spm.gguf.inp/.out, tokenized without
/// BOS and without parsing special tokens), next to the oracle's build.
#[test]
fn llama_cpp_spm_test_corpus() {
    let Some(bin) = llamacpp_bin() else { return };
    let models = bin.join("../../src/models");
    let (gguf, inp, outp) = (
        models.join("ggml-vocab-llama-spm.gguf"),
        models.join("ggml-vocab-llama-spm.gguf.inp"),
        models.join("ggml-vocab-llama-spm.gguf.out"),
    );
    if !(gguf.is_file() && inp.is_file() && outp.is_file()) {
        skip(
            &format!("llama.cpp's SPM test corpus in {}", models.display()),
            HOW_LLAMACPP,
        );
        return;
    }
    let raw = std::fs::read(&inp).unwrap();
    let sep = b"\n__ggml_vocab_test__\n";
    let mut cases = Vec::new();
    let mut pos = 0;
    while pos < raw.len() {
        match raw[pos..].windows(sep.len()).position(|w| w == sep) {
            Some(n) => {
                cases.push(raw[pos..pos + n].to_vec());
                pos += n + sep.len();
            }
            None => {
                cases.push(raw[pos..].to_vec());
                break;
            }
        }
    }
    let outs = std::fs::read_to_string(&outp).unwrap();
    let outs: Vec<&str> = outs.lines().collect();
    assert_eq!(cases.len(), outs.len());
    let tmp = tempfile::tempdir().unwrap();
    for (i, (text, want)) in cases.iter().zip(&outs).enumerate() {
        let f = tmp.path().join(format!("{i}.txt"));
        std::fs::write(&f, text).unwrap();
        let want: Vec<u32> = want
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        let got = kiln_ids(&gguf, &f, &["--no-bos"]);
        assert_eq!(got, want, "case {i}: {:?}", String::from_utf8_lossy(text));
    }
}

#[test]
fn empty_text_is_just_bos_and_json_output() {
    let Some(shared) = shared_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (_, spm) = &tokenizers(&shared)[1];
    let gguf = tmp.path().join("v.gguf");
    vocab_gguf(spm, &gguf);
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    assert_eq!(kiln_ids(&gguf, &empty, &[]), [1]);
    assert_eq!(kiln_ids(&gguf, &empty, &["--no-bos"]), Vec::<u32>::new());
    let o = run_kiln(&[
        "tokenize",
        "-m",
        gguf.to_str().unwrap(),
        "-p",
        "Hello world",
        "--json",
    ]);
    assert_exit(&o, 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ids"], serde_json::json!([1, 15043, 3186]));
    assert_eq!(v["pieces"], serde_json::json!(["<s>", " Hello", " world"]));
    assert_eq!(v["n_tokens"], 3);
    let o = run_kiln(&[
        "tokenize",
        "-m",
        gguf.to_str().unwrap(),
        "-p",
        "Hello world",
        "--show-count",
    ]);
    assert_exit(&o, 0);
    assert!(String::from_utf8_lossy(&o.stdout).ends_with("Total number of tokens: 3\n"));
}

#[test]
fn hostile_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    // A model without tokenizer.ggml.* keys.
    let bare = tmp.path().join("bare.gguf");
    write_gguf(&bare, &hparams());
    let o = run_kiln(&["tokenize", "-m", bare.to_str().unwrap(), "-p", "hi"]);
    assert_exit(&o, 2);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no vocabulary"), "{err}");
    // Another tokenizer model.
    let gpt2 = tmp.path().join("gpt2.gguf");
    let mut md = hparams();
    md.push((
        "tokenizer.ggml.model".into(),
        GgufValue::String("gpt2".into()),
    ));
    md.push((
        "tokenizer.ggml.tokens".into(),
        GgufValue::Array(GgufArray::String(vec!["a".into(), "b".into()])),
    ));
    write_gguf(&gpt2, &md);
    let o = run_kiln(&["tokenize", "-m", gpt2.to_str().unwrap(), "-p", "hi"]);
    assert_exit(&o, 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("unsupported tokenizer model"));
    // Not a GGUF, a missing model, a missing text file, no text at all.
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\0\0\0garbage").unwrap();
    assert_exit(
        &run_kiln(&["tokenize", "-m", junk.to_str().unwrap(), "-p", "x"]),
        2,
    );
    assert_exit(
        &run_kiln(&["tokenize", "-m", "/nonexistent.gguf", "-p", "x"]),
        2,
    );
    assert_exit(
        &run_kiln(&[
            "tokenize",
            "-m",
            bare.to_str().unwrap(),
            "-f",
            "/nonexistent.txt",
        ]),
        2,
    );
    assert_exit(&run_kiln(&["tokenize", "-m", bare.to_str().unwrap()]), 2);
}
