//! Helpers of the network tests (tests/net.rs: site networks; tests/tunnel.rs: tunnel
//! networks): shell commands, the DHCP sample image, typing on a guest's console.

use super::*;
use std::process::Command;
use std::time::Duration;

/// What the DHCP sample prints once its DHCP client configured eth0 (then its address).
pub const NET_UP: &str = "vgrid-sample: net up";

pub fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").arg("-c").arg(cmd).output().expect("sh")
}

pub fn must(cmd: &str) {
    let o = sh(cmd);
    assert!(o.status.success(), "{cmd}: {}", String::from_utf8_lossy(&o.stderr));
}

/// Imports the sample guest as `netsample`, booting with DHCP on eth0.
pub fn import_dhcp_sample(up: &Up) {
    up.import_sample_as("netsample", "vgrid.net=dhcp");
}

pub fn console(up: &Up, id: &str) -> String {
    String::from_utf8_lossy(&std::fs::read(up.runtime_dir(id).join("console.log")).unwrap_or_default()).replace('\r', "")
}

/// Types `cmd` on the guest's shell and returns the first line after it with `until` (write
/// the marker split in `cmd`, e.g. `echo PING-O''K`, so that the echo of the typed line does
/// not count).
pub fn guest(up: &Up, id: &str, cmd: &str, until: &str) -> String {
    guest_at(&up.runtime_dir(id), cmd, until)
}

/// [`guest`] for the VM whose runtime directory is `dir` (on any host of the test).
pub fn guest_at(dir: &std::path::Path, cmd: &str, until: &str) -> String {
    console_line(dir, PROMPT, cmd, until, Duration::from_secs(90)).unwrap_or_else(|e| panic!("VM in {}: {e}", dir.display()))
}

pub fn skip_unless_root() -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: site networks need root (bridges, taps, nftables)");
        return true;
    }
    assert!(sh("nft list tables").status.success(), "nft does not work here: run scripts/install-deps.sh (it installs nftables)");
    false
}

/// The last lines of a log file, for assertion messages.
pub fn tail_of(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// `vm migrate ID --to HOST`, which must succeed; returns the VM's record, running on HOST.
pub fn migrate_to(up: &Up, id: &str, host: &str) -> serde_json::Value {
    let o = up.cli(&["vm", "migrate", id, "--to", host, "--timeout", "240"]);
    assert!(
        o.status.success(),
        "migration failed: {}{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        up.log_tail()
    );
    let v = up.vm(id);
    assert_eq!((v["state"].as_str(), v["host"].as_str()), (Some("running"), Some(host)), "{v}");
    v
}
