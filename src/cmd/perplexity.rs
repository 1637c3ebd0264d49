//! `kiln perplexity`: perplexity of a GGUF model on a text file, and KL divergence against a base
//! model's saved log-probabilities, computed as llama-perplexity does (same chunks, BOS
//! substitution, second-half scoring, base-file format and statistics).

use crate::cmd::eval_args::{ModelArgs, RopeArgs};
use crate::cmd::progress::Terminal;
use crate::Outcome;
use anyhow::{bail, Result};
use kiln::eval::job::{
    self, KldOptions, PerplexityDone, PerplexityOptions, TextInput, DEFAULT_CTX,
};
use kiln::eval::kld::{self, KldResult, DP_QUANTILES, KLD_QUANTILES};
use std::path::PathBuf;

/// Arguments of `kiln perplexity` (llama-perplexity's flag names).
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  kiln perplexity -m model-q4_k_m.gguf -f wiki.test.raw -c 512\n  kiln perplexity -m model-f16.gguf -f wiki.test.raw --kl-divergence-base f16.kld\n  kiln perplexity -m model-q4_k_m.gguf --kl-divergence --kl-divergence-base f16.kld\n  kiln perplexity -m model.gguf -f long.txt -c 8192 --ntk auto"
)]
pub struct Args {
    #[command(flatten)]
    pub m: ModelArgs,
    /// The text file (its one trailing newline is dropped, as llama-perplexity does).
    #[arg(short = 'f', long = "file", required_unless_present_any = ["token_ids", "kl_divergence"])]
    pub file: Option<PathBuf>,
    /// Tokens per chunk [default: 512; with --kl-divergence, the base file's].
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx: Option<usize>,
    /// Tokens per forward pass (capped at the context size).
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048)]
    pub batch: usize,
    /// Evaluate at most N chunks.
    #[arg(long, value_name = "N")]
    pub chunks: Option<usize>,
    /// The base model's log-probabilities: written here (with -f), or read (with --kl-divergence).
    /// llama-perplexity's file format: files are interchangeable with it.
    #[arg(long, value_name = "FILE")]
    pub kl_divergence_base: Option<PathBuf>,
    /// Compare the model with the base log-probabilities of --kl-divergence-base (KLD, Δp,
    /// same-top-token and PPL-ratio statistics).
    #[arg(long, requires = "kl_divergence_base")]
    pub kl_divergence: bool,
    #[command(flatten)]
    pub rope: RopeArgs,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
    /// Read token ids (whitespace, comma or bracket separated, BOS included) instead of
    /// tokenizing -f (for testing against `llama-tokenize --ids`).
    #[arg(long, value_name = "FILE", hide = true)]
    pub token_ids: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<Outcome> {
    let term = Terminal::new(a.quiet);
    if a.kl_divergence {
        return run_kld(&a, &term);
    }
    let text = match (&a.token_ids, &a.file) {
        (Some(ids), _) => TextInput::TokenIds(ids.clone()),
        (None, Some(f)) => TextInput::File(f.clone()),
        (None, None) => bail!("give the text with -f"),
    };
    let opts = PerplexityOptions {
        target: a.m.target(&a.rope)?,
        text,
        n_ctx: a.ctx.unwrap_or(DEFAULT_CTX),
        n_batch: a.batch,
        chunks: a.chunks,
        save_base: a.kl_divergence_base.clone(),
    };
    let done = job::perplexity(&opts, &term)?;
    print_ppl(&a, &done)?;
    Ok(Outcome::Ok)
}

fn print_ppl(a: &Args, done: &PerplexityDone) -> Result<()> {
    let PerplexityDone {
        result,
        rope,
        n_tokens,
        n_batch,
        seconds: secs,
    } = done;
    let tps = result.n_eval as f64 / secs.max(1e-9);
    if a.json {
        let j = serde_json::json!({
            "model": a.m.model.display().to_string(),
            "n_ctx": result.n_eval / result.n_chunk.max(1),
            "n_batch": n_batch,
            "n_chunk": result.n_chunk,
            "n_tokens": n_tokens,
            "n_scored": result.n_scored,
            "running": result.running,
            "ppl": result.ppl,
            "ppl_err": result.ppl_err,
            "rope_freq_base": rope.freq_base,
            "rope_freq_scale": rope.freq_scale,
            "ntk_alpha": rope.ntk_alpha,
            "n_ctx_train": rope.n_ctx_train,
            "kl_divergence_base": a.kl_divergence_base.as_ref().map(|p| p.display().to_string()),
            "seconds": secs,
            "tokens_per_second": tps,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    let line: String = result
        .running
        .iter()
        .enumerate()
        .map(|(i, r)| format!("[{}]{r:.4},", i + 1))
        .collect();
    println!("{line}");
    match result.ppl_err {
        Some(e) => println!("Final estimate: PPL = {:.4} +/- {e:.5}", result.ppl),
        None => println!(
            "Final estimate: PPL = {:.4} (the variance of log(prob) is not positive)",
            result.ppl
        ),
    }
    if a.rope.any() {
        println!("{rope}");
    }
    eprintln!(
        "perplexity: {} tokens in {secs:.2} s ({tps:.1} tokens/s)",
        result.n_eval
    );
    Ok(())
}

fn run_kld(a: &Args, term: &Terminal) -> Result<Outcome> {
    let Some(base_path) = &a.kl_divergence_base else {
        bail!("--kl-divergence needs --kl-divergence-base FILE");
    };
    let opts = KldOptions {
        target: a.m.target(&a.rope)?,
        base: base_path.clone(),
        n_ctx: a.ctx,
        n_batch: a.batch,
        chunks: a.chunks,
    };
    let done = job::kld(&opts, term)?;
    let (result, rope, ctx, secs) = (&done.result, &done.rope, done.n_ctx, done.seconds);
    let tps = (result.n_chunk * ctx) as f64 / secs.max(1e-9);
    if a.json {
        let mut j = serde_json::to_value(result)?;
        if let Some(o) = j.as_object_mut() {
            o.insert("model".into(), a.m.model.display().to_string().into());
            o.insert(
                "kl_divergence_base".into(),
                base_path.display().to_string().into(),
            );
            o.insert("rope_freq_base".into(), rope.freq_base.into());
            o.insert("rope_freq_scale".into(), rope.freq_scale.into());
            o.insert("seconds".into(), secs.into());
            o.insert("tokens_per_second".into(), tps.into());
        }
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(Outcome::Ok);
    }
    println!("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p");
    for row in &done.rows {
        println!(
            "{:4}    {:9.4} ± {:9.4}    {:10.5} ± {:10.5}    {:10.5} ± {:10.5}    {:6.3} ± {:6.3} %    {:6.3} ± {:6.3} %",
            row.chunk,
            row.ppl.value,
            row.ppl.unc,
            row.ln_ppl_ratio.value,
            row.ln_ppl_ratio.unc,
            row.kld.value,
            row.kld.unc,
            100.0 * row.rms_dp.value,
            100.0 * row.rms_dp.unc,
            100.0 * row.same_top.value,
            100.0 * row.same_top.unc,
        );
    }
    println!();
    if result.count < 100 {
        eprintln!(
            "kl-divergence: only {} scored tokens; llama-perplexity prints no statistics below 100",
            result.count
        );
    } else {
        print_kld_stats(result);
    }
    if a.rope.any() {
        println!("{rope}");
    }
    eprintln!(
        "kl-divergence: {} tokens in {secs:.2} s ({tps:.1} tokens/s)",
        result.n_chunk * ctx
    );
    Ok(Outcome::Ok)
}

/// The final statistics, formatted as llama-perplexity prints them.
fn print_kld_stats(r: &KldResult) {
    println!("====== Perplexity statistics ======");
    let pm = |name: &str, e: kld::Estimate| {
        println!("{name:<30}: {:10.6} ± {:10.6}", e.value, e.unc);
    };
    pm("Mean PPL(Q)", r.ppl);
    pm("Mean PPL(base)", r.ppl_base);
    println!("Cor(ln(PPL(Q)), ln(PPL(base))): {:6.2}%", 100.0 * r.cor);
    pm("Mean ln(PPL(Q)/PPL(base))", r.ln_ppl_ratio);
    pm("Mean PPL(Q)/PPL(base)", r.ppl_ratio);
    pm("Mean PPL(Q)-PPL(base)", r.ppl_diff);
    println!();
    println!("====== KL divergence statistics ======");
    println!("Mean    KLD: {:10.6} ± {:10.6}", r.kld.value, r.kld.unc);
    println!("Maximum KLD: {:10.6}", r.kld_spread.max);
    for ((label, f), (_, v)) in KLD_QUANTILES.iter().zip(&r.kld_spread.quantiles) {
        if *f < 0.5 && *f > 0.099 {
            println!("Median  KLD: {:10.6}", r.kld_spread.median);
        }
        println!("{label:<8}KLD: {v:10.6}");
    }
    println!("Minimum KLD: {:10.6}", r.kld_spread.min);
    println!();
    println!("====== Token probability statistics ======");
    println!(
        "Mean    Δp: {:6.3} ± {:5.3} %",
        100.0 * r.dp.value,
        100.0 * r.dp.unc
    );
    println!("Maximum Δp: {:6.3}%", 100.0 * r.dp_spread.max);
    for ((label, f), (_, v)) in DP_QUANTILES.iter().zip(&r.dp_spread.quantiles) {
        if *f < 0.5 && *f > 0.249 {
            println!("Median  Δp: {:6.3}%", 100.0 * r.dp_spread.median);
        }
        println!("{label:<8}Δp: {:6.3}%", 100.0 * v);
    }
    println!("Minimum Δp: {:6.3}%", 100.0 * r.dp_spread.min);
    println!(
        "RMS Δp    : {:6.3} ± {:5.3} %",
        100.0 * r.rms_dp.value,
        100.0 * r.rms_dp.unc
    );
    println!(
        "Same top p: {:6.3} ± {:5.3} %",
        100.0 * r.same_top.value,
        100.0 * r.same_top.unc
    );
}
