//! `kiln quantize` (being written).

use crate::Outcome;

/// Arguments of `kiln quantize`.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<Outcome> {
    anyhow::bail!("kiln quantize is not implemented yet")
}
