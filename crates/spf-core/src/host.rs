//! Every read from the device to the host that an optimizer step makes goes through [`read`],
//! which counts it.
//!
//! On a GPU each read is a synchronisation: the host waits until the device has run everything
//! queued before it. The step therefore reads at most once, for the non-finite probe and the
//! statistics together (the LoRA adapters' subspace modes once more, for their solve), and not at
//! all when neither is asked for
//! ([`StatsPolicy::Off`](crate::StatsPolicy::Off) with
//! [`NonFinitePolicy::Unchecked`](crate::NonFinitePolicy::Unchecked)). Each step reports its count
//! in [`StepStats::host_reads`](crate::StepStats::host_reads); a test holds the step path's
//! files to reading through this module only.

use std::cell::Cell;

use burn::tensor::Tensor;

thread_local! {
    /// Reads made on this thread; a step runs on the thread that calls it.
    static READS: Cell<usize> = const { Cell::new(0) };
}

/// Reads the concatenation of `parts` back to the host in one transfer, as `f64`; no parts, no
/// read.
pub(crate) fn read(parts: Vec<Tensor<1>>) -> Vec<f64> {
    if parts.is_empty() {
        return Vec::new();
    }
    READS.with(|reads| reads.set(reads.get() + 1));
    Tensor::cat(parts, 0).into_data().iter::<f64>().collect()
}

/// Reads made on this thread so far.
pub(crate) fn reads() -> usize {
    READS.with(Cell::get)
}
