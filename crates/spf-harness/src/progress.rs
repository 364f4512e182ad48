//! How the experiments report progress: the examples draw bars, tests stay quiet.

/// Receives progress from an experiment's long stages.
pub trait Progress {
    /// A stage named `name` of `total` units begins.
    fn start(&mut self, name: &str, total: u64);
    /// `n` more units are done.
    fn advance(&mut self, n: u64);
    /// The stage is over; `summary` says how it ended.
    fn finish(&mut self, summary: &str);
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Progress for Silent {
    fn start(&mut self, _name: &str, _total: u64) {}
    fn advance(&mut self, _n: u64) {}
    fn finish(&mut self, _summary: &str) {}
}
