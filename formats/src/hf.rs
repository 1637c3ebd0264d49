//! Hugging Face and PEFT JSON files: `config.json` (Llama), `tokenizer_config.json`,
//! `special_tokens_map.json`, `added_tokens.json`, `generation_config.json` and PEFT's
//! `adapter_config.json`, with PEFT's target-module and rank/alpha pattern matching.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

/// Largest JSON file read (chat templates make tokenizer configs grow, but not this far).
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// Errors from reading HF/PEFT JSON files. Each names the file; field errors name the field.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: file is {size} bytes, more than the {max} a JSON config may have")]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("{path}: not valid JSON: {source}")]
    Syntax {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: top level is not a JSON object")]
    NotObject { path: PathBuf },
    #[error("{path}: field `{field}`: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}: field `peft_type` is {found:?}; only LORA adapters are supported")]
    NotLora { path: PathBuf, found: String },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn field_err(path: &Path, field: impl Into<String>, message: impl Into<String>) -> HfError {
    HfError::Field {
        path: path.to_path_buf(),
        field: field.into(),
        message: message.into(),
    }
}

/// `dir/name` if `p` is a directory, else `p`.
fn resolve(p: &Path, name: &str) -> PathBuf {
    if p.is_dir() {
        p.join(name)
    } else {
        p.to_path_buf()
    }
}

fn read_object(path: &Path) -> Result<Map<String, Value>, HfError> {
    let io_err = |source| HfError::Io {
        path: path.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(path).map_err(io_err)?.len();
    if size > MAX_JSON_BYTES {
        return Err(HfError::TooLarge {
            path: path.to_path_buf(),
            size,
            max: MAX_JSON_BYTES,
        });
    }
    let text = std::fs::read(path).map_err(io_err)?;
    parse_object(&text, path)
}

fn parse_object(text: &[u8], path: &Path) -> Result<Map<String, Value>, HfError> {
    match serde_json::from_slice::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(HfError::NotObject {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(HfError::Syntax {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Deserializes `T` from a JSON object, naming the offending field on error.
fn typed<T: DeserializeOwned>(raw: &Map<String, Value>, path: &Path) -> Result<T, HfError> {
    // Cloning is cheap next to reading the file; it keeps `raw` for rewriting.
    serde_path_to_error::deserialize(Value::Object(raw.clone())).map_err(|e| {
        let field = e.path().to_string();
        let message = e.into_inner().to_string();
        // A missing field is reported at the parent (".") with the name in the message.
        let field = if field == "." {
            message
                .split('`')
                .nth(1)
                .map(str::to_owned)
                .unwrap_or(field)
        } else {
            field
        };
        field_err(path, field, message)
    })
}

/// Accepts `null` as the type's default.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A token id or a list of them (`eos_token_id` may be either).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

impl TokenIds {
    /// The first id (the one llama.cpp writes as the EOS token).
    pub fn first(&self) -> Option<i64> {
        match self {
            TokenIds::One(i) => Some(*i),
            TokenIds::Many(v) => v.first().copied(),
        }
    }

    /// All ids.
    pub fn to_vec(&self) -> Vec<i64> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// `rope_scaling` (or transformers 5's `rope_parameters`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct RopeScaling {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<u64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Every other key.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl RopeScaling {
    /// `rope_type`, else the older `type` key.
    pub fn kind(&self) -> Option<&str> {
        self.rope_type.as_deref().or(self.type_.as_deref())
    }
}

/// A Llama-family `config.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct LlamaConfig {
    #[serde(default, deserialize_with = "null_default")]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_hidden_layers: u64,
    pub num_attention_heads: u64,
    /// Absent or null means `num_attention_heads`; see [`LlamaConfig::num_kv_heads`].
    #[serde(default)]
    pub num_key_value_heads: Option<u64>,
    pub rms_norm_eps: f64,
    /// `rope_theta`, else `rope_parameters.rope_theta`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// `rope_scaling`, else a non-default `rope_parameters`.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub rope_parameters: Option<RopeScaling>,
    pub max_position_embeddings: u64,
    pub vocab_size: u64,
    #[serde(default, deserialize_with = "null_default")]
    pub tie_word_embeddings: bool,
    /// `torch_dtype`, else transformers 5's `dtype`.
    #[serde(default)]
    pub torch_dtype: Option<String>,
    #[serde(default)]
    dtype: Option<String>,
    #[serde(default)]
    pub head_dim: Option<u64>,
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    /// The whole file, in its original key order, for rewriting.
    #[serde(skip)]
    pub raw: Map<String, Value>,
    /// The file it was read from (for error messages).
    #[serde(skip)]
    pub path: PathBuf,
}

impl LlamaConfig {
    /// Reads `config.json` from a directory, or the given file.
    pub fn load(dir_or_file: &Path) -> Result<LlamaConfig, HfError> {
        let path = resolve(dir_or_file, "config.json");
        let raw = read_object(&path)?;
        LlamaConfig::from_map(raw, &path)
    }

    /// Parses config.json text; `path` is used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<LlamaConfig, HfError> {
        LlamaConfig::from_map(parse_object(text.as_bytes(), path)?, path)
    }

    fn from_map(raw: Map<String, Value>, path: &Path) -> Result<LlamaConfig, HfError> {
        let mut c: LlamaConfig = typed(&raw, path)?;
        if c.torch_dtype.is_none() {
            c.torch_dtype = c.dtype.clone();
        }
        if let Some(rp) = &c.rope_parameters {
            if c.rope_theta.is_none() {
                c.rope_theta = rp.rope_theta;
            }
            if c.rope_scaling.is_none() && !matches!(rp.kind(), None | Some("default")) {
                c.rope_scaling = Some(rp.clone());
            }
        }
        c.raw = raw;
        c.path = path.to_path_buf();
        Ok(c)
    }

    /// `num_key_value_heads`, defaulting to `num_attention_heads`.
    pub fn num_kv_heads(&self) -> u64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// `head_dim` if given, else `hidden_size / num_attention_heads` (0 if there are no heads).
    pub fn head_dim(&self) -> u64 {
        self.head_dim.unwrap_or_else(|| {
            self.hidden_size
                .checked_div(self.num_attention_heads)
                .unwrap_or(0)
        })
    }

    /// Checks the sizes kiln relies on: all nonzero, heads divide `hidden_size` (when `head_dim`
    /// is not given), kv heads divide heads, an even head size, a positive finite
    /// `rms_norm_eps` and `rope_theta`.
    pub fn validate(&self) -> Result<(), HfError> {
        let p = &self.path;
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("max_position_embeddings", self.max_position_embeddings),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return Err(field_err(p, name, "must be nonzero"));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(field_err(
                p,
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(field_err(
                p,
                "num_key_value_heads",
                format!(
                    "{} kv heads do not divide {} attention heads",
                    self.num_kv_heads(),
                    self.num_attention_heads
                ),
            ));
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            return Err(field_err(
                p,
                "head_dim",
                format!("head size {hd} must be nonzero and even"),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(field_err(
                p,
                "rms_norm_eps",
                format!("{} is not a positive number", self.rms_norm_eps),
            ));
        }
        if let Some(t) = self.rope_theta {
            if !(t.is_finite() && t > 0.0) {
                return Err(field_err(
                    p,
                    "rope_theta",
                    format!("{t} is not a positive number"),
                ));
            }
        }
        Ok(())
    }

    /// Sets `vocab_size` here and in `raw`.
    pub fn set_vocab_size(&mut self, n: u64) {
        self.vocab_size = n;
        self.raw.insert("vocab_size".into(), Value::from(n));
    }

    /// Sets the dtype here and in `raw` (`torch_dtype`, and `dtype` too where the file has it).
    pub fn set_torch_dtype(&mut self, dtype: &str) {
        self.torch_dtype = Some(dtype.to_owned());
        if self.raw.contains_key("dtype") {
            self.raw.insert("dtype".into(), Value::from(dtype));
            self.dtype = Some(dtype.to_owned());
        }
        if self.raw.contains_key("torch_dtype") || !self.raw.contains_key("dtype") {
            self.raw.insert("torch_dtype".into(), Value::from(dtype));
        }
    }

    /// `raw` as pretty JSON (2-space indent, trailing newline, like `save_pretrained`).
    pub fn to_json_string(&self) -> String {
        let mut s = serde_json::to_string_pretty(&self.raw).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Writes `raw` to `path` atomically.
    pub fn write(&self, path: &Path) -> Result<(), HfError> {
        use std::io::Write;
        let werr = |source| HfError::Write {
            path: path.to_path_buf(),
            source,
        };
        let mut f = crate::atomic::AtomicFile::create(path).map_err(werr)?;
        f.write_all(self.to_json_string().as_bytes())
            .map_err(werr)?;
        f.commit().map_err(werr)
    }
}

/// An `AddedToken` object as transformers serializes it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct AddedToken {
    pub content: String,
    #[serde(default)]
    pub lstrip: Option<bool>,
    #[serde(default)]
    pub rstrip: Option<bool>,
    #[serde(default)]
    pub normalized: Option<bool>,
    #[serde(default)]
    pub single_word: Option<bool>,
    /// transformers' default is false.
    #[serde(default, deserialize_with = "null_default")]
    pub special: bool,
}

/// A special token given as a plain string or as an [`AddedToken`] object.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TokenSpec {
    Text(String),
    Added(AddedToken),
}

impl TokenSpec {
    /// The token's text.
    pub fn content(&self) -> &str {
        match self {
            TokenSpec::Text(s) => s,
            TokenSpec::Added(a) => &a.content,
        }
    }
}

/// One entry of a list-form `chat_template`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct NamedTemplate {
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    #[serde(default)]
    pub template: Option<String>,
}

/// `chat_template` as written: one template, or a list of named ones.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
enum ChatTemplateJson {
    Single(String),
    Named(Vec<NamedTemplate>),
}

/// `tokenizer_config.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct TokenizerConfig {
    #[serde(default)]
    pub add_bos_token: Option<bool>,
    #[serde(default)]
    pub add_eos_token: Option<bool>,
    #[serde(default)]
    pub add_prefix_space: Option<bool>,
    #[serde(default)]
    pub bos_token: Option<TokenSpec>,
    #[serde(default)]
    pub eos_token: Option<TokenSpec>,
    #[serde(default)]
    pub unk_token: Option<TokenSpec>,
    #[serde(default)]
    pub pad_token: Option<TokenSpec>,
    #[serde(default, rename = "chat_template")]
    chat_template_json: Option<ChatTemplateJson>,
    /// The template: a string `chat_template`, or the entry named "default" of a list.
    #[serde(skip)]
    pub chat_template: Option<String>,
    /// The entries of a list-form `chat_template` (empty for the string form).
    #[serde(skip)]
    pub chat_templates: Vec<NamedTemplate>,
    /// id (a decimal string, checked at load) -> token.
    #[serde(default, deserialize_with = "null_default")]
    pub added_tokens_decoder: BTreeMap<String, AddedToken>,
    /// A float: transformers writes 1e30 for "no limit".
    #[serde(default)]
    pub model_max_length: Option<f64>,
    #[serde(default)]
    pub legacy: Option<bool>,
    #[serde(default)]
    pub tokenizer_class: Option<String>,
    #[serde(default)]
    pub clean_up_tokenization_spaces: Option<bool>,
    #[serde(skip)]
    pub raw: Map<String, Value>,
}

impl TokenizerConfig {
    /// Reads `tokenizer_config.json` from a directory, or the given file.
    pub fn load(dir_or_file: &Path) -> Result<TokenizerConfig, HfError> {
        let path = resolve(dir_or_file, "tokenizer_config.json");
        let raw = read_object(&path)?;
        let mut c: TokenizerConfig = typed(&raw, &path)?;
        match c.chat_template_json.take() {
            None => {}
            Some(ChatTemplateJson::Single(s)) => c.chat_template = Some(s),
            Some(ChatTemplateJson::Named(v)) => {
                c.chat_template = v
                    .iter()
                    .find(|t| t.name == "default")
                    .and_then(|t| t.template.clone());
                c.chat_templates = v;
            }
        }
        for id in c.added_tokens_decoder.keys() {
            if id.parse::<u32>().is_err() {
                return Err(field_err(
                    &path,
                    format!("added_tokens_decoder.{id}"),
                    "key is not a token id",
                ));
            }
        }
        c.raw = raw;
        Ok(c)
    }

    /// `added_tokens_decoder` as (id, token), sorted by id.
    pub fn added_tokens_by_id(&self) -> Vec<(u32, &AddedToken)> {
        let mut v: Vec<(u32, &AddedToken)> = self
            .added_tokens_decoder
            .iter()
            .filter_map(|(k, t)| Some((k.parse().ok()?, t)))
            .collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }
}

/// `special_tokens_map.json`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SpecialTokensMap {
    #[serde(default)]
    pub bos_token: Option<TokenSpec>,
    #[serde(default)]
    pub eos_token: Option<TokenSpec>,
    #[serde(default)]
    pub unk_token: Option<TokenSpec>,
    #[serde(default)]
    pub pad_token: Option<TokenSpec>,
    #[serde(default)]
    pub sep_token: Option<TokenSpec>,
    #[serde(default)]
    pub cls_token: Option<TokenSpec>,
    #[serde(default)]
    pub mask_token: Option<TokenSpec>,
    #[serde(default, deserialize_with = "null_default")]
    pub additional_special_tokens: Vec<TokenSpec>,
}

impl SpecialTokensMap {
    /// Reads `special_tokens_map.json` from a directory, or the given file.
    pub fn load(dir_or_file: &Path) -> Result<SpecialTokensMap, HfError> {
        let path = resolve(dir_or_file, "special_tokens_map.json");
        typed(&read_object(&path)?, &path)
    }
}

/// `added_tokens.json`: token text -> id, in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddedTokens {
    pub tokens: Vec<(String, u32)>,
}

impl AddedTokens {
    /// Reads `added_tokens.json` from a directory, or the given file.
    pub fn load(dir_or_file: &Path) -> Result<AddedTokens, HfError> {
        let path = resolve(dir_or_file, "added_tokens.json");
        let raw = read_object(&path)?;
        let mut tokens = Vec::with_capacity(raw.len());
        for (k, v) in raw {
            let id = v
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| field_err(&path, &k, format!("id {v} is not a u32")))?;
            tokens.push((k, id));
        }
        Ok(AddedTokens { tokens })
    }

    /// The tokens sorted by id.
    pub fn sorted_by_id(&self) -> Vec<(String, u32)> {
        let mut v = self.tokens.clone();
        v.sort_by_key(|(_, id)| *id);
        v
    }
}

/// `generation_config.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    #[serde(skip)]
    pub raw: Map<String, Value>,
}

impl GenerationConfig {
    /// Reads `generation_config.json` from a directory, or the given file.
    pub fn load(dir_or_file: &Path) -> Result<GenerationConfig, HfError> {
        let path = resolve(dir_or_file, "generation_config.json");
        let raw = read_object(&path)?;
        let mut c: GenerationConfig = typed(&raw, &path)?;
        c.raw = raw;
        Ok(c)
    }
}

/// `target_modules` / `exclude_modules`: a list of names, or one regular expression.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(String),
}

/// `layers_to_transform`: one layer index or a list.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum LayerIndexes {
    One(u64),
    Many(Vec<u64>),
}

/// `layers_pattern`: one pattern or a list.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum LayersPattern {
    One(String),
    Many(Vec<String>),
}

/// LoRA `bias` setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum LoraBias {
    #[default]
    #[serde(rename = "none")]
    None,
    #[serde(rename = "all")]
    All,
    #[serde(rename = "lora_only")]
    LoraOnly,
}

fn ordered_pattern<'de, D, T>(d: D) -> Result<Vec<(String, T)>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    let m: Option<Map<String, Value>> = Option::deserialize(d)?;
    let mut out = Vec::new();
    for (k, v) in m.unwrap_or_default() {
        let t =
            T::deserialize(v).map_err(|e| serde::de::Error::custom(format!("key {k:?}: {e}")))?;
        out.push((k, t));
    }
    Ok(out)
}

/// PEFT `adapter_config.json` for a LoRA adapter.
#[derive(Clone, Debug, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub r: u32,
    pub lora_alpha: f64,
    #[serde(default, deserialize_with = "null_default")]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default, deserialize_with = "null_default")]
    pub fan_in_fan_out: bool,
    #[serde(default, deserialize_with = "null_default")]
    pub bias: LoraBias,
    /// A bias on LoRA B (PEFT `lora_bias`).
    #[serde(default, deserialize_with = "null_default")]
    pub lora_bias: bool,
    #[serde(default, deserialize_with = "null_default")]
    pub use_rslora: bool,
    #[serde(default, deserialize_with = "null_default")]
    pub use_dora: bool,
    /// Pattern -> rank, in file order (the first matching pattern wins).
    #[serde(default, deserialize_with = "ordered_pattern")]
    pub rank_pattern: Vec<(String, u32)>,
    /// Pattern -> alpha, in file order.
    #[serde(default, deserialize_with = "ordered_pattern")]
    pub alpha_pattern: Vec<(String, f64)>,
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndexes>,
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub inference_mode: bool,
    #[serde(skip)]
    pub raw: Map<String, Value>,
}

/// Python `re.match(p, s)` (anchored at the start only).
fn py_match(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{pattern})"))
}

/// Python `re.fullmatch(p, s)`.
fn py_fullmatch(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{pattern})$"))
}

/// PEFT `get_pattern_key`: `re.match(rf"(.*\.)?({key})$", module)`.
fn pattern_key_regex(key: &str) -> Result<Regex, regex::Error> {
    py_match(&format!(r"(.*\.)?({key})$"))
}

/// PEFT's `modules_to_save` exclusion: `re.match(rf"(^|.*\.){m}($|\..*)", key)`.
fn modules_to_save_regex(m: &str) -> Result<Regex, regex::Error> {
    py_match(&format!(r"(^|.*\.){m}($|\..*)"))
}

/// PEFT's layer-index extraction with a `layers_pattern`.
fn layers_pattern_regex(p: &str) -> Result<Regex, regex::Error> {
    py_match(&format!(r".*?\.{p}\.(\d+)\."))
}

fn is_match(re: Result<Regex, regex::Error>, s: &str) -> bool {
    re.is_ok_and(|r| r.is_match(s))
}

impl AdapterConfig {
    /// Reads `adapter_config.json` from a directory, or the given file.
    pub fn load(dir_or_file: &Path) -> Result<AdapterConfig, HfError> {
        let path = resolve(dir_or_file, "adapter_config.json");
        let raw = read_object(&path)?;
        AdapterConfig::from_map(raw, &path)
    }

    /// Parses adapter_config.json text; `path` is used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<AdapterConfig, HfError> {
        AdapterConfig::from_map(parse_object(text.as_bytes(), path)?, path)
    }

    fn from_map(raw: Map<String, Value>, path: &Path) -> Result<AdapterConfig, HfError> {
        // Check the adapter kind first, so a prefix-tuning config says so rather than
        // complaining about a missing `r`.
        match raw.get("peft_type") {
            Some(Value::String(s)) if s == "LORA" => {}
            Some(Value::String(s)) => {
                return Err(HfError::NotLora {
                    path: path.to_path_buf(),
                    found: s.clone(),
                })
            }
            Some(v) => return Err(field_err(path, "peft_type", format!("{v} is not a string"))),
            None => return Err(field_err(path, "peft_type", "missing field `peft_type`")),
        }
        let mut c: AdapterConfig = typed(&raw, path)?;
        c.raw = raw;
        c.check(path)?;
        Ok(c)
    }

    fn check(&self, path: &Path) -> Result<(), HfError> {
        if self.r == 0 {
            return Err(field_err(path, "r", "must be positive"));
        }
        if !self.lora_alpha.is_finite() {
            return Err(field_err(path, "lora_alpha", "must be a finite number"));
        }
        for (k, r) in &self.rank_pattern {
            if *r == 0 {
                return Err(field_err(
                    path,
                    format!("rank_pattern.{k}"),
                    "must be positive",
                ));
            }
        }
        for (k, a) in &self.alpha_pattern {
            if !a.is_finite() {
                return Err(field_err(
                    path,
                    format!("alpha_pattern.{k}"),
                    "must be finite",
                ));
            }
        }
        // Every pattern must compile with the regex crate (Python-only syntax such as
        // look-around is refused here rather than silently never matching).
        let bad = |field: String, e: regex::Error| field_err(path, field, e.to_string());
        for (field, t) in [
            ("target_modules", Some(&self.target_modules)),
            ("exclude_modules", self.exclude_modules.as_ref()),
        ] {
            if let Some(TargetModules::Regex(s)) = t {
                py_fullmatch(s).map_err(|e| bad(field.into(), e))?;
            }
        }
        for m in self.modules_to_save.iter().flatten() {
            modules_to_save_regex(m).map_err(|e| bad(format!("modules_to_save.{m}"), e))?;
        }
        for p in self.layers_patterns() {
            layers_pattern_regex(p).map_err(|e| bad("layers_pattern".into(), e))?;
        }
        for k in self.rank_pattern.iter().map(|(k, _)| k) {
            pattern_key_regex(k).map_err(|e| bad(format!("rank_pattern.{k}"), e))?;
        }
        for k in self.alpha_pattern.iter().map(|(k, _)| k) {
            pattern_key_regex(k).map_err(|e| bad(format!("alpha_pattern.{k}"), e))?;
        }
        Ok(())
    }

    fn layers_patterns(&self) -> Vec<&str> {
        match &self.layers_pattern {
            None => Vec::new(),
            Some(LayersPattern::One(s)) => vec![s.as_str()],
            Some(LayersPattern::Many(v)) => v.iter().map(String::as_str).collect(),
        }
    }

    /// PEFT `get_pattern_key`: the first pattern (in file order) matching the module key, else
    /// the key itself.
    fn pattern_key<'a, T>(patterns: &'a [(String, T)], module_key: &str) -> Option<&'a T> {
        patterns
            .iter()
            .find(|(k, _)| is_match(pattern_key_regex(k), module_key))
            .or_else(|| patterns.iter().find(|(k, _)| k == module_key))
            .map(|(_, v)| v)
    }

    /// The rank PEFT gives the module (`rank_pattern`, else `r`). `module_key` is the module's
    /// name in the base model, e.g. `model.layers.0.self_attn.q_proj` (strip PEFT's
    /// `base_model.model.` prefix from adapter tensor names first).
    pub fn rank_for(&self, module_key: &str) -> u32 {
        AdapterConfig::pattern_key(&self.rank_pattern, module_key)
            .copied()
            .unwrap_or(self.r)
    }

    /// The alpha PEFT gives the module (`alpha_pattern`, else `lora_alpha`).
    pub fn alpha_for(&self, module_key: &str) -> f64 {
        AdapterConfig::pattern_key(&self.alpha_pattern, module_key)
            .copied()
            .unwrap_or(self.lora_alpha)
    }

    /// The LoRA scale PEFT uses for the module: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA
    /// (computed in f64 as Python does, then rounded to f32).
    pub fn scale_for(&self, module_key: &str) -> f32 {
        let r = f64::from(self.rank_for(module_key));
        let alpha = self.alpha_for(module_key);
        let s = if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        };
        s as f32
    }

    /// Whether PEFT puts a LoRA on this module (`check_target_module_exists`): not excluded, not
    /// in `modules_to_save`, then a string `target_modules` must fully match as a regex, and a
    /// list matches the whole name or a `.name` suffix, subject to `layers_to_transform`.
    pub fn targets(&self, module_name: &str) -> bool {
        let key = module_name;
        match &self.exclude_modules {
            Some(TargetModules::Regex(s)) if is_match(py_fullmatch(s), key) => return false,
            Some(TargetModules::List(v))
                if v.iter()
                    .any(|e| key == e || key.ends_with(&format!(".{e}"))) =>
            {
                return false
            }
            _ => {}
        }
        if let Some(m) = &self.modules_to_save {
            if m.iter().any(|m| is_match(modules_to_save_regex(m), key)) {
                return false;
            }
        }
        let list = match &self.target_modules {
            TargetModules::Regex(s) => return is_match(py_fullmatch(s), key),
            TargetModules::List(list) => list,
        };
        if list.iter().any(|t| t == key) {
            // Named directly: layers_to_transform does not apply (as in PEFT).
            return true;
        }
        if !list.iter().any(|t| key.ends_with(&format!(".{t}"))) {
            return false;
        }
        let wanted = match &self.layers_to_transform {
            None => return true,
            Some(LayerIndexes::Many(v)) if v.is_empty() => return true,
            Some(l) => l,
        };
        let Some(index) = self.layer_index(key) else {
            return false;
        };
        match wanted {
            LayerIndexes::One(i) => index == *i,
            LayerIndexes::Many(v) => v.contains(&index),
        }
    }

    /// The layer index PEFT reads from a module name (for `layers_to_transform`).
    fn layer_index(&self, key: &str) -> Option<u64> {
        let patterns = self.layers_patterns();
        let caps = if patterns.is_empty() {
            py_match(r".*?\.[^.]*\.(\d+)\.").ok()?.captures(key)
        } else {
            patterns
                .iter()
                .find_map(|p| layers_pattern_regex(p).ok()?.captures(key))
        }?;
        caps.get(1)?.as_str().parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::torch::tests::shared_path as fixture;

    fn write_tmp(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const CHINESE_LLAMA2_LORA: &str = r#"{
  "base_model_name_or_path": "/path/to/llama-2-7b-hf",
  "bias": "none",
  "enable_lora": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "lora_alpha": 128.0,
  "lora_dropout": 0.05,
  "merge_weights": false,
  "modules_to_save": ["embed_tokens", "lm_head"],
  "peft_type": "LORA",
  "r": 64,
  "target_modules": ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
  "task_type": "CAUSAL_LM"
}"#;

    #[test]
    fn torch_save_llama_config() {
        let Some(p) = fixture("fixtures/torch-save-llama") else {
            return;
        };
        let c = LlamaConfig::load(&p).unwrap();
        assert_eq!(c.model_type.as_deref(), Some("llama"));
        assert!(c.architectures.is_empty());
        assert_eq!(c.hidden_size, 256);
        assert_eq!(c.intermediate_size, 768);
        assert_eq!(c.num_hidden_layers, 4);
        assert_eq!(c.num_attention_heads, 8);
        assert_eq!(c.num_key_value_heads, Some(4));
        assert_eq!(c.num_kv_heads(), 4);
        assert_eq!(c.head_dim(), 32);
        assert_eq!(c.rms_norm_eps, 1e-5);
        // transformers 5 layout: rope_parameters and dtype.
        assert_eq!(c.rope_theta, Some(10000.0));
        assert!(c.rope_scaling.is_none());
        assert_eq!(c.torch_dtype.as_deref(), Some("float16"));
        assert_eq!(c.max_position_embeddings, 1024);
        assert_eq!(c.vocab_size, 1024);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.bos_token_id, Some(1));
        assert_eq!(c.eos_token_id, Some(TokenIds::One(2)));
        assert_eq!(c.pad_token_id, None);
        c.validate().unwrap();
        assert!(c.path.ends_with("config.json"));
    }

    #[test]
    fn config_rewrite_keeps_order_and_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let text = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"rms_norm_eps":1e-6,
            "max_position_embeddings":4096,"vocab_size":32000,"torch_dtype":"float16",
            "custom_thing":{"a":[1,2]},"eos_token_id":[2,7],"rope_theta":500000.0,
            "rope_scaling":{"type":"linear","factor":2.0,"extra_key":3}}"#;
        let p = write_tmp(&dir, "config.json", text);
        let mut c = LlamaConfig::load(dir.path()).unwrap();
        assert_eq!(c.num_key_value_heads, None);
        assert_eq!(c.num_kv_heads(), 4, "defaults to heads");
        assert_eq!(c.head_dim(), 16);
        assert_eq!(c.eos_token_id.as_ref().unwrap().first(), Some(2));
        assert_eq!(c.eos_token_id.as_ref().unwrap().to_vec(), vec![2, 7]);
        let rs = c.rope_scaling.as_ref().unwrap();
        assert_eq!(rs.kind(), Some("linear"));
        assert_eq!(rs.factor, Some(2.0));
        assert_eq!(rs.extra.get("extra_key"), Some(&Value::from(3)));
        c.validate().unwrap();
        c.set_vocab_size(55296);
        c.set_torch_dtype("bfloat16");
        let out = dir.path().join("out.json");
        c.write(&out).unwrap();
        let again = LlamaConfig::load(&out).unwrap();
        assert_eq!(again.vocab_size, 55296);
        assert_eq!(again.torch_dtype.as_deref(), Some("bfloat16"));
        assert_eq!(again.raw.get("custom_thing"), c.raw.get("custom_thing"));
        let keys: Vec<&String> = again.raw.keys().collect();
        let orig = LlamaConfig::load(&p).unwrap().raw;
        assert_eq!(keys, orig.keys().collect::<Vec<_>>(), "key order kept");
    }

    #[test]
    fn config_errors_name_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let base = |drop: &str, over: Option<(&str, &str)>| {
            let mut m = serde_json::json!({
                "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "rms_norm_eps": 1e-6,
                "max_position_embeddings": 4096, "vocab_size": 32000
            });
            let o = m.as_object_mut().unwrap();
            o.remove(drop);
            if let Some((k, v)) = over {
                o.insert(k.into(), serde_json::from_str(v).unwrap());
            }
            m.to_string()
        };
        let p = write_tmp(&dir, "config.json", &base("hidden_size", None));
        let e = LlamaConfig::load(&p).unwrap_err();
        assert!(
            matches!(&e, HfError::Field { field, .. } if field == "hidden_size"),
            "{e}"
        );
        assert!(e.to_string().contains("config.json"), "{e}");
        std::fs::write(&p, base("", Some(("vocab_size", "\"big\"")))).unwrap();
        let e = LlamaConfig::load(&p).unwrap_err();
        assert!(
            matches!(&e, HfError::Field { field, .. } if field == "vocab_size"),
            "{e}"
        );
        std::fs::write(&p, base("", Some(("hidden_size", "-5")))).unwrap();
        assert!(LlamaConfig::load(&p).is_err());
        std::fs::write(&p, base("", Some(("rope_scaling", "{\"factor\":\"x\"}")))).unwrap();
        let e = LlamaConfig::load(&p).unwrap_err();
        assert!(e.to_string().contains("rope_scaling"), "{e}");
        // validate
        for (k, v, field) in [
            ("num_attention_heads", "5", "num_attention_heads"),
            ("num_key_value_heads", "3", "num_key_value_heads"),
            ("num_key_value_heads", "0", "num_key_value_heads"),
            ("vocab_size", "0", "vocab_size"),
            ("rms_norm_eps", "0.0", "rms_norm_eps"),
            ("head_dim", "7", "head_dim"),
        ] {
            std::fs::write(&p, base("", Some((k, v)))).unwrap();
            let e = LlamaConfig::load(&p).unwrap().validate().unwrap_err();
            assert!(
                matches!(&e, HfError::Field { field: f, .. } if f == field),
                "{k}: {e}"
            );
        }
        // null kv heads means "same as heads"
        std::fs::write(&p, base("", Some(("num_key_value_heads", "null")))).unwrap();
        assert_eq!(LlamaConfig::load(&p).unwrap().num_kv_heads(), 4);
        // Not JSON / not an object / missing file.
        std::fs::write(&p, "{").unwrap();
        assert!(matches!(LlamaConfig::load(&p), Err(HfError::Syntax { .. })));
        std::fs::write(&p, "[1]").unwrap();
        assert!(matches!(
            LlamaConfig::load(&p),
            Err(HfError::NotObject { .. })
        ));
        assert!(matches!(
            LlamaConfig::load(&dir.path().join("nope.json")),
            Err(HfError::Io { .. })
        ));
    }

    #[test]
    fn chinese_llama2_tokenizer_files() {
        let Some(d) = fixture("fixtures/chinese-llama-2-tokenizer") else {
            return;
        };
        let t = TokenizerConfig::load(&d).unwrap();
        assert_eq!(t.add_bos_token, Some(true));
        assert_eq!(t.add_eos_token, Some(false));
        assert_eq!(t.add_prefix_space, None);
        assert_eq!(t.bos_token.as_ref().unwrap().content(), "<s>");
        assert_eq!(t.eos_token.as_ref().unwrap().content(), "</s>");
        assert_eq!(t.unk_token.as_ref().unwrap().content(), "<unk>");
        assert!(t.pad_token.is_none());
        assert!(t.chat_template.is_none());
        assert!(t.added_tokens_decoder.is_empty());
        assert!(t.model_max_length.unwrap() > 1e29);
        assert_eq!(t.tokenizer_class.as_deref(), Some("LlamaTokenizer"));
        assert_eq!(t.legacy, None);
        assert!(t.raw.contains_key("sp_model_kwargs"));
        let s = SpecialTokensMap::load(&d).unwrap();
        assert_eq!(s.bos_token.unwrap().content(), "<s>");
        assert_eq!(s.eos_token.unwrap().content(), "</s>");
        assert_eq!(s.unk_token.unwrap().content(), "<unk>");
        assert_eq!(s.pad_token, Some(TokenSpec::Text("<pad>".into())));
    }

    #[test]
    fn tokenizer_config_variants() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_tmp(
            &dir,
            "tokenizer_config.json",
            r#"{"chat_template":[{"name":"default","template":"{{x}}"},{"name":"tool_use","template":"t"}],
                "added_tokens_decoder":{"32000":{"content":"<pad>","special":true,"lstrip":false},
                                        "4":{"content":"<x>"}},
                "pad_token":"<pad>","legacy":false,"add_prefix_space":true}"#,
        );
        let t = TokenizerConfig::load(&p).unwrap();
        assert_eq!(t.chat_template.as_deref(), Some("{{x}}"));
        assert_eq!(t.chat_templates.len(), 2);
        assert_eq!(t.chat_templates[1].name, "tool_use");
        assert_eq!(t.added_tokens_decoder["32000"].content, "<pad>");
        assert!(t.added_tokens_decoder["32000"].special);
        assert!(!t.added_tokens_decoder["4"].special);
        let by_id = t.added_tokens_by_id();
        assert_eq!((by_id[0].0, by_id[1].0), (4, 32000));
        assert_eq!(t.legacy, Some(false));
        std::fs::write(&p, r#"{"chat_template":"{{ bos_token }}"}"#).unwrap();
        let t = TokenizerConfig::load(&p).unwrap();
        assert_eq!(t.chat_template.as_deref(), Some("{{ bos_token }}"));
        assert!(t.chat_templates.is_empty());
        std::fs::write(
            &p,
            r#"{"chat_template":[{"name":"tool_use","template":"t"}]}"#,
        )
        .unwrap();
        let t = TokenizerConfig::load(&p).unwrap();
        assert_eq!(t.chat_template, None, "no default entry");
        assert_eq!(t.chat_templates.len(), 1);
        std::fs::write(&p, r#"{"added_tokens_decoder":{"x":{"content":"a"}}}"#).unwrap();
        let e = TokenizerConfig::load(&p).unwrap_err();
        assert!(e.to_string().contains("added_tokens_decoder"), "{e}");
        std::fs::write(&p, r#"{"add_bos_token":"yes"}"#).unwrap();
        let e = TokenizerConfig::load(&p).unwrap_err();
        assert!(
            matches!(&e, HfError::Field { field, .. } if field == "add_bos_token"),
            "{e}"
        );
    }

    #[test]
    fn added_tokens_and_generation_config() {
        let dir = tempfile::tempdir().unwrap();
        write_tmp(&dir, "added_tokens.json", r#"{"<b>":32001,"<a>":32000}"#);
        let a = AddedTokens::load(dir.path()).unwrap();
        assert_eq!(a.tokens, vec![("<b>".into(), 32001), ("<a>".into(), 32000)]);
        assert_eq!(a.sorted_by_id()[0].0, "<a>");
        write_tmp(&dir, "added_tokens.json", r#"{"<b>":-1}"#);
        let e = AddedTokens::load(dir.path()).unwrap_err();
        assert!(
            matches!(&e, HfError::Field { field, .. } if field == "<b>"),
            "{e}"
        );
        write_tmp(
            &dir,
            "generation_config.json",
            r#"{"bos_token_id":1,"eos_token_id":[2,32000],"temperature":0.6}"#,
        );
        let g = GenerationConfig::load(dir.path()).unwrap();
        assert_eq!(g.bos_token_id, Some(1));
        assert_eq!(g.eos_token_id, Some(TokenIds::Many(vec![2, 32000])));
        assert_eq!(g.pad_token_id, None);
        assert!(g.raw.contains_key("temperature"));
    }

    #[test]
    fn chinese_llama2_adapter_config() {
        let dir = tempfile::tempdir().unwrap();
        write_tmp(&dir, "adapter_config.json", CHINESE_LLAMA2_LORA);
        let a = AdapterConfig::load(dir.path()).unwrap();
        assert_eq!(a.r, 64);
        assert_eq!(a.lora_alpha, 128.0);
        assert_eq!(a.bias, LoraBias::None);
        assert!(!a.use_rslora && !a.use_dora && !a.fan_in_fan_out);
        assert!(a.inference_mode);
        assert_eq!(
            a.modules_to_save.as_deref(),
            Some(&["embed_tokens".to_string(), "lm_head".to_string()][..])
        );
        assert_eq!(a.scale_for("model.layers.0.self_attn.q_proj"), 2.0);
        assert_eq!(a.rank_for("model.layers.31.mlp.down_proj"), 64);
        for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            assert!(a.targets(&format!("model.layers.3.self_attn.{m}")), "{m}");
        }
        for m in ["gate_proj", "up_proj", "down_proj"] {
            assert!(a.targets(&format!("model.layers.3.mlp.{m}")), "{m}");
        }
        assert!(a.targets("q_proj"));
        assert!(!a.targets("model.layers.3.self_attn.q_proj_x"));
        assert!(!a.targets("model.layers.3.self_attn.xq_proj"));
        assert!(!a.targets("model.embed_tokens"));
        assert!(!a.targets("lm_head"));
        assert!(!a.targets("model.layers.3.self_attn"));
    }

    #[test]
    fn adapter_patterns_follow_peft() {
        let text = r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":["q_proj","v_proj"],
            "rank_pattern":{"layers.0.self_attn.q_proj":4,"v_proj":2},
            "alpha_pattern":{"^model.layers.1\\..*":3},"use_rslora":false}"#;
        let a = AdapterConfig::parse(text, Path::new("adapter_config.json")).unwrap();
        // pattern matches a dotted suffix
        assert_eq!(a.rank_for("model.layers.0.self_attn.q_proj"), 4);
        assert_eq!(a.rank_for("model.layers.10.self_attn.q_proj"), 8);
        assert_eq!(a.rank_for("model.layers.5.self_attn.v_proj"), 2);
        assert_eq!(a.scale_for("model.layers.0.self_attn.q_proj"), 4.0);
        assert_eq!(a.scale_for("model.layers.5.self_attn.v_proj"), 8.0);
        // a suffix that is not at a dot boundary does not match
        assert_eq!(a.rank_for("model.layers.5.self_attn.xv_proj"), 8);
        // `(.*\.)?(^model...)$`: the caret can only match at the start
        assert_eq!(a.alpha_for("model.layers.1.mlp.up_proj"), 3.0);
        assert_eq!(a.alpha_for("model.layers.2.mlp.up_proj"), 16.0);
        // rsLoRA
        let text = r#"{"peft_type":"LORA","r":64,"lora_alpha":16,"target_modules":"model\\.layers\\.\\d+\\.self_attn\\.(q|v)_proj","use_rslora":true}"#;
        let a = AdapterConfig::parse(text, Path::new("a.json")).unwrap();
        assert_eq!(a.scale_for("x"), 2.0);
        assert!(a.targets("model.layers.12.self_attn.q_proj"));
        assert!(
            !a.targets("base.model.layers.12.self_attn.q_proj"),
            "full match"
        );
        assert!(!a.targets("model.layers.12.self_attn.k_proj"));
        // layers_to_transform with and without layers_pattern
        let text = r#"{"peft_type":"LORA","r":8,"lora_alpha":8,"target_modules":["q_proj"],
            "layers_to_transform":[0,2]}"#;
        let a = AdapterConfig::parse(text, Path::new("a.json")).unwrap();
        assert!(a.targets("model.layers.0.self_attn.q_proj"));
        assert!(!a.targets("model.layers.1.self_attn.q_proj"));
        assert!(a.targets("model.layers.2.self_attn.q_proj"));
        assert!(a.targets("q_proj"), "exact names skip the layer filter");
        let text = r#"{"peft_type":"LORA","r":8,"lora_alpha":8,"target_modules":["q_proj"],
            "layers_to_transform":1,"layers_pattern":"layers"}"#;
        let a = AdapterConfig::parse(text, Path::new("a.json")).unwrap();
        assert!(a.targets("model.layers.1.self_attn.q_proj"));
        assert!(!a.targets("model.layers.11.self_attn.q_proj"));
        assert!(!a.targets("model.blocks.1.self_attn.q_proj"));
        // exclude_modules
        let text = r#"{"peft_type":"LORA","r":8,"lora_alpha":8,"target_modules":["q_proj"],
            "exclude_modules":["layers.0.self_attn.q_proj"]}"#;
        let a = AdapterConfig::parse(text, Path::new("a.json")).unwrap();
        assert!(!a.targets("model.layers.0.self_attn.q_proj"));
        assert!(a.targets("model.layers.1.self_attn.q_proj"));
    }

    #[test]
    fn adapter_errors_name_file_and_field() {
        let path = Path::new("/x/adapter_config.json");
        let e = AdapterConfig::parse(
            r#"{"peft_type":"PREFIX_TUNING","num_virtual_tokens":20}"#,
            path,
        )
        .unwrap_err();
        assert!(matches!(&e, HfError::NotLora { found, .. } if found == "PREFIX_TUNING"));
        let msg = e.to_string();
        assert!(
            msg.contains("adapter_config.json") && msg.contains("peft_type"),
            "{msg}"
        );
        let cases = [
            (
                r#"{"r":8,"lora_alpha":8,"target_modules":["q"]}"#,
                "peft_type",
            ),
            (
                r#"{"peft_type":"LORA","lora_alpha":8,"target_modules":["q"]}"#,
                "r",
            ),
            (
                r#"{"peft_type":"LORA","r":8,"target_modules":["q"]}"#,
                "lora_alpha",
            ),
            (
                r#"{"peft_type":"LORA","r":8,"lora_alpha":8}"#,
                "target_modules",
            ),
            (
                r#"{"peft_type":"LORA","r":"8","lora_alpha":8,"target_modules":["q"]}"#,
                "r",
            ),
            (
                r#"{"peft_type":"LORA","r":0,"lora_alpha":8,"target_modules":["q"]}"#,
                "r",
            ),
            (
                r#"{"peft_type":"LORA","r":8,"lora_alpha":8,"target_modules":5}"#,
                "target_modules",
            ),
            (
                r#"{"peft_type":"LORA","r":8,"lora_alpha":8,"target_modules":["q"],"bias":"some"}"#,
                "bias",
            ),
            (
                r#"{"peft_type":"LORA","r":8,"lora_alpha":8,"target_modules":["q"],"rank_pattern":{"a":"x"}}"#,
                "rank_pattern",
            ),
            (
                r#"{"peft_type":"LORA","r":8,"lora_alpha":8,"target_modules":["q"],"rank_pattern":{"a":0}}"#,
                "rank_pattern.a",
            ),
            (
                r#"{"peft_type":"LORA","r":8,"lora_alpha":8,"target_modules":"(?<=x)q"}"#,
                "target_modules",
            ),
            (
                r#"{"peft_type":"LORA","r":8,"lora_alpha":8,"target_modules":["q"],"use_rslora":1}"#,
                "use_rslora",
            ),
            (
                r#"{"peft_type":7,"r":8,"lora_alpha":8,"target_modules":["q"]}"#,
                "peft_type",
            ),
        ];
        for (text, field) in cases {
            let e = AdapterConfig::parse(text, path).unwrap_err();
            assert!(
                matches!(&e, HfError::Field { field: f, .. } if f == field),
                "{text}: {e}"
            );
            assert!(e.to_string().contains("adapter_config.json"), "{e}");
        }
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[a-z_.()|*?^$\\\\0-9\\[\\]]{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::vec(("[a-z_]{1,8}", inner), 0..4)
                    .prop_map(|v| Value::Object(v.into_iter().collect())),
            ]
        })
    }

    const KEYS: &[&str] = &[
        "peft_type",
        "r",
        "lora_alpha",
        "target_modules",
        "exclude_modules",
        "modules_to_save",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        "use_rslora",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "head_dim",
        "rope_scaling",
        "rope_parameters",
        "eos_token_id",
        "chat_template",
        "added_tokens_decoder",
        "bos_token",
    ];

    proptest::proptest! {
        #[test]
        fn arbitrary_json_never_panics(
            fields in proptest::collection::vec((0..KEYS.len(), json_value()), 0..12),
            lora in proptest::bool::ANY,
            probe in "[a-z_.0-9]{0,24}",
        ) {
            let mut m = Map::new();
            if lora {
                m.insert("peft_type".into(), Value::from("LORA"));
            }
            for (k, v) in fields {
                m.insert(KEYS[k].into(), v);
            }
            let text = Value::Object(m).to_string();
            let p = Path::new("fuzz.json");
            if let Ok(a) = AdapterConfig::parse(&text, p) {
                let _ = (a.targets(&probe), a.scale_for(&probe), a.rank_for(&probe));
            }
            if let Ok(c) = LlamaConfig::parse(&text, p) {
                let _ = (c.validate(), c.head_dim());
            }
            let raw = parse_object(text.as_bytes(), p).unwrap();
            let _ = typed::<TokenizerConfig>(&raw, p);
            let _ = typed::<SpecialTokensMap>(&raw, p);
            let _ = typed::<GenerationConfig>(&raw, p);
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,200}") {
            let p = Path::new("fuzz.json");
            let _ = AdapterConfig::parse(&text, p);
            let _ = LlamaConfig::parse(&text, p);
        }
    }
}
