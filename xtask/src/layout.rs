//! The source layout rules of `docs/architecture.md`, checked by reading the sources:
//! - inside each crate, no files import each other in a circle (`crate::` and `super::`
//!   paths, test modules and comments aside);
//! - no Rust source file is over [`MAX_LINES`] lines.
//!
//! Crates cannot import upward: Cargo refuses cyclic crate dependencies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The most lines a source file may have.
pub const MAX_LINES: usize = 500;

/// Every breach of the rules under the repository `root`, one line each.
pub fn check(root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    rs_files(root, &mut files);
    for f in &files {
        let lines = std::fs::read_to_string(f).map_or(0, |t| t.lines().count());
        if lines > MAX_LINES {
            problems.push(format!("{}: {lines} lines", rel(root, f)));
        }
    }
    let mut crates: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("src"))
        .filter(|p| p.is_dir())
        .collect();
    crates.sort();
    for src in crates {
        for circle in circles(&imports(&src)) {
            let names: Vec<String> = circle.iter().map(|f| rel(root, f)).collect();
            problems.push(format!("files import each other: {}", names.join(", ")));
        }
    }
    problems
}

fn rel(root: &Path, f: &Path) -> String {
    f.strip_prefix(root).unwrap_or(f).display().to_string()
}

/// The `.rs` files under `dir`, build output and hidden folders aside.
fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" {
                rs_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

/// The module path of `file` in the crate whose sources are `src`: `a/b.rs` and `a/b/mod.rs`
/// are `[a, b]`, the crate root `[]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap_or(file).with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The file that defines the longest prefix of module `path`, unless that is the crate root.
fn file_of(src: &Path, path: &[String]) -> Option<PathBuf> {
    (1..=path.len()).rev().find_map(|i| {
        let base = path[..i].iter().fold(src.to_path_buf(), |p, s| p.join(s));
        [base.with_extension("rs"), base.join("mod.rs")]
            .into_iter()
            .find(|f| f.is_file())
    })
}

/// A file's code without its comments and without a `#[cfg(test)]` module.
fn code(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let next = lines.peek().map_or("", |l| l.trim_start());
        if line.trim() == "#[cfg(test)]" && (next.starts_with("mod ") || next.starts_with("pub")) {
            break;
        }
        out.push_str(line.split("//").next().unwrap_or(""));
        out.push('\n');
    }
    out
}

/// The other files of the crate each file of `src` refers to.
fn imports(src: &Path) -> BTreeMap<PathBuf, Vec<PathBuf>> {
    let mut files = Vec::new();
    rs_files(src, &mut files);
    let mut edges = BTreeMap::new();
    for f in &files {
        let me = module_of(src, f);
        let text = code(&std::fs::read_to_string(f).unwrap_or_default());
        let mut to = Vec::new();
        for (ups, rest) in paths(&text) {
            let base = match ups {
                None => Vec::new(),
                Some(n) => me[..me.len().saturating_sub(n)].to_vec(),
            };
            let target = file_of(src, &[base, rest].concat());
            if let Some(t) = target.filter(|t| t != f && !to.contains(t)) {
                to.push(t);
            }
        }
        edges.insert(f.clone(), to);
    }
    edges
}

/// Every `crate::a::b` (`None`) and `super::super::a` (`Some(2)`) path in `code`, with its
/// lower-case segments.
fn paths(code: &str) -> Vec<(Option<usize>, Vec<String>)> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(i) = code[at..]
        .find("crate::")
        .into_iter()
        .chain(code[at..].find("super::"))
        .min()
    {
        let start = at + i;
        at = start + 1;
        if code[..start].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let mut segments: Vec<&str> = Vec::new();
        let mut rest = &code[start..];
        while let Some(end) = rest.find("::") {
            let word = &rest[..end];
            if word.is_empty() || !word.chars().all(is_ident) {
                break;
            }
            segments.push(word);
            rest = &rest[end + 2..];
        }
        let tail: String = rest.chars().take_while(|&c| is_ident(c)).collect();
        if !tail.is_empty() {
            segments.push(&rest[..tail.len()]);
        }
        let ups = segments.iter().take_while(|s| **s == "super").count();
        let head = if segments.first() == Some(&"crate") {
            None
        } else {
            Some(ups)
        };
        let skip = if head.is_none() { 1 } else { ups };
        let modules: Vec<String> = segments[skip..]
            .iter()
            .take_while(|s| s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_'))
            .map(|s| s.to_string())
            .collect();
        if !modules.is_empty() {
            found.push((head, modules));
        }
    }
    found
}

/// The groups of two or more files that reach each other (Tarjan's strongly connected
/// components).
fn circles(edges: &BTreeMap<PathBuf, Vec<PathBuf>>) -> Vec<Vec<PathBuf>> {
    struct Walk<'a> {
        edges: &'a BTreeMap<PathBuf, Vec<PathBuf>>,
        index: BTreeMap<&'a Path, (usize, usize)>,
        stack: Vec<&'a Path>,
        found: Vec<Vec<PathBuf>>,
    }
    fn visit<'a>(w: &mut Walk<'a>, v: &'a Path) {
        let n = w.index.len();
        w.index.insert(v, (n, n));
        w.stack.push(v);
        for t in w.edges.get(v).into_iter().flatten() {
            let t = t.as_path();
            if !w.index.contains_key(t) {
                visit(w, t);
                let low = w.index[t].1.min(w.index[v].1);
                w.index.get_mut(v).expect("visited").1 = low;
            } else if w.stack.contains(&t) {
                let low = w.index[t].0.min(w.index[v].1);
                w.index.get_mut(v).expect("visited").1 = low;
            }
        }
        if w.index[v].0 == w.index[v].1 {
            let at = w.stack.iter().position(|x| *x == v).expect("on the stack");
            let group: Vec<PathBuf> = w.stack.drain(at..).map(Path::to_path_buf).collect();
            if group.len() > 1 {
                w.found.push(group);
            }
        }
    }
    let mut w = Walk {
        edges,
        index: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !w.index.contains_key(v.as_path()) {
            visit(&mut w, v);
        }
    }
    w.found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sources_keep_the_layout_rules() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let problems = check(root);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn circles_and_long_files_are_found() {
        let root = std::env::temp_dir().join(format!("xtask-layout-{}", std::process::id()));
        let src = root.join("demo/src");
        std::fs::create_dir_all(src.join("a")).unwrap();
        std::fs::write(src.join("lib.rs"), "mod a;\nmod b;\n").unwrap();
        std::fs::write(src.join("a/mod.rs"), "mod c;\nuse crate::b::Thing;\n").unwrap();
        std::fs::write(src.join("a/c.rs"), "// crate::b\nuse super::super::d;\n").unwrap();
        std::fs::write(src.join("b.rs"), "pub fn f() { crate::a::g() }\n").unwrap();
        std::fs::write(
            src.join("d.rs"),
            "x\n".repeat(MAX_LINES + 1) + "#[cfg(test)]\nmod tests { use crate::a::c; }\n",
        )
        .unwrap();
        let problems = check(&root);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].ends_with("d.rs: 503 lines"), "{problems:?}");
        assert!(
            problems[1].contains("a/mod.rs") && problems[1].contains("b.rs"),
            "{problems:?}"
        );
        assert!(!problems[1].contains("c.rs"), "{problems:?}");
    }
}
