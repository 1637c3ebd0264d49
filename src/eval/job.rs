//! The evaluation jobs behind `kiln perplexity`, `bench` and `imatrix`: each opens a GGUF,
//! checks it before touching a weight, loads it on the chosen device and runs the evaluation,
//! returning a typed result. Status lines and bars go to a [`Progress`] sink; nothing prints.

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use kiln_formats::gguf::GgufFile;
use kiln_formats::imatrix::{write_file, Imatrix};

use crate::eval::bench::{bench, BenchParams, BenchStat};
use crate::eval::imatrix::{collect, CollectParams, Collector};
use crate::eval::kld::{self, BaseLogits, KldChunkRow, KldResult};
use crate::eval::perplexity::{
    check_memory, n_chunks, perplexity as run_ppl, perplexity_save_base, PplParams, PplResult,
};
use crate::eval::read_text;
use crate::eval::rope::{apply_rope, RopeOverrides, RopeReport};
use crate::model::device::{self, Device, Evaluator};
use crate::model::{Backend, Hparams};
use crate::progress::{Progress, Unit};
use crate::tokenizer::Tokenizer;

/// `-c` of perplexity when none is given.
pub const DEFAULT_CTX: usize = 512;

/// The model an evaluation runs and where: shared by every job here.
#[derive(Clone, Debug)]
pub struct Target {
    /// The GGUF file.
    pub model: PathBuf,
    /// `--device`.
    pub device: Device,
    /// Threads (None: all cores).
    pub threads: Option<usize>,
    /// RoPE context-extension overrides.
    pub rope: RopeOverrides,
}

impl Target {
    /// `model` on the default device, all cores, the model's own RoPE.
    pub fn new(model: PathBuf) -> Target {
        Target {
            model,
            device: Device::Auto,
            threads: None,
            rope: RopeOverrides::default(),
        }
    }
}

/// A GGUF opened for evaluation: its vocabulary and configuration checked before any weight is
/// touched.
pub struct Opened {
    pub file: Arc<GgufFile>,
    /// None when the file has no vocabulary.
    pub tok: Option<Tokenizer>,
    pub cfg: Hparams,
}

impl Opened {
    /// Opens `path`; `need_vocab` refuses a file without `tokenizer.ggml.tokens`.
    pub fn open(path: &Path, need_vocab: bool) -> Result<Opened> {
        let file =
            Arc::new(GgufFile::open(path).with_context(|| format!("opening {}", path.display()))?);
        let tok = if file.get("tokenizer.ggml.tokens").is_none() {
            if need_vocab {
                bail!(
                    "{} has no vocabulary (tokenizer.ggml.tokens is missing)",
                    path.display()
                );
            }
            None
        } else {
            Some(
                Tokenizer::from_gguf(&file)
                    .with_context(|| format!("reading the vocabulary of {}", path.display()))?,
            )
        };
        let cfg = Hparams::from_gguf(&file).with_context(|| format!("{}", path.display()))?;
        Ok(Opened { file, tok, cfg })
    }

    /// BOS to put first in each chunk, when the vocabulary adds one.
    pub fn bos(&self) -> Option<u32> {
        let t = self.tok.as_ref()?;
        if t.add_bos() {
            Some(t.bos().unwrap_or(1))
        } else {
            None
        }
    }

    /// Loads the weights on `device` with the RoPE overrides applied for context `n_ctx`.
    pub fn load(
        &self,
        device: &Device,
        rope: &RopeOverrides,
        n_ctx: usize,
    ) -> Result<(Evaluator, RopeReport)> {
        let path = self.file.path().to_path_buf();
        let mut model = device::load(Arc::clone(&self.file), device)
            .with_context(|| format!("loading {}", path.display()))?;
        let report = apply_rope(&mut model.cfg, &self.file, rope, n_ctx)?;
        Ok((model, report))
    }
}

/// A rayon pool of `threads` threads (all cores when None).
pub fn thread_pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(t) = threads {
        pool = pool.num_threads(t.max(1));
    }
    pool.build().context("starting threads")
}

/// Opens a model for perplexity or KLD: a vocabulary is required and one that adds EOS refused.
fn open_for_ppl(t: &Target) -> Result<(Opened, rayon::ThreadPool)> {
    t.device.check()?;
    let m = Opened::open(&t.model, true)?;
    if m.tok.as_ref().is_some_and(|t| t.add_eos()) {
        bail!(
            "the vocabulary of {} adds EOS; llama-perplexity refuses such models too",
            t.model.display()
        );
    }
    Ok((m, thread_pool(t.threads)?))
}

/// Reads token ids separated by whitespace, commas or brackets (`llama-tokenize --ids` output).
pub fn read_ids(path: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading token ids from {}", path.display()))?;
    text.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .with_context(|| format!("{}: '{s}' is not a token id", path.display()))
        })
        .collect()
}

/// What perplexity is computed on.
#[derive(Clone, Debug)]
pub enum TextInput {
    /// A text file, tokenized with the model's vocabulary.
    File(PathBuf),
    /// Token ids already made (BOS included), see [`read_ids`].
    TokenIds(PathBuf),
}

/// Options of [`perplexity`].
#[derive(Clone, Debug)]
pub struct PerplexityOptions {
    pub target: Target,
    pub text: TextInput,
    /// Tokens per chunk (`-c`).
    pub n_ctx: usize,
    /// Tokens per forward pass (`-b`, capped at `n_ctx`).
    pub n_batch: usize,
    /// At most this many chunks.
    pub chunks: Option<usize>,
    /// Also write the base log-probability file of `--kl-divergence-base` here.
    pub save_base: Option<PathBuf>,
}

impl PerplexityOptions {
    /// Perplexity of `model` on the text file `text` with llama-perplexity's defaults.
    pub fn new(model: PathBuf, text: PathBuf) -> PerplexityOptions {
        PerplexityOptions {
            target: Target::new(model),
            text: TextInput::File(text),
            n_ctx: DEFAULT_CTX,
            n_batch: 2048,
            chunks: None,
            save_base: None,
        }
    }
}

/// What [`perplexity`] measured.
#[derive(Clone, Debug)]
pub struct PerplexityDone {
    pub result: PplResult,
    pub rope: RopeReport,
    /// Tokens of the whole text.
    pub n_tokens: usize,
    /// The batch size used.
    pub n_batch: usize,
    pub seconds: f64,
}

/// Perplexity of a GGUF model on a text, as llama-perplexity computes it; with `save_base`, the
/// base log-probabilities are written too (removed again if the run fails).
pub fn perplexity(o: &PerplexityOptions, progress: &dyn Progress) -> Result<PerplexityDone> {
    let (m, pool) = open_for_ppl(&o.target)?;
    let ctx = o.n_ctx;
    if ctx < 2 {
        bail!("-c must be at least 2");
    }
    let n_batch = o.n_batch.clamp(1, ctx);
    let path = &o.target.model;
    check_memory(&m.cfg, ctx, n_batch).with_context(|| format!("{}", path.display()))?;
    let (tokens, source) = match &o.text {
        TextInput::TokenIds(ids) => (read_ids(ids)?, ids),
        TextInput::File(f) => {
            let text = read_text(f)?;
            let tok = m.tok.as_ref().context("no vocabulary")?;
            (tok.encode(&text, true, false), f)
        }
    };
    let params = PplParams {
        n_ctx: ctx,
        n_batch,
        max_chunks: o.chunks,
    };
    let n_chunk =
        n_chunks(tokens.len(), &params).with_context(|| format!("{}", source.display()))?;
    let (model, rope) = m.load(&o.target.device, &o.target.rope, ctx)?;
    progress.note(&format!(
        "perplexity: {} tokens, calculating perplexity over {n_chunk} chunks, n_ctx={ctx}, batch_size={n_batch}, {}, {rope}",
        tokens.len(),
        pool.install(|| model.backend.name()),
    ));
    if ctx > rope.n_ctx_train && o.target.rope.ntk.is_none() {
        progress.note(&format!(
            "perplexity: warning: the model was trained on only {} context tokens ({ctx} asked); see --ntk auto",
            rope.n_ctx_train
        ));
    }
    let bar = progress.bar(n_chunk as u64, Unit::Chunks);
    let t0 = Instant::now();
    let on_chunk = |k: usize, r: f64| {
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        bar.set_position(k as u64);
        bar.set_message(&format!("[{k}]{r:.4} {:.1} tok/s", (k * ctx) as f64 / secs));
    };
    let bos = m.bos();
    let result = pool.install(|| match &o.save_base {
        None => run_ppl(&model, &tokens, bos, &params, on_chunk),
        Some(path) => {
            let f = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            let mut w = BufWriter::new(f);
            progress.note(&format!(
                "perplexity: saving the log-probabilities to {}",
                path.display()
            ));
            let r = perplexity_save_base(&model, &tokens, bos, &params, &mut w, on_chunk)
                .with_context(|| format!("writing {}", path.display()));
            if r.is_err() {
                drop(w);
                // a partial file must not pass for a base
                let _ = std::fs::remove_file(path);
            }
            r
        }
    })?;
    bar.finish();
    Ok(PerplexityDone {
        result,
        rope,
        n_tokens: tokens.len(),
        n_batch,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Options of [`kld()`].
#[derive(Clone, Debug)]
pub struct KldOptions {
    pub target: Target,
    /// The base log-probability file (llama-perplexity's `--kl-divergence-base` format).
    pub base: PathBuf,
    /// `-c` as asked; the base file's context is used (a different value is noted).
    pub n_ctx: Option<usize>,
    /// Tokens per forward pass (capped at the base file's context).
    pub n_batch: usize,
    /// At most this many chunks.
    pub chunks: Option<usize>,
}

/// What [`kld()`] measured.
#[derive(Clone, Debug)]
pub struct KldDone {
    pub result: KldResult,
    /// The running statistics after each chunk (llama-perplexity's table).
    pub rows: Vec<KldChunkRow>,
    pub rope: RopeReport,
    /// The base file's context.
    pub n_ctx: usize,
    pub seconds: f64,
}

/// KL divergence of a GGUF model against a base model's saved log-probabilities, with
/// llama-perplexity's statistics.
pub fn kld(o: &KldOptions, progress: &dyn Progress) -> Result<KldDone> {
    let (m, pool) = open_for_ppl(&o.target)?;
    pool.install(|| kld_in_pool(o, &m, progress))
}

fn kld_in_pool(o: &KldOptions, m: &Opened, progress: &dyn Progress) -> Result<KldDone> {
    let path = &o.target.model;
    let mut base = BaseLogits::open(&o.base)?;
    if base.n_vocab != m.cfg.shape.n_vocab {
        bail!(
            "{} was computed with a vocabulary of {} tokens, but {} has {}",
            o.base.display(),
            base.n_vocab,
            path.display(),
            m.cfg.shape.n_vocab
        );
    }
    let ctx = base.n_ctx;
    if let Some(c) = o.n_ctx.filter(|&c| c != ctx) {
        progress.note(&format!(
            "kl-divergence: using the base file's n_ctx={ctx} (not -c {c}), as llama-perplexity does"
        ));
    }
    let n_batch = o.n_batch.clamp(1, ctx);
    check_memory(&m.cfg, ctx, n_batch).with_context(|| format!("{}", path.display()))?;
    let n_chunk = match o.chunks {
        Some(c) if c > 0 => c.min(base.n_chunk),
        _ => base.n_chunk,
    };
    let (model, rope) = m.load(&o.target.device, &o.target.rope, ctx)?;
    progress.note(&format!(
        "kl-divergence: computing over {n_chunk} chunks of {}, n_ctx={ctx}, batch_size={n_batch}, {}, {rope}",
        o.base.display(),
        model.backend.name(),
    ));
    let bar = progress.bar(n_chunk as u64, Unit::Chunks);
    let t0 = Instant::now();
    let mut rows = Vec::new();
    let result = kld::kld_stats(&model, &mut base, m.bos(), n_batch, o.chunks, |row| {
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        bar.set_position(row.chunk as u64);
        bar.set_message(&format!(
            "KLD {:.5} {:.1} tok/s",
            row.kld.value,
            (row.chunk * ctx) as f64 / secs
        ));
        rows.push(*row);
    })
    .with_context(|| format!("evaluating {}", path.display()))?;
    bar.finish();
    Ok(KldDone {
        result,
        rows,
        rope,
        n_ctx: ctx,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Options of [`bench`](bench_model).
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub target: Target,
    pub params: BenchParams,
}

/// What [`bench_model`] measured.
#[derive(Clone, Debug)]
pub struct BenchDone {
    pub stats: Vec<BenchStat>,
    /// Bytes of all tensors.
    pub size: u64,
    /// Parameters of all tensors.
    pub n_params: u64,
    pub threads: usize,
    /// The device's name ("cpu").
    pub backend: &'static str,
    pub rope: RopeReport,
}

/// Prompt-processing and generation speed as llama-bench measures them (random tokens, so no
/// vocabulary is needed). Each run is announced through `progress`.
pub fn bench_model(o: &BenchOptions, progress: &dyn Progress) -> Result<BenchDone> {
    let t = &o.target;
    t.device.check()?;
    // No tokenizer is built: the tokens are random, and BOS comes from the metadata alone.
    let file = Arc::new(
        GgufFile::open(&t.model).with_context(|| format!("opening {}", t.model.display()))?,
    );
    let cfg = Hparams::from_gguf(&file).with_context(|| format!("{}", t.model.display()))?;
    let bos = Tokenizer::bos_from_keys(&file);
    let m = Opened {
        file,
        tok: None,
        cfg,
    };
    let pool = thread_pool(t.threads)?;
    let p = &o.params;
    let (model, rope) = m.load(&t.device, &t.rope, p.n_prompt.max(p.n_gen))?;
    let stats = pool.install(|| {
        bench(&model, bos, p, |test, rep| {
            if rep == 0 {
                progress.note(&format!("kiln bench: {test}: warm-up run"));
            } else {
                progress.note(&format!("kiln bench: {test}: run {rep}/{}", p.reps));
            }
        })
    })?;
    Ok(BenchDone {
        stats,
        size: m.file.tensors.iter().map(|t| t.n_bytes()).sum(),
        n_params: m.file.tensors.iter().map(|t| t.n_elements()).sum(),
        threads: pool.current_num_threads(),
        backend: t.device.name(),
        rope,
    })
}

/// File format of an importance matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ImatrixFormat {
    /// llama.cpp's GGUF imatrix format.
    Gguf,
    /// The legacy `.dat` format.
    Dat,
}

/// Options of [`imatrix`].
#[derive(Clone, Debug)]
pub struct ImatrixOptions {
    /// The model (RoPE overrides do not apply).
    pub target: Target,
    /// Calibration text; without it the `in_files` are only combined.
    pub text: Option<PathBuf>,
    pub output: PathBuf,
    pub format: ImatrixFormat,
    /// Tokens per chunk.
    pub n_ctx: usize,
    /// At most this many chunks.
    pub chunks: Option<usize>,
    /// Earlier matrices to start from.
    pub in_files: Vec<PathBuf>,
    /// Also save to `OUTPUT.at_K` every N chunks (0: never).
    pub save_frequency: usize,
    /// Rewrite the output every N chunks.
    pub output_frequency: usize,
    /// Collect `output.weight` too.
    pub process_output: bool,
    /// Compute the running perplexity.
    pub compute_ppl: bool,
}

/// What [`imatrix`] did.
#[derive(Clone, Debug)]
pub enum ImatrixDone {
    /// No text: the `in_files` were combined into the output.
    Combined { files: usize },
    /// A collection run.
    Collected {
        /// Tensors in the matrix.
        entries: usize,
        n_chunk: usize,
        /// Tokens evaluated.
        n_eval: usize,
        /// The final perplexity and its error, when computed.
        ppl: Option<(f64, Option<f64>)>,
        seconds: f64,
    },
}

fn save_imatrix(
    col: &Collector,
    fmt: ImatrixFormat,
    path: &Path,
    dataset: Option<&str>,
) -> Result<()> {
    let bytes = match fmt {
        ImatrixFormat::Gguf => col.gguf_bytes(dataset)?,
        ImatrixFormat::Dat => col.legacy_bytes(dataset),
    };
    write_file(path, &bytes)?;
    Ok(())
}

/// An importance matrix as llama-imatrix computes it (same chunks, BOS handling, tensors and
/// tokens), saved every `output_frequency` chunks and at the end. `on_chunk(k, running_ppl)`
/// runs after every chunk.
pub fn imatrix(
    o: &ImatrixOptions,
    progress: &dyn Progress,
    on_chunk: &mut (dyn FnMut(usize, f64) + Send),
) -> Result<ImatrixDone> {
    o.target.device.check()?;
    if o.n_ctx == 0 {
        bail!("-c must be positive");
    }
    let chunk_size = u32::try_from(o.n_ctx).context("-c is too large")?;
    let mut col = Collector::new(chunk_size, o.process_output);
    for f in &o.in_files {
        let m = Imatrix::read(f)?;
        col.merge(&m, &f.display().to_string())?;
        progress.note(&format!(
            "imatrix: loaded {} entries from {}",
            m.entries.len(),
            f.display()
        ));
    }
    let Some(text_path) = &o.text else {
        if o.in_files.is_empty() {
            bail!("no text (-f) and no --in-file matrices to combine");
        }
        save_imatrix(&col, o.format, &o.output, None)?;
        return Ok(ImatrixDone::Combined {
            files: o.in_files.len(),
        });
    };
    let dataset = text_path.to_string_lossy().into_owned();
    let path = &o.target.model;
    let file =
        Arc::new(GgufFile::open(path).with_context(|| format!("opening {}", path.display()))?);
    let tok = Tokenizer::from_gguf(&file)
        .with_context(|| format!("reading the vocabulary of {}", path.display()))?;
    if tok.add_eos() {
        bail!("the vocabulary adds EOS; llama-imatrix refuses such models too");
    }
    let bos = tok.bos().filter(|_| tok.add_bos());
    let tokens = tok.encode(&read_text(text_path)?, true, false);
    let params = PplParams {
        n_ctx: o.n_ctx,
        n_batch: o.n_ctx,
        max_chunks: o.chunks,
    };
    let n_chunk = n_chunks(tokens.len(), &params)?;
    let pool = thread_pool(o.target.threads)?;
    let model = device::load(Arc::clone(&file), &o.target.device)
        .with_context(|| format!("loading {}", path.display()))?;
    progress.note(&format!(
        "imatrix: {} tokens, computing over {n_chunk} chunks, n_ctx={}, {}",
        tokens.len(),
        o.n_ctx,
        model.backend.name()
    ));
    let t0 = Instant::now();
    let (fmt, out) = (o.format, &o.output);
    let (save_freq, out_freq) = (o.save_frequency, o.output_frequency.max(1));
    let run = pool.install(|| {
        collect(
            &model,
            &tokens,
            bos,
            CollectParams {
                n_ctx: o.n_ctx,
                n_chunk,
                compute_ppl: o.compute_ppl,
            },
            &mut col,
            |k, r, c| {
                on_chunk(k, r);
                if k % out_freq == 0 && k < n_chunk {
                    save_imatrix(c, fmt, out, Some(&dataset))?;
                }
                if save_freq > 0 && k % save_freq == 0 {
                    let mut p = out.clone().into_os_string();
                    p.push(format!(".at_{}", c.last_chunk));
                    save_imatrix(c, fmt, Path::new(&p), Some(&dataset))?;
                }
                Ok(())
            },
        )
    })?;
    save_imatrix(&col, o.format, &o.output, Some(&dataset))?;
    Ok(ImatrixDone::Collected {
        entries: col.entries.len(),
        n_chunk,
        n_eval: n_chunk * o.n_ctx,
        ppl: o.compute_ppl.then_some((run.ppl, run.ppl_err)),
        seconds: t0.elapsed().as_secs_f64(),
    })
}
