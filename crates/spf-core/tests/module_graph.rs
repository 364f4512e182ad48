//! The `use` lines between spf-core's modules form no circle: each module builds only on the ones
//! below it (`projection` and `bases` at the bottom, `optimizer` at the top), so any one of them
//! can be read, and changed, knowing only what it imports.
//!
//! The graph is read from the sources: every top-level `use crate::…;` of `src/<module>.rs`,
//! where a name re-exported by `lib.rs` (`use crate::SpfError`) counts as an import of the
//! module that defines it. Test modules inside a file (indented `use` lines) are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The `use crate::…;` statements at the top level of `source`, without `use crate::` and `;`.
fn crate_imports(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut open: Option<String> = None;
    for line in source.lines() {
        if let Some(text) = open.as_mut() {
            text.push_str(line.trim());
        } else if let Some(rest) = line.strip_prefix("use crate::") {
            open = Some(rest.to_owned());
        } else {
            continue;
        }
        if let Some(text) = open.take_if(|text| text.ends_with(';')) {
            out.push(text.trim_end_matches(';').to_owned());
        }
    }
    out
}

/// The first path segment of each item of an import: `a::B` gives `a`, `{a::B, C}` gives `a`, `C`.
fn first_segments(import: &str) -> Vec<String> {
    let Some(list) = import.strip_prefix('{') else {
        return vec![
            import
                .split("::")
                .next()
                .unwrap_or(import)
                .trim()
                .to_owned(),
        ];
    };
    let mut items = Vec::new();
    let (mut depth, mut item) = (0, String::new());
    for c in list.trim_end_matches('}').chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => items.push(std::mem::take(&mut item)),
            _ => item.push(c),
        }
    }
    items.push(item);
    items
        .iter()
        .map(|i| i.trim())
        .filter(|i| !i.is_empty())
        .map(|i| i.split("::").next().unwrap_or(i).trim().to_owned())
        .collect()
}

/// Module → the modules it imports.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    // Names re-exported by lib.rs: `pub use module::{A, B};`.
    let mut defined_in = BTreeMap::new();
    for line in lib.lines() {
        if let Some(rest) = line.strip_prefix("pub use ") {
            let (module, names) = rest.split_once("::").unwrap();
            for name in first_segments(names.trim_end_matches(';')) {
                defined_in.insert(name, module.to_owned());
            }
        }
    }
    let mut graph = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let Some(module) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().is_none_or(|e| e != "rs") || module == "lib" {
            continue;
        }
        let source = std::fs::read_to_string(&path).unwrap();
        let imports: BTreeSet<String> = crate_imports(&source)
            .iter()
            .flat_map(|import| first_segments(import))
            .map(|first| defined_in.get(&first).cloned().unwrap_or(first))
            .filter(|target| target != module)
            .collect();
        graph.insert(module.to_owned(), imports);
    }
    graph
}

/// A circle in `graph`, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn spf_core_modules_import_each_other_without_a_circle() {
    let graph = module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(graph.len() >= 10, "every module is read: {graph:?}");
    assert!(
        graph["optimizer"].contains("visitors") && graph["visitors"].contains("bases"),
        "the graph sees the imports: {graph:?}"
    );
    assert_eq!(find_cycle(&graph), None, "{graph:#?}");
}

#[test]
fn the_cycle_finder_finds_a_planted_circle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let edge = |graph: &mut BTreeMap<String, BTreeSet<String>>, a: &str, b: &str| {
        graph.entry(a.into()).or_default().insert(b.into());
    };
    edge(&mut graph, "optimizer", "visitors");
    edge(&mut graph, "visitors", "bases");
    assert_eq!(find_cycle(&graph), None);
    edge(&mut graph, "bases", "optimizer");
    assert!(find_cycle(&graph).is_some());
    assert_eq!(
        first_segments("{bases::ProtectedBases, SpfError, error::{a, b}}"),
        ["bases", "SpfError", "error"]
    );
}
