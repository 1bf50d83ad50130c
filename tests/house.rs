//! The crate graph of `docs/architecture.md`, enforced: the role crates (coordinator, host agent,
//! image server, block proxy) are siblings that share only the contracts (`vgrid-api`), trust
//! (`vgrid-trust`) and the image server's client (`vgrid-storeclient`); only the host agent may
//! use the block proxy, and only the command line links every role. Read from
//! `cargo metadata`, so a new dependency in any `Cargo.toml` is checked too. No guests.

use std::collections::BTreeMap;

/// The vgrid crates each vgrid crate may depend on (normal and build dependencies); the table
/// "Crates" of docs/architecture.md. Dev-dependencies are not checked: a role's tests may start
/// another role to talk to (the block proxy's tests run an image server).
const ALLOWED: &[(&str, &[&str])] = &[
    ("vgrid-api", &[]),
    ("vgrid-trust", &["vgrid-api"]),
    ("vgrid-storeclient", &["vgrid-api", "vgrid-trust"]),
    ("vgrid-imagestore", &["vgrid-api", "vgrid-trust", "vgrid-storeclient"]),
    ("vgrid-blockproxy", &["vgrid-api", "vgrid-trust", "vgrid-storeclient"]),
    ("vgrid-hostagent", &["vgrid-api", "vgrid-trust", "vgrid-storeclient", "vgrid-blockproxy"]),
    ("vgrid-coordinator", &["vgrid-api", "vgrid-trust", "vgrid-storeclient"]),
    (
        "vgrid-cli",
        &["vgrid-api", "vgrid-trust", "vgrid-storeclient", "vgrid-imagestore", "vgrid-blockproxy", "vgrid-hostagent", "vgrid-coordinator"],
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
