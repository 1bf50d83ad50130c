//! Live migration between separate host agent processes, and re-adoption of running guests by
//! a host agent killed with SIGKILL and restarted. Real guests (the sample guest under TCG),
//! real processes: a coordinator, an image server and host agents, each with its own port and
//! data directory.

mod common;

use common::grid::{console_has_line, console_log, console_until, qemus_of, type_on_console, RoleGrid as Grid};
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// Numbers of the `tick N` lines the counter printed in a console log. A line may start with
/// the shell's prompt (`vgrid# ` and the cursor-position query `ESC[6n` busybox's line editor
/// sends after it): the counter runs in the background, so the prompt the shell prints after
/// starting it lands before whichever tick comes next — "vgrid# ESC[6ntick 1", or "tick 1"
/// then "vgrid# ESC[6ntick 2", depending on which of the two the guest schedules first.
fn ticks(log: &str) -> Vec<u64> {
    log.lines().filter_map(|l| strip_prompt(l).strip_prefix("tick ").and_then(|n| n.trim().parse().ok())).collect()
}

/// `line` without leading shell prompts and terminal escape sequences (`ESC [ params letter`).
fn strip_prompt(line: &str) -> &str {
    let mut l = line.trim();
    loop {
        if let Some(rest) = l.strip_prefix(PROMPT.trim_end()) {
            l = rest.trim_start();
        } else if let Some(rest) = l.strip_prefix("\x1b[") {
            let end = rest.find(|c: char| c.is_ascii_alphabetic()).map(|i| i + 1).unwrap_or(rest.len());
            l = rest[end..].trim_start();
        } else {
            return l;
        }
    }
}

#[test]
fn a_tick_after_the_shell_prompt_is_counted() {
    // Both orders in which the shell's prompt and the background counter's first tick reach
    // the console (the second one made the migration test see [1, 3, 4, ...]).
    let prompt_first = "vgrid# (i=0; while true; do echo \"tick $i\"; done) &\r\nvgrid# \x1b[6ntick 1\r\ntick 2\r\ntick 3\r\n";
    let tick_first = "vgrid# (i=0; while true; do echo \"tick $i\"; done) &\r\ntick 1\r\nvgrid# \x1b[6ntick 2\r\ntick 3\r\n";
    assert_eq!(ticks(&prompt_first.replace('\r', "")), [1, 2, 3]);
    assert_eq!(ticks(&tick_first.replace('\r', "")), [1, 2, 3]);
    assert!(ticks("tick $i\nticks 4\nvgrid# echo tick 5\n").is_empty());
}

const COUNTER: &str = "(i=0; while true; do i=$((i+1)); echo \"tick $i\"; sleep 0.3; done) &";

#[test]
fn a_counting_guest_migrates_between_hosts_without_a_reset() {
    let g = Grid::start(&["h1", "h2"]);
    // With cloud-init data: its seed disk (/dev/vdb) must follow the VM.
    let v = g.run_with("host.name == \"h1\"", "counter", &["--hostname", "counter-1"]);
    let id = v["id"].as_str().unwrap().to_string();
    let src = g.runtime_dir("h1", &id);
    let src_pid = v["pid"].as_u64().unwrap();
    let seed = std::fs::read(src.join("seed.img")).expect("the seed disk on h1");

    // Disk writes (flushed into the overlay, and one only in the guest's page cache), then a
    // counter on the console.
    type_on_console(&src, "echo synced-before-migration > /mnt/synced.txt; sync; echo cached-before-migration > /mnt/cached.txt");
    type_on_console(&src, COUNTER);
    g.wait_until("the counter to tick on h1", Duration::from_secs(60), || ticks(&console_log(&src)).len() >= 3);

    // Bad destinations are refused with the reason, and nothing moves.
    let o = g.cli(&["vm", "migrate", &id, "--to", "h1"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("already runs on host h1"), "{o:?}");
    let o = g.cli(&["vm", "migrate", &id, "--to", "nosuch"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("nosuch"), "{o:?}");

    // Human output: progress, then the downtime and total time.
    let o = g.cli(&["vm", "migrate", &id, "--to", "h2", "--timeout", "240"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "migration failed: {out}{}\n{}", String::from_utf8_lossy(&o.stderr), g.logs());
    assert!(out.contains("migrating") && out.contains("downtime") && out.contains("total"), "{out}");
    let v = g.json(&["vm", "show", &id]);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["host"], "h2", "{v}");
    let m = &v["migration"];
    assert_eq!(m["status"], "completed", "{v}");
    assert_eq!((m["from"].as_str(), m["to"].as_str()), (Some("h1"), Some("h2")));
    assert!(m["downtime_ms"].is_u64() && m["total_ms"].is_u64(), "QEMU's figures recorded: {m}");
    assert_ne!(v["pid"].as_u64().unwrap(), src_pid);
    // The destination QEMU is held by its own cgroup there, like a VM started on h2.
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", v["pid"].as_u64().unwrap())).unwrap();
    assert!(cg.contains(&format!("vgrid/h2/{id}")), "the migrated QEMU is not in h2's cgroup for it: {cg}");

    // The source is gone: no QEMU, no runtime directory; the destination counts on.
    g.wait_until("the source QEMU to quit", Duration::from_secs(30), || !process_alive(src_pid) && !src.exists());
    assert_eq!(qemus_of(&id), 1, "exactly one QEMU runs this VM");
    let dst = g.runtime_dir("h2", &id);
    // Disk and memory came over TLS: the destination QEMU's credentials are h2's grid certificate.
    let cert = std::fs::read_to_string(dst.join("tls/server-cert.pem")).unwrap_or_default();
    let h2_cert = std::fs::read_to_string(g.host_dir("h2").join("tls/node.crt")).unwrap_or_default();
    assert!(cert.contains("BEGIN CERTIFICATE") && cert == h2_cert, "no TLS credentials of h2 in {}", dst.display());
    let before = *ticks(&console_log(&src)).last().unwrap_or(&0);
    g.wait_until("the counter to tick on h2", Duration::from_secs(60), || ticks(&console_log(&dst)).len() >= 3);
    let after = ticks(&console_log(&dst));
    assert!(
        after[0] >= 3 && after.windows(2).all(|w| w[1] == w[0] + 1),
        "the counter continued without a reset: {after:?} (source ended near {before})"
    );
    let log = console_log(&dst);
    assert!(!log.contains(BOOTED_MARKER) && !log.contains("Linux version"), "no boot on the destination:\n{log}");
    // The VM's console log (what `vgrid vm logs` shows) carries the history from h1: one
    // uninterrupted count across the move.
    let full = String::from_utf8_lossy(&g.cli(&["vm", "logs", &id]).stdout).replace('\r', "");
    assert_eq!(full.matches(BOOTED_MARKER).count(), 1, "booted once, on h1:\n{full}");
    let all = ticks(&full);
    let tick_lines: Vec<&str> = full.lines().filter(|l| l.contains("tick ")).collect();
    assert!(
        all.len() >= 6 && all[0] == 1 && all.windows(2).all(|w| w[1] == w[0] + 1),
        "one count across the move: {all:?}; lines:\n{}",
        tick_lines.join("\n")
    );

    // The disk came along: read back with the page cache dropped, so from the destination's
    // overlay (mirrored) and its own image cache (the base).
    type_on_console(
        &dst,
        "echo 3 > /proc/sys/vm/drop_caches; cat /mnt/synced.txt /mnt/cached.txt /mnt/etc/vgrid-sample; echo read-back-done",
    );
    g.wait_until("the disk read-back", Duration::from_secs(60), || console_has_line(&dst, "read-back-done"));
    let log = console_log(&dst);
    for want in ["synced-before-migration", "cached-before-migration", DISK_MARKER] {
        assert!(log.lines().any(|l| l.trim() == want), "{want:?} not read back on h2:\n{log}");
    }
    // The seed is on h2, byte for byte, and the guest reads its label from the same disk.
    assert!(std::fs::read(dst.join("seed.img")).is_ok_and(|d| d == seed), "h2's seed.img differs from h1's");
    // Kernel messages off the console first (a clocksource or RCU note after the switchover
    // could land in the middle of the line), and the label on one line with its name.
    type_on_console(&dst, "dmesg -n 1; echo \"seed-label=[$(dd if=/dev/vdb bs=1 skip=43 count=11 2>/dev/null)]\"; echo seed-read");
    g.wait_until("the seed's label", Duration::from_secs(60), || console_has_line(&dst, "seed-read"));
    let log = console_log(&dst);
    assert!(
        log.lines().any(|l| l.trim() == "seed-label=[CIDATA     ]"),
        "the guest does not see the seed on h2; its console:\n{}",
        log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    // Writes keep working on the destination.
    type_on_console(&dst, "echo written-on-h2 > /mnt/h2.txt; sync; cat /mnt/h2.txt");
    g.wait_until("a write on h2", Duration::from_secs(60), || console_log(&dst).lines().any(|l| l.trim() == "written-on-h2"));

    // The record follows the VM: the coordinator's console and stop reach h2.
    let logs = g.cli(&["vm", "logs", &id]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("written-on-h2"));
    let h2 = g.json(&["host", "show", "h2"]);
    assert!(h2["vms"].as_array().unwrap().iter().any(|r| r["id"] == id.as_str()), "{h2}");
    assert!(h2["orphans"].as_array().unwrap().is_empty(), "{h2}");
    let v = g.json(&["vm", "stop", &id]);
    assert_eq!(v["state"], "stopped", "{v}");
    assert_eq!(qemus_of(&id), 0);
}

#[test]
fn a_guest_dirtying_memory_faster_than_the_link_is_cancelled_and_runs_on_at_the_source() {
    let g = Grid::start(&["h1", "h2"]);
    let v = g.run_on("h1", "dirty");
    let id = v["id"].as_str().unwrap().to_string();
    let src = g.runtime_dir("h1", &id);
    let pid = v["pid"].as_u64().unwrap();
    // 32 MiB of random data copied over and over in tmpfs: tens of MiB/s of dirty memory
    // against a 16 MiB/s cap and a 1 ms downtime limit.
    type_on_console(&src, "dd if=/dev/urandom of=/tmp/r bs=1M count=32 2>/dev/null; (while true; do cp /tmp/r /tmp/x; done) & echo $! > /tmp/dirty.pid; echo dirtying-started");
    g.wait_until("the dirtying loop", Duration::from_secs(120), || console_has_line(&src, "dirtying-started"));
    type_on_console(&src, COUNTER);
    g.wait_until("the counter", Duration::from_secs(60), || !ticks(&console_log(&src)).is_empty());

    let o = g.cli(&["--json", "vm", "migrate", &id, "--to", "h2", "--downtime-ms", "1", "--max-bandwidth", "16", "--timeout", "25"]);
    assert!(!o.status.success(), "a migration that cannot converge must not report success");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {o:?}"));
    assert_eq!(v["migration"]["status"], "cancelled", "{v}");
    assert!(v["migration"]["error"].as_str().unwrap().contains("25 s"), "{v}");
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["host"], "h1", "{v}");
    assert_eq!(v["pid"].as_u64(), Some(pid));

    // The destination kept nothing; the guest still runs at the source, where it was.
    g.wait_until("the destination to be clean", Duration::from_secs(30), || !g.runtime_dir("h2", &id).exists());
    assert_eq!(qemus_of(&id), 1);
    assert!(process_alive(pid));
    let n = ticks(&console_log(&src)).len();
    g.wait_until("the counter to go on at the source", Duration::from_secs(60), || ticks(&console_log(&src)).len() > n + 2);
    let rec: serde_json::Value = serde_json::from_slice(&api_get(&g.coordinator.url, &format!("/api/v1/vms/{id}"))).unwrap();
    assert_eq!(rec["state"], "running");
    // h2 reports nothing: the incoming QEMU is gone.
    g.wait_until("h2 to report no VM", Duration::from_secs(30), || g.json(&["host", "show", "h2"])["vms"].as_array().unwrap().is_empty());
    // And the guest can still migrate once it stops dirtying (the cancelled attempt left no
    // mirror job, NBD node or capability behind that would break the next one).
    type_on_console(&src, "kill $(cat /tmp/dirty.pid); echo stopped-dirtying");
    g.wait_until("the loop to stop", Duration::from_secs(60), || console_has_line(&src, "stopped-dirtying"));
    // Without --to the VM's own requirement still holds: it was pinned to h1, so no other host
    // qualifies, and each says why.
    let o = g.cli(&["vm", "migrate", &id]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("no destination") && err.contains(r#"h2: `(host.name == "h1")`"#), "{err}");
    assert_eq!(g.json(&["vm", "show", &id])["state"], "running");
    let v = g.json(&["vm", "migrate", &id, "--to", "h2", "--timeout", "240"]);
    assert_eq!(v["migration"]["status"], "completed", "{v}");
    assert_eq!(v["host"], "h2");
    assert!(g.cli(&["vm", "stop", &id]).status.success());
}

#[test]
fn a_host_agent_killed_with_sigkill_readopts_its_running_guests() {
    let mut g = Grid::start(&["h1"]);
    let a = g.run_on("h1", "keep");
    let b = g.run_on("h1", "forget");
    let c = g.run_on("h1", "dies");
    let (ia, ib, ic) =
        (a["id"].as_str().unwrap().to_string(), b["id"].as_str().unwrap().to_string(), c["id"].as_str().unwrap().to_string());
    let (pa, pb, pc) = (a["pid"].as_u64().unwrap(), b["pid"].as_u64().unwrap(), c["pid"].as_u64().unwrap());
    let da = g.runtime_dir("h1", &ia);
    type_on_console(&da, COUNTER);
    g.wait_until("the counter", Duration::from_secs(60), || !ticks(&console_log(&da)).is_empty());

    // The agent dies; its guests do not.
    g.host("h1").kill();
    assert!(process_alive(pa) && process_alive(pb) && process_alive(pc), "guests outlive their agent");
    g.wait_until("h1 lost", Duration::from_secs(20), || g.json(&["host", "show", "h1"])["state"] == "lost");
    g.wait_until("its VMs unknown", Duration::from_secs(10), || g.json(&["vm", "show", &ia])["state"] == "unknown");
    // While it is down: one guest dies, and another's record is removed (its QEMU still runs).
    unsafe {
        libc::kill(pc as i32, libc::SIGKILL);
    }
    let o = g.cli(&["vm", "rm", "--force", &ib]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(process_alive(pb));

    g.start_host("h1");
    g.wait_until("h1 ready again", Duration::from_secs(30), || g.json(&["host", "show", "h1"])["state"] == "ready");
    g.wait_until("the kept VM running again", Duration::from_secs(30), || g.json(&["vm", "show", &ia])["state"] == "running");
    // Re-adopted, not restarted: same QEMU, counter still going, no second boot.
    let v = g.json(&["vm", "show", &ia]);
    assert_eq!(v["pid"].as_u64(), Some(pa), "{v}");
    assert_eq!(qemus_of(&ia), 1);
    let n = ticks(&console_log(&da)).len();
    g.wait_until("the counter to go on", Duration::from_secs(60), || ticks(&console_log(&da)).len() > n + 2);
    assert_eq!(console_log(&da).matches(BOOTED_MARKER).count(), 1, "booted once");
    // The agent serves its console and its disk again (QEMU's NBD client reconnects to the
    // block proxy's socket, same path, new process).
    type_on_console(&da, "echo 3 > /proc/sys/vm/drop_caches; cat /mnt/etc/vgrid-sample; echo readopt-read-done");
    g.wait_until("a disk read after re-adoption", Duration::from_secs(60), || console_has_line(&da, "readopt-read-done"));
    assert!(console_log(&da).lines().any(|l| l.trim() == DISK_MARKER), "{}", console_log(&da));
    let logs = g.cli(&["vm", "logs", &ia]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("readopt-read-done"));

    // The one that died while the agent was down is not left running nor stuck: lost (or
    // failed), with the reason.
    g.wait_until("the dead VM resolved", Duration::from_secs(30), || {
        let s = g.json(&["vm", "show", &ic]);
        s["state"] == "lost" || s["state"] == "failed"
    });
    let s = g.json(&["vm", "show", &ic]);
    assert!(s["reason"].as_str().unwrap_or("").contains("h1"), "{s}");
    // The one whose record went is an orphan: reported, listed, never killed silently.
    g.wait_until("the orphan listed", Duration::from_secs(30), || {
        g.json(&["host", "show", "h1"])["orphans"].as_array().map(|o| o.iter().any(|x| x == ib.as_str())).unwrap_or(false)
    });
    let show = String::from_utf8_lossy(&g.cli(&["host", "show", "h1"]).stdout).into_owned();
    assert!(show.contains("orphans:") && show.contains(&ib), "{show}");
    assert!(process_alive(pb), "an orphan is not killed");
    assert!(String::from_utf8_lossy(&std::fs::read(g.dir.path().join("coord.log")).unwrap()).contains("orphans"));

    // None lost or duplicated: the host reports exactly the adopted VM and the orphan.
    let h = g.json(&["host", "show", "h1"]);
    let mut ids: Vec<String> = h["vms"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    let mut want = vec![ia.clone(), ib.clone()];
    want.sort();
    assert_eq!(ids, want, "{h}");
    // An adopted VM still stops normally.
    let v = g.json(&["vm", "stop", &ia]);
    assert_eq!(v["state"], "stopped", "{v}");
    assert!(!process_alive(pa));
    // A stopped agent leaves every guest running, the orphan too (the grid's end kills it).
    g.host("h1").terminate();
    assert!(process_alive(pb), "an agent that stops leaves its guests running");
}

#[test]
fn a_source_agent_killed_during_a_migration_leaves_the_guest_running_at_the_source() {
    let mut g = Grid::start(&["h1", "h2"]);
    let (id, pid, mut cli) = start_a_long_migration(&g, "interrupted");
    let src = g.runtime_dir("h1", &id);
    g.host("h1").kill();
    g.start_host("h1");

    // The migration ends as failed, the record stays on h1 and the guest runs on there.
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = cli.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(180), "vm migrate did not return\n{}", g.logs());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!status.success());
    let v = g.json(&["vm", "show", &id]);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["host"], "h1", "{v}");
    assert_eq!(v["migration"]["status"], "failed", "{v}");
    assert!(v["migration"]["error"].as_str().unwrap().contains("h1"), "{v}");
    assert_eq!(v["pid"].as_u64(), Some(pid));
    let n = ticks(&console_log(&src)).len();
    g.wait_until("the counter to go on at the source", Duration::from_secs(60), || ticks(&console_log(&src)).len() > n + 2);
    g.wait_until("the destination to be clean", Duration::from_secs(30), || !g.runtime_dir("h2", &id).exists());
    assert_eq!(qemus_of(&id), 1, "one QEMU, at the source");
    let v = g.json(&["vm", "stop", &id]);
    assert_eq!(v["state"], "stopped", "{v}");
}

/// Boots a guest on h1 that keeps memory dirty (so a migration capped at 8 MiB/s is still
/// copying a while later) and counts on its console; starts `vm migrate --to h2` in the
/// background and returns once memory is being copied. Returns (id, QEMU pid, the CLI).
fn start_a_long_migration(g: &Grid, name: &str) -> (String, u64, std::process::Child) {
    let v = g.run_on("h1", name);
    let id = v["id"].as_str().unwrap().to_string();
    let pid = v["pid"].as_u64().unwrap();
    let src = g.runtime_dir("h1", &id);
    type_on_console(&src, "dd if=/dev/urandom of=/tmp/r bs=1M count=32 2>/dev/null; (while true; do cp /tmp/r /tmp/x; done) & echo $! > /tmp/dirty.pid; echo dirtying-started");
    g.wait_until("the dirtying loop", Duration::from_secs(120), || console_has_line(&src, "dirtying-started"));
    type_on_console(&src, COUNTER);
    let cli = Command::new(vgrid_bin())
        .args(["--json", "vm", "migrate", &id, "--to", "h2", "--max-bandwidth", "8", "--timeout", "200"])
        .env("VGRID_URL", &g.coordinator.url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    g.wait_until("memory being copied", Duration::from_secs(60), || {
        let v = g.json(&["vm", "show", &id]);
        v["state"] == "migrating" && v["migration"]["phase"].as_str().unwrap_or("").starts_with("copying memory")
    });
    (id, pid, cli)
}

/// After an interrupted migration: the record is on h1 and `running` with the same QEMU, the
/// guest counts on there, h2 kept nothing (no runtime directory, no QEMU, nothing reported),
/// no VM is left `migrating`; and once the guest stops dirtying memory it migrates to h2
/// (nothing half-done — mirror job, NBD node, capabilities — blocks the next attempt).
fn check_settled_at_the_source_then_migrate(g: &Grid, id: &str, pid: u64) -> serde_json::Value {
    let src = g.runtime_dir("h1", id);
    let v = g.json(&["vm", "show", id]);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["host"], "h1", "{v}");
    assert_eq!(v["pid"].as_u64(), Some(pid), "the same QEMU runs on: {v}");
    assert!(process_alive(pid));
    let n = ticks(&console_log(&src)).len();
    g.wait_until("the counter to go on at the source", Duration::from_secs(60), || ticks(&console_log(&src)).len() > n + 2);
    g.wait_until("the destination to be clean", Duration::from_secs(30), || !g.runtime_dir("h2", id).exists());
    g.wait_until("h2 to report no VM", Duration::from_secs(30), || {
        g.json(&["host", "show", "h2"])["vms"].as_array().map(|a| a.is_empty()) == Some(true)
    });
    assert_eq!(qemus_of(id), 1, "one QEMU, at the source");
    let all = g.json(&["vm", "ls"]);
    assert!(all.as_array().unwrap().iter().all(|v| v["state"] != "migrating"), "no VM stuck migrating: {all}");
    let settled = v.clone();

    // The image server too must be known again (after a coordinator restart it registers at
    // its next heartbeat): the destination opens the image through it.
    g.wait_registered(2);
    type_on_console(&src, "kill $(cat /tmp/dirty.pid); echo stopped-dirtying");
    g.wait_until("the loop to stop", Duration::from_secs(60), || console_has_line(&src, "stopped-dirtying"));
    let v = g.json(&["vm", "migrate", id, "--to", "h2", "--timeout", "240"]);
    assert_eq!(v["migration"]["status"], "completed", "{v}");
    assert_eq!(v["host"], "h2", "{v}");
    g.wait_until("the source QEMU to quit", Duration::from_secs(30), || !process_alive(pid));
    assert_eq!(qemus_of(id), 1);
    let dst = g.runtime_dir("h2", id);
    let n = ticks(&console_log(&dst)).len();
    g.wait_until("the counter to go on at h2", Duration::from_secs(60), || ticks(&console_log(&dst)).len() > n + 2);
    let v = g.json(&["vm", "stop", id]);
    assert_eq!(v["state"], "stopped", "{v}");
    settled
}

#[test]
fn a_destination_agent_killed_during_a_migration_leaves_the_guest_running_at_the_source() {
    let mut g = Grid::start(&["h1", "h2"]);
    let (id, pid, mut cli) = start_a_long_migration(&g, "dest-killed");
    // The destination agent dies (its incoming QEMU does not); it comes back a little later,
    // finds that QEMU still waiting for the migration and ends it.
    g.host("h2").kill();
    std::thread::sleep(Duration::from_secs(2));
    g.start_host("h2");

    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = cli.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(180), "vm migrate did not return\n{}", g.logs());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!status.success(), "a migration whose destination died must not report success");
    g.wait_until("the migration to settle", Duration::from_secs(60), || g.json(&["vm", "show", &id])["state"] != "migrating");
    let v = check_settled_at_the_source_then_migrate(&g, &id, pid);
    assert_eq!(v["migration"]["status"], "failed", "{v}");
    assert!(v["migration"]["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    let h2_log = std::fs::read_to_string(&g.hosts.iter().find(|(n, _)| n == "h2").unwrap().1.log).unwrap_or_default();
    assert!(h2_log.contains("killing a QEMU left waiting for an incoming migration") || h2_log.contains("not adopted"), "{h2_log}");
}

#[test]
fn a_coordinator_restarted_during_a_migration_settles_it() {
    let mut g = Grid::start(&["h1", "h2"]);
    let (id, pid, mut cli) = start_a_long_migration(&g, "coord-restart");
    g.restart_coordinator();
    // The CLI lost its coordinator mid-way.
    let _ = cli.kill();
    let _ = cli.wait();

    // After the restart the migration settles: cancelled at the source, the record running
    // there, never left `migrating`.
    g.wait_until("the migration to settle after the restart", Duration::from_secs(120), || {
        let v = g.json(&["vm", "show", &id]);
        v["state"] != "migrating" && v["migration"]["status"] != "active"
    });
    let v = check_settled_at_the_source_then_migrate(&g, &id, pid);
    assert_eq!(v["migration"]["status"], "failed", "{v}");
    assert!(v["migration"]["error"].as_str().unwrap_or("").contains("coordinator restarted"), "{v}");
}

/// What a guest's console shows when its disk failed under it.
fn io_errors(console: &str) -> Vec<&str> {
    console.lines().filter(|l| l.contains("I/O error") || l.contains("EXT4-fs error") || l.contains("Buffer I/O")).collect()
}

/// Issue 13: `kill -TERM` to a host agent (a service manager restarting it for an upgrade)
/// ends it promptly, even with connections held open to its API, and leaves its guest running;
/// a guest reading its disk meanwhile waits; the next agent adopts the same QEMU.
#[test]
fn a_host_agent_stopped_with_sigterm_leaves_its_guest_to_the_next_agent() {
    let mut g = Grid::start(&["h1"]);
    let v = g.run_on("h1", "stays");
    let (id, pid) = (v["id"].as_str().unwrap().to_string(), v["pid"].as_u64().unwrap());
    let dir = g.runtime_dir("h1", &id);
    type_on_console(&dir, COUNTER);
    g.wait_until("the counter", Duration::from_secs(60), || !ticks(&console_log(&dir)).is_empty());

    // Connections to the agent's API stay open: an idle keep-alive one and a stuck request.
    let url = g.json(&["host", "show", "h1"])["ad"]["url"].as_str().unwrap().to_string();
    let mut held = [hold_connection(&url, true), hold_connection(&url, false)];
    let log = g.host("h1").log.clone();
    let t0 = Instant::now();
    let exited = g.host("h1").terminate();
    let exit_s = t0.elapsed().as_secs_f64();
    eprintln!("figure: the host agent exited {exit_s:.1} s after SIGTERM (two connections held open)");
    assert!(exited, "the agent did not exit within 30 s of SIGTERM\n{}", g.logs());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("leaving 1 guests running for the next agent to adopt"), "{text}");
    assert!(process_alive(pid), "the guest outlives its agent");
    assert!(dir.join("launch.json").exists() && dir.join("qmp.sock").exists());
    for c in held.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    // With no agent (no block proxy), the guest reads its disk: the read waits.
    type_on_console(&dir, "echo 3 > /proc/sys/vm/drop_caches; cat /mnt/etc/vgrid-sample; echo gap-read-done");
    std::thread::sleep(Duration::from_secs(3));

    g.start_host("h1");
    g.wait_until("h1 ready again", Duration::from_secs(30), || g.json(&["host", "show", "h1"])["state"] == "ready");
    g.wait_until("the VM running again", Duration::from_secs(30), || g.json(&["vm", "show", &id])["state"] == "running");
    let v = g.json(&["vm", "show", &id]);
    assert_eq!(v["pid"].as_u64(), Some(pid), "re-adopted, not restarted: {v}");
    assert_eq!(qemus_of(&id), 1);
    g.wait_until("the read begun without an agent to finish", Duration::from_secs(60), || console_has_line(&dir, "gap-read-done"));
    assert!(console_log(&dir).lines().any(|l| l.trim() == DISK_MARKER), "{}", console_log(&dir));
    let n = ticks(&console_log(&dir)).len();
    g.wait_until("the counter to go on", Duration::from_secs(60), || ticks(&console_log(&dir)).len() > n + 2);
    assert_eq!(console_log(&dir).matches(BOOTED_MARKER).count(), 1, "booted once");
    type_on_console(&dir, "echo still-answering");
    g.wait_until("the guest to answer", Duration::from_secs(60), || console_has_line(&dir, "still-answering"));
    assert!(io_errors(&console_log(&dir)).is_empty(), "{}", console_log(&dir));
}

/// Follows `vgrid host drain NAME --wait --json`; returns the finished drain.
fn drain(g: &Grid, host: &str) -> serde_json::Value {
    let t0 = Instant::now();
    let o = g.cli(&["--json", "host", "drain", host, "--wait"]);
    eprintln!("figure: draining {host} took {:.1} s", t0.elapsed().as_secs_f64());
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stderr), g.logs());
    let d: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(d["finished"].is_u64(), "{d}");
    d
}

/// `vgrid futures` for host `host`: (could start, why not).
fn future_of(g: &Grid, host: &str) -> (bool, String) {
    let f = g.json(&["futures"]);
    let h = f.as_array().unwrap().iter().find(|h| h["host"] == host).cloned().unwrap_or_else(|| panic!("{f}"));
    (h["could_start"] == true, h["why_not"].as_str().unwrap_or("").to_string())
}

/// Draining a host with another one in the grid: its VM moves there live, it gets no new
/// placement (the refusal names the drain), across a coordinator restart; undrain restores it.
#[test]
fn a_drained_host_hands_its_vm_to_another_host_and_gets_no_placement() {
    let mut g = Grid::start(&["h1", "h2"]);
    // h2 out of service first: an unpinned VM can only land on h1.
    let d = drain(&g, "h2");
    assert_eq!(d["vms"].as_array().unwrap().len(), 0, "{d}");
    let v = g.run_where("", "mover");
    let (id, pid) = (v["id"].as_str().unwrap().to_string(), v["pid"].as_u64().unwrap());
    assert_eq!(v["host"], "h1", "nothing is placed on a draining host: {v}");
    let o = g.cli(&["host", "undrain", "h2"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("back in service"), "{o:?}");
    type_on_console(&g.runtime_dir("h1", &id), COUNTER);

    let text = g.cli(&["host", "drain", "h1"]);
    assert!(text.status.success(), "{}", String::from_utf8_lossy(&text.stderr));
    let d = drain(&g, "h1");
    let vms = d["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "{d}");
    assert_eq!((vms[0]["id"].as_str(), vms[0]["step"].as_str(), vms[0]["to"].as_str()), (Some(id.as_str()), Some("migrated"), Some("h2")));
    let v = g.json(&["vm", "show", &id]);
    assert_eq!((v["state"].as_str(), v["host"].as_str()), (Some("running"), Some("h2")), "{v}");
    g.wait_until("the source QEMU to go", Duration::from_secs(30), || !process_alive(pid));
    let dir = g.runtime_dir("h2", &id);
    let n = ticks(&console_log(&dir)).len();
    g.wait_until("the counter to go on at h2", Duration::from_secs(60), || ticks(&console_log(&dir)).len() > n + 2);

    // h1 is out of service: listed so, refused by the scheduler with the reason.
    assert_eq!(g.json(&["host", "show", "h1"])["draining"], true);
    let ls = String::from_utf8_lossy(&g.cli(&["host", "ls"]).stdout).into_owned();
    assert!(ls.lines().any(|l| l.contains(" h1 ") && l.contains("ready, draining")), "{ls}");
    let (could, why) = future_of(&g, "h1");
    assert!(!could && why.contains("draining") && why.contains("vgrid host undrain h1"), "{why}");
    let o = g.cli(&["vm", "run", "sample", "--name", "refused", "--no-wait", "--require", "host.name == \"h1\""]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("draining"), "{err}");

    // The drain survives a coordinator restart.
    g.restart_coordinator();
    g.wait_registered(2);
    assert_eq!(g.json(&["host", "show", "h1"])["draining"], true);
    assert!(!future_of(&g, "h1").0);

    let o = g.cli(&["host", "undrain", "h1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(g.json(&["host", "show", "h1"]).get("draining").is_none_or(|d| d == false));
    g.wait_until("h1 to take VMs again", Duration::from_secs(30), || future_of(&g, "h1").0);
}

/// Draining the only host: its VM cannot move, so it is suspended to the image server; after
/// undrain it resumes and goes on.
#[test]
fn draining_the_only_host_suspends_its_vm_which_resumes_after_undrain() {
    let g = Grid::start(&["h1"]);
    let v = g.run_on("h1", "sleeper");
    let id = v["id"].as_str().unwrap().to_string();
    console_until(&g, &g.runtime_dir("h1", &id), "echo before-drain > /tmp/mark; echo mark-$((1+1))", "mark-2");
    let d = drain(&g, "h1");
    let vms = d["vms"].as_array().unwrap();
    assert_eq!((vms.len(), vms[0]["step"].as_str()), (1, Some("suspended")), "{d}");
    assert!(vms[0]["detail"].as_str().unwrap_or("").contains("no destination"), "{d}");
    assert_eq!(g.json(&["vm", "show", &id])["state"], "suspended");
    g.wait_until("h1 to report no VM", Duration::from_secs(30), || {
        g.json(&["host", "show", "h1"])["vms"].as_array().map(|a| a.len()) == Some(0)
    });

    let o = g.cli(&["host", "undrain", "h1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = g.json(&["vm", "resume", &id, "--timeout", "300"]);
    assert_eq!((r["state"].as_str(), r["host"].as_str()), (Some("running"), Some("h1")), "{r}");
    let dir = g.runtime_dir("h1", &id);
    console_until(&g, &dir, "cat /tmp/mark; echo resumed-$((6*7))", "resumed-42");
    assert!(console_has_line(&dir, "before-drain"), "{}", console_log(&dir));
}
