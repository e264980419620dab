//! The shape of the workspace, checked: no import circle between the top-level modules of any
//! crate, the crates depend only in the allowed directions, and every path the code map in
//! ARCHITECTURE.md names exists.

#![expect(clippy::unwrap_used, reason = "a structure check fails loudly on any I/O error")]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without its inline test module (`#[cfg(test)]`
/// then `mod tests {`, by convention last: test modules may reach anywhere). A test-only item
/// elsewhere in the file is still read.
fn code_of(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap();
    let mut lines = Vec::new();
    let mut test_attribute = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if test_attribute && trimmed.starts_with("mod ") && trimmed.ends_with('{') {
            lines.pop();
            break;
        }
        if !trimmed.starts_with("#[") {
            test_attribute = false;
        }
        if trimmed.starts_with("#[cfg(test)]") {
            test_attribute = true;
        }
        lines.push(line.split("//").next().unwrap_or_default());
    }
    lines.join("\n")
}

/// What `crate::Name` stands for: the module a root re-export (`pub use module::...`) names.
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    for statement in lib.split(';') {
        let statement = statement.trim();
        let Some(rest) = statement.strip_prefix("pub use ") else { continue };
        let Some((module, items)) = rest.split_once("::") else { continue };
        let items = items.trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',') {
            let name = item.split("::").last().unwrap_or_default().trim();
            let name = name.rsplit(" as ").next().unwrap_or(name).trim();
            if !name.is_empty() {
                names.insert(name.to_string(), module.trim().to_string());
            }
        }
    }
    names
}

/// The top-level modules each top-level module of `src` uses through `crate::`.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let lib = ["lib.rs", "main.rs"].iter().map(|f| src.join(f)).find(|p| p.exists()).unwrap();
    let reexports = root_reexports(&code_of(&lib));
    let is_module = |name: &str| src.join(format!("{name}.rs")).exists() || src.join(name).is_dir();
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let test_only = test_modules(&files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files.into_iter().filter(|f| !test_only.iter().any(|t| f.starts_with(t))) {
        let relative = file.strip_prefix(src).unwrap();
        let top = relative.components().next().unwrap().as_os_str().to_string_lossy();
        let top = top.trim_end_matches(".rs").to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let code = code_of(&file);
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                group.split('}').next().unwrap_or_default().split(',').collect()
            } else {
                vec![rest]
            };
            for name in names {
                let name: String =
                    name.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                let module = if is_module(&name) {
                    Some(name)
                } else {
                    reexports.get(&name).cloned().filter(|m| is_module(m))
                };
                if let Some(module) = module.filter(|m| *m != top) {
                    graph.entry(top.clone()).or_default().insert(module);
                }
            }
        }
    }
    graph
}

/// Files and folders of modules declared under `#[cfg(test)]` (`mod tests;`, `mod conformance;`).
fn test_modules(files: &[PathBuf]) -> Vec<PathBuf> {
    let mut test_only = Vec::new();
    for file in files {
        let text = fs::read_to_string(file).unwrap();
        let dir = match file.file_stem().unwrap().to_str().unwrap() {
            "mod" | "lib" | "main" => file.parent().unwrap().to_path_buf(),
            stem => file.parent().unwrap().join(stem),
        };
        for declaration in text.split("#[cfg(test)]").skip(1) {
            let declaration = declaration.trim_start();
            let declaration = declaration.strip_prefix("pub(crate) ").unwrap_or(declaration);
            if let Some(name) = declaration.strip_prefix("mod ").and_then(|d| d.split(';').next())
                && !name.contains('{')
            {
                test_only.push(dir.join(format!("{}.rs", name.trim())));
                test_only.push(dir.join(name.trim()));
            }
        }
    }
    test_only
}

/// A cycle in `graph`, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

fn crates() -> Vec<PathBuf> {
    let mut crates: Vec<PathBuf> =
        fs::read_dir(root().join("crates")).unwrap().map(|e| e.unwrap().path()).collect();
    crates.sort();
    crates
}

#[test]
fn no_crate_has_an_import_circle_between_its_modules() {
    for krate in crates() {
        let graph = module_graph(&krate.join("src"));
        if let Some(cycle) = find_cycle(&graph) {
            panic!("{}: import circle {}", krate.display(), cycle.join(" -> "));
        }
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let edges = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")];
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in edges {
        graph.entry(from.into()).or_default().insert(to.into());
    }
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    graph.get_mut("c").unwrap().remove("a");
    assert_eq!(find_cycle(&graph), None);
    let reexports = root_reexports("pub use broker::{Broker, BrokerBuilder as B};\npub use x::Y;");
    assert_eq!(reexports["Broker"], "broker");
    assert_eq!(reexports["B"], "broker");
    assert_eq!(reexports["Y"], "x");
}

/// The workspace crates a manifest depends on (normal dependencies only).
fn workspace_dependencies(manifest: &str) -> BTreeSet<String> {
    let mut deps = BTreeSet::new();
    let mut in_deps = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
            continue;
        }
        if in_deps && let Some(name) = line.split(['=', '.']).next() {
            let name = name.trim();
            if name.starts_with("whispeer") {
                deps.insert(name.to_string());
            }
        }
    }
    deps
}

#[test]
fn crates_depend_only_in_the_allowed_directions() {
    let allowed: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("whispeer-proto", &[][..]),
        ("whispeer-engines", &["whispeer-proto"][..]),
        ("whispeer-core", &["whispeer-proto", "whispeer-engines"][..]),
        ("whispeer-transport", &[][..]),
        (
            "whispeer-server",
            &["whispeer-proto", "whispeer-engines", "whispeer-core", "whispeer-transport"][..],
        ),
        ("whispeer-sync", &["whispeer-proto", "whispeer-engines", "whispeer-core"][..]),
        ("whispeer", &["whispeer-core", "whispeer-server", "whispeer-sync"][..]),
        ("whispeer-client", &["whispeer-proto", "whispeer-engines", "whispeer-transport"][..]),
        ("whispeer-wasm", &["whispeer-proto", "whispeer-engines"][..]),
        ("whispeer-cli", &["whispeer", "whispeer-client", "whispeer-sync"][..]),
    ]);
    for krate in crates() {
        let name = krate.file_name().unwrap().to_string_lossy().to_string();
        let manifest = fs::read_to_string(krate.join("Cargo.toml")).unwrap();
        let may = allowed.get(name.as_str()).unwrap_or_else(|| panic!("{name}: not in the table"));
        for dep in workspace_dependencies(&manifest) {
            assert!(may.contains(&dep.as_str()), "{name} must not depend on {dep}");
        }
    }
}

#[test]
fn every_path_in_the_code_map_exists() {
    let architecture = fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let paths: Vec<&str> = architecture
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|token| token.starts_with("crates/") || token.starts_with("fuzz/"))
        .collect();
    assert!(paths.len() > 20, "the code map names only {} paths", paths.len());
    for path in paths {
        assert!(root().join(path).exists(), "ARCHITECTURE.md names {path}, which does not exist");
    }
}
