//! The one model-shape type: a Llama model's dimensions, read from a Hugging Face `config.json`
//! or from GGUF metadata, with the checks in one place. Converting, merging, planning a
//! quantization and evaluating all take their sizes from a [`ModelShape`].

use anyhow::{bail, Context, Result};
use kiln_formats::gguf::GgufHeader;
use kiln_formats::hf::LlamaConfig;

/// Upper bound on any one dimension read from metadata (guards allocations).
const MAX_DIM: usize = 1 << 24;

/// A Llama model's dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelShape {
    /// Tokens (rows of the embedding table).
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// The output head is the embedding table (no `lm_head` / `output.weight`).
    pub tied: bool,
}

/// A dimension-like metadata value: a non-negative integer no larger than 2^24.
pub(crate) fn meta_usize(h: &GgufHeader, key: &str) -> Result<Option<usize>> {
    match h.get(key) {
        None => Ok(None),
        Some(v) => {
            let n = v
                .as_u64()
                .with_context(|| format!("metadata {key} is not a non-negative integer"))?;
            let n = usize::try_from(n)
                .ok()
                .filter(|&n| n <= MAX_DIM)
                .with_context(|| format!("metadata {key} = {n} is out of range"))?;
            Ok(Some(n))
        }
    }
}

impl ModelShape {
    /// The shape a Hugging Face `config.json` describes.
    pub fn from_hf(cfg: &LlamaConfig) -> Result<ModelShape> {
        let n_head = cfg.num_attention_heads as usize;
        let n_embd = cfg.hidden_size as usize;
        if n_head == 0 || n_embd == 0 {
            bail!("config.json: hidden_size and num_attention_heads must be positive");
        }
        let head_dim = cfg.head_dim.map(|h| h as usize).unwrap_or(n_embd / n_head);
        Ok(ModelShape {
            n_vocab: cfg.vocab_size as usize,
            n_embd,
            n_layer: cfg.num_hidden_layers as usize,
            n_ff: cfg.intermediate_size as usize,
            n_head,
            n_head_kv: cfg
                .num_key_value_heads
                .map(|v| v as usize)
                .unwrap_or(n_head),
            head_dim,
            tied: cfg.tie_word_embeddings,
        })
    }

    /// The shape a GGUF's metadata describes; errors name the missing or bad key. Only the
    /// `llama` architecture is supported.
    pub fn from_gguf(h: &GgufHeader) -> Result<ModelShape> {
        let arch = h
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .context("general.architecture is missing")?;
        if arch != "llama" {
            bail!("unsupported architecture '{arch}' (kiln handles llama models only)");
        }
        let need = |k: &str| -> Result<usize> {
            meta_usize(h, k)?.with_context(|| format!("metadata {k} is missing"))
        };
        let n_embd = need("llama.embedding_length")?;
        let n_layer = need("llama.block_count")?;
        let n_ff = need("llama.feed_forward_length")?;
        let n_head = need("llama.attention.head_count")?;
        let n_head_kv = meta_usize(h, "llama.attention.head_count_kv")?.unwrap_or(n_head);
        if n_embd == 0 || n_head == 0 || n_head_kv == 0 || n_layer == 0 || n_ff == 0 {
            bail!("model dimensions must be non-zero");
        }
        if n_embd % n_head != 0 || n_head % n_head_kv != 0 {
            bail!(
                "head counts do not divide: n_embd {n_embd}, n_head {n_head}, n_head_kv {n_head_kv}"
            );
        }
        let tok = h
            .tensor("token_embd.weight")
            .context("tensor token_embd.weight is missing")?;
        let n_vocab = usize::try_from(tok.n_rows()).context("vocabulary too large")?;
        Ok(ModelShape {
            n_vocab,
            n_embd,
            n_layer,
            n_ff,
            n_head,
            n_head_kv,
            head_dim: n_embd / n_head,
            tied: h.tensor("output.weight").is_none(),
        })
    }

    /// Width of the K and V rows: `n_head_kv * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Width of the Q rows: `n_head * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Query heads per KV head (1 when the counts do not divide).
    pub fn gqa(&self) -> usize {
        self.n_head.checked_div(self.n_head_kv).unwrap_or(1)
    }

    /// llama.cpp's LLM_TYPE_70B test for arch llama (some quantization mixes depend on it).
    pub fn is_70b(&self) -> bool {
        self.n_layer == 80 && self.n_head != self.n_head_kv
    }

    /// The HF shape a Llama tensor must have, or None for a name that is not a Llama tensor.
    pub fn expected_shape(&self, hf_name: &str) -> Option<Vec<usize>> {
        let (e, f) = (self.n_embd, self.n_ff);
        Some(match hf_name {
            "model.embed_tokens.weight" | "lm_head.weight" => vec![self.n_vocab, e],
            "model.norm.weight" => vec![e],
            _ => {
                let rest = hf_name.strip_prefix("model.layers.")?;
                let (layer, suffix) = rest.split_once('.')?;
                let l: usize = layer.parse().ok()?;
                if l >= self.n_layer {
                    return None;
                }
                match suffix {
                    "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![e],
                    "self_attn.q_proj.weight" => vec![self.q_dim(), e],
                    "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => {
                        vec![self.kv_dim(), e]
                    }
                    "self_attn.o_proj.weight" => vec![e, self.q_dim()],
                    "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![f, e],
                    "mlp.down_proj.weight" => vec![e, f],
                    _ => return None,
                }
            }
        })
    }
}
