//! The binary's [`Progress`] sink: status lines on stderr and indicatif bars (hidden with
//! --quiet or when stderr is not a terminal). Every bar style of kiln is here.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln::progress::{Bar, Progress, Unit};

/// Lines and bars on stderr.
#[derive(Clone, Copy, Debug, Default)]
pub struct Terminal {
    /// No bars (lines are still printed).
    pub quiet: bool,
    /// Bars indented under a step line (the pipeline's).
    pub indent: bool,
}

impl Terminal {
    /// Bars unless `quiet`, at the left margin.
    pub fn new(quiet: bool) -> Terminal {
        Terminal {
            quiet,
            indent: false,
        }
    }
}

struct Indicatif(ProgressBar);

impl Bar for Indicatif {
    fn inc(&self, n: u64) {
        self.0.inc(n);
    }
    fn set_position(&self, n: u64) {
        self.0.set_position(n);
    }
    fn set_message(&self, msg: &str) {
        self.0.set_message(msg.to_string());
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Progress for Terminal {
    fn note(&self, line: &str) {
        eprintln!("{line}");
    }

    fn bar(&self, total: u64, unit: Unit) -> Box<dyn Bar> {
        if self.quiet {
            return Box::new(Indicatif(ProgressBar::hidden()));
        }
        let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let lead = if self.indent { "  " } else { "" };
        let tmpl = match unit {
            Unit::Bytes => format!(
                "{lead}{{spinner}} [{{elapsed_precise}}] {{wide_bar}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}} ETA {{eta}} {{msg}}"
            ),
            u => format!(
                "{lead}{{spinner}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {} {{per_sec}} ETA {{eta}} {{msg}}",
                u.name()
            ),
        };
        if let Ok(st) = ProgressStyle::with_template(&tmpl) {
            pb.set_style(st);
        }
        Box::new(Indicatif(pb))
    }
}
