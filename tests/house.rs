//! The crate graph of `docs/architecture.md`, enforced: the role crates (coordinator, host agent,
//! image server, block proxy) are siblings that share only the contracts (`vgrid-api`), trust
//! (`vgrid-trust`) and the image server's client (`vgrid-storeclient`); only the host agent may
//! use the block proxy, and only the command line links every role. Read from
//! `cargo metadata`, so a new dependency in any `Cargo.toml` is checked too. Also the size rules: no
//! source file over 900 lines, no function over 120. No guests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The vgrid crates each vgrid crate may depend on (normal and build dependencies); the table
/// "Crates" of docs/architecture.md. Dev-dependencies are not checked: a role's tests may start
/// another role to talk to (the block proxy's tests run an image server).
const ALLOWED: &[(&str, &[&str])] = &[
    ("vgrid-api", &[]),
    ("vgrid-trust", &["vgrid-api"]),
    ("vgrid-storeclient", &["vgrid-api", "vgrid-trust"]),
    ("vgrid-imagestore", &["vgrid-api", "vgrid-trust", "vgrid-storeclient"]),
    ("vgrid-blockproxy", &["vgrid-api", "vgrid-trust", "vgrid-storeclient"]),
    ("vgrid-vnet", &["vgrid-api"]),
    ("vgrid-hostagent", &["vgrid-api", "vgrid-trust", "vgrid-storeclient", "vgrid-blockproxy", "vgrid-vnet"]),
    ("vgrid-coordinator", &["vgrid-api", "vgrid-trust", "vgrid-storeclient"]),
    (
        "vgrid-cli",
        &[
            "vgrid-api",
            "vgrid-trust",
            "vgrid-storeclient",
            "vgrid-imagestore",
            "vgrid-blockproxy",
            "vgrid-vnet",
            "vgrid-hostagent",
            "vgrid-coordinator",
        ],
    ),
    ("vgrid", &["vgrid-cli"]),
];

/// Each workspace crate with the vgrid crates it depends on outside its tests.
fn vgrid_edges() -> BTreeMap<String, Vec<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo metadata");
    assert!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let packages = meta["packages"].as_array().expect("packages");
    let members: Vec<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| d["kind"].as_str() != Some("dev"))
                .filter_map(|d| d["name"].as_str())
                .filter(|d| members.contains(d))
                .map(str::to_string)
                .collect();
            (p["name"].as_str().unwrap_or_default().to_string(), deps)
        })
        .collect()
}

/// The edges of `edges` that [`ALLOWED`] does not allow, as `from -> to` lines.
fn forbidden(edges: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut bad = Vec::new();
    for (from, deps) in edges {
        let Some(ok) = allowed.get(from.as_str()) else {
            bad.push(format!("{from}: a crate the table of docs/architecture.md (and ALLOWED here) does not place"));
            continue;
        };
        for to in deps {
            if !ok.contains(&to.as_str()) {
                bad.push(format!("{from} -> {to}"));
            }
        }
    }
    bad
}

#[test]
fn role_crates_are_siblings_and_contracts_depend_on_no_role() {
    let edges = vgrid_edges();
    assert!(edges.contains_key("vgrid-coordinator") && edges.contains_key("vgrid-api"), "cargo metadata lists the workspace: {edges:?}");
    let bad = forbidden(&edges);
    assert!(bad.is_empty(), "dependencies that break the crate graph of docs/architecture.md:\n  {}", bad.join("\n  "));
}

#[test]
fn the_check_names_a_forbidden_edge() {
    // The graph the table allows, then three edges it does not.
    let mut edges: BTreeMap<String, Vec<String>> =
        ALLOWED.iter().map(|(from, to)| (from.to_string(), to.iter().map(|t| t.to_string()).collect())).collect();
    assert!(forbidden(&edges).is_empty());
    edges.get_mut("vgrid-coordinator").unwrap().push("vgrid-hostagent".into());
    edges.get_mut("vgrid-api").unwrap().push("vgrid-cli".into());
    edges.get_mut("vgrid-hostagent").unwrap().push("vgrid-imagestore".into());
    let bad = forbidden(&edges);
    for edge in ["vgrid-coordinator -> vgrid-hostagent", "vgrid-api -> vgrid-cli", "vgrid-hostagent -> vgrid-imagestore"] {
        assert!(bad.iter().any(|b| b == edge), "{edge} not reported: {bad:?}");
    }
    assert_eq!(bad.len(), 3, "{bad:?}");
    edges.insert("vgrid-newrole".into(), vec![]);
    assert!(forbidden(&edges).iter().any(|b| b.starts_with("vgrid-newrole: ")), "an unplaced crate is reported");
}

/// The workspace's root (this test belongs to the root package).
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Source files the size rules apply to: every `.rs` file of the workspace's crates, binary and
/// tests (fuzz targets and build output excluded).
fn rust_sources() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name();
            if p.is_dir() {
                if name != "target" && name != "fuzz" && !name.to_string_lossy().starts_with('.') {
                    walk(&p, out);
                }
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    for top in ["crates", "src", "tests"] {
        walk(&workspace_root().join(top), &mut out);
    }
    out.sort();
    out
}

/// Functions longer than `max` lines in `text`: (name, first line, length). A function runs
/// from its `fn` line to the first line that is its indentation followed by `}` (what rustfmt
/// writes); signatures that end in `;` (trait items, extern) have no body.
fn long_functions(text: &str, max: usize) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let Some(pos) = fn_keyword(trimmed) else { continue };
        let name: String = trimmed[pos + 3..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        // The line that opens the body (or ends a bodiless signature).
        let Some(open) = (i..lines.len()).find(|&j| {
            let l = lines[j].trim_end();
            l.ends_with('{') || l.ends_with(';') || l.ends_with("{}")
        }) else {
            continue;
        };
        let l = lines[open].trim_end();
        if l.ends_with(';') || l.ends_with("{}") {
            continue;
        }
        let close = format!("{indent}}}");
        if let Some(end) = (open + 1..lines.len()).find(|&k| lines[k].trim_end() == close) {
            let len = end - i + 1;
            if len > max {
                out.push((name, i + 1, len));
            }
        }
    }
    out
}

/// Where `fn ` starts in a trimmed line that declares a function (after `pub`, `pub(crate)`,
/// `async`, `const`, `unsafe`, `extern "C"`), if it does.
fn fn_keyword(trimmed: &str) -> Option<usize> {
    let mut rest = trimmed;
    let mut at = 0;
    loop {
        if rest.starts_with("fn ") {
            return Some(at);
        }
        let word_end = if rest.starts_with("pub(") { rest.find(')').map(|p| p + 1)? } else { rest.find(' ')? };
        let word = &rest[..word_end];
        if !matches!(word, "pub" | "async" | "const" | "unsafe" | "extern" | "\"C\"") && !word.starts_with("pub(") {
            return None;
        }
        let skip = word_end + rest[word_end..].len() - rest[word_end..].trim_start().len();
        rest = &rest[skip..];
        at += skip;
    }
}

#[test]
fn no_source_file_is_over_900_lines_and_no_function_over_120() {
    let mut problems = Vec::new();
    for path in rust_sources() {
        let text = std::fs::read_to_string(&path).unwrap();
        let rel = path.strip_prefix(workspace_root()).unwrap_or(&path).display().to_string();
        let n = text.lines().count();
        if n > 900 {
            problems.push(format!("{rel}: {n} lines (at most 900: split it by concern)"));
        }
        for (name, line, len) in long_functions(&text, 120) {
            problems.push(format!("{rel}:{line}: fn {name} is {len} lines (at most 120: split it into named steps)"));
        }
    }
    assert!(problems.is_empty(), "house rules broken:\n{}", problems.join("\n"));
}

#[test]
fn the_length_rule_sees_functions_as_rustfmt_writes_them() {
    let body = |n: usize| (0..n).map(|_| "        x();\n").collect::<String>();
    let text = format!(
        "impl A {{\n    pub(crate) async fn long(&self) {{\n{}    }}\n    fn short() {{}}\n    fn sig();\n}}\nfn top() {{\n{}}}\n",
        body(130),
        body(3)
    );
    let found = long_functions(&text, 120);
    assert_eq!(found, vec![("long".to_string(), 2, 132)]);
    assert_eq!(fn_keyword("pub(crate) async fn x()"), Some(17));
    assert_eq!(fn_keyword("let fn_x = 1;"), None);
}
