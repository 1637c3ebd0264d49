//! Evaluation of a loaded model: perplexity and KL divergence exactly as llama-perplexity computes
//! them, llama-bench-style speed measurement, importance matrices as llama-imatrix collects them,
//! and RoPE context extension.

pub mod bench;
pub mod chunks;
pub mod imatrix;
pub mod job;
pub mod kld;
pub mod perplexity;
pub mod rope;

use anyhow::{bail, Context, Result};
use std::path::Path;

/// Largest evaluation or calibration text read (bytes).
const MAX_TEXT_BYTES: u64 = 1 << 30;

/// Reads an evaluation text as llama-perplexity does (UTF-8, one trailing newline dropped);
/// refuses a folder, huge, non-UTF-8 or empty.
pub fn read_text(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.is_dir() {
        bail!("{} is a folder, not a text file", path.display());
    }
    if meta.len() > MAX_TEXT_BYTES {
        bail!("{} is larger than {MAX_TEXT_BYTES} bytes", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut text = String::from_utf8(bytes)
        .with_context(|| format!("{} is not UTF-8 text", path.display()))?;
    if text.ends_with('\n') {
        text.pop();
    }
    if text.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(text)
}
