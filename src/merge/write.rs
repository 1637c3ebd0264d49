//! The merge job: a Llama base + one or more PEFT LoRA adapters → an HF folder (sharded
//! safetensors) and/or a GGUF file (float or quantized), in one streaming pass, one tensor in
//! memory at a time. The plan ([`super::plan`]) is made once, in [`MergeJob::open`], and handed
//! to the writers.

use crate::convert::{self, OutType};
use crate::merge::{self, Adapter, Plan, Planned, TOKENIZER_FILES};
use crate::progress::{Progress, Unit};
use crate::quant_plan::{Ftype, Overrides, PlanTensor, Planner};
use crate::shape::ModelShape;
use crate::sums;
use crate::transcode::Recode;
use anyhow::{anyhow, bail, Context, Result};
use kiln_formats::checkpoint::{Checkpoint, DType, TensorData};
use kiln_formats::gguf::GgufWriter;
use kiln_formats::hf::LlamaConfig;
use kiln_quant::GgmlType;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::direct::DirectFile;

/// The GGUF encoding asked for (`--outtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufKind {
    /// f16, bf16 or f32, as convert writes them.
    Float(OutType),
    /// A llama-quantize level: merged weights rounded to f16, then quantized with its mix rules.
    Quant(Ftype),
}

/// Parses `--outtype`: f16, bf16, f32 or a quantization level (Q2_K_S refused: it needs an
/// importance matrix).
pub fn parse_outtype(s: &str) -> Result<GgufKind> {
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

fn hex(h: Sha256) -> String {
    format!("{:x}", h.finalize())
}

/// sha256 of a whole file.
fn sha256_of(path: &Path) -> Result<String> {
    sums::sha256_file(path, &mut |_| {})
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

/// Tensors at least this large are hashed on their own thread while being written.
const HASH_THREAD_MIN: usize = 1 << 20;

/// Where a shard's bytes go.
enum Sink {
    /// Appended in file order with O_DIRECT (the pass runs in the shards' file order).
    Direct(DirectFile),
    /// Written at their offsets in any order (the GGUF order drives the pass); the file also
    /// reads back tensors written ahead of the hashed prefix.
    Positioned(File),
}

/// One safetensors shard being written, hashed as its bytes are written.
///
/// `hasher` has seen exactly the bytes `[0, hashed)` of the file, in order. A tensor written at
/// `hashed` is hashed from memory; one written further on (only into a `Positioned` sink) is
/// noted in `pending` and hashed when the gap before it closes, read back from the file. Every
/// tensor is written once, so once `hashed == end` the hash is that of the file on disk.
struct Shard {
    file_name: String,
    sink: Sink,
    path: PathBuf,
    hasher: Sha256,
    hashed: u64,
    end: u64,
    /// offset -> length of tensors written beyond `hashed`
    pending: BTreeMap<u64, u64>,
}

impl Shard {
    /// A shard whose `header` (its first bytes) is already in `sink`, `end` bytes long when done.
    fn new(file_name: String, path: PathBuf, sink: Sink, header: &[u8], end: u64) -> Shard {
        let mut hasher = Sha256::new();
        hasher.update(header);
        Shard {
            file_name,
            sink,
            path,
            hasher,
            hashed: header.len() as u64,
            end,
            pending: BTreeMap::new(),
        }
    }

    fn write_at(&mut self, off: u64, bytes: &[u8]) -> std::io::Result<()> {
        if off != self.hashed {
            let Sink::Positioned(file) = &self.sink else {
                return Err(std::io::Error::other(format!(
                    "bytes at {off} written before those at {}",
                    self.hashed
                )));
            };
            file.write_all_at(bytes, off)?;
            self.pending.insert(off, bytes.len() as u64);
            return Ok(());
        }
        // hashed on a second thread while this one writes the bytes: the writer side (write +
        // SHA-256) is otherwise one serial chain as long as the whole merge compute
        let (sink, hasher) = (&mut self.sink, &mut self.hasher);
        let mut write = || match sink {
            Sink::Direct(d) => d.append(bytes),
            Sink::Positioned(f) => f.write_all_at(bytes, off),
        };
        if bytes.len() < HASH_THREAD_MIN {
            write()?;
            hasher.update(bytes);
        } else {
            std::thread::scope(|s| {
                let h = s.spawn(|| hasher.update(bytes));
                let written = write();
                h.join()
                    .map_err(|_| std::io::Error::other("the hashing thread panicked"))?;
                written
            })?;
        }
        self.hashed += bytes.len() as u64;
        let mut buf = Vec::new();
        while let Some(len) = self.pending.remove(&self.hashed) {
            let Sink::Positioned(file) = &self.sink else {
                break; // nothing is pending in a Direct sink
            };
            let mut left = len;
            while left > 0 {
                let n = left.min(1 << 22) as usize;
                buf.resize(n, 0);
                file.read_exact_at(&mut buf, self.hashed)?;
                self.hasher.update(&buf);
                self.hashed += n as u64;
                left -= n as u64;
            }
        }
        Ok(())
    }

    /// Completes the file (a Direct sink writes its last block) and returns its hash.
    fn finish(&mut self) -> std::io::Result<String> {
        if let Sink::Direct(d) = &mut self.sink {
            d.finish()?;
        }
        Ok(hex(std::mem::take(&mut self.hasher)))
    }
}

/// The HF output: shards in a staging folder beside --out, moved into place at the end.
struct HfOut {
    out: PathBuf,
    state: OutState,
    staging: tempfile::TempDir,
    shards: Vec<Shard>,
    /// tensor name -> (shard, absolute offset, bytes); removed once written
    loc: HashMap<String, (usize, u64, u64)>,
    /// plan indices in file order (shard by shard, each in its data order)
    order: Vec<usize>,
    weight_map: BTreeMap<String, String>,
    total_size: u64,
    /// sha256 of each staged file
    sums: HashMap<String, String>,
}

impl HfOut {
    /// `in_order`: tensors will be written in the shards' file order (`order`), so the shards
    /// are appended to with O_DIRECT.
    fn create(
        out: &Path,
        state: OutState,
        plan: &Plan,
        max_shard: u64,
        in_order: bool,
    ) -> Result<HfOut> {
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
        // the folder becomes --out: an ordinary folder's mode (0777 less the umask), not 0700
        let staging = kiln_formats::atomic::temp_dir_beside(out)
            .with_context(|| format!("creating a staging folder in {}", parent.display()))?;
        let sizes: Vec<u64> = plan.tensors.iter().map(Planned::n_bytes).collect();
        let groups = merge::shard_groups(&sizes, max_shard);
        let n = groups.len();
        let mut shards = Vec::new();
        let mut loc = HashMap::new();
        let mut file_order = Vec::new();
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
            file_order.extend(order.iter().map(|&k| g[k]));
            let (header, offsets) = merge::safetensors_header(&ordered)?;
            let path = staging.path().join(&file_name);
            let end = offsets.last().copied().unwrap_or(header.len() as u64)
                + ordered
                    .last()
                    .map(|(_, d, s)| s.iter().product::<usize>() as u64 * d.size() as u64)
                    .unwrap_or(0);
            let created = |e| anyhow!("creating {}: {e}", path.display());
            let sink = if in_order {
                let mut d = DirectFile::create_new(&path).map_err(created)?;
                d.append(&header).map_err(created)?;
                Sink::Direct(d)
            } else {
                // read too: tensors written out of order are read back to be hashed
                let mut file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(created)?;
                file.write_all(&header).map_err(created)?;
                file.set_len(end).map_err(created)?;
                Sink::Positioned(file)
            };
            for ((name, dt, shape), off) in ordered.iter().zip(offsets) {
                let len = shape.iter().product::<usize>() as u64 * dt.size() as u64;
                loc.insert(name.to_string(), (si, off, len));
                weight_map.insert(name.to_string(), file_name.clone());
            }
            shards.push(Shard::new(file_name, path, sink, &header, end));
        }
        Ok(HfOut {
            out: out.to_path_buf(),
            state,
            staging,
            shards,
            loc,
            order: file_order,
            weight_map,
            total_size: sizes.iter().sum(),
            sums: HashMap::new(),
        })
    }

    /// Writes a tensor's bytes at its place in its shard (each tensor exactly once).
    fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let (si, off, len) = self
            .loc
            .remove(name)
            .ok_or_else(|| anyhow!("tensor {name}: not in the shard plan, or written twice"))?;
        let sh = self
            .shards
            .get_mut(si)
            .ok_or_else(|| anyhow!("shard {si} missing"))?;
        if bytes.len() as u64 != len {
            bail!(
                "writing {}: tensor {name} has {} bytes, expected {len}",
                sh.path.display(),
                bytes.len()
            );
        }
        sh.write_at(off, bytes)
            .with_context(|| format!("writing {} (tensor {name})", sh.path.display()))
    }

    fn write_file(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let p = self.staging.path().join(name);
        std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
        let mut h = Sha256::new();
        h.update(bytes);
        self.sums.insert(name.to_string(), hex(h));
        Ok(())
    }

    /// Writes the index, config, generation config, tokenizer files and SHA256SUMS into the
    /// staging folder; returns the file names and their hashes (all hashed as written, none
    /// read back). No fsync, as for every kiln output (see `AtomicFile::commit`).
    fn prepare(&mut self, cfg: &LlamaConfig, base_dir: &Path, tok_dir: &Path) -> Result<Staged> {
        for sh in &mut self.shards {
            if sh.hashed != sh.end || !sh.pending.is_empty() {
                bail!(
                    "writing {}: only {} of {} bytes were written in order",
                    sh.path.display(),
                    sh.hashed,
                    sh.end
                );
            }
            let h = sh
                .finish()
                .with_context(|| format!("writing {}", sh.path.display()))?;
            self.sums.insert(sh.file_name.clone(), h);
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
        let sums = std::mem::take(&mut self.sums);
        let missing: Vec<&String> = names.iter().filter(|n| !sums.contains_key(*n)).collect();
        if !missing.is_empty() {
            bail!("no hash of {missing:?}");
        }
        self.write_file("SHA256SUMS", sums::format_map(&sums).as_bytes())?;
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

/// The GGUF output being written in the same pass.
struct GgufOut {
    w: GgufWriter,
    /// sha256 of the bytes written so far (fed by the writer's tee)
    hash: Arc<Mutex<Sha256>>,
}

/// The outputs the writer thread hands back: the HF folder and the GGUF (with its path).
type Outputs = (Option<HfOut>, Option<(PathBuf, GgufOut)>);

/// One tensor on its way from the compute side to the writer thread.
struct Item<'a> {
    /// index in the plan
    ti: usize,
    /// the merged tensor for --out
    hf: Option<Cow<'a, [u8]>>,
    /// the GGUF tensor's name and encoded bytes
    gguf: Option<(&'a str, Vec<u8>)>,
}

/// Writes (and hashes) what the compute side sends, one tensor at a time; hands the outputs back.
fn write_items(
    rx: std::sync::mpsc::Receiver<Item<'_>>,
    recycle: std::sync::mpsc::Sender<Vec<u8>>,
    outs: Outputs,
    plan: &Plan,
    base: &Checkpoint,
    adapters: &[Adapter],
    pb: &dyn crate::progress::Bar,
) -> Result<Outputs> {
    let (mut hf, mut gg) = outs;
    for it in rx {
        let t = plan
            .tensors
            .get(it.ti)
            .ok_or_else(|| anyhow!("tensor {} missing from the plan", it.ti))?;
        if let (Some(h), Some(bytes)) = (hf.as_mut(), it.hf.as_deref()) {
            h.write_tensor(&t.name, bytes)?;
        }
        if let (Some((path, g)), Some((name, enc))) = (gg.as_mut(), it.gguf.as_ref()) {
            g.w.write_tensor(name, enc)
                .with_context(|| format!("writing {} (tensor {name})", path.display()))?;
        }
        if let Some(Cow::Owned(v)) = it.hf {
            // back to the compute side for a later tensor (it may have finished: then dropped)
            let _ = recycle.send(v);
        }
        drop(it.gguf);
        merge::release(t, base, adapters);
        pb.inc(t.n_bytes());
    }
    Ok((hf, gg))
}

/// What to merge: the base folder, the adapters in order, and an optional vocabulary size.
#[derive(Clone, Debug)]
pub struct MergeInputs {
    /// HF Llama folder (safetensors or .bin, single or sharded; f16, bf16 or f32).
    pub base: PathBuf,
    /// PEFT LoRA folders, applied in order.
    pub loras: Vec<PathBuf>,
    /// Pad embed_tokens / lm_head to this many rows (new rows = mean of the existing rows).
    pub vocab_size: Option<usize>,
}

/// Where the merged model goes.
#[derive(Clone, Debug)]
pub struct MergeOutputs {
    /// An HF folder (sharded safetensors, config, tokenizer).
    pub out: Option<PathBuf>,
    /// A GGUF file.
    pub gguf: Option<PathBuf>,
    /// The GGUF's encoding.
    pub kind: GgufKind,
    /// Largest safetensors shard in bytes.
    pub max_shard_size: u64,
    /// general.name of the GGUF (default: the --out folder's name, else the GGUF file's stem).
    pub name: Option<String>,
    /// Overwrite an --out folder that holds a different model.
    pub force: bool,
    /// Hash the input files on a side thread and return their sha256 in the report.
    pub hash_inputs: bool,
}

/// A whole merge: inputs and outputs.
#[derive(Clone, Debug)]
pub struct MergeOptions {
    pub inputs: MergeInputs,
    pub outputs: MergeOutputs,
}

/// What a merge wrote.
#[derive(Clone, Debug)]
pub struct MergeReport {
    /// One line per output written ("wrote PATH (sha256 ...)").
    pub written: Vec<String>,
    /// sha256 of every input file (with [`MergeOutputs::hash_inputs`]), or why it failed.
    pub input_hashes: Vec<(PathBuf, std::result::Result<String, String>)>,
    pub n_loras: usize,
    pub n_tensors: usize,
    pub n_vocab: usize,
    pub seconds: f64,
}

/// The inputs of a merge, opened and checked, with the plan made once.
pub struct MergeJob {
    pub base_dir: PathBuf,
    /// The base's config.json as read.
    pub cfg: LlamaConfig,
    pub dims: ModelShape,
    pub base: Checkpoint,
    pub adapters: Vec<Adapter>,
    pub plan: Plan,
}

/// Merges `o.inputs` into `o.outputs` (see [`MergeJob`]).
pub fn merge(o: &MergeOptions, progress: &dyn Progress) -> Result<MergeReport> {
    check_outputs(&o.outputs)?;
    MergeJob::open(&o.inputs)?.write(&o.outputs, progress)
}

/// The checks on the outputs alone, made before any input is read.
fn check_outputs(o: &MergeOutputs) -> Result<()> {
    if o.out.is_none() && o.gguf.is_none() {
        bail!("nothing to write: give --out DIR (an HF folder) and/or --gguf FILE");
    }
    if let (Some(out), Some(g)) = (&o.out, &o.gguf) {
        let (o, gp) = (std::path::absolute(out)?, std::path::absolute(g)?);
        if gp.starts_with(&o) {
            bail!(
                "--gguf {} is inside the --out folder; write it elsewhere",
                g.display()
            );
        }
    }
    Ok(())
}

impl MergeJob {
    /// Opens the base and the adapters and plans every tensor; nothing is written.
    pub fn open(i: &MergeInputs) -> Result<MergeJob> {
        let cfg_path = i.base.join("config.json");
        let cfg = LlamaConfig::load(&cfg_path)
            .with_context(|| format!("reading {}", cfg_path.display()))?;
        let dims = ModelShape::from_hf(&cfg).with_context(|| cfg_path.display().to_string())?;
        let base = Checkpoint::open(&i.base)
            .with_context(|| format!("opening the base weights in {}", i.base.display()))?;
        convert::plan_tensors(
            &dims,
            &convert::checkpoint_shapes(&base),
            GgmlType::F16,
            &i.base.display().to_string(),
        )?;
        let adapters: Vec<Adapter> = i
            .loras
            .iter()
            .map(|d| Adapter::open(d))
            .collect::<Result<_>>()?;
        let plan = merge::plan(&i.base, &base, &dims, &adapters, i.vocab_size)?;
        Ok(MergeJob {
            base_dir: i.base.clone(),
            cfg,
            dims,
            base,
            adapters,
            plan,
        })
    }

    /// Bytes of the merged tensors at their own dtypes (what an HF folder holds).
    pub fn hf_bytes(&self) -> u64 {
        self.plan.tensors.iter().map(Planned::n_bytes).sum()
    }

    /// Elements of all merged tensors.
    pub fn n_elements(&self) -> u64 {
        self.plan
            .tensors
            .iter()
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum()
    }

    /// Writes the outputs in one streaming pass. Every check comes first, so a failure leaves
    /// nothing behind.
    pub fn write(&self, o: &MergeOutputs, progress: &dyn Progress) -> Result<MergeReport> {
        let t0 = Instant::now();
        check_outputs(o)?;
        let (plan, base, adapters) = (&self.plan, &self.base, &self.adapters);
        let base_dir = &self.base_dir;
        let cfg_path = base_dir.join("config.json");
        for w in &plan.warnings {
            progress.note(&format!("warning: {w}"));
        }
        let mut cfg = self.cfg.clone();
        cfg.set_vocab_size(plan.n_vocab as u64);
        if plan.tied != cfg.tie_word_embeddings {
            cfg.tie_word_embeddings = plan.tied;
            cfg.raw
                .insert("tie_word_embeddings".into(), plan.tied.into());
        }
        let mdims = ModelShape::from_hf(&cfg)?;
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
        if let Some(g) = &o.gguf {
            let name = o.name.clone().unwrap_or_else(|| {
                o.out
                    .as_ref()
                    .and_then(|o| o.file_name())
                    .or_else(|| g.file_stem())
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "model".into())
            });
            let (conv_ty, file_type) = match &o.kind {
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
            let (meta, quant) = match &o.kind {
                GgufKind::Float(_) => (meta, None),
                GgufKind::Quant(ft) => {
                    let pin: Vec<PlanTensor> = jobs
                        .iter()
                        .map(|j| PlanTensor {
                            name: j.gguf_name.clone(),
                            shape: j.ne.clone(),
                            ty: j.ty,
                        })
                        .collect();
                    let types = Planner::plan(*ft, mdims, &Overrides::default(), &pin);
                    // As llama-quantize rewrites the F16 file's keys.
                    let m = crate::quant_plan::quantized_metadata(meta, *ft);
                    (m, Some(types))
                }
            };
            gguf_plan = Some((g.clone(), jobs, meta, quant));
        }
        let out_state = match &o.out {
            Some(d) => Some(check_out_dir(d, &cfg, o.force)?),
            None => None,
        };

        // Hash the inputs beside the merge.
        let mut inputs: Vec<PathBuf> = vec![cfg_path.clone()];
        inputs.extend(base.files().iter().cloned());
        inputs.extend(
            TOKENIZER_FILES
                .iter()
                .map(|f| base_dir.join(f))
                .filter(|p| p.is_file()),
        );
        for ad in adapters {
            inputs.extend(ad.files());
        }
        // Only printed (never stored), so not computed under -q.
        let hasher = o.hash_inputs.then(|| {
            std::thread::spawn(move || -> Vec<(PathBuf, Result<String>)> {
                inputs
                    .into_iter()
                    .map(|p| {
                        let h = sha256_of(&p);
                        (p, h)
                    })
                    .collect()
            })
        });

        // Outputs.
        let hf = match (&o.out, out_state) {
            (Some(d), Some(st)) => Some(HfOut::create(
                d,
                st,
                plan,
                o.max_shard_size,
                o.gguf.is_none(),
            )?),
            _ => None,
        };
        let mut jobs_quant = None;
        let gg = match gguf_plan {
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
                let hash = Arc::new(Mutex::new(Sha256::new()));
                let h2 = Arc::clone(&hash);
                let tee = Box::new(move |b: &[u8]| {
                    h2.lock().unwrap_or_else(|e| e.into_inner()).update(b);
                });
                let w = GgufWriter::create_with_tee(&path, &meta, &infos, tee)
                    .with_context(|| format!("creating {}", path.display()))?;
                jobs_quant = Some((jobs, quant));
                Some((path, GgufOut { w, hash }))
            }
            None => None,
        };

        // The pass: GGUF order when writing GGUF (its writer is sequential), else the shards' file
        // order (so each shard is written and hashed front to back).
        let order: Vec<usize> = match (&jobs_quant, &hf) {
            (Some((jobs, _)), _) => jobs
                .iter()
                .map(|j| {
                    by_name
                        .get(j.hf_name.as_str())
                        .copied()
                        .ok_or_else(|| anyhow!("no plan for {}", j.hf_name))
                })
                .collect::<Result<_>>()?,
            (None, Some(h)) => h.order.clone(),
            (None, None) => (0..plan.tensors.len()).collect(),
        };
        let total: u64 = plan.tensors.iter().map(Planned::n_bytes).sum();
        let pb = progress.bar(total, Unit::Bytes);
        // Compute (rayon, all cores) tensor k+1 while a writer thread writes and hashes tensor k; a
        // rendezvous channel keeps at most two tensors in memory.
        let want_hf = hf.is_some();
        let (plan_r, base_r, adapters_r, pb_r) = (plan, base, &adapters[..], &*pb);
        let (hf, gg) = std::thread::scope(|s| -> Result<_> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Item>(0);
            // written tensors' buffers come back for reuse (two or three circulate)
            let (recycle_tx, recycle_rx) = std::sync::mpsc::channel::<Vec<u8>>();
            let writer = s.spawn(move || {
                write_items(rx, recycle_tx, (hf, gg), plan_r, base_r, adapters_r, pb_r)
            });
            let mut spare: Vec<u8> = Vec::new();
            let produced = std::thread::scope(|ps| -> Result<()> {
                // the next tensor's inputs are read from disk while this one is computed
                let mut ahead: Option<std::thread::ScopedJoinHandle<'_, ()>> = None;
                for (k, &ti) in order.iter().enumerate() {
                    let t = plan
                        .tensors
                        .get(ti)
                        .ok_or_else(|| anyhow!("tensor {ti} missing from the plan"))?;
                    if let Some(h) = ahead.take() {
                        h.join()
                            .map_err(|_| anyhow!("the prefetch thread panicked"))?;
                    }
                    if let Some(next) = order.get(k + 1).and_then(|&i| plan.tensors.get(i)) {
                        ahead = Some(ps.spawn(move || merge::prefetch(next, base_r, adapters_r)));
                    }
                    pb.set_message(&t.name);
                    if spare.capacity() == 0 {
                        spare = recycle_rx.try_recv().unwrap_or_default();
                    }
                    let bytes =
                        merge::materialize_into(t, base, adapters, std::mem::take(&mut spare))
                            .with_context(|| format!("merging tensor {}", t.name))?;
                    let gguf = match &jobs_quant {
                        Some((jobs, quant)) => {
                            let job = jobs
                                .get(k)
                                .ok_or_else(|| anyhow!("no GGUF job for {}", t.name))?;
                            let data = TensorData {
                                dtype: t.dtype,
                                shape: &t.shape,
                                bytes: &bytes,
                            };
                            let enc = convert::encode_tensor(job, &data)?;
                            let enc = match (quant, quant.as_ref().and_then(|q| q.get(k))) {
                                (Some(_), Some(&ty)) => crate::transcode::transcode(
                                    Recode {
                                        tensor: &job.gguf_name,
                                        src_ty: job.ty,
                                        dst_ty: ty,
                                        rows: job.rows(),
                                        cols: job.cols(),
                                    },
                                    &enc,
                                    &crate::transcode::same_row,
                                )?,
                                (Some(_), None) => bail!("no quant type for {}", job.gguf_name),
                                (None, _) => enc,
                            };
                            Some((job.gguf_name.as_str(), enc))
                        }
                        None => None,
                    };
                    let hf = if want_hf {
                        Some(bytes)
                    } else {
                        if let Cow::Owned(v) = bytes {
                            spare = v;
                        }
                        None
                    };
                    if tx.send(Item { ti, hf, gguf }).is_err() {
                        break; // the writer failed; its error is reported below
                    }
                }
                Ok(())
            });
            drop(tx);
            let written = writer
                .join()
                .map_err(|_| anyhow!("the writer thread panicked"))?;
            produced?;
            written
        })?;
        pb.finish();

        // Everything staged first, then moved into place, so a failure leaves nothing behind.
        let mut report = Vec::new();
        let mut hf = hf;
        let staged = match hf.as_mut() {
            Some(h) => Some(h.prepare(&cfg, base_dir, &plan.tokenizer_dir)?),
            None => None,
        };
        if let Some((path, g)) = gg {
            g.w.finish()
                .with_context(|| format!("finishing {}", path.display()))?;
            let h = hex(std::mem::take(
                &mut *g.hash.lock().unwrap_or_else(|e| e.into_inner()),
            ));
            sums::upsert_beside(&path, &h)?;
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
        let input_hashes = match hasher.map(|h| h.join()) {
            None => Vec::new(),
            Some(Ok(v)) => v
                .into_iter()
                .map(|(p, h)| (p, h.map_err(|e| format!("{e:#}"))))
                .collect(),
            Some(Err(_)) => bail!("the thread hashing the inputs panicked"),
        };
        Ok(MergeReport {
            written: report,
            input_hashes,
            n_loras: adapters.len(),
            n_tensors: plan.tensors.len(),
            n_vocab: plan.n_vocab,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }
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

    #[test]
    fn shard_hash_is_the_files_whatever_the_write_order() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
        // header [0,8), then pieces written in a scrambled order
        let cuts = [8usize, 100, 5000, 5001, 20_000, 39_999, 40_000];
        let order = [3usize, 0, 5, 1, 4, 2];
        let path = dir.path().join("s");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.write_all_at(&data[..8], 0).unwrap();
        let mut sh = Shard::new(
            "s".into(),
            path.clone(),
            Sink::Positioned(file),
            &data[..8],
            40_000,
        );
        for &i in &order {
            sh.write_at(cuts[i] as u64, &data[cuts[i]..cuts[i + 1]])
                .unwrap();
        }
        assert_eq!(sh.hashed, sh.end);
        assert!(sh.pending.is_empty());
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert_eq!(sh.finish().unwrap(), sha256_of(&path).unwrap());
    }

    #[test]
    fn direct_shard_takes_tensors_in_file_order_only() {
        let dir = tempfile::tempdir().unwrap();
        // pieces of both sides of the threaded-hash threshold
        let data: Vec<u8> = (0..3 * HASH_THREAD_MIN as u32 + 77)
            .map(|i| (i * 13 % 253) as u8)
            .collect();
        let cuts = [8usize, 100, HASH_THREAD_MIN + 3, data.len()];
        let path = dir.path().join("s");
        let mut d = DirectFile::create_new(&path).unwrap();
        d.append(&data[..8]).unwrap();
        let mut sh = Shard::new(
            "s".into(),
            path.clone(),
            Sink::Direct(d),
            &data[..8],
            data.len() as u64,
        );
        assert!(sh
            .write_at(cuts[1] as u64, &data[cuts[1]..cuts[2]])
            .is_err());
        for w in cuts.windows(2) {
            sh.write_at(w[0] as u64, &data[w[0]..w[1]]).unwrap();
        }
        assert_eq!(sh.hashed, sh.end);
        let hash = sh.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert_eq!(hash, sha256_of(&path).unwrap());
    }
}
