//! kiln: merge PEFT LoRAs into Llama-family models, convert them to GGUF, quantize them to every
//! llama.cpp level and evaluate them (perplexity, KL divergence, speed), bit-exact with
//! llama.cpp and PEFT.
//!
//! Each job is a function over a typed options struct; the `kiln` binary only parses its
//! command line into these structs, calls them and prints what they return. Jobs report
//! progress through a [`progress::Progress`] sink and never print.
//!
//! Quantize an F16 GGUF to Q4_K_M and measure its perplexity, as `kiln quantize` and
//! `kiln perplexity` do:
//!
//! ```no_run
//! use kiln::eval::job::{perplexity, PerplexityOptions};
//! use kiln::progress::Silent;
//! use kiln::quant_plan::Ftype;
//! use kiln::quantize::{quantize, QuantizeOptions};
//!
//! let job = quantize(&QuantizeOptions::new("model-f16.gguf".into(), Ftype::Q4KM))?;
//! let done = job.write("model-q4_k_m.gguf".as_ref(), &Silent)?;
//! println!("{:.2} bits per weight", done.bpw_out);
//!
//! let opts = PerplexityOptions::new("model-q4_k_m.gguf".into(), "wiki.test.raw".into());
//! let ppl = perplexity(&opts, &Silent)?;
//! println!("PPL = {:.4} over {} chunks", ppl.result.ppl, ppl.result.n_chunk);
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! The jobs: [`convert::convert`], [`merge::merge`], [`quantize::quantize`],
//! [`eval::job::perplexity`], [`eval::job::kld`], [`eval::job::bench_model`],
//! [`eval::job::imatrix`], [`pipeline::run`], [`sums::verify_dir`] and [`inspect::describe`].

pub mod convert;
pub mod demo;
pub mod eval;
pub mod inspect;
pub mod merge;
pub mod model;
pub mod pipeline;
pub mod progress;
pub mod quant_plan;
pub mod quantize;
pub mod shape;
pub mod split;
pub mod sums;
pub mod tokenizer;
pub mod transcode;
