//! `kiln merge`: a Llama base + one or more PEFT LoRA adapters → an HF folder (sharded safetensors)
//! and/or a GGUF file, in one streaming pass, one tensor in memory at a time.

use crate::convert::{self, LlamaDims, OutType, TensorJob};
use crate::merge::{self, Adapter, Plan, Planned, TOKENIZER_FILES};
use crate::progress;
use crate::quant_plan::{Ftype, ModelShape, Overrides, PlanTensor, Planner};
use crate::Outcome;
use anyhow::{anyhow, bail, Context, Result};
use kiln_formats::atomic::AtomicFile;
use kiln_formats::checkpoint::{Checkpoint, DType, TensorData};
use kiln_formats::gguf::GgufWriter;
use kiln_formats::hf::LlamaConfig;
use kiln_quant::GgmlType;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

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

/// The GGUF encoding asked for.
enum GgufKind {
    Float(OutType),
    Quant(Ftype),
}

fn parse_outtype(s: &str) -> Result<GgufKind> {
    match s.to_ascii_lowercase().as_str() {
        "f32" => Ok(GgufKind::Float(OutType::F32)),
        "f16" => Ok(GgufKind::Float(OutType::F16)),
        "bf16" => Ok(GgufKind::Float(OutType::Bf16)),
        _ => match Ftype::parse(s) {
            Some(Ftype::Q2KS) => bail!(
                "--outtype {s}: Q2_K_S needs an importance matrix; merge to f16 and run \
                 `kiln quantize --imatrix FILE` instead"
            ),
            Some(f) => Ok(GgufKind::Quant(f)),
            None => bail!(
                "--outtype {s:?}: use f16, bf16, f32 or a quantization type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, \
                 Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K)"
            ),
        },
    }
}

fn sha256_of(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// What is already at the --out path.
#[derive(PartialEq, Eq)]
enum OutState {
    Absent,
    /// An empty folder, or one holding the same model (kiln replaces its model files).
    Reuse,
    /// A different model, overwritten because of --force.
    Forced,
}

const MODEL_KEYS: [&str; 8] = [
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
];

fn check_out_dir(out: &Path, new_cfg: &LlamaConfig, force: bool) -> Result<OutState> {
    if !out.exists() {
        return Ok(OutState::Absent);
    }
    if !out.is_dir() {
        bail!("--out {}: exists and is not a folder", out.display());
    }
    let mut entries =
        std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))?;
    if entries.next().is_none() {
        return Ok(OutState::Reuse);
    }
    let cfg_path = out.join("config.json");
    let existing: Option<serde_json::Value> = std::fs::read_to_string(&cfg_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let what = match &existing {
        Some(old) => {
            let differ: Vec<String> = MODEL_KEYS
                .iter()
                .filter(|k| old.get(**k) != new_cfg.raw.get(**k))
                .map(|k| {
                    format!(
                        "{k} {} vs {}",
                        old.get(*k)
                            .map(|v| v.to_string())
                            .unwrap_or_else(|| "-".into()),
                        new_cfg
                            .raw
                            .get(*k)
                            .map(|v| v.to_string())
                            .unwrap_or_else(|| "-".into())
                    )
                })
                .collect();
            if differ.is_empty() {
                return Ok(OutState::Reuse);
            }
            format!("a different model ({})", differ.join(", "))
        }
        None => "files but no config.json of the same model".to_string(),
    };
    if force {
        return Ok(OutState::Forced);
    }
    bail!(
        "--out {}: the folder is not empty and holds {what}; kiln will not mix two models in one folder. \
         Choose a new or empty folder, or pass --force to replace its model files",
        out.display()
    )
}

/// Staged file names and their (name, sha256) pairs.
type Staged = (Vec<String>, Vec<(String, String)>);

/// One safetensors shard being written.
struct Shard {
    file_name: String,
    file: File,
    path: PathBuf,
}

/// The HF output: shards in a staging folder beside --out, moved into place at the end.
struct HfOut {
    out: PathBuf,
    state: OutState,
    staging: tempfile::TempDir,
    shards: Vec<Shard>,
    /// tensor name -> (shard, absolute offset)
    loc: HashMap<String, (usize, u64)>,
    weight_map: BTreeMap<String, String>,
    total_size: u64,
}

impl HfOut {
    fn create(out: &Path, state: OutState, plan: &Plan, max_shard: u64) -> Result<HfOut> {
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            bail!(
                "--out {}: the parent folder {} does not exist",
                out.display(),
                parent.display()
            );
        }
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let prefix = format!(".{name}.");
        let mut b = tempfile::Builder::new();
        b.prefix(&prefix).suffix(".kiln-partial");
        // the folder becomes --out: an ordinary folder's mode (0777 less the umask), not 0700
        #[cfg(unix)]
        b.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o777));
        let staging = b
            .tempdir_in(&parent)
            .with_context(|| format!("creating a staging folder in {}", parent.display()))?;
        let sizes: Vec<u64> = plan.tensors.iter().map(Planned::n_bytes).collect();
        let groups = merge::shard_groups(&sizes, max_shard);
        let n = groups.len();
        let mut shards = Vec::new();
        let mut loc = HashMap::new();
        let mut weight_map = BTreeMap::new();
        for (si, g) in groups.iter().enumerate() {
            let file_name = if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", si + 1, n)
            };
            let items: Vec<(&str, DType)> = g
                .iter()
                .map(|&i| (plan.tensors[i].name.as_str(), plan.tensors[i].dtype))
                .collect();
            let order = merge::safetensors_order(&items);
            let ordered: Vec<(&str, DType, &[usize])> = order
                .iter()
                .map(|&k| {
                    let t = &plan.tensors[g[k]];
                    (t.name.as_str(), t.dtype, t.shape.as_slice())
                })
                .collect();
            let (header, offsets) = merge::safetensors_header(&ordered)?;
            let path = staging.path().join(&file_name);
            let mut file =
                File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            file.write_all(&header)
                .with_context(|| format!("writing {}", path.display()))?;
            let end = offsets.last().copied().unwrap_or(header.len() as u64)
                + ordered
                    .last()
                    .map(|(_, d, s)| s.iter().product::<usize>() as u64 * d.size() as u64)
                    .unwrap_or(0);
            file.set_len(end)
                .with_context(|| format!("writing {}", path.display()))?;
            for ((name, _, _), off) in ordered.iter().zip(offsets) {
                loc.insert(name.to_string(), (si, off));
                weight_map.insert(name.to_string(), file_name.clone());
            }
            shards.push(Shard {
                file_name,
                file,
                path,
            });
        }
        Ok(HfOut {
            out: out.to_path_buf(),
            state,
            staging,
            shards,
            loc,
            weight_map,
            total_size: sizes.iter().sum(),
        })
    }

    fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let &(si, off) = self
            .loc
            .get(name)
            .ok_or_else(|| anyhow!("tensor {name} has no shard"))?;
        let sh = self
            .shards
            .get_mut(si)
            .ok_or_else(|| anyhow!("shard {si} missing"))?;
        sh.file
            .seek(SeekFrom::Start(off))
            .and_then(|_| sh.file.write_all(bytes))
            .with_context(|| format!("writing {}", sh.path.display()))
    }

    fn write_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let p = self.staging.path().join(name);
        std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))
    }

    /// Writes the index, config, generation config, tokenizer files and SHA256SUMS into the
    /// staging folder; returns the file names and their hashes.
    fn prepare(&self, cfg: &LlamaConfig, base_dir: &Path, tok_dir: &Path) -> Result<Staged> {
        for sh in &self.shards {
            sh.file
                .sync_all()
                .with_context(|| format!("writing {}", sh.path.display()))?;
        }
        let mut names: Vec<String> = self.shards.iter().map(|s| s.file_name.clone()).collect();
        if self.shards.len() > 1 {
            let index = serde_json::json!({
                "metadata": {"total_size": self.total_size},
                "weight_map": self.weight_map,
            });
            let mut text = serde_json::to_string_pretty(&index)?;
            text.push('\n');
            self.write_file("model.safetensors.index.json", text.as_bytes())?;
            names.push("model.safetensors.index.json".into());
        }
        self.write_file("config.json", cfg.to_json_string().as_bytes())?;
        names.push("config.json".into());
        let gen = base_dir.join("generation_config.json");
        if gen.is_file() {
            let bytes =
                std::fs::read(&gen).with_context(|| format!("reading {}", gen.display()))?;
            self.write_file("generation_config.json", &bytes)?;
            names.push("generation_config.json".into());
        }
        for f in TOKENIZER_FILES {
            let p = tok_dir.join(f);
            if p.is_file() {
                let bytes =
                    std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                self.write_file(f, &bytes)?;
                names.push(f.to_string());
            }
        }
        let mut sums = HashMap::new();
        for n in &names {
            sums.insert(n.clone(), sha256_of(&self.staging.path().join(n))?);
        }
        self.write_file("SHA256SUMS", merge::sha256sums(&sums).as_bytes())?;
        names.push("SHA256SUMS".into());
        let mut v: Vec<(String, String)> = sums.into_iter().collect();
        v.sort();
        Ok((names, v))
    }

    /// Moves the staged files into place.
    fn commit(self, names: &[String]) -> Result<()> {
        let HfOut {
            out,
            state,
            staging,
            shards,
            ..
        } = self;
        drop(shards);
        if state == OutState::Absent {
            std::fs::rename(staging.path(), &out)
                .with_context(|| format!("moving the merged model into {}", out.display()))?;
            // The TempDir now points at nothing; dropping it is harmless.
        } else {
            // Model files of an earlier save would shadow or confuse the new ones.
            for e in
                std::fs::read_dir(&out).with_context(|| format!("reading {}", out.display()))?
            {
                let e = e?;
                let n = e.file_name().to_string_lossy().into_owned();
                let stale = (n.starts_with("model")
                    && (n.ends_with(".safetensors") || n.ends_with(".index.json")))
                    || (n.starts_with("pytorch_model")
                        && (n.ends_with(".bin") || n.ends_with(".index.json")));
                if stale && !names.contains(&n) {
                    std::fs::remove_file(e.path())
                        .with_context(|| format!("removing {}", e.path().display()))?;
                }
            }
            for n in names {
                std::fs::rename(staging.path().join(n), out.join(n))
                    .with_context(|| format!("moving {n} into {}", out.display()))?;
            }
        }
        Ok(())
    }
}

/// Adds or replaces `file`'s line in the SHA256SUMS beside it.
fn update_sums_beside(file: &Path, hash: &str) -> Result<()> {
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sums_path = dir.join("SHA256SUMS");
    let mut entries: HashMap<String, String> = HashMap::new();
    if let Ok(text) = std::fs::read_to_string(&sums_path) {
        for line in text.lines() {
            if let Some((h, n)) = line.split_once("  ") {
                entries.insert(n.to_string(), h.to_string());
            }
        }
    }
    entries.insert(name, hash.to_string());
    let mut f = AtomicFile::create(&sums_path)
        .with_context(|| format!("writing {}", sums_path.display()))?;
    f.write_all(merge::sha256sums(&entries).as_bytes())
        .with_context(|| format!("writing {}", sums_path.display()))?;
    f.commit()
        .with_context(|| format!("writing {}", sums_path.display()))
}

/// The GGUF output being written in the same pass.
struct GgufOut {
    w: GgufWriter,
    jobs: Vec<TensorJob>,
    /// Final type of each job (the quant plan), when quantizing.
    quant: Option<Vec<GgmlType>>,
}

pub fn run(a: Args) -> Result<Outcome> {
    let t0 = Instant::now();
    if a.out.is_none() && a.gguf.is_none() {
        bail!("nothing to write: give --out DIR (an HF folder) and/or --gguf FILE");
    }
    let kind = parse_outtype(&a.outtype)?;
    let max_shard = merge::parse_size(&a.max_shard_size).context("--max-shard-size")?;
    if let Some(n) = a.threads {
        if n == 0 {
            bail!("threads must be at least 1");
        }
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    if let (Some(out), Some(g)) = (&a.out, &a.gguf) {
        let (o, gp) = (std::path::absolute(out)?, std::path::absolute(g)?);
        if gp.starts_with(&o) {
            bail!(
                "--gguf {} is inside the --out folder; write it elsewhere",
                g.display()
            );
        }
    }

    // Inputs and every check, before anything is written.
    let cfg_path = a.base.join("config.json");
    let mut cfg =
        LlamaConfig::load(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
    let dims = LlamaDims::from_config(&cfg).with_context(|| cfg_path.display().to_string())?;
    let base = Checkpoint::open(&a.base)
        .with_context(|| format!("opening the base weights in {}", a.base.display()))?;
    convert::plan_tensors(
        &dims,
        &convert::checkpoint_shapes(&base),
        GgmlType::F16,
        &a.base.display().to_string(),
    )?;
    let adapters: Vec<Adapter> = a
        .lora
        .iter()
        .map(|d| Adapter::open(d))
        .collect::<Result<_>>()?;
    let plan = merge::plan(&a.base, &base, &dims, &adapters, a.vocab_size)?;
    for w in &plan.warnings {
        eprintln!("warning: {w}");
    }
    cfg.set_vocab_size(plan.n_vocab as u64);
    if plan.tied != cfg.tie_word_embeddings {
        cfg.tie_word_embeddings = plan.tied;
        cfg.raw
            .insert("tie_word_embeddings".into(), plan.tied.into());
    }
    let mdims = LlamaDims::from_config(&cfg)?;
    let shapes: Vec<(String, Vec<usize>)> = plan
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect();
    let by_name: HashMap<&str, usize> = plan
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();

    // GGUF plan and metadata (the vocabulary checks of convert run here too).
    let mut gguf_plan = None;
    if let Some(g) = &a.gguf {
        let name = a.name.clone().unwrap_or_else(|| {
            a.out
                .as_ref()
                .and_then(|o| o.file_name())
                .or_else(|| g.file_stem())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        });
        let (conv_ty, file_type) = match &kind {
            GgufKind::Float(o) => (o.ggml(), o.file_type()),
            GgufKind::Quant(_) => (GgmlType::F16, OutType::F16.file_type()),
        };
        let jobs = convert::plan_tensors(&mdims, &shapes, conv_ty, "merged model")?;
        let mut meta = convert::model_metadata(&cfg, &mdims, &name, file_type);
        meta.extend(convert::vocab_metadata(
            &plan.tokenizer_dir,
            &cfg,
            mdims.n_vocab,
        )?);
        let (meta, quant) = match &kind {
            GgufKind::Float(_) => (meta, None),
            GgufKind::Quant(ft) => {
                let shape = ModelShape {
                    n_layer: mdims.n_layer as u32,
                    n_head: mdims.n_head as u32,
                    n_head_kv: mdims.n_head_kv as u32,
                };
                let pin: Vec<PlanTensor> = jobs
                    .iter()
                    .map(|j| PlanTensor {
                        name: j.gguf_name.clone(),
                        shape: j.ne.clone(),
                        ty: j.ty,
                    })
                    .collect();
                let types = Planner::plan(*ft, shape, &Overrides::default(), &pin);
                // As llama-quantize rewrites the F16 file's keys.
                let m = crate::quant_plan::quantized_metadata(meta, *ft);
                (m, Some(types))
            }
        };
        gguf_plan = Some((g.clone(), jobs, meta, quant));
    }
    let out_state = match &a.out {
        Some(o) => Some(check_out_dir(o, &cfg, a.force)?),
        None => None,
    };

    // Hash the inputs beside the merge.
    let mut inputs: Vec<PathBuf> = vec![cfg_path.clone()];
    inputs.extend(base.files().iter().cloned());
    inputs.extend(
        TOKENIZER_FILES
            .iter()
            .map(|f| a.base.join(f))
            .filter(|p| p.is_file()),
    );
    for ad in &adapters {
        inputs.extend(ad.files());
    }
    let hasher = std::thread::spawn(move || -> Vec<(PathBuf, Result<String>)> {
        inputs
            .into_iter()
            .map(|p| {
                let h = sha256_of(&p);
                (p, h)
            })
            .collect()
    });

    // Outputs.
    let mut hf = match (&a.out, out_state) {
        (Some(o), Some(st)) => Some(HfOut::create(o, st, &plan, max_shard)?),
        _ => None,
    };
    let mut gg = match gguf_plan {
        Some((path, jobs, meta, quant)) => {
            let infos: Vec<(String, Vec<u64>, GgmlType)> = jobs
                .iter()
                .enumerate()
                .map(|(i, j)| {
                    (
                        j.gguf_name.clone(),
                        j.ne.clone(),
                        quant.as_ref().map(|q| q[i]).unwrap_or(j.ty),
                    )
                })
                .collect();
            let w = GgufWriter::create(&path, &meta, &infos)
                .with_context(|| format!("creating {}", path.display()))?;
            Some((path, GgufOut { w, jobs, quant }))
        }
        None => None,
    };

    // The pass: GGUF order when writing GGUF (its writer is sequential), else state-dict order.
    let order: Vec<usize> = match &gg {
        Some((_, g)) => g
            .jobs
            .iter()
            .map(|j| {
                by_name
                    .get(j.hf_name.as_str())
                    .copied()
                    .ok_or_else(|| anyhow!("no plan for {}", j.hf_name))
            })
            .collect::<Result<_>>()?,
        None => (0..plan.tensors.len()).collect(),
    };
    let total: u64 = plan.tensors.iter().map(Planned::n_bytes).sum();
    let pb = progress::bytes_bar(total, a.quiet);
    for (k, &ti) in order.iter().enumerate() {
        let t = &plan.tensors[ti];
        pb.set_message(t.name.clone());
        let bytes = merge::materialize(t, &base, &adapters)?;
        if let Some(h) = hf.as_mut() {
            h.write_tensor(&t.name, &bytes)?;
        }
        if let Some((path, g)) = gg.as_mut() {
            let job = &g.jobs[k];
            let data = TensorData {
                dtype: t.dtype,
                shape: &t.shape,
                bytes: &bytes,
            };
            let enc = convert::encode_tensor(job, &data)?;
            let enc = match &g.quant {
                Some(types) => crate::transcode::transcode(
                    &job.gguf_name,
                    job.ty,
                    &enc,
                    types[k],
                    job.rows(),
                    job.cols(),
                    &crate::transcode::same_row,
                )?,
                None => enc,
            };
            g.w.write_tensor(&job.gguf_name, &enc)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        drop(bytes);
        merge::release(t, &base, &adapters);
        pb.inc(t.n_bytes());
    }
    pb.finish_and_clear();

    // Everything staged first, then moved into place, so a failure leaves nothing behind.
    let mut report = Vec::new();
    let staged = match &hf {
        Some(h) => Some(h.prepare(&cfg, &a.base, &plan.tokenizer_dir)?),
        None => None,
    };
    if let Some((path, g)) = gg {
        g.w.finish()
            .with_context(|| format!("finishing {}", path.display()))?;
        let h = sha256_of(&path)?;
        update_sums_beside(&path, &h)?;
        report.push(format!("wrote {} (sha256 {h})", path.display()));
    }
    if let (Some(h), Some((names, sums))) = (hf, staged) {
        let out = h.out.clone();
        h.commit(&names)?;
        report.push(format!(
            "wrote {} ({} files, SHA256SUMS inside)",
            out.display(),
            sums.len()
        ));
    }
    match hasher.join() {
        Ok(v) => {
            for (p, h) in v {
                match h {
                    Ok(h) => eprintln!("input sha256 {h}  {}", p.display()),
                    Err(e) => eprintln!("input sha256 ?  {} ({e:#})", p.display()),
                }
            }
        }
        Err(_) => eprintln!("warning: hashing the inputs failed"),
    }
    for r in report {
        eprintln!("{r}");
    }
    eprintln!(
        "merged {} LoRA(s) into {} tensors, vocabulary {} in {:.1}s",
        adapters.len(),
        plan.tensors.len(),
        plan.n_vocab,
        t0.elapsed().as_secs_f64()
    );
    Ok(Outcome::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outtypes() {
        assert!(matches!(
            parse_outtype("F16"),
            Ok(GgufKind::Float(OutType::F16))
        ));
        assert!(matches!(
            parse_outtype("q4_k_m"),
            Ok(GgufKind::Quant(Ftype::Q4KM))
        ));
        let e = parse_outtype("Q2_K_S").err().map(|e| e.to_string());
        assert!(e.is_some_and(|m| m.contains("importance matrix")));
        assert!(parse_outtype("q7").is_err());
    }
}
