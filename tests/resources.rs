//! Resource control and accounting with real guests: CPU reservations enforced by cgroups and
//! measured from the cgroup's own counters, the owner's cap and admission control, a memory
//! limit that holds QEMU, and accounting that equals the counters and survives restarts.
//!
//! Every test uses a host name of its own, so parallel runs never share cgroups.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// A host name unique to this run and test.
fn unique_host(tag: &str) -> String {
    format!(
        "rt-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_micros()
    )
}

fn v2() -> bool {
    std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// The directory of VM `id`'s group on `host` in the hierarchy of `ctl`.
fn group_dir(ctl: &str, host: &str, id: &str) -> PathBuf {
    if v2() {
        PathBuf::from(format!("/sys/fs/cgroup/vgrid/{host}/{id}"))
    } else {
        PathBuf::from(format!("/sys/fs/cgroup/{ctl}/vgrid/{host}/{id}"))
    }
}

fn read_kv(path: &std::path::Path, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    s.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next().and_then(|v| v.parse().ok())).flatten()
    })
}

/// The group's CPU time counter, ns.
fn cpu_ns(host: &str, id: &str) -> u64 {
    if v2() {
        read_kv(&group_dir("cpu", host, id).join("cpu.stat"), "usage_usec").expect("cpu.stat") * 1000
    } else {
        let p = group_dir("cpuacct", host, id).join("cpuacct.usage");
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).trim().parse().unwrap()
    }
}

fn throttled(host: &str, id: &str) -> u64 {
    read_kv(&group_dir("cpu", host, id).join("cpu.stat"), "nr_throttled").unwrap_or(0)
}

/// The group's memory limit, bytes.
fn memory_limit(host: &str, id: &str) -> u64 {
    let d = group_dir("memory", host, id);
    let f = if v2() { d.join("memory.max") } else { d.join("memory.limit_in_bytes") };
    std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display())).trim().parse().unwrap()
}

/// Removes what a test leaves in the cgroup tree (groups of QEMUs it killed itself).
fn remove_groups(host: &str) {
    let roots: Vec<PathBuf> = if v2() {
        vec![PathBuf::from(format!("/sys/fs/cgroup/vgrid/{host}"))]
    } else {
        ["cpu", "cpuacct", "memory"].iter().map(|c| PathBuf::from(format!("/sys/fs/cgroup/{c}/vgrid/{host}"))).collect()
    };
    for r in roots {
        if let Ok(rd) = std::fs::read_dir(&r) {
            for e in rd.flatten() {
                if e.path().is_dir() {
                    for _ in 0..50 {
                        if std::fs::remove_dir(e.path()).is_ok() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
        let _ = std::fs::remove_dir(&r);
    }
}

fn kill_pid(pid: u64, sig: i32) {
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

fn usage_of(json: &serde_json::Value, id: &str) -> Option<serde_json::Value> {
    json["vms"].as_array()?.iter().find(|v| v["vm"] == id).cloned()
}

#[test]
fn cpu_reservation_is_enforced_and_the_owner_cap_admits_or_refuses() {
    let host = unique_host("cpu");
    // The owner gives guests a quarter of this machine; on a 2-CPU host that is 0.5 cores.
    let ncpu = std::thread::available_parallelism().unwrap().get() as f64;
    let share = (0.5 / ncpu).min(1.0).to_string();
    let up = Up::start_with(&["--name", &host, "--max-share", &share, "--heartbeat-interval", "1"]);
    up.import_sample();
    let h = up.json(&["host", "show", &host]);
    assert!((h["ad"]["cpu_cap"].as_f64().unwrap() - 0.5).abs() < 1e-6, "{h}");
    assert!(!h["ad"]["cgroups"].as_str().unwrap().is_empty(), "cgroups must be usable for this test: {h}");

    // The owner's cap is the parent group's quota.
    let parent = group_dir("cpu", &host, "");
    if v2() {
        assert_eq!(std::fs::read_to_string(parent.join("cpu.max")).unwrap().trim(), "50000 100000");
    } else {
        assert_eq!(std::fs::read_to_string(parent.join("cpu.cfs_quota_us")).unwrap().trim(), "50000");
    }
    let v = up.run_vm("sample", "spin", PROMPT, &["--cpu-share", "0.2"]);
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["config"]["resources"]["cpu_share"], 0.2);
    assert!(up.ok(&["vm", "show", &id]).contains("limits:   cpu 0.20 core (period 100 ms)"));
    // QEMU (all its threads) is in the VM's group, under the host's parent group.
    let procs = std::fs::read_to_string(group_dir("cpu", &host, &id).join("cgroup.procs")).unwrap();
    assert!(procs.lines().any(|l| l.trim() == v["pid"].as_u64().unwrap().to_string()), "{procs}");

    // The guest spins its CPU; its QEMU gets 20% of a core, measured from the group's counter.
    console_exec(&up, &id, "(while :; do :; done) &", PROMPT);
    std::thread::sleep(Duration::from_secs(2));
    let (t0, c0, th0) = (Instant::now(), cpu_ns(&host, &id), throttled(&host, &id));
    std::thread::sleep(Duration::from_secs(10));
    let (c1, th1) = (cpu_ns(&host, &id), throttled(&host, &id));
    let used = (c1 - c0) as f64 / t0.elapsed().as_nanos() as f64;
    eprintln!("cpu used with a 20% reservation: {:.1}% of a core over 10 s; throttled in {} periods", used * 100.0, th1 - th0);
    assert!((0.15..=0.25).contains(&used), "the guest used {:.1}% of a core, reserved 20% +- 5%", used * 100.0);
    assert!(th1 > th0, "the group was never throttled: the limit did not act");

    // A second reservation within the owner's cap (0.2 + 0.2 <= 0.5) is admitted...
    let o = up.cli(&["--json", "vm", "run", "sample", "--name", "second", "--cpu-slice", "20", "--cpu-period", "100", "--no-wait"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let second: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_ne!(second["state"], "failed", "{second}");
    assert_eq!(second["host"], host.as_str());
    // ...one beyond it (0.4 + 0.2 > 0.5) is refused, saying why.
    let o = up.cli(&["vm", "run", "sample", "--name", "third", "--cpu-share", "0.2", "--no-wait"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a reservation beyond the owner's cap was admitted");
    assert!(err.contains("free_cpu_share") && err.contains("owner's cap") && err.contains("0.100 free"), "{err}");
    // A reservation larger than the whole cap is refused at once, even without --no-wait.
    let o = up.cli(&["vm", "run", "sample", "--name", "fourth", "--cpu-share", "0.8"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("exceeds the owner's cap of 0.500 cores"), "{err}");
    // Bad reservations are 400s naming the cause.
    let o = up.cli(&["vm", "run", "sample", "--cpu-share", "0.2", "--cpu-period", "5000"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("out of range 1-1000 ms"), "{}", String::from_utf8_lossy(&o.stderr));
    let h = up.json(&["host", "show", &host]);
    assert!((h["ad"]["free_cpu_share"].as_f64().unwrap() - 0.1).abs() < 1e-6, "{h}");

    // The groups go when the VMs end.
    up.ok(&["vm", "rm", "--force", &id]);
    up.ok(&["vm", "rm", "--force", "second"]);
    up.wait_until("the VM groups to be removed", Duration::from_secs(30), || !group_dir("cpu", &host, &id).exists());
    drop(up);
    remove_groups(&host);
}

#[test]
fn a_guest_cannot_exceed_its_memory_limit_and_the_host_stays_healthy() {
    let host = unique_host("mem");
    let up = Up::start_with(&["--name", &host, "--heartbeat-interval", "1"]);
    up.import_sample();
    // 512 MiB of guest memory, but QEMU as a whole may use only 300 MiB.
    let v = up.run_vm("sample", "hog", PROMPT, &["--memory", "512", "--memory-limit", "300"]);
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(memory_limit(&host, &id), 300 << 20);
    // The guest fills its RAM (its root is in memory): QEMU must touch more than its limit.
    // (The console connection stays open until QEMU ends: QEMU may drop what a client wrote
    // if it hangs up at once.)
    let dir = up.runtime_dir(&id);
    let mut console = std::os::unix::net::UnixStream::connect(dir.join("console.sock")).unwrap();
    std::io::Write::write_all(&mut console, b"dd if=/dev/zero of=/fill bs=1M count=450; echo filled\n").unwrap();
    up.wait_until("the VM to end", Duration::from_secs(120), || up.vm(&id)["state"] == "failed");
    drop(console);
    let rec = up.vm(&id);
    let reason = rec["reason"].as_str().unwrap();
    eprintln!("fate: {reason}");
    assert!(reason.contains("OOM") && reason.contains("memory limit of 300 MiB"), "{reason}");
    // The accounting's last report: peak within the limit, the limit hit, one OOM kill.
    up.wait_until("the final usage report", Duration::from_secs(15), || {
        usage_of(&up.json(&["usage"]), &id).map(|u| u["oom_kills"].as_u64() >= Some(1)).unwrap_or(false)
    });
    let u = usage_of(&up.json(&["usage"]), &id).unwrap();
    eprintln!("usage: {u}");
    let (peak, limit) = (u["memory_peak_bytes"].as_u64().unwrap(), u["memory_limit_bytes"].as_u64().unwrap());
    assert_eq!(limit, 300 << 20);
    assert!(peak > 0 && peak <= limit, "peak {peak} > limit {limit}");
    assert!(u["memory_limit_hits"].as_u64().unwrap() > 0, "{u}");
    // The host is fine: still ready and able to run another guest.
    let h = up.json(&["host", "show", &host]);
    assert_eq!(h["state"], "ready");
    let v2 = up.run_vm("sample", "after", BOOTED_MARKER, &[]);
    assert_eq!(v2["state"], "running");
    up.ok(&["vm", "rm", "--force", "after"]);
    drop(up);
    remove_groups(&host);
}

struct Grid {
    dir: tempfile::TempDir,
    coordinator: Role,
    _server: Role,
    host: Role,
    host_name: String,
    /// Host agents started so far (names their log files apart).
    host_starts: usize,
}

impl Grid {
    fn start_coordinator(dir: &std::path::Path, listen: &str) -> Role {
        Role::coordinator(listen, &dir.join("coord"), 3, dir.join("coord.log"))
    }

    /// Host agent number `n` of this grid (its log is `host-N.log`; a restarted agent keeps
    /// the data directory).
    fn start_host(dir: &std::path::Path, coordinator: &str, name: &str, listen: &str, n: usize) -> Role {
        let data = dir.join("host");
        Role::start(
            &["host", "--coordinator", coordinator, "--listen", listen, "--name", name, "--data-dir", data.to_str().unwrap()],
            dir.join(format!("host-{n}.log")),
        )
    }

    /// The tails of the coordinator's and the host agents' logs, for failure messages.
    fn logs(&self) -> String {
        let mut s = String::new();
        let mut files = vec![self.coordinator.log.clone()];
        files.extend((0..self.host_starts).map(|n| self.dir.path().join(format!("host-{n}.log"))));
        for f in files {
            let text = strip_ansi(&std::fs::read_to_string(&f).unwrap_or_default());
            let lines: Vec<&str> = text.lines().collect();
            s.push_str(&format!("--- {}\n{}\n", f.display(), lines[lines.len().saturating_sub(40)..].join("\n")));
        }
        s
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        cli_at(&self.coordinator.url, args)
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        json_at(&self.coordinator.url, args)
    }

    fn wait_until(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        self.wait_until_show(what, timeout, || (f(), String::new()))
    }

    /// As `wait_until`; `f` also says what it saw last, shown with the logs on a timeout.
    fn wait_until_show(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> (bool, String)) {
        let t0 = Instant::now();
        loop {
            let (done, seen) = f();
            if done {
                return;
            }
            assert!(t0.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}; last seen: {seen}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the usage the coordinator reports for `id` is `counter` (the frozen cgroup
    /// counter); on a timeout shows the last usage seen next to the counter and the logs.
    fn wait_for_usage(&self, what: &str, timeout: Duration, id: &str, want: u64, counter: impl Fn() -> u64, pid: u64) {
        self.wait_until_show(what, timeout, || {
            let u = usage_of(&self.json(&["usage"]), id);
            let got = u.as_ref().and_then(|u| u["usage"]["cpu_ns"].as_u64());
            let u = u.map(|u| u.to_string()).unwrap_or_else(|| "none".into());
            (
                got == Some(want),
                format!("usage {u}; frozen counter {want} ns, counter now {} ns; QEMU threads {}", counter(), thread_states(pid)),
            )
        });
    }
}

/// `s` without the terminal colour sequences of the roles' logs.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // ESC [ parameters final-letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The states (`R`, `S`, `T`, ...) of all threads of `pid`, e.g. "T T T".
fn thread_states(pid: u64) -> String {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|s| s.rsplit(')').next().and_then(|r| r.split_whitespace().next()).map(str::to_string))
        .collect();
    v.sort();
    v.join(" ")
}

/// Stops QEMU (SIGSTOP) and returns its cgroup's CPU counter once it stands still. A thread
/// is charged CPU time until it has handled the signal, which on a loaded machine can take
/// longer than any fixed pause (a thread waiting for a CPU, or in an uninterruptible sleep,
/// stops only when it runs again): wait until every thread is stopped, then until two
/// readings of the counter agree.
fn freeze(pid: u64, counter: impl Fn() -> u64) -> u64 {
    kill_pid(pid, libc::SIGSTOP);
    let t0 = Instant::now();
    loop {
        let states = thread_states(pid);
        if !states.is_empty() && states.split(' ').all(|s| s == "T" || s == "t") {
            let c = counter();
            std::thread::sleep(Duration::from_millis(200));
            if counter() == c {
                eprintln!("QEMU {pid} stopped, its counter still at {c} ns after {:?}", t0.elapsed());
                return c;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "QEMU {pid} did not stop: thread states {states}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILLs a QEMU the test froze if the test ends early: a panicking test must not leave a
/// stopped QEMU behind (its agent cannot stop it), holding memory on a shared machine.
struct KillOnDrop(u64);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if process_alive(self.0) {
            kill_pid(self.0, libc::SIGKILL);
            kill_pid(self.0, libc::SIGCONT);
        }
    }
}

#[test]
fn accounting_equals_the_cgroup_counters_and_survives_agent_and_coordinator_restarts() {
    let name = unique_host("acct");
    let mut g = grid_with_the_sample(&name);
    let _slot = boot_slot().unwrap();
    let v = boot_acct_vm(&g);
    let id = v["id"].as_str().unwrap().to_string();
    let pid = v["pid"].as_u64().unwrap();

    // Freeze QEMU so that its counters stand still, then compare.
    let _kill_qemu = KillOnDrop(pid);
    let counter = freeze(pid, || cpu_ns(&name, &id));
    // The counter reaches the coordinator through the agent's sampling tick (1 s), a heartbeat
    // (1 s) and this test's CLI polls (a process and a TLS session each): periodic steps with
    // no latency promised, slow only when the machine is, so the wait is generous and ends as
    // soon as the figures agree.
    g.wait_for_usage("the usage to reach the frozen counter", Duration::from_secs(60), &id, counter, || cpu_ns(&name, &id), pid);
    usage_equals_the_frozen_counter(&g, &name, &id, counter);
    kill_pid(pid, libc::SIGCONT);
    let after = agent_restart_keeps_the_usage(&mut g, &name, &id, pid);
    coordinator_restart_keeps_the_usage(&mut g, &id, after);

    // Clean up the guest and its groups.
    kill_pid(pid, libc::SIGKILL);
    let t0 = Instant::now();
    while process_alive(pid) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    g.host.terminate();
    remove_groups(&name);
}

/// A coordinator, an image server with the sample guest imported, and host `name`.
fn grid_with_the_sample(name: &str) -> Grid {
    let dir = tempfile::Builder::new().prefix("vgr").tempdir_in("/tmp").unwrap();
    let coordinator = Grid::start_coordinator(dir.path(), "127.0.0.1:0");
    let server = Role::start(
        &[
            "image-server",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.path().join("is").to_str().unwrap(),
            "--coordinator",
            &coordinator.url,
            "--name",
            "is0",
        ],
        dir.path().join("is.log"),
    );
    let host = Grid::start_host(dir.path(), &coordinator.url, name, "127.0.0.1:0", 0);
    let g = Grid { dir, coordinator, _server: server, host, host_name: name.to_string(), host_starts: 1 };
    let gs = sample_guest().unwrap();
    let o = Command::new(vgrid_bin())
        .args([
            "image",
            "import",
            gs.disk.to_str().unwrap(),
            "--name",
            "sample",
            "--kernel",
            gs.kernel.to_str().unwrap(),
            "--initrd",
            gs.initrd.to_str().unwrap(),
            "--cmdline",
            &gs.cmdline,
            "--image-server",
            &g._server.url,
        ])
        .env("VGRID_URL", &g.coordinator.url)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    g.wait_until("host and image server", Duration::from_secs(20), || {
        g.json(&["host", "ls"]).as_array().map(|a| a.len() == 1).unwrap_or(false)
            && g.json(&["image", "ls"]).as_array().map(|a| !a.is_empty()).unwrap_or(false)
    });
    g
}

/// A VM of the sample booted to its prompt (a second attempt if the first fails).
fn boot_acct_vm(g: &Grid) -> serde_json::Value {
    let mut v = serde_json::Value::Null;
    for attempt in 1..=2 {
        let n = format!("acct{attempt}");
        let o = g.cli(&["--json", "vm", "run", "sample", "--name", &n, "--wait-for", PROMPT, "--timeout", "90"]);
        if o.status.success() {
            v = serde_json::from_slice(&o.stdout).unwrap();
            break;
        }
        eprintln!("boot attempt {attempt} failed: {}", String::from_utf8_lossy(&o.stderr));
        let _ = g.cli(&["vm", "rm", "--force", &n]);
    }
    assert!(v.is_object(), "the VM did not boot twice");
    v
}

/// The usage (CLI, per user, REST) equals the frozen CPU counter `counter` of VM `id`; the
/// memory peak is the cgroup's.
fn usage_equals_the_frozen_counter(g: &Grid, name: &str, id: &str, counter: u64) {
    let u = usage_of(&g.json(&["usage"]), id).unwrap();
    eprintln!("usage at the frozen counter {counter} ns: {u}");
    assert_eq!(u["usage"]["cpu_ns"].as_u64().unwrap(), counter);
    assert!((u["usage"]["cpu_seconds"].as_f64().unwrap() - counter as f64 / 1e9).abs() < 1e-6);
    let peak_file = if v2() {
        group_dir("memory", name, id).join("memory.peak")
    } else {
        group_dir("memory", name, id).join("memory.max_usage_in_bytes")
    };
    if let Ok(peak) = std::fs::read_to_string(&peak_file) {
        assert_eq!(u["memory_peak_bytes"].as_u64().unwrap(), peak.trim().parse::<u64>().unwrap());
    }
    assert!(u["usage"]["memory_mib_seconds"].as_f64().unwrap() > 0.0, "{u}");
    assert!(u["usage"]["fetched_bytes"].as_u64().unwrap() > 0, "the image was fetched for this VM: {u}");
    let me = g.json(&["whoami"])["name"].as_str().unwrap().to_string();
    assert_eq!(u["user"], me.as_str());
    let by_user = g.json(&["usage", "--user", &me]);
    assert_eq!(by_user["users"][0]["usage"]["cpu_ns"].as_u64().unwrap(), counter, "{by_user}");
    // The same through the REST API, which the OpenAPI document describes.
    let rest: serde_json::Value =
        serde_json::from_slice(&api_get(&g.coordinator.url, &format!("/api/v1/usage?user={me}&since=0"))).unwrap();
    assert_eq!(usage_of(&rest, id).unwrap()["usage"]["cpu_ns"].as_u64().unwrap(), counter, "{rest}");
    let o = curl_for(&g.coordinator.url).arg(format!("{}/api/openapi.json", g.coordinator.url)).output().unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(doc["paths"]["/api/v1/usage"]["get"].is_object(), "no /api/v1/usage in the OpenAPI document");
    assert!(doc["components"]["schemas"]["UsageReport"].is_object());
}

/// The host agent crashes; QEMU and its cgroup outlive it. Whatever was reported stays, the
/// restarted agent neither resets nor adds to it twice. Returns the usage after it.
fn agent_restart_keeps_the_usage(g: &mut Grid, name: &str, id: &str, pid: u64) -> u64 {
    let before = usage_of(&g.json(&["usage"]), id).unwrap()["usage"]["cpu_ns"].as_u64().unwrap();
    let host_listen = g.host.url.trim_start_matches("https://").to_string();
    g.host.kill();
    assert!(process_alive(pid));
    g.host = Grid::start_host(g.dir.path(), &g.coordinator.url, &g.host_name, &host_listen, g.host_starts);
    g.host_starts += 1;
    std::thread::sleep(Duration::from_secs(3));
    let after = usage_of(&g.json(&["usage"]), id).unwrap()["usage"]["cpu_ns"].as_u64().unwrap();
    assert!(after >= before, "usage went back after the agent restart: {before} -> {after}\n{}", g.logs());
    assert!(after <= cpu_ns(name, id), "usage exceeds the counter after the agent restart (counted twice): {after}\n{}", g.logs());
    // The restarted agent re-adopted the guest: accounting goes on from the same counters.
    let frozen = freeze(pid, || cpu_ns(name, id));
    g.wait_for_usage("the usage to follow the counter after re-adoption", Duration::from_secs(60), id, frozen, || cpu_ns(name, id), pid);
    frozen
}

/// The coordinator crashes and restarts on the same state: the totals are still there.
fn coordinator_restart_keeps_the_usage(g: &mut Grid, id: &str, after: u64) {
    let listen = g.coordinator.url.trim_start_matches("https://").to_string();
    g.coordinator.kill();
    g.coordinator = Grid::start_coordinator(g.dir.path(), &listen);
    g.wait_until("the host to re-register", Duration::from_secs(15), || {
        g.json(&["host", "ls"]).as_array().map(|a| a.len() == 1).unwrap_or(false)
    });
    let again = usage_of(&g.json(&["usage"]), id).unwrap()["usage"]["cpu_ns"].as_u64().unwrap();
    assert_eq!(again, after, "usage changed across a coordinator restart");
    let since_future = g.json(&[
        "usage",
        "--since",
        &(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600).to_string(),
    ]);
    assert!(usage_of(&since_future, id).is_none(), "{since_future}");
}
