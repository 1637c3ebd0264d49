//! kiln: merge PEFT LoRAs into Llama-family models, convert them to GGUF, quantize them to every
//! llama.cpp level and evaluate them (perplexity, KL divergence, speed), bit-exact with
//! llama.cpp and PEFT.
//!
//! Each job is a function over a typed options struct; the `kiln` binary only parses its
//! command line into these structs, calls them and prints what they return. Jobs report
//! progress through a [`progress::Progress`] sink and never print.
//!
//! ```no_run
//! use kiln::quant_plan::Ftype;
//! use kiln::quantize::{quantize, QuantizeOptions};
//!
//! let opts = QuantizeOptions::new("model-f16.gguf".into(), Ftype::Q4KM);
//! let job = quantize(&opts)?;
//! let done = job.write("model-q4_k_m.gguf".as_ref(), &kiln::progress::Silent)?;
//! println!("{:.2} bits per weight", done.bpw_out);
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod convert;
pub mod demo;
pub mod eval;
pub mod merge;
pub mod model;
pub mod pipeline;
pub mod progress;
pub mod quant_plan;
pub mod quantize;
pub mod shape;
pub mod sums;
pub mod tokenizer;
pub mod transcode;
