//! `kiln inspect`: metadata and tensor table of a GGUF, safetensors, .bin, tokenizer.model, HF model
//! folder or PEFT adapter folder, as text or JSON.

use crate::Outcome;
use anyhow::{Context, Result};
use kiln_formats::checkpoint::Checkpoint;
use kiln_formats::gguf::{GgufArray, GgufFile, GgufValue};
use kiln_formats::sentencepiece::SpModel;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

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

fn is_gguf(p: &Path) -> bool {
    std::fs::File::open(p)
        .and_then(|mut f| {
            let mut m = [0u8; 4];
            std::io::Read::read_exact(&mut f, &mut m).map(|_| m == *b"GGUF")
        })
        .unwrap_or(false)
}

fn describe(p: &Path, full: bool) -> Result<Value> {
    if !p.exists() {
        anyhow::bail!("{}: no such file or folder", p.display());
    }
    if p.is_dir() {
        return describe_dir(p, full);
    }
    if is_gguf(p) {
        return describe_gguf(p, full);
    }
    if p.file_name()
        .is_some_and(|n| n.to_string_lossy().ends_with(".model"))
    {
        return describe_spm(p);
    }
    describe_checkpoint(p, "checkpoint")
}

fn value_json(v: &GgufValue, full: bool) -> Value {
    match v {
        GgufValue::Array(arr) if !full && arr.len() > 8 => {
            let head = match arr {
                GgufArray::String(s) => json!(s[..8]),
                GgufArray::F32(x) => json!(x[..8]),
                GgufArray::I32(x) => json!(x[..8]),
                GgufArray::U32(x) => json!(x[..8]),
                other => json!(format!("{} elements", other.len())),
            };
            json!({"array": format!("{:?}", arr.elem_type()), "len": arr.len(), "head": head})
        }
        other => other.to_json(),
    }
}

fn describe_gguf(p: &Path, full: bool) -> Result<Value> {
    let f = GgufFile::open(p).with_context(|| format!("reading {}", p.display()))?;
    let meta: serde_json::Map<String, Value> = f
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), value_json(v, full)))
        .collect();
    let tensors: Vec<Value> = f
        .tensors
        .iter()
        .map(|t| {
            json!({"name": t.name, "dtype": t.ty.name(), "shape": t.shape, "bytes": t.n_bytes(),
                   "offset": f.data_offset + t.offset})
        })
        .collect();
    Ok(
        json!({"kind": "gguf", "path": p, "version": f.version, "alignment": f.alignment,
              "data_offset": f.data_offset, "file_size": f.file_size(), "metadata": meta, "tensors": tensors}),
    )
}

fn describe_spm(p: &Path) -> Result<Value> {
    let sp = SpModel::open(p).with_context(|| format!("reading {}", p.display()))?;
    let mut counts = std::collections::BTreeMap::new();
    for piece in &sp.pieces {
        *counts.entry(format!("{:?}", piece.kind)).or_insert(0usize) += 1;
    }
    let first: Vec<Value> = sp
        .pieces
        .iter()
        .take(8)
        .map(|x| json!({"piece": x.piece, "score": x.score, "type": format!("{:?}", x.kind)}))
        .collect();
    Ok(
        json!({"kind": "sentencepiece", "path": p, "pieces": sp.pieces.len(), "types": counts,
              "model_type": sp.model_type, "unk_id": sp.unk_id, "bos_id": sp.bos_id, "eos_id": sp.eos_id,
              "pad_id": sp.pad_id, "byte_fallback": sp.byte_fallback, "add_dummy_prefix": sp.add_dummy_prefix,
              "first_pieces": first}),
    )
}

fn describe_checkpoint(p: &Path, kind: &str) -> Result<Value> {
    let c = Checkpoint::open(p).with_context(|| format!("reading {}", p.display()))?;
    let mut offset_note = Vec::new();
    for t in c.tensors() {
        let bytes: usize = t.shape.iter().product::<usize>() * t.dtype.size();
        offset_note.push(json!({"name": t.name, "dtype": format!("{:?}", t.dtype), "shape": t.shape, "bytes": bytes}));
    }
    Ok(
        json!({"kind": kind, "path": p, "format": c.format(), "files": c.files(),
              "total_bytes": c.total_bytes(), "tensors": offset_note}),
    )
}

fn read_json(p: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", p.display()))
}

fn describe_dir(p: &Path, _full: bool) -> Result<Value> {
    let adapter = p.join("adapter_config.json");
    let config = p.join("config.json");
    let (kind, cfg) = if adapter.is_file() {
        ("peft-adapter", read_json(&adapter)?)
    } else if config.is_file() {
        ("hf-model", read_json(&config)?)
    } else {
        anyhow::bail!(
            "{}: neither config.json (HF model) nor adapter_config.json (PEFT adapter) is in this folder",
            p.display()
        );
    };
    let mut v = describe_checkpoint(p, kind)?;
    v["config"] = cfg;
    let tok = p.join("tokenizer.model");
    if tok.is_file() {
        v["tokenizer"] = describe_spm(&tok)?;
    }
    Ok(v)
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
