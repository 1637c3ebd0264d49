//! The quantization levels of a run: the --quants list, the "+imatrix" twins that --imatrix-text
//! adds, and the level names used in step ids and file names.

use super::IMATRIX_SUFFIX;
use crate::quant_plan::Ftype;
use anyhow::{anyhow, Result};

/// Parses the --quants list.
pub fn parse_quants(list: &[String]) -> Result<Vec<Ftype>> {
    list.iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            Ftype::parse(s).ok_or_else(|| {
                anyhow!(
                    "--quants: unknown level {s:?} (use Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K_S, Q3_K_M, \
                     Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, Q2_K_S with an imatrix)"
                )
            })
        })
        .collect()
}

/// Quant level name used in step ids and file names ("q4_k_m", "f16", "q4_k_m-imatrix").
pub fn level_file_name(level: &str) -> String {
    level.to_ascii_lowercase().replace('+', "-")
}

/// Whether a level is a K-quant mix (Q2_K_S..Q6_K), quantized again with --imatrix-text's matrix.
pub fn is_k_level(ft: Ftype) -> bool {
    matches!(
        ft,
        Ftype::Q2K
            | Ftype::Q2KS
            | Ftype::Q3KS
            | Ftype::Q3KM
            | Ftype::Q3KL
            | Ftype::Q4KS
            | Ftype::Q4KM
            | Ftype::Q5KS
            | Ftype::Q5KM
            | Ftype::Q6K
    )
}

/// The quantizations of a run: (level name, file type, uses the --imatrix-text matrix). With
/// `imatrix_text`, each K level is listed twice (plain, then "+imatrix"), Q2_K_S only with it.
pub fn quant_jobs(quants: &[Ftype], imatrix_text: bool) -> Vec<(String, Ftype, bool)> {
    let mut jobs = Vec::new();
    for &q in quants {
        if !(imatrix_text && q == Ftype::Q2KS) {
            jobs.push((q.name().to_string(), q, false));
        }
        if imatrix_text && is_k_level(q) {
            jobs.push((format!("{}{IMATRIX_SUFFIX}", q.name()), q, true));
        }
    }
    jobs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imatrix_text_doubles_the_k_levels() {
        let names = quant_jobs;
        let q = [Ftype::Q4_0, Ftype::Q4KM, Ftype::Q2KS, Ftype::Q6K];
        assert_eq!(
            names(&q, false),
            [
                ("Q4_0".to_string(), Ftype::Q4_0, false),
                ("Q4_K_M".into(), Ftype::Q4KM, false),
                ("Q2_K_S".into(), Ftype::Q2KS, false),
                ("Q6_K".into(), Ftype::Q6K, false),
            ]
        );
        assert_eq!(
            names(&q, true),
            [
                ("Q4_0".to_string(), Ftype::Q4_0, false),
                ("Q4_K_M".into(), Ftype::Q4KM, false),
                ("Q4_K_M+imatrix".into(), Ftype::Q4KM, true),
                ("Q2_K_S+imatrix".into(), Ftype::Q2KS, true),
                ("Q6_K".into(), Ftype::Q6K, false),
                ("Q6_K+imatrix".into(), Ftype::Q6K, true),
            ]
        );
        assert_eq!(level_file_name("Q4_K_M+imatrix"), "q4_k_m-imatrix");
        assert!(!is_k_level(Ftype::Q8_0) && is_k_level(Ftype::Q3KL));
    }
}
