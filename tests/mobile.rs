//! Mobile VMs end to end (issue 5, parts 1 and 2), with real guests: warm images restored
//! instead of booted, and suspend on one host process / resume on another one.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Types `cmd` on the serial console of the VM whose runtime directory is `dir`. Keep the
/// answer until the command's output shows: QEMU takes typed bytes as the guest's UART accepts
/// them and drops the rest when the client goes away.
#[must_use]
fn type_on_console(dir: &Path, cmd: &str) -> std::os::unix::net::UnixStream {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(dir.join("console.sock"))
        .unwrap_or_else(|e| panic!("console socket in {}: {e}", dir.display()));
    s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    s
}

fn console_text(dir: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(dir.join("console.log")).unwrap_or_default()).into_owned()
}

/// Waits until `f(console)` holds for the console log in `dir`.
fn wait_console(dir: &Path, what: &str, timeout: Duration, f: impl Fn(&str) -> bool) -> String {
    let t0 = Instant::now();
    loop {
        let c = console_text(dir);
        if f(&c) {
            return c;
        }
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}; console of {}:\n{c}{}",
            dir.display(),
            runtime_state(dir)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a runtime directory holds and its QEMU's log, for a failure's message.
fn runtime_state(dir: &Path) -> String {
    let files: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| format!("{} ({} bytes)", e.file_name().to_string_lossy(), e.metadata().map(|m| m.len()).unwrap_or(0)))
            .collect(),
        Err(e) => vec![format!("unreadable: {e}")],
    };
    let log = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
    format!("\nfiles: {}\nqemu.log:\n{log}", files.join(", "))
}

/// The `count=N` values printed on a console, in order.
fn counts(console: &str) -> Vec<u64> {
    console
        .split("count=")
        .skip(1)
        .filter_map(|s| {
            let d: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
            // Only whole lines (a number followed by the line end).
            if s[d.len()..].starts_with(['\r', '\n']) {
                d.parse().ok()
            } else {
                None
            }
        })
        .collect()
}

/// A coordinator, one image server and host agents as separate processes.
struct Grid {
    dir: tempfile::TempDir,
    coordinator: Role,
    server: Option<Role>,
    hosts: Vec<Role>,
}

impl Grid {
    fn start(hosts: &[&str]) -> Grid {
        let dir = tempfile::Builder::new().prefix("vgm").tempdir_in("/tmp").unwrap();
        let coord_data = dir.path().join("coord");
        let coordinator = Role::coordinator("127.0.0.1:0", &coord_data, 3, dir.path().join("coord.log"));
        let mut g = Grid { dir, coordinator, server: None, hosts: vec![] };
        g.start_server();
        for h in hosts {
            let data = g.dir.path().join(h);
            let r = Role::start(
                &[
                    "host",
                    "--coordinator",
                    &g.coordinator.url,
                    "--listen",
                    "127.0.0.1:0",
                    "--name",
                    h,
                    "--data-dir",
                    data.to_str().unwrap(),
                ],
                g.dir.path().join(format!("{h}.log")),
            );
            g.hosts.push(r);
        }
        g
    }

    /// (Re)starts the image server `is0` on its data directory (a new port each time).
    fn start_server(&mut self) {
        let n = std::fs::read_dir(self.dir.path()).map(|d| d.count()).unwrap_or(0);
        self.server = Some(common::grid::image_server_is0(self.dir.path(), &self.coordinator.url, &format!("is0-{n}.log"), &[]));
    }

    fn server_url(&self) -> String {
        self.server.as_ref().unwrap().url.clone()
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        cli_at(&self.coordinator.url, args)
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let o = self.cli(&a);
        assert!(o.status.success(), "vgrid {args:?}: {}\n{}", String::from_utf8_lossy(&o.stderr), self.logs());
        serde_json::from_slice(&o.stdout).unwrap()
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for f in ["coord.log", "coord2.log", "coord3.log", "coord4.log", "h1.log", "h2.log"] {
            let t = std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            s.push_str(&format!("--- {f}\n{}\n", lines[lines.len().saturating_sub(25)..].join("\n")));
        }
        s
    }

    fn wait_until(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Imports the cached sample guest as `sample` into the image server.
    fn import_sample(&self) {
        let s = sample_guest().unwrap();
        let o = Command::new(vgrid_bin())
            .args([
                "image",
                "import",
                s.disk.to_str().unwrap(),
                "--name",
                "sample",
                "--kernel",
                s.kernel.to_str().unwrap(),
                "--initrd",
                s.initrd.to_str().unwrap(),
                "--cmdline",
                &s.cmdline,
                "--image-server",
                &self.server_url(),
            ])
            .env("VGRID_URL", &self.coordinator.url)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    /// Boots `sample` on `host` to its prompt as `NAME1` (a timeout and one retry, as `NAME2`).
    fn boot_on(&self, host: &str, name: &str) -> serde_json::Value {
        let _slot = boot_slot().unwrap();
        let require = format!("host.name == {host:?}");
        let mut last = String::new();
        for attempt in 1..=2 {
            let name = format!("{name}{attempt}");
            let o = self.cli(&[
                "--json",
                "vm",
                "run",
                "sample",
                "--name",
                &name,
                "--require",
                &require,
                "--wait-for",
                PROMPT,
                "--timeout",
                "120",
            ]);
            if o.status.success() {
                return serde_json::from_slice(&o.stdout).unwrap();
            }
            last = String::from_utf8_lossy(&o.stderr).into_owned();
            eprintln!("boot attempt {attempt} failed: {last}");
            let _ = self.cli(&["vm", "rm", "--force", &name]);
        }
        panic!("the guest did not boot twice: {last}\n{}", self.logs())
    }

    fn runtime_dir(&self, host: &str, id: &str) -> PathBuf {
        self.dir.path().join(host).join("vms").join(id)
    }
}

impl Drop for Grid {
    fn drop(&mut self) {
        // Hosts first (they stop their guests), then whatever outlived them (QEMUs and RAM
        // pagers outlive a killed agent by design).
        for h in &mut self.hosts {
            h.terminate();
        }
        kill_guests_under(self.dir.path());
    }
}

/// A guest counts on its console and has written a file to its disk and one to its tmpfs;
/// suspending it fails while the image server is down (and it keeps counting), succeeds once
/// the server is back; it resumes on the other host process, where the count goes on from
/// where it was and both files are there, without a boot.
#[test]
fn suspended_guest_resumes_on_another_host_and_keeps_counting() {
    let mut g = Grid::start(&["h1", "h2"]);
    g.wait_until("two hosts", Duration::from_secs(30), || g.json(&["host", "ls"]).as_array().map(|a| a.len()) == Some(2));
    g.import_sample();

    // Boot on h1 (a timeout and one retry).
    let vm = g.boot_on("h1", "counter");
    let id = vm["id"].as_str().unwrap().to_string();
    assert_eq!(vm["host"], "h1");
    let d1 = g.runtime_dir("h1", &id);
    write_files_and_count(&d1);
    suspend_fails_while_the_server_is_down(&mut g, &id, &d1);
    let coord_data = g.dir.path().join("coord");
    interrupted_suspend_settles(&mut g, &id, &d1, &coord_data);
    let (url, last_on_h1) = suspend_with_the_server_back(&mut g, &id, &d1);
    resume_on_h2_and_migrate_back(&g, &id, &d1, last_on_h1);

    // A suspended VM cannot be stopped; a running one cannot be resumed.
    let o = g.cli(&["vm", "resume", &id]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("only a suspended VM"));

    // Suspend again (now from h1), then remove: the saved images go with the VM.
    let s2 = g.json(&["vm", "suspend", &id]);
    assert_eq!(s2["saved"]["image"], format!("{id}.saved@2"));
    let o = g.cli(&["vm", "stop", &id]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("suspended"));

    // The coordinator dies while a resume is under way, twice: once after h2 has the launch
    // (h2 goes on restoring and the restarted coordinator finds the VM running there), once
    // before the launch reaches h1 (h1 is frozen: the restarted coordinator, which h1 tells it
    // does not know the VM, sends the launch again). Neither ends failed; the count goes on.
    for (n, host, arrived) in [(3, "h2", true), (4, "h1", false)] {
        if n == 4 {
            let s = g.json(&["vm", "suspend", &id]);
            assert_eq!(s["vm"]["state"], "suspended", "{s}");
        }
        interrupted_resume_settles(&mut g, &id, &coord_data, n, host, arrived);
    }
    g.json(&["vm", "rm", "--force", &id]);
    let images = g.json(&["image", "ls", "--image-server", &url]);
    assert!(!images.to_string().contains(&format!("{id}.saved")), "the saved image must be deleted with the VM: {images}");
}

/// Starts the coordinator again on its address and data directory, logging to `log`.
fn restart_coordinator(g: &mut Grid, coord_data: &Path, log: PathBuf) {
    let listen = g.coordinator.url.trim_start_matches("https://").to_string();
    g.coordinator = Role::coordinator(&listen, coord_data, 3, log);
}

/// A file on the disk (not synced: it may live only in the guest's page cache) and one in
/// tmpfs, then the counter.
fn write_files_and_count(d1: &Path) {
    {
        let _c = type_on_console(
            d1,
            "echo disk-before-suspend > /mnt/mobile.txt; echo tmp-before-suspend > /tmp/mobile.txt; echo files-written",
        );
        wait_console(d1, "files written", Duration::from_secs(60), |c| c.lines().any(|l| l.trim() == "files-written"));
    }
    {
        let _c = type_on_console(d1, "i=0; while true; do i=$((i+1)); echo count=$i; sleep 1; done &");
        wait_console(d1, "count=3", Duration::from_secs(120), |c| counts(c).contains(&3));
    }
}

/// Image server down: the suspend fails and the guest keeps running and counting.
fn suspend_fails_while_the_server_is_down(g: &mut Grid, id: &str, d1: &Path) {
    g.server.take().unwrap().kill();
    let o = g.cli(&["vm", "suspend", id]);
    assert!(!o.status.success(), "suspend with the image server down must fail");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("keeps running"), "{err}");
    assert_eq!(g.json(&["vm", "show", id])["state"], "running", "{err}");
    let before = counts(&console_text(d1)).last().copied().unwrap();
    wait_console(d1, "the count to go on after the failed suspend", Duration::from_secs(120), |c| {
        counts(c).last().copied().unwrap_or(0) >= before + 2
    });
}

/// A coordinator that dies while the host is saving (here: retrying the dead image server)
/// settles the VM when it comes back: the save failed, so it is running again.
fn interrupted_suspend_settles(g: &mut Grid, id: &str, d1: &Path, coord_data: &Path) {
    let suspender = {
        let url = g.coordinator.url.clone();
        let id = id.to_string();
        std::thread::spawn(move || Command::new(vgrid_bin()).args(["vm", "suspend", &id]).env("VGRID_URL", url).output().unwrap())
    };
    g.wait_until("the VM to be suspending", Duration::from_secs(30), || g.json(&["vm", "show", id])["state"] == "suspending");
    g.coordinator.kill();
    let _ = suspender.join();
    let log = g.dir.path().join("coord2.log");
    restart_coordinator(g, coord_data, log);
    g.wait_until("the interrupted suspend to settle", Duration::from_secs(60), || {
        let v = g.json(&["vm", "show", id]);
        v["state"] == "running" && v["reason"].as_str().unwrap_or("").contains("did not complete")
    });
    let before = counts(&console_text(d1)).last().copied().unwrap();
    wait_console(d1, "the count to go on after the interrupted suspend", Duration::from_secs(120), |c| {
        counts(c).last().copied().unwrap_or(0) >= before + 2
    });
}

/// The server is back (same data, new port): the hosts learn its URL at their next beats, and
/// the suspend succeeds. Returns the server's URL and the last count on h1.
fn suspend_with_the_server_back(g: &mut Grid, id: &str, d1: &Path) -> (String, u64) {
    g.start_server();
    let url = g.server_url();
    g.wait_until("the hosts to know the new image server URL", Duration::from_secs(30), || {
        std::fs::read_to_string(g.dir.path().join("h1.log")).unwrap_or_default().contains(&url)
            || g.json(&["host", "ls"]).is_array() && {
                String::from_utf8_lossy(&api_get(&g.coordinator.url, "/api/v1/image-servers")).contains(&url)
            }
    });
    std::thread::sleep(Duration::from_secs(3));
    let s = g.json(&["vm", "suspend", id]);
    assert_eq!(s["vm"]["state"], "suspended", "{s}");
    let saved = s["saved"]["image"].as_str().unwrap().to_string();
    assert_eq!(saved, format!("{id}.saved@1"));
    assert_eq!(s["saved"]["parent"], "sample@1");
    assert!(s["saved"]["disk_chunks_new"].as_u64().unwrap() >= 1, "the file written to /mnt changed the disk: {s}");
    assert!(s["saved"]["disk_chunks_new"].as_u64().unwrap() < s["saved"]["disk_chunks_total"].as_u64().unwrap());
    let last_on_h1 = counts(&console_text(d1)).last().copied().unwrap();
    // h1 is free: no QEMU, no VM in its report.
    g.wait_until("h1 to report no VM", Duration::from_secs(20), || {
        g.json(&["host", "show", "h1"])["vms"].as_array().map(|a| a.is_empty()) == Some(true)
    });
    let manifest = g.json(&["image", "show", &saved, "--image-server", &url]);
    assert!(manifest["state"]["blob"]["size"].as_u64().unwrap() > 0, "{manifest}");
    assert_eq!(manifest["state"]["meta"]["memory_mib"], 256);
    (url, last_on_h1)
}

/// Resume on h2: the count continues; both files are there; no boot. Then the resumed VM (QEMU
/// started without a kernel: it is in the restored memory) migrates live back to h1, whose
/// QEMU also starts without one; the count goes on there.
fn resume_on_h2_and_migrate_back(g: &Grid, id: &str, d1: &Path, last_on_h1: u64) {
    let r = g.json(&["vm", "resume", id, "--host", "h2", "--timeout", "300"]);
    assert_eq!(r["state"], "running", "{r}");
    assert_eq!(r["host"], "h2");
    let d2 = g.runtime_dir("h2", id);
    let c2 = wait_console(&d2, "the count to go on on h2", Duration::from_secs(120), |c| counts(c).len() >= 2);
    let first_on_h2 = counts(&c2)[0];
    assert!(
        first_on_h2 >= last_on_h1 && first_on_h2 <= last_on_h1 + 2,
        "the count must continue where it stopped: last on h1 {last_on_h1}, first on h2 {first_on_h2}"
    );
    g.wait_until("h1 to drop the old runtime directory", Duration::from_secs(20), || !d1.exists());
    {
        let _c = type_on_console(&d2, "cat /mnt/mobile.txt /tmp/mobile.txt");
        let c2 = wait_console(&d2, "the files on h2", Duration::from_secs(60), |c| c.contains("tmp-before-suspend"));
        assert!(c2.contains("disk-before-suspend"), "{c2}");
        assert!(!c2.contains(BOOTED_MARKER) && !c2.contains(DISK_MARKER), "the guest booted instead of resuming:\n{c2}");
    }
    // A console client on h2 that stops reading: the guest's serial console stalls there (its
    // UART waits on the full socket), and the count with it.
    let stalled = type_on_console(&d2, "dmesg; echo dmesg-done-$((6*7))");
    console_stalls(&d2);

    // The resumed VM (QEMU started without a kernel: it is in the restored memory) migrates
    // live back to h1, whose QEMU also starts without one; the count goes on there, the stall
    // left behind (QEMU re-arms a waiting UART only on a console client connected at load).
    let m = g.json(&["vm", "migrate", id, "--to", "h1", "--timeout", "240"]);
    assert_eq!(m["migration"]["status"], "completed", "{m}");
    assert_eq!(m["host"], "h1", "{m}");
    let d1 = g.runtime_dir("h1", id);
    let n = counts(&console_text(&d1)).len();
    wait_console(&d1, "the count to go on on h1 after the migration", Duration::from_secs(120), |c| {
        counts(c).len() >= n + 2 && c.contains("dmesg-done-42")
    });
    drop(stalled);
    // The disk is the saved image's (with the write from before the suspend), read back with
    // the page cache dropped.
    {
        let _c = type_on_console(&d1, "echo 3 > /proc/sys/vm/drop_caches; echo read-$(cat /mnt/mobile.txt)");
        wait_console(&d1, "the disk file on h1", Duration::from_secs(60), |c| c.contains("read-disk-before-suspend"));
    }
    let spec = std::fs::read_to_string(d1.join("spec.json")).unwrap();
    assert!(spec.contains("\"restore\""), "{spec}");
}

/// Waits until the console log in `dir` stops growing for three seconds while the guest
/// counts every second: its serial console is stalled.
fn console_stalls(dir: &Path) {
    let t0 = Instant::now();
    let (mut len, mut since) = (0, Instant::now());
    loop {
        let now = std::fs::metadata(dir.join("console.log")).map(|m| m.len()).unwrap_or(0);
        if now != len {
            (len, since) = (now, Instant::now());
        } else if since.elapsed() > Duration::from_secs(3) {
            assert!(!console_text(dir).contains("dmesg-done-42"), "the console did not stall");
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the console of {} did not stall in 60 s", dir.display());
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One resume interrupted by a coordinator restart (`n`: its number, for the log), to `host`,
/// after (`arrived`) or before the launch reached it.
fn interrupted_resume_settles(g: &mut Grid, id: &str, coord_data: &Path, n: u32, host: &str, arrived: bool) {
    let before = g.runtime_dir(if host == "h2" { "h1" } else { "h2" }, id);
    let last = counts(&console_text(&before)).last().copied().unwrap();
    let hpid = g.hosts[if host == "h1" { 0 } else { 1 }].child.as_ref().unwrap().id().to_string();
    if !arrived {
        assert!(Command::new("kill").args(["-STOP", &hpid]).status().unwrap().success());
    }
    let token = json_at(&g.coordinator.url, &["login"])["token"].as_str().unwrap().to_string();
    let asked = std::time::SystemTime::now() - Duration::from_secs(1);
    let o = curl_for(&g.coordinator.url)
        .args(["-X", "POST", "-H", &format!("authorization: Bearer {token}"), "-H", "content-type: application/json"])
        .args(["-d", &format!(r#"{{"host":"{host}"}}"#), &format!("{}/api/v1/vms/{id}/resume", g.coordinator.url)])
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(answer.contains("\"pending\"") || answer.contains("\"starting\"") || answer.contains("\"running\""), "{answer}");
    let dir = g.runtime_dir(host, id);
    if arrived {
        // This launch's spec (the VM ran on this host before: an older one may be there).
        g.wait_until("the launch to reach the host", Duration::from_secs(30), || {
            std::fs::metadata(dir.join("spec.json")).and_then(|m| m.modified()).is_ok_and(|t| t >= asked)
        });
    } else {
        std::thread::sleep(Duration::from_millis(300));
    }
    g.coordinator.kill();
    if !arrived {
        assert!(Command::new("kill").args(["-CONT", &hpid]).status().unwrap().success());
    }
    let log = g.dir.path().join(format!("coord{n}.log"));
    restart_coordinator(g, coord_data, log.clone());
    g.wait_until("the interrupted resume to settle", Duration::from_secs(120), || {
        let v = g.json(&["vm", "show", id]);
        assert_ne!(v["state"], "failed", "{v}");
        v["state"] == "running"
    });
    assert_eq!(g.json(&["vm", "show", id])["host"], host);
    let sent_again = std::fs::read_to_string(&log).unwrap_or_default().contains("sending it again");
    assert_eq!(sent_again, !arrived, "the restarted coordinator sends the launch again only when it never arrived:\n{}", g.logs());
    wait_console(&dir, "the count to go on after the interrupted resume", Duration::from_secs(120), |c| {
        counts(c).iter().any(|&n| n > last + 1)
    });
}

/// A booted guest saved as a warm image; two VMs started from it come up without booting,
/// with the shell state of the original, while the original keeps running.
#[test]
fn warm_image_starts_two_vms_without_booting() {
    let up = Up::start();
    up.import_sample();
    let v = up.run_vm("sample", "origin", PROMPT, &[]);
    let id = v["id"].as_str().unwrap().to_string();
    console_exec(&up, &id, "export WARM=forty-two; echo warm-file > /tmp/warm.txt; echo set-$WARM", "set-forty-two");

    let s = up.json(&["image", "snapshot", &id, "--name", "warm"]);
    assert_eq!(s["image"], "warm@1", "{s}");
    assert_eq!(s["parent"], "sample@1");
    assert!(s["state_bytes"].as_u64().unwrap() > 0);
    // The original goes on.
    assert_eq!(up.vm(&id)["state"], "running");
    console_exec(&up, &id, "echo still-$WARM", "still-forty-two");

    // Only the state and the changed chunks are new: the disk shares the parent's chunks.
    let m = up.json(&["image", "show", "warm"]);
    let p = up.json(&["image", "show", "sample"]);
    assert_eq!(m["parent"], serde_json::json!({"name": "sample", "version": 1}));
    assert_eq!(m["disk"]["size"], p["disk"]["size"]);
    let (md, pd) = (m["disk"]["chunks"].as_array().unwrap(), p["disk"]["chunks"].as_array().unwrap());
    let shared = md.iter().zip(pd).filter(|(a, b)| a == b).count();
    assert!(shared * 10 >= pd.len() * 9, "most disk chunks must be the parent's: {shared} of {}", pd.len());

    let ls = up.json(&["image", "ls"]);
    assert!(ls.to_string().contains("\"warm\":true"), "image ls marks the warm image: {ls}");

    // Asking for other cpus/memory than the state was saved with is a clear error.
    let o = up.cli(&["vm", "run", "warm", "--memory", "512"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("warm image") && e.contains("--memory 256"), "{e}");

    // Bad input: clear errors naming the object and cause.
    let o = up.cli(&["image", "snapshot", &id, "--name", "../etc"]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("invalid image name"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = up.cli(&["vm", "suspend", "nosuch"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no VM with id or name \"nosuch\""));
    let o = up.cli(&["vm", "resume", &id]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("only a suspended VM can be resumed"));
    // The OpenAPI document describes the new endpoints.
    let o = curl_for(&up.url).arg(format!("{}/api/openapi.json", up.url)).output().unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for p in ["suspend", "resume", "snapshot"] {
        assert!(doc["paths"][format!("/api/v1/vms/{{id}}/{p}")]["post"].is_object(), "{p} missing from the OpenAPI document");
    }

    let mut ids = vec![];
    for name in ["warm-a", "warm-b"] {
        let w = up.json(&["vm", "run", "warm", "--name", name, "--timeout", "300"]);
        assert_eq!(w["state"], "running", "{w}");
        ids.push(w["id"].as_str().unwrap().to_string());
    }
    for w in &ids {
        console_exec(&up, w, "echo got-$WARM-$(cat /tmp/warm.txt)", "got-forty-two-warm-file");
        let log = String::from_utf8_lossy(&std::fs::read(up.runtime_dir(w).join("console.log")).unwrap()).into_owned();
        assert!(!log.contains(BOOTED_MARKER) && !log.contains(DISK_MARKER), "VM {w} booted instead of restoring:\n{log}");
    }
    // A restored VM starts without its kernel (it is in the saved memory): nothing to boot
    // again, so a guest reboot ends it (stopped) instead of leaving it hanging in firmware.
    let spec = std::fs::read_to_string(up.runtime_dir(&ids[1]).join("spec.json")).unwrap();
    assert!(spec.contains("\"restore\"") && !spec.contains("\"kernel\""), "{spec}");
    let _c = type_on_console(&up.runtime_dir(&ids[1]), "reboot -f");
    up.wait_until("the rebooted warm VM to stop", Duration::from_secs(60), || up.vm(&ids[1])["state"] == "stopped");
    assert_eq!(up.vm(&ids[0])["state"], "running");
}

/// A resume is admitted like a create: over the owner's quota, or with a host port another VM
/// forwards now, it is refused with an error naming the cause; a host port taken on the host
/// itself makes the restore fail before anything is fetched. Each time the VM stays suspended
/// and loses nothing: once the cause is gone it resumes with its state.
#[test]
fn resume_rechecks_quota_and_port_forwards() {
    let up = Up::start();
    up.import_sample();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let fwd = format!("{port}:22");
    let v = up.run_vm("sample", "fwd", PROMPT, &["--forward", &fwd]);
    let id = v["id"].as_str().unwrap().to_string();
    let owner = v["owner"].as_str().unwrap().to_string();
    let name = v["name"].as_str().unwrap().to_string();
    console_exec(&up, &id, "echo kept-state > /tmp/kept.txt; echo wrote-$((6*7))", "wrote-42");
    let s = up.json(&["vm", "suspend", &id]);
    assert_eq!(s["vm"]["state"], "suspended", "{s}");
    let suspended = |why: &str| {
        let v = up.vm(&id);
        assert_eq!(v["state"], "suspended", "{why}: {v}");
        assert!(v["saved_image"].as_str().is_some_and(|s| s.starts_with(&format!("{id}.saved@"))), "{why}: {v}");
        v
    };

    // Over the owner's quota (a suspended VM holds none): refused with 403, still suspended.
    up.ok(&["user", "quota", &owner, "--max-memory", "128"]);
    let o = up.cli(&["vm", "resume", &id]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "a resume over the quota must fail");
    assert!(
        err.contains("403")
            && err.contains("quota exceeded")
            && err.contains(&format!("cannot resume VM {name}"))
            && err.contains("stays suspended"),
        "{err}"
    );
    suspended("after the quota refusal");
    up.ok(&["user", "quota", &owner]);

    // Another VM forwards the same host port now (allowed: the suspended one holds none).
    let other = up.run_vm("sample", "other", PROMPT, &["--forward", &fwd]);
    let other_name = other["name"].as_str().unwrap();
    let o = up.cli(&["vm", "resume", &id]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "a resume with a host port forwarded to another VM must fail");
    assert!(
        err.contains(&format!("host port {port}"))
            && err.contains(&format!("forwarded to VM {other_name}"))
            && err.contains("stays suspended"),
        "{err}"
    );
    suspended("after the forward conflict");
    up.ok(&["vm", "rm", "--force", other["id"].as_str().unwrap()]);

    // The port is taken on the host by a process vgrid does not know: the host refuses the
    // launch, the VM is suspended again with the reason.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let o = up.cli(&["vm", "resume", &id, "--timeout", "120"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "a resume whose port cannot be bound must fail: {err}");
    assert!(err.contains("suspended") && err.contains(&format!("host port {port}")) && err.contains("cannot be bound"), "{err}");
    let v = suspended("after the bind failure");
    assert!(v["reason"].as_str().unwrap_or("").contains("cannot be bound"), "{v}");
    drop(squatter);

    // Nothing was lost: it resumes where it was, without booting.
    let r = up.json(&["vm", "resume", &id, "--timeout", "300"]);
    assert_eq!(r["state"], "running", "{r}");
    console_exec(&up, &id, "echo got-$(cat /tmp/kept.txt)", "got-kept-state");
    let log = String::from_utf8_lossy(&std::fs::read(up.runtime_dir(&id).join("console.log")).unwrap()).into_owned();
    let after = log.rsplit("wrote-42").next().unwrap_or("");
    assert!(!after.contains(BOOTED_MARKER), "the guest booted instead of resuming:\n{log}");
    // The forward works again on the resumed VM's host port.
    let v = up.vm(&id);
    assert_eq!(v["config"]["net"]["nics"][0]["forwards"][0]["host"], port, "{v}");
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err(), "QEMU holds host port {port} again");
}

/// Host `name`'s agent process: SIGKILLed, then started again on its data directory (its
/// guests and their RAM pagers run on meanwhile).
fn restart_host(g: &mut Grid, i: usize, name: &str, env: &[(&str, &str)]) {
    g.hosts[i].kill();
    let data = g.dir.path().join(name);
    // Each restart logs to a file of its own: what an earlier agent logged (e.g. an upload it
    // made before it was killed) stays readable.
    let log = (1..)
        .map(|n| g.dir.path().join(if n == 1 { format!("{name}-restarted.log") } else { format!("{name}-restarted-{n}.log") }))
        .find(|p| !p.exists())
        .unwrap();
    g.hosts[i] = Role::start_env(
        &["host", "--coordinator", &g.coordinator.url, "--listen", "127.0.0.1:0", "--name", name, "--data-dir", data.to_str().unwrap()],
        log,
        env,
    );
}

/// The `memory.stat` file of process `pid`'s memory cgroup (v1 or v2), if it has one of its
/// own (not the root).
fn memory_stat(pid: u64) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for l in text.lines() {
        let mut f = l.splitn(3, ':');
        let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
        let dir = match ctrl {
            c if c.split(',').any(|c| c == "memory") => PathBuf::from("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')),
            "" => PathBuf::from("/sys/fs/cgroup").join(path.trim_start_matches('/')),
            _ => continue,
        };
        if path != "/" && dir.join("memory.stat").exists() {
            return Some(dir.join("memory.stat"));
        }
    }
    None
}

/// The first of `keys` present in a `memory.stat` file (v1 `cache`, v2 `file`), 0 if none.
fn stat_value(stat: &Path, keys: &[&str]) -> u64 {
    let text = std::fs::read_to_string(stat).unwrap_or_default();
    keys.iter().find_map(|k| text.lines().find_map(|l| l.strip_prefix(&format!("{k} ")).and_then(|v| v.trim().parse().ok()))).unwrap_or(0)
}

/// The chunk hashes of a blob in `vgrid image show --json` output (stored chunks only).
fn stored_chunks(blob: &serde_json::Value) -> Vec<String> {
    blob["chunks"].as_array().unwrap().iter().filter_map(|c| c.as_str().map(str::to_string)).collect()
}

/// A warm image made from a guest on a shared RAM file keeps that RAM out of its state and
/// stores it as its own blob; restored on another host with an empty cache, the guest answers
/// with only part of its RAM fetched: the rest comes when touched, through the pager
/// (`qemu-storage-daemon`, FUSE) from the proxy. The host agent SIGKILLed and restarted: the
/// pager reconnects and the guest touching memory it never had goes on, across an image server
/// outage too. Removing the VM ends the pager and its mount.
#[test]
fn a_warm_guest_pages_its_ram_in_lazily_and_survives_an_agent_restart() {
    let mut g = Grid::start(&["h1", "h2"]);
    g.wait_until("two hosts", Duration::from_secs(30), || g.json(&["host", "ls"]).as_array().map(|a| a.len()) == Some(2));
    g.import_sample();
    let ram_chunks = snapshot_with_its_ram_apart(&g);
    // h2 fetches only what its guests touch (no background fetch of their RAM), to see it.
    restart_host(&mut g, 1, "h2", &[("VGRID_RAM_PREFETCH", "0")]);
    g.wait_until("h2 ready again", Duration::from_secs(60), || {
        g.json(&["host", "ls"]).as_array().map(|a| a.iter().filter(|h| h["state"] == "ready").count()) == Some(2)
    });
    restore_lazily_on_h2_across_an_agent_restart(&mut g, &ram_chunks);

    // The first restore recorded the pages its guest touched first: h2 uploaded them as the
    // image's hot pages, which the next restore (on h1) loads instead of their chunks.
    g.wait_until("h2 to upload the hot pages", Duration::from_secs(60), || logs_of(&g, "h2").contains("hot pages uploaded"));
    restore_with_hot_pages_on_h1(&mut g, &ram_chunks);
}

/// A guest on h1 writes a marker to its tmpfs and is snapshot as `lazywarm`: the state holds
/// the devices only, the RAM is a blob of its own without its zero pages. Returns the RAM's
/// stored chunks.
fn snapshot_with_its_ram_apart(g: &Grid) -> Vec<String> {
    let vm = g.boot_on("h1", "origin");
    let id = vm["id"].as_str().unwrap().to_string();
    let d1 = g.runtime_dir("h1", &id);
    {
        let _c = type_on_console(&d1, "echo lazy-ram-marker > /tmp/lazy.txt; echo marker-written");
        wait_console(&d1, "the marker", Duration::from_secs(60), |c| c.lines().any(|l| l.trim() == "marker-written"));
    }
    let snap = g.json(&["image", "snapshot", &id, "--name", "lazywarm"]);
    // The state holds the devices only; the RAM is a blob of its own, zero pages not stored.
    let state_bytes = snap["state_bytes"].as_u64().unwrap();
    assert!(state_bytes < 8 << 20, "the state should hold no RAM: {snap}");
    let m = g.json(&["image", "show", "lazywarm", "--image-server", &g.server_url()]);
    let ram = &m["state"]["ram"]["blob"];
    assert_eq!(ram["size"].as_u64(), Some(256 << 20), "{m}");
    let ram_chunks = stored_chunks(ram);
    let all = ram["chunks"].as_array().unwrap().len();
    assert!(!ram_chunks.is_empty() && ram_chunks.len() < all, "some RAM chunks stored, the zero ones not: {} of {all}", ram_chunks.len());
    g.json(&["vm", "rm", "--force", &id]);
    ram_chunks
}

/// The concatenated logs of the roles whose log file names start with `prefix`.
fn logs_of(g: &Grid, prefix: &str) -> String {
    std::fs::read_dir(g.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect()
}

/// `lazywarm` restored on h2 (empty cache, no prefetch): the guest answers before its whole
/// RAM is fetched, its RAM file is the pager's FUSE mount, and it survives an agent restart
/// and fills its memory; removing it ends the pager.
fn restore_lazily_on_h2_across_an_agent_restart(g: &mut Grid, ram_chunks: &[String]) {
    // Restored on h2, whose cache is empty.
    let w = g.json(&["vm", "run", "lazywarm", "--name", "lazy", "--require", "host.name == \"h2\"", "--timeout", "300"]);
    assert_eq!(w["state"], "running", "{w}");
    let wid = w["id"].as_str().unwrap().to_string();
    let pid = w["pid"].as_u64().unwrap();
    let d2 = g.runtime_dir("h2", &wid);
    {
        let _c = type_on_console(&d2, "echo got-$(cat /tmp/lazy.txt)");
        wait_console(&d2, "the restored guest's answer", Duration::from_secs(120), |c| c.contains("got-lazy-ram-marker"));
    }
    assert!(!console_text(&d2).contains(BOOTED_MARKER), "the warm VM booted");
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap()).replace('\0', " ");
    assert!(cmdline.contains("share=off,readonly=on"), "QEMU maps its RAM privately from the pager's file: {cmdline}");
    let ram_file = d2.join("ram.img");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        mounts.lines().any(|l| l.contains(ram_file.to_str().unwrap()) && l.contains(" fuse")),
        "{} is no FUSE mount",
        ram_file.display()
    );
    let cache = g.dir.path().join("h2/cache/chunks");
    let fetched = |chunks: &[String]| chunks.iter().filter(|h| cache.join(&h[..2]).join(h.as_str()).exists()).count();
    let at_answer = fetched(ram_chunks);
    eprintln!("RAM chunks on h2 when the guest answered: {at_answer} of {} stored", ram_chunks.len());
    assert!(at_answer < ram_chunks.len(), "the whole RAM was fetched before the guest answered ({at_answer} chunks)");
    // `vm show` says how much of it is still remote (from h2's reports).
    g.wait_until("h2 to report the remote RAM", Duration::from_secs(30), || {
        g.json(&["vm", "show", &wid])["ram_remote_bytes"].as_u64().is_some_and(|b| b > 0)
    });
    let shown = String::from_utf8_lossy(&g.cli(&["vm", "show", &wid]).stdout).into_owned();
    assert!(shown.contains("paged in lazily") && shown.contains("still on the image server"), "{shown}");

    // The agent dies and comes back; the pager waits for its proxy and goes on. The guest
    // then fills most of its free memory (pages the restore never fetched).
    restart_host(g, 1, "h2", &[("VGRID_RAM_PREFETCH", "0")]);
    g.wait_until("h2 back with its guest", Duration::from_secs(60), || {
        g.json(&["vm", "show", &wid])["state"] == "running"
            && g.json(&["host", "ls"]).as_array().map(|a| a.iter().filter(|h| h["state"] == "ready").count()) == Some(2)
    });
    // The image server goes away meanwhile: the pages the guest never had wait for it (its
    // phase says so), and come once it is back (on a new port: the host follows the list the
    // coordinator announces). (Once the profile this restore recorded, with its hot pages, is
    // uploaded: the restore on h1 below uses them.)
    g.wait_until("h2 to upload the profile", Duration::from_secs(60), || {
        logs_of(g, "h2").lines().any(|l| l.contains("boot profile uploaded") && l.contains("lazywarm"))
    });
    g.server.as_mut().unwrap().kill();
    let down = std::time::Instant::now();
    {
        let _c = type_on_console(
            &d2,
            "dd if=/dev/zero of=/tmp/fill bs=1M count=150 2>/dev/null; rm /tmp/fill; echo filled-$(cat /tmp/lazy.txt)",
        );
        let phase = |g: &Grid| g.json(&["vm", "show", &wid])["phase"].as_str().unwrap_or("").to_string();
        g.wait_until("the VM's phase to show its wait", Duration::from_secs(60), || phase(g).starts_with("waiting for image server"));
        std::thread::sleep(Duration::from_secs(10).saturating_sub(down.elapsed()));
        g.start_server();
        wait_console(&d2, "the guest to fill its memory", Duration::from_secs(180), |c| c.contains("filled-lazy-ram-marker"));
        g.wait_until("the phase back to running", Duration::from_secs(30), || phase(g) == "running");
    }
    let waited = read_waits(&logs_of(g, "h2"));
    assert!(!waited.is_empty(), "h2 never said a read went on after the outage:\n{}", g.logs());
    eprintln!(
        "RAM reads that waited for the image server: {}, the longest {:.1} s",
        waited.len(),
        waited.iter().copied().fold(0.0, f64::max)
    );
    assert!(process_alive(pid), "QEMU died");
    eprintln!("RAM chunks on h2 after filling memory: {} of {}", fetched(ram_chunks), ram_chunks.len());
    // The pages the guest copied out of the pager file's page cache as it wrote them do not
    // stay cached beside its own copies: they would count twice in its memory cgroup (>100 MB
    // of file cache after this fill without the host dropping them).
    if let Some(stat) = memory_stat(pid) {
        g.wait_until("the pager file's unused page cache to be dropped", Duration::from_secs(30), || {
            let cache = stat_value(&stat, &["cache", "file"]);
            eprintln!("file cache in the VM's memory cgroup: {} MiB", cache >> 20);
            cache < 32 << 20
        });
    }

    // Removing the VM ends its pager and unmounts its RAM file.
    g.json(&["vm", "rm", "--force", &wid]);
    g.wait_until("the pager gone", Duration::from_secs(30), || {
        !std::fs::read_to_string("/proc/mounts").unwrap().contains(ram_file.to_str().unwrap())
    });
}

/// `lazywarm` restored on h1 with the hot pages h2 uploaded, its whole RAM fetched in the
/// background: then it runs on without the image server.
fn restore_with_hot_pages_on_h1(g: &mut Grid, ram_chunks: &[String]) {
    // h1 (by default) fetches a restored guest's whole RAM in the background: once it is in the
    // cache, the guest no longer needs the image server. Stop the server and fill the memory.
    let w = g.json(&["vm", "run", "lazywarm", "--name", "fetched", "--require", "host.name == \"h1\"", "--timeout", "300"]);
    let fid = w["id"].as_str().unwrap().to_string();
    let d1 = g.runtime_dir("h1", &fid);
    {
        let _c = type_on_console(&d1, "echo hot-$(cat /tmp/lazy.txt)");
        wait_console(&d1, "the guest restored with hot pages to answer", Duration::from_secs(120), |c| c.contains("hot-lazy-ram-marker"));
    }
    let h1log = logs_of(g, "h1");
    assert!(h1log.contains("hot pages loaded"), "h1 did not load the hot pages:\n{}", g.logs());
    assert!(!h1log.contains("hot pages refused"), "{}", g.logs());
    let cache1 = g.dir.path().join("h1/cache/chunks");
    g.wait_until("h1 to fetch the whole RAM", Duration::from_secs(120), || {
        ram_chunks.iter().all(|h| cache1.join(&h[..2]).join(h.as_str()).exists())
    });
    g.wait_until("h1 to report no remote RAM", Duration::from_secs(30), || {
        g.json(&["vm", "show", &fid])["ram_remote_bytes"].as_u64() == Some(0)
    });
    g.server.as_mut().unwrap().kill();
    {
        let _c =
            type_on_console(&d1, "dd if=/dev/zero of=/tmp/fill bs=1M count=150 2>/dev/null; rm /tmp/fill; echo alone-$(cat /tmp/lazy.txt)");
        wait_console(&d1, "the guest to fill its memory without the image server", Duration::from_secs(180), |c| {
            c.contains("alone-lazy-ram-marker")
        });
    }
    assert_eq!(g.json(&["vm", "show", &fid])["state"], "running");
    g.json(&["vm", "rm", "--force", &fid]);
}
