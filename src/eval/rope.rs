//! Context extension for evaluation: llama.cpp's `--rope-freq-base`, `--rope-scaling`,
//! `--rope-scale`/`--rope-freq-scale`, and the NTK-aware base of the Chinese-LLaMA-Alpaca-2
//! scripts (`--ntk ALPHA|auto`), applied to a loaded model's [`Hparams`].

use anyhow::{bail, Result};
use kiln_formats::gguf::GgufHeader;

use crate::model::Hparams;

/// `--rope-scaling` (llama.cpp's names; YaRN is not supported).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RopeScaling {
    /// Never scale positions (the scale factor is ignored).
    None,
    /// Positions multiplied by `1/scale`.
    Linear,
}

/// `--ntk`: a fixed alpha, or `auto` from the context length.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Ntk {
    Alpha(f64),
    Auto,
}

impl std::str::FromStr for Ntk {
    type Err = String;
    fn from_str(s: &str) -> Result<Ntk, String> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Ntk::Auto);
        }
        match s.parse::<f64>() {
            Ok(a) if a.is_finite() && a > 0.0 => Ok(Ntk::Alpha(a)),
            _ => Err(format!("'{s}' is neither a positive number nor 'auto'")),
        }
    }
}

/// RoPE settings asked for on the command line; `None` keeps the model's value.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RopeOverrides {
    /// `--rope-freq-base`.
    pub freq_base: Option<f32>,
    /// `--rope-freq-scale` (or `1/--rope-scale`).
    pub freq_scale: Option<f32>,
    /// `--rope-scaling`.
    pub scaling: Option<RopeScaling>,
    /// `--ntk`.
    pub ntk: Option<Ntk>,
}

/// The RoPE parameters actually used.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeReport {
    pub freq_base: f32,
    pub freq_scale: f32,
    /// The NTK alpha applied, if any.
    pub ntk_alpha: Option<f64>,
    /// The model's `llama.context_length`.
    pub n_ctx_train: usize,
}

/// NTK-aware base: `base · alpha^(d/(d−2))`, `d` the head dimension (computed in f64).
pub fn ntk_base(base: f32, alpha: f64, head_dim: usize) -> f32 {
    let d = head_dim as f64;
    (f64::from(base) * alpha.powf(d / (d - 2.0))) as f32
}

/// `--ntk auto`'s alpha: `n_ctx / (trained_ctx/2) − 1` when `n_ctx` exceeds the trained context,
/// else `None` (no change).
pub fn ntk_auto_alpha(n_ctx: usize, n_ctx_train: usize) -> Option<f64> {
    (n_ctx_train > 0 && n_ctx > n_ctx_train)
        .then(|| n_ctx as f64 / (n_ctx_train as f64 / 2.0) - 1.0)
}

/// Applies `o` to `cfg` for an evaluation at context `n_ctx`, as llama.cpp resolves its context
/// parameters (a given base or scale replaces the model's; scaling type `none`, given or from the
/// model's `llama.rope.scaling.type`, forces scale 1), then the NTK base on top.
pub fn apply_rope(
    cfg: &mut Hparams,
    h: &GgufHeader,
    o: &RopeOverrides,
    n_ctx: usize,
) -> Result<RopeReport> {
    if let Some(b) = o.freq_base {
        if !(b.is_finite() && b > 0.0) {
            bail!("--rope-freq-base must be a positive number (got {b})");
        }
        cfg.rope.freq_base = b;
    }
    if let Some(s) = o.freq_scale {
        if !(s.is_finite() && s > 0.0) {
            bail!("the rope scale must be a positive number (got {s})");
        }
        cfg.rope.freq_scale = s;
    }
    let model_none = h
        .get("llama.rope.scaling.type")
        .and_then(|v| v.as_str())
        .is_some_and(|t| t == "none");
    let none = match o.scaling {
        Some(RopeScaling::None) => true,
        Some(RopeScaling::Linear) => false,
        None => model_none,
    };
    if none {
        cfg.rope.freq_scale = 1.0;
    }
    let alpha = match o.ntk {
        None => None,
        Some(Ntk::Alpha(a)) => Some(a),
        Some(Ntk::Auto) => ntk_auto_alpha(n_ctx, cfg.n_ctx_train),
    };
    if let Some(a) = alpha {
        if cfg.shape.head_dim <= 2 {
            bail!(
                "NTK scaling needs a head dimension above 2 (got {})",
                cfg.shape.head_dim
            );
        }
        cfg.rope.freq_base = ntk_base(cfg.rope.freq_base, a, cfg.shape.head_dim);
        if !cfg.rope.freq_base.is_finite() {
            bail!("NTK alpha {a} gives an infinite rope base");
        }
    }
    Ok(RopeReport {
        freq_base: cfg.rope.freq_base,
        freq_scale: cfg.rope.freq_scale,
        ntk_alpha: alpha,
        n_ctx_train: cfg.n_ctx_train,
    })
}

impl std::fmt::Display for RopeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rope freq_base = {}, freq_scale = {}",
            self.freq_base, self.freq_scale
        )?;
        if let Some(a) = self.ntk_alpha {
            write!(f, " (NTK alpha {a})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ntk_formula() {
        // d = 128 (Llama-2-7B): exponent 128/126
        let b = ntk_base(10000.0, 2.0, 128);
        let want = 10000.0 * 2f64.powf(128.0 / 126.0);
        assert!((f64::from(b) - want).abs() / want < 1e-7, "{b} vs {want}");
        assert_eq!(ntk_base(10000.0, 1.0, 128), 10000.0);
        // d = 32: 10000 * 3^(32/30)
        let b = ntk_base(10000.0, 3.0, 32);
        assert!((f64::from(b) - 32_279.69).abs() < 0.01, "{b}");
    }

    #[test]
    fn ntk_auto_alpha_follows_the_context() {
        // 4096-token model at 8192: 8192/2048 - 1 = 3
        assert_eq!(ntk_auto_alpha(8192, 4096), Some(3.0));
        assert_eq!(ntk_auto_alpha(16384, 4096), Some(7.0));
        // within the trained context: unchanged
        assert_eq!(ntk_auto_alpha(4096, 4096), None);
        assert_eq!(ntk_auto_alpha(512, 4096), None);
        assert_eq!(ntk_auto_alpha(512, 0), None);
        // just beyond it: alpha slightly above 1
        assert!(ntk_auto_alpha(4097, 4096).unwrap() > 1.0);
    }

    #[test]
    fn ntk_parses_numbers_and_auto() {
        assert_eq!("auto".parse::<Ntk>(), Ok(Ntk::Auto));
        assert_eq!("2.5".parse::<Ntk>(), Ok(Ntk::Alpha(2.5)));
        assert!("0".parse::<Ntk>().is_err());
        assert!("-1".parse::<Ntk>().is_err());
        assert!("nan".parse::<Ntk>().is_err());
        assert!("x".parse::<Ntk>().is_err());
    }
}
