//! `kiln tokenize`: tokenize a prompt or a file with a GGUF model's vocabulary, printing what
//! llama.cpp's `llama-tokenize` prints.

use crate::Outcome;
use anyhow::{bail, Context, Result};
use kiln::tokenizer::Tokenizer;
use kiln_formats::gguf::GgufFile;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `kiln tokenize`.
#[derive(clap::Args)]
#[command(
    after_help = "Output is llama-tokenize's (`ID -> 'piece'` per token, or `--ids` as a Python list).\n\
                  The text is used as is: unlike llama-tokenize, kiln processes no escape sequences\n\
                  (llama-tokenize --no-escape), and special tokens are parsed only with --parse-special\n\
                  (llama-tokenize --no-parse-special is the default here).\n\n\
                  Examples:\n  kiln tokenize -m model.gguf -p 'Hello world'\n  kiln tokenize -m model.gguf -f text.txt --ids"
)]
pub struct Args {
    /// The GGUF model whose vocabulary (tokenizer.ggml.*) is used.
    #[arg(short, long)]
    pub model: PathBuf,
    /// A file with the text (read as bytes, all of it, trailing newline included).
    #[arg(
        short,
        long,
        conflicts_with = "prompt",
        required_unless_present = "prompt"
    )]
    pub file: Option<PathBuf>,
    /// The text.
    #[arg(short, long)]
    pub prompt: Option<String>,
    /// Print only the ids, as a Python list `[1, 2, 3]`.
    #[arg(long)]
    pub ids: bool,
    /// Add no BOS (and no EOS) even if the model asks for them.
    #[arg(long)]
    pub no_bos: bool,
    /// Split control tokens (`<s>`, `</s>`, ...) written in the text out as tokens.
    #[arg(long)]
    pub parse_special: bool,
    /// Print `Total number of tokens: N` at the end.
    #[arg(long)]
    pub show_count: bool,
    /// Print JSON: ids, pieces and the count.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<Outcome> {
    let text: Vec<u8> = match (&a.file, &a.prompt) {
        (Some(f), _) => std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
        (None, Some(p)) => p.clone().into_bytes(),
        (None, None) => bail!("give the text with -f FILE or -p PROMPT"),
    };
    let gguf = GgufFile::open(&a.model)?;
    let tok = Tokenizer::from_gguf(&gguf.header)
        .with_context(|| format!("{}: cannot build the tokenizer", a.model.display()))?;
    // llama-tokenize passes add_special = model wants BOS && !--no-bos.
    let add_special = tok.add_bos() && !a.no_bos;
    let ids = tok.encode_bytes(&text, add_special, a.parse_special);

    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if a.json {
        let pieces: Vec<String> = ids
            .iter()
            .map(|&i| String::from_utf8_lossy(&tok.decode_piece(i)).into_owned())
            .collect();
        let v = json!({
            "model": a.model.display().to_string(),
            "n_tokens": ids.len(),
            "add_special": add_special,
            "parse_special": a.parse_special,
            "ids": ids,
            "pieces": pieces,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else if a.ids {
        let list: Vec<String> = ids.iter().map(u32::to_string).collect();
        writeln!(out, "[{}]", list.join(", "))?;
    } else {
        for &id in &ids {
            let piece = tok.decode_piece(id);
            // llama-tokenize prints the piece with printf("%s"): it ends at a NUL byte.
            let end = piece.iter().position(|&b| b == 0).unwrap_or(piece.len());
            write!(out, "{id:6} -> '")?;
            out.write_all(&piece[..end])?;
            writeln!(out, "'")?;
        }
    }
    if a.show_count && !a.json {
        writeln!(out, "Total number of tokens: {}", ids.len())?;
    }
    out.flush()?;
    Ok(Outcome::Ok)
}
