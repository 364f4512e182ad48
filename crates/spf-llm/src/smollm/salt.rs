//! Salts that split a seed into independent random streams, and fix the splits.

/// The AdvBench partition and the arithmetic partition (fixed: never the run's seed).
pub(super) const SPLITS: u64 = 0x5B11_7000;
/// The fine-tuning set's problems.
pub(super) const PROBLEMS: u64 = 0xA417;
/// Its harmful pairs, its order and the safety samples: the lab's streams of the same names.
pub(super) use spf_harness::seed::salt::{ATTACK as HARMFUL, SAFETY_BATCH as SAFETY, SHUFFLE};
/// The calibrated screen's clean problems.
pub(super) const CALIBRATION: u64 = 0xCA11_B000;
/// The order of the training batches.
pub(super) const BATCH_ORDER: u64 = 0x5EED;
/// The LoRA factors `A` of a fine-tuning run.
pub(super) const LORA: u64 = 0x10_4A00;
