//! `kiln convert` (being written).

use crate::Outcome;

/// Arguments of `kiln convert`.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<Outcome> {
    anyhow::bail!("kiln convert is not implemented yet")
}
