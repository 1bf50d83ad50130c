//! The grid as separate processes on this machine: a coordinator, image servers and host
//! agents, each with its own port and data directory, talking HTTP.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

struct Grid {
    dir: tempfile::TempDir,
    coordinator: Role,
    servers: Vec<Role>,
    hosts: Vec<Role>,
}

impl Drop for Grid {
    fn drop(&mut self) {
        // Stopped agents leave their guests running for the next agent: end them here.
        for h in self.hosts.iter_mut() {
            h.terminate();
        }
        kill_guests_under(self.dir.path());
    }
}

fn start_coordinator(dir: &std::path::Path, listen: &str) -> Role {
    let data = dir.join("coord");
    Role::start(
        &["coordinator", "--listen", listen, "--data-dir", data.to_str().unwrap(), "--heartbeat-interval", "1", "--lost-after-beats", "3"],
        dir.join("coord.log"),
    )
}

impl Grid {
    fn start(n_servers: usize, hosts: &[(&str, &[&str])]) -> Grid {
        let dir = tempfile::Builder::new().prefix("vgg").tempdir_in("/tmp").unwrap();
        let p = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
        let coordinator = start_coordinator(dir.path(), "127.0.0.1:0");
        let servers = (0..n_servers)
            .map(|i| {
                Role::start(
                    &[
                        "image-server",
                        "--listen",
                        "127.0.0.1:0",
                        "--data-dir",
                        &p(&format!("is{i}")),
                        "--coordinator",
                        &coordinator.url,
                        "--name",
                        &format!("is{i}"),
                    ],
                    dir.path().join(format!("is{i}.log")),
                )
            })
            .collect();
        let mut g = Grid { dir, coordinator, servers, hosts: vec![] };
        for (name, extra) in hosts {
            g.start_host(name, extra);
        }
        g
    }

    fn start_host(&mut self, name: &str, extra: &[&str]) {
        let data = self.dir.path().join(name);
        let mut args = vec!["host", "--coordinator", &self.coordinator.url, "--listen", "127.0.0.1:0", "--name", name];
        let d = data.to_str().unwrap().to_string();
        args.extend_from_slice(&["--data-dir", &d]);
        args.extend_from_slice(extra);
        let r = Role::start(&args, self.dir.path().join(format!("{name}.log")));
        self.hosts.push(r);
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        cli_at(&self.coordinator.url, args)
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        json_at(&self.coordinator.url, args)
    }

    /// Image servers registered with the coordinator (the REST API, with a login token).
    fn image_server_count(&self) -> usize {
        let body = api_get(&self.coordinator.url, "/api/v1/image-servers");
        serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v.as_array().map(|a| a.len())).unwrap_or(0)
    }

    fn host_state(&self, name: &str) -> String {
        self.json(&["host", "show", name])["state"].as_str().unwrap().to_string()
    }

    fn wait_until(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let t0 = std::time::Instant::now();
        while !f() {
            assert!(
                t0.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}; coordinator log:\n{}",
                std::fs::read_to_string(&self.coordinator.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Imports the sample guest into image server `i`.
    fn import_sample(&self, i: usize, name: &str) {
        self.import_guest(i, name, &sample_guest().unwrap());
    }

    /// Imports a cached guest's disk, kernel, initrd and cmdline into image server `i`.
    fn import_guest(&self, i: usize, name: &str, g: &SampleGuest) {
        let o = Command::new(vgrid_bin())
            .args([
                "image",
                "import",
                g.disk.to_str().unwrap(),
                "--name",
                name,
                "--kernel",
                g.kernel.to_str().unwrap(),
                "--initrd",
                g.initrd.to_str().unwrap(),
                "--cmdline",
                &g.cmdline,
                "--image-server",
                &self.servers[i].url,
            ])
            .env("VGRID_URL", &self.coordinator.url)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    fn run_vm(&self, image: &str, name: &str, extra: &[&str]) -> serde_json::Value {
        self.run_vm_until(image, name, BOOTED_MARKER, "90", extra)
    }

    /// `vm run` waiting for `marker` on the console, with a boot slot, a timeout (seconds) and
    /// one retry.
    fn run_vm_until(&self, image: &str, name: &str, marker: &str, timeout: &str, extra: &[&str]) -> serde_json::Value {
        let _slot = boot_slot().unwrap();
        let mut last = String::new();
        for attempt in 1..=2 {
            let n = if attempt == 1 { name.to_string() } else { format!("{name}-retry") };
            let mut args = vec!["--json", "vm", "run", image, "--name", &n, "--wait-for", marker, "--timeout", timeout];
            args.extend_from_slice(extra);
            let o = self.cli(&args);
            if o.status.success() {
                return serde_json::from_slice(&o.stdout).unwrap();
            }
            last = String::from_utf8_lossy(&o.stderr).into_owned();
            let _ = self.cli(&["vm", "rm", "--force", &n]);
        }
        panic!("VM {name} did not boot twice: {last}");
    }

    /// The runtime directory of VM `id` on host `host` (in that host's data directory).
    fn runtime_dir(&self, host: &str, id: &str) -> std::path::PathBuf {
        self.dir.path().join(host).join("vms").join(id)
    }
}

#[test]
fn vms_run_on_separate_host_processes_from_either_image_server() {
    let mut g = Grid::start(2, &[("h1", &["--label", "site=uf"]), ("h2", &["--label", "site=nw"]), ("h3", &["--label", "site=uf"])]);
    g.wait_until("three hosts and two image servers", Duration::from_secs(20), || {
        g.json(&["host", "ls"]).as_array().unwrap().len() == 3 && g.json(&["vm", "ls"]).is_array()
    });
    let hosts = g.json(&["host", "ls"]);
    for h in hosts.as_array().unwrap() {
        assert_eq!(h["state"], "ready");
        assert!(h["ad"]["url"].as_str().unwrap().starts_with("https://127.0.0.1:"));
        assert!(h["ad"]["memory_mib"].as_u64().unwrap() > 0);
    }
    assert_eq!(g.json(&["host", "show", "h2"])["ad"]["labels"]["site"], "nw");

    // The image exists only on the second image server: it still boots.
    g.import_sample(1, "only-on-is1");
    g.wait_until("image servers registered", Duration::from_secs(10), || g.image_server_count() == 2);
    let ls = g.json(&["image", "ls"]);
    let entry = ls.as_array().unwrap().iter().find(|i| i["name"] == "only-on-is1").expect("image listed");
    assert_eq!(entry["servers"], serde_json::json!(["is1"]), "{ls}");
    let v = g.run_vm("only-on-is1", "remote", &[]);
    assert_eq!(v["state"], "running");
    let host = v["host"].as_str().unwrap().to_string();
    assert!(["h1", "h2", "h3"].contains(&host.as_str()));
    // Its runtime directory is in that host's own data directory.
    assert!(g.dir.path().join(&host).join("vms").join(v["id"].as_str().unwrap()).join("overlay.qcow2").exists());
    let logs = g.cli(&["vm", "logs", v["id"].as_str().unwrap()]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains(BOOTED_MARKER));

    // An unknown image names itself; a VM no host can hold explains per host.
    let o = g.cli(&["vm", "run", "nosuch"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown image nosuch"));
    let o = g.cli(&["vm", "run", "only-on-is1", "--memory", "999999"]);
    let err = String::from_utf8_lossy(&o.stderr);
    for h in ["h1", "h2", "h3"] {
        assert!(err.contains(&format!("{h}: `memory`")) && err.contains("999999 requested"), "{err}");
    }

    let o = g.cli(&["vm", "stop", v["id"].as_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    g.hosts.clear();
}

#[test]
fn a_killed_host_becomes_lost_and_returns() {
    let mut g = Grid::start(1, &[("ha", &[]), ("hb", &[])]);
    g.wait_until("two hosts", Duration::from_secs(20), || g.json(&["host", "ls"]).as_array().unwrap().len() == 2);
    g.hosts[0].kill();
    g.wait_until("ha lost", Duration::from_secs(15), || g.host_state("ha") == "lost");
    assert_eq!(g.host_state("hb"), "ready");
    let ls = g.cli(&["host", "ls"]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains("lost"));
    // It returns with the same name and data directory.
    g.start_host("ha", &[]);
    g.wait_until("ha ready again", Duration::from_secs(15), || g.host_state("ha") == "ready");
}

#[test]
fn requirements_rank_and_refusals() {
    let g = Grid::start(
        1,
        &[
            ("h1", &["--label", "site=uf"]),
            ("h2", &["--label", "site=nw"]),
            ("h3", &["--label", "site=uf", "--policy", "request.cpus <= 1"]),
        ],
    );
    g.wait_until("three hosts", Duration::from_secs(20), || g.json(&["host", "ls"]).as_array().unwrap().len() == 3);
    g.import_sample(0, "sample");
    g.wait_until("the image server", Duration::from_secs(10), || g.image_server_count() == 1);

    // The user's requirement decides.
    let v = g.run_vm("sample", "in-nw", &["--require", r#"host.labels.site == "nw""#]);
    assert_eq!(v["host"], "h2");
    let id = v["id"].as_str().unwrap().to_string();
    // h2 now advertises the image as cached, as far as the boot read it: the kernel and
    // initrd whole, the disk's chunks whole or in part (0.89 of the sample's stored chunks).
    g.wait_until("h2 to advertise its cache", Duration::from_secs(10), || {
        g.json(&["host", "show", "h2"])["ad"]["image_cache"]["sample@1"].as_f64().unwrap_or(0.0) > 0.5
    });
    assert!(g.cli(&["vm", "stop", &id]).status.success());

    // Default rank: the host holding the image in its cache wins.
    let v = g.run_vm("sample", "cached", &[]);
    assert_eq!(v["host"], "h2", "default rank should prefer the host with the image cached");
    assert!(g.cli(&["vm", "stop", v["id"].as_str().unwrap()]).status.success());

    // No match: every host is named with the failing clause (the owner policy of h3 included).
    let o = g.cli(&["vm", "run", "sample", "--cpus", "2", "--require", r#"host.labels.site == "uf" && host.memory_mib < 10"#]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "placed although nothing matches");
    assert!(err.contains("h1") && err.contains("host.memory_mib < 10"), "{err}");
    assert!(err.contains("h2") && err.contains(r#"host.labels.site == "uf""#), "{err}");
    assert!(err.contains("h3"), "{err}");
    // The owner's policy of h3 refuses 2 cpus even where the user's requirement holds.
    let o = g.cli(&["vm", "run", "sample", "--cpus", "2", "--require", r#"host.labels.site == "uf" && host.name == "h3""#, "--no-wait"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("request.cpus <= 1"), "{err}");

    // VM futures: which hosts could start it now, and why not the others.
    let f = g.json(&["futures", r#"host.labels.site == "uf""#, "--cpus", "2"]);
    let by: std::collections::HashMap<String, serde_json::Value> =
        f.as_array().unwrap().iter().map(|a| (a["host"].as_str().unwrap().to_string(), a.clone())).collect();
    assert_eq!(by["h1"]["could_start"], true, "{f}");
    assert_eq!(by["h2"]["could_start"], false);
    assert!(by["h2"]["why_not"].as_str().unwrap().contains(r#"host.labels.site == "uf""#), "{f}");
    assert_eq!(by["h3"]["could_start"], false);
    assert!(by["h3"]["why_not"].as_str().unwrap().contains("request.cpus <= 1"), "{f}");
    assert!(g.json(&["vm", "ls"]).as_array().unwrap().iter().all(|v| v["state"] != "running"), "futures placed nothing");

    // Invalid CEL: 422 (well-formed, refused) with the position.
    let o = g.cli(&["vm", "run", "sample", "--require", "host.cpus >= >= 2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("422") && err.contains("not valid CEL at"), "{err}");
    let o = g.cli(&["vm", "run", "sample", "--require", "host.nosuchfield == 1"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("nosuchfield"));
    let huge = vec!["host.cpus >= 1"; 2000].join(" && ");
    let o = g.cli(&["vm", "run", "sample", "--require", &huge]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("cost limit"), "{err}");
}

#[test]
fn requests_wait_in_the_queue_until_capacity_frees() {
    let mut g = Grid::start(1, &[("small", &["--max-memory", "300"])]);
    g.wait_until("the host", Duration::from_secs(20), || g.json(&["host", "ls"]).as_array().unwrap().len() == 1);
    g.import_sample(0, "sample");
    g.wait_until("the image server", Duration::from_secs(10), || g.image_server_count() == 1);
    let first = g.run_vm("sample", "first", &[]);
    // --no-wait fails fast and says why.
    let o = g.cli(&["vm", "run", "sample", "--no-wait"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("small") && err.contains("memory"), "{err}");
    // Without it the VM waits in the queue...
    let o = g.cli(&["--json", "vm", "run", "sample", "--name", "second", "--timeout", "3"]);
    assert!(!o.status.success());
    let second = g.json(&["vm", "show", "second"]);
    assert_eq!(second["state"], "pending");
    assert!(second["phase"].as_str().unwrap().starts_with("queued"), "{second}");
    // It stays queued across a coordinator crash and restart...
    let listen = g.coordinator.url.trim_start_matches("https://").to_string();
    g.coordinator.kill();
    g.coordinator = start_coordinator(g.dir.path(), &listen);
    g.wait_until("the host to re-register", Duration::from_secs(15), || {
        g.json(&["host", "ls"]).as_array().map(|a| a.len() == 1).unwrap_or(false)
    });
    let second = g.json(&["vm", "show", "second"]);
    assert_eq!(second["state"], "pending", "{second}");
    // ...and runs once the first one stops.
    assert!(g.cli(&["vm", "stop", first["id"].as_str().unwrap()]).status.success());
    g.wait_until("the queued VM to run", Duration::from_secs(120), || g.json(&["vm", "show", "second"])["state"] == "running");
    let s = g.json(&["vm", "show", "second"]);
    assert_eq!(s["host"], "small");
    assert!(g.cli(&["vm", "stop", "second"]).status.success());
}

#[test]
fn a_coordinator_restart_neither_loses_nor_duplicates_a_vm() {
    let mut g = Grid::start(1, &[("hr", &[])]);
    g.wait_until("the host", Duration::from_secs(20), || g.json(&["host", "ls"]).as_array().unwrap().len() == 1);
    g.import_sample(0, "sample");
    g.wait_until("the image server", Duration::from_secs(10), || g.image_server_count() == 1);
    let v = g.run_vm("sample", "survivor", &[]);
    let id = v["id"].as_str().unwrap().to_string();
    let pid = v["pid"].as_u64().unwrap();

    // Crash the coordinator and start it again on the same address and state.
    let listen = g.coordinator.url.trim_start_matches("https://").to_string();
    g.coordinator.kill();
    assert!(process_alive(pid), "the guest must outlive its coordinator");
    g.coordinator = start_coordinator(g.dir.path(), &listen);
    g.wait_until("the host to re-register", Duration::from_secs(15), || {
        g.json(&["host", "ls"]).as_array().map(|a| a.len() == 1).unwrap_or(false)
    });
    let vms = g.json(&["vm", "ls"]);
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");
    assert_eq!(vms[0]["id"], id.as_str());
    assert_eq!(vms[0]["state"], "running");
    // It is still controlled: stop reaches the guest through the restarted coordinator.
    let o = g.cli(&["--json", "vm", "stop", &id]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    g.wait_until("the VM stopped", Duration::from_secs(30), || g.json(&["vm", "show", &id])["state"] == "stopped");
    assert!(!process_alive(pid));
}

/// What one boot through an image server outage measured.
struct Outage {
    /// From `vm run` to the boot marker.
    boot: Duration,
    /// How long the image server was down.
    down: Duration,
    /// The longest wait of a read the host reported.
    longest_wait_s: f64,
}

/// A lazy boot through an image server outage: which guest, and when the grid's only image
/// server goes away and for how long.
struct OutagePlan<'a> {
    guest: &'a SampleGuest,
    /// The console line that says the boot completed.
    marker: &'a str,
    /// More `vm run` arguments (e.g. `--memory`).
    run_args: &'a [&'a str],
    /// `vm run`'s timeout, seconds.
    timeout: &'a str,
    /// How long after the VM's QEMU runs the image server is killed.
    kill_after: Duration,
    /// How long it stays down (at least).
    down_for: Duration,
    /// Stay down (up to 60 s) until the VM's phase has shown the wait.
    until_wait_shown: bool,
    /// What else to check in the booted guest (its runtime directory), before it is stopped.
    after_boot: &'a dyn Fn(&std::path::Path),
}

/// Runs `plan` (one retry, on a fresh host: a cold cache, with the image under a new name: no
/// boot profile), prints its figures and returns them.
fn outage_test(g: &mut Grid, plan: &OutagePlan) -> Outage {
    let mut last = String::new();
    for attempt in 1..=2 {
        match boot_through_outage(g, attempt, plan) {
            Ok(o) => {
                eprintln!(
                    "outage figures: image server down {:.1} s, longest read wait {:.1} s, boot to the marker {:.1} s",
                    o.down.as_secs_f64(),
                    o.longest_wait_s,
                    o.boot.as_secs_f64()
                );
                return o;
            }
            Err(e) => {
                eprintln!("boot through the outage, attempt {attempt}, failed: {e}");
                last = e;
            }
        }
    }
    panic!("the boot through an image server outage failed twice: {last}");
}

/// A lazy boot whose only image server is killed as soon as the guest's QEMU runs (the kernel
/// booting, its disk not yet read) and started again 10 s later (or once the wait has shown)
/// on the same address with the same data: the guest's reads wait for it, the VM's phase says so, and the boot completes
/// with no I/O error in the guest.
#[test]
fn a_lazy_boot_waits_through_an_image_server_outage() {
    let mut g = Grid::start(1, &[]);
    let guest = sample_guest().unwrap();
    outage_test(
        &mut g,
        &OutagePlan {
            guest: &guest,
            marker: BOOTED_MARKER,
            run_args: &[],
            timeout: "180",
            kill_after: Duration::ZERO,
            down_for: Duration::from_secs(10),
            until_wait_shown: true,
            after_boot: &|_| {},
        },
    );
}

/// Issue 13's outage on a stock Debian guest (debootstrap, systemd, ext4 root; see
/// `scripts/build-debian-guest.sh`): started lazily on a grid of separate roles, its only image
/// server killed 6 s into the boot and started again 12 s later (later if the guest read nothing
/// meanwhile: on a busy machine a TCG guest may still be in its kernel 18 s into the boot, and an
/// outage no read met shows nothing; it stays down until the wait has shown, up to 60 s). The
/// boot completes; neither
/// the console nor the guest's kernel log has an I/O or ext4 error; the guest says its root file
/// system is clean. A plain lazy boot first, for comparison. Skips unless the guest is built
/// (or `VGRID_DEBIAN_GUEST=1` asks to build it: minutes).
#[test]
fn a_debian_guest_boots_through_an_image_server_outage() {
    let Some(guest) = debian_guest().unwrap() else {
        eprintln!(
            "skipped: the Debian guest is not built; run scripts/build-debian-guest.sh (about 5 minutes) or set VGRID_DEBIAN_GUEST=1"
        );
        return;
    };
    let mut g = Grid::start(1, &[("d0", &[])]);
    g.wait_until("the host", Duration::from_secs(20), || g.json(&["host", "ls"]).as_array().unwrap().len() == 1);
    let t = std::time::Instant::now();
    g.import_guest(0, "debian", &guest);
    let import = t.elapsed();
    g.wait_until("the image server", Duration::from_secs(10), || g.image_server_count() == 1);

    // A plain lazy boot (cold cache, no profile) for comparison.
    let t = std::time::Instant::now();
    let v = g.run_vm_until("debian", "plain", DEBIAN_BOOTED_MARKER, "300", &["--memory", "512"]);
    let plain = t.elapsed();
    let id = v["id"].as_str().unwrap();
    debian_checks(&g.runtime_dir(v["host"].as_str().unwrap(), id));
    assert!(g.cli(&["vm", "stop", id]).status.success());

    let o = outage_test(
        &mut g,
        &OutagePlan {
            guest: &guest,
            marker: DEBIAN_BOOTED_MARKER,
            run_args: &["--memory", "512"],
            timeout: "300",
            kill_after: Duration::from_secs(6),
            down_for: Duration::from_secs(12),
            until_wait_shown: true,
            after_boot: &debian_checks,
        },
    );
    eprintln!(
        "debian figures: import {:.1} s, lazy boot {:.1} s, lazy boot through the outage {:.1} s (down {:.1} s)",
        import.as_secs_f64(),
        plain.as_secs_f64(),
        o.boot.as_secs_f64(),
        o.down.as_secs_f64()
    );
}

/// Asks the booted Debian guest (on its serial console, where root is logged in) about its root
/// file system and kernel log: no ext4 error recorded (`errors_count`, the superblock's state),
/// no I/O or ext4 error in `dmesg`, systemd running without failed units.
fn debian_checks(dir: &std::path::Path) {
    // `fs%s` keeps the echo of the typed command from matching the answer.
    let cmd = r#"printf 'fs%s errors=%s state=%s dmesg=%s system=%s end\n' -check "$(cat /sys/fs/ext4/vda/errors_count)" "$(dumpe2fs -h /dev/vda 2>/dev/null | sed -n 's/^Filesystem state: *//p' | tr ' ' _)" "$(dmesg | grep -cE 'I/O error|EXT4-fs error|Buffer I/O')" "$(systemctl is-system-running)""#;
    let line = console_line(dir, "root@vgrid-debian:~# ", cmd, "fs-check ", Duration::from_secs(120)).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("debian guest: {line}");
    for want in ["errors=0 ", "state=clean ", "dmesg=0 ", "system=running "] {
        assert!(line.contains(want), "the guest's answer lacks {want:?}: {line}");
    }
}

fn boot_through_outage(g: &mut Grid, attempt: usize, plan: &OutagePlan) -> Result<Outage, String> {
    let (host, image, name) = (format!("o{attempt}"), format!("outage{attempt}"), format!("lazy{attempt}"));
    g.start_host(&host, &[]);
    g.wait_until("the host", Duration::from_secs(20), || {
        g.json(&["host", "ls"]).as_array().unwrap().iter().any(|h| h["ad"]["name"] == *host)
    });
    g.import_guest(0, &image, plan.guest);
    g.wait_until("the image server", Duration::from_secs(10), || g.image_server_count() == 1);
    let _slot = boot_slot().unwrap();
    let t0 = std::time::Instant::now();
    let require = format!(r#"host.name == "{host}""#);
    let mut args =
        vec!["--json", "vm", "run", &image, "--name", &name, "--require", &require, "--wait-for", plan.marker, "--timeout", plan.timeout];
    args.extend_from_slice(plan.run_args);
    let run = Command::new(vgrid_bin())
        .args(&args)
        .env("VGRID_URL", &g.coordinator.url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    g.wait_until("the VM's QEMU to run", Duration::from_secs(120), || vm_field(g, &name, "state") == "running");
    std::thread::sleep(plan.kill_after);

    // The image server goes away, and comes back later on the same address and data.
    let url = g.servers[0].url.clone();
    g.servers[0].kill();
    let down_at = std::time::Instant::now();
    // Down for `down_for`, and maybe until the VM's phase has shown the wait (the host tries
    // for 3 s before it reports a wait).
    let mut phase_seen = None;
    while down_at.elapsed() < plan.down_for
        || (plan.until_wait_shown && phase_seen.is_none() && down_at.elapsed() < Duration::from_secs(60))
    {
        let p = vm_field(g, &name, "phase");
        if p.starts_with("waiting for image server") {
            phase_seen.get_or_insert(p);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let listen = url.trim_start_matches("https://");
    let data = g.dir.path().join("is0");
    let coordinator = g.coordinator.url.clone();
    let args = ["image-server", "--listen", listen, "--data-dir", data.to_str().unwrap(), "--coordinator", &coordinator, "--name", "is0"];
    g.servers[0] = Role::start(&args, g.dir.path().join(format!("is0-again{attempt}.log")));
    let down = down_at.elapsed();
    assert_eq!(g.servers[0].url, url, "the image server came back on another address");

    let out = run.wait_with_output().unwrap();
    let boot = t0.elapsed();
    let host_log = std::fs::read_to_string(g.dir.path().join(format!("{host}.log"))).unwrap_or_default();
    if !out.status.success() {
        let _ = g.cli(&["vm", "rm", "--force", &name]);
        return Err(format!("vm run: {}; host log:\n{host_log}", String::from_utf8_lossy(&out.stderr)));
    }
    let phase_seen = phase_seen.ok_or_else(|| {
        let _ = g.cli(&["vm", "rm", "--force", &name]);
        format!("the VM's phase never said it waited; host log:\n{host_log}")
    })?;
    assert!(phase_seen.contains(&url), "the phase names the image server: {phase_seen}");
    let console = String::from_utf8_lossy(&g.cli(&["vm", "logs", &name]).stdout).into_owned();
    assert!(console.contains(plan.marker), "{console}");
    for bad in ["I/O error", "Buffer I/O", "EXT4-fs error", "mounting fs with errors"] {
        let lines: Vec<&str> = console.lines().filter(|l| l.contains(bad)).collect();
        assert!(lines.is_empty(), "the guest saw {bad:?}:\n{}", lines.join("\n"));
    }
    // The host said which read waited and when it went on; the phase is back.
    assert!(host_log.contains("image servers unreachable: the read waits for them"), "{host_log}");
    let waits = read_waits(&host_log);
    assert!(!waits.is_empty(), "the host never said the read went on: {host_log}");
    g.wait_until("the phase back to running", Duration::from_secs(15), || vm_field(g, &name, "phase") == "running");
    let id = g.json(&["vm", "show", &name])["id"].as_str().unwrap().to_string();
    (plan.after_boot)(&g.runtime_dir(&host, &id));
    assert!(g.cli(&["vm", "stop", &name]).status.success());
    Ok(Outage { boot, down, longest_wait_s: waits.iter().copied().fold(0.0, f64::max) })
}

/// A field of VM `name`'s record as text (empty while there is no such VM).
fn vm_field(g: &Grid, name: &str, field: &str) -> String {
    let o = g.cli(&["--json", "vm", "show", name]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    v[field].as_str().unwrap_or("").to_string()
}

/// Issue 13: a coordinator and an image server asked to stop (SIGTERM) exit promptly although
/// clients keep connections open (an idle keep-alive one, a request never finished); the
/// coordinator's state opens again afterwards.
#[test]
fn a_coordinator_and_an_image_server_stop_promptly_with_connections_held_open() {
    let mut g = Grid::start(1, &[]);
    let users = |g: &Grid| -> Vec<String> {
        g.json(&["user", "ls"]).as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap_or("").to_string()).collect()
    };
    let before = users(&g);
    for (what, role) in [("image server", &mut g.servers[0]), ("coordinator", &mut g.coordinator)] {
        let mut held = [hold_connection(&role.url, true), hold_connection(&role.url, false)];
        let t0 = std::time::Instant::now();
        let exited = role.terminate();
        eprintln!("figure: the {what} exited {:.1} s after SIGTERM (two connections held open)", t0.elapsed().as_secs_f64());
        assert!(exited, "the {what} did not exit within 30 s of SIGTERM");
        for c in held.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    // Started again on its data directory, the coordinator has its state.
    let listen = g.coordinator.url.trim_start_matches("https://").to_string();
    g.coordinator = start_coordinator(g.dir.path(), &listen);
    assert_eq!(users(&g), before);
}
