//! What a model file or folder holds: metadata and tensor table of a GGUF, safetensors, .bin,
//! tokenizer.model, HF model folder or PEFT adapter folder, as one JSON value (`kiln inspect`
//! prints it as text or JSON).

use anyhow::{Context, Result};
use kiln_formats::checkpoint::Checkpoint;
use kiln_formats::gguf::{GgufArray, GgufFile, GgufValue};
use kiln_formats::sentencepiece::SpModel;
use serde_json::{json, Value};
use std::path::Path;

fn is_gguf(p: &Path) -> bool {
    std::fs::File::open(p)
        .and_then(|mut f| {
            let mut m = [0u8; 4];
            std::io::Read::read_exact(&mut f, &mut m).map(|_| m == *b"GGUF")
        })
        .unwrap_or(false)
}

/// Describes `p` (a file of any kind kiln reads, or a model or adapter folder); `full` keeps
/// arrays whole instead of their first 8 elements and length.
pub fn describe(p: &Path, full: bool) -> Result<Value> {
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
            let offset = f.tensor_location(t).map(|(_, o)| o);
            let mut v = json!({"name": t.name, "dtype": t.ty.name(), "shape": t.shape,
                               "bytes": t.n_bytes(), "offset": offset});
            if f.paths().len() > 1 {
                v["split_file"] = json!(t.part + 1);
            }
            v
        })
        .collect();
    let mut v = json!({"kind": "gguf", "path": p, "version": f.version, "alignment": f.alignment,
          "data_offset": f.data_offset, "file_size": f.file_size(), "metadata": meta, "tensors": tensors});
    if f.paths().len() > 1 {
        v["split_files"] = json!(f.paths());
    }
    Ok(v)
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
