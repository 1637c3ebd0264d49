//! `kiln demo`: the main job on a fresh machine with no downloads: builds a small Llama-2-shaped
//! base model and a vocabulary-extending PEFT LoRA from an embedded text, then runs the whole
//! pipeline on them (merge, F16 GGUF, seven quantization levels, perplexity, KLD against F16,
//! report).

use crate::Outcome;
use anyhow::{Context, Result};
use kiln::demo;
use kiln::pipeline::{self, RunEnd, Settings, Source};
use std::path::PathBuf;
use std::time::Instant;

/// Levels the demo makes.
pub const DEMO_QUANTS: &str = "q2_k,q3_k_m,q4_0,q4_k_m,q5_k_m,q6_k,q8_0";

/// Arguments of `kiln demo`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  kiln demo --out /tmp/kiln-demo")]
pub struct Args {
    /// Folder for the demo inputs (base/, lora/, demo-text.txt) and the pipeline's output
    /// (pipeline/); default: kiln-demo in the system's temporary folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Tokens per perplexity chunk.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 128)]
    pub ctx: usize,
    /// Quantization levels.
    #[arg(long, default_value = DEMO_QUANTS, value_delimiter = ',')]
    pub quants: Vec<String>,
    /// Skip the KL divergence of each level against F16 (about halves the time).
    #[arg(long)]
    pub no_kld: bool,
    /// Redo every step.
    #[arg(long)]
    pub force: bool,
    /// No progress bars.
    #[arg(short, long)]
    pub quiet: bool,
    /// Threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Only write the demo inputs; run no pipeline.
    #[arg(long, hide = true)]
    pub build_only: bool,
}

pub fn run(a: Args) -> Result<Outcome> {
    let t0 = Instant::now();
    let dir = a
        .out
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("kiln-demo"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let inputs = demo::build(&dir, &demo::SHAPE)?;
    eprintln!(
        "demo inputs in {}: base/ (Llama-2-shaped, vocabulary {}), lora/ (PEFT, vocabulary {} with the text's Chinese characters), demo-text.txt ({:.1}s)",
        dir.display(),
        inputs.base_vocab,
        inputs.vocab,
        t0.elapsed().as_secs_f64()
    );
    if a.build_only {
        return Ok(Outcome::Ok);
    }
    if let Some(n) = a.threads {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global();
    }
    let out = dir.join("pipeline");
    let s = Settings {
        source: Source::Merge {
            base: inputs.base.clone(),
            loras: vec![inputs.lora.clone()],
        },
        out: out.clone(),
        quants: pipeline::parse_quants(&a.quants)?,
        texts: vec![inputs.text.clone()],
        n_ctx: a.ctx,
        n_batch: a.ctx,
        chunks: None,
        kld: !a.no_kld,
        bench: false,
        keep_hf: false,
        force: a.force,
        quiet: a.quiet,
        expect_sha256: None,
        imatrix: None,
        imatrix_text: None,
        name: Some("kiln-demo".into()),
        command: crate::cmd::pipeline::command_line(),
        device: kiln::model::device::Device::Cpu,
    };
    match pipeline::run(&s, &crate::cmd::pipeline::terminal(&s))? {
        RunEnd::Done(report) => {
            println!(
                "kiln demo: vocabulary {} (base {} + {} added by the LoRA), {} tokens of text, context {}",
                inputs.vocab,
                inputs.base_vocab,
                inputs.vocab - inputs.base_vocab,
                report.texts.first().map(|t| t.n_tokens).unwrap_or(0),
                a.ctx
            );
            print!("{}", report.summary());
            println!(
                "report: {} (report.json, report.svg beside it); total {:.1}s",
                out.join("report.md").display(),
                t0.elapsed().as_secs_f64()
            );
            Ok(Outcome::Ok)
        }
        RunEnd::ExpectMismatch => Ok(Outcome::CheckFailed),
    }
}
