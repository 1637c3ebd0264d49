//! `kiln bench`: prompt-processing and generation speed of a GGUF model, measured as llama-bench
//! measures pp512 / tg128 (warm-up run, random tokens, repeated runs, mean ± sd).

use crate::cmd::eval_args::{ModelArgs, RopeArgs};
use crate::cmd::progress::Terminal;
use crate::Outcome;
use anyhow::Result;
use kiln::eval::bench::BenchParams;
use kiln::eval::job::{self, BenchOptions};
use kiln::progress::{Progress, Silent};

/// Arguments of `kiln bench` (llama-bench's flag names).
#[derive(clap::Args)]
#[command(after_help = "Example:\n  kiln bench -m model-q4_k_m.gguf -p 512 -n 128 -t 8")]
pub struct Args {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Prompt tokens of the pp test (0: skip it).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    pub n_prompt: usize,
    /// Generated tokens of the tg test (0: skip it).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub n_gen: usize,
    /// Timed repetitions of each test.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub reps: usize,
    /// Tokens per forward pass while processing the prompt.
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048)]
    pub batch: usize,
    /// Skip the untimed warm-up runs.
    #[arg(long)]
    pub no_warmup: bool,
    #[command(flatten)]
    pub rope: RopeArgs,
    /// Print the results as JSON (an array with llama-bench's field names).
    #[arg(long)]
    pub json: bool,
    /// No progress messages.
    #[arg(short, long)]
    pub quiet: bool,
}

fn human_size(b: u64) -> String {
    let b = b as f64;
    if b >= f64::from(1u32 << 30) {
        format!("{:.2} GiB", b / f64::from(1u32 << 30))
    } else {
        format!("{:.2} MiB", b / f64::from(1u32 << 20))
    }
}

fn human_count(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} B", n / 1e9)
    } else {
        format!("{:.2} M", n / 1e6)
    }
}

pub fn run(a: Args) -> Result<Outcome> {
    let opts = BenchOptions {
        target: a.m.target(&a.rope)?,
        params: BenchParams {
            n_prompt: a.n_prompt,
            n_gen: a.n_gen,
            reps: a.reps,
            n_batch: a.batch.max(1),
            warmup: !a.no_warmup,
        },
    };
    let term = Terminal::new(a.quiet);
    let progress: &dyn Progress = if a.quiet { &Silent } else { &term };
    let done = job::bench_model(&opts, progress)?;
    let (stats, size, n_params, threads) = (&done.stats, done.size, done.n_params, done.threads);
    let name =
        a.m.model
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
    if a.json {
        let arr: Vec<serde_json::Value> = stats
            .iter()
            .map(|s| {
                let mut j = serde_json::to_value(s).unwrap_or_default();
                if let Some(o) = j.as_object_mut() {
                    o.insert(
                        "model_filename".into(),
                        a.m.model.display().to_string().into(),
                    );
                    o.insert("model_size".into(), size.into());
                    o.insert("model_n_params".into(), n_params.into());
                    o.insert("n_threads".into(), threads.into());
                    o.insert("n_batch".into(), opts.params.n_batch.into());
                    o.insert("backend".into(), done.backend.into());
                    o.insert("rope_freq_base".into(), done.rope.freq_base.into());
                }
                j
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&arr)?);
        return Ok(Outcome::Ok);
    }
    println!("| model | size | params | backend | threads | test | t/s | ms/tok |");
    println!("| ----- | ---: | -----: | ------- | ------: | ---: | --: | -----: |");
    for s in stats {
        println!(
            "| {name} | {} | {} | {} | {threads} | {} | {:.2} ± {:.2} | {:.3} ± {:.3} |",
            human_size(size),
            human_count(n_params),
            done.backend,
            s.test,
            s.avg_ts,
            s.stddev_ts,
            s.avg_ms_per_token,
            s.stddev_ms_per_token
        );
    }
    Ok(Outcome::Ok)
}
