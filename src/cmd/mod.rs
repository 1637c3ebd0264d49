//! One module per `kiln` subcommand.

pub mod bench;
pub mod convert;
pub mod demo;
pub mod eval_args;
pub mod imatrix;
pub mod inspect;
pub mod merge;
pub mod perplexity;
pub mod pipeline;
pub mod progress;
pub mod quantize;
pub mod split;
pub mod tokenize;
pub mod verify;

/// `-t N` of the commands that run on rayon's global pool (merge, pipeline): at least 1.
pub fn global_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            anyhow::bail!("threads must be at least 1");
        }
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    Ok(())
}
