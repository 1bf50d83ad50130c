//! Site networks with real guests: a bridge playing the farm's LAN, a network namespace playing
//! its router (10.20.0.1), `vgrid up` attached to the network, sample guests that take their
//! address by DHCP (busybox udhcpc) from the host's responder, ping each other and the router,
//! and cannot send with another address or MAC (the nft bridge filter drops and counts it); a
//! suspended and resumed guest keeps its address. Needs root, iproute2 and nftables (installed
//! by scripts/install-deps.sh). Everything it makes (bridge, veth, namespace, taps, the nft
//! table) is removed at the end, also when it fails.

mod common;

use common::lan::*;
use common::*;
use std::time::Duration;

/// The farm's LAN: bridge `br`, and namespace `ns` on it through a veth, with the router's
/// address. Removed on drop (also when the test fails), with any tap left on the bridge and
/// the agent's nft table once no guest is in it.
struct Lan {
    br: String,
    ns: String,
    /// The tests of this file take turns: they share the agent's nft table (`bridge vgrid`),
    /// the router's subnet and the device names made from the process id.
    _turn: std::sync::MutexGuard<'static, ()>,
}

static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Lan {
    fn new() -> Lan {
        let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let tag = std::process::id() % 100_000;
        let lan = Lan { br: format!("vgtb{tag}"), ns: format!("vgsite{tag}"), _turn: turn };
        must(&format!("ip link add {} type bridge && ip link set {} up", lan.br, lan.br));
        must(&format!("ip netns add {}", lan.ns));
        must(&format!("ip link add vgv{tag}a type veth peer name vgv{tag}b && ip link set vgv{tag}a master {} up", lan.br));
        must(&format!("ip link set vgv{tag}b netns {ns} && ip -n {ns} link set vgv{tag}b name eth0", ns = lan.ns));
        must(&format!(
            "ip -n {ns} addr add 10.20.0.1/24 dev eth0 && ip -n {ns} link set eth0 up && ip -n {ns} link set lo up",
            ns = lan.ns
        ));
        lan
    }

    /// Runs `cmd` in the router's namespace.
    fn exec(&self, cmd: &str) -> std::process::Output {
        sh(&format!("ip netns exec {} {cmd}", self.ns))
    }

    /// The taps on the bridge (the guests' interfaces).
    fn taps(&self) -> Vec<String> {
        let o = sh(&format!("ip -o link show master {}", self.br));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("vgt"))
            .collect()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for tap in self.taps() {
            let _ = sh(&format!("nft delete element bridge vgrid guests '{{ \"{tap}\" }}'; nft delete chain bridge vgrid g-{tap}"));
            let _ = sh(&format!("ip link del {tap}"));
        }
        let _ = sh(&format!("ip netns del {}", self.ns));
        let _ = sh(&format!("ip link del {}", self.br));
        let map = sh("nft list map bridge vgrid guests");
        if map.status.success() && !String::from_utf8_lossy(&map.stdout).contains("elements") {
            let _ = sh("nft delete table bridge vgrid");
        }
    }
}

fn address(vm: &serde_json::Value) -> String {
    vm["config"]["net"]["nics"][0]["address"].as_str().unwrap_or_default().to_string()
}

/// What the nft filter of the tap of the VM whose runtime directory is `dir` dropped, in packets.
fn dropped(lan: &Lan, before: &[String]) -> u64 {
    let mut total = 0;
    for tap in lan.taps().iter().filter(|t| !before.contains(t)) {
        let o = sh(&format!("nft list chain bridge vgrid g-{tap}"));
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            if let Some(n) = l.split("counter packets ").nth(1).and_then(|r| r.split_whitespace().next()) {
                total += n.parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// Defines network `farm` (two addresses), after bad definitions are refused with their reason.
fn define_farm(up: &Up) {
    let o = up.cli(&["net", "create", "bad", "--cidr", "10.20.0.0/24", "--range", "10.20.0.100-10.20.1.5"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not inside 10.20.0.0/24"), "{o:?}");
    up.ok(&["net", "create", "farm", "--cidr", "10.20.0.0/24", "--range", "10.20.0.100-10.20.0.101", "--gateway", "10.20.0.1"]);
    let o = up.cli(&["net", "create", "farm2", "--cidr", "10.20.0.0/16", "--range", "10.20.5.2-10.20.5.9"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("overlaps site network \"farm\""), "{o:?}");
    up.wait_until("the host to advertise network farm", Duration::from_secs(30), || {
        up.json(&["net", "show", "farm"])["hosts"].as_array().is_some_and(|h| h.len() == 1)
    });
}

/// `vgrid up` as host h1 and a second host agent h2, both attached to network `farm` (ten
/// addresses) on `lan`'s bridge, the DHCP sample imported. Returns them and h2's arguments
/// (to start it again).
fn two_host_farm(lan: &Lan) -> (Up, Vec<String>, Role) {
    let network = format!("farm={}", lan.br);
    let up = Up::start_with(&["--network", &network, "--name", "h1", "--heartbeat-interval", "1"]);
    let h2_data = up.data_dir().join("h2");
    let h2_args: Vec<String> = ["host", "--coordinator", &up.url, "--listen", "127.0.0.1:0", "--name", "h2", "--data-dir"]
        .iter()
        .map(|a| a.to_string())
        .chain([h2_data.to_str().unwrap().to_string(), "--network".into(), network])
        .collect();
    let h2 = Role::start(&h2_args.iter().map(String::as_str).collect::<Vec<_>>(), up.data_dir().join("h2.log"));
    import_dhcp_sample(&up);
    up.ok(&["net", "create", "farm", "--cidr", "10.20.0.0/24", "--range", "10.20.0.100-10.20.0.109", "--gateway", "10.20.0.1"]);
    up.wait_until("both hosts to advertise network farm", Duration::from_secs(30), || {
        up.json(&["net", "show", "farm"])["hosts"].as_array().is_some_and(|h| h.len() == 2)
    });
    (up, h2_args, h2)
}

/// Guest `id` (tap among those not in `others`) takes another address, then another MAC: the
/// filter drops what it sends (and counts it); with its own address back, it reaches the
/// router again.
fn spoofing_is_dropped(dir: &std::path::Path, lan: &Lan, addr: &str, others: &[String]) {
    let before = dropped(lan, others);
    guest_at(
        dir,
        "ip addr flush dev eth0; ip addr add 10.20.0.150/24 dev eth0; ping -c 3 -W 2 10.20.0.1 >/dev/null || echo SPOOF-IP-DROP''PED",
        "SPOOF-IP-DROPPED",
    );
    let after_ip = dropped(lan, others);
    assert!(after_ip > before, "the filter counted no dropped packet ({before} -> {after_ip})");
    let neigh = String::from_utf8_lossy(&lan.exec("ip neigh").stdout).into_owned();
    assert!(!neigh.contains("10.20.0.150 dev eth0 lladdr"), "the router learnt the spoofed address: {neigh}");
    // Its own address back: it reaches the router (the filter, not the guest, dropped the rest).
    guest_at(
        dir,
        &format!("ip addr flush dev eth0; ip addr add {addr}/24 dev eth0; ping -c 2 -W 5 10.20.0.1 >/dev/null && echo OWN-IP-O''K"),
        "OWN-IP-OK",
    );
    guest_at(
        dir,
        "ip link set eth0 down; ip link set eth0 address 02:00:00:00:00:99; ip link set eth0 up; \
         ping -c 3 -W 2 10.20.0.1 >/dev/null || echo SPOOF-MAC-DROP''PED",
        "SPOOF-MAC-DROPPED",
    );
    let after_mac = dropped(lan, others);
    assert!(after_mac > after_ip, "the filter counted no dropped frame with the spoofed MAC ({after_ip} -> {after_mac})");
}

#[test]
fn site_network_guests_get_leased_addresses_reach_each_other_and_cannot_spoof() {
    if skip_unless_root() {
        return;
    }
    let lan = Lan::new();
    let up = Up::start_with(&["--network", &format!("farm={}", lan.br)]);
    import_dhcp_sample(&up);
    define_farm(&up);

    // Two guests: each gets the address its record holds, by DHCP from the host.
    let a = up.run_vm("netsample", "a", NET_UP, &["--net", "site:farm"]);
    let taps_a = lan.taps();
    let b = up.run_vm("netsample", "b", NET_UP, &["--net", "site:farm"]);
    let (ida, idb) = (a["id"].as_str().unwrap().to_string(), b["id"].as_str().unwrap().to_string());
    let (addr_a, addr_b) = (address(&up.vm(&ida)), address(&up.vm(&idb)));
    let mut both = [addr_a.clone(), addr_b.clone()];
    both.sort();
    assert_eq!(both, ["10.20.0.100", "10.20.0.101"]);
    assert!(console(&up, &ida).contains(&format!("{NET_UP} {addr_a}")), "{}", console(&up, &ida));
    assert!(console(&up, &idb).contains(&format!("{NET_UP} {addr_b}")), "{}", console(&up, &idb));
    let ls = up.ok(&["vm", "ls"]);
    assert!(ls.contains(&addr_a) && ls.contains(&addr_b), "{ls}");
    let show = up.ok(&["vm", "show", &ida]);
    assert!(show.contains("site:farm mac 02:") && show.contains(&format!("address {addr_a}")), "{show}");

    // The pool has two addresses: a third VM is refused, naming the network.
    let o = up.cli(&["vm", "run", "netsample", "--name", "c", "--net", "site:farm", "--no-wait"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("network \"farm\" has no free address"), "{err}");

    // They reach each other and the site's router; the router reaches them.
    guest(&up, &ida, &format!("ping -c 2 -W 5 {addr_b} >/dev/null && echo PING-B-O''K"), "PING-B-OK");
    guest(&up, &idb, "ping -c 2 -W 5 10.20.0.1 >/dev/null && echo PING-GW-O''K", "PING-GW-OK");
    let o = lan.exec(&format!("busybox ping -c 2 -W 5 {addr_a}"));
    assert!(o.status.success(), "router -> a: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));

    spoofing_is_dropped(&up.runtime_dir(&idb), &lan, &addr_b, &taps_a);

    // `vm rm` frees the address and the host's tap; the network then has one lease.
    let taps_before = lan.taps().len();
    up.ok(&["vm", "rm", "--force", &idb]);
    let net = up.json(&["net", "show", "farm"]);
    assert_eq!(net["leases"].as_array().map(|l| l.len()), Some(1), "{net}");
    assert_eq!(net["free"], 1, "{net}");
    assert_eq!(lan.taps().len() + 1, taps_before, "b's tap is removed with it");
    // A network in use is not removed.
    let o = up.cli(&["net", "rm", "farm"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("in use by 1 VM(s)"), "{o:?}");

    // Suspended and resumed, a keeps its address (the record's), and the router reaches it.
    let s = up.json(&["vm", "suspend", &ida]);
    assert_eq!(s["vm"]["state"], "suspended", "{s}");
    assert_eq!(address(&up.vm(&ida)), addr_a);
    assert_eq!(up.json(&["net", "show", "farm"])["free"], 1, "a suspended VM keeps its lease");
    let r = up.json(&["vm", "resume", &ida, "--timeout", "300"]);
    assert_eq!(r["state"], "running", "{r}");
    assert_eq!(address(&r), addr_a);
    up.wait_until("the router to reach a after its resume", Duration::from_secs(60), || {
        lan.exec(&format!("busybox ping -c 1 -W 2 {addr_a}")).status.success()
    });

    up.ok(&["vm", "rm", "--force", &ida]);
    up.ok(&["net", "rm", "farm"]);
    assert!(lan.taps().is_empty(), "taps left: {:?}", lan.taps());
}

/// A guest migrated live to a second host agent attached to the same network (through the
/// same bridge) keeps its address and MAC: the destination serves its lease and filters its
/// tap before the switchover, the source's tap goes, and the router reaches it on the new host.
#[test]
fn a_site_network_guest_migrated_to_another_host_keeps_its_address() {
    if skip_unless_root() {
        return;
    }
    let lan = Lan::new();
    let (up, _, h2) = two_host_farm(&lan);
    let v = up.run_vm("netsample", "m", NET_UP, &["--net", "site:farm", "--require", "host.name == \"h1\""]);
    let id = v["id"].as_str().unwrap().to_string();
    let (addr, mac) = (address(&up.vm(&id)), up.vm(&id)["config"]["net"]["nics"][0]["mac"].clone());
    assert!(lan.exec(&format!("busybox ping -c 2 -W 5 {addr}")).status.success(), "router -> guest on h1");

    let v = migrate_to(&up, &id, "h2");
    assert_eq!(address(&v), addr);
    assert_eq!(v["config"]["net"]["nics"][0]["mac"], mac);
    up.wait_until("the source's tap to go", Duration::from_secs(30), || lan.taps().len() == 1);
    up.wait_until("the router to reach the guest on h2", Duration::from_secs(60), || {
        lan.exec(&format!("busybox ping -c 1 -W 2 {addr}")).status.success()
    });
    // No reboot on the destination (the guest kept its configuration; no new boot).
    let dst = up.data_dir().join("h2").join("vms").join(&id);
    let log = String::from_utf8_lossy(&std::fs::read(dst.join("console.log")).unwrap_or_default()).into_owned();
    assert!(!log.contains(NET_UP), "the guest booted again on h2:\n{log}");
    up.ok(&["vm", "rm", "--force", &id]);
    up.wait_until("the tap to go with the VM", Duration::from_secs(30), || lan.taps().is_empty());
    drop(h2);
}

/// The site-network fault of the suite (`scripts/faults net-agent-kill`): a host agent with a
/// guest on a site network is SIGKILLed and started again (same name and data directory). The
/// guest must be re-adopted (same QEMU, running, on the same host) and keep everything the
/// network gave it: its address and lease (the record's, the network's count), its tap on the
/// bridge, its DHCP lease served again (the guest asks anew and gets the same address from the
/// restarted agent's responder), its anti-spoofing filter (spoofing is still dropped), and it
/// still reaches the guest on the other host and the router.
#[test]
fn a_site_network_guest_keeps_its_network_when_its_agent_is_killed_and_restarted() {
    if skip_unless_root() {
        return;
    }
    let lan = Lan::new();
    let (up, h2_args, mut h2) = two_host_farm(&lan);
    let h2_args: Vec<&str> = h2_args.iter().map(String::as_str).collect();
    let a = up.run_vm("netsample", "a", NET_UP, &["--net", "site:farm", "--require", "host.name == \"h1\""]);
    let taps_a = lan.taps();
    let b = up.run_vm("netsample", "b", NET_UP, &["--net", "site:farm", "--require", "host.name == \"h2\""]);
    let (ida, idb) = (a["id"].as_str().unwrap().to_string(), b["id"].as_str().unwrap().to_string());
    let dir_b = up.data_dir().join("h2").join("vms").join(&idb);
    let (addr_a, addr_b) = (address(&up.vm(&ida)), address(&up.vm(&idb)));
    let tap_b: Vec<String> = lan.taps().into_iter().filter(|t| !taps_a.contains(t)).collect();
    assert_eq!(tap_b.len(), 1, "b's tap: {tap_b:?}");
    let pid_b = up.vm(&idb)["pid"].as_u64().expect("b's QEMU pid");
    guest_at(&dir_b, &format!("ping -c 2 -W 5 {addr_a} >/dev/null && echo PING-A-O''K"), "PING-A-OK");

    // SIGKILL, a second without an agent, then the same agent again.
    h2.kill();
    let t0 = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    assert!(process_alive(pid_b), "b's QEMU died with its agent");
    let mut h2 = Role::start(&h2_args, up.data_dir().join("h2-2.log"));
    up.wait_until("b re-adopted and running on h2", Duration::from_secs(60), || {
        let v = up.vm(&idb);
        v["state"] == "running"
            && v["host"] == "h2"
            && std::fs::read_to_string(&h2.log).unwrap_or_default().contains("re-adopted running QEMU")
    });
    let readopted = t0.elapsed();
    let v = up.vm(&idb);
    assert_eq!(v["pid"].as_u64(), Some(pid_b), "the same QEMU: {v}");
    assert_eq!(address(&v), addr_b, "b's address in its record");
    let net = up.json(&["net", "show", "farm"]);
    assert_eq!(net["leases"].as_array().map(|l| l.len()), Some(2), "both leases kept: {net}");
    assert_eq!(lan.taps(), [taps_a.clone(), tap_b.clone()].concat(), "the taps on the bridge");
    let chain = sh(&format!("nft list chain bridge vgrid g-{}", tap_b[0]));
    assert!(chain.status.success(), "b's filter chain is gone: {}", String::from_utf8_lossy(&chain.stderr));

    // The restarted agent serves b's lease (its responder took it back once the heartbeat's
    // answer brought the network's definition): asked anew, the guest gets the same address.
    up.wait_until("the restarted agent to serve b's lease", Duration::from_secs(30), || {
        std::fs::read_to_string(&h2.log).unwrap_or_default().lines().any(|l| l.contains("DHCP lease served") && l.contains(&addr_b))
    });
    let line = guest_at(
        &dir_b,
        "rm -f /tmp/net-addr; udhcpc -i eth0 -q -n -t 10 -T 1 -s /bin/udhcpc.script >/dev/null 2>&1; echo LEASE-AGA''IN $(cat /tmp/net-addr)",
        "LEASE-AGAIN",
    );
    assert!(line.contains(&format!("LEASE-AGAIN {addr_b}")), "DHCP after the restart: {line:?}\n{}", tail_of(&h2.log));
    // Both ways between the guests and to the router; the router reaches b.
    guest_at(&dir_b, &format!("ping -c 2 -W 5 {addr_a} >/dev/null && echo PING-A-AGAIN-O''K"), "PING-A-AGAIN-OK");
    guest(&up, &ida, &format!("ping -c 2 -W 5 {addr_b} >/dev/null && echo PING-B-AGAIN-O''K"), "PING-B-AGAIN-OK");
    let o = lan.exec(&format!("busybox ping -c 2 -W 5 {addr_b}"));
    assert!(o.status.success(), "router -> b after the restart: {}", String::from_utf8_lossy(&o.stdout));
    // The filter still drops what b sends with another address or MAC.
    spoofing_is_dropped(&dir_b, &lan, &addr_b, &taps_a);
    figures(
        "net-agent-kill",
        &format!(
            "agent of h2 SIGKILLed with guest b on site network farm ({addr_b}, tap {}); re-adopted {:.1}s after the kill (same QEMU pid {pid_b}); lease, tap and filter kept; DHCP answered {addr_b} again; pings b<->a and router->b OK; spoofed address and MAC dropped",
            tap_b[0],
            readopted.as_secs_f64()
        ),
    );
    up.ok(&["vm", "rm", "--force", &idb]);
    up.ok(&["vm", "rm", "--force", &ida]);
    up.wait_until("the taps to go with the VMs", Duration::from_secs(30), || lan.taps().is_empty());
    h2.terminate();
}
