//! The pre-tokenizer regex sets llama.cpp's llama-vocab selects by `tokenizer.ggml.pre` for byte-level
//! BPE vocabularies, and the split they perform (`unicode_regex_split`).
//!
//! llama-vocab maps dozens of `pre` names onto a few regex sets ([`Set`]); each set is a list of
//! expressions applied one after another, every expression cutting each piece of the previous
//! split into its matches and the text between them. llama.cpp runs them with std::regex over a
//! "collapsed" text (every non-ASCII code point replaced by one byte standing for its Unicode
//! category) or hand-coded splitters for the GPT-2/Llama-3/Qwen2 patterns; both give what the
//! expressions give on the real text with Unicode classes, which is what kiln runs here with
//! `fancy-regex` (the sets need look-ahead, `\s+(?!\S)`, which the `regex` crate lacks). The one
//! known difference: codepoints assigned in a newer Unicode version than the one of llama.cpp's
//! tables may be classed differently.

use anyhow::{bail, Result};
use fancy_regex::Regex;
use std::sync::OnceLock;

/// A regex set of llama-vocab (`LLAMA_VOCAB_PRE_TYPE_*`, sets with identical expressions merged).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Set {
    Default,
    Llama3,
    Jais2,
    DeepseekLlm,
    Deepseek3,
    Spark25,
    Youtu,
    DeepseekCoder,
    Falcon,
    Starcoder,
    Gpt2,
    Qwen2,
    Qwen35,
    Poro,
    Viking,
    Tekken,
    Chameleon,
    Gpt4o,
    GraniteEmbMulti,
    Superbpe,
    Bailingmoe,
    SeedCoder,
    Ufakzeka,
    Laguna,
    ExaoneMoe,
    /// Gemma-4 and Sarvam: SPM-style BPE on raw UTF-8, split only at newlines.
    Newlines,
    Minicpm5,
    Whitespace,
}

const CONTRACTIONS: &str = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])";
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

impl Set {
    /// The expressions, in the order llama.cpp applies them.
    fn exprs(self) -> Vec<String> {
        let c = CONTRACTIONS;
        let s = |x: &str| x.to_string();
        match self {
            Set::Default => vec![
                s(r"[\p{P}\$\+<=>\^~\|]+"),
                s(GPT2),
                s(r"\p{N}+"),
                s("[0-9][0-9][0-9]"),
            ],
            Set::Llama3 => vec![format!(
                r"{c}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
            )],
            Set::Jais2 => vec![format!(
                r"{c}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s{{512}}(?!\S)|\s{{256}}(?!\S)|\s{{128}}(?!\S)|\s{{64}}(?!\S)|\s{{32}}(?!\S)|\s{{16}}(?!\S)|\s{{8}}(?!\S)|\s{{4}}(?!\S)|\s{{1,2}}(?!\S)|\s{{1}}"
            )],
            Set::DeepseekLlm => vec![
                s(r"[\r\n]"),
                s(
                    r"\s?[A-Za-z\x{b5}\x{c0}-\x{d6}\x{d8}-\x{f6}\x{f8}-\x{1ba}\x{1bc}-\x{1bf}\x{1c4}-\x{293}\x{295}-\x{2af}\x{370}-\x{373}\x{376}\x{377}\x{37b}-\x{37d}\x{37f}\x{386}\x{388}-\x{38a}\x{38c}\x{38e}-\x{3a1}\x{3a3}-\x{3f5}\x{3f7}-\x{481}\x{48a}-\x{52f}\x{531}-\x{556}\x{10a0}-\x{10c5}\x{13a0}-\x{13f5}\x{13f8}-\x{13fd}\x{1c90}-\x{1cba}\x{1cbd}-\x{1cbf}\x{1d00}-\x{1d2b}\x{1d6b}-\x{1d77}\x{1d79}-\x{1d9a}\x{1e00}-\x{1f15}\x{1f18}-\x{1f1d}\x{1f20}-\x{1f45}\x{1f48}-\x{1f4d}\x{1f50}-\x{1f57}\x{1f59}\x{1f5b}\x{1f5d}\x{1f5f}-\x{1f7d}\x{1f80}-\x{1fb4}\x{1fb6}-\x{1fbc}\x{1fbe}\x{1fc2}-\x{1fc4}\x{1fc6}-\x{1fcc}\x{1fd0}-\x{1fd3}\x{1fd6}-\x{1fdb}\x{1fe0}-\x{1fec}\x{1ff2}-\x{1ff4}\x{1ff6}-\x{1ffc}\x{2102}\x{2107}\x{210a}-\x{2113}\x{2115}\x{2119}-\x{211d}\x{2124}\x{2126}\x{2128}\x{212a}-\x{212d}\x{212f}-\x{2134}\x{2139}\x{213c}-\x{213f}\x{2145}-\x{2149}\x{214e}\x{2183}\x{2184}\x{2c00}-\x{2c7b}\x{2c7e}-\x{2ce4}\x{2ceb}-\x{2cee}\x{2cf2}\x{2cf3}\x{a640}-\x{a66d}\x{a680}-\x{a69b}\x{a722}-\x{a76f}\x{a771}-\x{a787}\x{a78b}-\x{a78e}\x{ab70}-\x{abbf}\x{fb00}-\x{fb06}\x{fb13}-\x{fb17}\x{ff21}-\x{ff3a}\x{ff41}-\x{ff5a}\x{10400}-\x{1044f}\x{104b0}-\x{104d3}\x{104d8}-\x{104fb}\x{10c80}-\x{10cb2}\x{10cc0}-\x{10cf2}\x{118a0}-\x{118df}\x{1e900}-\x{1e943}]+",
                ),
                s(
                    r"\s?[!-/:-~\x{ff01}-\x{ff0f}\x{ff1a}-\x{ff5e}\x{2018}-\x{201f}\x{3000}-\x{3002}]+",
                ),
                s(r"\s+$"),
                s(r"[\x{4e00}-\x{9fa5}\x{800}-\x{4e00}\x{ac00}-\x{d7ff}]+"),
                s(r"\p{N}+"),
            ],
            Set::Deepseek3 => vec![
                s(r"\p{N}{1,3}"),
                s(r"[\x{4e00}-\x{9fa5}\x{3040}-\x{309f}\x{30a0}-\x{30ff}]+"),
                s(
                    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
                ),
            ],
            Set::Spark25 => vec![
                s(r"\p{N}{1,3}"),
                s(r"[\x{4e00}-\x{9fa5}\x{3040}-\x{309f}\x{30a0}-\x{30ff}]+"),
                s(
                    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+"##,
                ),
                s(r"\p{N}"),
            ],
            Set::Youtu => vec![
                s(
                    r"[\x{ac00}-\x{d7a3}\x{3131}-\x{318e}]+|[\x{ff01}\x{2026}\x{201c}\x{201d}\x{2018}\x{2019}\x{2014}\x{ff1a}\x{ff1b}\x{ff0c}\x{3001}-\x{303f}\x{fe30}-\x{fe4f}]+|[\x{3105}-\x{312f}]+|[\x{4e00}-\x{9fa5}\x{3040}-\x{309f}\x{30a0}-\x{30ff}]+",
                ),
                format!(
                    r"[^\r\n\p{{L}}\p{{N}}]?[\p{{Lu}}\p{{Lt}}\p{{Lm}}\p{{Lo}}\p{{M}}]*[\p{{Ll}}\p{{Lm}}\p{{Lo}}\p{{M}}]+{c}?|[^\r\n\p{{L}}\p{{N}}]?[\p{{Lu}}\p{{Lt}}\p{{Lm}}\p{{Lo}}\p{{M}}]+[\p{{Ll}}\p{{Lm}}\p{{Lo}}\p{{M}}]*{c}?|\p{{N}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
                ),
            ],
            Set::DeepseekCoder => vec![
                s(r"[\r\n]"),
                s(r"\s?\p{L}+"),
                s(r"\s?\p{P}+"),
                s(r"[\x{4e00}-\x{9fa5}\x{800}-\x{4e00}\x{ac00}-\x{d7ff}]+"),
                s(r"\p{N}"),
            ],
            Set::Falcon => vec![s(r"[\p{P}\$\+<=>\^~\|`]+"), s(GPT2), s("[0-9][0-9][0-9]")],
            Set::Starcoder => vec![s(r"\p{N}"), s(GPT2)],
            Set::Gpt2 => vec![s(GPT2)],
            Set::Qwen2 => vec![format!(
                r"{c}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
            )],
            Set::Qwen35 => vec![format!(
                r"{c}|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}]+|\p{{N}}| ?[^\s\p{{L}}\p{{M}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
            )],
            Set::Poro => vec![s(
                r" ?[^(\s|.,!?\x{2026}\x{3002}\x{ff0c}\x{3001}\x{964}\x{6d4}\x{60c})]+",
            )],
            Set::Viking => vec![
                s(r" ?[^(\s|.,!?\x{2026}\x{3002}\x{ff0c}\x{3001}\x{964}\x{6d4}\x{60c})]+"),
                s(r"\p{N}"),
            ],
            Set::Tekken => vec![s(
                r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            )],
            Set::Chameleon => vec![
                s("<sentinel:[0-9]+>"),
                s("(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z"),
                s("([\\t\\n]|    |  )"),
                s(r"\p{N}"),
                s(r"[\p{P}!-/:-@\[-`{-~]"),
                s(GPT2),
            ],
            Set::Gpt4o => vec![format!(
                r"[^\r\n\p{{L}}\p{{N}}]?((?=[\p{{L}}])([^a-z]))*((?=[\p{{L}}])([^A-Z]))+{c}?|[^\r\n\p{{L}}\p{{N}}]?((?=[\p{{L}}])([^a-z]))+((?=[\p{{L}}])([^A-Z]))*{c}?|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
            )],
            Set::GraniteEmbMulti => vec![format!(
                r"[^\r\n\p{{L}}\p{{N}}]?((?=[\p{{L}}\p{{M}}])([^a-z]))*((?=[\p{{L}}\p{{M}}])([^A-Z]))+{c}?|[^\r\n\p{{L}}\p{{N}}]?((?=[\p{{L}}\p{{M}}])([^a-z]))+((?=[\p{{L}}\p{{M}}])([^A-Z]))*{c}?|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
            )],
            // std::regex's \d is ASCII.
            Set::Superbpe => vec![s(r"\p{N}+"), s("(?=([0-9]{3})+(?![0-9]))")],
            Set::Bailingmoe => vec![s(
                r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
            )],
            Set::SeedCoder => vec![format!(
                r"{c}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{{1}}| ?[^\s\p{{L}}\p{{N}}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
            )],
            Set::Ufakzeka => vec![s(
                r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            )],
            Set::Laguna => vec![
                s(r"[^\n]+|[\n]+"),
                format!(
                    r"{c}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
                ),
            ],
            Set::ExaoneMoe => vec![format!(
                r"{c}|[^\r\n\p{{L}}\p{{N}}]?(?:\p{{L}}\p{{M}}*(?: \p{{L}}\p{{M}}*)*)+|\p{{N}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"
            )],
            Set::Newlines => vec![s(r"[^\n]+|[\n]+")],
            Set::Minicpm5 => vec![
                s(r"\p{N}{1,3}"),
                format!(
                    r"{c}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}+| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
                ),
            ],
            Set::Whitespace => vec![s(r"\S+")],
        }
    }
}

/// What a `tokenizer.ggml.pre` name selects: the regex set and the options llama-vocab sets with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pre {
    pub set: Set,
    /// Whole words found in the vocabulary skip the merges (`ignore_merges`).
    pub ignore_merges: bool,
    /// add_bos before `tokenizer.ggml.add_bos_token` is read (false for other BPE names).
    pub add_bos: bool,
    /// The BOS default is dropped (ChatGLM).
    pub no_bos: bool,
    /// GPT-2 byte-to-unicode encoding of each word (false: raw UTF-8, `<0xXX>` byte tokens).
    pub byte_encode: bool,
    /// ' ' -> U+2581 before splitting (Gemma-4, Sarvam).
    pub escape_whitespaces: bool,
}

/// Names llama.cpp accepts for which kiln has no splitter: they use code llama.cpp hand-wrote
/// instead of a regex (digit grouping from the right, Han exclusion).
const UNIMPLEMENTED: &[&str] = &["kimi-k2", "afmoe", "tiny_aya", "cohere2moe"];

/// Every `tokenizer.ggml.pre` name and its set, in llama-vocab's order.
const NAMES: &[(&str, Set)] = &[
    ("default", Set::Default),
    ("minicpm5", Set::Minicpm5),
    ("llama3", Set::Llama3),
    ("llama-v3", Set::Llama3),
    ("llama-bpe", Set::Llama3),
    ("falcon3", Set::Llama3),
    ("falcon-h1", Set::Llama3),
    ("pixtral", Set::Llama3),
    ("midm-2.0", Set::Llama3),
    ("lfm2", Set::Llama3),
    ("jina-v5-nano", Set::Llama3),
    ("deepseek-llm", Set::DeepseekLlm),
    ("deepseek-coder", Set::DeepseekCoder),
    ("deepseek-v3", Set::Deepseek3),
    ("spark2_5", Set::Spark25),
    ("youtu", Set::Youtu),
    ("falcon", Set::Falcon),
    ("mpt", Set::Gpt2),
    ("starcoder", Set::Starcoder),
    ("gpt-2", Set::Gpt2),
    ("phi-2", Set::Gpt2),
    ("jina-es", Set::Gpt2),
    ("jina-de", Set::Gpt2),
    ("gigachat", Set::Gpt2),
    ("jina-v2-es", Set::Gpt2),
    ("jina-v2-de", Set::Gpt2),
    ("a.x-4.0", Set::Gpt2),
    ("mellum", Set::Gpt2),
    ("modern-bert", Set::Gpt2),
    ("jais-2", Set::Jais2),
    ("gemma4", Set::Newlines),
    ("granite-embed-multi-311m", Set::Newlines),
    ("sarvam-moe", Set::Newlines),
    ("jina-v1-en", Set::Gpt2),
    ("jina-v2-code", Set::Gpt2),
    ("roberta-bpe", Set::Gpt2),
    ("whitespace", Set::Whitespace),
    ("refact", Set::Starcoder),
    ("command-r", Set::Starcoder),
    ("qwen2", Set::Qwen2),
    ("deepseek-r1-qwen", Set::Qwen2),
    ("kormo", Set::Qwen2),
    ("f2llmv2", Set::Qwen2),
    ("qwen35", Set::Qwen35),
    ("stablelm2", Set::Qwen2),
    ("olmo", Set::Gpt2),
    ("dbrx", Set::Llama3),
    ("smaug-bpe", Set::Llama3),
    ("poro-chat", Set::Poro),
    ("chatglm-bpe", Set::Llama3),
    ("glm4", Set::Llama3),
    ("glm5", Set::Llama3),
    ("viking", Set::Viking),
    ("jais", Set::Gpt2),
    ("tekken", Set::Tekken),
    ("smollm", Set::Starcoder),
    ("codeshell", Set::Starcoder),
    ("bloom", Set::Poro),
    ("gpt3-finnish", Set::Poro),
    ("exaone", Set::Starcoder),
    ("exaone4", Set::Gpt2),
    ("exaone-moe", Set::ExaoneMoe),
    ("chameleon", Set::Chameleon),
    ("minerva-7b", Set::Starcoder),
    ("megrez", Set::Qwen2),
    ("gpt-4o", Set::Gpt4o),
    ("llama4", Set::Gpt4o),
    ("kanana2", Set::Gpt4o),
    ("talkie", Set::Gpt4o),
    ("granite-embed-multi-97m", Set::GraniteEmbMulti),
    ("superbpe", Set::Superbpe),
    ("trillion", Set::Gpt2),
    ("granite-docling", Set::Gpt2),
    ("bailingmoe", Set::Bailingmoe),
    ("bailingmoe2", Set::Bailingmoe),
    ("llada-moe", Set::Bailingmoe),
    ("seed-coder", Set::SeedCoder),
    ("hunyuan", Set::Qwen2),
    ("hunyuan-dense", Set::Deepseek3),
    ("hy_v4", Set::Deepseek3),
    ("joyai-llm", Set::Deepseek3),
    ("ufakzeka", Set::Ufakzeka),
    ("grok-2", Set::Qwen2),
    ("laguna", Set::Laguna),
    ("minimax-m2", Set::Gpt4o),
    ("solar-open", Set::Qwen2),
    ("mellum2", Set::Starcoder),
];

/// Every `tokenizer.ggml.pre` name kiln accepts.
pub fn supported_names() -> impl Iterator<Item = &'static str> {
    NAMES.iter().map(|(n, _)| *n)
}

/// The pre-tokenizer of `tokenizer.ggml.pre` = `name` (None: the key is missing, which llama.cpp
/// treats as "default"). An unknown name is an error listing the supported ones.
pub fn lookup(name: Option<&str>) -> Result<Pre> {
    let name = name.unwrap_or("default");
    let name = if name.is_empty() { "default" } else { name };
    if UNIMPLEMENTED.contains(&name) {
        bail!(
            "tokenizer.ggml.pre {name:?} is not supported by kiln (llama.cpp hand-codes its split); \
             supported: {}",
            supported_names().collect::<Vec<_>>().join(", ")
        );
    }
    let Some(&(_, set)) = NAMES.iter().find(|(n, _)| *n == name) else {
        bail!(
            "unknown pre-tokenizer tokenizer.ggml.pre = {name:?}; supported: {}",
            supported_names().collect::<Vec<_>>().join(", ")
        );
    };
    let one_of = |l: &[&str]| l.contains(&name);
    Ok(Pre {
        set,
        ignore_merges: one_of(&[
            "minicpm5",
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "youtu",
            "glm4",
            "glm5",
            "tekken",
            "granite-embed-multi-97m",
        ]),
        add_bos: matches!(set, Set::Llama3 | Set::Tekken | Set::Chameleon)
            && !one_of(&["dbrx", "smaug-bpe", "chatglm-bpe", "glm4", "glm5"]),
        no_bos: one_of(&["chatglm-bpe", "glm4", "glm5"]),
        byte_encode: !matches!(set, Set::Newlines | Set::Whitespace),
        escape_whitespaces: set == Set::Newlines,
    })
}

/// The compiled expressions of each set, built on first use.
fn compiled(set: Set) -> &'static [Regex] {
    type Cache = std::sync::Mutex<Vec<(Set, &'static [Regex])>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, r)) = c.iter().find(|(s, _)| *s == set) {
        return r;
    }
    let regexes: Vec<Regex> = set
        .exprs()
        .iter()
        .map(|e| {
            fancy_regex::RegexBuilder::new(e)
                .backtrack_limit(10_000_000)
                .build()
                .unwrap_or_else(|err| panic!("pre-tokenizer regex {e:?}: {err}"))
        })
        .collect();
    let leaked: &'static [Regex] = Vec::leak(regexes);
    c.push((set, leaked));
    leaked
}

/// Splits `text` into words as `unicode_regex_split` does: each expression cuts every piece of the
/// previous split into its matches and the gaps between them; empty pieces are dropped. Returns
/// byte ranges of `text`, in order, covering it.
pub fn split(set: Set, text: &str) -> Vec<(usize, usize)> {
    let mut pieces = vec![(0, text.len())];
    if text.is_empty() {
        return Vec::new();
    }
    for re in compiled(set) {
        let mut next = Vec::with_capacity(pieces.len() * 2);
        for &(a, b) in &pieces {
            let chunk = &text[a..b];
            let mut last = 0;
            for m in re.find_iter(chunk) {
                // A match the backtracking engine gives up on ends the matching in this piece,
                // whose rest stays one word.
                let Ok(m) = m else { break };
                if m.start() > last {
                    next.push((a + last, a + m.start()));
                }
                if m.end() > m.start() {
                    next.push((a + m.start(), a + m.end()));
                }
                last = m.end();
            }
            if last < chunk.len() {
                next.push((a + last, b));
            }
        }
        pieces = next;
    }
    pieces
}
