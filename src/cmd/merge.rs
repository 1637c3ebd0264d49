//! `kiln merge`: parses the command line into [`MergeOptions`], runs the merge and prints what
//! it wrote.

use crate::cmd::progress::Terminal;
use crate::Outcome;
use anyhow::{Context, Result};
use kiln::merge::{self, MergeInputs, MergeOptions, MergeOutputs};
use std::path::PathBuf;

/// Arguments of `kiln merge`.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
kiln merge --base Llama-2-7b-hf --lora chinese-llama-2-lora-7b --out chinese-llama-2-7b\n  \
kiln merge --base Llama-2-7b-hf --lora chinese-alpaca-2-lora-7b --gguf zh-alpaca-2-7b.q4_k_m.gguf --outtype q4_k_m")]
pub struct Args {
    /// Base model: HF Llama folder (safetensors or .bin, single or sharded; f16, bf16 or f32).
    #[arg(long)]
    pub base: PathBuf,
    /// PEFT LoRA folder (adapter_config.json, adapter_model.safetensors or .bin, tokenizer);
    /// repeat to apply several in order.
    #[arg(long = "lora", required = true)]
    pub lora: Vec<PathBuf>,
    /// Write the merged model as an HF folder (sharded safetensors, config, tokenizer).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the merged model as GGUF.
    #[arg(long)]
    pub gguf: Option<PathBuf>,
    /// GGUF type: f16, bf16, f32 (convert's rules), or a llama-quantize TYPE such as q4_k_m
    /// (merged weights rounded to f16, then quantized with llama-quantize's mix rules).
    #[arg(long, default_value = "f16")]
    pub outtype: String,
    /// Pad embed_tokens / lm_head to N rows (new rows = mean of the existing rows).
    #[arg(long, value_name = "N")]
    pub vocab_size: Option<usize>,
    /// Largest safetensors shard (transformers' sizes: 5GB, 500MB, 2GiB, or bytes).
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// general.name of the GGUF (default: the --out folder's name, else the GGUF file's stem).
    #[arg(long)]
    pub name: Option<String>,
    /// Overwrite an --out folder that holds a different model.
    #[arg(long)]
    pub force: bool,
    /// Threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
}

impl Args {
    /// The library's options for these arguments.
    pub fn options(&self) -> Result<MergeOptions> {
        Ok(MergeOptions {
            inputs: MergeInputs {
                base: self.base.clone(),
                loras: self.lora.clone(),
                vocab_size: self.vocab_size,
            },
            outputs: MergeOutputs {
                out: self.out.clone(),
                gguf: self.gguf.clone(),
                kind: merge::parse_outtype(&self.outtype)?,
                max_shard_size: merge::parse_size(&self.max_shard_size)
                    .context("--max-shard-size")?,
                name: self.name.clone(),
                force: self.force,
                hash_inputs: !self.quiet,
            },
        })
    }
}

pub fn run(a: Args) -> Result<Outcome> {
    let opts = a.options()?;
    crate::cmd::global_threads(a.threads)?;
    let r = merge::merge(&opts, &Terminal::new(a.quiet))?;
    for (p, h) in &r.input_hashes {
        match h {
            Ok(h) => eprintln!("input sha256 {h}  {}", p.display()),
            Err(e) => eprintln!("input sha256 ?  {} ({e})", p.display()),
        }
    }
    if a.quiet {
        return Ok(Outcome::Ok);
    }
    for line in &r.written {
        eprintln!("{line}");
    }
    eprintln!(
        "merged {} LoRA(s) into {} tensors, vocabulary {} in {:.1}s",
        r.n_loras, r.n_tensors, r.n_vocab, r.seconds
    );
    Ok(Outcome::Ok)
}
