//! The tokenizers of GGUF vocabularies, exactly as llama.cpp's llama-vocab: SentencePiece
//! (`tokenizer.ggml.model = "llama"`, [`spm`]) and byte-level BPE (`"gpt2"`, [`bpe`] with the
//! pre-tokenizers of [`pre`]), behind one [`Tokenizer`].

mod bpe;
mod pre;
mod spm;

use anyhow::{anyhow, bail, Result};
use kiln_formats::gguf::{GgufHeader, GgufValue};

pub use pre::supported_names as supported_pre_names;

/// The words the pre-tokenizer of `tokenizer.ggml.pre` = `pre_name` cuts `text` into (before
/// byte encoding), as llama.cpp's `unicode_regex_split`; an unknown name is an error.
pub fn pre_split(pre_name: &str, text: &str) -> Result<Vec<String>> {
    let p = pre::lookup(Some(pre_name))?;
    Ok(pre::split(p.set, text)
        .into_iter()
        .map(|(a, b)| text[a..b].to_string())
        .collect())
}

/// A GGUF vocabulary's tokenizer.
#[derive(Clone, Debug)]
pub struct Tokenizer(Inner);

#[derive(Clone, Debug)]
enum Inner {
    Spm(Box<spm::Tokenizer>),
    Bpe(Box<bpe::Tokenizer>),
}

/// Calls the same method on whichever tokenizer it is.
macro_rules! each {
    ($self:ident, $t:ident => $e:expr) => {
        match &$self.0 {
            Inner::Spm($t) => $e,
            Inner::Bpe($t) => $e,
        }
    };
}

// Some accessors serve only the evaluator (src/model, src/eval), which is built separately.
#[allow(dead_code)]
impl Tokenizer {
    /// From the GGUF vocabulary keys `tokenizer.ggml.*`: "llama" (SentencePiece) or "gpt2"
    /// (byte-level BPE); other models and files without a vocabulary are a clear error.
    pub fn from_gguf(header: &GgufHeader) -> Result<Tokenizer> {
        let model = match header.get("tokenizer.ggml.model") {
            None => bail!(
                "the model has no vocabulary: metadata key tokenizer.ggml.model is missing \
                 (a GGUF written without tokenizer.ggml.* keys cannot be tokenized)"
            ),
            Some(v) => v
                .as_str()
                .ok_or_else(|| anyhow!("tokenizer.ggml.model is not a string"))?,
        };
        match model {
            "llama" => Ok(Tokenizer(Inner::Spm(Box::new(spm::Tokenizer::from_gguf(
                header,
            )?)))),
            "gpt2" => Ok(Tokenizer(Inner::Bpe(Box::new(bpe::Tokenizer::from_gguf(
                header,
            )?)))),
            "no_vocab" | "none" => {
                bail!("the model has no vocabulary (tokenizer.ggml.model = {model:?})")
            }
            other => bail!(
                "unsupported tokenizer model {other:?}: kiln implements SentencePiece \"llama\" and \
                 byte-level BPE \"gpt2\""
            ),
        }
    }

    /// `tokenizer.ggml.bos_token_id` when present and in range of `tokenizer.ggml.tokens`,
    /// without building the tokenizer (for what needs only BOS, as `kiln bench`).
    pub fn bos_of(header: &GgufHeader) -> Option<u32> {
        let id = header
            .get("tokenizer.ggml.bos_token_id")
            .and_then(GgufValue::as_u32)?;
        match header.get("tokenizer.ggml.tokens") {
            Some(GgufValue::Array(a)) if (id as usize) < a.len() => Some(id),
            _ => None,
        }
    }

    /// The BOS that `encode(.., add_special = true, ..)` would put first, read from the metadata
    /// keys alone without building the tokenizer (what `kiln bench` needs for its random
    /// tokens): None when the vocabulary adds no BOS. add_bos is `tokenizer.ggml.add_bos_token`,
    /// else the model's default (SentencePiece: true; BPE: true for the Llama-3 and Tekken
    /// pre-tokenizers); the id is `tokenizer.ggml.bos_token_id`, else 1 for SentencePiece, 11 for
    /// BPE. A vocabulary that is missing or malformed gives None, never an error.
    pub fn bos_from_keys(header: &GgufHeader) -> Option<u32> {
        let model = header
            .get("tokenizer.ggml.model")
            .and_then(GgufValue::as_str)?;
        let (default_add, default_id) = match model {
            "llama" => (true, Some(1)),
            "gpt2" => {
                let pre = header.get("tokenizer.ggml.pre").and_then(GgufValue::as_str);
                let p = pre::lookup(pre).ok();
                (
                    p.is_some_and(|p| p.add_bos),
                    (!p.is_some_and(|p| p.no_bos)).then_some(11),
                )
            }
            _ => return None,
        };
        let add = header
            .get("tokenizer.ggml.add_bos_token")
            .and_then(GgufValue::as_bool)
            .unwrap_or(default_add);
        if !add {
            return None;
        }
        let n = match header.get("tokenizer.ggml.tokens") {
            Some(GgufValue::Array(a)) => a.len(),
            _ => 0,
        };
        Self::bos_of(header).or(default_id.filter(|&d| (d as usize) < n))
    }

    /// llama.cpp's `llama_tokenize(text, add_special, parse_special)`; see [`spm::Tokenizer::encode`]
    /// and [`bpe::Tokenizer::encode_bytes`].
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        self.encode_bytes(text.as_bytes(), add_special, parse_special)
    }

    /// [`Tokenizer::encode`] for raw bytes, as llama.cpp accepts them.
    pub fn encode_bytes(&self, text: &[u8], add_special: bool, parse_special: bool) -> Vec<u32> {
        each!(self, t => t.encode_bytes(text, add_special, parse_special))
    }

    /// The token's text as bytes, as llama.cpp's `token_to_piece(id, special = true)`.
    pub fn decode_piece(&self, id: u32) -> Vec<u8> {
        each!(self, t => t.decode_piece(id))
    }

    /// Number of tokens in the vocabulary.
    pub fn n_vocab(&self) -> usize {
        each!(self, t => t.n_vocab())
    }

    /// The BOS token, if the vocabulary has one.
    pub fn bos(&self) -> Option<u32> {
        each!(self, t => t.bos())
    }

    /// The EOS token, if the vocabulary has one.
    pub fn eos(&self) -> Option<u32> {
        each!(self, t => t.eos())
    }

    /// The unknown token, if the vocabulary has one.
    pub fn unk(&self) -> Option<u32> {
        each!(self, t => t.unk())
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS.
    pub fn add_bos(&self) -> bool {
        each!(self, t => t.add_bos())
    }

    /// Whether `encode(.., add_special = true, ..)` ends with EOS.
    pub fn add_eos(&self) -> bool {
        each!(self, t => t.add_eos())
    }

    /// Whether a space is prepended to text (SentencePiece's add_space_prefix; never for BPE).
    pub fn add_space_prefix(&self) -> bool {
        match &self.0 {
            Inner::Spm(t) => t.add_space_prefix(),
            Inner::Bpe(_) => false,
        }
    }

    /// The token's text as stored in the vocabulary ("" for out-of-range ids).
    pub fn token_text(&self, id: u32) -> &str {
        each!(self, t => t.token_text(id))
    }

    /// The token's score (0 for out-of-range ids and for BPE vocabularies).
    pub fn token_score(&self, id: u32) -> f32 {
        match &self.0 {
            Inner::Spm(t) => t.token_score(id),
            Inner::Bpe(_) => 0.0,
        }
    }

    /// The id of the token whose text is exactly `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        each!(self, t => t.token_id(text))
    }

    /// "llama" or "gpt2".
    pub fn model(&self) -> &'static str {
        match &self.0 {
            Inner::Spm(_) => "llama",
            Inner::Bpe(_) => "gpt2",
        }
    }
}
