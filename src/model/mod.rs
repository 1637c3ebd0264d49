//! The Llama forward pass over GGUF weights of any supported type, written once over a small
//! [`Backend`] trait (the CPU backend is [`cpu::CpuBackend`]; a CUDA backend can follow).
//!
//! The graph is llama.cpp's `llm_build_llama`: RMSNorm (the file's epsilon), Q/K/V projections,
//! normal-mode RoPE (adjacent pairs; the converter permuted Q and K), grouped-query causal attention
//! over an f16 KV cache with scale 1/sqrt(head_dim), the output projection and residual, RMSNorm,
//! SwiGLU feed-forward and residual, and finally RMSNorm and the output head.

pub mod cpu;
pub mod cuda;
pub mod device;

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use kiln_formats::gguf::{GgufFile, GgufHeader, TensorInfo};

use crate::shape::meta_usize;
pub use crate::shape::ModelShape;

/// Hyper-parameters of a Llama model for evaluation, from GGUF metadata: its [`ModelShape`]
/// and what the forward pass needs beyond it.
#[derive(Clone, Debug, PartialEq)]
pub struct Hparams {
    pub shape: ModelShape,
    /// Rotated dimensions per head (`llama.rope.dimension_count`, default head_dim).
    pub n_rot: usize,
    pub rms_eps: f32,
    pub rope: Rope,
    /// `llama.context_length`.
    pub n_ctx_train: usize,
}

/// RoPE parameters (normal mode).
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub freq_base: f32,
    /// 1/linear scale factor (1.0 when unscaled).
    pub freq_scale: f32,
    /// Per-pair frequency divisors from the `rope_freqs.weight` tensor (`n_rot / 2` values; the
    /// Llama-3.1 "llama3" rope scaling as convert_hf_to_gguf writes it), as ggml's
    /// `ggml_rope_ext` applies them: the angle of pair `i` is `freq_scale * (theta_i / f[i])`.
    pub factors: Option<std::sync::Arc<[f32]>>,
}

fn meta_f32(h: &GgufHeader, key: &str) -> Result<Option<f32>> {
    match h.get(key) {
        None => Ok(None),
        Some(v) => {
            Ok(Some(v.as_f32().with_context(|| {
                format!("metadata {key} is not a float")
            })?))
        }
    }
}

impl Hparams {
    /// Reads the hyper-parameters; errors name the missing or bad key. Only `llama` is supported.
    pub fn from_gguf(h: &GgufHeader) -> Result<Hparams> {
        let shape = ModelShape::from_gguf(h)?;
        let head_dim = shape.head_dim;
        let n_rot = meta_usize(h, "llama.rope.dimension_count")?.unwrap_or(head_dim);
        if n_rot > head_dim || n_rot % 2 != 0 {
            bail!("llama.rope.dimension_count {n_rot} does not fit head dimension {head_dim}");
        }
        let rms_eps = meta_f32(h, "llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5);
        let freq_base = meta_f32(h, "llama.rope.freq_base")?.unwrap_or(10000.0);
        let scaling = h.get("llama.rope.scaling.type").and_then(|v| v.as_str());
        let factor = meta_f32(h, "llama.rope.scaling.factor")?
            .or(meta_f32(h, "llama.rope.scale_linear")?)
            .unwrap_or(0.0);
        let freq_scale = match scaling {
            Some("linear") | None if factor > 0.0 => 1.0 / factor,
            Some("none") | Some("linear") | None => 1.0,
            Some(other) => bail!("unsupported rope scaling type '{other}'"),
        };
        let n_ctx_train = meta_usize(h, "llama.context_length")?.unwrap_or(2048);
        Ok(Hparams {
            shape,
            n_rot,
            rms_eps,
            rope: Rope {
                freq_base,
                freq_scale,
                factors: None,
            },
            n_ctx_train,
        })
    }
}

/// Attention geometry passed to [`Backend::attention`].
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// The queries, keys and values of one attention call (one row per token each).
pub struct Qkv<'a, A> {
    pub q: &'a A,
    pub k: &'a A,
    pub v: &'a A,
}

impl<A> Clone for Qkv<'_, A> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A> Copy for Qkv<'_, A> {}

/// The operations a device must provide; every one can fail (a device can run out of memory or
/// lose its context), so each returns `Result`. Activations (`Act`) are row-major matrices with one row
/// per token; they live wherever the backend keeps them.
pub trait Backend: Send + Sync {
    /// A weight tensor ready for this device.
    type Weight: Send + Sync;
    /// An activation matrix.
    type Act: Send;
    /// The KV cache of one sequence.
    type Cache: Send;

    /// Short name for reports ("cpu").
    fn name(&self) -> String;
    /// Prepares tensor `t` of `file`; `rows`×`cols` is its expected matrix shape.
    fn load_weight(&self, file: &Arc<GgufFile>, t: &TensorInfo) -> Result<Self::Weight>;
    /// A cache for `n_ctx` positions of `n_layer` layers, rows of width `kv_dim`.
    fn new_cache(&self, n_layer: usize, n_ctx: usize, kv_dim: usize) -> Result<Self::Cache>;
    /// Rows of the embedding table, as f32.
    fn embed(&self, table: &Self::Weight, tokens: &[u32]) -> Result<Self::Act>;
    /// RMSNorm of each row times `w`.
    fn rms_norm(&self, x: &Self::Act, w: &Self::Weight, eps: f32) -> Result<Self::Act>;
    /// `x · wᵀ`: one output row per input row, `w.rows` columns.
    fn matmul(&self, w: &Self::Weight, x: &Self::Act) -> Result<Self::Act>;
    /// Normal-mode RoPE in place; row `i` is at position `pos0 + i`.
    fn rope(
        &self,
        x: &mut Self::Act,
        n_head: usize,
        head_dim: usize,
        n_rot: usize,
        pos0: usize,
        rope: &Rope,
    ) -> Result<()>;
    /// Stores `qkv.k`, `qkv.v` at positions `n_past..` of layer `layer` and attends causally.
    /// `qkv.q` holds the queries of the last `q.rows` of those positions (all of them, or only
    /// the rows whose output is wanted); one output row per query.
    fn attention(
        &self,
        cache: &mut Self::Cache,
        layer: usize,
        qkv: Qkv<'_, Self::Act>,
        n_past: usize,
        shape: AttnShape,
    ) -> Result<Self::Act>;
    /// `silu(gate) * up`.
    fn swiglu(&self, gate: &Self::Act, up: &Self::Act) -> Result<Self::Act>;
    /// `x += y`.
    fn add(&self, x: &mut Self::Act, y: &Self::Act) -> Result<()>;
    /// The rows `from..` of `x`.
    fn tail_rows(&self, x: &Self::Act, from: usize) -> Result<Self::Act>;
    /// The matrix on the host, row-major.
    fn to_host(&self, x: Self::Act) -> Result<Vec<f32>>;
    /// The matrix on the host, row-major, without consuming it (a borrow where it lives there).
    fn host_view<'a>(&self, x: &'a Self::Act) -> Result<std::borrow::Cow<'a, [f32]>>;
}

/// Receives the input of every weight product during [`Model::forward_observed`]: the weight's
/// tensor name, the input rows (row-major, one per token) and the number of columns.
pub type MatmulObserver<'a> = dyn FnMut(&str, &[f32], usize) + 'a;

struct Layer<W> {
    attn_norm: W,
    wq: W,
    wk: W,
    wv: W,
    wo: W,
    ffn_norm: W,
    w_gate: W,
    w_up: W,
    w_down: W,
}

/// A loaded Llama model on backend `B`.
pub struct Model<B: Backend> {
    pub cfg: Hparams,
    pub backend: B,
    tok_embd: B::Weight,
    output_norm: B::Weight,
    output: B::Weight,
    /// `output.weight`, or `token_embd.weight` when the head is tied to the embeddings.
    output_name: &'static str,
    layers: Vec<Layer<B::Weight>>,
}

/// The `rope_freqs.weight` factors, when the file has them: F32, `n_rot / 2` finite positive
/// values.
fn rope_factors(file: &GgufFile, n_rot: usize) -> Result<Option<std::sync::Arc<[f32]>>> {
    let Some(t) = file.tensor("rope_freqs.weight") else {
        return Ok(None);
    };
    let want = [(n_rot / 2) as u64];
    if t.ty != kiln_quant::GgmlType::F32 || t.shape != want {
        bail!(
            "tensor rope_freqs.weight is {} {:?}, expected F32 {:?} (one factor per rotated pair)",
            t.ty,
            t.shape,
            want
        );
    }
    let v: Vec<f32> = file
        .tensor_data(t)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if v.len() != n_rot / 2 || v.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
        bail!(
            "tensor rope_freqs.weight must hold {} finite positive factors",
            n_rot / 2
        );
    }
    Ok(Some(v.into()))
}

/// Checks that tensor `name` exists with shape `[cols, rows]` (ggml order) and returns it.
fn tensor<'a>(h: &'a GgufHeader, name: &str, shape: &[usize]) -> Result<&'a TensorInfo> {
    let t = h
        .tensor(name)
        .with_context(|| format!("tensor {name} is missing"))?;
    let want: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    if t.shape != want {
        bail!("tensor {name} has shape {:?}, expected {:?}", t.shape, want);
    }
    Ok(t)
}

impl<B: Backend> Model<B> {
    /// Loads every tensor of a Llama GGUF onto `backend`, checking names and shapes.
    pub fn load(file: Arc<GgufFile>, backend: B) -> Result<Model<B>> {
        let mut cfg = Hparams::from_gguf(&file)?;
        cfg.rope.factors = rope_factors(&file, cfg.n_rot)?;
        let h: &GgufHeader = &file;
        let (e, v, ff) = (cfg.shape.n_embd, cfg.shape.n_vocab, cfg.shape.n_ff);
        let qd = cfg.shape.n_head * cfg.shape.head_dim;
        let kvd = cfg.shape.kv_dim();
        let ld = |name: &str, shape: &[usize]| -> Result<B::Weight> {
            let t = tensor(h, name, shape)?;
            backend
                .load_weight(&file, t)
                .with_context(|| format!("loading {name}"))
        };
        let tok_embd = ld("token_embd.weight", &[e, v])?;
        let output_norm = ld("output_norm.weight", &[e])?;
        let output_name = if h.tensor("output.weight").is_some() {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let output = ld(output_name, &[e, v])?;
        let mut layers = Vec::with_capacity(cfg.shape.n_layer);
        for i in 0..cfg.shape.n_layer {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: ld(&p("attn_norm"), &[e])?,
                wq: ld(&p("attn_q"), &[e, qd])?,
                wk: ld(&p("attn_k"), &[e, kvd])?,
                wv: ld(&p("attn_v"), &[e, kvd])?,
                wo: ld(&p("attn_output"), &[qd, e])?,
                ffn_norm: ld(&p("ffn_norm"), &[e])?,
                w_gate: ld(&p("ffn_gate"), &[e, ff])?,
                w_up: ld(&p("ffn_up"), &[e, ff])?,
                w_down: ld(&p("ffn_down"), &[ff, e])?,
            });
        }
        Ok(Model {
            cfg,
            backend,
            tok_embd,
            output_norm,
            output,
            output_name,
            layers,
        })
    }

    /// A KV cache for one sequence of up to `n_ctx` positions.
    pub fn new_cache(&self, n_ctx: usize) -> Result<B::Cache> {
        self.backend
            .new_cache(self.cfg.shape.n_layer, n_ctx, self.cfg.shape.kv_dim())
    }

    /// Evaluates `tokens` at positions `n_past..n_past+len` (earlier positions must already be in
    /// `cache`) and returns the logits of rows `logits_from..` (`n_vocab` floats each).
    pub fn forward(
        &self,
        cache: &mut B::Cache,
        tokens: &[u32],
        n_past: usize,
        logits_from: usize,
    ) -> Result<Vec<f32>> {
        self.forward_impl(cache, tokens, n_past, logits_from, None)
    }

    /// [`Model::forward`] that also shows `obs` the input of every weight product (as
    /// llama-imatrix's callback sees `src1` of each `MUL_MAT`), output head included. Every
    /// product sees all rows; only the output head itself skips the rows before `logits_from`.
    pub fn forward_observed(
        &self,
        cache: &mut B::Cache,
        tokens: &[u32],
        n_past: usize,
        logits_from: usize,
        obs: &mut MatmulObserver,
    ) -> Result<Vec<f32>> {
        self.forward_impl(cache, tokens, n_past, logits_from, Some(obs))
    }

    fn forward_impl(
        &self,
        cache: &mut B::Cache,
        tokens: &[u32],
        n_past: usize,
        logits_from: usize,
        mut obs: Option<&mut MatmulObserver>,
    ) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let be = &self.backend;
        if tokens.is_empty() || logits_from >= tokens.len() {
            bail!(
                "nothing to evaluate ({} tokens, logits from {logits_from})",
                tokens.len()
            );
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.shape.n_vocab) {
            bail!(
                "token id {bad} is outside the vocabulary ({})",
                cfg.shape.n_vocab
            );
        }
        let observed = obs.is_some();
        let shape = AttnShape {
            n_head: cfg.shape.n_head,
            n_head_kv: cfg.shape.n_head_kv,
            head_dim: cfg.shape.head_dim,
            scale: 1.0 / (cfg.shape.head_dim as f32).sqrt(),
        };
        let mut see = |names: &[&str], il: Option<usize>, act: &B::Act, cols: usize| {
            if let Some(o) = obs.as_deref_mut() {
                let v = be.host_view(act)?;
                for n in names {
                    match il {
                        Some(i) => o(&format!("blk.{i}.{n}.weight"), &v, cols),
                        None => o(n, &v, cols),
                    }
                }
            }
            Ok::<(), anyhow::Error>(())
        };
        let qd = cfg.shape.n_head * cfg.shape.head_dim;
        let mut x = be.embed(&self.tok_embd, tokens)?;
        let last = self.layers.len().saturating_sub(1);
        for (il, l) in self.layers.iter().enumerate() {
            let cur = be.rms_norm(&x, &l.attn_norm, cfg.rms_eps)?;
            see(
                &["attn_q", "attn_k", "attn_v"],
                Some(il),
                &cur,
                cfg.shape.n_embd,
            )?;
            // in the last layer only the rows whose logits are wanted need queries (and
            // everything after); every row still needs its keys and values in the cache
            let q_from = if il == last && !observed {
                logits_from
            } else {
                0
            };
            let mut q = if q_from > 0 {
                be.matmul(&l.wq, &be.tail_rows(&cur, q_from)?)?
            } else {
                be.matmul(&l.wq, &cur)?
            };
            let mut k = be.matmul(&l.wk, &cur)?;
            let v = be.matmul(&l.wv, &cur)?;
            be.rope(
                &mut q,
                cfg.shape.n_head,
                cfg.shape.head_dim,
                cfg.n_rot,
                n_past + q_from,
                &cfg.rope,
            )?;
            be.rope(
                &mut k,
                cfg.shape.n_head_kv,
                cfg.shape.head_dim,
                cfg.n_rot,
                n_past,
                &cfg.rope,
            )?;
            let att = be.attention(
                cache,
                il,
                Qkv {
                    q: &q,
                    k: &k,
                    v: &v,
                },
                n_past,
                shape,
            )?;
            see(&["attn_output"], Some(il), &att, qd)?;
            let mut cur = be.matmul(&l.wo, &att)?;
            if q_from > 0 {
                // only the rows whose logits are wanted go on (llama.cpp's out_ids; their
                // attention and output projection were computed for those rows alone)
                x = be.tail_rows(&x, q_from)?;
            }
            be.add(&mut cur, &x)?;
            let ffn_in = cur;
            let cur = be.rms_norm(&ffn_in, &l.ffn_norm, cfg.rms_eps)?;
            see(&["ffn_up", "ffn_gate"], Some(il), &cur, cfg.shape.n_embd)?;
            let up = be.matmul(&l.w_up, &cur)?;
            let gate = be.matmul(&l.w_gate, &cur)?;
            let act = be.swiglu(&gate, &up)?;
            see(&["ffn_down"], Some(il), &act, cfg.shape.n_ff)?;
            let mut out = be.matmul(&l.w_down, &act)?;
            be.add(&mut out, &ffn_in)?;
            x = out;
        }
        let cur = be.rms_norm(&x, &self.output_norm, cfg.rms_eps)?;
        see(&[self.output_name], None, &cur, cfg.shape.n_embd)?;
        let cur = if observed && logits_from > 0 {
            be.tail_rows(&cur, logits_from)?
        } else {
            cur
        };
        let logits = be.matmul(&self.output, &cur)?;
        be.to_host(logits)
    }
}
