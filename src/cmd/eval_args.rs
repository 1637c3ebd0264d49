//! The flags every evaluating command shares (llama.cpp's names): the model, the device and the
//! threads, and RoPE context extension.

use anyhow::{bail, Result};
use kiln::eval::job::Target;
use kiln::eval::rope::{Ntk, RopeOverrides, RopeScaling};
use kiln::model::device::Device;
use std::path::PathBuf;

/// The model to evaluate and where.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// The GGUF model.
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// Where to evaluate: cpu, cuda[:N] or auto (CUDA when kiln has a GPU backend, else CPU).
    #[arg(long, value_name = "DEV", default_value = "auto")]
    pub device: Device,
    /// Threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
}

impl ModelArgs {
    /// The evaluation target with `rope`'s overrides.
    pub fn target(&self, rope: &RopeArgs) -> Result<Target> {
        Ok(Target {
            model: self.model.clone(),
            device: self.device.clone(),
            threads: self.threads,
            rope: rope.overrides()?,
        })
    }
}

/// RoPE context-extension flags (llama.cpp's names, plus `--ntk`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct RopeArgs {
    /// RoPE base frequency (default: the model's llama.rope.freq_base).
    #[arg(long, value_name = "F")]
    pub rope_freq_base: Option<f32>,
    /// RoPE scaling method (default: the model's, linear when it says nothing).
    #[arg(long, value_enum, value_name = "none|linear")]
    pub rope_scaling: Option<RopeScaling>,
    /// Linear RoPE scale: positions are divided by S (expands the context S times).
    #[arg(long, value_name = "S", conflicts_with = "rope_freq_scale")]
    pub rope_scale: Option<f32>,
    /// RoPE frequency scale factor (1/S).
    #[arg(long, value_name = "F")]
    pub rope_freq_scale: Option<f32>,
    /// NTK-aware RoPE base: base·ALPHA^(d/(d−2)), d the head dimension; `auto` uses
    /// ALPHA = n_ctx/(trained_ctx/2) − 1 beyond the trained context (llama.context_length).
    #[arg(long, value_name = "ALPHA|auto")]
    pub ntk: Option<Ntk>,
}

impl RopeArgs {
    /// The overrides the evaluation jobs apply.
    pub fn overrides(&self) -> Result<RopeOverrides> {
        let freq_scale = match (self.rope_scale, self.rope_freq_scale) {
            (Some(s), _) if !(s.is_finite() && s > 0.0) => {
                bail!("--rope-scale must be a positive number (got {s})")
            }
            (Some(s), _) => Some(1.0 / s),
            (None, f) => f,
        };
        Ok(RopeOverrides {
            freq_base: self.rope_freq_base,
            freq_scale,
            scaling: self.rope_scaling,
            ntk: self.ntk,
        })
    }

    /// Whether any RoPE flag was given.
    pub fn any(&self) -> bool {
        self.rope_freq_base.is_some()
            || self.rope_scaling.is_some()
            || self.rope_scale.is_some()
            || self.rope_freq_scale.is_some()
            || self.ntk.is_some()
    }
}
