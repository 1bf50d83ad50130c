//! Tunnel networks with real guests (`--net tunnel:NAME`, `vgrid tunnel`): network namespaces
//! play the users' LANs (a bridge and busybox udhcpd each), sample guests take their addresses
//! from them, reach each other across host agents, keep their address and TCP connections
//! across a live migration and an agent restart; direct links to hosts and the coordinator's
//! relay carry the frames side by side; users never see each other's frames; passt ends a
//! tunnel without privileges. Needs root, iproute2, nftables, busybox and passt (installed by
//! scripts/install-deps.sh). Everything made is removed at the end, also when a test fails.

mod common;

use common::lan::*;
use common::*;
use std::process::Command;
use std::time::Duration;

/// The tests of this file take turns (at most two guests boot at once, and the LANs' names
/// come from the process id).
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

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
        TunnelCmd::start_with(up, user, net, lan, n, &[])
    }

    /// [`TunnelCmd::start`] with more arguments (`--relay-only`).
    fn start_with(up: &Up, user: &User, net: &str, lan: &UserLan, n: usize, extra: &[&str]) -> TunnelCmd {
        let log = lan.dir.path().join(format!("tunnel{n}.log"));
        let child = user
            .command(up, &[&["tunnel", net, "--bridge", "br0", "--netns", &lan.ns], extra].concat())
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

    /// Waits for the direct link to host `host`.
    fn wait_direct(&self, up: &Up, host: &str) {
        let want = format!("direct link to host {host} (");
        up.wait_until(&format!("a direct link to host {host}"), Duration::from_secs(30), || self.log().contains(&want));
    }
}

/// `vgrid up` as host h1 and a second host agent h2 (its arguments end with `h2_extra`), the
/// DHCP sample imported and tunnel network `home` defined; returns them and h2's arguments
/// (to start it again).
fn two_hosts_with_home(h2_extra: &[&str]) -> (Up, Vec<String>, Role) {
    let up = Up::start_with(&["--name", "h1", "--heartbeat-interval", "1"]);
    let h2_data = up.data_dir().join("h2");
    let mut args: Vec<String> =
        ["host", "--coordinator", &up.url, "--listen", "127.0.0.1:0", "--name", "h2", "--data-dir"].iter().map(|a| a.to_string()).collect();
    args.push(h2_data.to_str().unwrap().to_string());
    args.extend(h2_extra.iter().map(|a| a.to_string()));
    let h2 = Role::start(&args.iter().map(String::as_str).collect::<Vec<_>>(), up.data_dir().join("h2.log"));
    import_dhcp_sample(&up);
    up.ok(&["net", "create", "home", "--tunnel"]);
    up.wait_until("both hosts to register", Duration::from_secs(30), || up.json(&["host", "ls"]).as_array().is_some_and(|h| h.len() == 2));
    (up, args, h2)
}

/// The ports the coordinator's relay switches for network `net` now.
fn relay_ports(up: &Up, net: &str) -> u64 {
    up.json(&["net", "show", net])["relay_ports"].as_u64().unwrap_or(u64::MAX)
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
/// her router and back, its frames on a direct link between the tunnel and h1 (the relay holds
/// only the tunnel's port); a guest on a second host agent that takes no direct links
/// (`--tunnel-direct off`: its frames go through the relay) reaches the first and the LAN;
/// `vgrid tunnel` restarted, the traffic resumes; bob's tunnel network (his own LAN and guest,
/// `--relay-only`) and alice's never see each other's frames, and neither user may join the
/// other's tunnel.
#[test]
fn tunnel_network_guests_join_the_users_lan_through_vgrid_tunnel() {
    if skip_unless_root() {
        return;
    }
    // Its turn among the tests of this file (two booting guests at a time at most).
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let lan = UserLan::new(77);
    let (up, _, h2) = two_hosts_with_home(&["--tunnel-direct", "off"]);
    let alice = User::admin();
    let mut tunnel = TunnelCmd::start(&up, &alice, "home", &lan, 0);

    // A guest on h1 takes its address from the user's DHCP server; they reach each other.
    let ida = alice.run_tunnel_vm(&up, "ta", "home", "h1");
    let addr_a = dhcp_address(&up.runtime_dir(&ida));
    assert!(addr_a.starts_with("192.168.77.10"), "guest a's address {addr_a:?} is not from the user's range:\n{}", console(&up, &ida));
    let show = up.ok(&["vm", "show", &ida]);
    assert!(show.contains("tunnel:home mac 06:"), "{show}");
    guest(&up, &ida, "ping -c 2 -W 5 192.168.77.1 >/dev/null && echo PING-LAN-O''K", "PING-LAN-OK");
    assert!(lan.pings(&addr_a), "user's LAN -> a");
    // h1 takes direct links: a's frames leave the relay, which holds the tunnel's port only.
    tunnel.wait_direct(&up, "h1");
    up.wait_until("a's port to leave the relay", Duration::from_secs(30), || relay_ports(&up, "home") == 1);
    assert!(lan.pings(&addr_a), "user's LAN -> a on the direct link");

    // A guest on another host agent in the same tunnel reaches the first, and the LAN it.
    let idb = alice.run_tunnel_vm(&up, "tb", "home", "h2");
    let dir_b = up.data_dir().join("h2").join("vms").join(&idb);
    let addr_b = dhcp_address(&dir_b);
    assert!(addr_b.starts_with("192.168.77.10") && addr_b != addr_a, "guest b's address {addr_b:?} (a has {addr_a})");
    guest_at(&dir_b, &format!("ping -c 2 -W 5 {addr_a} >/dev/null && echo PING-A-O''K"), "PING-A-OK");
    assert!(lan.pings(&addr_b), "user's LAN -> b");
    // h2 refused the ticket: b is on the relay (with the tunnel), a still direct.
    assert_eq!(relay_ports(&up, "home"), 2, "the relay holds the tunnel's and b's ports");
    assert!(!tunnel.log().contains("direct link to host h2"), "h2 takes no direct links:\n{}", tunnel.log());

    // `vgrid tunnel` restarted: the user's LAN reaches the guests again.
    drop(tunnel);
    assert!(!lan.exec(&format!("busybox ping -c 1 -W 2 {addr_a}")).status.success(), "a reachable without the tunnel");
    tunnel = TunnelCmd::start(&up, &alice, "home", &lan, 1);
    up.wait_until("the user's LAN to reach a through the new tunnel", Duration::from_secs(60), || {
        lan.exec(&format!("busybox ping -c 1 -W 2 {addr_a}")).status.success()
    });
    tunnel.wait_direct(&up, "h1");
    guest_at(&dir_b, &format!("ping -c 2 -W 5 {addr_a} >/dev/null && echo PING-A-AGAIN-O''K"), "PING-A-AGAIN-OK");
    assert!(lan.pings(&addr_b), "user's LAN -> b after the restart");

    let macs = [mac_of(&up, &ida), mac_of(&up, &idb)];
    jumbo_frames_cross_whole(&lan, &[(&up.runtime_dir(&ida), &addr_a), (&dir_b, &addr_b)]);
    users_never_see_each_others_frames(&up, &lan, &ida, &macs);
    eprintln!("tunnel log:\n{}", tunnel.log());
    up.ok(&["vm", "rm", "--force", &ida]);
    up.ok(&["vm", "rm", "--force", &idb]);
    drop(h2);
}

/// Frames of 9,000-byte MTUs cross the tunnel whole, on the direct link and on the relay: with
/// the LAN's bridge, the tunnel's tap and the guests' eth0 at MTU 9000, an 8,000-byte ping
/// (one frame, nothing fragments it) goes both ways.
fn jumbo_frames_cross_whole(lan: &UserLan, guests: &[(&std::path::Path, &String)]) {
    lan.exec("ip link set vgt-home mtu 9000");
    lan.exec("ip link set br0 mtu 9000");
    for (i, (dir, addr)) in guests.iter().enumerate() {
        guest_at(
            dir,
            &format!("ip link set eth0 mtu 9000 && ping -c 2 -W 5 -s 8000 192.168.77.1 >/dev/null && echo JUMBO-{i}-O''K"),
            &format!("JUMBO-{i}-OK"),
        );
        let o = lan.exec(&format!("busybox ping -c 2 -W 5 -s 8000 {addr}"));
        assert!(o.status.success(), "an 8000-byte ping from the LAN to {addr}: {}", String::from_utf8_lossy(&o.stdout));
    }
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
    let _bob_tunnel = TunnelCmd::start_with(up, &bob, "bobnet", &bob_lan, 2, &["--relay-only"]);
    let idc = bob.run_tunnel_vm(up, "tc", "bobnet", "h1");
    // --relay-only: bob's guest stays on the relay although h1 takes direct links.
    assert_eq!(relay_ports(up, "bobnet"), 2, "bob's tunnel and guest on the relay");
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
/// and a TCP connection from the user's LAN into it stays open across the migration (from h1's
/// direct link, through the relay, to h2's direct link); the LAN reaches it on the new host,
/// and again after that host's agent is killed and restarted (its direct link with it).
#[test]
fn a_tunnel_network_guest_migrated_to_another_host_keeps_its_address_and_connections() {
    if skip_unless_root() {
        return;
    }
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let lan = UserLan::new(79);
    let (up, h2_args, mut h2) = two_hosts_with_home(&[]);
    let h2_args: Vec<&str> = h2_args.iter().map(String::as_str).collect();
    let tunnel = TunnelCmd::start(&up, &User::admin(), "home", &lan, 0);
    let id = User::admin().run_tunnel_vm(&up, "tm", "home", "h1");
    tunnel.wait_direct(&up, "h1");
    let addr = dhcp_address(&up.runtime_dir(&id));
    let mac = mac_of(&up, &id);
    assert!(addr.starts_with("192.168.79.10"), "{addr:?}");
    guest(&up, &id, "(nc -ll -p 5000 -e cat &) ; echo ECHO-STAR''TED", "ECHO-STARTED");
    let go = lan.dir.path().join("go");
    let mut client = tcp_client(&lan, &addr, &go);
    up.wait_until("the LAN's TCP client to get its first echo", Duration::from_secs(60), || {
        std::fs::read_to_string(go.with_extension("out")).unwrap_or_default().contains("BEFORE-OK")
    });

    migrate_to(&up, &id, "h2");
    assert_eq!(mac_of(&up, &id), mac, "the MAC is the record's");
    std::fs::write(&go, b"").unwrap();
    let status = client.wait().unwrap();
    let out = std::fs::read_to_string(go.with_extension("out")).unwrap_or_default();
    let err = std::fs::read_to_string(go.with_extension("err")).unwrap_or_default();
    assert!(status.success() && out.contains("AFTER-OK"), "the TCP connection did not survive the migration: {out}{err}");
    assert!(lan.pings(&addr), "the LAN reaches the guest on h2 at {addr}");
    // The tunnel links to h2 directly too (the guest spoke through the relay meanwhile).
    tunnel.wait_direct(&up, "h2");
    assert!(lan.pings(&addr), "the LAN reaches the guest on h2's direct link");
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

/// The coordinator SIGKILLed and started again under a running tunnel (separate roles): the
/// guest on h1's direct link stays reachable from the user's LAN while no coordinator runs
/// (the direct link does not pass it), `vgrid tunnel` reconnects to the restarted relay by
/// itself, and a tunnel started afterwards gets a ticket from the new coordinator and links to
/// h1 directly again.
#[test]
fn a_tunnel_carries_frames_while_the_coordinator_restarts() {
    if skip_unless_root() {
        return;
    }
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let lan = UserLan::new(80);
    let mut g = common::grid::RoleGrid::start(&["h1"]);
    let ok = |o: std::process::Output| assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ok(g.cli(&["net", "create", "home", "--tunnel"]));
    // The restarted coordinator listens on the same address.
    let url = g.coordinator.url.clone();
    let tunnel = |n: usize| {
        let log = lan.dir.path().join(format!("ctunnel{n}.log"));
        let child = Command::new(vgrid_bin())
            .args(["tunnel", "home", "--bridge", "br0", "--netns", &lan.ns])
            .env("VGRID_URL", &url)
            .stdin(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("vgrid tunnel");
        TunnelCmd { child, log }
    };
    let first = tunnel(0);
    let vm = {
        let _slot = boot_slot().expect("boot slot");
        let o = g.cli(&["--json", "vm", "run", "sample", "--name", "tr", "--net", "tunnel:home", "--wait-for", PROMPT, "--timeout", "120"]);
        assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stderr), g.logs());
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let dir = g.runtime_dir("h1", vm["id"].as_str().unwrap());
    guest_at(&dir, "ip addr add 192.168.80.50/24 dev eth0 && ip link set eth0 up && echo ADDR-O''K", "ADDR-OK");
    let direct = |t: &TunnelCmd| t.log().contains("direct link to host h1 (");
    g.wait_until("a direct link to h1", Duration::from_secs(30), || direct(&first));
    g.wait_until("the LAN to reach the guest", Duration::from_secs(30), || lan.pings("192.168.80.50"));

    g.coordinator.kill();
    assert!(lan.pings("192.168.80.50"), "the direct link carries frames while no coordinator runs");
    let connected = |t: &TunnelCmd| t.log().matches("tunnel home: connected").count();
    assert_eq!(connected(&first), 1);
    g.restart_coordinator();
    g.wait_until("vgrid tunnel to reconnect to the relay", Duration::from_secs(60), || connected(&first) >= 2);
    assert!(lan.pings("192.168.80.50"), "the LAN reaches the guest after the restart");
    drop(first);
    let second = tunnel(1);
    g.wait_until("a new tunnel's direct link from the restarted coordinator's ticket", Duration::from_secs(60), || direct(&second));
    g.wait_until("the LAN to reach the guest through the new tunnel", Duration::from_secs(30), || lan.pings("192.168.80.50"));
    ok(g.cli(&["vm", "rm", "--force", "tr"]));
}
