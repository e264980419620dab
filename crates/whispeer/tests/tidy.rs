//! Repository hygiene that reviewers should not have to check by hand.

#![expect(clippy::unwrap_used, reason = "a tidy check fails loudly on any I/O error")]

use std::fs;
use std::path::{Path, PathBuf};

/// Files allowed over the line limit, each with its reason.
const LONG_FILES: &[(&str, &str)] = &[];
const MAX_LINES: usize = 600;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn files_under(dir: &Path, extension: &str, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target" || n == "node_modules") {
                continue;
            }
            files_under(&path, extension, out);
        } else if path.extension().is_some_and(|e| e == extension) {
            out.push(path);
        }
    }
}

fn rust_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    files_under(&root().join("crates"), "rs", &mut files);
    assert!(files.len() > 10, "found only {} files", files.len());
    files
}

#[test]
fn every_rust_file_starts_with_a_module_doc() {
    for path in rust_files() {
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("//!"), "{} does not start with a //! doc", path.display());
    }
}

#[test]
fn no_debug_macros_or_stubs() {
    let banned = [concat!("dbg", "!("), concat!("todo", "!("), concat!("unimplemented", "!(")];
    for path in rust_files() {
        let text = fs::read_to_string(&path).unwrap();
        for word in banned {
            assert!(!text.contains(word), "{} contains {word}", path.display());
        }
    }
}

#[test]
fn files_stay_short_unless_allowed() {
    for path in rust_files() {
        let lines = fs::read_to_string(&path).unwrap().lines().count();
        let relative = path.strip_prefix(root()).unwrap().to_string_lossy().replace('\\', "/");
        let allowed = LONG_FILES.iter().any(|(name, _)| *name == relative);
        assert!(lines <= MAX_LINES || allowed, "{relative} has {lines} lines (max {MAX_LINES})");
    }
}

#[test]
fn every_crate_inherits_workspace_lints() {
    for entry in fs::read_dir(root().join("crates")).unwrap() {
        let manifest = entry.unwrap().path().join("Cargo.toml");
        let text = fs::read_to_string(&manifest).unwrap();
        assert!(
            text.contains("[lints]\nworkspace = true"),
            "{} lacks [lints] workspace = true",
            manifest.display()
        );
    }
}

#[test]
fn readme_quickstart_is_the_example() {
    let readme = fs::read_to_string(root().join("README.md")).unwrap();
    let example =
        fs::read_to_string(root().join("crates/whispeer/examples/quickstart.rs")).unwrap();
    // The example minus its `//!` header is the README's first rust block.
    let body: String = example
        .lines()
        .skip_while(|l| l.starts_with("//!") || l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    let start = readme.find("```rust\n").expect("README has a rust block") + "```rust\n".len();
    let end = start + readme[start..].find("```").unwrap();
    assert_eq!(&readme[start..end], body, "README quickstart differs from examples/quickstart.rs");
}

#[test]
fn readme_first_screen_has_the_two_commands() {
    let readme = fs::read_to_string(root().join("README.md")).unwrap();
    let first_screen: String = readme.lines().take(25).collect::<Vec<_>>().join("\n");
    assert!(first_screen.contains("-p whispeer-cli -- serve"));
    assert!(first_screen.contains("./scripts/test"));
}
