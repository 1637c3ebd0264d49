//! The pipeline's steps: for each, its manifest id, settings, inputs and status line, and the few
//! library calls (merge, imatrix, quantize, eval) that write its outputs. The runner in `step.rs`
//! decides whether a step runs and records what it wrote.

use super::inputs::Text;
use super::measure;
use super::space;
use super::step::{Cx, File, Makes, Measures, Step};
use super::{level_file_name, Settings, EVAL_DIR, F16_FILE, IMATRIX_FILE};
use crate::eval::perplexity::PplParams;
use crate::merge::{self, MergeJob};
use crate::model::device::Device;
use crate::progress::Unit;
use crate::quant_plan::Ftype;
use crate::quantize::{quantize, QuantizeOptions};
use crate::sums;
use anyhow::{anyhow, Context, Result};
use kiln_formats::gguf::GgufFile;
use kiln_quant::GgmlType;
use serde_json::{json, Value};
use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One quantization level's GGUF (F16 first).
pub(super) struct Level {
    /// "F16", "Q4_K_M", "Q4_K_M+imatrix".
    pub name: String,
    pub file: File,
}

/// general.name of the merged GGUF: --name, else the --out folder's name.
pub(super) fn model_name(s: &Settings) -> String {
    s.name.clone().unwrap_or_else(|| {
        std::path::absolute(&s.out)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into())
    })
}

/// Merge → F16 GGUF (and the HF folder with --keep-hf), in one streaming pass.
pub(super) struct Merge<'a> {
    pub job: Option<&'a MergeJob>,
    pub loras: &'a [PathBuf],
    /// The base's and adapters' files with their sha256.
    pub files: &'a [(PathBuf, String)],
    pub name: String,
    pub keep_hf: bool,
}

impl Step for Merge<'_> {
    fn id(&self) -> String {
        "merge".into()
    }
    fn settings(&self) -> Value {
        json!({
            "loras": self.loras.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "outtype": "f16",
            "keep_hf": self.keep_hf,
            "name": self.name,
        })
    }
    fn inputs(&self) -> BTreeMap<String, String> {
        self.files
            .iter()
            .map(|(p, h)| (p.display().to_string(), h.clone()))
            .collect()
    }
    fn what(&self) -> String {
        format!("merge {} LoRA(s) → {F16_FILE}", self.loras.len())
    }
}

impl Makes for Merge<'_> {
    fn output(&self) -> String {
        F16_FILE.into()
    }
    fn lost(&self) -> String {
        "the manifest lost the merge's output".into()
    }
    fn make(&self, cx: &Cx) -> Result<Vec<String>> {
        let job = self
            .job
            .ok_or_else(|| anyhow!("merge inputs were not opened"))?;
        let mut need = job.n_elements() * 2 + (8 << 20);
        if self.keep_hf {
            need += job.hf_bytes();
        }
        space::check_dir(cx.out, "the merged model", need)?;
        let r = job.write(
            &merge::MergeOutputs {
                out: self.keep_hf.then(|| cx.staged("hf")),
                gguf: Some(cx.staged(F16_FILE)),
                kind: merge::GgufKind::Float(crate::convert::OutType::F16),
                max_shard_size: merge::parse_size("5GB")?,
                name: Some(self.name.clone()),
                force: false,
                hash_inputs: false,
            },
            cx.log.progress(),
        )?;
        for w in &r.written {
            cx.log.note(&format!("  {w}"));
        }
        // merge writes a SHA256SUMS beside its GGUF; the pipeline writes its own.
        let _ = std::fs::remove_file(cx.staged(sums::SUMS));
        let mut made = vec![F16_FILE.to_string()];
        if self.keep_hf {
            made.push("hf".into());
        }
        Ok(made)
    }
}

/// --imatrix-text: the importance matrix of the F16 model on that text.
pub(super) struct Imatrix<'a> {
    pub f16: &'a File,
    /// The calibration text and its sha256.
    pub text: &'a (PathBuf, String),
    pub s: &'a Settings,
}

impl Imatrix<'_> {
    fn dataset(&self) -> String {
        self.text.0.to_string_lossy().into_owned()
    }
}

impl Step for Imatrix<'_> {
    fn id(&self) -> String {
        "imatrix".into()
    }
    fn settings(&self) -> Value {
        json!({
            "n_ctx": self.s.n_ctx,
            "max_chunks": self.s.chunks,
            "dataset": self.dataset(),
            "process_output": false,
        })
    }
    fn inputs(&self) -> BTreeMap<String, String> {
        let (text_path, text_sha) = self.text;
        [
            (self.f16.key.clone(), self.f16.sha256.clone()),
            (text_path.display().to_string(), text_sha.clone()),
        ]
        .into()
    }
    fn what(&self) -> String {
        format!(
            "importance matrix of F16 on {} → {IMATRIX_FILE}",
            self.dataset()
        )
    }
}

impl Makes for Imatrix<'_> {
    fn output(&self) -> String {
        IMATRIX_FILE.into()
    }
    fn make(&self, cx: &Cx) -> Result<Vec<String>> {
        let m = measure::load(&self.f16.path, &self.s.device)?;
        let bytes = make_imatrix(&m, &self.text.0, &self.dataset(), self.s, cx)?;
        drop(m);
        space::check_dir(cx.out, IMATRIX_FILE, bytes.len() as u64)?;
        kiln_formats::imatrix::write_file(&cx.staged(IMATRIX_FILE), &bytes)?;
        Ok(vec![IMATRIX_FILE.into()])
    }
}

/// The importance matrix of `m` on the text at `text_path` (chunks of `s.n_ctx`, at most
/// `s.chunks`), as `kiln imatrix -m MODEL -f TEXT -c N --chunks M` writes it (dataset: `dataset`).
fn make_imatrix(
    m: &measure::Loaded,
    text_path: &Path,
    dataset: &str,
    s: &Settings,
    cx: &Cx,
) -> Result<Vec<u8>> {
    use crate::eval::imatrix::{collect, CollectParams, Collector};
    let text = measure::read_text(text_path)?;
    let (tokens, bos) = measure::tokenize(&m.tok, &text)?;
    let params = PplParams {
        n_ctx: s.n_ctx,
        n_batch: s.n_ctx,
        max_chunks: s.chunks,
    };
    let n_chunk = measure::check_length(text_path, tokens.len(), &params)?;
    let chunk_size = u32::try_from(s.n_ctx).context("-c is too large")?;
    let mut col = Collector::new(chunk_size, false);
    let pb = cx.log.bar(n_chunk as u64, Unit::Chunks);
    let r = collect(
        &m.model,
        &tokens,
        bos,
        CollectParams {
            n_ctx: s.n_ctx,
            n_chunk,
            compute_ppl: true,
        },
        &mut col,
        |k, _, _| {
            pb.set_position(k as u64);
            Ok(())
        },
    )?;
    pb.finish();
    cx.log.note(&format!(
        "  {} entries from {n_chunk} chunks, PPL {:.4}",
        col.entries.len(),
        r.ppl
    ));
    col.gguf_bytes(Some(dataset))
}

/// One quantization level from the F16 GGUF (with an importance matrix when given one).
pub(super) struct Quantize<'a> {
    pub f16: &'a File,
    /// The level's name ("Q4_K_M", "Q4_K_M+imatrix").
    pub level: &'a str,
    pub ft: Ftype,
    pub imatrix: Option<&'a File>,
}

impl Quantize<'_> {
    fn rel(&self) -> String {
        format!("model-{}.gguf", level_file_name(self.level))
    }
}

impl Step for Quantize<'_> {
    fn id(&self) -> String {
        format!("quantize {}", level_file_name(self.level))
    }
    fn settings(&self) -> Value {
        json!({"ftype": self.ft.name(), "imatrix": self.imatrix.is_some()})
    }
    fn inputs(&self) -> BTreeMap<String, String> {
        let mut inputs: BTreeMap<String, String> =
            [(self.f16.key.clone(), self.f16.sha256.clone())].into();
        if let Some(im) = self.imatrix {
            inputs.insert(im.key.clone(), im.sha256.clone());
        }
        inputs
    }
    fn what(&self) -> String {
        format!("quantize {} → {}", self.level, self.rel())
    }
}

impl Makes for Quantize<'_> {
    fn output(&self) -> String {
        self.rel()
    }
    fn make(&self, cx: &Cx) -> Result<Vec<String>> {
        let rel = self.rel();
        let f16 = &self.f16.path;
        let need = {
            let f = GgufFile::open(f16).with_context(|| format!("reading {}", f16.display()))?;
            estimate_quant_size(&f, self.ft)
        };
        space::check_dir(cx.out, &rel, need)?;
        let mut qo = QuantizeOptions::new(f16.clone(), self.ft);
        qo.imatrix = self.imatrix.map(|im| im.path.clone());
        quantize(&qo)?.write(&cx.staged(&rel), cx.log.progress())?;
        test_stall(&self.id());
        Ok(vec![rel])
    }
}

/// Size estimate of a quantized GGUF made from `f16`: each matrix at the level's default type
/// (+10% for the mixes' larger types), output.weight at up to Q8_0, other tensors as they are.
fn estimate_quant_size(f16: &GgufFile, ft: Ftype) -> u64 {
    let base = ft.default_type();
    let mut total = f16.data_offset;
    for t in &f16.tensors {
        let rows = t.n_rows();
        let row = t.row_len();
        let keep = t.n_bytes();
        let bytes = if t.shape.len() < 2 || row % base.block_size() as u64 != 0 {
            keep
        } else {
            let ty = if t.name == "output.weight" {
                GgmlType::Q8_0
            } else {
                base
            };
            ty.row_size(row)
                .map(|r| r.saturating_mul(rows).saturating_mul(11) / 10)
                .unwrap_or(keep)
                .min(keep)
        };
        total = total.saturating_add(bytes + 32);
    }
    total
}

#[cfg(debug_assertions)]
fn test_stall(point: &str) {
    // Test hook (debug builds only): `KILN_TEST_STALL="quantize q4_0:MS"` sleeps once that level's
    // file is complete in the staging folder and before it is moved into place, so the tests can
    // interrupt the step at a known point.
    if let Ok(v) = std::env::var("KILN_TEST_STALL") {
        if let Some((p, ms)) = v.rsplit_once(':') {
            if p == point {
                eprintln!("stall {point}");
                std::thread::sleep(std::time::Duration::from_millis(ms.parse().unwrap_or(0)));
            }
        }
    }
}

#[cfg(not(debug_assertions))]
fn test_stall(_point: &str) {}

/// One level under evaluation: its GGUF, loaded by the first of its steps that runs, and the
/// evaluation settings.
pub(super) struct Model<'a> {
    pub level: &'a Level,
    params: &'a PplParams,
    device: &'a Device,
    loaded: OnceCell<measure::Loaded>,
}

impl<'a> Model<'a> {
    pub(super) fn new(level: &'a Level, params: &'a PplParams, device: &'a Device) -> Model<'a> {
        Model {
            level,
            params,
            device,
            loaded: OnceCell::new(),
        }
    }
    fn get(&self) -> Result<&measure::Loaded> {
        if let Some(m) = self.loaded.get() {
            return Ok(m);
        }
        let m = measure::load(&self.level.file.path, self.device)?;
        Ok(self.loaded.get_or_init(|| m))
    }
    /// The level's name in step ids and file names.
    fn lname(&self) -> String {
        level_file_name(&self.level.name)
    }
    fn input(&self) -> (String, String) {
        (self.level.file.key.clone(), self.level.file.sha256.clone())
    }
    /// The settings of the perplexity and KLD steps.
    fn eval_settings(&self) -> Value {
        json!({
            "n_ctx": self.params.n_ctx,
            "n_batch": self.params.n_batch,
            "max_chunks": self.params.max_chunks,
            "device": self.device.name(),
        })
    }
    /// A bar over a text's evaluated tokens.
    fn bar(&self, cx: &Cx, t: &Text) -> Box<dyn crate::progress::Bar> {
        cx.log
            .bar((t.n_chunk * self.params.n_ctx) as u64, Unit::Tokens)
    }
}

fn text_input(t: &Text) -> (String, String) {
    (t.path.display().to_string(), t.sha256.clone())
}

/// Perplexity of one level on one text.
pub(super) struct Ppl<'a> {
    pub model: &'a Model<'a>,
    pub text: &'a Text,
}

impl Step for Ppl<'_> {
    fn id(&self) -> String {
        format!("ppl {} {}", self.model.lname(), self.text.name)
    }
    fn settings(&self) -> Value {
        self.model.eval_settings()
    }
    fn inputs(&self) -> BTreeMap<String, String> {
        [self.model.input(), text_input(self.text)].into()
    }
    fn what(&self) -> String {
        format!("perplexity {} on {}", self.model.level.name, self.text.name)
    }
}

impl Measures for Ppl<'_> {
    type Record = measure::PplRecord;
    fn output(&self) -> String {
        format!(
            "{EVAL_DIR}/ppl-{}-{}.json",
            self.model.lname(),
            self.text.name
        )
    }
    fn measure(&self, cx: &Cx) -> Result<measure::PplRecord> {
        let m = self.model.get()?;
        let pb = self.model.bar(cx, self.text);
        let r = measure::ppl(m, &self.text.text, self.model.params, |n| {
            pb.set_position(n)
        })?;
        pb.finish();
        let err = r.ppl_err.map(|e| format!(" ± {e:.4}")).unwrap_or_default();
        cx.log.note(&format!(
            "  PPL {:.4}{err} ({} chunks, {:.1} tok/s)",
            r.ppl, r.n_chunk, r.tokens_per_second
        ));
        Ok(r)
    }
}

/// --kld: the F16 log-probabilities on one text that every level is compared with.
pub(super) struct KldBase<'a> {
    pub model: &'a Model<'a>,
    pub text: &'a Text,
}

impl Step for KldBase<'_> {
    fn id(&self) -> String {
        format!("kld-base {}", self.text.name)
    }
    fn settings(&self) -> Value {
        self.model.eval_settings()
    }
    fn inputs(&self) -> BTreeMap<String, String> {
        [self.model.input(), text_input(self.text)].into()
    }
    fn what(&self) -> String {
        format!("F16 log-probabilities of {} (KLD base)", self.text.name)
    }
}

impl Makes for KldBase<'_> {
    fn output(&self) -> String {
        format!("{EVAL_DIR}/kld-base-{}.bin", self.text.name)
    }
    fn timed(&self) -> bool {
        false
    }
    fn make(&self, cx: &Cx) -> Result<Vec<String>> {
        let (rel, t, p) = (self.output(), self.text, self.model.params);
        let m = self.model.get()?;
        let need = measure::kld_base_size(t.n_chunk, p.n_ctx, m.model.cfg.shape.n_vocab);
        space::check_dir(cx.out, &rel, need)?;
        let pb = self.model.bar(cx, t);
        measure::kld_base(m, &t.text, p, &cx.staged(&rel), |n| pb.set_position(n))?;
        pb.finish();
        Ok(vec![rel])
    }
}

/// --kld: one level's KL divergence from F16 on one text.
pub(super) struct Kld<'a> {
    pub model: &'a Model<'a>,
    pub text: &'a Text,
    /// The text's [`KldBase`].
    pub base: &'a File,
}

impl Step for Kld<'_> {
    fn id(&self) -> String {
        format!("kld {} {}", self.model.lname(), self.text.name)
    }
    fn settings(&self) -> Value {
        self.model.eval_settings()
    }
    fn inputs(&self) -> BTreeMap<String, String> {
        [
            self.model.input(),
            (self.base.key.clone(), self.base.sha256.clone()),
        ]
        .into()
    }
    fn what(&self) -> String {
        format!("KLD {} vs F16 on {}", self.model.level.name, self.text.name)
    }
}

impl Measures for Kld<'_> {
    type Record = measure::KldRecord;
    fn output(&self) -> String {
        format!(
            "{EVAL_DIR}/kld-{}-{}.json",
            self.model.lname(),
            self.text.name
        )
    }
    fn measure(&self, cx: &Cx) -> Result<measure::KldRecord> {
        let m = self.model.get()?;
        let pb = self.model.bar(cx, self.text);
        let r = measure::kld(m, &self.base.path, self.model.params, |n| {
            pb.set_position(n)
        })?;
        pb.finish();
        cx.log.note(&format!(
            "  mean KLD {:.6} ± {:.6}, same top {:.2}%",
            r.mean_kld,
            r.mean_kld_unc,
            100.0 * r.same_top
        ));
        Ok(r)
    }
}

/// --bench: one level's prompt and generation speed.
pub(super) struct Bench<'a> {
    pub model: &'a Model<'a>,
}

impl Step for Bench<'_> {
    fn id(&self) -> String {
        format!("bench {}", self.model.lname())
    }
    fn settings(&self) -> Value {
        json!({"device": self.model.device.name(), "threads": rayon::current_num_threads()})
    }
    fn inputs(&self) -> BTreeMap<String, String> {
        [self.model.input()].into()
    }
    fn what(&self) -> String {
        format!("speed of {}", self.model.level.name)
    }
}

impl Measures for Bench<'_> {
    type Record = measure::BenchRecord;
    fn output(&self) -> String {
        format!("{EVAL_DIR}/bench-{}.json", self.model.lname())
    }
    fn measure(&self, cx: &Cx) -> Result<measure::BenchRecord> {
        let m = self.model.get()?;
        let bp = measure::bench_params(m.model.cfg.n_ctx_train);
        let r = measure::speed(m, &bp)?;
        cx.log.note(&format!(
            "  pp{} {:.2} tok/s, tg{} {:.2} ms/tok",
            r.pp_tokens, r.pp_tok_s, r.tg_tokens, r.tg_ms_tok
        ));
        Ok(r)
    }
}
