//! llama.cpp's byte-level BPE ("gpt2") tokenizer driven by a GGUF vocabulary (`tokenizer.ggml.*`).
//!
//! A reimplementation of `llama_vocab::impl::tokenize` for `LLAMA_VOCAB_TYPE_BPE`
//! (llama.cpp src/llama-vocab.cpp, src/unicode.cpp): the special-token partition, the
//! pre-tokenizer split selected by `tokenizer.ggml.pre` ([`super::pre`]), GPT-2's byte-to-unicode
//! encoding of each word, the merge loop of `llm_tokenizer_bpe_session` (lowest merge rank first,
//! then leftmost) and the single-byte fallback for pieces that are no token.

use super::pre::{self, Pre};
use super::spm::{
    read_tokens, st_partition, token_table, Fragment, ATTR_BYTE, ATTR_CONTROL, ATTR_NORMAL,
    ATTR_RSTRIP, ATTR_UNKNOWN, ATTR_USER_DEFINED, CONTROL_BY_TEXT,
};
use anyhow::{anyhow, bail, Result};
use kiln_formats::gguf::{GgufArray, GgufHeader, GgufValue};
use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::OnceLock;

/// No symbol / no piece.
const NONE: u32 = u32::MAX;

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves, the other 68 bytes
/// for U+0100.. in byte order.
fn byte_chars() -> &'static ([char; 256], HashMap<char, u8>) {
    static T: OnceLock<([char; 256], HashMap<char, u8>)> = OnceLock::new();
    T.get_or_init(|| {
        let mut chars = ['\0'; 256];
        let mut n = 0u32;
        for (b, slot) in chars.iter_mut().enumerate() {
            let printable = matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
            let cp = if printable {
                b as u32
            } else {
                n += 1;
                255 + n
            };
            *slot = char::from_u32(cp).unwrap_or('\u{fffd}');
        }
        let back = chars
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        (chars, back)
    })
}

/// Text as llama.cpp's `unicode_cpts_from_utf8` reads it: valid UTF-8 as is, each byte that does
/// not start a well-formed sequence as U+FFFD. (llama.cpp also accepts overlong forms and
/// surrogates, which become U+FFFD here.)
fn sanitize(text: &[u8]) -> Cow<'_, str> {
    if let Ok(s) = std::str::from_utf8(text) {
        return Cow::Borrowed(s);
    }
    let cont = |i: usize| text.get(i).is_some_and(|&b| b & 0xc0 == 0x80);
    let mut s = String::with_capacity(text.len() + 8);
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        let need = if b < 0x80 {
            0
        } else if b & 0x40 == 0 {
            usize::MAX
        } else if b & 0x20 == 0 {
            1
        } else if b & 0x10 == 0 {
            2
        } else if b & 0x08 == 0 {
            3
        } else {
            usize::MAX
        };
        if need == usize::MAX || !(1..=need).all(|k| cont(i + k)) {
            s.push('\u{fffd}');
            i += 1;
            continue;
        }
        let mut cp = if need == 0 {
            u32::from(b)
        } else {
            u32::from(b) & (0x7f >> (need + 1))
        };
        for k in 1..=need {
            cp = cp << 6 | u32::from(text[i + k] & 0x3f);
        }
        s.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
        i += need + 1;
    }
    Cow::Owned(s)
}

/// A byte-level BPE vocabulary, tokenizing exactly as llama.cpp does.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    texts: Vec<String>,
    attrs: Vec<u32>,
    index: HashMap<Box<[u8]>, u32>,
    specials: Vec<u32>,
    /// Merge halves and results, interned.
    pieces: HashMap<Box<[u8]>, u32>,
    /// (left piece, right piece) -> (rank, merged piece).
    merges: HashMap<(u32, u32), (u32, u32)>,
    pre: Pre,
    pre_name: String,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: u32,
    n: u32,
    prev: u32,
    next: u32,
    piece: u32,
}

/// Scratch space of the merge loop.
#[derive(Default)]
struct Work {
    symbols: Vec<Symbol>,
    /// Reverse((rank, left, right, size)): lowest rank, then leftmost first (`llm_bigram_bpe`).
    queue: BinaryHeap<Reverse<(u32, u32, u32, u32)>>,
    word: Vec<u8>,
}

#[allow(dead_code)]
impl Tokenizer {
    /// From the GGUF vocabulary keys of a `tokenizer.ggml.model = "gpt2"` file.
    pub fn from_gguf(header: &GgufHeader) -> Result<Tokenizer> {
        let tokens = read_tokens(header)?;
        let n = tokens.len();
        let merges_list = match header.get("tokenizer.ggml.merges") {
            None => bail!(
                "unsupported tokenizer model \"gpt2\" without tokenizer.ggml.merges: a byte-level \
                 BPE vocabulary needs its merges (llama.cpp: cannot find tokenizer merges)"
            ),
            Some(GgufValue::Array(GgufArray::String(m))) => m,
            Some(_) => bail!("tokenizer.ggml.merges is not an array of strings"),
        };
        let pre_name = match header.get("tokenizer.ggml.pre") {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or_else(|| anyhow!("tokenizer.ggml.pre is not a string"))?,
            ),
        };
        let pre = pre::lookup(pre_name)?;
        let (texts, mut attrs, index) = token_table(header, tokens)?;

        // Merges: "a b" split at the first space after the first byte (llama.cpp:
        // find(' ', 1)); a line without one is the pair ("", "").
        let mut pieces: HashMap<Box<[u8]>, u32> = HashMap::new();
        let mut intern = |s: &[u8]| -> u32 {
            let next = pieces.len() as u32;
            *pieces.entry(s.into()).or_insert(next)
        };
        let mut merges = HashMap::with_capacity(merges_list.len());
        for (rank, line) in merges_list.iter().enumerate() {
            let b = line.as_bytes();
            let (l, r) = match b.get(1..).and_then(|t| t.iter().position(|&c| c == b' ')) {
                Some(p) => (&b[..p + 1], &b[p + 2..]),
                None => (&b[..0], &b[..0]),
            };
            let merged: Vec<u8> = [l, r].concat();
            let (li, ri, mi) = (intern(l), intern(r), intern(&merged));
            // std::map::emplace keeps the first rank of a repeated pair.
            merges.entry((li, ri)).or_insert((rank as u32, mi));
        }

        // Special ids: llama.cpp's BPE defaults (bos = eos = 11), dropped when out of range,
        // replaced by in-range values of the keys.
        let special = |key: &str, default: Option<u32>| -> Option<u32> {
            let d = default.filter(|&d| (d as usize) < n);
            let from_key = header
                .get(&format!("tokenizer.ggml.{key}"))
                .and_then(GgufValue::as_u32)
                .filter(|&id| (id as usize) < n);
            from_key.or(d)
        };
        let bos = special("bos_token_id", (!pre.no_bos).then_some(11));
        let eos = special("eos_token_id", Some(11));
        let unk = special("unknown_token_id", None);
        let flag = |key: &str, default: bool| -> Result<bool> {
            match header.get(key) {
                None => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| anyhow!("{key} is not a bool")),
            }
        };
        let mut add_bos = flag("tokenizer.ggml.add_bos_token", pre.add_bos)?;
        if pre_name == Some("gemma4") || pre_name == Some("granite-embed-multi-311m") {
            add_bos = true; // llama.cpp's Gemma-4 override
        }
        let add_eos = flag("tokenizer.ggml.add_eos_token", false)?;

        for t in CONTROL_BY_TEXT {
            if let Some(&id) = index.get(t.as_bytes()) {
                attrs[id as usize] |= ATTR_CONTROL;
            }
        }
        for t in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(&id) = index.get(t.as_bytes()) {
                attrs[id as usize] = ATTR_USER_DEFINED;
            }
        }
        let mut specials: Vec<u32> = (0..n as u32)
            .filter(|&id| {
                attrs[id as usize] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0
            })
            .collect();
        specials.sort_by_key(|&id| Reverse(texts[id as usize].len()));
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

        Ok(Tokenizer {
            texts,
            attrs,
            index,
            specials,
            pieces,
            merges,
            pre,
            pre_name: pre_name.unwrap_or("default").to_string(),
            bos,
            eos,
            unk,
            add_bos,
            add_eos,
        })
    }

    /// llama.cpp's `llama_tokenize(text, add_special, parse_special)` for a BPE vocabulary: BOS
    /// first when `add_special` and add_bos; the text split on special tokens (USER_DEFINED ones
    /// always, CONTROL and UNKNOWN ones only with `parse_special`); each text fragment
    /// pre-tokenized, byte-encoded and merged; EOS last when `add_special` and add_eos.
    pub fn encode_bytes(&self, text: &[u8], add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        if !text.is_empty() {
            let mut w = Work::default();
            for f in st_partition(
                text,
                &self.specials,
                &self.attrs,
                &self.texts,
                parse_special,
            ) {
                match f {
                    Fragment::Text { start, len } => {
                        self.fragment(&text[start..start + len], &mut w, &mut out)
                    }
                    Fragment::Token(id) => out.push(id),
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    /// `llm_tokenizer_bpe_session::tokenize` on one text fragment.
    fn fragment(&self, text: &[u8], w: &mut Work, out: &mut Vec<u32>) {
        let text = sanitize(text);
        let text: Cow<'_, str> = if self.pre.escape_whitespaces {
            text.replace(' ', "\u{2581}").into()
        } else {
            text
        };
        let (chars, _) = byte_chars();
        for (a, b) in pre::split(self.pre.set, &text) {
            let word = &text[a..b];
            w.word.clear();
            if self.pre.byte_encode {
                let mut buf = [0u8; 4];
                for &byte in word.as_bytes() {
                    w.word
                        .extend_from_slice(chars[byte as usize].encode_utf8(&mut buf).as_bytes());
                }
            } else {
                w.word.extend_from_slice(word.as_bytes());
            }
            let word = std::mem::take(&mut w.word);
            self.word(&word, w, out);
            w.word = word;
        }
    }

    /// The merge loop on one (encoded) word, then its tokens.
    fn word(&self, word: &[u8], w: &mut Work, out: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        let whole = self.index.get(word).copied();
        let all_newlines = word.iter().all(|&b| b == b'\n');
        if let Some(id) = whole {
            if self.pre.ignore_merges || (self.pre_name == "gemma4" && all_newlines) {
                out.push(id);
                return;
            }
        }
        w.symbols.clear();
        w.queue.clear();
        let len = word.len() as u32;
        let mut offs = 0u32;
        while offs < len {
            let n = (utf8_len(word[offs as usize]) as u32).min(len - offs);
            let i = w.symbols.len() as u32;
            let piece = self
                .pieces
                .get(&word[offs as usize..(offs + n) as usize])
                .copied()
                .unwrap_or(NONE);
            offs += n;
            w.symbols.push(Symbol {
                start: offs - n,
                n,
                prev: i.wrapping_sub(1),
                next: if offs == len { NONE } else { i + 1 },
                piece,
            });
        }
        for i in 1..w.symbols.len() as u32 {
            self.add_bigram(w, i - 1, i);
        }
        while let Some(Reverse((_, left, right, size))) = w.queue.pop() {
            let (l, r) = (w.symbols[left as usize], w.symbols[right as usize]);
            if l.n == 0 || r.n == 0 || l.n + r.n != size {
                continue;
            }
            let merged = self
                .merges
                .get(&(l.piece, r.piece))
                .map_or(NONE, |&(_, m)| m);
            let s = &mut w.symbols[left as usize];
            s.n += r.n;
            s.next = r.next;
            s.piece = merged;
            w.symbols[right as usize].n = 0;
            if r.next != NONE {
                w.symbols[r.next as usize].prev = left;
            }
            if l.prev != NONE {
                self.add_bigram(w, l.prev, left);
            }
            if r.next != NONE {
                self.add_bigram(w, left, r.next);
            }
        }
        for s in &w.symbols {
            if s.n == 0 {
                continue;
            }
            let piece = &word[s.start as usize..(s.start + s.n) as usize];
            match self.index.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece {
                        let id = if self.pre.byte_encode {
                            self.index.get(&[b][..]).copied()
                        } else {
                            self.index.get(format!("<0x{b:02X}>").as_bytes()).copied()
                        };
                        out.extend(id);
                    }
                }
            }
        }
    }

    fn add_bigram(&self, w: &mut Work, left: u32, right: u32) {
        let (l, r) = (w.symbols[left as usize], w.symbols[right as usize]);
        if l.piece == NONE || r.piece == NONE {
            return;
        }
        if let Some(&(rank, _)) = self.merges.get(&(l.piece, r.piece)) {
            w.queue.push(Reverse((rank, left, right, l.n + r.n)));
        }
    }

    /// The token's text as bytes, as llama.cpp's `token_to_piece(id, special = true)` for BPE:
    /// control, unknown and user-defined tokens verbatim, normal tokens byte-decoded (GPT-2
    /// unicode -> bytes; U+2581 -> ' ' for the SPM-style sets), byte tokens their byte.
    pub fn decode_piece(&self, id: u32) -> Vec<u8> {
        let (Some(text), Some(&attr)) = (self.texts.get(id as usize), self.attrs.get(id as usize))
        else {
            return Vec::new();
        };
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED) != 0 {
            text.as_bytes().to_vec()
        } else if attr & ATTR_NORMAL != 0 {
            if self.pre.escape_whitespaces {
                return text.replace('\u{2581}', " ").into_bytes();
            }
            let (_, back) = byte_chars();
            let mut v = Vec::with_capacity(text.len());
            for c in text.chars() {
                match back.get(&c) {
                    Some(&b) => v.push(b),
                    None => {
                        v.extend_from_slice(b"[UNK_BYTE_0x");
                        let mut buf = [0u8; 4];
                        for b in c.encode_utf8(&mut buf).bytes() {
                            v.extend_from_slice(format!("{b:02x}").as_bytes());
                        }
                        v.extend_from_slice(text.as_bytes());
                        v.push(b']');
                    }
                }
            }
            v
        } else if attr & ATTR_BYTE != 0 {
            // token_to_byte for BPE: the byte whose GPT-2 character is the text.
            let (_, back) = byte_chars();
            let mut it = text.chars();
            match (it.next(), it.next()) {
                (Some(c), None) => back.get(&c).map(|&b| vec![b]).unwrap_or_default(),
                _ => Vec::new(),
            }
        } else {
            Vec::new()
        }
    }

    pub fn n_vocab(&self) -> usize {
        self.texts.len()
    }
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }
    pub fn unk(&self) -> Option<u32> {
        self.unk
    }
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }
    pub fn token_text(&self, id: u32) -> &str {
        self.texts.get(id as usize).map_or("", String::as_str)
    }
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.index.get(text.as_bytes()).copied()
    }
    /// The `tokenizer.ggml.pre` name in use ("default" when the key is missing).
    pub fn pre_name(&self) -> &str {
        &self.pre_name
    }
}

/// `unicode_len_utf8`: the sequence length a byte starts, continuation bytes counting 1.
fn utf8_len(b: u8) -> usize {
    match b >> 4 {
        0xc | 0xd => 2,
        0xe => 3,
        0xf => 4,
        _ => 1,
    }
}
