//! `kiln convert`: a Hugging Face Llama folder (safetensors or .bin, single or sharded) to GGUF.

use crate::cmd::progress::Terminal;
use crate::Outcome;
use anyhow::{Context, Result};
use kiln::convert::{self, LlamaDims, OutType};
use kiln::progress::{Progress, Unit};
use kiln_formats::checkpoint::Checkpoint;
use kiln_formats::gguf::GgufWriter;
use kiln_formats::hf::LlamaConfig;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `kiln convert`.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  kiln convert Llama-2-7b-hf -o llama-2-7b.f16.gguf --outtype f16"
)]
pub struct Args {
    /// Hugging Face model folder (config.json, tokenizer.model, weights).
    pub hf_dir: PathBuf,
    /// Output GGUF file.
    #[arg(short = 'o', long = "outfile")]
    pub out: PathBuf,
    /// Type of the 2-D weights (norms stay F32).
    #[arg(long, value_enum, default_value = "f16")]
    pub outtype: OutType,
    /// Folder with tokenizer.model and tokenizer_config.json, if not the model folder.
    #[arg(long)]
    pub tokenizer_dir: Option<PathBuf>,
    /// general.name (default: the folder's name).
    #[arg(long)]
    pub name: Option<String>,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn run(a: Args) -> Result<Outcome> {
    let t0 = Instant::now();
    let cfg_path = a.hf_dir.join("config.json");
    let cfg =
        LlamaConfig::load(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
    let dims = LlamaDims::from_config(&cfg).with_context(|| cfg_path.display().to_string())?;
    let ckpt = Checkpoint::open(&a.hf_dir)
        .with_context(|| format!("opening the weights in {}", a.hf_dir.display()))?;
    let source = a.hf_dir.display().to_string();
    let jobs = convert::plan_tensors(
        &dims,
        &convert::checkpoint_shapes(&ckpt),
        a.outtype.ggml(),
        &source,
    )?;
    let name = a.name.clone().unwrap_or_else(|| {
        a.hf_dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into())
    });
    let mut meta = convert::model_metadata(&cfg, &dims, &name, a.outtype.file_type());
    let tok_dir = a.tokenizer_dir.as_ref().unwrap_or(&a.hf_dir);
    meta.extend(convert::vocab_metadata(tok_dir, &cfg, dims.n_vocab)?);

    let infos: Vec<(String, Vec<u64>, kiln_quant::GgmlType)> = jobs
        .iter()
        .map(|j| (j.gguf_name.clone(), j.ne.clone(), j.ty))
        .collect();
    let mut w = GgufWriter::create(&a.out, &meta, &infos)
        .with_context(|| format!("creating {}", a.out.display()))?;
    let total: u64 = jobs.iter().map(|j| j.n_bytes()).sum();
    let pb = Terminal::new(a.quiet).bar(total, Unit::Bytes);
    for job in &jobs {
        pb.set_message(&job.gguf_name);
        let data = ckpt.data(&job.hf_name)?;
        let unchanged = job.permute_heads.is_none() && convert::ggml_of(data.dtype) == job.ty;
        // Unchanged tensors go from the input map straight to the file; the rest are re-encoded.
        let encoded;
        let bytes = if unchanged {
            data.bytes
        } else {
            encoded = convert::encode_tensor(job, &data)?;
            &encoded[..]
        };
        w.write_tensor(&job.gguf_name, bytes)
            .with_context(|| format!("writing {}", a.out.display()))?;
        pb.inc(bytes.len() as u64);
        ckpt.release(&job.hf_name);
    }
    w.finish()
        .with_context(|| format!("finishing {}", a.out.display()))?;
    pb.finish();
    eprintln!(
        "wrote {} ({} tensors, {:.1} MiB, {}) in {:.1}s",
        a.out.display(),
        jobs.len(),
        total as f64 / (1 << 20) as f64,
        ckpt.format(),
        t0.elapsed().as_secs_f64()
    );
    Ok(Outcome::Ok)
}
