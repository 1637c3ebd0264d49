//! The quantize job: a GGUF file to any llama.cpp quantization level, byte-identical to
//! llama-quantize. [`quantize`] plans and checks everything; [`QuantizeJob::write`] streams the
//! output.

use crate::progress::{Progress, Unit};
use crate::quant_plan::{self, Ftype, Overrides, PlanTensor, Planner};
use crate::shape::ModelShape;
use crate::transcode::Recode;
use anyhow::{anyhow, bail, Context, Result};
use kiln_formats::gguf::{GgufFile, GgufValue, GgufWriter, TensorInfo};
use kiln_formats::imatrix::Imatrix;
use kiln_quant::GgmlType;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The TYPE names `kiln quantize` accepts, for help and error texts.
pub const TYPES_HELP: &str =
    "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q2_K_S (needs --imatrix), Q3_K_S, Q3_K_M, Q3_K_L, \
Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K (aliases Q3_K, Q4_K, Q5_K; case-insensitive)";

/// Parses a ggml tensor type name for `flag` (Q8_K is internal and refused).
pub fn parse_type(s: &str, flag: &str) -> Result<GgmlType> {
    GgmlType::from_name(s)
        .filter(|t| *t != GgmlType::Q8K)
        .ok_or_else(|| {
            anyhow!("{flag}: unknown tensor type {s:?} (use a ggml type such as Q8_0, Q6_K, F16)")
        })
}

/// The model facts the mix rules need, from the GGUF metadata.
fn model_shape(f: &GgufFile) -> Result<ModelShape> {
    ModelShape::from_gguf(f).with_context(|| {
        format!(
            "{}: kiln quantizes Llama-family models (general.architecture = \"llama\") with complete metadata",
            f.path().display()
        )
    })
}

/// The imatrix as llama-quantize uses it: per-column weights by tensor name after the include /
/// exclude filters, and the metadata it records in the output.
pub struct QuantWeights {
    pub weights: BTreeMap<String, Vec<f32>>,
    pub metadata: Vec<(String, GgufValue)>,
}

/// A string as llama.cpp's 128-byte KV override holds it (at most 127 bytes).
fn kv_str(s: &str) -> String {
    let mut n = s.len().min(127);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    s[..n].to_string()
}

/// Loads `path` and applies `--exclude-weights` / `--include-weights` (substring matches) as
/// llama-quantize's `prepare_imatrix` does.
pub fn load_quant_weights(
    path: &std::path::Path,
    include: &[String],
    exclude: &[String],
) -> Result<QuantWeights> {
    let m = Imatrix::read(path)?;
    if !m.is_legacy && !m.has_metadata {
        bail!(
            "{}: missing imatrix metadata (imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size)",
            path.display()
        );
    }
    let mut weights = m.quant_weights();
    for name in exclude {
        weights.retain(|k, _| !k.contains(name.as_str()));
    }
    if !include.is_empty() {
        weights.retain(|k, _| include.iter().any(|n| k.contains(n.as_str())));
    }
    for (name, w) in &weights {
        if let Some(v) = w.iter().find(|v| !v.is_finite()) {
            bail!(
                "{}: imatrix contains non-finite value {v} (entry {name})",
                path.display()
            );
        }
    }
    let mut metadata = Vec::new();
    if !weights.is_empty() {
        metadata.push((
            "quantize.imatrix.file".to_string(),
            GgufValue::String(kv_str(&path.to_string_lossy())),
        ));
        if let Some(d) = m.datasets.first() {
            metadata.push((
                "quantize.imatrix.dataset".to_string(),
                GgufValue::String(kv_str(d)),
            ));
        }
        metadata.push((
            "quantize.imatrix.entries_count".to_string(),
            GgufValue::U32(weights.len() as u32),
        ));
        if m.chunk_count as i32 > 0 {
            metadata.push((
                "quantize.imatrix.chunks_count".to_string(),
                GgufValue::U32(m.chunk_count),
            ));
        }
    }
    Ok(QuantWeights { weights, metadata })
}

/// One tensor to re-encode: its source bytes, what it becomes, and its importance weights
/// (`cols` values per matrix of `rows_per_mat` rows) when the target type uses them.
struct Job<'a> {
    code: Recode<'a>,
    src: &'a [u8],
    rows: usize,
    cols: usize,
    in_row: usize,
    out_row: usize,
    rows_per_mat: usize,
    weights: Option<&'a [f32]>,
}

/// Output bytes per chunk handed from the encoder to the writer: small enough that a few chunks in
/// flight keep the resident set low, large enough that every thread gets many rows.
const CHUNK_BYTES: usize = 8 << 20;

impl<'a> Job<'a> {
    fn new(
        code: Recode<'a>,
        src: &'a [u8],
        rows_per_mat: usize,
        weights: Option<&'a [f32]>,
    ) -> Result<Job<'a>> {
        let (in_row, out_row) = code.row_sizes(src.len())?;
        Ok(Job {
            code,
            src,
            rows: code.rows,
            cols: code.cols,
            in_row,
            out_row,
            rows_per_mat: rows_per_mat.max(1),
            weights,
        })
    }

    /// Row ranges of about [`CHUNK_BYTES`] of input or output each, in order.
    fn chunks(&self) -> impl Iterator<Item = (usize, usize)> {
        let per = (CHUNK_BYTES / self.in_row.max(self.out_row).max(1)).max(1);
        let rows = self.rows;
        (0..rows.div_ceil(per)).map(move |c| (c * per, ((c + 1) * per).min(rows)))
    }

    /// Encodes rows `r0..r1` into `out` (resized to fit; its old contents are all overwritten),
    /// rows in parallel: each row is decoded to f32, checked finite when the target is quantized
    /// (llama.cpp's quantizers would write NaN or Inf scales its own loader then rejects), and
    /// quantized, with the importance weights of its matrix when there are any.
    fn encode_rows(&self, r0: usize, r1: usize, out: &mut Vec<u8>) -> Result<()> {
        let n = (r1 - r0) * self.out_row;
        out.truncate(n);
        out.resize(n, 0);
        let src = &self.src[r0 * self.in_row..r1 * self.in_row];
        out.par_chunks_mut(self.out_row)
            .zip(src.par_chunks(self.in_row))
            .enumerate()
            .try_for_each_init(
                || vec![0f32; self.cols],
                |buf, (i, (dst, s))| -> Result<()> {
                    let r = r0 + i;
                    let w = match self.weights {
                        Some(w) => {
                            let m = r / self.rows_per_mat;
                            Some(w.get(m * self.cols..(m + 1) * self.cols).ok_or_else(|| {
                                anyhow!(
                                    "tensor {}: no importance weights for row {r}",
                                    self.code.tensor
                                )
                            })?)
                        }
                        None => None,
                    };
                    crate::transcode::encode_row(&self.code, r, s, w, buf, dst)
                },
            )
    }
}

/// What to quantize and how.
pub struct QuantizeOptions {
    /// Input GGUF (normally F16).
    pub input: PathBuf,
    /// The level.
    pub ftype: Ftype,
    /// llama-quantize's per-tensor overrides (--pure, --tensor-type, ...).
    pub overrides: Overrides,
    /// Importance matrix (llama-imatrix's GGUF or legacy .dat, or `kiln imatrix`'s).
    pub imatrix: Option<PathBuf>,
    /// Use the imatrix only for tensors whose name contains one of these.
    pub include_weights: Vec<String>,
    /// Do not use the imatrix for tensors whose name contains one of these.
    pub exclude_weights: Vec<String>,
    /// Allow an input whose tensors are already quantized.
    pub allow_requantize: bool,
}

impl QuantizeOptions {
    /// `input` to `ftype` with llama-quantize's defaults.
    pub fn new(input: PathBuf, ftype: Ftype) -> QuantizeOptions {
        QuantizeOptions {
            input,
            ftype,
            overrides: Overrides::default(),
            imatrix: None,
            include_weights: Vec::new(),
            exclude_weights: Vec::new(),
            allow_requantize: false,
        }
    }
}

/// One tensor of the plan.
#[derive(Clone, Debug)]
pub struct PlannedTensor {
    pub name: String,
    pub shape: Vec<u64>,
    pub from: GgmlType,
    pub to: GgmlType,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// A checked quantization plan over an opened input, ready to write.
pub struct QuantizeJob {
    pub ftype: Ftype,
    pub input_path: PathBuf,
    input: GgufFile,
    /// Tensors in llama.cpp's loader order.
    order: Vec<usize>,
    pub tensors: Vec<PlannedTensor>,
    qw: Option<QuantWeights>,
    pub n_elements: u64,
    pub total_in: u64,
    pub total_out: u64,
}

/// What [`QuantizeJob::write`] wrote.
#[derive(Clone, Debug)]
pub struct QuantizeDone {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub bpw_in: f64,
    pub bpw_out: f64,
    pub seconds: f64,
}

/// Opens `o.input`, plans every tensor's type with llama-quantize's mix rules and makes every
/// check (importance matrix, requantizing); nothing is written.
pub fn quantize(o: &QuantizeOptions) -> Result<QuantizeJob> {
    let ftype = o.ftype;
    let mut ov = o.overrides.clone();
    let qw = match &o.imatrix {
        Some(p) => Some(load_quant_weights(
            p,
            &o.include_weights,
            &o.exclude_weights,
        )?),
        None => None,
    };
    let has_weights = qw.as_ref().is_some_and(|q| !q.weights.is_empty());
    ov.imatrix = has_weights;

    let input =
        GgufFile::open(&o.input).with_context(|| format!("reading {}", o.input.display()))?;
    let shape = model_shape(&input)?;
    let mut order: Vec<usize> = (0..input.tensors.len()).collect();
    order.sort_by(|&x, &y| {
        quant_plan::loader_order_key(&input.tensors[x].name)
            .cmp(&quant_plan::loader_order_key(&input.tensors[y].name))
    });
    let tinfo: Vec<&TensorInfo> = order.iter().map(|&i| &input.tensors[i]).collect();
    let plan_in: Vec<PlanTensor> = tinfo
        .iter()
        .map(|t| PlanTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            ty: t.ty,
        })
        .collect();
    let types = Planner::plan(ftype, shape, &ov, &plan_in);
    if !has_weights {
        if let Some((t, ty)) = tinfo
            .iter()
            .zip(&types)
            .find(|(t, ty)| **ty != t.ty && ftype.requires_imatrix(&t.name, **ty))
        {
            bail!(
                "{ftype} requires an importance matrix (--imatrix FILE): tensor {} would be {ty} \
                 (make one with `kiln imatrix -m MODEL -f TEXT`)",
                t.name
            );
        }
    }
    if !o.allow_requantize {
        if let Some((t, _)) = tinfo
            .iter()
            .zip(&types)
            .find(|(t, ty)| t.ty.is_quantized() && **ty != t.ty)
        {
            bail!(
                "{}: tensor {} is already quantized ({}); requantizing loses quality twice, so it needs --allow-requantize (better: quantize from the F16 file)",
                o.input.display(),
                t.name,
                t.ty
            );
        }
    }
    let tensors: Vec<PlannedTensor> = tinfo
        .iter()
        .zip(&types)
        .map(|(t, ty)| PlannedTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            from: t.ty,
            to: *ty,
            bytes_in: t.n_bytes(),
            bytes_out: ty.row_size(t.row_len()).unwrap_or(0)
                * (t.n_elements() / t.row_len().max(1)),
        })
        .collect();
    let n_elements: u64 = tinfo.iter().map(|t| t.n_elements()).sum();
    let total_in: u64 = tensors.iter().map(|t| t.bytes_in).sum();
    let total_out: u64 = tensors.iter().map(|t| t.bytes_out).sum();
    Ok(QuantizeJob {
        ftype,
        input_path: o.input.clone(),
        input,
        order,
        tensors,
        qw,
        n_elements,
        total_in,
        total_out,
    })
}

impl QuantizeJob {
    /// Bits per weight of `bytes` over the model's elements.
    pub fn bpw(&self, bytes: u64) -> f64 {
        bytes as f64 * 8.0 / self.n_elements.max(1) as f64
    }

    /// Writes the quantized GGUF to `out_path` (through a temporary name).
    pub fn write(&self, out_path: &Path, progress: &dyn Progress) -> Result<QuantizeDone> {
        let t0 = Instant::now();
        let ftype = self.ftype;
        let input = &self.input;
        let order: Vec<&TensorInfo> = self.order.iter().map(|&i| &input.tensors[i]).collect();
        let types: Vec<GgmlType> = self.tensors.iter().map(|t| t.to).collect();
        let qw = &self.qw;
        let weights = qw.as_ref().map(|q| &q.weights).filter(|w| !w.is_empty());
        let total_in = self.total_in;
        let mut meta = quant_plan::quantized_metadata(input.metadata.iter().cloned(), ftype);
        if let (Some(q), Some(_)) = (&qw, weights) {
            for (k, v) in &q.metadata {
                meta.retain(|(m, _)| m != k);
                meta.push((k.clone(), v.clone()));
            }
        }
        let infos: Vec<(String, Vec<u64>, GgmlType)> = order
            .iter()
            .zip(&types)
            .map(|(t, ty)| (t.name.clone(), kiln_formats::gguf::ggml_dims(&t.shape), *ty))
            .collect();
        let mut w = GgufWriter::create(out_path, &meta, &infos)
            .with_context(|| format!("creating {}", out_path.display()))?;
        // Every check first (importance weights, row sizes), so a bad tensor stops the run before
        // anything is written.
        let mut jobs = Vec::with_capacity(order.len());
        for (t, ty) in order.iter().zip(&types) {
            if t.ty == *ty {
                jobs.push(None);
                continue;
            }
            let cols = t.row_len() as usize;
            let rows = (t.n_elements() / t.row_len().max(1)) as usize;
            let rows_per_mat = t.shape.get(1).copied().unwrap_or(1) as usize;
            let n_mat = t.shape.get(2).copied().unwrap_or(1) as usize;
            let tw = match weights.and_then(|w| w.get(&t.name)) {
                Some(w) if w.len() == cols * n_mat => Some(w.as_slice()),
                Some(w) if t.name != "token_embd.weight" => bail!(
                    "imatrix size {} is different from tensor size {} for {}",
                    w.len(),
                    cols * n_mat,
                    t.name
                ),
                _ => None,
            };
            if tw.is_none() && ftype.requires_imatrix(&t.name, *ty) {
                bail!(
                    "missing importance matrix for tensor {} in a very low-bit quantization ({ty}); \
                     the result would be garbage",
                    t.name
                );
            }
            let tw = tw.filter(|_| kiln_quant::uses_weights(*ty));
            let src = input.tensor_data(t);
            let code = Recode {
                tensor: &t.name,
                src_ty: t.ty,
                dst_ty: *ty,
                rows,
                cols,
            };
            jobs.push(Some(Job::new(code, src, rows_per_mat, tw)?));
        }

        // one handle per input file (a split set has several) for the file-to-file copies
        let in_files = self
            .input
            .paths()
            .into_iter()
            .map(|p| {
                std::fs::File::open(p)
                    .map(|f| (p.to_path_buf(), f))
                    .with_context(|| format!("reading {}", p.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        let pb = progress.bar(total_in, Unit::Bytes);
        // An encoder thread quantizes chunk after chunk (rows in parallel on the rayon pool) while this
        // thread writes the previous chunk, so the file write overlaps the arithmetic. Three buffers
        // circulate: one being filled, one queued, one being written.
        std::thread::scope(|scope| -> Result<()> {
            let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Result<(Vec<u8>, u64)>>(1);
            let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
            for _ in 0..3 {
                let _ = free_tx.send(Vec::new());
            }
            let todo = &jobs;
            let input = &self.input;
            let tensors = &order;
            scope.spawn(move || {
                for (t, job) in tensors.iter().zip(todo) {
                    let Some(job) = job else { continue };
                    for (r0, r1) in job.chunks() {
                        let Ok(mut buf) = free_rx.recv() else { return };
                        let done = job
                            .encode_rows(r0, r1, &mut buf)
                            .map(|()| (buf, ((r1 - r0) * job.in_row) as u64));
                        // the input rows are not read again: their pages can go
                        input.release_part(t, (r0 * job.in_row) as u64, (r1 * job.in_row) as u64);
                        let failed = done.is_err();
                        if full_tx.send(done).is_err() || failed {
                            return;
                        }
                    }
                }
            });
            for ((t, ty), job) in order.iter().zip(&types).zip(&jobs) {
                pb.set_message(&format!("{} {} -> {}", t.name, t.ty, ty));
                let Some(job) = job else {
                    // A tensor that keeps its type is copied file to file by the kernel.
                    let (src, offset) = input
                        .tensor_location(t)
                        .and_then(|(p, off)| {
                            in_files.iter().find(|(q, _)| q == p).map(|(_, f)| (f, off))
                        })
                        .with_context(|| format!("tensor {} lies outside its file", t.name))?;
                    w.write_tensor_from_file(&t.name, src, offset, t.n_bytes())
                        .with_context(|| format!("writing {}", out_path.display()))?;
                    input.release(t);
                    pb.inc(t.n_bytes());
                    continue;
                };
                let mut failure = None;
                let n_bytes = (job.rows * job.out_row) as u64;
                let written = w.write_tensor_streamed(&t.name, n_bytes, |out| {
                    let mut left = n_bytes;
                    while left > 0 {
                        match full_rx.recv() {
                            Ok(Ok((buf, in_bytes))) => {
                                out.write_all(&buf)?;
                                left = left.saturating_sub(buf.len() as u64);
                                pb.inc(in_bytes);
                                let _ = free_tx.send(buf);
                            }
                            Ok(Err(e)) => {
                                failure = Some(e);
                                return Err(std::io::Error::other("encoding failed"));
                            }
                            Err(_) => return Err(std::io::Error::other("the encoder stopped")),
                        }
                    }
                    Ok(())
                });
                if let Some(e) = failure {
                    return Err(e);
                }
                written.with_context(|| format!("writing {}", out_path.display()))?;
                input.release(t);
            }
            Ok(())
        })?;
        w.finish()
            .with_context(|| format!("finishing {}", out_path.display()))?;
        pb.finish();
        Ok(QuantizeDone {
            bytes_in: total_in,
            bytes_out: self.total_out,
            bpw_in: self.bpw(total_in),
            bpw_out: self.bpw(self.total_out),
            seconds: t0.elapsed().as_secs_f64(),
        })
    }
}
