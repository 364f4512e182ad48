//! The facade re-exports the whole public surface of the library crates: every item that
//! `spf-core` and `spf-subspace` export at their root, and every public module of theirs, is
//! reachable as `spf::…`. A type that appears in a public signature but cannot be named from the
//! facade (as `StepError`, returned by `try_step`, once could not) fails this test.
//!
//! The lists are read from the crates' own `lib.rs`, so a new export that the facade forgets
//! fails here; the `use` lines at the end make the compiler check that each name resolves.

use std::collections::BTreeSet;
use std::path::Path;

/// The names a `lib.rs` exports: the items of its `pub use` lines and its `pub mod`s.
fn exports(lib: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut statement = String::new();
    for line in lib.lines().map(str::trim) {
        if statement.is_empty() && !(line.starts_with("pub use ") || line.starts_with("pub mod ")) {
            continue;
        }
        statement.push_str(line);
        statement.push(' ');
        if !line.ends_with(';') {
            continue;
        }
        let text = std::mem::take(&mut statement);
        let text = text.trim().trim_end_matches(';');
        if let Some(module) = text.strip_prefix("pub mod ") {
            names.insert(module.trim().to_owned());
        } else if let Some(path) = text.strip_prefix("pub use ") {
            let items = match path.split_once('{') {
                Some((_, list)) => list.trim_end_matches('}').to_owned(),
                None => path.rsplit("::").next().unwrap_or(path).to_owned(),
            };
            for item in items.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                let name = item.rsplit(" as ").next().unwrap_or(item);
                names.insert(name.rsplit("::").next().unwrap_or(name).trim().to_owned());
            }
        }
    }
    names
}

fn lib_of(crate_dir: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(crate_dir)
        .join("src/lib.rs");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_facade_re_exports_every_public_item_of_the_library_crates() {
    let facade = exports(&lib_of("."));
    // spf-core's `testing` module is the test fixtures (hidden, behind a feature), not API.
    let internal = ["testing"];
    let mut missing = Vec::new();
    for krate in ["crates/spf-core", "crates/spf-subspace"] {
        let names = exports(&lib_of(krate));
        assert!(names.len() > 10, "{krate}: the exports are read: {names:?}");
        for name in names {
            if !facade.contains(&name) && !internal.contains(&name.as_str()) {
                missing.push(format!("{krate}: {name}"));
            }
        }
    }
    assert!(missing.is_empty(), "not re-exported by spf: {missing:?}");
}

#[test]
fn the_export_reader_sees_what_a_lib_rs_exports() {
    let names = exports("pub mod a;\nmod b;\npub use x::{B, c::D,\n    E as F};\npub use y::G;\n");
    let expected: BTreeSet<String> = ["a", "B", "D", "F", "G"].map(String::from).into();
    assert_eq!(names, expected);
}

// Every name a public signature of the library uses resolves through the facade.
#[allow(unused_imports)]
use spf::{
    BasisRecord, LoadError, LowRankBasis, NoSafetySource, NonFinitePolicy, NonFiniteStats,
    ParamFilter, ParamPath, Projected, ProjectionMode, ProjectionStats, ProjectionTarget,
    RECORD_VERSION, RandomizedSvd, RandomizedSvdConfig, RankPolicy, RefreshPolicy, RefreshStats,
    SafetyGradientSource, SafetyProjectedOptimizer, SafetySubspace, SketchConfig, SourceError,
    SpfConfig, SpfError, SpfRecord, StatsFeed, StepError, StepStats, SubspaceConfig, SubspaceError,
    Target, Targets, TensorStats, VectorPolicy, captured_energy, checkpoint, direction_overlap,
    principal_angles, project, projection, rank_for_energy, rsvd, screen, subspace_overlap, view,
};
