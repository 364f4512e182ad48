//! Seeds: named salts that split one seed into independent random streams, and the one FNV-1a
//! hash the experiments use for stable names and splits.

/// Salts that split one seed into independent random streams, one per use, so that a change to
/// one stream (more alignment steps, say) never shifts another (the fine-tuning set).
pub mod salt {
    /// Alignment batches.
    pub const ALIGN_DATA: u64 = 0x000a_119e;
    /// The held-out sets (mixed with the world's seed).
    pub const TEST_SETS: u64 = 0x7e57;
    /// The batches the insights are measured on.
    pub const INSIGHTS: u64 = 0x0001_5197;
    /// The fine-tuning set's benign prompts.
    pub const BENIGN: u64 = 0x00be_9197;
    /// Its harmful prompts with compliant answers.
    pub const ATTACK: u64 = 0x00a7_7ac4;
    /// SafeInstr's harmful prompts with refusals.
    pub const SAFE_INSTR: u64 = 0x5afe;
    /// The fine-tuning set's order.
    pub const SHUFFLE: u64 = 0x0054_ff1e;
    /// The defence's safety batch.
    pub const SAFETY_BATCH: u64 = 0x005a_fe7e;
    /// The order of the fine-tuning batches.
    pub const BATCH_ORDER: u64 = 0x0bd3;
}

/// FNV-1a, 64-bit: a hash that is the same on every machine and in every run, unlike
/// `std`'s `DefaultHasher`.
pub mod fnv {
    /// The FNV-1a offset basis, the usual start.
    pub const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;

    /// The hash of `bytes`, starting from `start` ([`OFFSET`] for standard FNV-1a).
    pub fn hash(start: u64, bytes: impl IntoIterator<Item = u8>) -> u64 {
        bytes.into_iter().fold(start, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(PRIME)
        })
    }

    /// The standard FNV-1a of `text`.
    pub fn of_str(text: &str) -> u64 {
        hash(OFFSET, text.bytes())
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn matches_the_published_test_vectors() {
            assert_eq!(super::of_str(""), 0xcbf2_9ce4_8422_2325);
            assert_eq!(super::of_str("a"), 0xaf63_dc4c_8601_ec8c);
            assert_eq!(super::of_str("foobar"), 0x8594_4171_f739_67e8);
        }
    }
}
