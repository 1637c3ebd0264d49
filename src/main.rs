//! The `kiln` command line: one binary for merge, convert, quantize and evaluation of Llama models.

mod cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// kiln: merge LoRAs, convert to GGUF, quantize and evaluate Llama-family models, bit-exact with llama.cpp.
#[derive(Parser)]
#[command(name = "kiln", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show metadata and tensors of a GGUF, safetensors, .bin, tokenizer.model, HF or PEFT folder.
    Inspect(cmd::inspect::Args),
    /// Convert a Hugging Face Llama checkpoint folder to GGUF.
    Convert(cmd::convert::Args),
    /// Merge PEFT LoRA adapters into a Llama base (vocabulary resize included), to HF safetensors and/or GGUF.
    Merge(cmd::merge::Args),
    /// Quantize a GGUF file to any llama.cpp level (Q4_0 ... Q6_K and the _S/_M/_L mixes).
    Quantize(cmd::quantize::Args),
    /// Split a GGUF into llama-gguf-split's file set, or merge a set back (--merge).
    Split(cmd::split::Args),
    /// Perplexity of a GGUF model on a text, computed as llama-perplexity does.
    Perplexity(cmd::perplexity::Args),
    /// Tokenize text with a GGUF model's vocabulary, as llama.cpp's llama-tokenize does.
    Tokenize(cmd::tokenize::Args),
    /// Prompt-processing and generation speed of a GGUF model, measured as llama-bench does.
    Bench(cmd::bench::Args),
    /// Importance matrix of a model on a calibration text, as llama-imatrix computes it.
    Imatrix(cmd::imatrix::Args),
    /// Base + LoRA(s) → F16 and quantized GGUFs, perplexity per level, report; resumable.
    Pipeline(cmd::pipeline::Args),
    /// Re-hash every file listed in a folder's SHA256SUMS.
    Verify(cmd::verify::Args),
    /// Build a small base model + vocabulary-extending LoRA (no downloads) and run the pipeline on it.
    Demo(cmd::demo::Args),
}

/// What a subcommand reports back: success, or a check that failed (exit 1).
pub enum Outcome {
    Ok,
    CheckFailed,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Convert(a) => cmd::convert::run(a),
        Command::Quantize(a) => cmd::quantize::run(a),
        Command::Split(a) => cmd::split::run(a),
        Command::Merge(a) => cmd::merge::run(a),
        Command::Perplexity(a) => cmd::perplexity::run(a),
        Command::Tokenize(a) => cmd::tokenize::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Imatrix(a) => cmd::imatrix::run(a),
        Command::Pipeline(a) => cmd::pipeline::run(a),
        Command::Verify(a) => cmd::verify::run(a),
        Command::Demo(a) => cmd::demo::run(a),
    };
    match result {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::CheckFailed) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
