//! LoRA merging as PEFT's `merge_and_unload` does it: adapter folders, key forms, the per-module
//! scale and orientation, every compatibility and vocabulary check made before anything is written,
//! and the one-tensor-at-a-time computation `W' = W + scale·(B·A)` in f32, rounded once to the
//! tensor's dtype.
//!
//! Summation order: `B·A` is accumulated in f32 over the rank index in ascending order, each step a
//! fused multiply-add — what OpenBLAS's sgemm kernels (numpy's and torch's CPU matmul) compute for
//! the small inner dimension of a LoRA. When every product of the two factors is exact in f32 (f16
//! factors always; bf16 and f32 factors whose values are short enough), a plain multiply and add
//! gives the same bits, so the scalar path uses it; the SIMD kernels always fuse.

use anyhow::{anyhow, bail, Context, Result};
use half::slice::HalfFloatSliceExt;
use kiln_formats::checkpoint::{Checkpoint, DType, TensorData};
use kiln_formats::hf::{AdapterConfig, LoraBias, TargetModules};
use kiln_formats::sentencepiece::SpModel;
use kiln_quant::lowrank::{self, add_lowrank, add_lowrank_f16, LowRankShape};
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::convert::is_dropped;
use crate::shape::ModelShape;

mod direct;
mod write;
pub use write::{
    merge, parse_outtype, GgufKind, MergeInputs, MergeJob, MergeOptions, MergeOutputs, MergeReport,
};

/// PEFT's prefix of every adapter tensor name (`PeftModel.base_model.model`).
const PEFT_PREFIX: &str = "base_model.model.";
/// Rows per task of the delta product (a multiple of the kernels' 6-row tiles; a few MiB of f32
/// for 7B widths where rows are widened into a buffer).
const DELTA_ROWS: usize = 192;
const EMBED: &str = "model.embed_tokens.weight";
const HEAD: &str = "lm_head.weight";
/// Tokenizer files copied from the folder that provides the vocabulary.
pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.json",
];

/// One LoRA pair of an adapter.
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// Module path in the base model, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    pub a: String,
    pub b: String,
    /// `lora_embedding_A/B` of an Embedding layer: the delta is `(B·A)ᵀ`.
    pub embedding: bool,
}

/// A PEFT LoRA adapter folder.
pub struct Adapter {
    pub dir: PathBuf,
    pub cfg: AdapterConfig,
    pub ckpt: Checkpoint,
    pub modules: Vec<LoraModule>,
    /// Full tensors saved through modules_to_save: base tensor name -> adapter tensor name.
    pub replacements: BTreeMap<String, String>,
    /// Pieces of the adapter's tokenizer (SentencePiece pieces and added tokens), if it has one.
    pub n_tokens: Option<usize>,
}

enum Key {
    LoraA(String),
    LoraB(String),
    EmbA(String),
    EmbB(String),
    Full(String),
    Ignore,
    Dora,
    Bias,
    Unknown,
}

/// Classifies an adapter tensor name (all of PEFT's saved forms).
fn classify(key: &str) -> Key {
    let k = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
    if k.contains(".lora_magnitude_vector") {
        return Key::Dora;
    }
    for (tag, is_a) in [(".lora_A.", true), (".lora_B.", false)] {
        if let Some(pos) = k.find(tag) {
            let module = k[..pos].to_string();
            let rest = &k[pos + tag.len()..];
            let param = rest.rsplit('.').next().unwrap_or(rest);
            let depth = rest.split('.').count();
            return match (param, depth) {
                ("weight", 1 | 2) if is_a => Key::LoraA(module),
                ("weight", 1 | 2) => Key::LoraB(module),
                ("bias", 1 | 2) => Key::Bias,
                _ => Key::Unknown,
            };
        }
    }
    for (tag, is_a) in [(".lora_embedding_A", true), (".lora_embedding_B", false)] {
        if let Some(pos) = k.find(tag) {
            let module = k[..pos].to_string();
            let rest = &k[pos + tag.len()..];
            // `<m>.lora_embedding_A` or `<m>.lora_embedding_A.<adapter>`
            if rest.is_empty() || (rest.starts_with('.') && !rest[1..].contains('.')) {
                return if is_a {
                    Key::EmbA(module)
                } else {
                    Key::EmbB(module)
                };
            }
            return Key::Unknown;
        }
    }
    if k.contains(".original_module.") {
        return Key::Ignore;
    }
    if let Some(pos) = k.find(".modules_to_save.") {
        let rest = &k[pos + ".modules_to_save.".len()..];
        return match rest.split_once('.') {
            Some((_adapter, param)) if !param.contains('.') => {
                Key::Full(format!("{}.{param}", &k[..pos]))
            }
            _ => Key::Unknown,
        };
    }
    if let Some(pos) = k.find(".base_layer.") {
        let param = &k[pos + ".base_layer.".len()..];
        if !param.contains('.') {
            return Key::Full(format!("{}.{param}", &k[..pos]));
        }
        return Key::Unknown;
    }
    if k.ends_with(".bias") {
        return Key::Bias;
    }
    if k.ends_with(".weight") {
        return Key::Full(k.to_string());
    }
    Key::Unknown
}

/// Tokens of the tokenizer in `dir`: SentencePiece pieces, extended by added_tokens.json ids.
pub fn tokenizer_size(dir: &Path) -> Result<Option<usize>> {
    let sp_path = dir.join("tokenizer.model");
    if !sp_path.is_file() {
        return Ok(None);
    }
    let sp = SpModel::open(&sp_path).with_context(|| format!("reading {}", sp_path.display()))?;
    let mut n = sp.pieces.len();
    let added = dir.join("added_tokens.json");
    if added.is_file() {
        let text = std::fs::read_to_string(&added)
            .with_context(|| format!("reading {}", added.display()))?;
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a JSON object of token -> id", added.display()))?;
        for (tok, id) in map {
            let id = id
                .as_u64()
                .ok_or_else(|| anyhow!("{}: id of {tok:?} is not an integer", added.display()))?;
            n = n.max(usize::try_from(id).unwrap_or(usize::MAX).saturating_add(1));
        }
    }
    Ok(Some(n))
}

impl Adapter {
    /// Opens a LoRA folder: adapter_config.json, adapter_model.safetensors or .bin, tokenizer.
    pub fn open(dir: &Path) -> Result<Adapter> {
        if !dir.is_dir() {
            bail!("LoRA folder {} does not exist", dir.display());
        }
        let cfg_path = dir.join("adapter_config.json");
        if !cfg_path.is_file() {
            bail!(
                "{}: no adapter_config.json; a PEFT LoRA folder holds adapter_config.json (r, lora_alpha, \
                 target_modules, ...) beside adapter_model.safetensors or adapter_model.bin, and the merge \
                 cannot be computed without it",
                dir.display()
            );
        }
        let cfg = AdapterConfig::load(&cfg_path)
            .with_context(|| format!("reading {}", cfg_path.display()))?;
        if cfg.use_dora {
            bail!(
                "{}: use_dora is true: DoRA adapters (magnitude vector and column norms) are not supported \
                 by kiln merge; merge them with PEFT's merge_and_unload",
                cfg_path.display()
            );
        }
        if cfg.bias != LoraBias::None || cfg.lora_bias {
            bail!(
                "{}: bias = {:?}{}: LoRA adapters that train biases are not supported (Llama has no biases \
                 to merge them into); only bias = \"none\" can be merged",
                cfg_path.display(),
                match cfg.bias {
                    LoraBias::None => "none",
                    LoraBias::All => "all",
                    LoraBias::LoraOnly => "lora_only",
                },
                if cfg.lora_bias { " with lora_bias" } else { "" }
            );
        }
        let weights = ["adapter_model.safetensors", "adapter_model.bin"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                anyhow!(
                    "{}: neither adapter_model.safetensors nor adapter_model.bin is there",
                    dir.display()
                )
            })?;
        let ckpt = Checkpoint::open(&weights)
            .with_context(|| format!("reading the adapter weights {}", weights.display()))?;
        let mut a_of: BTreeMap<(String, bool), String> = BTreeMap::new();
        let mut b_of: BTreeMap<(String, bool), String> = BTreeMap::new();
        let mut replacements = BTreeMap::new();
        for t in ckpt.tensors() {
            let dup = |m: &str| {
                anyhow!(
                    "{}: two tensors for the same LoRA factor of {m} (several adapters in one file?); \
                     the second is {}",
                    weights.display(),
                    t.name
                )
            };
            match classify(&t.name) {
                Key::LoraA(m) => {
                    if a_of.insert((m.clone(), false), t.name.clone()).is_some() {
                        return Err(dup(&m));
                    }
                }
                Key::LoraB(m) => {
                    if b_of.insert((m.clone(), false), t.name.clone()).is_some() {
                        return Err(dup(&m));
                    }
                }
                Key::EmbA(m) => {
                    if a_of.insert((m.clone(), true), t.name.clone()).is_some() {
                        return Err(dup(&m));
                    }
                }
                Key::EmbB(m) => {
                    if b_of.insert((m.clone(), true), t.name.clone()).is_some() {
                        return Err(dup(&m));
                    }
                }
                Key::Full(hf) => {
                    if replacements.insert(hf.clone(), t.name.clone()).is_some() {
                        return Err(dup(&hf));
                    }
                }
                Key::Ignore => {}
                Key::Dora => bail!(
                    "{}: tensor {} is a DoRA magnitude vector: DoRA adapters are not supported by kiln merge",
                    weights.display(),
                    t.name
                ),
                Key::Bias => bail!(
                    "{}: tensor {} is a bias: LoRA adapters that train biases are not supported",
                    weights.display(),
                    t.name
                ),
                Key::Unknown => bail!(
                    "{}: tensor {} is not a LoRA factor (lora_A / lora_B) or a modules_to_save weight",
                    weights.display(),
                    t.name
                ),
            }
        }
        let mut modules = Vec::new();
        for ((m, emb), a) in &a_of {
            let b = b_of.remove(&(m.clone(), *emb)).ok_or_else(|| {
                anyhow!("{}: {m} has lora_A ({a}) but no lora_B", weights.display())
            })?;
            modules.push(LoraModule {
                module: m.clone(),
                a: a.clone(),
                b,
                embedding: *emb,
            });
        }
        if let Some(((m, _), b)) = b_of.into_iter().next() {
            bail!("{}: {m} has lora_B ({b}) but no lora_A", weights.display());
        }
        let n_tokens = tokenizer_size(dir)?;
        Ok(Adapter {
            dir: dir.to_path_buf(),
            cfg,
            ckpt,
            modules,
            replacements,
            n_tokens,
        })
    }

    /// Files read from this adapter (for the input hashes).
    pub fn files(&self) -> Vec<PathBuf> {
        let mut v = vec![self.dir.join("adapter_config.json")];
        v.extend(self.ckpt.files().iter().cloned());
        v.extend(
            TOKENIZER_FILES
                .iter()
                .map(|f| self.dir.join(f))
                .filter(|p| p.is_file()),
        );
        v
    }
}

/// Where a tensor's values come from before the deltas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Base(String),
    /// (adapter index, tensor name in that adapter)
    Adapter(usize, String),
}

impl Origin {
    /// The checkpoint holding the tensor, and its name there.
    pub fn locate<'c>(
        &self,
        base: &'c Checkpoint,
        adapters: &'c [Adapter],
    ) -> Result<(&'c Checkpoint, &str)> {
        Ok(match self {
            Origin::Base(n) => (base, n.as_str()),
            Origin::Adapter(i, n) => (
                &adapters
                    .get(*i)
                    .ok_or_else(|| anyhow!("adapter {i} missing"))?
                    .ckpt,
                n.as_str(),
            ),
        })
    }
}

/// One LoRA delta to add to a tensor.
#[derive(Clone, Debug)]
pub struct Delta {
    pub adapter: usize,
    pub module: usize,
    pub scale: f32,
    /// Add `(B·A)ᵀ` instead of `B·A`.
    pub transpose: bool,
}

/// One tensor of the merged model.
#[derive(Clone, Debug)]
pub struct Planned {
    pub name: String,
    /// Shape after padding.
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub source: Origin,
    /// Rows the source has (less than `shape[0]` when --vocab-size pads).
    pub source_rows: usize,
    pub deltas: Vec<Delta>,
}

impl Planned {
    pub fn n_bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

/// Everything decided before writing: the tensors in HF state-dict order, the new vocabulary and
/// where its tokenizer comes from, and warnings for the log.
pub struct Plan {
    pub tensors: Vec<Planned>,
    pub n_vocab: usize,
    pub tied: bool,
    pub tokenizer_dir: PathBuf,
    pub warnings: Vec<String>,
}

/// Position of a tensor in LlamaForCausalLM.state_dict() order.
fn state_dict_key(name: &str) -> (usize, usize, usize) {
    const LAYER: [&str; 9] = [
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ];
    match name {
        EMBED => (0, 0, 0),
        "model.norm.weight" => (2, 0, 0),
        HEAD => (3, 0, 0),
        _ => {
            let rest = name.strip_prefix("model.layers.").unwrap_or(name);
            let (l, s) = rest.split_once('.').unwrap_or((rest, ""));
            let l = l.parse().unwrap_or(usize::MAX);
            (
                1,
                l,
                LAYER.iter().position(|x| *x == s).unwrap_or(LAYER.len()),
            )
        }
    }
}

/// Model family named by a path or hub id, for the base_model_name_or_path warning.
fn family(s: &str) -> Option<&'static str> {
    let s = s.to_ascii_lowercase().replace(['_', ' '], "-");
    const FAMILIES: [(&str, &str); 12] = [
        ("llama-3", "llama-3"),
        ("llama3", "llama-3"),
        ("llama-2", "llama-2"),
        ("llama2", "llama-2"),
        ("mistral", "mistral"),
        ("mixtral", "mixtral"),
        ("qwen", "qwen"),
        ("baichuan", "baichuan"),
        ("chatglm", "chatglm"),
        ("gemma", "gemma"),
        ("falcon", "falcon"),
        ("llama", "llama"),
    ];
    FAMILIES
        .iter()
        .find(|(k, _)| s.contains(k))
        .map(|(_, f)| *f)
}

/// Model size tag like "7b" / "13b" in a name.
fn size_tag(s: &str) -> Option<String> {
    let s = s.to_ascii_lowercase();
    let re = regex::Regex::new(r"(?:^|[^0-9a-z.])([0-9]+(?:\.[0-9]+)?b)(?:$|[^0-9a-z])").ok()?;
    re.captures(&s)
        .and_then(|c| c.get(1))
        .map(|m| m.as_str().to_string())
}

/// Checks the base and the adapters against each other and decides every output tensor.
pub fn plan(
    base_dir: &Path,
    base: &Checkpoint,
    dims: &ModelShape,
    adapters: &[Adapter],
    vocab_size: Option<usize>,
) -> Result<Plan> {
    let mut warnings = Vec::new();
    let mut cur: BTreeMap<String, Planned> = BTreeMap::new();
    for t in base.tensors() {
        if is_dropped(&t.name) {
            continue;
        }
        cur.insert(
            t.name.clone(),
            Planned {
                name: t.name.clone(),
                shape: t.shape.clone(),
                dtype: t.dtype,
                source: Origin::Base(t.name.clone()),
                source_rows: t.shape.first().copied().unwrap_or(1),
                deltas: Vec::new(),
            },
        );
    }
    let base_modules: Vec<String> = cur
        .keys()
        .filter_map(|n| n.strip_suffix(".weight"))
        .map(str::to_string)
        .collect();
    let model_dtype = cur.get(EMBED).map(|p| p.dtype).unwrap_or(DType::F16);
    let mut tied = dims.tied && !cur.contains_key(HEAD);
    let base_tok = tokenizer_size(base_dir)?;
    let mut tokens = base_tok;
    let mut tok_dir = base_dir.to_path_buf();
    let base_name = base_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();

    for (ai, ad) in adapters.iter().enumerate() {
        let src = ad.dir.display().to_string();
        let cfg = &ad.cfg;
        if let Some(bm) = &cfg.base_model_name_or_path {
            let (fa, fb) = (family(bm), family(&base_name));
            let (sa, sb) = (size_tag(bm), size_tag(&base_name));
            if fa.is_some() && fb.is_some() && fa != fb {
                warnings.push(format!(
                    "{src}: base_model_name_or_path is {bm:?} ({}), but the base folder {base_name:?} looks like {}",
                    fa.unwrap_or("?"),
                    fb.unwrap_or("?")
                ));
            } else if sa.is_some() && sb.is_some() && sa != sb {
                warnings.push(format!(
                    "{src}: base_model_name_or_path is {bm:?} ({}), but the base folder {base_name:?} is {}",
                    sa.unwrap_or_default(),
                    sb.unwrap_or_default()
                ));
            }
        }
        // target_modules must name modules the base has (PEFT refuses otherwise).
        match &cfg.target_modules {
            TargetModules::List(list) => {
                for t in list {
                    let found = base_modules
                        .iter()
                        .any(|m| m == t || m.ends_with(&format!(".{t}")));
                    if !found {
                        bail!(
                            "{src}: unknown target module {t:?} in adapter_config.json: the base model has no \
                             module named {t:?} (Llama's are q_proj, k_proj, v_proj, o_proj, gate_proj, \
                             up_proj, down_proj, embed_tokens, lm_head); was this adapter trained on another \
                             architecture?"
                        );
                    }
                }
            }
            TargetModules::Regex(re) => {
                if !ad.modules.is_empty() && !base_modules.iter().any(|m| cfg.targets(m)) {
                    bail!("{src}: target_modules regex {re:?} matches no module of the base model");
                }
            }
        }
        // modules_to_save: whole tensors replace the current ones.
        for (hf, key) in &ad.replacements {
            let meta = ad
                .ckpt
                .get(key)
                .ok_or_else(|| anyhow!("{src}: tensor {key} vanished from the adapter"))?;
            let is_vocab = hf == EMBED || hf == HEAD;
            let known = cur.contains_key(hf) || (hf == HEAD && dims.tied);
            if !known {
                bail!(
                    "{src}: modules_to_save tensor {key} would replace {hf}, which the base model does not have"
                );
            }
            if is_vocab {
                if meta.shape.len() != 2 || meta.shape[1] != dims.n_embd {
                    bail!(
                        "{src}: {key} has shape {:?}, but the base model's hidden size is {} (embedding rows \
                         of [vocab, {}]): this adapter was trained for a model with a different hidden size",
                        meta.shape,
                        dims.n_embd,
                        dims.n_embd
                    );
                }
            } else if let Some(p) = cur.get(hf) {
                if p.shape != meta.shape {
                    bail!(
                        "{src}: {key} has shape {:?}, but the base model's {hf} is {:?}",
                        meta.shape,
                        p.shape
                    );
                }
            }
            if hf == HEAD && tied {
                warnings.push(format!(
                    "{src}: the base ties lm_head to embed_tokens, but this adapter saves its own lm_head; \
                     the merged model gets a separate lm_head (tie_word_embeddings = false)"
                ));
                tied = false;
            }
            let rows = meta.shape.first().copied().unwrap_or(1);
            cur.insert(
                hf.clone(),
                Planned {
                    name: hf.clone(),
                    shape: meta.shape.clone(),
                    dtype: cur.get(hf).map(|p| p.dtype).unwrap_or(model_dtype),
                    source: Origin::Adapter(ai, key.clone()),
                    source_rows: rows,
                    deltas: Vec::new(),
                },
            );
        }
        // LoRA factors.
        let mut fifo_warned = false;
        for (mi, m) in ad.modules.iter().enumerate() {
            let hf = format!("{}.weight", m.module);
            let Some(target) = cur.get_mut(&hf) else {
                let layer_hint = m
                    .module
                    .strip_prefix("model.layers.")
                    .and_then(|r| r.split('.').next())
                    .and_then(|l| l.parse::<usize>().ok())
                    .filter(|&l| l >= dims.n_layer)
                    .map(|l| {
                        format!(
                            " (layer {l}, but the base has {} layers: num_hidden_layers = {}; the adapter was \
                             trained on a deeper model)",
                            dims.n_layer, dims.n_layer
                        )
                    })
                    .unwrap_or_default();
                bail!(
                    "{src}: unknown target module {}: the base model has no tensor {hf}{layer_hint}",
                    m.module
                );
            };
            if m.module == "lm_head" && tied {
                bail!(
                    "{src}: a LoRA on lm_head of a base with tied embeddings cannot be merged without untying; \
                     not supported"
                );
            }
            if !cfg.targets(&m.module) && !m.embedding {
                warnings.push(format!(
                    "{src}: {} has LoRA tensors but adapter_config.json does not target it; PEFT ignores them, \
                     and so does kiln",
                    m.module
                ));
                continue;
            }
            let a = ad
                .ckpt
                .get(&m.a)
                .ok_or_else(|| anyhow!("{src}: tensor {} vanished", m.a))?;
            let b = ad
                .ckpt
                .get(&m.b)
                .ok_or_else(|| anyhow!("{src}: tensor {} vanished", m.b))?;
            if a.shape.len() != 2 || b.shape.len() != 2 {
                bail!(
                    "{src}: {} and {} must be matrices, found shapes {:?} and {:?}",
                    m.a,
                    m.b,
                    a.shape,
                    b.shape
                );
            }
            let (ra, in_a, out_b, rb) = (a.shape[0], a.shape[1], b.shape[0], b.shape[1]);
            if ra != rb {
                bail!(
                    "{src}: r mismatch for {}: lora_A {} has rank {ra} (shape {:?}) but lora_B {} has rank {rb} \
                     (shape {:?}); the adapter file is inconsistent",
                    m.module,
                    m.a,
                    a.shape,
                    m.b,
                    b.shape
                );
            }
            let want_r = cfg.rank_for(&m.module) as usize;
            if ra != want_r {
                bail!(
                    "{src}: {} has rank {ra} in the adapter file, but adapter_config.json gives it r = {want_r} \
                     (r / rank_pattern); PEFT would refuse to load this adapter",
                    m.module
                );
            }
            let (rows, cols) = (target.shape[0], target.shape.get(1).copied().unwrap_or(1));
            if target.shape.len() != 2 {
                bail!("{src}: {} targets {hf}, which is not a matrix", m.module);
            }
            // The delta's orientation: B·A is (out_b × in_a).
            let transpose = if m.embedding {
                if (in_a, out_b) != (rows, cols) {
                    bail!(
                        "{src}: embedding LoRA of {}: (B·A)ᵀ has shape [{in_a}, {out_b}] but {hf} is [{rows}, {cols}]",
                        m.module
                    );
                }
                true
            } else if (out_b, in_a) == (rows, cols) {
                if cfg.fan_in_fan_out && !fifo_warned {
                    warnings.push(format!(
                        "{src}: fan_in_fan_out = true, but Llama's projections are torch.nn.Linear: PEFT sets it \
                         to False for them, and so does kiln (the factors are in Linear orientation)"
                    ));
                    fifo_warned = true;
                }
                false
            } else if cfg.fan_in_fan_out && (in_a, out_b) == (rows, cols) {
                true
            } else {
                let hidden_hint = if in_a != cols
                    && (in_a == dims.n_embd || cols == dims.n_embd || in_a != out_b)
                {
                    format!(
                        "; the factors' input size {in_a} differs from the base's {cols}: the adapter was \
                         trained for a model with a different hidden size (base hidden_size = {})",
                        dims.n_embd
                    )
                } else {
                    String::new()
                };
                bail!(
                    "{src}: {}: lora_B·lora_A has shape [{out_b}, {in_a}] but the base's {hf} is [{rows}, {cols}]{hidden_hint}",
                    m.module
                );
            };
            if !target.deltas.is_empty() && target.deltas.iter().any(|d| d.adapter == ai) {
                bail!("{src}: two LoRA pairs target {hf}");
            }
            target.deltas.push(Delta {
                adapter: ai,
                module: mi,
                scale: cfg.scale_for(&m.module),
                transpose,
            });
        }
        // Targeted modules without factors keep B = 0 in PEFT: no change; say so.
        let missing = base_modules
            .iter()
            .filter(|m| cfg.targets(m) && !ad.modules.iter().any(|x| &x.module == *m))
            .count();
        if missing > 0 && !ad.modules.is_empty() {
            warnings.push(format!(
                "{src}: {missing} module(s) targeted by adapter_config.json have no LoRA tensors in the file; \
                 they stay as they are (PEFT initializes lora_B to zero)"
            ));
        }
        // The adapter's own tokenizer must fit the embeddings as they now are.
        if let Some(n) = ad.n_tokens {
            let rows = cur.get(EMBED).map(|p| p.shape[0]).unwrap_or(0);
            let has_emb = ad.replacements.contains_key(EMBED);
            if n > rows && !has_emb {
                bail!(
                    "{src}: its tokenizer.model has {n} tokens but the model's embed_tokens has {rows} rows, and \
                     this LoRA carries no embed_tokens / lm_head weights (modules_to_save). A LoRA that extends \
                     the vocabulary must ship the trained embedding rows for the new tokens (PEFT saves them \
                     with modules_to_save = [\"embed_tokens\", \"lm_head\"]); without them the new tokens have \
                     no embeddings. Use the adapter release that includes them (for Chinese-LLaMA-2: the LoRA \
                     folder with a large adapter_model.bin), or a base that already has {n} rows."
                );
            }
            if has_emb && n != rows {
                bail!(
                    "{src}: tokenizer / embedding row mismatch: its tokenizer.model has {n} tokens but its \
                     embed_tokens has {rows} rows; the adapter folder mixes files from different releases"
                );
            }
            tokens = Some(n);
            tok_dir = ad.dir.clone();
        }
    }

    // Final vocabulary checks.
    let emb = cur
        .get(EMBED)
        .ok_or_else(|| anyhow!("{}: the base model has no {EMBED}", base_dir.display()))?;
    let rows = emb.shape[0];
    let emb_from_base = matches!(emb.source, Origin::Base(_));
    if let Some(h) = cur.get(HEAD) {
        if h.shape[0] != rows {
            bail!(
                "embed_tokens has {rows} rows but lm_head has {} after applying the adapters; both must have \
                 one row per token (a LoRA saved only one of them in modules_to_save?)",
                h.shape[0]
            );
        }
    }
    let n_tok = tokens.ok_or_else(|| {
        anyhow!(
            "no tokenizer.model in the base folder {} or in any LoRA folder: the merged model needs one",
            base_dir.display()
        )
    })?;
    if rows != n_tok && !(emb_from_base && rows > n_tok && rows == dims.n_vocab) {
        bail!(
            "tokenizer / embedding row mismatch: the vocabulary ({} in {}) has {n_tok} tokens but \
             embed_tokens has {rows} rows",
            "tokenizer.model",
            tok_dir.display()
        );
    }
    let n_vocab = match vocab_size {
        Some(n) if n < rows => bail!(
            "--vocab-size {n} is smaller than the merged model's {rows} embedding rows; it can only pad"
        ),
        Some(n) => n,
        None => rows,
    };
    for name in [EMBED, HEAD] {
        if let Some(p) = cur.get_mut(name) {
            p.shape[0] = n_vocab;
        }
    }
    let mut tensors: Vec<Planned> = cur.into_values().collect();
    tensors.sort_by_key(|p| state_dict_key(&p.name));
    Ok(Plan {
        tensors,
        n_vocab,
        tied,
        tokenizer_dir: tok_dir,
        warnings,
    })
}

/// f32 values of a tensor.
fn widen(d: &TensorData<'_>) -> Vec<f32> {
    d.to_f32()
}

/// Rounds f32 values into `dtype` bytes (round to nearest even; NaN stays NaN).
fn narrow_into(dtype: DType, src: &[f32], dst: &mut [u8]) {
    match dtype {
        DType::F32 => {
            for (v, o) in src.iter().zip(dst.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => {
            // blocks through half's slice conversion (F16C where present), same rounding as
            // f16::from_f32
            let mut s = src.chunks_exact(CVT);
            let mut d = dst.chunks_exact_mut(2 * CVT);
            let mut h = [half::f16::ZERO; CVT];
            for (sc, dc) in (&mut s).zip(&mut d) {
                h.convert_from_f32_slice(sc);
                for (v, o) in h.iter().zip(dc.chunks_exact_mut(2)) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            for (v, o) in s
                .remainder()
                .iter()
                .zip(d.into_remainder().chunks_exact_mut(2))
            {
                o.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
        }
        DType::BF16 => {
            for (v, o) in src.iter().zip(dst.chunks_exact_mut(2)) {
                o.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
            }
        }
    }
}

/// Values per block of the vectorized f16 conversions.
const CVT: usize = 64;

fn widen_row(dtype: DType, src: &[u8], dst: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (c, o) in src.chunks_exact(4).zip(dst.iter_mut()) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            let mut s = src.chunks_exact(2 * CVT);
            let mut d = dst.chunks_exact_mut(CVT);
            for (sc, dc) in (&mut s).zip(&mut d) {
                let mut h = [half::f16::ZERO; CVT];
                for (v, c) in h.iter_mut().zip(sc.chunks_exact(2)) {
                    *v = half::f16::from_le_bytes([c[0], c[1]]);
                }
                h.convert_to_f32_slice(dc);
            }
            for (c, o) in s.remainder().chunks_exact(2).zip(d.into_remainder()) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (c, o) in src.chunks_exact(2).zip(dst.iter_mut()) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
    }
}

/// Significant bits of a finite f32 (0 for zero).
fn sig_bits(v: f32) -> u32 {
    if v == 0.0 || !v.is_finite() {
        return 0;
    }
    let bits = v.to_bits();
    let exp = (bits >> 23) & 0xff;
    let mant = bits & 0x7f_ffff;
    let full = if exp == 0 { mant } else { mant | 0x80_0000 };
    32 - full.leading_zeros() - full.trailing_zeros()
}

/// True when every product x·y (x from `a`, y from `b`) is exact in f32: significands short enough
/// and no product under- or overflows, so multiply-then-add equals a fused multiply-add.
fn products_exact(a: &[f32], b: &[f32]) -> bool {
    let stats = |v: &[f32]| -> Option<(u32, f64, f64)> {
        let mut bits = 0;
        let (mut lo, mut hi) = (f64::INFINITY, 0f64);
        for &x in v {
            if !x.is_finite() {
                return None;
            }
            if x != 0.0 {
                bits = bits.max(sig_bits(x));
                let m = f64::from(x.abs());
                lo = lo.min(m);
                hi = hi.max(m);
            }
        }
        Some((bits, lo, hi))
    };
    let (Some((ba, la, ha)), Some((bb, lb, hb))) = (stats(a), stats(b)) else {
        return false;
    };
    if ha == 0.0 || hb == 0.0 {
        return true;
    }
    ba + bb <= 24 && la * lb >= f64::from(f32::MIN_POSITIVE) && ha * hb <= f64::from(f32::MAX) / 2.0
}

/// The factors of one delta, laid out so that delta row i = Σ_k coef[i][k] · basis[k][..].
struct Factors {
    r: usize,
    coef: Vec<f32>,
    basis: Vec<f32>,
    scale: f32,
    exact: bool,
}

fn factors(ad: &Adapter, m: &LoraModule, d: &Delta, rows: usize, cols: usize) -> Result<Factors> {
    let a = widen(&ad.ckpt.data(&m.a)?);
    let b = widen(&ad.ckpt.data(&m.b)?);
    let r = ad.ckpt.get(&m.a).map(|t| t.shape[0]).unwrap_or(0);
    if r == 0 || a.len() != r * (a.len() / r) || !b.len().is_multiple_of(r) {
        bail!(
            "{}: bad LoRA factor sizes for {}",
            ad.dir.display(),
            m.module
        );
    }
    let exact = products_exact(&a, &b);
    let (coef, basis) = if !d.transpose {
        // W is out × in; B is rows × r, A is r × cols.
        (b, a)
    } else {
        // (B·A)ᵀ: B is cols × r, A is r × rows. coef[i][k] = A[k][i], basis[k][j] = B[j][k].
        let mut coef = vec![0f32; rows * r];
        for k in 0..r {
            for i in 0..rows {
                coef[i * r + k] = a[k * rows + i];
            }
        }
        let mut basis = vec![0f32; r * cols];
        for j in 0..cols {
            for k in 0..r {
                basis[k * cols + j] = b[j * r + k];
            }
        }
        (coef, basis)
    };
    if coef.len() != rows * r || basis.len() != r * cols {
        bail!(
            "{}: LoRA factors of {} do not fit [{rows}, {cols}]",
            ad.dir.display(),
            m.module
        );
    }
    Ok(Factors {
        r,
        coef,
        basis,
        scale: d.scale,
        exact,
    })
}

/// The merged tensor's bytes in its dtype: borrowed from the input when nothing changes, else
/// computed into `spare`, a buffer of an earlier tensor or empty (its contents are overwritten):
/// reusing one saves the page faults and zeroing of a fresh allocation per tensor.
pub fn materialize_into<'a>(
    t: &Planned,
    base: &'a Checkpoint,
    adapters: &'a [Adapter],
    spare: Vec<u8>,
) -> Result<Cow<'a, [u8]>> {
    let (ckpt, name) = t.source.locate(base, adapters)?;
    let data = ckpt.data(name)?;
    let cols: usize = t.shape.iter().skip(1).product::<usize>().max(1);
    let cols = if t.shape.len() <= 1 {
        t.shape.first().copied().unwrap_or(1)
    } else {
        cols
    };
    let src_rows = if t.shape.len() <= 1 { 1 } else { t.source_rows };
    let rows = if t.shape.len() <= 1 { 1 } else { t.shape[0] };
    if data.n_elements() != src_rows * cols {
        bail!(
            "tensor {}: {} values, expected {}",
            t.name,
            data.n_elements(),
            src_rows * cols
        );
    }
    if t.deltas.is_empty() && rows == src_rows && data.dtype == t.dtype {
        return Ok(Cow::Borrowed(data.bytes));
    }
    let es = t.dtype.size();
    let row_bytes = cols * es;
    let n_out = rows
        .checked_mul(row_bytes)
        .ok_or_else(|| anyhow!("tensor {}: size overflows", t.name))?;
    // every byte below is written (source rows, deltas, padding rows), so stale bytes of the
    // spare buffer never leak; only growth is zero-filled
    let mut out = spare;
    if out.len() > n_out {
        out.truncate(n_out);
    } else {
        out.resize(n_out, 0);
    }
    // Origin rows in the output dtype (read straight from the input by the first delta when the
    // dtypes agree, rather than copied first).
    let direct = data.dtype == t.dtype && !t.deltas.is_empty();
    if data.dtype == t.dtype {
        if !direct {
            out[..src_rows * row_bytes].copy_from_slice(data.bytes);
        }
    } else {
        let in_row = cols * data.dtype.size();
        out[..src_rows * row_bytes]
            .par_chunks_mut(row_bytes)
            .zip(data.bytes.par_chunks(in_row))
            .for_each_init(
                || vec![0f32; cols],
                |buf, (o, s)| {
                    widen_row(data.dtype, s, buf);
                    narrow_into(t.dtype, buf, o);
                },
            );
    }
    // Deltas in adapter order, each rounded to the dtype (as merging one adapter at a time does).
    for (di, d) in t.deltas.iter().enumerate() {
        let from_input = direct && di == 0;
        let ad = adapters
            .get(d.adapter)
            .ok_or_else(|| anyhow!("adapter {} missing", d.adapter))?;
        let m = ad
            .modules
            .get(d.module)
            .ok_or_else(|| anyhow!("module {} missing", d.module))?;
        let f = factors(ad, m, d, src_rows, cols)?;
        let dtype = t.dtype;
        let r = f.r;
        // Exact products make mul-then-add and fused multiply-add the same bits: the SIMD
        // kernels then take the fused form (one instruction instead of two per step).
        let fused = !f.exact || kiln_quant::Isa::current() != kiln_quant::Isa::Scalar;
        if dtype == DType::F16 {
            // f16 rows are widened, updated and rounded back inside the kernel
            out[..src_rows * row_bytes]
                .par_chunks_mut(row_bytes * DELTA_ROWS)
                .enumerate()
                .try_for_each(|(ci, o)| -> Result<()> {
                    let n = o.len() / row_bytes;
                    let i0 = ci * DELTA_ROWS;
                    let src = if from_input {
                        Some(
                            data.bytes
                                .get(i0 * row_bytes..(i0 + n) * row_bytes)
                                .ok_or_else(|| anyhow!("tensor {}: input too short", t.name))?,
                        )
                    } else {
                        None
                    };
                    let shape = LowRankShape { rows: n, cols, r };
                    let lf = lowrank::Factors {
                        coef: f.coef.get(i0 * r..(i0 + n) * r).unwrap_or(&[]),
                        basis: &f.basis,
                        scale: f.scale,
                        fused,
                    };
                    if !add_lowrank_f16(shape, src, o, lf) {
                        bail!("tensor {}: LoRA factors do not fit its rows", t.name);
                    }
                    Ok(())
                })?;
            continue;
        }
        out[..src_rows * row_bytes]
            .par_chunks_mut(row_bytes * DELTA_ROWS)
            .enumerate()
            .try_for_each_init(
                || vec![0f32; cols * DELTA_ROWS],
                |w, (ci, o)| -> Result<()> {
                    let n = o.len() / row_bytes;
                    let i0 = ci * DELTA_ROWS;
                    let w = &mut w[..n * cols];
                    let src_rows: &[u8] = if from_input {
                        data.bytes
                            .get(i0 * row_bytes..(i0 + n) * row_bytes)
                            .ok_or_else(|| anyhow!("tensor {}: input too short", t.name))?
                    } else {
                        o
                    };
                    for (src, dst) in src_rows
                        .chunks_exact(row_bytes)
                        .zip(w.chunks_exact_mut(cols))
                    {
                        widen_row(dtype, src, dst);
                    }
                    let shape = LowRankShape { rows: n, cols, r };
                    let lf = lowrank::Factors {
                        coef: f.coef.get(i0 * r..(i0 + n) * r).unwrap_or(&[]),
                        basis: &f.basis,
                        scale: f.scale,
                        fused,
                    };
                    if !add_lowrank(shape, w, lf) {
                        bail!("tensor {}: LoRA factors do not fit its rows", t.name);
                    }
                    for (src, dst) in w.chunks_exact(cols).zip(o.chunks_exact_mut(row_bytes)) {
                        narrow_into(dtype, src, dst);
                    }
                    Ok(())
                },
            )?;
    }
    // Padding rows: the mean of the existing rows (f64 sums, rounded once).
    if rows > src_rows {
        let mut sum = vec![0f64; cols];
        let mut buf = vec![0f32; cols];
        for r in 0..src_rows {
            widen_row(t.dtype, &out[r * row_bytes..(r + 1) * row_bytes], &mut buf);
            for (s, v) in sum.iter_mut().zip(&buf) {
                *s += f64::from(*v);
            }
        }
        let mut mean = vec![0u8; row_bytes];
        match t.dtype {
            DType::F32 => {
                for (s, o) in sum.iter().zip(mean.chunks_exact_mut(4)) {
                    o.copy_from_slice(&((s / src_rows as f64) as f32).to_le_bytes());
                }
            }
            DType::F16 => {
                for (s, o) in sum.iter().zip(mean.chunks_exact_mut(2)) {
                    o.copy_from_slice(&half::f16::from_f64(s / src_rows as f64).to_le_bytes());
                }
            }
            DType::BF16 => {
                for (s, o) in sum.iter().zip(mean.chunks_exact_mut(2)) {
                    o.copy_from_slice(&half::bf16::from_f64(s / src_rows as f64).to_le_bytes());
                }
            }
        }
        for o in out[src_rows * row_bytes..].chunks_exact_mut(row_bytes) {
            o.copy_from_slice(&mean);
        }
    }
    Ok(Cow::Owned(out))
}

/// Reads a tensor's inputs (its source and LoRA factors) into memory ahead of its computation:
/// one byte per page through the maps, so that the kernel's readahead streams the next tensor
/// from disk while the current one is computed and written, instead of the compute threads
/// stalling on page faults. Unknown names are skipped (materialize_into reports them).
pub fn prefetch(t: &Planned, base: &Checkpoint, adapters: &[Adapter]) {
    let touch = |bytes: &[u8]| {
        std::hint::black_box(bytes.iter().step_by(4096).fold(0u8, |a, &b| a ^ b));
    };
    if let Ok((ckpt, name)) = t.source.locate(base, adapters) {
        if let Ok(d) = ckpt.data(name) {
            touch(d.bytes);
        }
    }
    for d in &t.deltas {
        let Some(m) = adapters
            .get(d.adapter)
            .and_then(|a| a.modules.get(d.module).map(|m| (a, m)))
        else {
            continue;
        };
        for name in [&m.1.a, &m.1.b] {
            if let Ok(f) = m.0.ckpt.data(name) {
                touch(f.bytes);
            }
        }
    }
}

/// Releases the pages of a tensor's inputs once it is written.
pub fn release(t: &Planned, base: &Checkpoint, adapters: &[Adapter]) {
    if let Ok((ckpt, name)) = t.source.locate(base, adapters) {
        ckpt.release(name);
    }
}

/// Parses a shard size as transformers does: "5GB", "500MB", "2GiB", "100KB", or bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_uppercase();
    let units: [(&str, u64); 7] = [
        ("GIB", 1 << 30),
        ("MIB", 1 << 20),
        ("KIB", 1 << 10),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("KB", 1_000),
        ("B", 1),
    ];
    for (u, mul) in units {
        if let Some(n) = t.strip_suffix(u) {
            let v: f64 = n.trim().parse().map_err(|_| anyhow!("bad size {s:?}"))?;
            if !(v.is_finite() && v > 0.0) {
                bail!("bad size {s:?}");
            }
            return Ok((v * mul as f64) as u64);
        }
    }
    let v: u64 = t
        .parse()
        .map_err(|_| anyhow!("bad size {s:?} (use e.g. 5GB, 500MB or bytes)"))?;
    if v == 0 {
        bail!("bad size {s:?}");
    }
    Ok(v)
}

/// Groups tensors into shards as huggingface_hub's split_torch_state_dict_into_shards does: in
/// order, a new shard when the next tensor would overflow the current one.
pub fn shard_groups(sizes: &[u64], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut cur_size = 0u64;
    for (i, &s) in sizes.iter().enumerate() {
        if !cur.is_empty() && cur_size + s > max {
            shards.push(std::mem::take(&mut cur));
            cur_size = 0;
        }
        cur.push(i);
        cur_size += s;
    }
    if !cur.is_empty() {
        shards.push(cur);
    }
    shards
}

/// Names of tensors by dtype alignment, then name, as safetensors' serializer orders the data.
pub fn safetensors_order(items: &[(&str, DType)]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..items.len()).collect();
    idx.sort_by(|&x, &y| {
        let (nx, dx) = items[x];
        let (ny, dy) = items[y];
        dy.size().cmp(&dx.size()).then(nx.cmp(ny))
    });
    idx
}

/// The safetensors header (8-byte length + JSON padded with spaces to 8 bytes) for tensors in the
/// given data order; returns the header bytes and each tensor's data offset from the file start.
pub fn safetensors_header(tensors: &[(&str, DType, &[usize])]) -> Result<(Vec<u8>, Vec<u64>)> {
    let mut m = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    m.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut off = 0u64;
    let mut rel = Vec::with_capacity(tensors.len());
    for (name, dt, shape) in tensors {
        let n = shape.iter().product::<usize>() as u64 * dt.size() as u64;
        rel.push(off);
        m.insert(
            (*name).to_string(),
            serde_json::json!({"dtype": dt.name(), "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(m))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut header = (json.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(&json);
    let base = header.len() as u64;
    Ok((header, rel.into_iter().map(|o| o + base).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_f16_conversions_equal_the_scalar_ones() {
        // every f16 bit pattern (widen), then f32 values around every f16 (narrow: ties, halfway
        // points, subnormals, overflow, NaN), in a length that leaves a remainder block
        let bytes: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
        let n = bytes.len() / 2 - 7;
        let mut wide = vec![0f32; n];
        widen_row(DType::F16, &bytes[..2 * n], &mut wide);
        for (i, w) in wide.iter().enumerate() {
            let want = half::f16::from_bits(i as u16).to_f32();
            assert_eq!(w.to_bits(), want.to_bits(), "f16 {i:#06x}");
        }
        let mut vals: Vec<f32> = Vec::new();
        for b in (0..=u16::MAX).step_by(3) {
            let x = half::f16::from_bits(b).to_f32();
            let u = x.to_bits();
            vals.extend([
                x,
                f32::from_bits(u ^ 0x1000),
                f32::from_bits(u.wrapping_add(0xfff)),
            ]);
            vals.push(f32::from_bits(u.wrapping_add(0x1000)));
        }
        vals.extend([1e9, -1e9, 65520.0, 65519.0, f32::NAN, 1e-9, -0.0]);
        vals.truncate(vals.len() / 64 * 64 + 13);
        let mut out = vec![0u8; vals.len() * 2];
        narrow_into(DType::F16, &vals, &mut out);
        for (v, o) in vals.iter().zip(out.chunks_exact(2)) {
            let want = half::f16::from_f32(*v).to_bits();
            assert_eq!(
                u16::from_le_bytes([o[0], o[1]]),
                want,
                "f32 {v:e} ({:#x})",
                v.to_bits()
            );
        }
    }

    #[test]
    fn key_forms() {
        assert!(matches!(
            classify("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Key::LoraA(m) if m == "model.layers.0.self_attn.q_proj"
        ));
        assert!(matches!(
            classify("base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight"),
            Key::LoraB(m) if m == "model.layers.0.mlp.up_proj"
        ));
        assert!(
            matches!(classify("base_model.model.model.embed_tokens.weight"), Key::Full(n) if n == EMBED)
        );
        assert!(matches!(
            classify("base_model.model.lm_head.modules_to_save.default.weight"),
            Key::Full(n) if n == HEAD
        ));
        assert!(
            matches!(classify("base_model.model.model.embed_tokens.base_layer.weight"), Key::Full(n) if n == EMBED)
        );
        assert!(matches!(
            classify("base_model.model.model.embed_tokens.original_module.weight"),
            Key::Ignore
        ));
        assert!(matches!(
            classify("base_model.model.model.embed_tokens.lora_embedding_A"),
            Key::EmbA(m) if m == "model.embed_tokens"
        ));
        assert!(matches!(
            classify("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"),
            Key::Dora
        ));
        assert!(matches!(
            classify("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"),
            Key::Bias
        ));
        assert!(matches!(classify("something"), Key::Unknown));
    }

    #[test]
    fn sizes_and_shards() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("100kb").unwrap(), 100_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(
            parse_size("x").is_err() && parse_size("0").is_err() && parse_size("-1GB").is_err()
        );
        assert_eq!(
            shard_groups(&[5, 5, 5, 20, 1], 10),
            vec![vec![0, 1], vec![2], vec![3], vec![4]]
        );
    }

    #[test]
    fn exactness_of_products() {
        let f16ish: Vec<f32> = [0.01f32, -0.02, 0.5]
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect();
        assert!(products_exact(&f16ish, &f16ish));
        assert!(!products_exact(&[0.1f32], &[0.3f32]));
        assert!(!products_exact(&[1e-30f32], &[1e-30f32]));
        assert_eq!(sig_bits(1.0), 1);
        assert_eq!(sig_bits(1.5), 2);
    }

    #[test]
    fn delta_row_matches_fma_reference() {
        // Non-exact f32 factors take the fused path: acc = fma(c_k, b_kj, acc), k ascending.
        let f = Factors {
            r: 3,
            coef: vec![0.1, 0.2, 0.3],
            basis: vec![0.7, 0.11, 0.13, 0.17, 0.19, 0.23],
            scale: 2.0,
            exact: false,
        };
        let mut w = vec![1.0f32, 2.0];
        let shape = LowRankShape {
            rows: 1,
            cols: 2,
            r: f.r,
        };
        let lf = lowrank::Factors {
            coef: &f.coef,
            basis: &f.basis,
            scale: f.scale,
            fused: !f.exact,
        };
        assert!(add_lowrank(shape, &mut w, lf));
        for j in 0..2 {
            let mut a = 0f32;
            for k in 0..3 {
                a = f.coef[k].mul_add(f.basis[k * 2 + j], a);
            }
            assert_eq!(w[j], [1.0f32, 2.0][j] + 2.0 * a);
        }
    }

    #[test]
    fn families() {
        assert_eq!(family("meta-llama/Llama-2-7b-hf"), Some("llama-2"));
        assert_eq!(family("Qwen/Qwen-7B"), Some("qwen"));
        assert_eq!(size_tag("Llama-2-13b-hf").as_deref(), Some("13b"));
        assert_eq!(size_tag("llama-2-7b").as_deref(), Some("7b"));
    }
}
