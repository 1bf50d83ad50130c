//! The command line's own documents, from the built binary: shell completions and man pages
//! (issue 17, item 6), generated from the clap definitions that parse it.

mod common;

use common::vgrid_bin;
use std::process::Command;

fn vgrid(args: &[&str]) -> (String, String) {
    let o = Command::new(vgrid_bin()).args(args).output().unwrap();
    assert!(o.status.success(), "vgrid {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn completion_scripts_name_the_subcommands_and_options() {
    let (bash, _) = vgrid(&["completions", "bash"]);
    assert!(bash.contains("complete -F _vgrid") || bash.contains("complete -F _vgrid -o"), "not a bash completion script");
    for word in ["vm", "image", "run", "migrate", "build-sample", "--image-server", "completions", "man"] {
        assert!(bash.contains(word), "the bash completion does not mention {word}");
    }
    // bash itself accepts it (from a file: the script is larger than one argument may be).
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("vgrid.bash");
    std::fs::write(&script, &bash).unwrap();
    let check = Command::new("bash").arg("-n").arg(&script).output().unwrap();
    assert!(check.status.success(), "bash -n: {}", String::from_utf8_lossy(&check.stderr));
    let (zsh, _) = vgrid(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef vgrid") && zsh.contains("build-sample"));
    let (fish, _) = vgrid(&["completions", "fish"]);
    assert!(fish.contains("complete -c vgrid") && fish.contains("build-sample"));
    let o = Command::new(vgrid_bin()).args(["completions", "tcsh"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("bash"), "an unknown shell names the known ones");
}

#[test]
fn man_pages_are_written_for_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    let (listed, _) = vgrid(&["man", out.to_str().unwrap()]);
    let pages: Vec<&str> = listed.lines().collect();
    for name in ["vgrid.1", "vgrid-vm.1", "vgrid-vm-run.1", "vgrid-image-build-sample.1", "vgrid-completions.1"] {
        let p = out.join(name);
        assert!(pages.contains(&p.to_str().unwrap()), "{name} not listed: {listed}");
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{name} is not a man page");
    }
    let run = std::fs::read_to_string(out.join("vgrid-vm-run.1")).unwrap();
    assert!(run.contains(".TH") && run.contains("run") && run.contains("require"), "vgrid-vm-run(1) lacks its title or options");
    // Without a directory: vgrid(1) on stdout.
    let (top, _) = vgrid(&["man"]);
    assert!(top.contains(".TH vgrid") && top.contains("completions"));
}

/// `vgrid image build-sample` runs the recipe embedded in the binary (with the cache protocol it
/// sources from its own directory), from any working directory: the quick start's way in.
/// The guest is the one the suite boots, so it is normally cached and this takes a second.
#[test]
fn build_sample_runs_the_embedded_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(vgrid_bin()).args(["image", "build-sample", "--no-import"]).current_dir(dir.path()).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "vgrid image build-sample --no-import: {err}");
    let built = err.lines().find_map(|l| l.strip_prefix("sample guest in ")).unwrap_or_else(|| panic!("no directory named: {err}"));
    for f in ["vmlinuz", "initrd.img", "disk.img", "cmdline", "stamp"] {
        let p = std::path::Path::new(built).join(f);
        assert!(p.metadata().is_ok_and(|m| m.len() > 0), "{} is missing or empty", p.display());
    }
}
