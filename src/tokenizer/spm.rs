//! llama.cpp's SentencePiece ("llama") tokenizer driven by a GGUF vocabulary (`tokenizer.ggml.*`).
//!
//! A reimplementation of `llama_vocab::impl::tokenize` for `LLAMA_VOCAB_TYPE_SPM`
//! (llama.cpp src/llama-vocab.cpp): special-token partition (`tokenizer_st_partition`), the space
//! prefix, U+2581 escaping, the bigram merge loop of `llm_tokenizer_spm_session` (priority by score,
//! then leftmost) and byte fallback. Differences from the Python `sentencepiece` package that follow
//! from llama.cpp's algorithm are documented on [`Tokenizer::encode`].

use anyhow::{anyhow, bail, Context, Result};
use kiln_formats::gguf::{GgufArray, GgufHeader, GgufValue};
use std::collections::{BinaryHeap, HashMap, HashSet};

// llama_token_attr bits (include/llama.h).
pub(super) const ATTR_UNKNOWN: u32 = 1 << 0;
pub(super) const ATTR_UNUSED: u32 = 1 << 1;
pub(super) const ATTR_NORMAL: u32 = 1 << 2;
pub(super) const ATTR_CONTROL: u32 = 1 << 3;
pub(super) const ATTR_USER_DEFINED: u32 = 1 << 4;
pub(super) const ATTR_BYTE: u32 = 1 << 5;
pub(super) const ATTR_LSTRIP: u32 = 1 << 7;
pub(super) const ATTR_RSTRIP: u32 = 1 << 8;

/// The most tokens a vocabulary may have (llama.cpp stores ids as int32).
pub(super) const MAX_VOCAB: usize = i32::MAX as usize;

/// Token texts llama.cpp forces to CONTROL by name when loading a vocabulary (EOT, EOM, FIM and EOG
/// auto-detection in `llama_vocab::impl::load`).
pub(super) const CONTROL_BY_TEXT: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
    "<|eom_id|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "</s>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "[e~[",
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<PAD>",
    "[PAD]",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

/// A SentencePiece ("llama") vocabulary, tokenizing exactly as llama.cpp does.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    /// Token text per id, as stored in the GGUF (empty texts become `[EMPTY_i]`, as in llama.cpp).
    texts: Vec<String>,
    scores: Vec<f32>,
    /// Per token, the rank of its score among the distinct scores (higher score, higher rank;
    /// NaN ranks with -inf).
    ranks: Vec<u32>,
    attrs: Vec<u32>,
    /// Token text -> id.
    index: HashMap<Box<[u8]>, u32>,
    /// CONTROL, USER_DEFINED and UNKNOWN tokens, longest text first (`cache_special_tokens`).
    specials: Vec<u32>,
    /// Byte -> `<0xXX>` token (or the one-byte text token), for byte fallback.
    byte_ids: [Option<u32>; 256],
    /// Adjacent character pairs found in vocabulary pieces: ASCII pairs as a bit set, others as
    /// `a << 32 | b`.
    ascii_pairs: [u64; 256],
    pairs: HashSet<u64>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
}

/// A piece of input during the special-token partition: raw text (a byte range) or a token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Fragment {
    Text { start: usize, len: usize },
    Token(u32),
}

/// A symbol of the merge loop (`llm_symbol`): bytes `start..start+n` of the run; `prev` and
/// `next` link the live symbols, [`NONE`] ending the chain.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: u32,
    n: u32,
    prev: u32,
    next: u32,
}

/// No symbol.
const NONE: u32 = u32::MAX;

/// The longest run the merge loop takes at once: llama.cpp's API limit (an int32 text length).
const MAX_RUN: usize = 1 << 31;

/// A candidate merge (`llm_bigram_spm`). `key` orders the queue as llama.cpp's priority queue pops
/// it: the rank of the merged piece's score in the high half (equal scores share a rank), the
/// complement of the left index in the low half, so the greatest key is the highest score, then
/// the leftmost pair. Entries with equal keys differ only in stale data, so their order is moot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Bigram {
    key: u64,
    right: u32,
    size: u32,
}

impl Bigram {
    fn left(&self) -> u32 {
        u32::MAX - self.key as u32
    }
}

/// `tokenizer.ggml.tokens`, checked as llama-vocab checks it (present, not empty, within its limit).
pub(super) fn read_tokens(header: &GgufHeader) -> Result<&[String]> {
    let tokens = match header.get("tokenizer.ggml.tokens") {
        None => bail!("the model has no vocabulary: tokenizer.ggml.tokens is missing"),
        Some(GgufValue::Array(GgufArray::String(t))) => t,
        Some(_) => bail!("tokenizer.ggml.tokens is not an array of strings"),
    };
    let n = tokens.len();
    if n == 0 {
        bail!("the model has no vocabulary: tokenizer.ggml.tokens is empty");
    }
    if n > MAX_VOCAB {
        bail!("tokenizer.ggml.tokens has {n} entries, more than llama.cpp's limit");
    }
    Ok(tokens)
}

/// The token table both vocabularies share: texts (an empty one becomes `[EMPTY_i]`, as in
/// llama.cpp), attributes from `tokenizer.ggml.token_type`, and text → id (texts must be unique).
#[allow(clippy::type_complexity)]
pub(super) fn token_table(
    header: &GgufHeader,
    tokens: &[String],
) -> Result<(Vec<String>, Vec<u32>, HashMap<Box<[u8]>, u32>)> {
    let n = tokens.len();
    let types: Option<Vec<i64>> = match header.get("tokenizer.ggml.token_type") {
        None => None,
        Some(GgufValue::Array(a)) => {
            let v = int_array(a)
                .ok_or_else(|| anyhow!("tokenizer.ggml.token_type is not an integer array"))?;
            if v.len() < n {
                bail!(
                    "tokenizer.ggml.token_type has {} entries for {n} tokens",
                    v.len()
                );
            }
            Some(v)
        }
        Some(_) => bail!("tokenizer.ggml.token_type is not an array"),
    };

    let mut texts = Vec::with_capacity(n);
    let mut attrs = Vec::with_capacity(n);
    let mut index: HashMap<Box<[u8]>, u32> = HashMap::with_capacity(n);
    for (i, t) in tokens.iter().enumerate() {
        let text = if t.is_empty() {
            format!("[EMPTY_{i}]")
        } else {
            t.clone()
        };
        let id = u32::try_from(i).context("token id overflows u32")?;
        if let Some(prev) = index.insert(text.as_bytes().into(), id) {
            // llama.cpp asserts that texts are unique (id_to_token.size() == token_to_id.size()).
            bail!("tokenizer.ggml.tokens: token {i} repeats the text {text:?} of token {prev}");
        }
        let attr = match types.as_ref().and_then(|t| t.get(i)) {
            None | Some(1) => ATTR_NORMAL,
            Some(2) => ATTR_UNKNOWN,
            Some(3) => ATTR_CONTROL,
            Some(4) => ATTR_USER_DEFINED,
            Some(5) => ATTR_UNUSED,
            Some(6) => ATTR_BYTE,
            Some(_) => 0,
        };
        texts.push(text);
        attrs.push(attr);
    }
    Ok((texts, attrs, index))
}

/// An integer array value as i64s (GGUF arrays of any integer type).
pub(super) fn int_array(a: &GgufArray) -> Option<Vec<i64>> {
    Some(match a {
        GgufArray::I32(v) => v.iter().map(|&x| i64::from(x)).collect(),
        GgufArray::U32(v) => v.iter().map(|&x| i64::from(x)).collect(),
        GgufArray::I8(v) => v.iter().map(|&x| i64::from(x)).collect(),
        GgufArray::U8(v) => v.iter().map(|&x| i64::from(x)).collect(),
        GgufArray::I16(v) => v.iter().map(|&x| i64::from(x)).collect(),
        GgufArray::U16(v) => v.iter().map(|&x| i64::from(x)).collect(),
        GgufArray::I64(v) => v.clone(),
        _ => return None,
    })
}

/// C `isspace` in the "C" locale.
fn c_isspace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// The length of the UTF-8 sequence a byte starts, by its high nibble (llama.cpp's
/// `unicode_len_utf8`: continuation and invalid bytes count as 1).
fn utf8_len(b: u8) -> usize {
    match b >> 4 {
        0xc | 0xd => 2,
        0xe => 3,
        0xf => 4,
        _ => 1,
    }
}

/// The first occurrence of `needle` in `hay` (non-empty needle).
fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let last_start = hay.len().checked_sub(needle.len())?;
    let mut i = 0;
    while i <= last_start {
        let off = hay.get(i..=last_start)?.iter().position(|&b| b == first)?;
        i += off;
        if hay.get(i + 1..i + needle.len()) == Some(rest) {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// `tokenizer_st_partition`: splits `text` on the `specials` (ids, longest text first), USER_DEFINED
/// ones always, CONTROL and UNKNOWN ones only with `parse_special`; LSTRIP/RSTRIP eat the
/// whitespace beside a match.
pub(super) fn st_partition(
    text: &[u8],
    specials: &[u32],
    attrs: &[u32],
    texts: &[String],
    parse_special: bool,
) -> Vec<Fragment> {
    let mut frags = vec![Fragment::Text {
        start: 0,
        len: text.len(),
    }];
    for &id in specials {
        let attr = attrs[id as usize];
        if !parse_special && attr & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
            continue;
        }
        let needle = texts[id as usize].as_bytes();
        let mut next = Vec::with_capacity(frags.len());
        for f in frags {
            let Fragment::Text {
                mut start,
                len: mut flen,
            } = f
            else {
                next.push(f);
                continue;
            };
            loop {
                let end = start + flen;
                let Some(m) = find_bytes(&text[start..end], needle).map(|p| p + start) else {
                    next.push(Fragment::Text { start, len: flen });
                    break;
                };
                if m > start {
                    let mut l = m - start;
                    if attr & ATTR_LSTRIP != 0 {
                        while l > 0 && c_isspace(text[start + l - 1]) {
                            l -= 1;
                        }
                    }
                    if l > 0 {
                        next.push(Fragment::Text { start, len: l });
                    }
                }
                next.push(Fragment::Token(id));
                let mut r = m + needle.len();
                if r < end {
                    if attr & ATTR_RSTRIP != 0 {
                        while r < end && c_isspace(text[r]) {
                            r += 1;
                        }
                    }
                    start = r;
                    flen = end - r;
                    if flen == 0 {
                        break;
                    }
                } else {
                    break;
                }
            }
        }
        frags = next;
    }
    frags
}

// Some accessors serve only the evaluator (src/model, src/eval), which is built separately.
#[allow(dead_code)]
impl Tokenizer {
    /// From the GGUF vocabulary keys `tokenizer.ggml.*`. The tokenizer model must be "llama"
    /// (SentencePiece); other models and files without a vocabulary are a clear error.
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
            "llama" => {}
            "no_vocab" | "none" => {
                bail!("the model has no vocabulary (tokenizer.ggml.model = {model:?})")
            }
            other => bail!(
                "unsupported tokenizer model {other:?}: kiln implements only the SentencePiece \
                 \"llama\" tokenizer"
            ),
        }
        let tokens = read_tokens(header)?;
        let n = tokens.len();
        let scores: Vec<f32> = match header.get("tokenizer.ggml.scores") {
            None => vec![0.0; n],
            Some(GgufValue::Array(GgufArray::F32(s))) if s.len() >= n => s[..n].to_vec(),
            Some(GgufValue::Array(GgufArray::I32(s))) if s.len() >= n => {
                s[..n].iter().map(|&x| x as f32).collect()
            }
            Some(GgufValue::Array(a @ (GgufArray::F32(_) | GgufArray::I32(_)))) => bail!(
                "tokenizer.ggml.scores has {} entries for {n} tokens",
                a.len()
            ),
            Some(_) => bail!("tokenizer.ggml.scores is not an array of f32 or i32"),
        };
        let (texts, mut attrs, index) = token_table(header, tokens)?;

        // Special ids: llama.cpp's defaults for "llama" (bos 1, eos 2, unk 0), dropped when out of
        // range, replaced by in-range values of the keys.
        let special = |key: &str, default: u32| -> Option<u32> {
            let d = (default as usize) < n;
            let from_key = header
                .get(&format!("tokenizer.ggml.{key}"))
                .and_then(GgufValue::as_u32)
                .filter(|&id| (id as usize) < n);
            from_key.or(d.then_some(default))
        };
        let bos = special("bos_token_id", 1);
        let eos = special("eos_token_id", 2);
        let unk = special("unknown_token_id", 0);
        let flag = |key: &str, default: bool| -> Result<bool> {
            match header.get(key) {
                None => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| anyhow!("{key} is not a bool")),
            }
        };
        let add_space_prefix = flag("tokenizer.ggml.add_space_prefix", true)?;
        let add_bos = flag("tokenizer.ggml.add_bos_token", true)?;
        let add_eos = flag("tokenizer.ggml.add_eos_token", false)?;

        // Attribute fix-ups llama.cpp applies by token text.
        for t in CONTROL_BY_TEXT {
            if let Some(&id) = index.get(t.as_bytes()) {
                if let Some(a) = attrs.get_mut(id as usize) {
                    *a |= ATTR_CONTROL;
                }
            }
        }
        for t in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(&id) = index.get(t.as_bytes()) {
                if let Some(a) = attrs.get_mut(id as usize) {
                    *a = ATTR_USER_DEFINED;
                }
            }
        }

        let mut specials: Vec<u32> = (0..n as u32)
            .filter(|&id| {
                attrs[id as usize] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0
            })
            .collect();
        // llama.cpp uses std::sort (unstable) by length, longest first; ties keep id order here.
        specials.sort_by_key(|&id| std::cmp::Reverse(texts[id as usize].len()));

        // Phi-3 models strip whitespace right of special tokens (set by general.name).
        let name = header
            .get("general.name")
            .and_then(GgufValue::as_str)
            .unwrap_or("")
            .to_lowercase();
        if name.contains("phi-3") || name.contains("phi3") {
            for &id in &specials {
                attrs[id as usize] |= ATTR_RSTRIP;
            }
            for (t, on) in [
                ("</s>", true),
                ("<unk>", false),
                ("<s>", false),
                ("<|endoftext|>", false),
            ] {
                if let Some(&id) = index.get(t.as_bytes()) {
                    let a = &mut attrs[id as usize];
                    *a = if on {
                        *a | ATTR_RSTRIP
                    } else {
                        *a & !ATTR_RSTRIP
                    };
                }
            }
        }

        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            let hex = format!("<0x{b:02X}>");
            *slot = index
                .get(hex.as_bytes())
                .or_else(|| index.get(&[b as u8][..]))
                .copied();
        }

        let mut ascii_pairs = [0u64; 256];
        let mut pairs = HashSet::new();
        for t in &texts {
            let mut it = t.chars().map(|c| c as u32);
            let Some(mut a) = it.next() else { continue };
            for b in it {
                if a < 128 && b < 128 {
                    let k = (a << 7 | b) as usize;
                    ascii_pairs[k / 64] |= 1 << (k % 64);
                } else {
                    pairs.insert(u64::from(a) << 32 | u64::from(b));
                }
                a = b;
            }
        }

        let key = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by(|&a, &b| key(scores[a as usize]).total_cmp(&key(scores[b as usize])));
        let mut ranks = vec![0u32; n];
        let mut rank = 0u32;
        for (k, &id) in order.iter().enumerate() {
            // -0.0 == 0.0 share a rank, as they compare equal in llama.cpp's queue.
            if k > 0 && key(scores[order[k - 1] as usize]) != key(scores[id as usize]) {
                rank += 1;
            }
            ranks[id as usize] = rank;
        }

        Ok(Tokenizer {
            ranks,
            ascii_pairs,
            pairs,
            texts,
            scores,
            attrs,
            index,
            specials,
            byte_ids,
            bos,
            eos,
            unk,
            add_bos,
            add_eos,
            add_space_prefix,
        })
    }

    /// llama.cpp's `llama_tokenize(text, add_special, parse_special)` for an SPM vocabulary.
    ///
    /// BOS first when `add_special` and add_bos; the text split on special tokens (USER_DEFINED
    /// ones always, CONTROL and UNKNOWN ones only with `parse_special`); one space prepended to the
    /// first text fragment and to every fragment that follows a special token (add_space_prefix);
    /// ' ' -> U+2581; UTF-8 characters merged pairwise by the highest score of the merged piece,
    /// leftmost first; pieces not in the vocabulary as `<0xXX>` byte tokens; EOS last when
    /// `add_special` and add_eos.
    ///
    /// Differences from the Python `sentencepiece` package, all llama.cpp behaviour:
    /// merges may form any vocabulary piece, including CONTROL, BYTE and UNUSED ones (text such as
    /// `</s>` can become the `</s>` token when its parts merge), and the space prefix also follows
    /// special tokens inside the text. A byte with no byte token and no one-byte token (llama.cpp
    /// throws there) becomes the unknown token, or is dropped without one.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        self.encode_bytes(text.as_bytes(), add_special, parse_special)
    }

    /// [`Tokenizer::encode`] for raw bytes, as llama.cpp accepts them (invalid UTF-8 falls back to
    /// byte tokens).
    pub fn encode_bytes(&self, text: &[u8], add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 2 + 2);
        let fragments = if text.is_empty() {
            Vec::new()
        } else {
            self.partition(text, parse_special)
        };
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        let mut prev_special = true;
        let mut buf = Vec::new();
        let mut work = Work::default();
        for f in fragments {
            match f {
                Fragment::Text { start, len } => {
                    buf.clear();
                    if self.add_space_prefix && prev_special {
                        buf.extend_from_slice("\u{2581}".as_bytes());
                    }
                    for &b in text.get(start..start + len).unwrap_or_default() {
                        if b == b' ' {
                            buf.extend_from_slice("\u{2581}".as_bytes());
                        } else {
                            buf.push(b);
                        }
                    }
                    self.spm(&buf, &mut work, &mut out);
                    prev_special = false;
                }
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    /// `tokenizer_st_partition`: splits `text` on special tokens, longest first.
    fn partition(&self, text: &[u8], parse_special: bool) -> Vec<Fragment> {
        st_partition(
            text,
            &self.specials,
            &self.attrs,
            &self.texts,
            parse_special,
        )
    }

    /// `llm_tokenizer_spm_session::tokenize` on one escaped fragment.
    ///
    /// For speed, valid UTF-8 text is cut between two characters that follow each other in no
    /// vocabulary piece (in Llama vocabularies, before every U+2581 that follows another
    /// character, and around '\n'). Every merged symbol is a vocabulary piece, so no merge
    /// crosses such a cut and merges on either side never interact: each run gives the tokens the
    /// whole fragment would, in the same order. (For invalid UTF-8, llama.cpp's symbols are not
    /// characters, so the text stays whole.)
    fn spm(&self, text: &[u8], w: &mut Work, out: &mut Vec<u32>) {
        let Ok(s) = std::str::from_utf8(text) else {
            return self.spm_run(text, w, out);
        };
        let mut start = 0;
        let mut prev: Option<char> = None;
        for (i, c) in s.char_indices() {
            if let Some(p) = prev {
                if !self.pair_in_vocab(p, c) {
                    self.spm_run(&text[start..i], w, out);
                    start = i;
                }
            }
            prev = Some(c);
        }
        if start < text.len() {
            self.spm_run(&text[start..], w, out);
        }
    }

    /// Whether some vocabulary piece contains character `a` directly followed by `b`.
    fn pair_in_vocab(&self, a: char, b: char) -> bool {
        let (a, b) = (a as u32, b as u32);
        if a < 128 && b < 128 {
            let k = (a << 7 | b) as usize;
            self.ascii_pairs[k / 64] >> (k % 64) & 1 != 0
        } else {
            self.pairs.contains(&(u64::from(a) << 32 | u64::from(b)))
        }
    }

    /// A symbol's tokens: its vocabulary id, else byte tokens (llama.cpp's `resegment`; merged
    /// symbols are always vocabulary pieces, so its rev_merge lookup never succeeds).
    fn emit_piece(&self, piece: &[u8], out: &mut Vec<u32>) {
        match self.index.get(piece) {
            Some(&id) => out.push(id),
            None => {
                for &byte in piece {
                    out.extend(self.byte_ids[byte as usize].or(self.unk));
                }
            }
        }
    }

    /// The merge loop on one run of text.
    fn spm_run(&self, text: &[u8], w: &mut Work, out: &mut Vec<u32>) {
        if text.len() > MAX_RUN {
            // Beyond what llama.cpp accepts: cut at a character boundary.
            let mut cut = MAX_RUN;
            while cut > MAX_RUN - 4 && text[cut] & 0xc0 == 0x80 {
                cut -= 1;
            }
            self.spm_run(&text[..cut], w, out);
            return self.spm_run(&text[cut..], w, out);
        }
        w.symbols.clear();
        w.queue.clear();
        let len = text.len() as u32;
        let mut offs = 0u32;
        while offs < len {
            let n = (utf8_len(text[offs as usize]) as u32).min(len - offs);
            let index = w.symbols.len() as u32;
            offs += n;
            w.symbols.push(Symbol {
                start: offs - n,
                n,
                prev: index.wrapping_sub(1),
                next: if offs == len { NONE } else { index + 1 },
            });
        }
        // Seed with every adjacent pair, heapified at once (the pop order is the same).
        let mut seed = std::mem::take(&mut w.queue).into_vec();
        for i in 1..w.symbols.len() as u32 {
            if let Some(b) = self.bigram(text, &w.symbols, i - 1, i) {
                seed.push(b);
            }
        }
        w.queue = BinaryHeap::from(seed);
        while let Some(b) = w.queue.pop() {
            let left = b.left();
            let (l, r) = (w.symbols[left as usize], w.symbols[b.right as usize]);
            if l.n == 0 || r.n == 0 || l.n + r.n != b.size {
                continue;
            }
            w.symbols[left as usize].n += r.n;
            w.symbols[b.right as usize].n = 0;
            w.symbols[left as usize].next = r.next;
            if r.next != NONE {
                w.symbols[r.next as usize].prev = left;
            }
            self.try_add_bigram(text, w, l.prev, left);
            self.try_add_bigram(text, w, left, r.next);
        }
        let mut i = if w.symbols.is_empty() { NONE } else { 0 };
        while i != NONE {
            let s = w.symbols[i as usize];
            self.emit_piece(&text[s.start as usize..(s.start + s.n) as usize], out);
            i = s.next;
        }
    }

    fn try_add_bigram(&self, text: &[u8], w: &mut Work, left: u32, right: u32) {
        if let Some(b) = self.bigram(text, &w.symbols, left, right) {
            w.queue.push(b);
        }
    }

    /// The merge of symbols `left` and `right` if their concatenation is a vocabulary piece.
    fn bigram(&self, text: &[u8], symbols: &[Symbol], left: u32, right: u32) -> Option<Bigram> {
        if left == NONE || right == NONE {
            return None;
        }
        let (l, r) = (symbols[left as usize], symbols[right as usize]);
        let size = l.n + r.n;
        let start = l.start as usize;
        let &id = self.index.get(&text[start..start + size as usize])?;
        Some(Bigram {
            key: (u64::from(self.ranks[id as usize]) << 32) | u64::from(u32::MAX - left),
            right,
            size,
        })
    }

    /// The token's text as bytes, as llama.cpp's `token_to_piece(id, special = true)`: U+2581 ->
    /// ' ' for normal tokens, `<0xXX>` -> that byte for byte tokens, control, unknown and
    /// user-defined tokens verbatim, unused and undefined ones empty. Out-of-range ids: empty.
    pub fn decode_piece(&self, id: u32) -> Vec<u8> {
        let (Some(text), Some(&attr)) = (self.texts.get(id as usize), self.attrs.get(id as usize))
        else {
            return Vec::new();
        };
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED) != 0 {
            text.as_bytes().to_vec()
        } else if attr & ATTR_NORMAL != 0 {
            text.replace('\u{2581}', " ").into_bytes()
        } else if attr & ATTR_BYTE != 0 {
            // strtol(text.substr(3, 2), 16): the hex digits that parse, else 0.
            let hex = text.get(3..).unwrap_or("");
            let digits: String = hex
                .chars()
                .take(2)
                .take_while(char::is_ascii_hexdigit)
                .collect();
            vec![u8::from_str_radix(&digits, 16).unwrap_or(0)]
        } else {
            Vec::new()
        }
    }

    /// Number of tokens in the vocabulary.
    pub fn n_vocab(&self) -> usize {
        self.texts.len()
    }

    /// The BOS token, if the vocabulary has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The EOS token, if the vocabulary has one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// The unknown token, if the vocabulary has one.
    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `encode(.., add_special = true, ..)` ends with EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// Whether a space is prepended to text (tokenizer.ggml.add_space_prefix).
    pub fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// The token's text as stored in the vocabulary ("" for out-of-range ids).
    pub fn token_text(&self, id: u32) -> &str {
        self.texts.get(id as usize).map_or("", String::as_str)
    }

    /// The token's score ("0" for out-of-range ids).
    pub fn token_score(&self, id: u32) -> f32 {
        self.scores.get(id as usize).copied().unwrap_or(0.0)
    }

    /// The id of the token whose text is exactly `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.index.get(text.as_bytes()).copied()
    }
}

/// Scratch space of the merge loop, reused across fragments.
#[derive(Default)]
struct Work {
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Bigram>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tokenizer from (text, score, type) triples with llama defaults.
    fn tok(vocab: &[(&str, f32, i32)], extra: Vec<(String, GgufValue)>) -> Tokenizer {
        let mut md = vec![
            (
                "tokenizer.ggml.model".to_string(),
                GgufValue::String("llama".into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                GgufValue::Array(GgufArray::String(
                    vocab.iter().map(|v| v.0.to_string()).collect(),
                )),
            ),
            (
                "tokenizer.ggml.scores".to_string(),
                GgufValue::Array(GgufArray::F32(vocab.iter().map(|v| v.1).collect())),
            ),
            (
                "tokenizer.ggml.token_type".to_string(),
                GgufValue::Array(GgufArray::I32(vocab.iter().map(|v| v.2).collect())),
            ),
        ];
        md.extend(extra);
        Tokenizer::from_gguf(&header(md)).unwrap()
    }

    fn header(metadata: Vec<(String, GgufValue)>) -> GgufHeader {
        GgufHeader {
            version: 3,
            metadata,
            tensors: Vec::new(),
            alignment: 32,
            data_offset: 0,
        }
    }

    /// <unk> <s> </s>, all 256 byte tokens, then `normal`.
    fn vocab_with(normal: &[(&str, f32)]) -> Vec<(String, f32, i32)> {
        let mut v = vec![
            ("<unk>".to_string(), 0.0, 2),
            ("<s>".to_string(), 0.0, 3),
            ("</s>".to_string(), 0.0, 3),
        ];
        for b in 0..256 {
            v.push((format!("<0x{b:02X}>"), 0.0, 6));
        }
        for (t, s) in normal {
            v.push((t.to_string(), *s, 1));
        }
        v
    }

    fn build(normal: &[(&str, f32)]) -> Tokenizer {
        let v = vocab_with(normal);
        let r: Vec<(&str, f32, i32)> = v.iter().map(|(t, s, k)| (t.as_str(), *s, *k)).collect();
        tok(&r, Vec::new())
    }

    fn texts(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&i| t.token_text(i).to_string()).collect()
    }

    #[test]
    fn highest_score_merges_first() {
        // "abc": "ab" (-2) and "bc" (-1): bc wins, then a + bc has no piece.
        let t = build(&[
            ("▁", -1.0),
            ("a", -5.0),
            ("b", -5.0),
            ("c", -5.0),
            ("ab", -2.0),
            ("bc", -1.0),
        ]);
        assert_eq!(texts(&t, &t.encode("abc", false, false)), ["▁", "a", "bc"]);
        // With "ab" better, ab is merged and c stays.
        let t = build(&[
            ("▁", -1.0),
            ("a", -5.0),
            ("b", -5.0),
            ("c", -5.0),
            ("ab", -0.5),
            ("bc", -1.0),
        ]);
        assert_eq!(texts(&t, &t.encode("abc", false, false)), ["▁", "ab", "c"]);
    }

    #[test]
    fn ties_go_to_the_leftmost_pair() {
        // "aaa": both "aa" pairs score the same: the left one merges first.
        let t = build(&[("▁", -1.0), ("a", -5.0), ("aa", -1.0)]);
        assert_eq!(texts(&t, &t.encode("aaa", false, false)), ["▁", "aa", "a"]);
        // "aaaa" -> aa aa; with "aaaa" in the vocabulary it then merges on.
        assert_eq!(
            texts(&t, &t.encode("aaaa", false, false)),
            ["▁", "aa", "aa"]
        );
        let t = build(&[("▁", -1.0), ("a", -5.0), ("aa", -1.0), ("aaaa", -3.0)]);
        assert_eq!(texts(&t, &t.encode("aaaa", false, false)), ["▁", "aaaa"]);
    }

    #[test]
    fn merges_continue_from_new_symbols() {
        // ▁h e l l o: "ll" first (best), then "he", then "hell"? no: "he"+"ll" = "hell", then +o.
        let t = build(&[
            ("▁", -1.0),
            ("ll", -0.1),
            ("he", -0.2),
            ("hell", -0.3),
            ("hello", -0.4),
            ("▁hello", -0.5),
        ]);
        assert_eq!(texts(&t, &t.encode("hello", false, false)), ["▁hello"]);
        assert_eq!(
            texts(&t, &t.encode("hello hello", true, false)),
            ["<s>", "▁hello", "▁hello"]
        );
    }

    #[test]
    fn byte_fallback_for_unknown_characters() {
        let t = build(&[("▁", -1.0), ("a", -1.0)]);
        // 'é' = C3 A9, '\n' = 0A, '😀' = F0 9F 98 80.
        assert_eq!(
            texts(&t, &t.encode("aé\n😀", false, false)),
            ["▁", "a", "<0xC3>", "<0xA9>", "<0x0A>", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
        );
        // Invalid UTF-8 bytes fall back too.
        assert_eq!(
            texts(&t, &t.encode_bytes(b"a\xff\xc3", false, false)),
            ["▁", "a", "<0xFF>", "<0xC3>"]
        );
    }

    #[test]
    fn missing_byte_tokens_fall_back_to_unk() {
        let t = tok(
            &[
                ("<unk>", 0.0, 2),
                ("<s>", 0.0, 3),
                ("</s>", 0.0, 3),
                ("▁", -1.0, 1),
            ],
            Vec::new(),
        );
        assert_eq!(t.encode("x", false, false), [3, 0]);
    }

    #[test]
    fn bos_eos_and_empty_text() {
        let t = build(&[("▁", -1.0)]);
        assert_eq!(t.encode("", true, false), [1]);
        assert_eq!(t.encode("", false, false), Vec::<u32>::new());
        assert!(t.add_bos() && !t.add_eos());
        assert_eq!((t.bos(), t.eos(), t.unk()), (Some(1), Some(2), Some(0)));
        let v = vocab_with(&[("▁", -1.0)]);
        let r: Vec<(&str, f32, i32)> = v.iter().map(|(t, s, k)| (t.as_str(), *s, *k)).collect();
        let t = tok(
            &r,
            vec![
                ("tokenizer.ggml.add_eos_token".into(), GgufValue::Bool(true)),
                (
                    "tokenizer.ggml.add_bos_token".into(),
                    GgufValue::Bool(false),
                ),
            ],
        );
        assert_eq!(t.encode("", true, false), [2]);
        assert_eq!(t.encode(" ", true, false).last(), Some(&2));
        assert_eq!(t.encode(" ", false, false).len(), 2);
    }

    #[test]
    fn space_prefix_rules() {
        let v = vocab_with(&[("▁", -1.0), ("a", -1.0), ("▁a", -0.5), ("<X>", 0.0)]);
        let mut r: Vec<(&str, f32, i32)> = v.iter().map(|(t, s, k)| (t.as_str(), *s, *k)).collect();
        let last = r.len() - 1;
        r[last].2 = 4; // <X> user-defined
        let t = tok(&r, Vec::new());
        // User-defined tokens split out even without parse_special; the next fragment gets a space.
        assert_eq!(
            texts(&t, &t.encode("a<X>a", false, false)),
            ["▁a", "<X>", "▁a"]
        );
        // Control text stays text without parse_special, and is split with it.
        assert_eq!(
            texts(&t, &t.encode("a</s>a", false, true)),
            ["▁a", "</s>", "▁a"]
        );
        let plain = t.encode("a</s>a", false, false);
        assert!(!plain.contains(&2), "{plain:?}");
        // Leading special: the text after it still gets the prefix.
        assert_eq!(texts(&t, &t.encode("<X>a", false, false)), ["<X>", "▁a"]);
        // add_space_prefix = false.
        let t2 = tok(
            &r,
            vec![(
                "tokenizer.ggml.add_space_prefix".into(),
                GgufValue::Bool(false),
            )],
        );
        assert_eq!(
            texts(&t2, &t2.encode("a<X>a", false, false)),
            ["a", "<X>", "a"]
        );
    }

    #[test]
    fn control_text_can_merge_into_the_control_token() {
        // llama.cpp merges by text alone, so "</s>" written in text can become token 2.
        let t = build(&[
            ("▁", -1.0),
            ("<", -1.0),
            ("/", -1.0),
            ("s", -1.0),
            (">", -1.0),
            ("</", -2.0),
            ("s>", -2.0),
        ]);
        assert_eq!(texts(&t, &t.encode("</s>", false, false)), ["▁", "</s>"]);
    }

    #[test]
    fn decode_pieces() {
        let t = build(&[("▁hi", -1.0)]);
        let hi = t.token_id("▁hi").unwrap();
        assert_eq!(t.decode_piece(hi), b" hi");
        assert_eq!(t.decode_piece(3 + 0x41), b"A");
        assert_eq!(t.decode_piece(1), b"<s>");
        assert_eq!(t.decode_piece(99_999), b"");
        assert_eq!(t.n_vocab(), 3 + 256 + 1);
    }

    #[test]
    fn hostile_vocabularies_are_errors() {
        assert!(Tokenizer::from_gguf(&header(Vec::new()))
            .unwrap_err()
            .to_string()
            .contains("no vocabulary"));
        let gpt2 = vec![(
            "tokenizer.ggml.model".to_string(),
            GgufValue::String("gpt2".into()),
        )];
        assert!(Tokenizer::from_gguf(&header(gpt2))
            .unwrap_err()
            .to_string()
            .contains("unsupported"));
        let dup = vec![
            (
                "tokenizer.ggml.model".to_string(),
                GgufValue::String("llama".into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                GgufValue::Array(GgufArray::String(vec!["a".into(), "a".into()])),
            ),
        ];
        assert!(Tokenizer::from_gguf(&header(dup)).is_err());
        let short_scores = vec![
            (
                "tokenizer.ggml.model".to_string(),
                GgufValue::String("llama".into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                GgufValue::Array(GgufArray::String(vec!["a".into(), "b".into()])),
            ),
            (
                "tokenizer.ggml.scores".to_string(),
                GgufValue::Array(GgufArray::F32(vec![0.0])),
            ),
        ];
        assert!(Tokenizer::from_gguf(&header(short_scores)).is_err());
    }

    #[test]
    fn tiny_vocab_without_specials_is_safe() {
        // Two tokens, no byte tokens, special defaults out of range except unk.
        let t = tok(&[("a", 0.0, 1), ("b", 0.0, 1)], Vec::new());
        assert_eq!(t.bos(), Some(1));
        assert_eq!(t.eos(), None);
        // BOS (1 = "b"); "▁" has no piece and no byte tokens, so each of its 3 bytes is unk (0).
        assert_eq!(t.encode("ab c", true, true), [1, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn any_text_round_trips() {
        // Pseudo-random strings over ASCII, multi-byte and special-looking characters (the root
        // package has no proptest): decoding the pieces gives back " " + text.
        let t = build(&[
            ("▁", -1.0),
            ("a", -1.0),
            ("▁a", -0.5),
            ("ab", -0.7),
            ("中", -1.0),
        ]);
        let pool = [
            "a", "b", " ", "  ", "中", "文", "é", "😀", "\n", "\t", "<s>", "▁", "\u{0}",
        ];
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for len in 0..300 {
            let mut s = String::new();
            for _ in 0..len % 40 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                s.push_str(pool[(x % pool.len() as u64) as usize]);
            }
            let ids = t.encode(&s, false, false);
            let bytes: Vec<u8> = ids.iter().flat_map(|&i| t.decode_piece(i)).collect();
            let want = if s.is_empty() {
                String::new()
            } else {
                format!(" {s}").replace('\u{2581}', " ")
            };
            assert_eq!(bytes, want.as_bytes(), "{s:?}");
        }
    }

    #[test]
    fn cutting_at_unseen_pairs_changes_nothing() {
        // The merge loop on whole fragments vs. cut between characters no piece joins.
        let t = build(&[
            ("▁", -1.0),
            ("a", -1.0),
            ("b", -1.0),
            ("▁a", -0.5),
            ("ab", -0.7),
            ("ba", -0.6),
            ("▁ab", -0.2),
            ("aba", -0.3),
            ("▁▁", -0.4),
            ("中文", -0.1),
            ("b中", -0.9),
        ]);
        let pool = ["a", "b", "▁", "中", "文", "\n", "c"];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in 0..400 {
            let mut s = String::new();
            for _ in 0..len % 60 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                s.push_str(pool[(x % pool.len() as u64) as usize]);
            }
            let (mut w, mut cut, mut whole) = (Work::default(), Vec::new(), Vec::new());
            t.spm(s.as_bytes(), &mut w, &mut cut);
            t.spm_run(s.as_bytes(), &mut w, &mut whole);
            assert_eq!(cut, whole, "{s:?}");
        }
    }
}
