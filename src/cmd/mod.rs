//! One module per `kiln` subcommand.

pub mod bench;
pub mod convert;
pub mod demo;
pub mod imatrix;
pub mod inspect;
pub mod merge;
pub mod perplexity;
pub mod pipeline;
pub mod progress;
pub mod quantize;
pub mod tokenize;
pub mod verify;
