//! The anti-spoofing filter of guests' taps, in nftables' bridge family (as OpenNebula's and
//! Incus's): table `bridge vgrid`, a verdict map from tap to that tap's chain, hooked before
//! the bridge forwards a frame or delivers it to the host. A guest's frames must carry its
//! MAC; its ARP its address (or 0.0.0.0: a probe), its IPv4 packets its address (or 0.0.0.0 to
//! the DHCP server's port, while it asks for its lease); anything else from it (another's MAC
//! or address, IPv6, which site networks do not lease, VLAN tags, other protocols) is dropped,
//! and counted (`nft list chain bridge vgrid g-TAP`).

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use vgrid_api::net::MacAddr;

use crate::NetError;

const TABLE: &str = "bridge vgrid";

/// Runs an nft script.
fn nft(what: &str, script: &str) -> Result<(), NetError> {
    let spawn = |source| NetError::Spawn { what: what.to_string(), program: "nft".into(), package: "nftables", source };
    let mut child =
        Command::new("nft").arg("-f").arg("-").stdin(Stdio::piped()).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().map_err(spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if !out.status.success() {
        return Err(NetError::Command {
            what: what.to_string(),
            cmd: format!("nft -f - <<'EOF'\n{script}EOF"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Whether nft works here (the agent refuses site networks without it: a guest could take
/// another's address).
pub fn available() -> Result<(), NetError> {
    crate::run("checking nftables", "nft", "nftables", &["list", "tables"]).map(|_| ())
}

/// Makes the table, its map and its hooks if they are missing.
fn ensure_table() -> Result<(), NetError> {
    if crate::run("nftables", "nft", "nftables", &["list", "table", "bridge", "vgrid"]).is_ok() {
        return Ok(());
    }
    nft(
        "making nftables table bridge vgrid",
        &format!(
            "table {TABLE} {{\n\
             \tmap guests {{ type ifname : verdict ; }}\n\
             \tchain forward {{ type filter hook forward priority -200; policy accept; iifname vmap @guests; }}\n\
             \tchain input {{ type filter hook input priority -200; policy accept; iifname vmap @guests; }}\n\
             }}\n"
        ),
    )
}

fn chain(tap: &str) -> String {
    format!("g-{tap}")
}

/// Lets frames from `tap` through only with source MAC `mac` and source address `addr`.
pub fn guard(tap: &str, mac: MacAddr, addr: Ipv4Addr) -> Result<(), NetError> {
    ensure_table()?;
    let c = chain(tap);
    nft(
        &format!("anti-spoofing filter of tap {tap} ({mac}, {addr})"),
        &format!(
            "add chain {TABLE} {c}\n\
             flush chain {TABLE} {c}\n\
             add rule {TABLE} {c} ether saddr != {mac} counter drop\n\
             add rule {TABLE} {c} ether type arp arp saddr ether != {mac} counter drop\n\
             add rule {TABLE} {c} ether type arp arp saddr ip != {{ {addr}, 0.0.0.0 }} counter drop\n\
             add rule {TABLE} {c} ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept\n\
             add rule {TABLE} {c} ether type ip ip saddr != {addr} counter drop\n\
             add rule {TABLE} {c} ether type != {{ ip, arp }} counter drop\n\
             add element {TABLE} guests {{ \"{tap}\" : jump {c} }}\n"
        ),
    )
}

/// Removes `tap`'s filter (nothing when it has none).
pub fn unguard(tap: &str) -> Result<(), NetError> {
    if crate::run("nftables", "nft", "nftables", &["list", "chain", "bridge", "vgrid", &chain(tap)]).is_err() {
        return Ok(());
    }
    let c = chain(tap);
    // The map element first: a chain something jumps to cannot be deleted.
    let _ = nft("nftables", &format!("delete element {TABLE} guests {{ \"{tap}\" }}\n"));
    nft(&format!("removing the filter of tap {tap}"), &format!("delete chain {TABLE} {c}\n"))
}
