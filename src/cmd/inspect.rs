//! `kiln inspect` (being written).

use crate::Outcome;

/// Arguments of `kiln inspect`.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<Outcome> {
    anyhow::bail!("kiln inspect is not implemented yet")
}
