//! Tests of the `kiln` library called from Rust, without the binary: convert, quantize,
//! perplexity, KLD, bench and imatrix jobs on the GQA fixture model, their determinism over
//! threads and batch sizes, and that the CLI prints exactly what the library computes.

mod common;
use common::*;
use kiln::convert::{self, ConvertOptions};
use kiln::eval::bench::BenchParams;
use kiln::eval::job::{
    self, BenchOptions, ImatrixDone, ImatrixFormat, ImatrixOptions, KldOptions, PerplexityOptions,
    Target,
};
use kiln::progress::Silent;
use kiln::quant_plan::Ftype;
use kiln::quantize::{quantize, QuantizeOptions};
use kiln::shape::ModelShape;
use kiln_formats::gguf::GgufFile;
use std::path::Path;

fn ppl_opts(model: &Path, text: &Path, threads: usize, batch: usize) -> PerplexityOptions {
    let mut o = PerplexityOptions::new(model.into(), text.into());
    o.n_ctx = 128;
    o.n_batch = batch;
    o.chunks = Some(3);
    o.target.threads = Some(threads);
    o
}

#[test]
fn jobs_from_rust_match_the_cli_and_are_deterministic() {
    let Some(fx) = fixtures() else { return };
    let Some(text) = zh_text() else { return };
    let tmp = tempfile::tempdir().unwrap();

    // convert: the same bytes as `kiln convert`
    let f16 = tmp.path().join("lib.f16.gguf");
    let done = convert::convert(
        &ConvertOptions::new(fx.join("gqa-zh/st"), f16.clone()),
        &Silent,
    )
    .unwrap();
    assert!(done.n_tensors > 0 && done.bytes > 0);
    let cli_f16 = gqa_f16(&fx, tmp.path());
    assert_eq!(sha256_file(&f16), sha256_file(&cli_f16));

    // one shape, from the GGUF and from config.json
    let g = GgufFile::open(&f16).unwrap();
    let from_gguf = ModelShape::from_gguf(&g).unwrap();
    let cfg = kiln_formats::hf::LlamaConfig::load(&fx.join("gqa-zh/st/config.json")).unwrap();
    let from_hf = ModelShape::from_hf(&cfg).unwrap();
    assert_eq!(from_gguf, from_hf);
    assert!(
        from_gguf.n_head_kv < from_gguf.n_head,
        "the fixture uses GQA"
    );

    // quantize
    let q = tmp.path().join("lib.q4_k_m.gguf");
    let qjob = quantize(&QuantizeOptions::new(f16.clone(), Ftype::Q4KM)).unwrap();
    let qdone = qjob.write(&q, &Silent).unwrap();
    assert!(
        qdone.bpw_out > 4.0 && qdone.bpw_out < 6.0,
        "{}",
        qdone.bpw_out
    );

    // perplexity: identical for any thread count and batch size
    let a = job::perplexity(&ppl_opts(&q, &text, 1, 128), &Silent).unwrap();
    let b = job::perplexity(&ppl_opts(&q, &text, 2, 32), &Silent).unwrap();
    assert_eq!(a.result.n_chunk, 3);
    assert_eq!(a.result.ppl.to_bits(), b.result.ppl.to_bits());
    assert_eq!(a.result.running, b.result.running);

    // the CLI prints what the library computed
    let o = run_kiln(&[
        "perplexity",
        "-m",
        q.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "-c",
        "128",
        "--chunks",
        "3",
        "--json",
        "-q",
    ]);
    assert_exit(&o, 0);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["ppl"].as_f64().unwrap().to_bits(), a.result.ppl.to_bits());

    // KLD of the F16 model against its own base: zero divergence, same top token everywhere
    let base = tmp.path().join("f16.kld");
    let mut po = ppl_opts(&f16, &text, 2, 128);
    po.save_base = Some(base.clone());
    let f = job::perplexity(&po, &Silent).unwrap();
    let k = job::kld(
        &KldOptions {
            target: Target::new(f16.clone()),
            base: base.clone(),
            n_ctx: None,
            n_batch: 2048,
            chunks: None,
        },
        &Silent,
    )
    .unwrap();
    assert_eq!(k.n_ctx, 128);
    assert_eq!(k.rows.len(), 3);
    assert!(k.result.kld.value.abs() < 1e-6, "{:?}", k.result.kld);
    assert_eq!(k.result.same_top.value, 1.0);
    assert!((k.result.ppl.value - f.result.ppl).abs() / f.result.ppl < 1e-3);

    // bench needs no vocabulary and reports the device
    let bd = job::bench_model(
        &BenchOptions {
            target: Target::new(q.clone()),
            params: BenchParams {
                n_prompt: 16,
                n_gen: 4,
                reps: 1,
                n_batch: 16,
                warmup: false,
            },
        },
        &Silent,
    )
    .unwrap();
    assert_eq!(bd.stats.len(), 2);
    assert_eq!(bd.backend, "cpu");

    // imatrix: collected, written, readable
    let im = tmp.path().join("lib.imatrix.gguf");
    let mut seen = Vec::new();
    let done = job::imatrix(
        &ImatrixOptions {
            target: Target::new(f16.clone()),
            text: Some(text.clone()),
            output: im.clone(),
            format: ImatrixFormat::Gguf,
            n_ctx: 128,
            chunks: Some(2),
            in_files: Vec::new(),
            save_frequency: 0,
            output_frequency: 10,
            process_output: false,
            compute_ppl: true,
        },
        &Silent,
        &mut |k, _| seen.push(k),
    )
    .unwrap();
    assert_eq!(seen, vec![1, 2]);
    let ImatrixDone::Collected { entries, ppl, .. } = done else {
        panic!("expected a collection run")
    };
    assert_eq!(entries, 7 * from_gguf.n_layer);
    assert!(ppl.is_some());
    assert!(kiln_formats::imatrix::Imatrix::read(&im).is_ok());
}

#[test]
fn library_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.gguf");
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "hello").unwrap();
    let e = job::perplexity(&ppl_opts(&missing, &text, 1, 32), &Silent).unwrap_err();
    assert!(format!("{e:#}").contains("nope.gguf"), "{e:#}");
    let mut cuda = Target::new(missing);
    cuda.device = "cuda:0".parse().unwrap();
    let e = job::bench_model(
        &BenchOptions {
            target: cuda,
            params: BenchParams {
                n_prompt: 1,
                n_gen: 1,
                reps: 1,
                n_batch: 1,
                warmup: false,
            },
        },
        &Silent,
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("--device cpu"), "{e:#}");
}
