//! Site networks with real guests: a bridge playing the farm's LAN, a network namespace playing
//! its router (10.20.0.1), `vgrid up` attached to the network, sample guests that take their
//! address by DHCP (busybox udhcpc) from the host's responder, ping each other and the router,
//! and cannot send with another address or MAC (the nft bridge filter drops and counts it); a
//! suspended and resumed guest keeps its address. Needs root, iproute2 and nftables (installed
//! by scripts/install-deps.sh). Everything it makes (bridge, veth, namespace, taps, the nft
//! table) is removed at the end, also when it fails.

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

/// Types `cmd` on the guest's shell and returns the first line after it with `until` (write
/// the marker split in `cmd`, e.g. `echo PING-O''K`, so that the echo of the typed line does
/// not count).
fn guest(up: &Up, id: &str, cmd: &str, until: &str) -> String {
    guest_at(&up.runtime_dir(id), cmd, until)
}

/// [`guest`] for the VM whose runtime directory is `dir` (on any host of the test).
fn guest_at(dir: &std::path::Path, cmd: &str, until: &str) -> String {
    console_line(dir, PROMPT, cmd, until, Duration::from_secs(90)).unwrap_or_else(|e| panic!("VM in {}: {e}", dir.display()))
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

fn skip_unless_root() -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: site networks need root (bridges, taps, nftables)");
        return true;
    }
    assert!(sh("nft list tables").status.success(), "nft does not work here: run scripts/install-deps.sh (it installs nftables)");
    false
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

    let o = up.cli(&["vm", "migrate", &id, "--to", "h2", "--timeout", "240"]);
    assert!(
        o.status.success(),
        "migration failed: {}{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        up.log_tail()
    );
    let v = up.vm(&id);
    assert_eq!((v["state"].as_str(), v["host"].as_str()), (Some("running"), Some("h2")), "{v}");
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

/// A user's own LAN: namespace `ns` with bridge `br0` (192.168.`net`.1/24) and busybox
/// `udhcpd` handing out 192.168.`net`.100-109 on it. Removed on drop, also when the test fails.
struct UserLan {
    ns: String,
    net: u8,
    dir: tempfile::TempDir,
    dhcpd: std::process::Child,
}

impl UserLan {
    fn new(net: u8) -> UserLan {
        let ns = format!("vgu{net}-{}", std::process::id() % 100_000);
        must(&format!("ip netns add {ns}"));
        must(&format!(
            "ip -n {ns} link add br0 type bridge && ip -n {ns} addr add 192.168.{net}.1/24 dev br0 && ip -n {ns} link set br0 up && ip -n {ns} link set lo up"
        ));
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("udhcpd.conf");
        let leases = dir.path().join("leases");
        std::fs::write(
            &conf,
            format!(
                "start 192.168.{net}.100\nend 192.168.{net}.109\ninterface br0\nlease_file {}\noption subnet 255.255.255.0\noption router 192.168.{net}.1\n",
                leases.display()
            ),
        )
        .unwrap();
        std::fs::write(&leases, b"").unwrap();
        let dhcpd = Command::new("ip")
            .args(["netns", "exec", &ns, "busybox", "udhcpd", "-f"])
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("udhcpd.log")).unwrap())
            .spawn()
            .expect("busybox udhcpd");
        UserLan { ns, net, dir, dhcpd }
    }

    fn exec(&self, cmd: &str) -> std::process::Output {
        sh(&format!("ip netns exec {} {cmd}", self.ns))
    }

    fn pings(&self, addr: &str) -> bool {
        self.exec(&format!("busybox ping -c 2 -W 5 {addr}")).status.success()
    }

    /// Counts the frames that come out of the tunnel's tap `tap` into this LAN: those with a
    /// source MAC in `own` (this user's guests) and those with one in `foreign` (another user's
    /// guests and LAN), each as a counter of an nft netdev ingress chain on the tap.
    fn count_frames(&self, tap: &str, own: &[String], foreign: &[String]) {
        let set = |m: &[String]| m.join(", ");
        must(&format!(
            "ip netns exec {ns} nft -f - <<'EOF'\ntable netdev vgcount {{\n chain in {{\n  type filter hook ingress device \"{tap}\" priority 0;\n  ether saddr {{ {own} }} counter comment \"own\"\n  ether saddr {{ {foreign} }} counter comment \"foreign\"\n }}\n}}\nEOF",
            ns = self.ns,
            own = set(own),
            foreign = set(foreign)
        ));
    }

    /// The counters of [`UserLan::count_frames`]: (own, foreign) frames.
    fn counted(&self) -> (u64, u64) {
        let o = self.exec("nft list chain netdev vgcount in");
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let count = |what: &str| {
            text.lines()
                .find(|l| l.contains(&format!("comment \"{what}\"")))
                .and_then(|l| l.split("counter packets ").nth(1))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no {what} counter in {text}"))
        };
        (count("own"), count("foreign"))
    }

    /// The MAC of the LAN's bridge (its router's frames carry it).
    fn router_mac(&self) -> String {
        let o = self.exec("cat /sys/class/net/br0/address");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }
}

impl Drop for UserLan {
    fn drop(&mut self) {
        let _ = self.dhcpd.kill();
        let _ = self.dhcpd.wait();
        let _ = sh(&format!("ip netns del {}", self.ns));
    }
}

/// A user of the test: the CLI with their own key (`None`: the grid's admin, as `Up::cli`).
struct User {
    key: Option<(String, std::path::PathBuf, tempfile::TempDir)>,
}

impl User {
    fn admin() -> User {
        User { key: None }
    }

    /// A new user `name` with an SSH key, added by the admin.
    fn add(up: &Up, name: &str) -> User {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        let o = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"]).arg(&key).output().unwrap();
        assert!(o.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&o.stderr));
        up.ok(&["user", "add", name, "--key", &format!("{}.pub", key.display())]);
        User { key: Some((name.to_string(), key, dir)) }
    }

    fn command(&self, up: &Up, args: &[&str]) -> Command {
        let mut c = Command::new(vgrid_bin());
        c.args(args).env("VGRID_URL", &up.url).stdin(std::process::Stdio::null());
        if let Some((name, key, dir)) = &self.key {
            c.env("VGRID_CONFIG_DIR", dir.path().join("cfg")).env("VGRID_KEY", key).env("VGRID_USER", name).env_remove("SSH_AUTH_SOCK");
        }
        c
    }

    fn cli(&self, up: &Up, args: &[&str]) -> std::process::Output {
        self.command(up, args).output().unwrap()
    }

    /// `vm run` of the DHCP sample on tunnel network `net` as this user, on host `host`, up to
    /// its address (one retry, as `Up::run_vm`); returns the VM's id.
    fn run_tunnel_vm(&self, up: &Up, name: &str, net: &str, host: &str) -> String {
        let _slot = boot_slot().expect("boot slot");
        let (net, req) = (format!("tunnel:{net}"), format!("host.name == \"{host}\""));
        let mut last = String::new();
        for attempt in 1..=2 {
            let n = format!("{name}{attempt}");
            let args = [
                "--json",
                "vm",
                "run",
                "netsample",
                "--name",
                &n,
                "--net",
                &net,
                "--require",
                &req,
                "--wait-for",
                NET_UP,
                "--timeout",
                "90",
            ];
            let o = self.cli(up, &args);
            if o.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("vm run --json");
                return v["id"].as_str().unwrap().to_string();
            }
            last = format!("{}{}", String::from_utf8_lossy(&o.stderr), String::from_utf8_lossy(&o.stdout));
            eprintln!("boot attempt {attempt} of {name} failed: {last}");
            let _ = self.cli(up, &["vm", "rm", "--force", &n]);
        }
        panic!("VM {name} did not boot twice: {last}\n{}", up.log_tail());
    }
}

/// `vgrid tunnel NET --bridge br0 --netns NS` as `user`; killed on drop.
struct TunnelCmd {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl TunnelCmd {
    fn start(up: &Up, user: &User, net: &str, lan: &UserLan, n: usize) -> TunnelCmd {
        let log = lan.dir.path().join(format!("tunnel{n}.log"));
        let child = user
            .command(up, &["tunnel", net, "--bridge", "br0", "--netns", &lan.ns])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("vgrid tunnel");
        let t = TunnelCmd { child, log };
        up.wait_until("vgrid tunnel to connect", Duration::from_secs(30), || t.log().contains(&format!("tunnel {net}: connected")));
        t
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TunnelCmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address the guest whose runtime directory is `dir` printed when its DHCP client got one.
fn dhcp_address(dir: &std::path::Path) -> String {
    let c = String::from_utf8_lossy(&std::fs::read(dir.join("console.log")).unwrap_or_default()).replace('\r', "");
    c.split(NET_UP).nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or_default().to_string()
}

fn mac_of(up: &Up, id: &str) -> String {
    up.vm(id)["config"]["net"]["nics"][0]["mac"].as_str().unwrap_or_default().to_string()
}

/// Tunnel networks: alice's LAN (a namespace with a bridge and busybox udhcpd) joined by
/// `vgrid tunnel home --bridge br0`; a guest on h1 takes its address from her DHCP server, pings
/// her router and back; a guest on a second host agent reaches the first and the LAN; `vgrid
/// tunnel` restarted, the traffic resumes; bob's tunnel network (his own LAN and guest) and
/// alice's never see each other's frames, and neither user may join the other's tunnel.
#[test]
fn tunnel_network_guests_join_the_users_lan_through_vgrid_tunnel() {
    if skip_unless_root() {
        return;
    }
    // Its turn among the tests of this file (two booting guests at a time at most).
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let lan = UserLan::new(77);
    let up = Up::start_with(&["--name", "h1", "--heartbeat-interval", "1"]);
    let h2_data = up.data_dir().join("h2");
    let h2 = Role::start(
        &["host", "--coordinator", &up.url, "--listen", "127.0.0.1:0", "--name", "h2", "--data-dir", h2_data.to_str().unwrap()],
        up.data_dir().join("h2.log"),
    );
    import_dhcp_sample(&up);
    let alice = User::admin();
    up.ok(&["net", "create", "home", "--tunnel"]);
    up.wait_until("both hosts to register", Duration::from_secs(30), || up.json(&["host", "ls"]).as_array().is_some_and(|h| h.len() == 2));
    let mut tunnel = TunnelCmd::start(&up, &alice, "home", &lan, 0);

    // A guest on h1 takes its address from the user's DHCP server; they reach each other.
    let ida = alice.run_tunnel_vm(&up, "ta", "home", "h1");
    let addr_a = dhcp_address(&up.runtime_dir(&ida));
    assert!(addr_a.starts_with("192.168.77.10"), "guest a's address {addr_a:?} is not from the user's range:\n{}", console(&up, &ida));
    let show = up.ok(&["vm", "show", &ida]);
    assert!(show.contains("tunnel:home mac 06:"), "{show}");
    guest(&up, &ida, "ping -c 2 -W 5 192.168.77.1 >/dev/null && echo PING-LAN-O''K", "PING-LAN-OK");
    assert!(lan.pings(&addr_a), "user's LAN -> a");

    // A guest on another host agent in the same tunnel reaches the first, and the LAN it.
    let idb = alice.run_tunnel_vm(&up, "tb", "home", "h2");
    let dir_b = up.data_dir().join("h2").join("vms").join(&idb);
    let addr_b = dhcp_address(&dir_b);
    assert!(addr_b.starts_with("192.168.77.10") && addr_b != addr_a, "guest b's address {addr_b:?} (a has {addr_a})");
    guest_at(&dir_b, &format!("ping -c 2 -W 5 {addr_a} >/dev/null && echo PING-A-O''K"), "PING-A-OK");
    assert!(lan.pings(&addr_b), "user's LAN -> b");

    // `vgrid tunnel` restarted: the user's LAN reaches the guests again.
    drop(tunnel);
    assert!(!lan.exec(&format!("busybox ping -c 1 -W 2 {addr_a}")).status.success(), "a reachable without the tunnel");
    tunnel = TunnelCmd::start(&up, &alice, "home", &lan, 1);
    up.wait_until("the user's LAN to reach a through the new tunnel", Duration::from_secs(60), || {
        lan.exec(&format!("busybox ping -c 1 -W 2 {addr_a}")).status.success()
    });
    assert!(lan.pings(&addr_b), "user's LAN -> b after the restart");

    let macs = [mac_of(&up, &ida), mac_of(&up, &idb)];
    users_never_see_each_others_frames(&up, &lan, &ida, &macs);
    eprintln!("tunnel log:\n{}", tunnel.log());
    up.ok(&["vm", "rm", "--force", &ida]);
    up.ok(&["vm", "rm", "--force", &idb]);
    drop(h2);
}

/// Bob, a second user, has his own tunnel network, LAN (192.168.78.0/24, its own DHCP server)
/// and guest on h1 beside alice's guests (`alice_macs`, `ida` on h1) in `alice_lan`. While both
/// sides send broadcasts (DHCP, ARP for absent addresses) and unicast, each LAN counts the
/// frames its tunnel's tap delivers: its own guests' arrive, the other user's never. Neither
/// may join the other's tunnel.
fn users_never_see_each_others_frames(up: &Up, alice_lan: &UserLan, ida: &str, alice_macs: &[String]) {
    let bob = User::add(up, "bob");
    let bob_lan = UserLan::new(78);
    let o = bob.cli(up, &["net", "create", "bobnet", "--tunnel"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _bob_tunnel = TunnelCmd::start(up, &bob, "bobnet", &bob_lan, 2);
    let idc = bob.run_tunnel_vm(up, "tc", "bobnet", "h1");
    let addr_c = dhcp_address(&up.runtime_dir(&idc));
    assert!(addr_c.starts_with(&format!("192.168.{}.10", bob_lan.net)), "bob's guest took {addr_c:?}, not an address of his LAN");
    let mac_c = mac_of(up, &idc);

    let alice_router = alice_lan.router_mac();
    alice_lan.count_frames("vgt-home", alice_macs, &[mac_c.clone(), bob_lan.router_mac()]);
    bob_lan.count_frames("vgt-bobnet", &[mac_c], &[alice_macs.to_vec(), vec![alice_router]].concat());
    for (lan, id, addr) in [(alice_lan, ida, "192.168.77.1"), (&bob_lan, idc.as_str(), "192.168.78.1")] {
        let _ = lan.exec(&format!("busybox ping -c 2 -W 1 192.168.{}.250", lan.net));
        guest(
            up,
            id,
            &format!("udhcpc -i eth0 -q -n -t 2 -T 1 -s /bin/true >/dev/null 2>&1; ping -c 2 -W 1 192.168.{}.251 >/dev/null; ping -c 2 -W 5 {addr} >/dev/null && echo LAN-TRAFFIC-O''K", lan.net),
            "LAN-TRAFFIC-OK",
        );
    }
    let (alice_own, alice_foreign) = alice_lan.counted();
    let (bob_own, bob_foreign) = bob_lan.counted();
    eprintln!("frames out of the taps: alice's LAN {alice_own} own, {alice_foreign} foreign; bob's {bob_own} own, {bob_foreign} foreign");
    assert!(alice_own > 0 && bob_own > 0, "each LAN got its own guests' frames: alice {alice_own}, bob {bob_own}");
    assert_eq!((alice_foreign, bob_foreign), (0, 0), "frames of the other user's network reached a LAN (alice's, bob's)");

    // Another user cannot join alice's tunnel; nor can the admin (alice) join bob's.
    let o = bob.cli(up, &["tunnel", "home", "--user-mode"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("\"home\""), "bob joined alice's tunnel: {err}");
    let o = up.cli(&["tunnel", "bobnet", "--user-mode"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("belongs to user bob"), "{err}");
    // Nor may bob put a VM on alice's tunnel network: refused at admission, no VM left.
    let o = bob.cli(up, &["vm", "run", "netsample", "--name", "intruder", "--net", "tunnel:home", "--no-wait"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("\"home\""), "bob's VM on alice's tunnel: {err}");
    let ls = bob.cli(up, &["vm", "ls"]);
    assert!(!String::from_utf8_lossy(&ls.stdout).contains("intruder"), "the refused VM was left behind");
    let o = bob.cli(up, &["vm", "rm", "--force", &idc]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
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

/// The last lines of a log file, for assertion messages.
fn tail_of(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A client in the user's LAN holding one TCP connection to `addr:5000` (the guest's echo
/// server): it checks an echo, waits for `go` to exist, checks another on the same connection.
fn tcp_client(lan: &UserLan, addr: &str, go: &std::path::Path) -> std::process::Child {
    let script = format!(
        "import socket, os, sys, time\n\
         s = socket.create_connection(('{addr}', 5000), timeout=60)\n\
         def echo(w):\n    s.sendall(w + b'\\n'); got = b''\n    while not got.endswith(b'\\n'):\n        b = s.recv(100)\n        assert b, 'closed'\n        got += b\n    assert got == w + b'\\n', got\n\
         echo(b'before'); print('BEFORE-OK', flush=True)\n\
         while not os.path.exists('{go}'): time.sleep(0.1)\n\
         echo(b'after'); print('AFTER-OK', flush=True)\n",
        go = go.display()
    );
    Command::new("ip")
        .args(["netns", "exec", &lan.ns, "python3", "-c", &script])
        .stdout(std::fs::File::create(go.with_extension("out")).unwrap())
        .stderr(std::fs::File::create(go.with_extension("err")).unwrap())
        .spawn()
        .expect("python3")
}

/// A tunnel network's guest migrated live to a second host agent keeps its MAC and address,
/// and a TCP connection from the user's LAN into it stays open across the migration; the
/// LAN reaches it on the new host, and again after that host's agent is killed and restarted.
#[test]
fn a_tunnel_network_guest_migrated_to_another_host_keeps_its_address_and_connections() {
    if skip_unless_root() {
        return;
    }
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let lan = UserLan::new(79);
    let up = Up::start_with(&["--name", "h1", "--heartbeat-interval", "1"]);
    let h2_data = up.data_dir().join("h2");
    let h2_args = ["host", "--coordinator", &up.url, "--listen", "127.0.0.1:0", "--name", "h2", "--data-dir", h2_data.to_str().unwrap()];
    let mut h2 = Role::start(&h2_args, up.data_dir().join("h2.log"));
    import_dhcp_sample(&up);
    up.ok(&["net", "create", "home", "--tunnel"]);
    up.wait_until("both hosts to register", Duration::from_secs(30), || up.json(&["host", "ls"]).as_array().is_some_and(|h| h.len() == 2));
    let _tunnel = TunnelCmd::start(&up, &User::admin(), "home", &lan, 0);
    let id = User::admin().run_tunnel_vm(&up, "tm", "home", "h1");
    let addr = dhcp_address(&up.runtime_dir(&id));
    let mac = mac_of(&up, &id);
    assert!(addr.starts_with("192.168.79.10"), "{addr:?}");
    guest(&up, &id, "(nc -ll -p 5000 -e cat &) ; echo ECHO-STAR''TED", "ECHO-STARTED");
    let go = lan.dir.path().join("go");
    let mut client = tcp_client(&lan, &addr, &go);
    up.wait_until("the LAN's TCP client to get its first echo", Duration::from_secs(60), || {
        std::fs::read_to_string(go.with_extension("out")).unwrap_or_default().contains("BEFORE-OK")
    });

    let o = up.cli(&["vm", "migrate", &id, "--to", "h2", "--timeout", "240"]);
    assert!(
        o.status.success(),
        "migration failed: {}{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        up.log_tail()
    );
    let v = up.vm(&id);
    assert_eq!((v["state"].as_str(), v["host"].as_str()), (Some("running"), Some("h2")), "{v}");
    assert_eq!(mac_of(&up, &id), mac, "the MAC is the record's");
    std::fs::write(&go, b"").unwrap();
    let status = client.wait().unwrap();
    let out = std::fs::read_to_string(go.with_extension("out")).unwrap_or_default();
    let err = std::fs::read_to_string(go.with_extension("err")).unwrap_or_default();
    assert!(status.success() && out.contains("AFTER-OK"), "the TCP connection did not survive the migration: {out}{err}");
    assert!(lan.pings(&addr), "the LAN reaches the guest on h2 at {addr}");
    // The LAN's router resolves the address to the same MAC (the guest's, on its new host).
    let neigh = String::from_utf8_lossy(&lan.exec(&format!("ip neigh show {addr}")).stdout).into_owned();
    assert!(neigh.contains(&format!("lladdr {mac}")), "the LAN's neighbour entry for {addr}: {neigh:?} (MAC {mac})");

    // h2's agent SIGKILLed and started again: it re-adopts the guest and listens on its
    // socket again, QEMU reconnects, and the LAN reaches the guest (a new TCP connection too).
    h2.kill();
    let h2 = Role::start(&h2_args, up.data_dir().join("h2-2.log"));
    up.wait_until("the guest re-adopted on h2", Duration::from_secs(60), || {
        std::fs::read_to_string(&h2.log).unwrap_or_default().contains("re-adopted running QEMU") && up.vm(&id)["state"] == "running"
    });
    up.wait_until("the LAN to reach the guest through the restarted agent", Duration::from_secs(60), || {
        lan.exec(&format!("busybox ping -c 1 -W 2 {addr}")).status.success()
    });
    let go2 = lan.dir.path().join("go2");
    std::fs::write(&go2, b"").unwrap();
    let status = tcp_client(&lan, &addr, &go2).wait().unwrap();
    let out = std::fs::read_to_string(go2.with_extension("out")).unwrap_or_default();
    assert!(status.success() && out.contains("AFTER-OK"), "a new TCP connection after the agent's restart: {out}");
    up.ok(&["vm", "rm", "--force", &id]);
    drop(h2);
}

/// `vgrid tunnel home --user-mode`: the tunnel ends in passt (no tap): the guest takes its
/// address from passt's DHCP and reaches a listener on the user's loopback through passt's
/// gateway address (the guest's connection leaves as the user's own, to 127.0.0.1 only).
#[test]
fn a_tunnel_ending_in_passt_carries_the_guests_connections_as_the_users() {
    if skip_unless_root() {
        return;
    }
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let up = Up::start_with(&["--name", "h1"]);
    import_dhcp_sample(&up);
    up.ok(&["net", "create", "home", "--tunnel"]);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            use std::io::Write;
            let _ = c.write_all(b"USER-LOOPBACK-REACHED\n");
        }
    });
    let log = up.data_dir().join("tunnel.log");
    let mut tunnel = User::admin()
        .command(&up, &["tunnel", "home", "--user-mode"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("vgrid tunnel");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    up.wait_until("vgrid tunnel --user-mode to connect", Duration::from_secs(30), || read().contains("tunnel home: connected"));
    let id = User::admin().run_tunnel_vm(&up, "tp", "home", "h1");
    let addr = dhcp_address(&up.runtime_dir(&id));
    assert!(!addr.is_empty(), "no address from passt's DHCP:\n{}", console(&up, &id));
    let line = guest(&up, &id, &format!("nc $(ip route | awk '/default/ {{print $3}}') {port} </dev/null"), "USER-LOOPBACK-REACHED");
    assert!(line.contains("USER-LOOPBACK-REACHED"), "{line}");
    let _ = tunnel.kill();
    let _ = tunnel.wait();
    eprintln!("guest address from passt: {addr}; tunnel log:\n{}", read());
    up.ok(&["vm", "rm", "--force", &id]);
}
