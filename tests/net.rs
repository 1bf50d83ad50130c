//! Site networks with real guests: a bridge playing the farm's LAN, a network namespace playing
//! its router (10.20.0.1), `vgrid up` attached to the network, sample guests that take their
//! address by DHCP (busybox udhcpc) from the host's responder, ping each other and the router,
//! and cannot send with another address or MAC. Needs root, iproute2 and nftables (installed by
//! scripts/install-deps.sh).

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const NET_UP: &str = "vgrid-sample: net up";

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").arg("-c").arg(cmd).output().expect("sh")
}

fn must(cmd: &str) {
    let o = sh(cmd);
    assert!(o.status.success(), "{cmd}: {}", String::from_utf8_lossy(&o.stderr));
}

/// The farm's LAN: bridge `br`, and namespace `ns` on it through a veth, with the router's
/// address. Removed on drop (also when the test fails).
struct Lan {
    br: String,
    ns: String,
}

impl Lan {
    fn new() -> Lan {
        let tag = std::process::id() % 100_000;
        let lan = Lan { br: format!("vgtb{tag}"), ns: format!("vgsite{tag}") };
        must(&format!("ip link add {} type bridge && ip link set {} up", lan.br, lan.br));
        must(&format!("ip netns add {}", lan.ns));
        must(&format!("ip link add vgv{tag}a type veth peer name vgv{tag}b && ip link set vgv{tag}a master {} up", lan.br));
        must(&format!("ip link set vgv{tag}b netns {ns} && ip -n {ns} link set vgv{tag}b name eth0", ns = lan.ns));
        must(&format!("ip -n {ns} addr add 10.20.0.1/24 dev eth0 && ip -n {ns} link set eth0 up && ip -n {ns} link set lo up", ns = lan.ns));
        lan
    }

    /// Runs `cmd` in the router's namespace.
    fn exec(&self, cmd: &str) -> std::process::Output {
        sh(&format!("ip netns exec {} {cmd}", self.ns))
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = sh(&format!("ip netns del {}", self.ns));
        let _ = sh(&format!("ip link del {}", self.br));
    }
}

/// Imports the sample guest as `netsample`, booting with DHCP on eth0.
fn import_dhcp_sample(up: &Up) {
    let g = sample_guest().expect("sample guest");
    let cmdline = format!("{} vgrid.net=dhcp", g.cmdline);
    up.ok(&[
        "image",
        "import",
        g.disk.to_str().unwrap(),
        "--name",
        "netsample",
        "--kernel",
        g.kernel.to_str().unwrap(),
        "--initrd",
        g.initrd.to_str().unwrap(),
        "--cmdline",
        &cmdline,
        "--public",
    ]);
}

fn address(vm: &serde_json::Value) -> String {
    vm["config"]["net"]["nics"][0]["address"].as_str().unwrap_or_default().to_string()
}

fn console(up: &Up, id: &str) -> String {
    String::from_utf8_lossy(&std::fs::read(up.runtime_dir(id).join("console.log")).unwrap_or_default()).replace('\r', "")
}

#[test]
fn site_network_guests_get_leased_addresses_reach_each_other_and_cannot_spoof() {
    if !nix::unistd::Uid::effective().is_root() || Command::new("nft").arg("--version").output().is_err() {
        eprintln!("skipped: needs root and nftables (scripts/install-deps.sh installs it)");
        return;
    }
    let lan = Lan::new();
    let up = Up::start_with(&["--network", &format!("farm={}", lan.br)]);
    import_dhcp_sample(&up);

    // Bad definitions are refused with the reason; a good one is listed with its host.
    let o = up.cli(&["net", "create", "bad", "--cidr", "10.20.0.0/24", "--range", "10.20.0.100-10.20.1.5"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not inside 10.20.0.0/24"), "{o:?}");
    up.ok(&["net", "create", "farm", "--cidr", "10.20.0.0/24", "--range", "10.20.0.100-10.20.0.101", "--gateway", "10.20.0.1"]);
    let o = up.cli(&["net", "create", "farm2", "--cidr", "10.20.0.0/16", "--range", "10.20.5.2-10.20.5.9"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("overlaps site network \"farm\""), "{o:?}");
    up.wait_until("the host to advertise network farm", Duration::from_secs(30), || {
        up.json(&["net", "show", "farm"])["hosts"].as_array().is_some_and(|h| h.len() == 1)
    });

    // Two guests: each gets the address its record holds, by DHCP from the host.
    let a = up.run_vm("netsample", "a", NET_UP, &["--net", "site:farm"]);
    let b = up.run_vm("netsample", "b", NET_UP, &["--net", "site:farm"]);
    let (ida, idb) = (a["id"].as_str().unwrap().to_string(), b["id"].as_str().unwrap().to_string());
    let (addr_a, addr_b) = (address(&up.vm(&ida)), address(&up.vm(&idb)));
    let mut both = [addr_a.clone(), addr_b.clone()];
    both.sort();
    assert_eq!(both, ["10.20.0.100", "10.20.0.101"]);
    assert!(console(&up, &ida).contains(&format!("{NET_UP} {addr_a}")), "{}", console(&up, &ida));
    assert!(console(&up, &idb).contains(&format!("{NET_UP} {addr_b}")), "{}", console(&up, &idb));
    let ls = String::from_utf8_lossy(&up.cli(&["vm", "ls"]).stdout).into_owned();
    assert!(ls.contains(&addr_a) && ls.contains(&addr_b), "{ls}");

    // The pool has two addresses: a third VM is refused, naming the network.
    let o = up.cli(&["vm", "run", "netsample", "--name", "c", "--net", "site:farm", "--no-wait"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("network \"farm\" has no free address"), "{err}");

    // They reach each other and the site's router; the router reaches them.
    console_exec(&up, &ida, &format!("ping -c 2 -W 5 {addr_b} && echo PING-B-OK"), "PING-B-OK");
    console_exec(&up, &idb, "ping -c 2 -W 5 10.20.0.1 && echo PING-GW-OK", "PING-GW-OK");
    let o = lan.exec(&format!("ping -c 2 -W 5 {addr_a}"));
    assert!(o.status.success(), "router -> a: {}", String::from_utf8_lossy(&o.stdout));

    // b takes another address: its packets are dropped (no answer), and with another MAC too.
    console_exec(
        &up,
        &idb,
        "ip addr flush dev eth0; ip addr add 10.20.0.150/24 dev eth0; ping -c 3 -W 2 10.20.0.1 || echo SPOOF-IP-DROPPED",
        "SPOOF-IP-DROPPED",
    );
    console_exec(
        &up,
        &idb,
        &format!(
            "ip addr flush dev eth0; ip link set eth0 down; ip link set eth0 address 02:00:00:00:00:99; ip link set eth0 up; \
             ip addr add {addr_b}/24 dev eth0; ping -c 3 -W 2 10.20.0.1 || echo SPOOF-MAC-DROPPED"
        ),
        "SPOOF-MAC-DROPPED",
    );
    // The router never learnt the spoofed address.
    let neigh = String::from_utf8_lossy(&lan.exec("ip neigh").stdout).into_owned();
    assert!(!neigh.contains("10.20.0.150 dev eth0 lladdr"), "{neigh}");

    // `vm rm` frees the address and the host's tap; the network then has one lease.
    let taps_before = std::fs::read_dir("/sys/class/net").unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("vgt")).count();
    up.ok(&["vm", "rm", "--force", &idb]);
    let net = up.json(&["net", "show", "farm"]);
    assert_eq!(net["leases"].as_array().map(|l| l.len()), Some(1), "{net}");
    assert_eq!(net["free"], 1, "{net}");
    let taps_after = std::fs::read_dir("/sys/class/net").unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("vgt")).count();
    assert_eq!(taps_after + 1, taps_before, "b's tap is removed with it");
    // A network in use is not removed.
    let o = up.cli(&["net", "rm", "farm"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("in use by 1 VM(s)"), "{o:?}");
    up.ok(&["vm", "rm", "--force", &ida]);
    up.ok(&["net", "rm", "farm"]);
}
