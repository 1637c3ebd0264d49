//! HF Llama checkpoint to GGUF, as llama.cpp's convert_hf_to_gguf.py does it (spec §1.4, §2):
//! metadata keys, the SentencePiece vocabulary, tensor names, the Q/K row permutation and the
//! dtype rules. The tensor encoder is shared with `kiln merge`.

use crate::progress::{Progress, Unit};
use crate::shape::ModelShape;
use anyhow::{anyhow, bail, Context, Result};
use kiln_formats::checkpoint::{Checkpoint, DType, TensorData};
use kiln_formats::gguf::{GgufArray, GgufValue, GgufWriter};
use kiln_formats::hf::{LlamaConfig, TokenizerConfig};
use kiln_formats::sentencepiece::{PieceType, SpModel};
use kiln_quant::GgmlType;
use std::path::{Path, PathBuf};

/// Options of [`convert`].
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Hugging Face model folder (config.json, tokenizer.model, weights).
    pub hf_dir: PathBuf,
    /// Output GGUF file.
    pub out: PathBuf,
    /// Type of the 2-D weights (norms stay F32).
    pub outtype: OutType,
    /// Folder with tokenizer.model and tokenizer_config.json, if not the model folder.
    pub tokenizer_dir: Option<PathBuf>,
    /// general.name (default: the folder's name).
    pub name: Option<String>,
}

impl ConvertOptions {
    /// `hf_dir` to `out` as F16.
    pub fn new(hf_dir: PathBuf, out: PathBuf) -> ConvertOptions {
        ConvertOptions {
            hf_dir,
            out,
            outtype: OutType::F16,
            tokenizer_dir: None,
            name: None,
        }
    }
}

/// What [`convert`] wrote.
#[derive(Clone, Debug)]
pub struct ConvertDone {
    pub n_tensors: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
    /// The checkpoint format read ("safetensors", "pytorch").
    pub format: &'static str,
}

/// Converts a Hugging Face Llama folder (safetensors or .bin, single or sharded) to GGUF, one
/// tensor at a time; the output appears only when complete.
pub fn convert(o: &ConvertOptions, progress: &dyn Progress) -> Result<ConvertDone> {
    let cfg_path = o.hf_dir.join("config.json");
    let cfg =
        LlamaConfig::load(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
    let dims = ModelShape::from_hf(&cfg).with_context(|| cfg_path.display().to_string())?;
    let ckpt = Checkpoint::open(&o.hf_dir)
        .with_context(|| format!("opening the weights in {}", o.hf_dir.display()))?;
    let source = o.hf_dir.display().to_string();
    let jobs = plan_tensors(&dims, &checkpoint_shapes(&ckpt), o.outtype.ggml(), &source)?;
    let name = o.name.clone().unwrap_or_else(|| {
        o.hf_dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into())
    });
    let mut meta = model_metadata(&cfg, &dims, &name, o.outtype.file_type());
    let tok_dir = o.tokenizer_dir.as_ref().unwrap_or(&o.hf_dir);
    meta.extend(vocab_metadata(tok_dir, &cfg, dims.n_vocab)?);

    let infos: Vec<(String, Vec<u64>, GgmlType)> = jobs
        .iter()
        .map(|j| (j.gguf_name.clone(), j.ne.clone(), j.ty))
        .collect();
    let mut w = GgufWriter::create(&o.out, &meta, &infos)
        .with_context(|| format!("creating {}", o.out.display()))?;
    let total: u64 = jobs.iter().map(|j| j.n_bytes()).sum();
    let bar = progress.bar(total, Unit::Bytes);
    for job in &jobs {
        bar.set_message(&job.gguf_name);
        let data = ckpt.data(&job.hf_name)?;
        let unchanged = job.permute_heads.is_none() && ggml_of(data.dtype) == job.ty;
        // Unchanged tensors go from the input map straight to the file; the rest are re-encoded.
        let encoded;
        let bytes = if unchanged {
            data.bytes
        } else {
            encoded = encode_tensor(job, &data)?;
            &encoded[..]
        };
        w.write_tensor(&job.gguf_name, bytes)
            .with_context(|| format!("writing {}", o.out.display()))?;
        bar.inc(bytes.len() as u64);
        ckpt.release(&job.hf_name);
    }
    w.finish()
        .with_context(|| format!("finishing {}", o.out.display()))?;
    bar.finish();
    Ok(ConvertDone {
        n_tensors: jobs.len(),
        bytes: total,
        format: ckpt.format(),
    })
}

/// `--outtype` of `kiln convert`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutType {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
}

impl OutType {
    pub fn ggml(self) -> GgmlType {
        match self {
            OutType::F32 => GgmlType::F32,
            OutType::F16 => GgmlType::F16,
            OutType::Bf16 => GgmlType::BF16,
            OutType::Q8_0 => GgmlType::Q8_0,
        }
    }
    /// `general.file_type` of a converted file.
    pub fn file_type(self) -> u32 {
        match self {
            OutType::F32 => 0,
            OutType::F16 => 1,
            OutType::Bf16 => 32,
            OutType::Q8_0 => 7,
        }
    }
}

/// One tensor of the output: where it comes from, its GGUF name, shape and type.
#[derive(Clone, Debug)]
pub struct TensorJob {
    pub hf_name: String,
    pub gguf_name: String,
    /// HF (PyTorch) shape, rows first.
    pub hf_shape: Vec<usize>,
    /// ggml ne, innermost first.
    pub ne: Vec<u64>,
    pub ty: GgmlType,
    /// Number of heads for the Q/K row permutation, if this tensor is permuted.
    pub permute_heads: Option<usize>,
}

impl TensorJob {
    pub fn rows(&self) -> usize {
        if self.hf_shape.len() >= 2 {
            self.hf_shape[0]
        } else {
            1
        }
    }
    pub fn cols(&self) -> usize {
        self.hf_shape.last().copied().unwrap_or(1)
    }
    pub fn n_bytes(&self) -> u64 {
        self.ty.row_size(self.cols() as u64).unwrap_or(0) * self.rows() as u64
    }
}

/// True for HF tensors the converter drops.
pub fn is_dropped(hf_name: &str) -> bool {
    hf_name.ends_with(".rotary_emb.inv_freq")
        || hf_name.ends_with(".attention.masked_bias")
        || hf_name.ends_with(".attention.bias")
}

/// The GGUF name of a Llama HF tensor.
pub fn gguf_name(hf_name: &str) -> Option<String> {
    match hf_name {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let l: usize = layer.parse().ok()?;
    let g = match suffix {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{l}.{g}"))
}

/// The output type of one tensor (spec §2): 1-D tensors, norms and non-`.weight` names are F32.
pub fn tensor_type(gguf_name: &str, n_dims: usize, out: GgmlType) -> GgmlType {
    if n_dims <= 1 || gguf_name.ends_with("_norm.weight") || !gguf_name.ends_with(".weight") {
        GgmlType::F32
    } else {
        out
    }
}

/// Plans the output tensors from a checkpoint's tensor list: every Llama tensor present with the
/// shape config.json implies, nothing unknown, in llama.cpp's loader order.
pub fn plan_tensors(
    dims: &ModelShape,
    tensors: &[(String, Vec<usize>)],
    out: GgmlType,
    source: &str,
) -> Result<Vec<TensorJob>> {
    let mut jobs = Vec::new();
    for (name, shape) in tensors {
        if is_dropped(name) {
            continue;
        }
        let g = gguf_name(name).ok_or_else(|| {
            anyhow!("{source}: tensor {name} is not a Llama tensor kiln knows how to convert")
        })?;
        let want = dims.expected_shape(name).ok_or_else(|| {
            anyhow!(
                "{source}: tensor {name} has a layer index beyond num_hidden_layers={}",
                dims.n_layer
            )
        })?;
        if *shape != want {
            bail!(
                "{source}: tensor {name} has shape {shape:?}, but config.json implies {want:?}{}",
                if name.contains("embed_tokens") || name == "lm_head.weight" {
                    " (vocab_size × hidden_size): the embedding rows must equal config.json's vocab_size"
                } else {
                    ""
                }
            );
        }
        let permute_heads = if name.ends_with("self_attn.q_proj.weight") {
            Some(dims.n_head)
        } else if name.ends_with("self_attn.k_proj.weight") {
            Some(dims.n_head_kv)
        } else {
            None
        };
        let ne: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let ty = tensor_type(&g, shape.len(), out);
        if ty.row_size(ne[0]).is_none() {
            bail!(
                "{source}: tensor {name} has rows of {} values, not a multiple of {}'s block of {}",
                ne[0],
                ty,
                ty.block_size()
            );
        }
        jobs.push(TensorJob {
            hf_name: name.clone(),
            gguf_name: g,
            hf_shape: shape.clone(),
            ne,
            ty,
            permute_heads,
        });
    }
    // Every tensor the model needs must be there.
    let have: std::collections::HashSet<&str> = jobs.iter().map(|j| j.hf_name.as_str()).collect();
    let mut required = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
    ];
    if !dims.tied {
        required.push("lm_head.weight".into());
    }
    for l in 0..dims.n_layer {
        for s in [
            "input_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "post_attention_layernorm.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ] {
            required.push(format!("model.layers.{l}.{s}"));
        }
    }
    if let Some(missing) = required.iter().find(|r| !have.contains(r.as_str())) {
        bail!(
            "{source}: tensor {missing} is missing (config.json describes {} layers)",
            dims.n_layer
        );
    }
    jobs.sort_by(|a, b| {
        crate::quant_plan::loader_order_key(&a.gguf_name)
            .cmp(&crate::quant_plan::loader_order_key(&b.gguf_name))
    });
    Ok(jobs)
}

/// The HF row that lands at GGUF row `r` under the Q/K permutation with `nh` heads.
#[inline]
pub fn permuted_source_row(r: usize, rows: usize, nh: usize) -> usize {
    let hd = rows / nh;
    let half = hd / 2;
    let (h, within) = (r / hd, r % hd);
    let (j, k) = (within / 2, within % 2);
    h * hd + k * half + j
}

/// The ggml type holding a checkpoint dtype's values unchanged.
pub fn ggml_of(dtype: DType) -> GgmlType {
    match dtype {
        DType::F32 => GgmlType::F32,
        DType::F16 => GgmlType::F16,
        DType::BF16 => GgmlType::BF16,
    }
}

/// Encodes a whole tensor into its GGUF bytes: row permutation (Q/K), dtype conversion
/// (f16/bf16 round to nearest even), or quantization, rows in parallel.
pub fn encode_tensor(job: &TensorJob, data: &TensorData<'_>) -> Result<Vec<u8>> {
    let rows = job.rows();
    let permute = |r: usize| match job.permute_heads {
        Some(nh) => permuted_source_row(r, rows, nh),
        None => r,
    };
    crate::transcode::transcode(
        crate::transcode::Recode {
            tensor: &job.hf_name,
            src_ty: ggml_of(data.dtype),
            dst_ty: job.ty,
            rows,
            cols: job.cols(),
        },
        data.bytes,
        &permute,
    )
}

/// Reads the checkpoint's tensor list as (name, shape) pairs.
pub fn checkpoint_shapes(ckpt: &Checkpoint) -> Vec<(String, Vec<usize>)> {
    ckpt.tensors()
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect()
}

/// The `general.*` and `llama.*` keys of a converted model, in convert_hf_to_gguf's order.
pub fn model_metadata(
    cfg: &LlamaConfig,
    dims: &ModelShape,
    name: &str,
    file_type: u32,
) -> Vec<(String, GgufValue)> {
    let mut m: Vec<(String, GgufValue)> = Vec::new();
    let mut put = |k: &str, v: GgufValue| m.push((k.to_string(), v));
    put("general.architecture", GgufValue::String("llama".into()));
    put("general.type", GgufValue::String("model".into()));
    put("general.name", GgufValue::String(name.into()));
    put("llama.block_count", GgufValue::U32(dims.n_layer as u32));
    put(
        "llama.context_length",
        GgufValue::U32(cfg.max_position_embeddings as u32),
    );
    put("llama.embedding_length", GgufValue::U32(dims.n_embd as u32));
    put(
        "llama.feed_forward_length",
        GgufValue::U32(dims.n_ff as u32),
    );
    put(
        "llama.attention.head_count",
        GgufValue::U32(dims.n_head as u32),
    );
    put(
        "llama.attention.head_count_kv",
        GgufValue::U32(dims.n_head_kv as u32),
    );
    if let Some(theta) = rope_theta(cfg) {
        put("llama.rope.freq_base", GgufValue::F32(theta as f32));
    }
    if let Some((kind, factor)) = rope_scaling(cfg) {
        put("llama.rope.scaling.type", GgufValue::String(kind));
        put("llama.rope.scaling.factor", GgufValue::F32(factor as f32));
    }
    put(
        "llama.attention.layer_norm_rms_epsilon",
        GgufValue::F32(cfg.rms_norm_eps as f32),
    );
    if cfg.head_dim.is_some() {
        put(
            "llama.attention.key_length",
            GgufValue::U32(dims.head_dim as u32),
        );
        put(
            "llama.attention.value_length",
            GgufValue::U32(dims.head_dim as u32),
        );
    }
    put("general.file_type", GgufValue::U32(file_type));
    put("llama.vocab_size", GgufValue::U32(dims.n_vocab as u32));
    put(
        "llama.rope.dimension_count",
        GgufValue::U32(dims.head_dim as u32),
    );
    put("general.quantization_version", GgufValue::U32(2));
    m
}

fn raw_f64(cfg: &LlamaConfig, path: &[&str]) -> Option<f64> {
    let mut v = cfg.raw.get(path[0])?;
    for p in &path[1..] {
        v = v.get(p)?;
    }
    v.as_f64()
}

/// rope_theta, or the newer `rope_parameters.rope_theta`.
pub fn rope_theta(cfg: &LlamaConfig) -> Option<f64> {
    raw_f64(cfg, &["rope_theta"]).or_else(|| raw_f64(cfg, &["rope_parameters", "rope_theta"]))
}

/// ("linear" | "yarn", factor) when config.json asks for that rope scaling.
pub fn rope_scaling(cfg: &LlamaConfig) -> Option<(String, f64)> {
    let rs = cfg.raw.get("rope_scaling")?;
    let kind = rs
        .get("type")
        .or_else(|| rs.get("rope_type"))
        .and_then(|v| v.as_str())?;
    let factor = rs.get("factor").and_then(|v| v.as_f64())?;
    matches!(kind, "linear" | "yarn").then(|| (kind.to_string(), factor))
}

/// The `tokenizer.ggml.*` keys for a SentencePiece Llama vocabulary of `n_vocab` entries, from the
/// tokenizer files in `tok_dir` and the special token ids of config.json (spec §1.4).
pub fn vocab_metadata(
    tok_dir: &Path,
    cfg: &LlamaConfig,
    n_vocab: usize,
) -> Result<Vec<(String, GgufValue)>> {
    let sp_path = tok_dir.join("tokenizer.model");
    let sp = SpModel::open(&sp_path).with_context(|| format!("reading {}", sp_path.display()))?;
    if sp.pieces.len() > n_vocab {
        bail!(
            "{}: the tokenizer has {} pieces but the model's vocab_size is {n_vocab}: the embeddings \
             (embed_tokens / lm_head) must have one row per piece; for a LoRA that extends the \
             vocabulary, merge it first (kiln merge) so the embeddings grow with it",
            sp_path.display(),
            sp.pieces.len()
        );
    }
    let mut tokens: Vec<String> = (0..n_vocab).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000.0f32; n_vocab];
    let mut types = vec![5i32; n_vocab];
    for (i, p) in sp.pieces.iter().enumerate() {
        tokens[i] = p.piece.clone();
        scores[i] = p.score;
        types[i] = match p.kind {
            PieceType::Unknown => 2,
            PieceType::Control => 3,
            PieceType::Unused => 5,
            PieceType::Byte => 6,
            _ => 1,
        };
    }
    let added_path = tok_dir.join("added_tokens.json");
    if added_path.is_file() {
        let text = std::fs::read_to_string(&added_path)
            .with_context(|| format!("reading {}", added_path.display()))?;
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
            .with_context(|| {
                format!("{}: not a JSON object of token -> id", added_path.display())
            })?;
        for (text, id) in map {
            let id = id.as_u64().ok_or_else(|| {
                anyhow!("{}: id of {text:?} is not an integer", added_path.display())
            })? as usize;
            if id >= n_vocab {
                bail!(
                    "{}: token {text:?} has id {id} ≥ vocab_size {n_vocab}",
                    added_path.display()
                );
            }
            tokens[id] = text;
            scores[id] = -1000.0;
            types[id] = 4;
        }
    }
    let tc_path = tok_dir.join("tokenizer_config.json");
    let tc = if tc_path.is_file() {
        Some(
            TokenizerConfig::load(&tc_path)
                .with_context(|| format!("reading {}", tc_path.display()))?,
        )
    } else {
        None
    };
    if let Some(tc) = &tc {
        for (id, tok) in tc.added_tokens_decoder.iter() {
            let id: usize = match id.parse() {
                Ok(v) if v < n_vocab => v,
                _ => continue,
            };
            let looks_special = tok.content.starts_with("<|") && tok.content.ends_with("|>");
            scores[id] = -1000.0;
            if tok.special || looks_special {
                tokens[id] = tok.content.clone();
                types[id] = 3;
            } else {
                tokens[id] = tok.content.replace('\u{2581}', " ");
                types[id] = 4;
            }
        }
    }
    let mut m: Vec<(String, GgufValue)> = Vec::new();
    if let Some(asp) = tc.as_ref().and_then(|t| t.add_prefix_space) {
        m.push((
            "tokenizer.ggml.add_space_prefix".into(),
            GgufValue::Bool(asp),
        ));
    }
    m.push((
        "tokenizer.ggml.model".into(),
        GgufValue::String("llama".into()),
    ));
    m.push((
        "tokenizer.ggml.pre".into(),
        GgufValue::String("default".into()),
    ));
    m.push((
        "tokenizer.ggml.tokens".into(),
        GgufValue::Array(GgufArray::String(tokens)),
    ));
    m.push((
        "tokenizer.ggml.scores".into(),
        GgufValue::Array(GgufArray::F32(scores)),
    ));
    m.push((
        "tokenizer.ggml.token_type".into(),
        GgufValue::Array(GgufArray::I32(types)),
    ));
    let special = SpecialTokens::resolve(tok_dir, tc_path.is_file(), cfg, n_vocab)?;
    for (key, id) in &special.ids {
        m.push((format!("tokenizer.ggml.{key}"), GgufValue::U32(*id)));
    }
    if let Some(b) = special.add_bos {
        m.push(("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(b)));
    }
    if let Some(e) = special.add_eos {
        m.push(("tokenizer.ggml.add_eos_token".into(), GgufValue::Bool(e)));
    }
    if let Some(t) = tc.as_ref().and_then(|t| t.chat_template.clone()) {
        m.push(("tokenizer.chat_template".into(), GgufValue::String(t)));
    }
    Ok(m)
}

/// Special token ids and add-BOS/EOS flags as gguf-py's `SpecialVocab` finds them: ids of the
/// tokenizer_config `*_token` contents among tokenizer.json's added tokens, then config.json's
/// `*_token_id` for the ones still missing; flags from tokenizer.json's TemplateProcessing, then
/// tokenizer_config's `add_bos_token` / `add_eos_token`.
pub struct SpecialTokens {
    pub ids: Vec<(&'static str, u32)>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
}

const SPECIAL_KINDS: [(&str, &str); 4] = [
    ("bos", "bos_token_id"),
    ("eos", "eos_token_id"),
    ("unk", "unknown_token_id"),
    ("pad", "padding_token_id"),
];

impl SpecialTokens {
    pub fn resolve(
        tok_dir: &Path,
        has_tc: bool,
        cfg: &LlamaConfig,
        n_vocab: usize,
    ) -> Result<SpecialTokens> {
        let read = |p: &Path| -> Result<serde_json::Value> {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", p.display()))
        };
        let tj_path = tok_dir.join("tokenizer.json");
        let tj = if tj_path.is_file() {
            Some(read(&tj_path)?)
        } else {
            None
        };
        let tc = if has_tc {
            Some(read(&tok_dir.join("tokenizer_config.json"))?)
        } else {
            None
        };
        let content = |kind: &str| -> Option<String> {
            let v = tc.as_ref()?.get(format!("{kind}_token"))?;
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.get("content")?.as_str().map(str::to_string))
        };
        let mut found: Vec<(&'static str, i64)> = Vec::new();
        let mut add_bos = None;
        let mut add_eos = None;
        if let Some(tj) = &tj {
            let added = tj
                .get("added_tokens")
                .and_then(|a| a.as_array())
                .cloned()
                .unwrap_or_default();
            for (kind, key) in SPECIAL_KINDS {
                if let Some(c) = content(kind) {
                    let id = added
                        .iter()
                        .find(|t| t.get("content").and_then(|x| x.as_str()) == Some(c.as_str()))
                        .and_then(|t| t.get("id")?.as_i64());
                    if let Some(id) = id {
                        found.push((key, id));
                    }
                }
            }
            if let Some(single) = tj
                .pointer("/post_processor/single")
                .and_then(|s| s.as_array())
                .filter(|s| s.len() > 1)
            {
                let special = |v: &serde_json::Value| {
                    v.pointer("/SpecialToken/id")
                        .and_then(|x| x.as_str())
                        .map(str::to_string)
                };
                if let Some(first) = single.first().and_then(special) {
                    add_bos = Some(Some(first) == content("bos"));
                }
                if let Some(last) = single.last().and_then(special) {
                    add_eos = Some(Some(last) == content("eos"));
                }
            }
        }
        if let Some(tc) = &tc {
            add_bos = add_bos.or(tc.get("add_bos_token").and_then(|v| v.as_bool()));
            add_eos = add_eos.or(tc.get("add_eos_token").and_then(|v| v.as_bool()));
        }
        for (kind, key) in SPECIAL_KINDS {
            if found.iter().any(|(k, _)| *k == key) {
                continue;
            }
            let v = cfg.raw.get(&format!("{kind}_token_id"));
            if let Some(id) = v.and_then(|v| v.as_i64()) {
                found.push((key, id));
            }
        }
        let ids = found
            .into_iter()
            .filter(|(_, id)| *id >= 0 && (*id as usize) < n_vocab)
            .map(|(k, id)| (k, id as u32))
            .collect();
        Ok(SpecialTokens {
            ids,
            add_bos,
            add_eos,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_matches_numpy_reshape_swapaxes() {
        // numpy: reshape(nh, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)
        let (rows, nh) = (16, 2);
        let hd = rows / nh;
        let half = hd / 2;
        let mut expect = Vec::new();
        for h in 0..nh {
            for j in 0..half {
                for k in 0..2 {
                    expect.push(h * hd + k * half + j);
                }
            }
        }
        let got: Vec<usize> = (0..rows)
            .map(|r| permuted_source_row(r, rows, nh))
            .collect();
        assert_eq!(got, expect);
    }

    #[test]
    fn names_and_types() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.k_proj.weight").unwrap(),
            "blk.3.attn_k.weight"
        );
        assert_eq!(gguf_name("lm_head.weight").unwrap(), "output.weight");
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
        assert!(is_dropped("model.layers.0.self_attn.rotary_emb.inv_freq"));
        assert_eq!(
            tensor_type("blk.0.attn_norm.weight", 1, GgmlType::F16),
            GgmlType::F32
        );
        assert_eq!(
            tensor_type("blk.0.attn_q.weight", 2, GgmlType::Q8_0),
            GgmlType::Q8_0
        );
    }
}
