//! `kiln demo`'s inputs, made without downloads: a small Llama-2-shaped base model (HF layout) and a
//! PEFT LoRA that extends its vocabulary the way Chinese-LLaMA-2's does (new pieces appended to the
//! SentencePiece model, modules_to_save embed_tokens + lm_head at the new size, all seven
//! projections as LoRA targets), both derived from an embedded project-written text so that the
//! model really predicts it.
//!
//! The model is a bigram model in Llama's clothes: every token gets a random code of fixed norm
//! (the first 16 dimensions are a constant 1), and lm_head row `j` is
//! `[log P(j)/16 (×16), Σ_c D(j,c)·code_c/(d−16)]` with
//! `D(j,c) = ln(1 + n(c,j)/(α·P(j)))`, so the logits after the final RMSNorm are ≈ the smoothed
//! log-probability of `j` following `c`. The attention and feed-forward blocks (base weights plus
//! LoRA deltas) add only a small perturbation. Quantization noise on the codes and on lm_head
//! blurs those logits, so perplexity rises as bits fall. Everything is drawn from one fixed-seed
//! generator: the same bytes on every machine.

use crate::merge;
use crate::pipeline::manifest::write_if_changed;
use crate::pipeline::measure::tokenizer_of_dir;
use crate::shape::ModelShape;
use anyhow::{bail, Context, Result};
use kiln_formats::checkpoint::DType;
use kiln_formats::hf::LlamaConfig;
use kiln_formats::sentencepiece::{Piece, PieceType, SpModel};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The embedded evaluation and training text (written for this project).
pub const TEXT: &str = include_str!("text.txt");

/// Shape of the demo model and its LoRA.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// The base model (its `n_vocab` is ignored: the vocabulary is generated from the text).
    pub model: ModelShape,
    /// Rank of the LoRA.
    pub lora_r: usize,
}

/// The default demo shape: Llama-2's architecture at 1/16 of 7B's width.
pub const SHAPE: Shape = Shape {
    model: ModelShape {
        n_vocab: 0,
        n_embd: 256,
        n_layer: 2,
        n_ff: 768,
        n_head: 8,
        n_head_kv: 8,
        head_dim: 32,
        tied: false,
    },
    lora_r: 8,
};

/// English BPE merges in the base vocabulary.
const EN_MERGES: usize = 240;
/// Chinese word merges added by the LoRA's tokenizer.
const ZH_MERGES: usize = 60;
/// Smoothing of the bigram estimate.
const ALPHA: f64 = 0.5;
/// Add-β smoothing of the unigram estimate.
const BETA: f64 = 0.1;
/// Leading code dimensions held at 1 (they carry the unigram bias, spread over one 16-value
/// quantization sub-block so no single weight is an outlier).
const CONST_DIMS: usize = 16;
/// Seed of every random draw.
const SEED: u64 = 0x6b69_6c6e_2d64_656d; // "kiln-dem"

/// What [`build`] wrote.
#[derive(Clone, Debug)]
pub struct DemoInputs {
    pub base: PathBuf,
    pub lora: PathBuf,
    pub text: PathBuf,
    pub base_vocab: usize,
    pub vocab: usize,
}

/// splitmix64: small, fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
    fn normals(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * std) as f32).collect()
    }
}

/// Byte-pair merges learned from `words` (symbol sequences with counts): the most frequent adjacent
/// pair first, ties by the pair's text. Returns the merged strings in merge order.
fn learn_merges(words: &BTreeMap<Vec<String>, usize>, n: usize) -> Vec<String> {
    let mut words: Vec<(Vec<String>, usize)> = words.iter().map(|(w, c)| (w.clone(), *c)).collect();
    let mut out = Vec::new();
    for _ in 0..n {
        let mut pairs: BTreeMap<(String, String), usize> = BTreeMap::new();
        for (w, c) in &words {
            for p in w.windows(2) {
                *pairs.entry((p[0].clone(), p[1].clone())).or_default() += c;
            }
        }
        // max count; BTreeMap order makes the smallest pair win ties
        let Some(((a, b), count)) =
            pairs
                .into_iter()
                .fold(
                    None,
                    |best: Option<((String, String), usize)>, (k, c)| match &best {
                        Some((_, bc)) if *bc >= c => best,
                        _ => Some((k, c)),
                    },
                )
        else {
            break;
        };
        if count < 2 {
            break;
        }
        let merged = format!("{a}{b}");
        for (w, _) in &mut words {
            let mut i = 0;
            while i + 1 < w.len() {
                if w[i] == a && w[i + 1] == b {
                    w[i] = merged.clone();
                    w.remove(i + 1);
                }
                i += 1;
            }
        }
        out.push(merged);
    }
    out
}

fn piece(s: &str, score: f32, kind: PieceType) -> Piece {
    Piece {
        piece: s.to_string(),
        score,
        kind,
    }
}

/// Llama-2-style tokenizer settings (BPE, byte fallback, identity normalizer, dummy prefix).
fn sp_model(pieces: Vec<Piece>) -> SpModel {
    let n = pieces.len();
    let mut m = SpModel::with_pieces(pieces);
    m.model_type = 2;
    m.vocab_size = i32::try_from(n).unwrap_or(i32::MAX);
    m.byte_fallback = true;
    m.split_digits = true;
    m.allow_whitespace_only_pieces = true;
    m.pad_id = -1;
    m.normalizer_name = "identity".into();
    m.add_dummy_prefix = true;
    m.remove_extra_whitespaces = false;
    m.escape_whitespaces = true;
    m
}

/// The base vocabulary (control pieces, 256 bytes, English merges, ASCII characters) and the
/// extended one (the base plus the text's other characters and frequent Chinese pairs, appended
/// with score 0 as Chinese-LLaMA-2's tokenizer does).
pub fn vocabularies(text: &str) -> (SpModel, SpModel) {
    let mut pieces = vec![
        piece("<unk>", 0.0, PieceType::Unknown),
        piece("<s>", 0.0, PieceType::Control),
        piece("</s>", 0.0, PieceType::Control),
    ];
    for b in 0..=255u8 {
        pieces.push(piece(&format!("<0x{b:02X}>"), 0.0, PieceType::Byte));
    }
    let mut en: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    let mut zh: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    for w in text.split_whitespace() {
        let mut run = Vec::new();
        let mut ascii = vec!["▁".to_string()];
        for c in w.chars() {
            if c.is_ascii() {
                ascii.push(c.to_string());
                if run.len() > 1 {
                    *zh.entry(std::mem::take(&mut run)).or_default() += 1;
                }
                run.clear();
            } else {
                run.push(c.to_string());
            }
        }
        if run.len() > 1 {
            *zh.entry(run).or_default() += 1;
        }
        if ascii.len() > 1 {
            *en.entry(ascii).or_default() += 1;
        }
    }
    let mut seen: std::collections::HashSet<String> =
        pieces.iter().map(|p| p.piece.clone()).collect();
    let mut rank = 0f32;
    for m in learn_merges(&en, EN_MERGES) {
        if seen.insert(m.clone()) {
            pieces.push(piece(&m, -rank, PieceType::Normal));
            rank += 1.0;
        }
    }
    for c in std::iter::once('▁').chain('!'..='~') {
        let s = c.to_string();
        if seen.insert(s.clone()) {
            pieces.push(piece(&s, -rank, PieceType::Normal));
            rank += 1.0;
        }
    }
    let base = sp_model(pieces.clone());
    for c in text.chars().filter(|c| !c.is_ascii() && !c.is_whitespace()) {
        let s = c.to_string();
        if seen.insert(s.clone()) {
            pieces.push(piece(&s, 0.0, PieceType::Normal));
        }
    }
    for m in learn_merges(&zh, ZH_MERGES) {
        if seen.insert(m.clone()) {
            pieces.push(piece(&m, 0.0, PieceType::Normal));
        }
    }
    (base, sp_model(pieces))
}

/// Bigram counts of a token sequence: (current, next) -> count, plus unigram counts.
fn counts(tokens: &[u32], n_vocab: usize) -> (HashMap<(u32, u32), f64>, Vec<f64>) {
    let mut bi = HashMap::new();
    let mut uni = vec![0f64; n_vocab];
    for w in tokens.windows(2) {
        *bi.entry((w[0], w[1])).or_insert(0.0) += 1.0;
    }
    for &t in tokens {
        if let Some(u) = uni.get_mut(t as usize) {
            *u += 1.0;
        }
    }
    (bi, uni)
}

/// Token codes: the first [`CONST_DIMS`] dimensions are 1, the rest a random direction of norm
/// √(d−CONST_DIMS), so every code has RMS exactly 1 and passes the RMSNorms unchanged.
fn codes(rng: &mut Rng, n: usize, d: usize) -> Vec<Vec<f32>> {
    let c = CONST_DIMS.min(d.saturating_sub(1));
    (0..n)
        .map(|_| {
            let mut v: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
            v[..c].iter_mut().for_each(|x| *x = 0.0);
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            let k = ((d - c) as f64).sqrt() / norm;
            let mut out: Vec<f32> = v.iter().map(|x| (x * k) as f32).collect();
            out[..c].iter_mut().for_each(|x| *x = 1.0);
            out
        })
        .collect()
}

/// lm_head rows for the bigram statistics of `tokens` over `codes`.
fn lm_head(tokens: &[u32], codes: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let v = codes.len();
    let d = codes.first().map(|c| c.len()).unwrap_or(0);
    let (bi, uni) = counts(tokens, v);
    let total: f64 = uni.iter().sum();
    let p: Vec<f64> = uni
        .iter()
        .map(|&n| (n + BETA) / (total + BETA * v as f64))
        .collect();
    let c0 = CONST_DIMS.min(d.saturating_sub(1));
    let mut rows: Vec<Vec<f64>> = p
        .iter()
        .map(|pj| {
            let mut r = vec![0f64; d];
            r[..c0].iter_mut().for_each(|x| *x = pj.ln() / c0 as f64);
            r
        })
        .collect();
    let mut pairs: Vec<(&(u32, u32), &f64)> = bi.iter().collect();
    pairs.sort_by(|a, b| a.0.cmp(b.0));
    for (&(c, j), &n) in pairs {
        let (c, j) = (c as usize, j as usize);
        let dd = (1.0 + n / (ALPHA * p[j])).ln() / (d - c0) as f64;
        for k in c0..d {
            rows[j][k] += dd * f64::from(codes[c][k]);
        }
    }
    rows.into_iter()
        .map(|r| r.into_iter().map(|x| x as f32).collect())
        .collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
        .collect()
}

/// Writes a safetensors file (transformers' tensor order and header) of f16 tensors.
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let items: Vec<(&str, DType)> = tensors.iter().map(|t| (t.0.as_str(), DType::F16)).collect();
    let order = merge::safetensors_order(&items);
    let ordered: Vec<(&str, DType, &[usize])> = order
        .iter()
        .map(|&i| (tensors[i].0.as_str(), DType::F16, tensors[i].1.as_slice()))
        .collect();
    let (mut bytes, _) = merge::safetensors_header(&ordered)?;
    for &i in &order {
        bytes.extend(f16_bytes(&tensors[i].2));
    }
    write_if_changed(path, &bytes)
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    write_if_changed(path, s.as_bytes())
}

fn config_json(s: &ModelShape, vocab: usize) -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": s.n_embd,
        "initializer_range": 0.02,
        "intermediate_size": s.n_ff,
        "max_position_embeddings": 2048,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": s.n_head,
        "num_hidden_layers": s.n_layer,
        "num_key_value_heads": s.n_head_kv,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": null,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "torch_dtype": "float16",
        "transformers_version": "4.40.2",
        "use_cache": true,
        "vocab_size": vocab,
    })
}

fn added_token(c: &str) -> serde_json::Value {
    json!({"__type": "AddedToken", "content": c, "lstrip": false, "normalized": true,
           "rstrip": false, "single_word": false})
}

/// tokenizer_config.json and special_tokens_map.json as transformers writes them for Llama-2.
fn write_tokenizer(dir: &Path, sp: &SpModel) -> Result<()> {
    write_if_changed(&dir.join("tokenizer.model"), &sp.to_bytes())?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "add_bos_token": true,
            "add_eos_token": false,
            "bos_token": added_token("<s>"),
            "clean_up_tokenization_spaces": false,
            "eos_token": added_token("</s>"),
            "legacy": false,
            "model_max_length": 2048,
            "pad_token": null,
            "padding_side": "right",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": added_token("<unk>"),
        }),
    )?;
    let tok = |c: &str| json!({"content": c, "lstrip": false, "normalized": true, "rstrip": false, "single_word": false});
    write_json(
        &dir.join("special_tokens_map.json"),
        &json!({"bos_token": tok("<s>"), "eos_token": tok("</s>"), "unk_token": tok("<unk>")}),
    )
}

/// The seven projections: (HF module path, out dim, in dim).
fn projections(s: &ModelShape) -> [(&'static str, usize, usize); 7] {
    let (h, f) = (s.n_embd, s.n_ff);
    let (q, kv) = (s.q_dim(), s.kv_dim());
    [
        ("self_attn.q_proj", q, h),
        ("self_attn.k_proj", kv, h),
        ("self_attn.v_proj", kv, h),
        ("self_attn.o_proj", h, q),
        ("mlp.gate_proj", f, h),
        ("mlp.up_proj", f, h),
        ("mlp.down_proj", h, f),
    ]
}

fn flat(rows: &[Vec<f32>]) -> Vec<f32> {
    rows.iter().flatten().copied().collect()
}

/// Writes `dir/{base,lora,demo-text.txt}` (files whose bytes are unchanged are left untouched).
pub fn build(dir: &Path, s: &Shape) -> Result<DemoInputs> {
    let (lora_r, s) = (s.lora_r, &s.model);
    if s.n_embd < 2
        || s.n_head == 0
        || s.n_head_kv == 0
        || s.n_embd != s.q_dim()
        || !s.n_head.is_multiple_of(s.n_head_kv)
    {
        bail!("demo shape: n_embd must be n_head × head_dim, and n_head a multiple of n_head_kv");
    }
    let base_dir = dir.join("base");
    let lora_dir = dir.join("lora");
    for d in [&base_dir, &lora_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let text_path = dir.join("demo-text.txt");
    write_if_changed(&text_path, TEXT.as_bytes())?;

    let (base_sp, ext_sp) = vocabularies(TEXT);
    let (vb, ve) = (base_sp.len(), ext_sp.len());
    let d = s.n_embd;
    write_json(&base_dir.join("config.json"), &config_json(s, vb))?;
    write_json(
        &base_dir.join("generation_config.json"),
        &json!({"_from_model_config": true, "bos_token_id": 1, "eos_token_id": 2,
                "transformers_version": "4.40.2"}),
    )?;
    write_tokenizer(&base_dir, &base_sp)?;
    write_tokenizer(&lora_dir, &ext_sp)?;

    // Token statistics with the exact tokenizers kiln will use.
    let cfg = LlamaConfig::load(&base_dir.join("config.json"))?;
    let strip = TEXT.strip_suffix('\n').unwrap_or(TEXT);
    let base_tokens = tokenizer_of_dir(&base_dir, &cfg)?.encode(strip, true, false);
    let ext_tokens = tokenizer_of_dir(&lora_dir, &cfg)?.encode(strip, true, false);

    let mut rng = Rng(SEED);
    let all_codes = codes(&mut rng, ve, d);
    let base_codes = &all_codes[..vb];
    let base_head = lm_head(&base_tokens, base_codes);
    let ext_head = lm_head(&ext_tokens, &all_codes);

    // Base weights: small attention/FFN blocks (their outputs stay a perturbation).
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = vec![(
        "model.embed_tokens.weight".into(),
        vec![vb, d],
        flat(base_codes),
    )];
    for l in 0..s.n_layer {
        for (m, o, i) in projections(s) {
            let std = if m.ends_with("o_proj") || m.ends_with("down_proj") {
                0.002
            } else {
                0.02
            };
            t.push((
                format!("model.layers.{l}.{m}.weight"),
                vec![o, i],
                rng.normals(o * i, std),
            ));
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            t.push((
                format!("model.layers.{l}.{n}.weight"),
                vec![d],
                vec![1.0; d],
            ));
        }
    }
    t.push(("model.norm.weight".into(), vec![d], vec![1.0; d]));
    t.push(("lm_head.weight".into(), vec![vb, d], flat(&base_head)));
    write_safetensors(&base_dir.join("model.safetensors"), &t)?;

    // The LoRA: all seven projections, r = 8, alpha 16, and the extended embeddings/lm_head.
    let pfx = "base_model.model.";
    let mut a: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for l in 0..s.n_layer {
        for (m, o, i) in projections(s) {
            let key = format!("{pfx}model.layers.{l}.{m}");
            a.push((
                format!("{key}.lora_A.weight"),
                vec![lora_r, i],
                rng.normals(lora_r * i, 0.01),
            ));
            a.push((
                format!("{key}.lora_B.weight"),
                vec![o, lora_r],
                rng.normals(o * lora_r, 0.01),
            ));
        }
    }
    a.push((
        format!("{pfx}model.embed_tokens.weight"),
        vec![ve, d],
        flat(&all_codes),
    ));
    a.push((format!("{pfx}lm_head.weight"), vec![ve, d], flat(&ext_head)));
    write_safetensors(&lora_dir.join("adapter_model.safetensors"), &a)?;
    write_json(
        &lora_dir.join("adapter_config.json"),
        &json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": "kiln-demo-base",
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": 2 * lora_r,
            "lora_dropout": 0.05,
            "modules_to_save": ["embed_tokens", "lm_head"],
            "peft_type": "LORA",
            "r": lora_r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": false,
        }),
    )?;
    Ok(DemoInputs {
        base: base_dir,
        lora: lora_dir,
        text: text_path,
        base_vocab: vb,
        vocab: ve,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_fixed() {
        let mut r = Rng(1);
        let a: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        let mut r2 = Rng(1);
        let b: Vec<u64> = (0..3).map(|_| r2.next_u64()).collect();
        assert_eq!(a, b);
        let mut r3 = Rng(SEED);
        let m: f64 = (0..20000).map(|_| r3.normal()).sum::<f64>() / 20000.0;
        assert!(m.abs() < 0.05, "{m}");
    }

    #[test]
    fn merges_follow_frequency() {
        let mut w = BTreeMap::new();
        let sym = |s: &str| s.chars().map(|c| c.to_string()).collect::<Vec<_>>();
        w.insert(sym("▁the"), 10);
        w.insert(sym("▁then"), 3);
        w.insert(sym("▁a"), 1);
        let m = learn_merges(&w, 10);
        // ▁t, th and he all occur 13 times: the smallest pair text wins the tie
        assert_eq!(m[0], "he");
        assert!(m.contains(&"▁the".to_string()));
        assert!(!m.iter().any(|x| x == "▁a"));
    }

    #[test]
    fn vocabularies_extend_like_the_chinese_release() {
        let (base, ext) = vocabularies(TEXT);
        assert_eq!(base.pieces[..base.len()].len(), base.len());
        for (a, b) in base.pieces.iter().zip(&ext.pieces) {
            assert_eq!(a.piece, b.piece);
        }
        assert!(ext.len() > base.len() + 250, "{} {}", base.len(), ext.len());
        assert_eq!(
            ext.piece_to_id("窑").map(|i| i as usize >= base.len()),
            Some(true)
        );
        assert!(base.piece_to_id("窑").is_none());
        assert!(ext.pieces[base.len()..].iter().all(|p| p.score == 0.0));
        let again = SpModel::parse(&ext.to_bytes()).unwrap();
        assert_eq!(again.len(), ext.len());
        assert!(again.byte_fallback);
    }

    #[test]
    fn bigram_head_scores_the_seen_successor_highest() {
        let mut rng = Rng(7);
        let c = codes(&mut rng, 6, 64);
        for v in &c {
            let rms = (v.iter().map(|x| x * x).sum::<f32>() / 64.0).sqrt();
            assert!((rms - 1.0).abs() < 1e-4);
        }
        let toks = [1u32, 2, 3, 2, 3, 2, 4, 5, 2, 3];
        let h = lm_head(&toks, &c);
        let logits: Vec<f32> = h
            .iter()
            .map(|r| r.iter().zip(&c[2]).map(|(a, b)| a * b).sum())
            .collect();
        let best = (0..6)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap();
        assert_eq!(best, 3, "{logits:?}");
    }
}
