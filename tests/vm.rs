//! `vgrid up` + `vgrid vm ...` end to end: real QEMU guests (TCG) whose disks stream through
//! the block proxy from the embedded image server.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

fn id_of(v: &serde_json::Value) -> String {
    v["id"].as_str().expect("id").to_string()
}

#[test]
fn boots_sample_through_the_proxy_and_reads_its_disk() {
    let up = Up::start();
    up.import_sample();
    let v = up.run_vm("sample", "reader", &format!("disk says {DISK_MARKER}"), &[]);
    assert_eq!(v["state"], "running");
    let id = id_of(&v);
    // The disk is an overlay whose backing file is the proxy's NBD export.
    let info =
        Command::new("qemu-img").args(["info", "-U", "--output=json"]).arg(up.runtime_dir(&id).join("overlay.qcow2")).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("qemu-img info JSON");
    let backing = info["backing-filename"].as_str().unwrap_or_default();
    assert!(backing.starts_with("nbd+unix:///sample@1?socket="), "backing file is {backing:?}");
    // The console log came through the API.
    let logs = up.ok(&["vm", "logs", &id]);
    assert!(logs.contains(BOOTED_MARKER), "vm logs lacks the marker: {logs}");
    let stats = up.cache_stats();
    assert!(stats["bytes_fetched"].as_u64().unwrap() > 0, "the boot fetched nothing: {stats}");
    // QEMU runs as the unprivileged vgrid-qemu user when the agent is root (else as the
    // agent's own user), under seccomp (mode 2, filter) with no_new_privs.
    let pid = v["pid"].as_u64().expect("the record has QEMU's pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> Vec<String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let (uid, gid) = if nix::unistd::geteuid().is_root() {
        let u = nix::unistd::User::from_name("vgrid-qemu").unwrap().expect("the agent created vgrid-qemu");
        assert_ne!(u.uid.as_raw(), 0);
        (u.uid.as_raw(), u.gid.as_raw())
    } else {
        (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw())
    };
    assert_eq!(field("Uid"), vec![uid.to_string(); 4], "QEMU's real, effective, saved and fs uid: {status}");
    assert_eq!(field("Gid"), vec![gid.to_string(); 4], "QEMU's gids: {status}");
    assert!(!field("Groups").contains(&"0".to_string()), "QEMU kept root's group: {status}");
    assert_eq!(field("Seccomp"), ["2"], "{status}");
    assert_eq!(field("NoNewPrivs"), ["1"], "{status}");
    // Its runtime directory (overlay, sockets, logs) is QEMU's user's and closed to others;
    // the block proxy's socket is for QEMU's group only.
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let m = std::fs::metadata(up.runtime_dir(&id)).unwrap();
        assert_eq!(m.permissions().mode() & 0o077, 0, "runtime directory mode {:o}", m.permissions().mode());
        assert_eq!(m.uid(), uid, "runtime directory owner");
        assert_eq!(std::fs::metadata(up.runtime_dir(&id).join("overlay.qcow2")).unwrap().uid(), uid, "overlay owner");
        let sock = std::fs::metadata(up.data_dir().join("host/nbd.sock")).unwrap();
        if nix::unistd::geteuid().is_root() {
            assert_eq!(sock.permissions().mode() & 0o777, 0o660, "nbd.sock mode");
            assert_eq!(sock.gid(), gid, "nbd.sock group");
        }
    }
    // The unprivileged QEMU writes its overlay: a file written in the guest lands there.
    console_exec(&up, &id, "echo dropped-$((6*7)) > /mnt/w && sync && echo synced-$((6*7))", "synced-42");
    assert!(overlay_has_data(&up, &id), "no data in the overlay");
    up.ok(&["vm", "stop", &id]);
}

/// Whether the VM's qcow2 overlay itself (depth 0, not its backing image) holds data.
fn overlay_has_data(up: &Up, id: &str) -> bool {
    let map = Command::new("qemu-img").args(["map", "-U", "--output=json"]).arg(up.runtime_dir(id).join("overlay.qcow2")).output().unwrap();
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    map.as_array().unwrap().iter().any(|e| e["depth"] == 0 && e["data"] == true)
}

#[test]
fn guest_writes_land_in_the_overlay_and_never_in_the_base() {
    let up = Up::start();
    up.import_sample();
    let g = sample_guest().unwrap();
    let v = up.run_vm("sample", "writer", PROMPT, &[]);
    let id = id_of(&v);
    console_exec(&up, &id, "echo overlay-bytes-42 > /mnt/written && sync && echo wrote-$((6*7))", "wrote-42");

    // Read the overlay (shared, QEMU holds it) as raw, through its backing chain, and look for the file.
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("disk.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(up.runtime_dir(&id).join("overlay.qcow2"))
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success());
    let bytes = std::fs::read(&raw).unwrap();
    assert!(bytes.windows(17).any(|w| w == b"overlay-bytes-42\n"), "the guest's write is not in its disk (overlay over the proxy export)");

    // The overlay itself holds data (allocated at depth 0), the base is byte-identical to the source.
    assert!(overlay_has_data(&up, &id), "no data allocated in the overlay itself");
    let export = tmp.path().join("base.raw");
    up.ok(&["image", "export", "sample", export.to_str().unwrap()]);
    let cmp = Command::new("cmp").arg(&export).arg(&g.disk).status().unwrap();
    assert!(cmp.success(), "the base image changed");
    let base = std::fs::read(&export).unwrap();
    assert!(!base.windows(17).any(|w| w == b"overlay-bytes-42\n"), "the guest's write reached the base");
    up.ok(&["vm", "stop", &id]);
}

#[test]
fn second_vm_of_an_image_reads_what_the_first_fetched() {
    let up = Up::start();
    up.import_sample();
    let a = up.run_vm("sample", "first", BOOTED_MARKER, &[]);
    // Let readahead and profile prefetch of the first boot settle.
    let mut last = u64::MAX;
    up.wait_until("fetches to settle", Duration::from_secs(60), || {
        let f = up.cache_stats()["fetches"].as_u64().unwrap();
        let settled = f == last;
        last = f;
        std::thread::sleep(Duration::from_millis(500));
        settled
    });
    let before = up.cache_stats();
    let b = up.run_vm("sample", "second", BOOTED_MARKER, &[]);
    let after = up.cache_stats();
    // What the first boot fetched serves the second. The first boot's random reads fetched
    // only the 16 KiB blocks they covered (ranged reads), so a second boot reading a block of
    // such a chunk the first did not (boots differ a little) fetches that block: a few at most,
    // never the image again.
    let fetched = |s: &serde_json::Value| s["bytes_fetched"].as_u64().unwrap();
    assert!(
        fetched(&after) - fetched(&before) <= fetched(&before) / 50,
        "the second VM fetched more than 2% of what the first did: before {before}, after {after}"
    );
    assert!(after["hits"].as_u64().unwrap() > before["hits"].as_u64().unwrap(), "the second VM read nothing from the cache");
    up.ok(&["vm", "stop", &id_of(&a)]);
    up.ok(&["vm", "stop", &id_of(&b)]);
}

#[test]
fn stop_and_rm_leave_nothing_behind() {
    let up = Up::start();
    up.import_sample();
    let v = up.run_vm("sample", "tidy", BOOTED_MARKER, &[]);
    let id = id_of(&v);
    let pid = v["pid"].as_u64().expect("pid");
    assert!(process_alive(pid));
    let dir = up.runtime_dir(&id);
    assert!(dir.join("overlay.qcow2").exists() && dir.join("qmp.sock").exists());

    // A long poll for the VM to leave `running` (up to 30 s) answers with the stop.
    let (url, vid) = (up.url.clone(), id.clone());
    let poll = std::thread::spawn(move || api_get(&url, &format!("/api/v1/vms/{vid}?wait_ms=30000&state=running")));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let s = up.json(&["vm", "stop", &id]);
    assert_eq!(s["state"], "stopped", "{s}");
    let polled: serde_json::Value = serde_json::from_slice(&poll.join().unwrap()).unwrap();
    assert_ne!(polled["state"], "running", "the long poll answered before the VM left running: {polled}");
    assert!(!process_alive(pid), "QEMU {pid} still runs after stop");
    for f in ["overlay.qcow2", "qmp.sock", "console.sock", "kernel", "initrd"] {
        assert!(!dir.join(f).exists(), "{f} left behind after stop");
    }
    assert!(dir.join("console.log").exists(), "console log kept for `vm logs`");

    up.ok(&["vm", "rm", &id]);
    assert!(!dir.exists(), "runtime directory left behind after rm");
    let list = up.json(&["vm", "ls"]);
    assert!(list.as_array().unwrap().is_empty(), "{list}");

    // rm --force of a running VM kills and removes it.
    let v = up.run_vm("sample", "forced", BOOTED_MARKER, &[]);
    let pid = v["pid"].as_u64().unwrap();
    let o = up.cli(&["vm", "rm", &id_of(&v)]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("stop it first"));
    up.ok(&["vm", "rm", "--force", &id_of(&v)]);
    assert!(!process_alive(pid));
    assert!(!up.runtime_dir(&id_of(&v)).exists());
}

#[test]
fn a_vm_whose_qemu_dies_becomes_failed_with_the_reason() {
    let up = Up::start();
    up.import_sample();
    let v = up.run_vm("sample", "victim", BOOTED_MARKER, &[]);
    let id = id_of(&v);
    let pid = v["pid"].as_u64().unwrap() as i32;
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    up.wait_until("the VM to become failed", Duration::from_secs(30), || up.vm(&id)["state"] == "failed");
    let rec = up.vm(&id);
    let reason = rec["reason"].as_str().unwrap();
    assert!(reason.contains("signal 9"), "reason: {reason}");
    assert!(reason.contains(BOOTED_MARKER), "reason lacks the last console lines: {reason}");
    assert!(!up.runtime_dir(&id).join("overlay.qcow2").exists());
}

#[test]
fn bad_requests_get_clear_errors_and_create_nothing() {
    let up = Up::start();
    up.import_sample();
    let o = up.cli(&["vm", "run", "no-such-image"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("unknown image no-such-image") && err.contains("404"), "{err}");

    let o = up.cli(&["vm", "run", "sample", "--memory", "4000000"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("`memory` host has") && err.contains("4000000 requested") && err.contains("409"), "{err}");
    // Over the documented maximum: 422 naming the bound.
    let o = up.cli(&["vm", "run", "sample", "--memory", "99999999"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("at most 4194304 MiB") && err.contains("422"), "{err}");

    let o = up.cli(&["vm", "run", "../etc/passwd"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("invalid image name"));

    let token = up.json(&["login"])["token"].as_str().unwrap().to_string();
    let auth = format!("authorization: Bearer {token}");
    let http = |method: &str, path: &str, body: &str| -> (u16, serde_json::Value) {
        let o = curl_for(&up.url)
            .args(["-o", "-", "-w", "\n%{http_code}", "-X", method, "-H", "content-type: application/json", "-H", &auth, "--data", body])
            .arg(format!("{}{path}", up.url))
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        let (b, code) = s.rsplit_once('\n').unwrap();
        (code.parse().unwrap(), serde_json::from_str(b).unwrap_or(serde_json::Value::Null))
    };
    let (code, body) = http("POST", "/api/v1/vms", "{not json");
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("malformed request body"), "{body}");
    let (code, body) = http("POST", "/api/v1/vms", r#"{"image": "sample", "cpus": "many"}"#);
    assert_eq!(code, 400, "{body}");
    let (code, body) = http("POST", "/api/v1/vms", r#"{"image": "sample", "colour": "red"}"#);
    assert_eq!(code, 400, "{body}");
    let (code, body) = http("GET", "/api/v1/vms/vm-nope", "");
    assert_eq!(code, 404);
    assert!(body["error"].as_str().unwrap().contains("vm-nope"));

    let list = up.json(&["vm", "ls"]);
    assert!(list.as_array().unwrap().is_empty(), "something was half-created: {list}");
    let runtime = std::fs::read_dir(up.data_dir().join("host/vms")).unwrap().count();
    assert_eq!(runtime, 0);

    // The OpenAPI document describes the API.
    let (code, doc) = http("GET", "/api/openapi.json", "");
    assert_eq!(code, 200);
    assert!(doc["paths"]["/api/v1/vms"]["post"].is_object());
}

#[test]
fn shutting_down_vgrid_up_stops_its_guests() {
    let mut up = Up::start();
    up.import_sample();
    let v = up.run_vm("sample", "orphan-check", BOOTED_MARKER, &[]);
    let pid = v["pid"].as_u64().unwrap();
    assert!(up.terminate(), "vgrid up did not exit on SIGTERM");
    assert!(!process_alive(pid), "QEMU {pid} outlived vgrid up");
    assert!(!up.data_dir().join("host/nbd.sock").exists());
}

/// A first boot's profile is not lost when `vgrid up` ends before the recording window (60 s)
/// does: it is uploaded on the way out (the guest removed first), and the next first opening of
/// the image after a restart finds it and prefetches it (the opening is qemu-img's probe, closed
/// before QEMU's own: the prefetch must not depend on it).
#[test]
fn a_boot_profile_outlives_vgrid_up_and_is_prefetched_after_a_restart() {
    let mut up = Up::start();
    up.import_sample();
    let v = up.run_vm("sample", "profiled", BOOTED_MARKER, &[]);
    up.ok(&["vm", "rm", "--force", &id_of(&v)]);
    assert!(up.terminate(), "vgrid up did not exit on SIGTERM");
    let log = std::fs::read_to_string(up.data_dir().join("up.log")).unwrap();
    let uploaded = log.lines().find(|l| l.contains("boot profile uploaded") && l.contains("sample@1"));
    let uploaded = uploaded.unwrap_or_else(|| panic!("no profile uploaded when vgrid up ended:\n{log}"));
    let chunks = uploaded.split_whitespace().find_map(|w| w.strip_prefix("chunks=")).and_then(|n| n.parse::<u64>().ok());
    assert!(chunks.is_some_and(|n| n > 0), "an empty profile: {uploaded}");

    up.restart();
    let v = up.run_vm("sample", "prefetched", BOOTED_MARKER, &[]);
    let log = std::fs::read_to_string(up.data_dir().join("up.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("prefetching boot profile") && l.contains("sample@1")),
        "the restarted host did not prefetch the profile:\n{}",
        up.log_tail()
    );
    up.ok(&["vm", "rm", "--force", &id_of(&v)]);
}

#[test]
fn console_over_the_api_is_interactive_and_ctrl_bracket_detaches() {
    use std::io::{Read, Write};
    let up = Up::start();
    up.import_sample();
    let v = up.run_vm("sample", "chatty", PROMPT, &[]);
    let id = id_of(&v);
    let mut child = Command::new(vgrid_bin())
        .args(["vm", "console", &id])
        .env("VGRID_URL", &up.url)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    stdin.write_all(b"echo console-says-$((40+2))\n").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    stdin.write_all(&[0x1d]).unwrap(); // Ctrl-]
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "vm console did not detach on Ctrl-]");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(status.success());
    assert!(out.contains("console-says-42"), "console output: {out:?}");
    // The VM still runs after detaching.
    assert_eq!(up.vm(&id)["state"], "running");
    up.ok(&["vm", "stop", &id]);
}

#[test]
fn forwarded_port_reaches_a_server_in_the_guest() {
    let up = Up::start();
    up.import_sample();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let fwd = format!("{port}:80");
    let v = up.run_vm("sample", "web", PROMPT, &["--forward", &fwd]);
    let id = id_of(&v);
    assert_eq!(v["config"]["net"]["nics"][0]["forwards"][0]["host"], port);
    // User-mode networking: the guest is 10.0.2.15 behind QEMU's slirp.
    console_exec(
        &up,
        &id,
        "ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && mkdir -p /tmp/www && echo forwarded-ok > /tmp/www/index.html && httpd -p 80 -h /tmp/www && echo httpd-$((1+1))",
        "httpd-2",
    );
    let mut body = String::new();
    up.wait_until("an answer through the forwarded port", Duration::from_secs(30), || {
        let o = Command::new("curl").args(["-s", "--max-time", "5"]).arg(format!("http://127.0.0.1:{port}/")).output().unwrap();
        body = String::from_utf8_lossy(&o.stdout).into_owned();
        body.contains("forwarded-ok")
    });
    // A second VM cannot take the same host port.
    let o = up.cli(&["vm", "run", "sample", "--forward", &fwd]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(&format!("host port {port} is already forwarded")), "{err}");
    up.ok(&["vm", "stop", &id]);
}

#[test]
fn vgrid_up_reads_images_from_an_image_server_given_by_url() {
    let tmp = tempfile::Builder::new().prefix("vgis").tempdir_in("/tmp").unwrap();
    // The image server's address is known before it runs; it joins the grid of `vgrid up`.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let up = Up::start_with(&["--image-server", &format!("https://{addr}")]);
    let is = Role::start(
        &[
            "image-server",
            "--listen",
            &addr,
            "--data-dir",
            tmp.path().join("is").to_str().unwrap(),
            "--coordinator",
            &up.url,
            "--name",
            "far-is",
        ],
        tmp.path().join("is.log"),
    );
    let g = sample_guest().unwrap();
    let o = Command::new(vgrid_bin())
        .args([
            "image",
            "import",
            g.disk.to_str().unwrap(),
            "--name",
            "far",
            "--kernel",
            g.kernel.to_str().unwrap(),
            "--initrd",
            g.initrd.to_str().unwrap(),
            "--cmdline",
            &g.cmdline,
            "--image-server",
            &is.url,
        ])
        .env("VGRID_URL", &up.url)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = up.run_vm("far", "far", BOOTED_MARKER, &[]);
    assert_eq!(v["state"], "running");
    up.ok(&["vm", "stop", v["id"].as_str().unwrap()]);
}

/// Runs `vgrid host ARGS` (coordinator unreachable: the agent starts before it heartbeats) and
/// returns whether it exited within `wait`, and its stderr; killed after `wait` otherwise.
fn host_attempt(args: &[&str], log: &std::path::Path, wait: Duration) -> (bool, String) {
    let mut c = std::process::Command::new(vgrid_bin())
        .args(["host", "--listen", "127.0.0.1:0", "--coordinator", "http://127.0.0.1:9"])
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let exited = loop {
        if c.try_wait().unwrap().is_some() {
            break true;
        }
        if t0.elapsed() > wait {
            let _ = c.kill();
            let _ = c.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (exited, std::fs::read_to_string(log).unwrap_or_default())
}

#[test]
fn an_agent_whose_qemu_user_cannot_work_refuses_to_start_naming_the_fix() {
    let t = tempfile::Builder::new().prefix("vgq").tempdir_in("/tmp").unwrap();
    let log = t.path().join("host.log");
    if !nix::unistd::geteuid().is_root() {
        // Not root: QEMU runs as the agent's user, and the agent says so.
        let d = t.path().join("h");
        let (_, err) = host_attempt(&["--data-dir", d.to_str().unwrap()], &log, Duration::from_secs(5));
        assert!(err.contains("the agent is not root: QEMU runs as the agent's own user"), "{err}");
        return;
    }
    // A data directory under a directory QEMU's user cannot search.
    use std::os::unix::fs::PermissionsExt;
    let private = t.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let d = private.join("h");
    let (exited, err) = host_attempt(&["--data-dir", d.to_str().unwrap()], &log, Duration::from_secs(30));
    assert!(exited, "the agent started: {err}");
    assert!(
        err.contains("cannot reach") && err.contains("mode 700") && err.contains(private.to_str().unwrap()) && err.contains("--data-dir"),
        "{err}"
    );
    // root, or a name that is no user name.
    let d = t.path().join("h2");
    let (exited, err) = host_attempt(&["--data-dir", d.to_str().unwrap(), "--qemu-user", "root"], &log, Duration::from_secs(30));
    assert!(exited && err.contains("has uid 0") && err.contains("--qemu-user"), "{err}");
    let (exited, err) = host_attempt(&["--data-dir", d.to_str().unwrap(), "--qemu-user", "no such"], &log, Duration::from_secs(30));
    assert!(exited && err.contains("\"no such\"") && err.contains("not a valid user name"), "{err}");
}
