//! Per-tensor type choice of llama-quantize for Llama models (spec §4): file types, the mix rules,
//! user overrides, the shape fallback and the loader's tensor order.

use crate::shape::ModelShape;
use kiln_quant::GgmlType;
use regex::Regex;

/// A llama.cpp file type (`general.file_type`, `llama_ftype`) that `kiln quantize` can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ftype {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    /// Q2_K - Small: needs an importance matrix.
    Q2KS,
    Q3KS,
    Q3KM,
    Q3KL,
    Q4KS,
    Q4KM,
    Q5KS,
    Q5KM,
    Q6K,
}

impl Ftype {
    /// Every file type, in the order llama-quantize lists them.
    pub const ALL: [Ftype; 18] = [
        Ftype::Q4_0,
        Ftype::Q4_1,
        Ftype::Q5_0,
        Ftype::Q5_1,
        Ftype::Q2K,
        Ftype::Q2KS,
        Ftype::Q3KS,
        Ftype::Q3KM,
        Ftype::Q3KL,
        Ftype::Q4KS,
        Ftype::Q4KM,
        Ftype::Q5KS,
        Ftype::Q5KM,
        Ftype::Q6K,
        Ftype::Q8_0,
        Ftype::F16,
        Ftype::BF16,
        Ftype::F32,
    ];

    /// The `llama_ftype` value written to `general.file_type`.
    pub const fn id(self) -> u32 {
        match self {
            Ftype::F32 => 0,
            Ftype::F16 => 1,
            Ftype::Q4_0 => 2,
            Ftype::Q4_1 => 3,
            Ftype::Q8_0 => 7,
            Ftype::Q5_0 => 8,
            Ftype::Q5_1 => 9,
            Ftype::Q2K => 10,
            Ftype::Q3KS => 11,
            Ftype::Q3KM => 12,
            Ftype::Q3KL => 13,
            Ftype::Q4KS => 14,
            Ftype::Q4KM => 15,
            Ftype::Q5KS => 16,
            Ftype::Q5KM => 17,
            Ftype::Q6K => 18,
            Ftype::Q2KS => 21,
            Ftype::BF16 => 32,
        }
    }

    /// The name llama-quantize accepts (and kiln prints).
    pub const fn name(self) -> &'static str {
        match self {
            Ftype::F32 => "F32",
            Ftype::F16 => "F16",
            Ftype::BF16 => "BF16",
            Ftype::Q4_0 => "Q4_0",
            Ftype::Q4_1 => "Q4_1",
            Ftype::Q5_0 => "Q5_0",
            Ftype::Q5_1 => "Q5_1",
            Ftype::Q8_0 => "Q8_0",
            Ftype::Q2K => "Q2_K",
            Ftype::Q2KS => "Q2_K_S",
            Ftype::Q3KS => "Q3_K_S",
            Ftype::Q3KM => "Q3_K_M",
            Ftype::Q3KL => "Q3_K_L",
            Ftype::Q4KS => "Q4_K_S",
            Ftype::Q4KM => "Q4_K_M",
            Ftype::Q5KS => "Q5_K_S",
            Ftype::Q5KM => "Q5_K_M",
            Ftype::Q6K => "Q6_K",
        }
    }

    /// Parses a file type name, case-insensitively, with llama-quantize's aliases
    /// (Q3_K = Q3_K_M, Q4_K = Q4_K_M, Q5_K = Q5_K_M).
    pub fn parse(s: &str) -> Option<Ftype> {
        let u = s.trim().to_ascii_uppercase();
        let alias = match u.as_str() {
            "Q3_K" => Some(Ftype::Q3KM),
            "Q4_K" => Some(Ftype::Q4KM),
            "Q5_K" => Some(Ftype::Q5KM),
            _ => None,
        };
        alias.or_else(|| Self::ALL.iter().copied().find(|f| f.name() == u))
    }

    /// The ggml type most tensors get (`llama_ftype_get_default_type`).
    pub const fn default_type(self) -> GgmlType {
        match self {
            Ftype::F32 => GgmlType::F32,
            Ftype::F16 => GgmlType::F16,
            Ftype::BF16 => GgmlType::BF16,
            Ftype::Q4_0 => GgmlType::Q4_0,
            Ftype::Q4_1 => GgmlType::Q4_1,
            Ftype::Q5_0 => GgmlType::Q5_0,
            Ftype::Q5_1 => GgmlType::Q5_1,
            Ftype::Q8_0 => GgmlType::Q8_0,
            Ftype::Q2K | Ftype::Q2KS => GgmlType::Q2K,
            Ftype::Q3KS | Ftype::Q3KM | Ftype::Q3KL => GgmlType::Q3K,
            Ftype::Q4KS | Ftype::Q4KM => GgmlType::Q4K,
            Ftype::Q5KS | Ftype::Q5KM => GgmlType::Q5K,
            Ftype::Q6K => GgmlType::Q6K,
        }
    }

    /// llama.cpp's description of the file type ("Q4_K - Medium").
    pub const fn description(self) -> &'static str {
        match self {
            Ftype::F32 => "all F32",
            Ftype::F16 => "F16",
            Ftype::BF16 => "BF16",
            Ftype::Q4_0 => "Q4_0",
            Ftype::Q4_1 => "Q4_1",
            Ftype::Q5_0 => "Q5_0",
            Ftype::Q5_1 => "Q5_1",
            Ftype::Q8_0 => "Q8_0",
            Ftype::Q2K => "Q2_K - Medium",
            Ftype::Q2KS => "Q2_K - Small",
            Ftype::Q3KS => "Q3_K - Small",
            Ftype::Q3KM => "Q3_K - Medium",
            Ftype::Q3KL => "Q3_K - Large",
            Ftype::Q4KS => "Q4_K - Small",
            Ftype::Q4KM => "Q4_K - Medium",
            Ftype::Q5KS => "Q5_K - Small",
            Ftype::Q5KM => "Q5_K - Medium",
            Ftype::Q6K => "Q6_K",
        }
    }
}

impl Ftype {
    /// Whether a tensor planned as `ty` in a file of this type needs importance weights
    /// (llama.cpp's `tensor_requires_imatrix` for the non-IQ types: only Q2_K tensors of a Q2_K_S
    /// file, never token_embd or output).
    pub fn requires_imatrix(self, name: &str, ty: GgmlType) -> bool {
        self == Ftype::Q2KS
            && ty == GgmlType::Q2K
            && name != "token_embd.weight"
            && name != "output.weight"
    }
}

impl std::fmt::Display for Ftype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// User overrides of the mix (llama-quantize's flags of the same names).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub pure: bool,
    pub leave_output_tensor: bool,
    pub output_tensor_type: Option<GgmlType>,
    pub token_embedding_type: Option<GgmlType>,
    /// `--tensor-type REGEX=TYPE`, first match wins (regex search, not full match).
    pub tensor_types: Vec<(Regex, GgmlType)>,
    /// An importance matrix is in use (llama.cpp's `has_imatrix`: some mix rules change).
    pub imatrix: bool,
}

/// One input tensor as the planner sees it.
#[derive(Clone, Debug)]
pub struct PlanTensor {
    pub name: String,
    /// ggml ne, innermost first.
    pub shape: Vec<u64>,
    pub ty: GgmlType,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Category {
    Output,
    TokenEmbd,
    AttnQkv,
    AttnV,
    AttnK,
    AttnQ,
    AttnOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Other,
}

fn category(name: &str) -> Category {
    if name == "output.weight" {
        Category::Output
    } else if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        Category::TokenEmbd
    } else if name.contains("attn_qkv.weight") {
        Category::AttnQkv
    } else if name.contains("attn_v.weight") {
        Category::AttnV
    } else if name.contains("attn_k.weight") {
        Category::AttnK
    } else if name.contains("attn_q.weight") {
        Category::AttnQ
    } else if name.contains("attn_output.weight") {
        Category::AttnOutput
    } else if name.contains("ffn_up") {
        Category::FfnUp
    } else if name.contains("ffn_gate") {
        Category::FfnGate
    } else if name.contains("ffn_down") {
        Category::FfnDown
    } else {
        Category::Other
    }
}

/// Whether llama-quantize would quantize this tensor at all (spec §4.1, arch llama).
pub fn allows_quantization(t: &PlanTensor, leave_output_tensor: bool) -> bool {
    let n_dims = t
        .shape
        .iter()
        .rposition(|&d| d != 1)
        .map(|i| i + 1)
        .unwrap_or(1);
    n_dims >= 2
        && t.name.ends_with("weight")
        && !t.name.contains("_norm.weight")
        && (!leave_output_tensor || t.name != "output.weight")
        && !t.name.contains("ffn_gate_inp.weight")
        && !t.name.contains("ssm_conv1d")
        && t.name != "position_embd.weight"
        && t.name != "token_types.weight"
}

fn use_more_bits(i: i64, n: i64) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// llama.cpp's `tensor_type_fallback`: a type whose block does not divide the row length is replaced.
pub fn shape_fallback(ne0: u64, ty: GgmlType) -> GgmlType {
    let bs = ty.block_size() as u64;
    if ne0.is_multiple_of(bs) {
        return ty;
    }
    let fb = match ty {
        GgmlType::Q2K | GgmlType::Q3K => GgmlType::Q4_0,
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q5K => GgmlType::Q5_1,
        GgmlType::Q6K => GgmlType::Q8_0,
        other => other,
    };
    if !ne0.is_multiple_of(fb.block_size() as u64) {
        GgmlType::F16
    } else {
        fb
    }
}

/// The planner: visit tensors in loader order and return each one's output type.
pub struct Planner<'a> {
    ftype: Ftype,
    model: ModelShape,
    ov: &'a Overrides,
    n_attention_wv: i64,
    i_attention_wv: i64,
    n_ffn_down: i64,
    i_ffn_down: i64,
    has_tied_embeddings: bool,
}

impl<'a> Planner<'a> {
    /// Plans every tensor of `tensors` (which must be in loader order, see [`loader_order_key`]).
    pub fn plan(
        ftype: Ftype,
        model: ModelShape,
        ov: &'a Overrides,
        tensors: &[PlanTensor],
    ) -> Vec<GgmlType> {
        let mut p = Planner {
            ftype,
            model,
            ov,
            n_attention_wv: tensors
                .iter()
                .filter(|t| matches!(category(&t.name), Category::AttnV | Category::AttnQkv))
                .count() as i64,
            i_attention_wv: 0,
            n_ffn_down: model.n_layer as i64,
            i_ffn_down: 0,
            has_tied_embeddings: !tensors.iter().any(|t| t.name == "output.weight"),
        };
        tensors.iter().map(|t| p.tensor_type(t)).collect()
    }

    fn tensor_type(&mut self, t: &PlanTensor) -> GgmlType {
        if !allows_quantization(t, self.ov.leave_output_tensor) {
            return t.ty;
        }
        let cat = category(&t.name);
        if let (Some(ty), Category::TokenEmbd) = (self.ov.token_embedding_type, cat) {
            return ty;
        }
        if let (Some(ty), Category::Output) = (self.ov.output_tensor_type, cat) {
            return ty;
        }
        let default = self.ftype.default_type();
        let mut new_type = default;
        if default.is_quantized() {
            let mut manual = false;
            for (re, ty) in &self.ov.tensor_types {
                if re.is_match(&t.name) {
                    new_type = *ty;
                    manual = true;
                    break;
                }
            }
            if !manual && !self.ov.pure {
                new_type = self.mix_rule(t, cat, new_type);
            }
            new_type = shape_fallback(t.shape.first().copied().unwrap_or(0), new_type);
        }
        new_type
    }

    /// `llama_tensor_get_type_impl` for arch llama and the non-IQ file types.
    fn mix_rule(&mut self, t: &PlanTensor, cat: Category, mut new_type: GgmlType) -> GgmlType {
        use Ftype as F;
        use GgmlType as G;
        let ft = self.ftype;
        if cat == Category::Output || (self.has_tied_embeddings && cat == Category::TokenEmbd) {
            let nx = t.shape.first().copied().unwrap_or(0);
            if nx % new_type.block_size() as u64 != 0 {
                new_type = G::Q8_0;
            } else if new_type != G::Q8_0 {
                new_type = G::Q6K;
            }
            return new_type;
        }
        match cat {
            Category::AttnV => {
                let i = self.i_attention_wv;
                match ft {
                    F::Q2K => {
                        new_type = if self.model.gqa() >= 4 {
                            G::Q4K
                        } else {
                            G::Q3K
                        }
                    }
                    F::Q2KS if self.model.gqa() >= 4 => new_type = G::Q4K,
                    F::Q3KM => new_type = if i < 2 { G::Q5K } else { G::Q4K },
                    F::Q3KL => new_type = G::Q5K,
                    F::Q4KM | F::Q5KM if use_more_bits(i, self.n_attention_wv) => new_type = G::Q6K,
                    F::Q4KS if i < 4 => new_type = G::Q5K,
                    _ => {}
                }
                if self.model.is_70b() && matches!(new_type, G::Q3K | G::Q4K) {
                    new_type = G::Q5K;
                }
                self.i_attention_wv += 1;
            }
            Category::AttnQkv => {
                match ft {
                    F::Q3KM | F::Q3KL => new_type = G::Q4K,
                    F::Q4KM => new_type = G::Q5K,
                    F::Q5KM => new_type = G::Q6K,
                    _ => {}
                }
                // llama.cpp counts attn_qkv as attn_v for the counters but routes it through the
                // attn_v branch first; Llama never has fused qkv.
            }
            Category::FfnDown => {
                let (i, n) = (self.i_ffn_down, self.n_ffn_down);
                match ft {
                    F::Q2K => new_type = G::Q3K,
                    F::Q2KS if i < n / 8 => new_type = G::Q4K,
                    F::Q3KM => new_type = if i < n / 16 { G::Q5K } else { G::Q4K },
                    F::Q3KL => new_type = G::Q5K,
                    F::Q4KM if use_more_bits(i, n) => new_type = G::Q6K,
                    F::Q5KM if use_more_bits(i, n) => new_type = G::Q6K,
                    F::Q4KS if i < n / 8 => new_type = G::Q5K,
                    // with an imatrix the first eighth of ffn_down gets the type with a min
                    F::Q4_0 if self.ov.imatrix && i < n / 8 => new_type = G::Q4_1,
                    F::Q5_0 if self.ov.imatrix && i < n / 8 => new_type = G::Q5_1,
                    _ => {}
                }
                self.i_ffn_down += 1;
            }
            Category::AttnOutput => match ft {
                F::Q2K => new_type = G::Q3K,
                F::Q3KM => new_type = G::Q4K,
                F::Q3KL => new_type = G::Q5K,
                _ => {}
            },
            _ => {}
        }
        new_type
    }
}

/// The metadata llama-quantize writes: every input key in order, without `split.*`, with
/// `general.quantization_version` and `general.file_type` removed and re-appended as the last two keys.
pub fn quantized_metadata(
    input: impl IntoIterator<Item = (String, kiln_formats::gguf::GgufValue)>,
    ftype: Ftype,
) -> Vec<(String, kiln_formats::gguf::GgufValue)> {
    use kiln_formats::gguf::GgufValue;
    let mut meta: Vec<(String, GgufValue)> = input
        .into_iter()
        .filter(|(k, _)| {
            k != "general.quantization_version"
                && k != "general.file_type"
                && !k.starts_with("split.")
        })
        .collect();
    meta.push(("general.quantization_version".into(), GgufValue::U32(2)));
    meta.push(("general.file_type".into(), GgufValue::U32(ftype.id())));
    meta
}

/// The sort key of llama.cpp's model loader: tensors without a `blk.N.` prefix first (layer -1),
/// then by layer number, then by name (byte order).
pub fn loader_order_key(name: &str) -> (i64, &str) {
    let layer = name
        .strip_prefix("blk.")
        .and_then(|rest| {
            let digits: &str = &rest[..rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len())];
            let after = &rest[digits.len()..];
            if digits.is_empty() || !after.starts_with('.') {
                None
            } else {
                digits.parse::<i64>().ok()
            }
        })
        .unwrap_or(-1);
    (layer, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama(
        n_layer: u32,
        n_head_kv: u32,
        n_embd: u64,
        n_ff: u64,
    ) -> (ModelShape, Vec<PlanTensor>) {
        let n_head = 32;
        let hd = n_embd / n_head as u64;
        let mut v = vec![
            PlanTensor {
                name: "output.weight".into(),
                shape: vec![n_embd, 32000],
                ty: GgmlType::F16,
            },
            PlanTensor {
                name: "output_norm.weight".into(),
                shape: vec![n_embd],
                ty: GgmlType::F32,
            },
            PlanTensor {
                name: "token_embd.weight".into(),
                shape: vec![n_embd, 32000],
                ty: GgmlType::F16,
            },
        ];
        for l in 0..n_layer {
            let kv = hd * n_head_kv as u64;
            for (n, s) in [
                ("attn_k.weight", vec![n_embd, kv]),
                ("attn_norm.weight", vec![n_embd]),
                ("attn_output.weight", vec![n_embd, n_embd]),
                ("attn_q.weight", vec![n_embd, n_embd]),
                ("attn_v.weight", vec![n_embd, kv]),
                ("ffn_down.weight", vec![n_ff, n_embd]),
                ("ffn_gate.weight", vec![n_embd, n_ff]),
                ("ffn_norm.weight", vec![n_embd]),
                ("ffn_up.weight", vec![n_embd, n_ff]),
            ] {
                let ty = if s.len() == 1 {
                    GgmlType::F32
                } else {
                    GgmlType::F16
                };
                v.push(PlanTensor {
                    name: format!("blk.{l}.{n}"),
                    shape: s,
                    ty,
                });
            }
        }
        (
            ModelShape {
                n_vocab: 32000,
                n_embd: n_embd as usize,
                n_layer: n_layer as usize,
                n_ff: n_ff as usize,
                n_head,
                n_head_kv: n_head_kv as usize,
                head_dim: hd as usize,
                tied: false,
            },
            v,
        )
    }

    fn plan_of(ft: Ftype, m: ModelShape, ts: &[PlanTensor]) -> Vec<(String, GgmlType)> {
        let ov = Overrides::default();
        let types = Planner::plan(ft, m, &ov, ts);
        ts.iter().map(|t| t.name.clone()).zip(types).collect()
    }

    fn ty(p: &[(String, GgmlType)], name: &str) -> GgmlType {
        p.iter().find(|(n, _)| n == name).unwrap().1
    }

    #[test]
    fn parse_names_and_aliases() {
        assert_eq!(Ftype::parse("q4_k_m"), Some(Ftype::Q4KM));
        assert_eq!(Ftype::parse("Q4_K"), Some(Ftype::Q4KM));
        assert_eq!(Ftype::parse("q3_k"), Some(Ftype::Q3KM));
        assert_eq!(Ftype::parse("Q5_K"), Some(Ftype::Q5KM));
        assert_eq!(Ftype::parse("bf16"), Some(Ftype::BF16));
        assert_eq!(Ftype::parse("Q7_K"), None);
        for f in Ftype::ALL {
            assert_eq!(Ftype::parse(f.name()), Some(f));
        }
    }

    #[test]
    fn q4_k_m_on_32_layers_matches_spec_table() {
        let (m, ts) = llama(32, 32, 4096, 11008);
        let p = plan_of(Ftype::Q4KM, m, &ts);
        assert_eq!(ty(&p, "output.weight"), GgmlType::Q6K);
        assert_eq!(ty(&p, "token_embd.weight"), GgmlType::Q4K);
        assert_eq!(ty(&p, "output_norm.weight"), GgmlType::F32);
        let more: Vec<u32> = (0..32)
            .filter(|l| ty(&p, &format!("blk.{l}.attn_v.weight")) == GgmlType::Q6K)
            .collect();
        assert_eq!(
            more,
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        for l in 0..32 {
            assert_eq!(
                ty(&p, &format!("blk.{l}.attn_v.weight")),
                ty(&p, &format!("blk.{l}.ffn_down.weight"))
            );
            assert_eq!(ty(&p, &format!("blk.{l}.attn_q.weight")), GgmlType::Q4K);
        }
    }

    #[test]
    fn legacy_types_get_q6_k_output_but_q8_0_keeps_q8_0() {
        let (m, ts) = llama(4, 32, 4096, 11008);
        assert_eq!(
            ty(&plan_of(Ftype::Q4_0, m, &ts), "output.weight"),
            GgmlType::Q6K
        );
        assert_eq!(
            ty(&plan_of(Ftype::Q5_1, m, &ts), "output.weight"),
            GgmlType::Q6K
        );
        assert_eq!(
            ty(&plan_of(Ftype::Q8_0, m, &ts), "output.weight"),
            GgmlType::Q8_0
        );
        assert_eq!(
            ty(&plan_of(Ftype::F16, m, &ts), "output.weight"),
            GgmlType::F16
        );
    }

    #[test]
    fn q2_k_and_q3_k_rules() {
        let (m, ts) = llama(32, 8, 4096, 11008); // gqa 4
        let p = plan_of(Ftype::Q2K, m, &ts);
        assert_eq!(ty(&p, "blk.5.attn_v.weight"), GgmlType::Q4K);
        assert_eq!(ty(&p, "blk.5.ffn_down.weight"), GgmlType::Q3K);
        assert_eq!(ty(&p, "blk.5.attn_output.weight"), GgmlType::Q3K);
        assert_eq!(ty(&p, "blk.5.ffn_up.weight"), GgmlType::Q2K);
        let p = plan_of(Ftype::Q3KM, m, &ts);
        assert_eq!(ty(&p, "blk.1.attn_v.weight"), GgmlType::Q5K);
        assert_eq!(ty(&p, "blk.2.attn_v.weight"), GgmlType::Q4K);
        assert_eq!(ty(&p, "blk.1.ffn_down.weight"), GgmlType::Q5K);
        assert_eq!(ty(&p, "blk.2.ffn_down.weight"), GgmlType::Q4K);
    }

    #[test]
    fn imatrix_rules() {
        let (m, ts) = llama(32, 8, 4096, 11008); // gqa 4
        let p = plan_of(Ftype::Q2KS, m, &ts);
        assert_eq!(ty(&p, "blk.5.attn_v.weight"), GgmlType::Q4K);
        assert_eq!(ty(&p, "blk.3.ffn_down.weight"), GgmlType::Q4K);
        assert_eq!(ty(&p, "blk.4.ffn_down.weight"), GgmlType::Q2K);
        assert_eq!(ty(&p, "blk.5.attn_output.weight"), GgmlType::Q2K);
        assert_eq!(ty(&p, "output.weight"), GgmlType::Q6K);
        assert_eq!(ty(&p, "token_embd.weight"), GgmlType::Q2K);
        assert!(Ftype::Q2KS.requires_imatrix("blk.4.ffn_down.weight", GgmlType::Q2K));
        assert!(!Ftype::Q2KS.requires_imatrix("token_embd.weight", GgmlType::Q2K));
        assert!(!Ftype::Q2K.requires_imatrix("blk.4.ffn_down.weight", GgmlType::Q2K));
        let (m1, ts1) = llama(32, 32, 4096, 11008); // gqa 1
        assert_eq!(
            ty(&plan_of(Ftype::Q2KS, m1, &ts1), "blk.5.attn_v.weight"),
            GgmlType::Q2K
        );
        for (ft, lo, hi) in [
            (Ftype::Q4_0, GgmlType::Q4_1, GgmlType::Q4_0),
            (Ftype::Q5_0, GgmlType::Q5_1, GgmlType::Q5_0),
        ] {
            let ov = Overrides {
                imatrix: true,
                ..Default::default()
            };
            let types = Planner::plan(ft, m, &ov, &ts);
            let p: Vec<(String, GgmlType)> = ts.iter().map(|t| t.name.clone()).zip(types).collect();
            assert_eq!(ty(&p, "blk.3.ffn_down.weight"), lo);
            assert_eq!(ty(&p, "blk.4.ffn_down.weight"), hi);
            assert_eq!(ty(&p, "blk.3.ffn_up.weight"), hi);
            // without an imatrix: unchanged
            assert_eq!(ty(&plan_of(ft, m, &ts), "blk.3.ffn_down.weight"), hi);
        }
        assert_eq!(Ftype::parse("q2_k_s"), Some(Ftype::Q2KS));
        assert_eq!(Ftype::Q2KS.id(), 21);
    }

    #[test]
    fn seventy_b_rule() {
        let (m, ts) = llama(80, 8, 8192, 28672);
        let p = plan_of(Ftype::Q4KM, m, &ts);
        assert_eq!(ty(&p, "blk.0.attn_v.weight"), GgmlType::Q6K);
        assert_eq!(ty(&p, "blk.11.attn_v.weight"), GgmlType::Q5K);
        assert_eq!(
            ty(&plan_of(Ftype::Q2K, m, &ts), "blk.11.attn_v.weight"),
            GgmlType::Q5K
        );
    }

    #[test]
    fn shape_fallbacks() {
        assert_eq!(shape_fallback(352, GgmlType::Q4K), GgmlType::Q5_0);
        assert_eq!(shape_fallback(352, GgmlType::Q6K), GgmlType::Q8_0);
        assert_eq!(shape_fallback(352, GgmlType::Q3K), GgmlType::Q4_0);
        assert_eq!(shape_fallback(352, GgmlType::Q5K), GgmlType::Q5_1);
        assert_eq!(shape_fallback(100, GgmlType::Q4K), GgmlType::F16);
        assert_eq!(shape_fallback(100, GgmlType::Q4_0), GgmlType::F16);
        let (m, ts) = llama(4, 32, 4096, 352);
        let p = plan_of(Ftype::Q4KM, m, &ts);
        assert_eq!(ty(&p, "blk.3.ffn_down.weight"), GgmlType::Q8_0);
        assert_eq!(ty(&p, "blk.1.ffn_down.weight"), GgmlType::Q5_0);
    }

    #[test]
    fn overrides() {
        let (m, ts) = llama(4, 32, 4096, 11008);
        let ov = Overrides {
            pure: true,
            token_embedding_type: Some(GgmlType::Q8_0),
            tensor_types: vec![(Regex::new("attn_q").unwrap(), GgmlType::Q5_0)],
            ..Default::default()
        };
        let types = Planner::plan(Ftype::Q4KM, m, &ov, &ts);
        let p: Vec<(String, GgmlType)> = ts.iter().map(|t| t.name.clone()).zip(types).collect();
        assert_eq!(ty(&p, "output.weight"), GgmlType::Q4K);
        assert_eq!(ty(&p, "token_embd.weight"), GgmlType::Q8_0);
        assert_eq!(ty(&p, "blk.0.attn_q.weight"), GgmlType::Q5_0);
        assert_eq!(ty(&p, "blk.0.attn_v.weight"), GgmlType::Q4K);
        let ov = Overrides {
            leave_output_tensor: true,
            ..Default::default()
        };
        let types = Planner::plan(Ftype::Q4_0, m, &ov, &ts);
        assert_eq!(types[0], GgmlType::F16);
    }

    #[test]
    fn loader_order_sorts_like_llama_cpp() {
        let mut names = vec![
            "blk.10.attn_q.weight",
            "token_embd.weight",
            "blk.2.ffn_up.weight",
            "blk.2.attn_k.weight",
            "output.weight",
            "output_norm.weight",
        ];
        names.sort_by(|a, b| loader_order_key(a).cmp(&loader_order_key(b)));
        assert_eq!(
            names,
            vec![
                "output.weight",
                "output_norm.weight",
                "token_embd.weight",
                "blk.2.attn_k.weight",
                "blk.2.ffn_up.weight",
                "blk.10.attn_q.weight"
            ]
        );
    }
}
