//! `kiln inspect`: metadata and tensor table of a GGUF, safetensors, .bin, tokenizer.model, HF model
//! folder or PEFT adapter folder, as text or JSON.

use crate::Outcome;
use anyhow::Result;
use kiln::inspect::describe;
use serde_json::Value;
use std::path::PathBuf;

/// Arguments of `kiln inspect`.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  kiln inspect model.gguf\n  kiln inspect Llama-2-7b-hf --json\n  kiln inspect chinese-llama-2-lora-7b/tokenizer.model"
)]
pub struct Args {
    /// A .gguf, .safetensors or .bin file, a tokenizer.model, an HF model folder or a PEFT adapter folder.
    pub path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Print arrays in full (default: the first 8 elements and the length).
    #[arg(long)]
    pub full: bool,
}

pub fn run(a: Args) -> Result<Outcome> {
    let v = describe(&a.path, a.full)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_text(&v);
    }
    Ok(Outcome::Ok)
}

fn print_text(v: &Value) {
    let s = |k: &str| v.get(k).map(|x| x.to_string()).unwrap_or_default();
    println!(
        "{} ({})",
        v["path"].as_str().unwrap_or(""),
        v["kind"].as_str().unwrap_or("")
    );
    for k in [
        "format",
        "version",
        "alignment",
        "data_offset",
        "file_size",
        "total_bytes",
        "pieces",
    ] {
        if v.get(k).is_some() {
            println!("  {k}: {}", s(k));
        }
    }
    for section in ["metadata", "config"] {
        if let Some(m) = v.get(section).and_then(|m| m.as_object()) {
            println!("{section}:");
            for (k, val) in m {
                println!("  {k:<44} {}", compact(val));
            }
        }
    }
    if let Some(tk) = v.get("tokenizer") {
        println!("tokenizer: {} pieces, types {}", tk["pieces"], tk["types"]);
    }
    if let Some(ts) = v.get("tensors").and_then(|t| t.as_array()) {
        println!("tensors: {}", ts.len());
        println!(
            "  {:<48} {:<6} {:<22} {:>14} {:>14}",
            "name", "dtype", "shape", "bytes", "offset"
        );
        for t in ts {
            println!(
                "  {:<48} {:<6} {:<22} {:>14} {:>14}",
                t["name"].as_str().unwrap_or(""),
                t["dtype"].as_str().unwrap_or(""),
                t["shape"].to_string(),
                t["bytes"],
                t.get("offset")
                    .map(|o| o.to_string())
                    .unwrap_or_else(|| "-".into())
            );
        }
    }
}

fn compact(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 100 {
        let cut: String = s.chars().take(97).collect();
        format!("{cut}...")
    } else {
        s
    }
}
