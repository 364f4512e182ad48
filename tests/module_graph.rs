//! The workspace's import graph has no circle, and its arrows only point down.
//!
//! - **Crates**: each workspace crate's normal `[dependencies]` on another workspace crate go to a
//!   crate of a lower layer (the library, then the shared fine-tuning harness, then the two
//!   evaluation crates, the synthetic lab and the real model, which never depend on each other).
//! - **Modules**: in every crate, no module depends on itself through other modules, read from
//!   the sources: every `use` statement (`use crate::…`, `use super::…`, `use self::…`, `use
//!   child::…`, braces expanded) and every path written inline in code (`crate::x::f()`,
//!   `super::x::T`, `child::f()`), comments left out. A name re-exported by a module
//!   (`pub use x::T;`) counts as an import of the module that defines it, so a crate root or a
//!   parent module that re-exports its children is no hub through which everything circles. Test
//!   modules (`#[cfg(test)] mod tests`, and everything under a `tests` module) sit on top of
//!   their crate and are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module's path within its crate, as segments (`[]` is the crate root).
type ModPath = Vec<String>;

/// One source file of a crate: its module path, its code (comments and test modules removed)
/// and the child modules it declares.
struct Module {
    path: ModPath,
    code: String,
    children: BTreeSet<String>,
}

/// `source` without comments and without its test modules (a top-level `#[cfg(test)]` before
/// `mod name;`, or before `mod name {` up to its closing `}` at the start of a line).
fn code_of(source: &str) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i] == "#[cfg(test)]"
            && let Some(offset) = lines[i + 1..].iter().position(|l| !l.trim().is_empty())
        {
            let at = i + 1 + offset;
            let next = lines[at].trim_start_matches("pub ");
            if next.starts_with("mod ") {
                i = if next.ends_with('{') {
                    // The module's body ends at the first `}` that opens a line.
                    lines[at..]
                        .iter()
                        .position(|l| *l == "}")
                        .map_or(lines.len(), |end| at + end + 1)
                } else {
                    at + 1
                };
                continue;
            }
        }
        out.push_str(strip_comment(lines[i]));
        out.push('\n');
        i += 1;
    }
    out
}

/// `line` up to a `//` that is not inside a string literal.
fn strip_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    let mut in_string = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_string => i += 1,
            b'"' => in_string = !in_string,
            b'/' if !in_string && bytes.get(i + 1) == Some(&b'/') => return &line[..i],
            _ => {}
        }
        i += 1;
    }
    line
}

/// Every module file under `src` (`lib.rs` the root, `a.rs` or `a/mod.rs` module `a`, `a/b.rs`
/// module `a::b`), test modules left out.
fn modules(src: &Path) -> Vec<Module> {
    fn walk(dir: &Path, prefix: &[String], out: &mut Vec<Module>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
            if path.is_dir() {
                if name != "tests" {
                    walk(&path, &[prefix, &[name]].concat(), out);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || name == "tests" {
                continue;
            }
            let module = match name.as_str() {
                "lib" | "mod" => prefix.to_vec(),
                _ => [prefix, &[name]].concat(),
            };
            let code = code_of(&std::fs::read_to_string(&path).unwrap());
            let children = code
                .lines()
                .filter_map(|l| {
                    let l = l.trim_start();
                    let l = l
                        .strip_prefix("pub(crate) ")
                        .or(l.strip_prefix("pub "))
                        .unwrap_or(l);
                    let name = l.strip_prefix("mod ")?.trim_end_matches([';', '{', ' ']);
                    (name != "tests").then(|| name.to_owned())
                })
                .collect();
            out.push(Module {
                path: module,
                code,
                children,
            });
        }
    }
    let mut out = Vec::new();
    walk(src, &[], &mut out);
    out
}

/// The `use` statements of `code`, each expanded into full paths (braces opened, `self` in a
/// group meaning the group's own path, `as` renames dropped), and whether it is a `pub` use.
fn use_paths(code: &str) -> Vec<(bool, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = find_use(rest) {
        let (public, start) = at;
        let end = rest[start..].find(';').map_or(rest.len(), |e| start + e);
        let tree: String = rest[start..end]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        for path in expand(&tree) {
            out.push((public, path));
        }
        rest = &rest[end..];
    }
    out
}

/// The next `use` statement of `code`: whether it is public, and where its tree starts.
fn find_use(code: &str) -> Option<(bool, usize)> {
    let mut from = 0;
    while let Some(i) = code[from..].find("use ") {
        let at = from + i;
        let line_start = code[..at].rfind('\n').map_or(0, |n| n + 1);
        let before = code[line_start..at].trim();
        if before.is_empty() || (before.starts_with("pub") && !before.contains(' ')) {
            return Some((!before.is_empty(), at + 4));
        }
        from = at + 4;
    }
    None
}

/// The paths of a use tree: `a::{b::C, d}` gives `a::b::C` and `a::d`.
fn expand(tree: &str) -> Vec<Vec<String>> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap_or(tree);
        return vec![path.split("::").map(|s| s.trim().to_owned()).collect()];
    };
    let prefix: Vec<String> = tree[..open]
        .trim_end_matches("::")
        .split("::")
        .filter(|s| !s.is_empty())
        .map(|s| s.trim().to_owned())
        .collect();
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let (mut items, mut item, mut depth) = (Vec::new(), String::new(), 0);
    for c in inner.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut item));
                continue;
            }
            _ => {}
        }
        item.push(c);
    }
    items.push(item);
    items
        .iter()
        .filter(|i| !i.trim().is_empty())
        .flat_map(|i| expand(i))
        .map(|tail| {
            if tail == ["self"] {
                prefix.clone()
            } else {
                [prefix.clone(), tail].concat()
            }
        })
        .collect()
}

/// The paths written inline in `code` (outside `use` statements) that start with `crate::`,
/// `super::`, `self::` or a child module's name.
fn inline_paths(code: &str, children: &BTreeSet<String>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while i < bytes.len() {
        let boundary = i == 0 || !(ident(bytes[i - 1]) || bytes[i - 1] == b':');
        if !boundary || !ident(bytes[i]) {
            i += 1;
            continue;
        }
        let mut end = i;
        while end < bytes.len() && (ident(bytes[end]) || code[end..].starts_with("::")) {
            end += if code[end..].starts_with("::") { 2 } else { 1 };
        }
        let path: Vec<String> = code[i..end]
            .trim_end_matches("::")
            .split("::")
            .map(str::to_owned)
            .collect();
        let first = path[0].as_str();
        if path.len() > 1
            && (["crate", "super", "self"].contains(&first) || children.contains(first))
        {
            out.push(path);
        }
        i = end.max(i + 1);
    }
    out
}

/// `path`, written in module `at` (which declares `children`), as a path from the crate root;
/// `None` for a path into another crate.
fn absolute(path: &[String], at: &[String], children: &BTreeSet<String>) -> Option<ModPath> {
    let mut base: Vec<String> = at.to_vec();
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            base.clear();
            rest = &rest[1..];
        }
        Some("self") => rest = &rest[1..],
        Some("super") => {
            while rest.first().map(String::as_str) == Some("super") {
                base.pop();
                rest = &rest[1..];
            }
        }
        Some(first) if children.contains(first) => {}
        _ => return None,
    }
    Some([base, rest.to_vec()].concat())
}

/// Module → the modules it imports, for the crate whose sources are in `src`.
fn module_graph(src: &Path) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let modules = modules(src);
    let known: BTreeSet<ModPath> = modules.iter().map(|m| m.path.clone()).collect();
    // The module a path names: its longest known prefix, then through re-exports.
    let owner = |path: &[String]| -> ModPath {
        (0..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|p| known.contains(p))
            .unwrap_or_default()
    };
    // (module, name) → the absolute path that module's `pub use` gives the name.
    let mut reexports: BTreeMap<(ModPath, String), ModPath> = BTreeMap::new();
    for m in &modules {
        for (public, path) in use_paths(&m.code) {
            let Some(abs) = public
                .then(|| absolute(&path, &m.path, &m.children))
                .flatten()
            else {
                continue;
            };
            if let Some(name) = abs.last() {
                reexports.insert((m.path.clone(), name.clone()), abs.clone());
            }
        }
    }
    let resolve = |path: &[String]| -> ModPath {
        let mut path = path.to_vec();
        for _ in 0..8 {
            let module = owner(&path);
            let Some(name) = path.get(module.len()) else {
                return module;
            };
            match reexports.get(&(module.clone(), name.clone())) {
                Some(target) if *target != path => path = target.clone(),
                _ => return module,
            }
        }
        owner(&path)
    };
    let mut graph = BTreeMap::new();
    for m in &modules {
        let uses = use_paths(&m.code).into_iter().map(|(_, p)| p);
        let imports: BTreeSet<ModPath> = uses
            .chain(inline_paths(&m.code, &m.children))
            .filter_map(|p| absolute(&p, &m.path, &m.children))
            .map(|p| resolve(&p))
            .filter(|target| !target.is_empty() && *target != m.path)
            .collect();
        // The crate root only declares and re-exports: it is no module of the graph.
        if !m.path.is_empty() {
            graph.insert(m.path.clone(), imports);
        }
    }
    graph
}

/// A circle in `graph`, if there is one.
fn find_cycle<N: Ord + Clone>(graph: &BTreeMap<N, BTreeSet<N>>) -> Option<Vec<N>> {
    fn visit<N: Ord + Clone>(
        node: &N,
        graph: &BTreeMap<N, BTreeSet<N>>,
        path: &mut Vec<N>,
        done: &mut BTreeSet<N>,
    ) -> Option<Vec<N>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.clone());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.clone());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every crate of the workspace: its package name and directory.
fn crates() -> Vec<(String, PathBuf)> {
    let mut out = vec![("spf".to_owned(), root())];
    for entry in std::fs::read_dir(root().join("crates")).unwrap() {
        let dir = entry.unwrap().path();
        let name = dir.file_name().unwrap().to_str().unwrap().to_owned();
        out.push((name, dir));
    }
    out.sort();
    out
}

/// The workspace crates among the normal `[dependencies]` of the manifest in `dir`.
fn workspace_dependencies(dir: &Path) -> BTreeSet<String> {
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    let mut section = String::new();
    let mut out = BTreeSet::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line.to_owned();
        } else if section == "[dependencies]"
            && let Some((name, _)) = line.split_once('=')
            && name.trim().starts_with("spf")
        {
            out.insert(name.trim().to_owned());
        }
    }
    out
}

/// Each crate's layer: a crate depends only on crates of a lower layer.
fn layer(name: &str) -> usize {
    match name {
        "spf-subspace" => 0,
        "spf-core" => 1,
        "spf-train" | "spf-theory" => 2,
        "spf" => 3,
        "spf-harness" => 3,
        "spf-lab" | "spf-llm" => 4,
        other => panic!("{other}: a new crate needs a layer in this test and docs/architecture.md"),
    }
}

#[test]
fn crates_depend_only_on_lower_layers_and_the_evaluation_crates_not_on_each_other() {
    let crates = crates();
    assert!(crates.len() >= 8, "every crate is read: {crates:?}");
    let mut graph = BTreeMap::new();
    for (name, dir) in &crates {
        let deps = workspace_dependencies(dir);
        for dep in &deps {
            assert!(
                layer(dep) < layer(name),
                "{name} (layer {}) depends on {dep} (layer {})",
                layer(name),
                layer(dep)
            );
        }
        graph.insert(name.clone(), deps);
    }
    assert!(graph["spf-lab"].contains("spf-harness") && graph["spf-llm"].contains("spf-harness"));
    assert!(!graph["spf-llm"].contains("spf-lab") && !graph["spf-lab"].contains("spf-llm"));
    assert_eq!(find_cycle(&graph), None);
}

#[test]
fn no_crate_holds_an_import_circle() {
    let mut seen = 0;
    for (name, dir) in crates() {
        let graph = module_graph(&dir.join("src"));
        seen += graph.len();
        if let Some(cycle) = find_cycle(&graph) {
            let cycle: Vec<String> = cycle.iter().map(|m| m.join("::")).collect();
            panic!("{name}: import circle {}", cycle.join(" → "));
        }
    }
    assert!(seen >= 60, "every module is read ({seen})");
}

#[test]
fn the_graph_sees_every_import_form() {
    let path = |s: &str| s.split("::").map(str::to_owned).collect::<ModPath>();
    let core = module_graph(&root().join("crates/spf-core/src"));
    let llm = module_graph(&root().join("crates/spf-llm/src"));
    for (graph, from, to) in [
        (&core, "protection", "visitors"),                  // use crate::…
        (&core, "optimizer", "error"),                      // re-exported by lib.rs
        (&core, "projection", "projection::mode"),          // pub use child::…
        (&core, "projection::pending", "projection::mode"), // use super::…
        (&llm, "smollm::experiment", "smollm::attack"),
        (&llm, "smollm::blocks", "smollm::config"),
    ] {
        assert!(
            graph[&path(from)].contains(&path(to)),
            "{from} → {to}: {:?}",
            graph[&path(from)]
        );
    }
}

/// A crate whose two modules import each other in the given way: the finder must see it.
fn planted(a: &str, b: &str) -> Option<Vec<ModPath>> {
    let dir = std::env::temp_dir().join(format!("spf-module-graph-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("outer")).unwrap();
    std::fs::write(
        src.join("lib.rs"),
        "mod outer;\npub use outer::inner::Item;\n",
    )
    .unwrap();
    std::fs::write(src.join("outer.rs"), format!("mod inner;\n{a}\n")).unwrap();
    std::fs::write(
        src.join("outer/inner.rs"),
        format!("pub struct Item;\n{b}\n"),
    )
    .unwrap();
    let cycle = find_cycle(&module_graph(&src));
    std::fs::remove_dir_all(&dir).unwrap();
    cycle
}

#[test]
fn a_planted_circle_is_found_whatever_the_import_form() {
    let inner_uses_outer = [
        "use crate::outer::f;",
        "use super::f;",
        "use super::{f, g as h};",
        "fn x() { super::f(); }",
        "fn x() { crate::outer::f(); }",
    ];
    let outer_uses_inner = [
        "use inner::Item; pub fn f() {}",
        "use self::inner::Item; pub fn f() {}",
        "pub fn f() { let _ = inner::Item; }",
        "use crate::Item; pub fn f() {}", // through the root's re-export
    ];
    for a in outer_uses_inner {
        for b in inner_uses_outer {
            assert!(
                planted(a, b).is_some(),
                "not found: outer `{a}`, inner `{b}`"
            );
        }
        // One direction alone, or the other only in a comment or a test module, is no circle.
        assert_eq!(planted(a, "// use super::f;"), None, "{a}");
        let test_only = "#[cfg(test)]\nmod tests {\n    use super::super::f;\n}";
        assert_eq!(planted(a, test_only), None, "{a}");
        // Code after a test module is read.
        let after_tests = format!("{test_only}\nfn y() {{ super::f(); }}");
        assert!(
            planted(a, &after_tests).is_some(),
            "{a}: after a test module"
        );
    }
}
