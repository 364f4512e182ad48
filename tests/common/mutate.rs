//! Byte-string mutations shared by the loader fuzz tests: bit flips, truncations, insertions
//! and splices of a valid file, and the proptest strategy that draws them.

use proptest::prelude::*;

#[derive(Debug, Clone)]
pub enum Mutation {
    Flip { at: usize, mask: u8 },
    Truncate { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Splice { from: usize, to: usize, len: usize },
}

pub fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for mutation in mutations {
        let n = bytes.len().max(1);
        match mutation {
            Mutation::Flip { at, mask } => {
                if let Some(b) = bytes.get_mut(at % n) {
                    *b ^= mask;
                }
            }
            Mutation::Truncate { at } => bytes.truncate(at % n),
            Mutation::Insert { at, bytes: extra } => {
                let at = (at % n).min(bytes.len());
                bytes.splice(at..at, extra.iter().copied());
            }
            Mutation::Splice { from, to, len } => {
                let from = from % n;
                let chunk: Vec<u8> = bytes.iter().skip(from).take(*len).copied().collect();
                let to = (to % n).min(bytes.len());
                bytes.splice(to..to, chunk);
            }
        }
    }
    bytes
}

pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let one =
        prop_oneof![
            (any::<usize>(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
            any::<usize>().prop_map(|at| Mutation::Truncate { at }),
            (
                any::<usize>(),
                proptest::collection::vec(any::<u8>(), 1..16)
            )
                .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
            (any::<usize>(), any::<usize>(), 1usize..64)
                .prop_map(|(from, to, len)| Mutation::Splice { from, to, len }),
        ];
    proptest::collection::vec(one, 1..6)
}

/// One fuzz input: random bytes behind a prefix, or a mutation of the valid file.
#[derive(Debug)]
pub enum Case {
    /// Random bytes (behind one of the prefixes).
    Random(Vec<u8>),
    /// The valid file after some mutations (proptest reports which, for a failing case).
    Mutated(Vec<u8>),
}

impl Case {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Case::Random(bytes) | Case::Mutated(bytes) => bytes,
        }
    }

    /// Whether the valid file was only cut short (its bytes are a strict prefix of it).
    pub fn truncated(&self, valid: &[u8]) -> bool {
        let bytes = self.bytes();
        bytes.len() < valid.len() && valid.starts_with(bytes)
    }
}

/// Runs `cases` proptest cases through `check`: random byte strings (each behind one of
/// `prefixes`, so that a valid header can lead into random bytes) and mutations of `valid`.
/// A panic in `check` (a loader's, or an assertion's on what the input must give) fails the
/// test.
pub fn fuzz(cases: u32, valid: &[u8], prefixes: &[&[u8]], check: impl FnMut(Case)) {
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let prefixes: Vec<Vec<u8>> = prefixes.iter().map(|p| p.to_vec()).collect();
    let strategy = prop_oneof![
        (
            proptest::sample::select(prefixes),
            proptest::collection::vec(any::<u8>(), 0..2048)
        )
            .prop_map(|(mut bytes, random)| {
                bytes.extend(random);
                (bytes, Vec::new())
            }),
        mutations().prop_map(|m| (Vec::new(), m)),
    ];
    let check = std::cell::RefCell::new(check);
    proptest::test_runner::TestRunner::new(config)
        .run(&strategy, |(random, mutations)| {
            let case = if mutations.is_empty() {
                Case::Random(random)
            } else {
                Case::Mutated(mutate(valid.to_vec(), &mutations))
            };
            (check.borrow_mut())(case);
            Ok(())
        })
        .unwrap();
}
