//! `vgrid image ...` end to end against `vgrid up`: import, ls/show, export, dedup, rm, the
//! foreground NBD server read by real NBD clients, pull and cache stats.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

/// 3 MiB + 1234 bytes: random data, a zero hole, more random data; not a multiple of any chunk size.
fn test_image(dir: &std::path::Path) -> std::path::PathBuf {
    use rand::RngCore;
    let mut data = vec![0u8; 3 * 1024 * 1024 + 1234];
    let mut rng = rand::thread_rng();
    rng.fill_bytes(&mut data[..1024 * 1024]);
    rng.fill_bytes(&mut data[2 * 1024 * 1024..]);
    let p = dir.join("test.img");
    std::fs::write(&p, &data).unwrap();
    p
}

fn chunk_files(up: &Up) -> usize {
    fn walk(p: &std::path::Path) -> usize {
        std::fs::read_dir(p).map(|rd| rd.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum()).unwrap_or(0)
    }
    walk(&up.data_dir().join("images/chunks"))
}

#[test]
fn import_export_dedup_and_remove() {
    let up = Up::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = test_image(tmp.path());
    let m = up.json(&["image", "import", img.to_str().unwrap(), "--name", "rnd", "--chunk-size", "64K"]);
    assert_eq!(m["name"], "rnd");
    assert_eq!(m["size"], 3 * 1024 * 1024 + 1234);
    let chunks = chunk_files(&up);
    assert_eq!(chunks, 16 + 17, "1 MiB + (1 MiB + 1234 B) of random data in 64 KiB chunks, zeros not stored");

    // Same bytes under another name: no new chunk.
    up.ok(&["image", "import", img.to_str().unwrap(), "--name", "rnd-copy", "--chunk-size", "64K"]);
    assert_eq!(chunk_files(&up), chunks);

    let ls = up.json(&["image", "ls"]);
    let names: Vec<&str> = ls.as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 2, "{ls}");
    let show = up.json(&["image", "show", "rnd"]);
    assert_eq!(show["chunk_size"], 65536);
    assert_eq!(show["disk"]["chunks"].as_array().unwrap().iter().filter(|c| c.is_null()).count(), 16);

    let out = tmp.path().join("out.img");
    up.ok(&["image", "export", "rnd", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&img).unwrap(), "export differs from the imported file");

    // Removing one of two images sharing every chunk frees nothing; removing the last frees all.
    let r = up.json(&["image", "rm", "rnd"]);
    assert_eq!(r["chunks_freed"], 0, "{r}");
    let r = up.json(&["image", "rm", "rnd-copy"]);
    assert_eq!(r["chunks_freed"].as_u64().unwrap() as usize, chunks, "{r}");
    assert_eq!(chunk_files(&up), 0);
    let o = up.cli(&["image", "show", "rnd"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not found"));
}

#[test]
fn bad_imports_get_clear_errors_and_leave_no_image() {
    let up = Up::start();
    let tmp = tempfile::tempdir().unwrap();
    let qcow = tmp.path().join("disk.qcow2");
    assert!(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&qcow).arg("8M").status().unwrap().success());
    let o = up.cli(&["image", "import", qcow.to_str().unwrap(), "--name", "q", "--format", "raw"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("qcow2") && err.contains("--format qcow2"), "{err}");

    let o = up.cli(&["image", "import", "/nonexistent/disk.img", "--name", "nope"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("/nonexistent/disk.img"), "{err}");

    // A qcow2 with data imports (auto-detected) and exports as the same raw bytes.
    let raw = test_image(tmp.path());
    assert!(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&qcow).status().unwrap().success());
    up.ok(&["image", "import", qcow.to_str().unwrap(), "--name", "fromqcow"]);
    let out = tmp.path().join("out.raw");
    up.ok(&["image", "export", "fromqcow", out.to_str().unwrap()]);
    let (got, want) = (std::fs::read(&out).unwrap(), std::fs::read(&raw).unwrap());
    // qcow2 rounds the virtual size up to a multiple of 512 bytes: the tail is zeros.
    assert_eq!(got.len(), want.len().div_ceil(512) * 512);
    assert!(got[..want.len()] == want[..] && got[want.len()..].iter().all(|&b| b == 0), "qcow2 import differs from its raw source");

    let ls = up.json(&["image", "ls"]);
    assert_eq!(ls.as_array().unwrap().len(), 1, "only the good import is visible: {ls}");
}

#[test]
fn image_nbd_serves_standard_clients() {
    let up = Up::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = test_image(tmp.path());
    up.ok(&["image", "import", img.to_str().unwrap(), "--name", "served", "--chunk-size", "64K"]);
    let sock = tmp.path().join("nbd.sock");
    let mut server = Command::new(vgrid_bin())
        .args(["image", "nbd", "served", "--socket", sock.to_str().unwrap(), "--cache-dir"])
        .arg(tmp.path().join("cache"))
        .args(["--cache-size", "256K"]) // smaller than the image: eviction while serving
        .env("VGRID_URL", &up.url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    up.wait_until("the NBD socket", Duration::from_secs(30), || sock.exists());
    let url = format!("nbd+unix:///served?socket={}", sock.display());

    let info = Command::new("nbdinfo").args(["--json", &url]).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("nbdinfo JSON");
    assert_eq!(info["exports"][0]["export-size"], 3 * 1024 * 1024 + 1234);
    assert_eq!(info["exports"][0]["is_read_only"], true);

    let cmp = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&img).arg(&url).output().unwrap();
    assert!(cmp.status.success(), "qemu-img compare: {}", String::from_utf8_lossy(&cmp.stdout));
    let copy = tmp.path().join("copy.img");
    assert!(Command::new("nbdcopy").arg(&url).arg(&copy).status().unwrap().success());
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&img).unwrap(), "nbdcopy output differs from the source");

    let o = Command::new("nbdinfo").arg(format!("nbd+unix:///nosuch?socket={}", sock.display())).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nosuch"), "{}", String::from_utf8_lossy(&o.stderr));

    unsafe {
        libc::kill(server.id() as i32, libc::SIGTERM);
    }
    let _ = server.wait();
    assert!(!sock.exists(), "the socket is removed on exit");
}

#[test]
fn pull_stages_the_whole_image_and_stats_count_it() {
    let up = Up::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = test_image(tmp.path());
    up.ok(&["image", "import", img.to_str().unwrap(), "--name", "staged", "--chunk-size", "64K"]);
    let p = up.json(&["image", "pull", "staged"]);
    assert_eq!(p["finished"], true);
    assert_eq!(p["fetched_bytes"], 2 * 1024 * 1024 + 1234, "{p}");
    let s = up.cache_stats();
    assert_eq!(s["chunks_cached"], 33);
    assert_eq!(s["bytes_fetched"], 2 * 1024 * 1024 + 1234);
    // A second pull fetches nothing.
    let p = up.json(&["image", "pull", "staged"]);
    assert_eq!(p["fetched_bytes"], 0, "{p}");
    let o = up.cli(&["image", "pull", "nosuch"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("nosuch"));
}

/// Issue 17, item 6: on a grid of separate roles the coordinator serves no images; with only
/// its URL (`VGRID_URL`) the CLI asks it for its image servers and uses one, saying which, and
/// says so when there is none.
#[test]
fn with_only_the_coordinator_url_images_go_to_an_image_server_it_knows() {
    let dir = tempfile::Builder::new().prefix("vgi").tempdir_in("/tmp").unwrap();
    let coord = Role::coordinator("127.0.0.1:0", &dir.path().join("coord"), 3, dir.path().join("coord.log"));
    let img = test_image(dir.path());
    let img = img.to_str().unwrap();

    let o = cli_at(&coord.url, &["image", "import", img, "--name", "rnd", "--chunk-size", "64K"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "an import with no image server succeeded");
    assert!(err.contains("knows no image server") && err.contains("vgrid image-server --coordinator"), "{err}");

    let is0 = dir.path().join("is0");
    let server = Role::start(
        &["image-server", "--listen", "127.0.0.1:0", "--data-dir", is0.to_str().unwrap(), "--coordinator", &coord.url, "--name", "is0"],
        dir.path().join("is0.log"),
    );
    let t0 = std::time::Instant::now();
    while !String::from_utf8_lossy(&api_get(&coord.url, "/api/v1/image-servers")).contains("\"is0\"") {
        assert!(t0.elapsed() < Duration::from_secs(60), "the image server did not register");
        std::thread::sleep(Duration::from_millis(200));
    }

    let o = cli_at(&coord.url, &["--json", "image", "import", img, "--name", "rnd", "--chunk-size", "64K"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains(&format!("image server is0 ({})", server.url)), "the CLI says which image server: {err}");
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(m["name"], "rnd");

    // Reading it back finds it there too: show, export, and ls naming the server.
    assert_eq!(json_at(&coord.url, &["image", "show", "rnd"])["chunk_size"], 65536);
    let out = dir.path().join("out.img");
    let o = cli_at(&coord.url, &["image", "export", "rnd", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(img).unwrap(), "export differs from the imported file");
    let ls = json_at(&coord.url, &["image", "ls"]);
    assert_eq!(ls[0]["name"], "rnd", "{ls}");
    assert_eq!(ls[0]["servers"][0], "is0", "{ls}");
}
