//! The module tree is the layer diagram of DESIGN.md: roles → mechanisms → plain types, arrows
//! pointing down only and no circle between top-level modules. This test reads `src/` (the
//! production code: child `tests.rs` files and trailing `#[cfg(test)] mod tests` blocks are left
//! out), counts `crate::MODULE` references per file (`trustline::MODULE` in the binary), and
//! fails on an arrow that points up or on a circle, naming the files. Run with `--nocapture` to
//! print the folder → folder graph with counts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layer of each top-level module: higher layers may use lower ones, never the reverse.
/// Within a layer, arrows are allowed as long as they make no circle.
fn layer(module: &str) -> Option<u8> {
    Some(match module {
        // Plain types: identities, names, reasons, the crypto provider, config loading, time.
        "identity" | "region" | "refusal" | "crypto" | "config" | "clock" | "util" => 0,
        // Mechanisms: SVID rotation, TLS and SPIFFE verifiers, policy, audit, the admin
        // listener, drain, copy loops, connection gates.
        "svid" | "tls" | "policy" | "audit" | "admin" | "drain" | "copy" | "limits" => 1,
        // JWT-SVIDs, their keys and bundles (used by the CA, the sidecar's policy, the agent).
        "jwt" => 1,
        // SPIFFE Federation: other trust domains' bundles, fetched and fed to `tls`.
        "federation" => 1,
        // Roles: the CA, the host agent, the sidecar, the gateway and its transport, the WAN relay.
        "ca" | "agent" | "proxy" | "tunnel" | "wan" => 2,
        // Whole meshes built from the roles (demo, tests, benchmark).
        "lab" | "demo" => 3,
        // The binary: CLI parsing and dispatch.
        "main" => 4,
        _ => return None,
    })
}

/// This crate's `src/`, or `LAYERS_SRC` (to draw another tree's graph, e.g. an older commit's).
fn src() -> PathBuf {
    match std::env::var_os("LAYERS_SRC") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs")
            && p.file_name().is_some_and(|n| n != "tests.rs")
        {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`main` for the binary and its `cli/`).
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    let name = first.trim_end_matches(".rs").to_string();
    if name == "cli" {
        "main".into()
    } else {
        name
    }
}

/// Drops comments, string contents and a trailing `#[cfg(test)] mod tests` block.
fn production_text(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        break;
                    }
                }
                out.push_str("\"\"");
            }
            // A char literal such as '"' must not open a string.
            '\'' => {
                let rest: String = chars.clone().take(3).collect();
                if rest.starts_with("\"'") || rest.starts_with("\\\"'") {
                    for _ in 0..rest.find('\'').unwrap() + 1 {
                        chars.next();
                    }
                    out.push_str("' '");
                } else {
                    out.push(c);
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// The top-level modules named after `prefix` (`crate::` or `trustline::`), with `{a, b::c}`
/// groups opened one level.
fn references(text: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item = String::new();
            let mut at_start = true;
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                if depth == 1 && c == ',' {
                    out.push(std::mem::take(&mut item));
                    at_start = true;
                } else if at_start && (c.is_alphanumeric() || c == '_') {
                    item.push(c);
                } else if !item.is_empty() {
                    at_start = false;
                }
            }
            out.push(item);
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.push(name);
        }
    }
    out.retain(|m| !m.is_empty());
    out
}

/// (from, to) → the files and counts of the references.
type Graph = BTreeMap<(String, String), BTreeMap<String, usize>>;

fn graph() -> Graph {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files.sort();
    let mut g = Graph::new();
    for file in files {
        let from = module_of(&file);
        if from == "lib" {
            continue;
        }
        let text = production_text(&std::fs::read_to_string(&file).unwrap());
        let prefix = if from == "main" {
            "trustline::"
        } else {
            "crate::"
        };
        let rel = file.strip_prefix(src()).unwrap().display().to_string();
        for to in references(&text, prefix) {
            if to != from && layer(&to).is_some() {
                *g.entry((from.clone(), to))
                    .or_default()
                    .entry(rel.clone())
                    .or_default() += 1;
            }
        }
    }
    g
}

#[test]
fn every_module_has_a_layer() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let unknown: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(f))
        .filter(|m| m != "lib" && layer(m).is_none())
        .collect();
    assert!(
        unknown.is_empty(),
        "modules with no layer in tests/layers.rs: {unknown:?}"
    );
}

#[test]
fn arrows_point_down_only() {
    let g = graph();
    let mut up = Vec::new();
    for ((from, to), files) in &g {
        let n: usize = files.values().sum();
        println!("{from} -> {to}: {n}");
        if layer(from) < layer(to) {
            up.push(format!("{from} -> {to} (in {files:?})"));
        }
    }
    assert!(up.is_empty(), "arrows that point up:\n{}", up.join("\n"));
}

#[test]
fn no_circle_between_top_level_modules() {
    let g = graph();
    let mut next: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (from, to) in g.keys() {
        next.entry(from).or_default().insert(to);
    }
    // Depth-first search; a node met again on the current path closes a circle.
    fn visit<'a>(
        n: &'a str,
        next: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
        circles: &mut Vec<String>,
    ) {
        if let Some(i) = path.iter().position(|p| *p == n) {
            circles.push(format!("{} -> {n}", path[i..].join(" -> ")));
            return;
        }
        if !done.insert(n) {
            return;
        }
        path.push(n);
        for m in next.get(n).into_iter().flatten() {
            visit(m, next, path, done, circles);
        }
        path.pop();
    }
    let mut circles = Vec::new();
    let mut done = BTreeSet::new();
    for n in next.keys() {
        visit(n, &next, &mut Vec::new(), &mut done, &mut circles);
    }
    let detail: Vec<String> = circles
        .iter()
        .map(|c| {
            let hops: Vec<&str> = c.split(" -> ").collect();
            let files: Vec<String> = hops
                .windows(2)
                .map(|w| format!("{:?}", g[&(w[0].to_string(), w[1].to_string())]))
                .collect();
            format!("{c}: {}", files.join("; "))
        })
        .collect();
    assert!(circles.is_empty(), "import circles:\n{}", detail.join("\n"));
}

#[test]
fn the_reference_reader_sees_groups_and_paths() {
    let text = production_text(
        "use crate::{a::B, c};\n// crate::commented\nlet s = \"crate::quoted\"; crate::d::e(); \
         x::crate::no; let q = '\"'; crate::f::g;",
    );
    assert_eq!(references(&text, "crate::"), ["a", "c", "d", "f"]);
}
