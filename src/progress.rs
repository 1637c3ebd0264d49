//! How a library job reports what it is doing: a [`Progress`] sink the caller hands in. The
//! library never prints; the `kiln` binary draws bars and lines on stderr, a program embedding
//! kiln can pass [`Silent`] or its own sink.

/// What a bar counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Tokens,
    Chunks,
}

impl Unit {
    /// The unit's name as a bar labels it.
    pub fn name(self) -> &'static str {
        match self {
            Unit::Bytes => "bytes",
            Unit::Tokens => "tokens",
            Unit::Chunks => "chunks",
        }
    }
}

/// One progress bar of a running job.
pub trait Bar: Send + Sync {
    /// Adds `n` to the position.
    fn inc(&self, n: u64);
    /// Sets the position.
    fn set_position(&self, n: u64);
    /// Names what is being worked on (a tensor, a running value).
    fn set_message(&self, msg: &str);
    /// Removes the bar.
    fn finish(&self);
}

/// Where a job sends its status lines and bars.
pub trait Progress: Sync {
    /// A line for the user: a step, a warning, a result.
    fn note(&self, line: &str);
    /// A new bar over `total` units.
    fn bar(&self, total: u64, unit: Unit) -> Box<dyn Bar>;
}

/// Reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Silent;

struct NoBar;

impl Bar for NoBar {
    fn inc(&self, _: u64) {}
    fn set_position(&self, _: u64) {}
    fn set_message(&self, _: &str) {}
    fn finish(&self) {}
}

impl Progress for Silent {
    fn note(&self, _: &str) {}
    fn bar(&self, _: u64, _: Unit) -> Box<dyn Bar> {
        Box::new(NoBar)
    }
}
