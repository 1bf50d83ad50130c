//! The block proxy against real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy) and a real
//! image server (the imagestore router on a loopback port, in its own runtime so it can be
//! stopped and started again like a separate process).

use rand::{Rng, RngCore, SeedableRng};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use vgrid_api::{ChunkHash, ImageRef, Manifest};
use vgrid_blockproxy::{BlockProxy, ProxyConfig, StoreSource};
use vgrid_imagestore::ImageStore;
use vgrid_storeclient::import::{Format, ImportOptions};
use vgrid_storeclient::{RetryPolicy, StoreClient};

const CHUNK: u32 = 64 * 1024;
const SIZE: usize = 5 * 1024 * 1024 + 12345;

/// An image server in its own runtime on its own thread: `stop` kills it and every
/// connection it holds, as if its process died. A stopped server's port stays bound (not
/// listening: connections are refused) until `restart`: else another test's server, started
/// meanwhile on port 0, could be given the same port and answer for it with the same chunks
/// (every fixture's image has the same content), and a read meant to fail would succeed.
struct ImageServer {
    dir: PathBuf,
    addr: SocketAddr,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    hold: Option<tokio::net::TcpSocket>,
}

impl ImageServer {
    fn start(dir: &Path, addr: SocketAddr) -> ImageServer {
        let (atx, arx) = std::sync::mpsc::channel();
        let (stx, srx) = std::sync::mpsc::channel::<()>();
        let store_dir = dir.to_path_buf();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let store = Arc::new(ImageStore::open_local(&store_dir).unwrap());
            let bound = rt.block_on(async {
                // The port may still be held briefly by the previous instance.
                let mut tries = 0;
                loop {
                    match vgrid_imagestore::server::spawn(store.clone(), addr).await {
                        Ok((a, _task)) => break a,
                        Err(_) if tries < 100 => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("image server cannot bind {addr}: {e}"),
                    }
                }
            });
            atx.send(bound).unwrap();
            let _ = srx.recv();
            rt.shutdown_background();
        });
        let bound = arx.recv().expect("image server thread failed to start");
        ImageServer { dir: dir.to_path_buf(), addr: bound, stop: Some(stx), thread: Some(thread), hold: None }
    }
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            self.hold = hold_port(self.addr);
        }
    }
    fn restart(&mut self) {
        self.stop();
        self.hold = None;
        let next = ImageServer::start(&self.dir.clone(), self.addr);
        *self = next;
    }
}

/// Binds `addr` without listening (retrying while the stopped server's sockets release it);
/// `None` if it stays taken.
fn hold_port(addr: SocketAddr) -> Option<tokio::net::TcpSocket> {
    for _ in 0..100 {
        let s = tokio::net::TcpSocket::new_v4().ok()?;
        // Past the stopped server's connections in TIME_WAIT (as its restart binds).
        let _ = s.set_reuseaddr(true);
        if s.bind(addr).is_ok() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

impl Drop for ImageServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn quick_retry() -> RetryPolicy {
    RetryPolicy {
        attempts: 2,
        first_backoff: Duration::from_millis(100),
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
    }
}

/// Random data with zero regions: chunks 10..20 all zero, half of chunk 30 zero, last chunk
/// partial.
fn test_image(path: &Path, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; SIZE];
    rng.fill_bytes(&mut data);
    let c = CHUNK as usize;
    data[10 * c..20 * c].fill(0);
    data[30 * c..30 * c + c / 2].fill(0);
    std::fs::write(path, &data).unwrap();
    data
}

struct Fixture {
    tmp: tempfile::TempDir,
    server: ImageServer,
    source_file: PathBuf,
    data: Vec<u8>,
    manifest: Manifest,
}

impl Fixture {
    async fn new(name: &str) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let server = ImageServer::start(&tmp.path().join("store"), "127.0.0.1:0".parse().unwrap());
        let source_file = tmp.path().join("source.raw");
        let data = test_image(&source_file, 42);
        let client = StoreClient::new(&server.url()).unwrap();
        let mut opts = ImportOptions::new(name);
        opts.chunk_size = CHUNK;
        opts.format = Some(Format::Raw);
        let manifest = vgrid_storeclient::import_file(&client, &source_file, &opts, &|_, _| {}).await.unwrap();
        Fixture { tmp, server, source_file, data, manifest }
    }

    fn source(&self) -> Arc<StoreSource> {
        Arc::new(StoreSource::new(StoreClient::with_retry(&self.server.url(), quick_retry()).unwrap()))
    }

    fn proxy(&self, cache: &str, max: u64) -> Arc<BlockProxy> {
        let mut cfg = ProxyConfig::new(self.tmp.path().join(cache), max);
        cfg.fetch_timeout = Some(Duration::from_secs(30));
        BlockProxy::new(cfg, self.source()).unwrap()
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }
}

fn uri(name: &str, sock: &Path) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

async fn run(cmd: &str, args: &[&str]) -> Output {
    let out = tokio::time::timeout(Duration::from_secs(300), Command::new(cmd).args(args).kill_on_drop(true).output())
        .await
        .unwrap_or_else(|_| panic!("{cmd} {args:?} hung"))
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    out
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

async fn ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args).await;
    assert!(o.status.success(), "{cmd} {args:?} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

async fn nbdcopy_equals(uri: &str, out: &Path, want: &[u8]) {
    let _ = std::fs::remove_file(out);
    ok("nbdcopy", &[uri, out.to_str().unwrap()]).await;
    let got = std::fs::read(out).unwrap();
    assert_eq!(got.len(), want.len(), "nbdcopy output size");
    assert!(got == want, "nbdcopy output differs from the source image");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_read_exact_bytes_over_unix_and_tcp() {
    let f = Fixture::new("disk").await;
    let proxy = f.proxy("cache", 1 << 30);
    let sock = f.path("nbd.sock");
    let server = proxy.serve_unix(&sock).unwrap();
    let u = uri("disk", &sock);

    // Size is reported exactly, odd as it is.
    let info = ok("nbdinfo", &["--json", &u]).await;
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["exports"][0]["export-size"].as_u64(), Some(SIZE as u64), "{info}");
    assert_eq!(v["exports"][0]["is_read_only"].as_bool(), Some(true), "{info}");

    // nbdcopy: byte for byte.
    nbdcopy_equals(&u, &f.path("out.raw"), &f.data).await;

    // qemu-img compare against the source file.
    let cmp = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", f.source_file.to_str().unwrap(), &u]).await;
    assert!(cmp.status.success(), "qemu-img compare: {}", text(&cmp));

    // A qcow2 overlay backed by the export (how guests use it): reads through, writes stay local.
    let overlay = f.path("overlay.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", &u, "-F", "raw", overlay.to_str().unwrap()]).await;
    let o = run("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", f.source_file.to_str().unwrap(), overlay.to_str().unwrap()]).await;
    assert!(o.status.success(), "overlay compare: {}", text(&o));
    ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0xab 0 64k", overlay.to_str().unwrap()]).await;
    let o = run(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0xab 0 64k", "-c", &format!("read -P 0 {} 64k", 10 * CHUNK), overlay.to_str().unwrap()],
    )
    .await;
    assert!(o.status.success() && !text(&o).contains("Pattern verification failed"), "{}", text(&o));

    // qemu-io reads a range spanning data, a hole boundary and the odd tail.
    let tail = SIZE - 12345;
    let pattern_ok = run("qemu-io", &["-r", "-f", "raw", "-c", &format!("read -P 0 {} 65536", 10 * CHUNK), &u]).await;
    assert!(pattern_ok.status.success() && !text(&pattern_ok).contains("Pattern verification failed"), "{}", text(&pattern_ok));
    let tail_read = run("qemu-io", &["-r", "-f", "raw", "-c", &format!("read {tail} 12288"), &u]).await;
    assert!(tail_read.status.success() && !text(&tail_read).contains("error"), "{}", text(&tail_read));

    // Holes for zero chunks in the allocation map; data elsewhere.
    let map = ok("nbdinfo", &["--map", &u]).await;
    let mut holes = Vec::new();
    for line in map.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() >= 3 && cols[2] == "3" {
            holes.push((cols[0].parse::<u64>().unwrap(), cols[1].parse::<u64>().unwrap()));
        }
    }
    assert_eq!(holes, vec![(10 * CHUNK as u64, 10 * CHUNK as u64)], "map:\n{map}");

    // Four concurrent readers.
    let mut tasks = Vec::new();
    for i in 0..4 {
        let u = u.clone();
        let out = f.path(&format!("par{i}.raw"));
        tasks.push(tokio::spawn(async move {
            let o = run("nbdcopy", &[&u, out.to_str().unwrap()]).await;
            (o, out)
        }));
    }
    for t in tasks {
        let (o, out) = t.await.unwrap();
        assert!(o.status.success(), "{}", text(&o));
        assert!(std::fs::read(&out).unwrap() == f.data, "concurrent nbdcopy output differs");
    }

    // TCP as well.
    let tcp = proxy.serve_tcp("127.0.0.1:0").await.unwrap();
    let tu = format!("nbd://{}/disk", tcp.tcp_addr().unwrap());
    nbdcopy_equals(&tu, &f.path("tcp.raw"), &f.data).await;

    // Versioned export names resolve to the same bytes.
    let vu = uri(&format!("disk@{}", f.manifest.version), &sock);
    nbdcopy_equals(&vu, &f.path("v.raw"), &f.data).await;

    // Unknown export: the client fails and shows our message.
    // (nbdinfo 1.14 prints the server's message only in debug output; qemu-img always does.)
    let o = Command::new("nbdinfo").arg(uri("nosuch", &sock)).env("LIBNBD_DEBUG", "1").output().await.unwrap();
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("server error message: vgrid: image nosuch not found"), "{t}");
    let o = run("qemu-img", &["info", &uri("nosuch", &sock)]).await;
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("server reported: vgrid: image nosuch not found"), "{t}");

    // Writes are refused: the export is read-only.
    let w = run("qemu-io", &["-f", "raw", "-c", "write 0 512", &u]).await;
    assert!(!w.status.success() || text(&w).contains("ermission") || text(&w).contains("read-only"), "{}", text(&w));

    let s = proxy.stats();
    assert!(s.hits > 0 && s.fetches > 0 && s.bytes_cached > 0, "{s:?}");
    // The image was fetched once: every stored chunk (80 minus 10 zero) fetched whole once,
    // besides the few blocks the clients' first, random reads (probing the disk's first
    // sectors) fetched before their sequential reads fetched whole chunks.
    let stored = f.manifest.disk.stored().collect::<std::collections::HashSet<_>>().len() as u64;
    assert_eq!(s.chunks_cached, stored, "{s:?}");
    let ranged = s.fetches - stored;
    assert!(ranged <= 4, "{s:?}");
    let stored_bytes: u64 = (0..f.manifest.disk.chunks.len())
        .filter(|&i| f.manifest.disk.chunks[i].is_some())
        .map(|i| f.manifest.disk.chunk_len(CHUNK, i) as u64)
        .sum();
    assert!(s.bytes_fetched <= stored_bytes + ranged * (CHUNK as u64 / 2), "{s:?}");

    // The same content imported under another name shares every chunk: nothing is fetched.
    let client = StoreClient::new(&f.server.url()).unwrap();
    let mut opts = ImportOptions::new("twin");
    opts.chunk_size = CHUNK;
    opts.format = Some(Format::Raw);
    vgrid_storeclient::import_file(&client, &f.source_file, &opts, &|_, _| {}).await.unwrap();
    nbdcopy_equals(&uri("twin", &sock), &f.path("twin.raw"), &f.data).await;
    assert_eq!(proxy.stats().fetches, stored + ranged, "chunks shared by two images were fetched again");

    server.shutdown().await;
    tcp.shutdown().await;
    assert!(!sock.exists());
}

// Busy polling of a client that keeps the pace (fio at depth 1).
#[path = "nbd_clients/paced.rs"]
mod paced;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_smaller_than_image_still_serves_correct_bytes() {
    let f = Fixture::new("small").await;
    let proxy = f.proxy("cache", 1 << 20);
    let sock = f.path("nbd.sock");
    let _server = proxy.serve_unix(&sock).unwrap();
    let u = uri("small", &sock);
    nbdcopy_equals(&u, &f.path("out.raw"), &f.data).await;
    let cmp = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", f.source_file.to_str().unwrap(), &u]).await;
    assert!(cmp.status.success(), "qemu-img compare: {}", text(&cmp));
    let s = proxy.stats();
    assert!(s.evictions > 0, "{s:?}");
    assert!(s.bytes_cached <= 1 << 20, "{s:?}");
    // A pull of an image larger than the cache is refused up front, naming the image.
    let e = proxy.pull(&"small".parse().unwrap(), &|_, _| {}).await.unwrap_err().to_string();
    assert!(e.contains("small@") && e.contains("cache"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_chunk_is_an_io_error_never_wrong_bytes() {
    let f = Fixture::new("bad").await;
    // Corrupt the stored chunk of disk chunk 0 in the image server's store.
    let h = f.manifest.disk.chunks[0].unwrap().to_hex();
    let p = f.server.dir.join("chunks").join(&h[..2]).join(&h);
    let mut bytes = std::fs::read(&p).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x55;
    std::fs::write(&p, bytes).unwrap();

    let proxy = f.proxy("cache", 1 << 30);
    let sock = f.path("nbd.sock");
    let _server = proxy.serve_unix(&sock).unwrap();
    let u = uri("bad", &sock);
    let o = run("qemu-io", &["-r", "-f", "raw", "-c", "read 0 64k", &u]).await;
    let t = text(&o);
    assert!(t.contains("Input/output error"), "qemu-io should report EIO: {t}");
    let o = run("nbdcopy", &[&u, f.path("out.raw").to_str().unwrap()]).await;
    assert!(!o.status.success(), "nbdcopy must fail: {}", text(&o));
    // Other chunks still read fine, and the bad one never entered the cache.
    let o = run("qemu-io", &["-r", "-f", "raw", "-c", &format!("read {} 64k", 2 * CHUNK), &u]).await;
    assert!(o.status.success() && !text(&o).contains("error"), "{}", text(&o));
    assert!(!proxy.cache().contains(&f.manifest.disk.chunks[0].unwrap()));
    assert!(proxy.stats().fetch_errors > 0);
    // In-process readers get an error naming the image, the chunk index and hash, and the cause.
    let e = proxy.open_export("bad").await.unwrap();
    let err = e.read_at(100, &mut [0u8; 10]).await.unwrap_err().to_string();
    assert!(err.contains(&format!("image bad@{}: chunk 0:", f.manifest.version)) && err.contains(&h) && err.contains("corrupt"), "{err}");
}

/// Reads while the image server is down wait for it (disk and saved RAM), and a bound ends a
/// wait with an error naming the chunk and the bound.
#[path = "nbd_clients/outage.rs"]
mod outage;

/// The host cache's disk full (a small tmpfs), and its files damaged while the proxy was down.
#[path = "nbd_clients/damage.rs"]
mod damage;

/// Fetches sharing a thin link to the image server.
#[path = "nbd_clients/thin.rs"]
mod thin;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_stages_everything_then_serves_offline() {
    let mut f = Fixture::new("staged").await;
    let proxy = f.proxy("cache", 1 << 30);
    let seen = std::sync::Mutex::new(Vec::new());
    let report = proxy.pull(&"staged".parse().unwrap(), &|d, t| seen.lock().unwrap().push((d, t))).await.unwrap();
    let stored = f.manifest.disk.stored().collect::<std::collections::HashSet<_>>().len() as u64;
    assert_eq!((report.chunks_total, report.chunks_fetched, report.chunks_cached), (stored, stored, 0));
    assert_eq!(report.image, f.manifest.image_ref());
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.last().unwrap().0, report.bytes_total);
    // The staged image is listed (NBD_OPT_LIST).
    {
        let sock = f.path("list.sock");
        let h = proxy.serve_unix(&sock).unwrap();
        let list = ok("nbdinfo", &["--list", &format!("nbd+unix:///?socket={}", sock.display())]).await;
        assert!(list.contains(&format!("staged@{}", f.manifest.version)), "{list}");
        h.shutdown().await;
    }
    // A second pull finds everything cached.
    let again = proxy.pull(&"staged".parse().unwrap(), &|_, _| {}).await.unwrap();
    assert_eq!((again.chunks_fetched, again.chunks_cached), (0, stored));

    // With the image server gone, the staged image (manifest and chunks) still serves.
    f.server.stop();
    let sock = f.path("nbd.sock");
    let _server = proxy.serve_unix(&sock).unwrap();
    nbdcopy_equals(&uri("staged", &sock), &f.path("out.raw"), &f.data).await;
    // Restart with the same cache directory: chunks are still there (verified on first use).
    _server.shutdown().await;
    proxy.shutdown();
    drop(proxy);
    // The directory lock goes with the last task holding the cache.
    let mut proxy2 = None;
    for _ in 0..100 {
        let mut cfg = ProxyConfig::new(f.path("cache"), 1 << 30);
        cfg.fetch_timeout = Some(Duration::from_secs(30));
        match BlockProxy::new(cfg, f.source()) {
            Ok(p) => {
                proxy2 = Some(p);
                break;
            }
            Err(e) => {
                assert!(e.to_string().contains("in use by another process"), "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let proxy2 = proxy2.expect("cache directory stayed locked after shutdown");
    assert_eq!(proxy2.stats().chunks_cached, stored);
    let e = proxy2.open_export("staged").await.unwrap();
    let mut buf = vec![0u8; 100_000];
    e.read_at(12345, &mut buf).await.unwrap();
    assert_eq!(&buf[..], &f.data[12345..112345]);
    assert_eq!(proxy2.stats().fetches, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_blob_materialises_through_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let server = ImageServer::start(&tmp.path().join("store"), "127.0.0.1:0".parse().unwrap());
    let disk = tmp.path().join("d.raw");
    std::fs::write(&disk, vec![1u8; 100_000]).unwrap();
    let kernel = tmp.path().join("vmlinuz");
    let mut k = vec![0u8; 300_001];
    rand::thread_rng().fill_bytes(&mut k);
    std::fs::write(&kernel, &k).unwrap();
    let client = StoreClient::new(&server.url()).unwrap();
    let mut opts = ImportOptions::new("kvm");
    opts.chunk_size = CHUNK;
    opts.kernel = Some(kernel.clone());
    opts.cmdline = "console=ttyS0".into();
    let m = vgrid_storeclient::import_file(&client, &disk, &opts, &|_, _| {}).await.unwrap();
    let proxy = BlockProxy::new(ProxyConfig::new(tmp.path().join("cache"), 1 << 30), Arc::new(StoreSource::new(client))).unwrap();
    let vgrid_api::Boot::Kernel { kernel: kb, .. } = &m.meta.boot else { panic!("not a kernel image") };
    let out = tmp.path().join("kernel.out");
    proxy.write_blob(&m, kb, &out).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == k);
}

/// True once every chunk of `hashes` is in `proxy`'s cache (background fetches: 30 s at most).
async fn all_cached_soon(proxy: &BlockProxy, hashes: &[ChunkHash]) -> bool {
    for _ in 0..300 {
        if hashes.iter().all(|h| proxy.cache().contains(h)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The boot profile of `image` once uploaded (30 s at most).
async fn uploaded_profile(client: &StoreClient, image: &ImageRef) -> Option<vgrid_api::rest::BootProfile> {
    for _ in 0..300 {
        if let Ok(p) = client.profile(image).await {
            return Some(p);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Boot profiles: recorded, uploaded (also by a host that stops), prefetched.
#[path = "nbd_clients/profiles.rs"]
mod profiles;

/// Drives the server with malformed input on a raw socket (this is not an NBD client: it only
/// sends broken bytes and checks the server's answer), then checks a real client still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_errors_or_a_closed_connection() {
    let f = Fixture::new("raw").await;
    let proxy = f.proxy("cache", 1 << 30);
    let sock = f.path("nbd.sock");
    let _server = proxy.serve_unix(&sock).unwrap();
    raw::bad_options_then_bad_requests(&f, &proxy, &sock).await;
    raw::old_style_export_name(&f, &sock).await;
    raw::bad_magic_and_garbage(&sock).await;
    // Fuzzed sessions: a few hundred here; `scripts/faults nbd-fuzz` runs many more
    // (VGRID_NBD_FUZZ_CASES, seed VGRID_NBD_FUZZ_SEED).
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (cases, seed) = (env("VGRID_NBD_FUZZ_CASES", 300), env("VGRID_NBD_FUZZ_SEED", 1));
    // Sessions the server holds: this process's descriptors of sockets on the NBD socket's path
    // (the image server's pooled HTTP connections are not counted).
    let sessions_held = || {
        let unix = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
        let on_sock: std::collections::HashSet<&str> =
            unix.lines().filter(|l| l.ends_with(sock.to_str().unwrap())).filter_map(|l| l.split_whitespace().nth(6)).collect();
        std::fs::read_dir("/proc/self/fd")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .filter(|l| {
                        l.to_str().and_then(|s| s.strip_prefix("socket:[")).is_some_and(|i| on_sock.contains(i.trim_end_matches(']')))
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    let (t0, held0) = (std::time::Instant::now(), sessions_held());
    let (sessions, requests) = raw::fuzz_requests(&sock, cases, seed).await;
    let mut held = sessions_held();
    for _ in 0..50 {
        if held <= held0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        held = sessions_held();
    }
    assert!(held <= held0, "the server still holds {held} sessions (before: {held0}) after {sessions} fuzzed sessions ended");
    println!(
        "FAULTS-FIGURES\tnbd-fuzz\t{sessions} fuzzed sessions, {requests} requests (seed {seed}) in {:.0}s: each answered or closed, none held after ({held0} -> {held} sessions on the socket); a real client reads byte-exact after",
        t0.elapsed().as_secs_f64()
    );
    // The server is still fine.
    nbdcopy_equals(&uri("raw", &sock), &f.path("out.raw"), &f.data).await;
}

/// Just enough NBD on a raw socket to send broken input (for the test above).
#[path = "nbd_clients/raw.rs"]
mod raw;

/// The futures callers spawn (CLI, host agent) must be `Send`.
#[allow(dead_code)]
fn public_futures_are_send(proxy: Arc<BlockProxy>, m: Manifest) {
    fn send<T: Send>(_: T) {}
    let r: ImageRef = "x".parse().unwrap();
    send(proxy.pull(&r, &|_, _| {}));
    send(proxy.open_export("x"));
    send(proxy.read_blob(&m, &m.disk));
    send(proxy.write_blob(&m, &m.disk, Path::new("/dev/null")));
    send(proxy.serve_tcp("127.0.0.1:0"));
    send(proxy.resolve(&r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reader_gets_readahead() {
    let f = Fixture::new("seq").await;
    let mut cfg = ProxyConfig::new(f.path("cache"), 1 << 30);
    cfg.readahead_chunks = 4;
    cfg.record_profiles = false;
    let proxy = BlockProxy::new(cfg, f.source()).unwrap();
    let sock = f.path("nbd.sock");
    let _server = proxy.serve_unix(&sock).unwrap();
    // Three consecutive reads of chunks 0, 1, 2 on one connection: from the second on, one
    // chunk is read ahead per chunk the run has read (2 and 3, then up to 5).
    ok("qemu-io", &["-r", "-f", "raw", "-c", "read 0 64k", "-c", "read 64k 64k", "-c", "read 128k 64k", &uri("seq", &sock)]).await;
    let ahead: Vec<_> = (3..6).map(|i| f.manifest.disk.chunks[i].unwrap()).collect();
    assert!(all_cached_soon(&proxy, &ahead).await, "chunks 3..6 were not read ahead");
    assert!(!proxy.cache().contains(&f.manifest.disk.chunks[6].unwrap()), "readahead went past its window");
    assert_eq!(proxy.stats().prefetched, 4);
    // A longer run reads ahead at most `readahead_chunks`: a run of five chunks, 20..25 (a new
    // connection: its first read starts the run), then chunks 25..29.
    ok("qemu-io", &["-r", "-f", "raw", "-c", "read 1280k 256k", "-c", "read 1536k 64k", &uri("seq", &sock)]).await;
    let ahead: Vec<_> = (25..29).map(|i| f.manifest.disk.chunks[i].unwrap()).collect();
    assert!(all_cached_soon(&proxy, &ahead).await, "chunks 25..29 were not read ahead");
    assert!(!proxy.cache().contains(&f.manifest.disk.chunks[29].unwrap()), "readahead went past its window");
    assert_eq!(proxy.stats().prefetched, 8);
    // A random reader gets none.
    ok("qemu-io", &["-r", "-f", "raw", "-c", "read 2M 4k", "-c", "read 1M 4k", "-c", "read 3M 4k", &uri("seq", &sock)]).await;
    assert_eq!(proxy.stats().prefetched, 8);
}

/// The unix socket's mode and group (`serve_unix_with`): a client of that group connects, a
/// client of another group is refused by the kernel. (Root only: it switches users.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_access_is_its_mode_and_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let f = Fixture::new("acc").await;
    let proxy = f.proxy("cache", 1 << 30);
    let dir = f.path("pub");
    std::fs::create_dir(&dir).unwrap();
    for d in [f.tmp.path(), dir.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let sock = dir.join("nbd.sock");
    // SAFETY: plain getters.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let group = if euid == 0 { 65534 } else { egid };
    let access = vgrid_blockproxy::SocketAccess { mode: 0o660, gid: Some(group) };
    let _server = proxy.serve_unix_with(&sock, Some(access)).unwrap();
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o660);
    assert_eq!(m.gid(), group);
    let u = uri("acc", &sock);
    if euid != 0 {
        ok("nbdinfo", &["--size", &u]).await;
        return;
    }
    let as_ids = |gid: &str| {
        let args =
            ["--reuid=65534".to_string(), format!("--regid={gid}"), "--clear-groups".into(), "nbdinfo".into(), "--size".into(), u.clone()];
        async move { run("setpriv", &args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    let o = as_ids("65534").await;
    assert!(o.status.success(), "a client in the socket's group: {}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), SIZE.to_string());
    let o = as_ids("65533").await;
    assert!(!o.status.success() && text(&o).contains("Permission denied"), "a client of another group: {}", text(&o));
}

/// A warm image's saved RAM: the pages a first restore reads become its hot pages (a verified
/// bundle, the RAM chunks leave the profile); a second host answers those pages from the
/// bundle without fetching their chunks, other pages through the chunks; a forged bundle is
/// refused by the image server, and one planted in its store is refused by the host, which
/// then reads the right bytes from the chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_pages_of_a_saved_ram_are_recorded_then_served_verified() {
    use vgrid_storeclient::hotpages;
    let f = Fixture::new("base").await;
    let client = StoreClient::new(&f.server.url()).unwrap();
    let (m, ram_data) = commit_warm(&f).await;
    let image = m.image_ref();
    let ram_chunks = m.state.as_ref().unwrap().ram.as_ref().unwrap().blob.chunks.clone();
    assert!(client.hot_pages(&image).await.unwrap_err().is_not_found());

    // First restore: pages 3 (chunk 0), 40 and 47 (chunk 2), 17 and 16 (chunk 1), 90 (a zero
    // chunk), read one by one as a lazily restored guest faults them.
    let _first = first_restore_reads_pages(&f, &image, &[3u64, 40, 47, 17, 16, 90]).await;
    // The export closed: the recording ends, the bundle and the profile are uploaded.
    let profile = uploaded_profile(&client, &image).await.expect("no profile was uploaded");
    assert_eq!(profile.hot_pages, 5, "the zero chunk's page is not a hot page: {profile:?}");
    let disk = f.manifest.disk.chunks.len() as u64;
    assert!(profile.chunks.iter().all(|&i| i < disk), "the RAM chunks left the profile: {profile:?}");
    let bundle = client.hot_pages(&image).await.unwrap();
    let hot = hotpages::decode(&bundle, &m.state.as_ref().unwrap().ram.as_ref().unwrap().blob, CHUNK).unwrap();
    let mut got: Vec<u64> = hot.pages.keys().copied().collect();
    got.sort();
    assert_eq!(got, vec![3, 16, 17, 40, 47]);
    for (p, b) in &hot.pages {
        assert!(b[..] == ram_data[*p as usize * 4096..(*p as usize + 1) * 4096], "page {p}");
    }

    // A second host: the hot pages come from the bundle; their chunks are not fetched.
    let _second = second_host_reads_hot_pages(&f, &image, &ram_chunks, &ram_data).await;

    // A forged bundle (page 40 changed) is refused by the image server.
    let mut forged_chunk = ram_data[2 * CHUNK as usize..3 * CHUNK as usize].to_vec();
    forged_chunk[8 * 4096] ^= 0xff;
    let forged = hotpages::encode(4096, CHUNK, &[hotpages::HotChunk { index: 2, data: &forged_chunk, pages: vec![8] }]).unwrap();
    let e = client.put_hot_pages(&image, forged.clone().into()).await.unwrap_err();
    assert!(e.to_string().contains("hot pages of image warm@1"), "{e}");
    // Planted in the store behind the server's back: the next host refuses it and reads the
    // chunk instead.
    planted_bundle_is_refused(&f, &image, &forged, &ram_data).await;
}

/// Commits `warm`, a warm image of the fixture's image whose 2 MiB of saved RAM are the
/// disk's chunks 5..37 (10..20 are zero chunks); returns its manifest and the RAM's bytes.
async fn commit_warm(f: &Fixture) -> (Manifest, Vec<u8>) {
    use vgrid_api::{Blob, SavedRam, SavedState, StateMeta};
    let client = StoreClient::new(&f.server.url()).unwrap();
    let mut m = f.manifest.clone();
    m.name = "warm".into();
    m.parent = Some(f.manifest.image_ref());
    let ram_chunks: Vec<_> = f.manifest.disk.chunks[5..37].to_vec();
    let ram_data = f.data[5 * CHUNK as usize..37 * CHUNK as usize].to_vec();
    m.state = Some(SavedState {
        blob: Blob { size: CHUNK as u64, chunks: vec![f.manifest.disk.chunks[0]] },
        meta: StateMeta {
            qemu_version: "10.0.0".into(),
            machine: "pc".into(),
            cpus: 1,
            memory_mib: 2,
            accel: "tcg".into(),
            saved: 0,
            loader_roms: None,
        },
        ram: Some(SavedRam { chunk_size: CHUNK, blob: Blob { size: 2 << 20, chunks: ram_chunks } }),
    });
    let up = client.begin_upload().await.unwrap();
    (client.commit(&up, &m).await.unwrap(), ram_data)
}

/// A host reads `pages` of `image`'s saved RAM one by one (qemu-io over its NBD export), as a
/// guest restored lazily on it faults them; it records them (a long recording window).
async fn first_restore_reads_pages(f: &Fixture, image: &ImageRef, pages: &[u64]) -> (Arc<BlockProxy>, vgrid_blockproxy::ServerHandle) {
    let mut cfg = ProxyConfig::new(f.path("cache1"), 1 << 30);
    cfg.ram_profile_window = Duration::from_secs(600);
    cfg.ram_prefetch_concurrency = 0;
    let proxy = BlockProxy::new(cfg, f.source()).unwrap();
    let sock = f.path("nbd1.sock");
    let server = proxy.serve_unix(&sock).unwrap();
    let u = uri(&format!("{image}/ram"), &sock);
    let mut args: Vec<String> = vec!["-r".into(), "-f".into(), "raw".into()];
    for p in pages {
        args.push("-c".into());
        args.push(format!("read {} 4k", p * 4096));
    }
    args.push(u.clone());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    ok("qemu-io", &a).await;
    (proxy, server)
}

/// A second host loads `image`'s hot pages and serves them without fetching their chunks;
/// other pages, and reads across hot and cold pages, go through the chunks, exact.
async fn second_host_reads_hot_pages(
    f: &Fixture,
    image: &ImageRef,
    ram_chunks: &[Option<ChunkHash>],
    ram_data: &[u8],
) -> (Arc<BlockProxy>, vgrid_blockproxy::ServerHandle, Arc<vgrid_blockproxy::Export>) {
    let mut cfg = ProxyConfig::new(f.path("cache2"), 1 << 30);
    cfg.ram_prefetch_concurrency = 0;
    cfg.fetch_timeout = Some(Duration::from_secs(30));
    let proxy2 = BlockProxy::new(cfg, f.source()).unwrap();
    let sock2 = f.path("nbd2.sock");
    let server2 = proxy2.serve_unix(&sock2).unwrap();
    let keep = proxy2.open_export(&format!("{image}/ram")).await.unwrap();
    for _ in 0..300 {
        if proxy2.hot_pages_loaded(image).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(proxy2.hot_pages_loaded(image), Some(5));
    let u2 = uri(&format!("{image}/ram"), &sock2);
    let out = f.path("ram-pages.out");
    let mut args: Vec<String> = vec!["-f".into(), "raw".into(), "-r".into()];
    for p in [40u64, 3, 17] {
        args.push("-c".into());
        args.push(format!("read -v {} 4k", p * 4096));
    }
    args.push(u2.clone());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let dump = ok("qemu-io", &a).await;
    std::fs::write(&out, &dump).unwrap();
    let hex = |p: u64| {
        let b = &ram_data[p as usize * 4096..p as usize * 4096 + 16];
        b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ")
    };
    for p in [40u64, 3, 17] {
        assert!(dump.contains(&hex(p)), "page {p} as served:\n{}", &dump[..dump.len().min(2000)]);
    }
    for c in [0usize, 1, 2] {
        assert!(!proxy2.cache().contains(&ram_chunks[c].unwrap()), "RAM chunk {c} was fetched although its pages were hot");
    }
    // A page that is not hot, and a read across hot and cold pages: through the chunks, exact.
    let o = run(
        "qemu-img",
        &["dd", "-f", "raw", "-O", "raw", &format!("if={u2}"), &format!("of={}", f.path("ram.out").display()), "bs=64k", "count=32"],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::read(f.path("ram.out")).unwrap() == ram_data, "the saved RAM read back differs");
    (proxy2, server2, keep)
}

/// A forged bundle planted in the image server's store behind its back: a new host refuses
/// it and reads the right bytes from the chunks.
async fn planted_bundle_is_refused(f: &Fixture, image: &ImageRef, forged: &[u8], ram_data: &[u8]) {
    let planted = f.path("store").join("profiles/warm/1.hot");
    assert!(planted.exists(), "the bundle's object is at {}", planted.display());
    std::fs::write(&planted, forged).unwrap();
    let mut cfg = ProxyConfig::new(f.path("cache3"), 1 << 30);
    cfg.ram_prefetch_concurrency = 0;
    let proxy3 = BlockProxy::new(cfg, f.source()).unwrap();
    let sock3 = f.path("nbd3.sock");
    let _server3 = proxy3.serve_unix(&sock3).unwrap();
    let u3 = uri(&format!("{image}/ram"), &sock3);
    let o = run(
        "qemu-img",
        &["dd", "-f", "raw", "-O", "raw", &format!("if={u3}"), &format!("of={}", f.path("ram3.out").display()), "bs=64k", "count=32"],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::read(f.path("ram3.out")).unwrap() == ram_data, "a planted bundle changed the bytes served");
    assert_eq!(proxy3.hot_pages_loaded(image), None);
}

/// The bytes `qemu-io -c "read -v OFFSET LEN"` printed (its hex dump).
async fn qemu_io_read(u: &str, offset: usize, len: usize) -> Vec<u8> {
    let out = ok("qemu-io", &["-r", "-f", "raw", "-c", &format!("read -v {offset} {len}"), u]).await;
    let mut bytes = Vec::with_capacity(len);
    for line in out.lines().filter(|l| l.len() > 10 && l.as_bytes()[8] == b':') {
        // `OFFSET:  xx xx ...  ascii`: as many bytes as are left, at most 16 a line.
        let n = (len - bytes.len()).min(16);
        bytes.extend(line[11..].split_whitespace().take(n).map(|b| u8::from_str_radix(b, 16).unwrap()));
    }
    assert_eq!(bytes.len(), len, "qemu-io printed {} bytes:\n{out}", bytes.len());
    bytes
}

/// A random 4 KiB read fetches only the 16 KiB block around it (with the chunk's block
/// chaining values, verified against the chunk's hash), not the whole chunk; random reads
/// that cover the rest complete it into a cached chunk; every byte read is the image's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_read_fetches_only_the_blocks_it_covers() {
    let f = Fixture::new("rnd").await;
    let mut cfg = ProxyConfig::new(f.path("cache"), 1 << 30);
    cfg.record_profiles = false;
    assert_eq!(cfg.range_block, 16 * 1024);
    let proxy = BlockProxy::new(cfg, f.source()).unwrap();
    let sock = f.path("nbd.sock");
    let _server = proxy.serve_unix(&sock).unwrap();
    let u = uri("rnd", &sock);
    let (c, cvs) = (CHUNK as usize, (CHUNK / (16 * 1024)) as u64 * 32);
    let h5 = f.manifest.disk.chunks[5].unwrap();

    let off = 5 * c + 20000;
    assert_eq!(qemu_io_read(&u, off, 4096).await, &f.data[off..off + 4096]);
    let s = proxy.stats();
    assert_eq!(s.bytes_fetched, 16 * 1024 + cvs, "one block and the chunk's chaining values, not the {c}-byte chunk");
    assert_eq!((s.misses, s.chunks_cached), (1, 0));
    assert!(!proxy.cache().contains(&h5));
    // Again: a hit on the partial chunk, nothing fetched.
    assert_eq!(qemu_io_read(&u, off + 100, 1000).await, &f.data[off + 100..off + 1100]);
    assert_eq!(proxy.stats().bytes_fetched, 16 * 1024 + cvs);
    // A read across blocks 2 and 3 fetches the two missing blocks as one range.
    let off2 = 5 * c + 40000;
    assert_eq!(qemu_io_read(&u, off2, 16384).await, &f.data[off2..off2 + 16384]);
    assert_eq!(proxy.stats().bytes_fetched, 3 * 16 * 1024 + 2 * cvs);
    // Block 0 completes the chunk: it is a cached chunk like a whole fetched one.
    assert_eq!(qemu_io_read(&u, 5 * c, 512).await, &f.data[5 * c..5 * c + 512]);
    assert!(proxy.cache().contains(&h5));
    let s = proxy.stats();
    assert_eq!((s.bytes_fetched, s.chunks_cached, s.bytes_cached), (CHUNK as u64 + 3 * cvs, 1, CHUNK as u64));
    assert_eq!(std::fs::read_dir(f.path("cache").join("tmp")).unwrap().count(), 0, "the partial file became the chunk file");
    // A random read across two chunks, then the whole image byte for byte.
    let off3 = 8 * c - 2048;
    assert_eq!(qemu_io_read(&u, off3, 4096).await, &f.data[off3..off3 + 4096]);
    let before = CHUNK as u64 + 3 * cvs + 2 * (16 * 1024 + cvs);
    assert_eq!(proxy.stats().bytes_fetched, before);
    // A read of all of chunk 7, whose last block is here, fetches only its first three blocks
    // (as one range) and completes it.
    let h7 = f.manifest.disk.chunks[7].unwrap();
    assert!(!proxy.cache().contains(&h7));
    assert_eq!(qemu_io_read(&u, 7 * c, c).await, &f.data[7 * c..8 * c]);
    assert_eq!(proxy.stats().bytes_fetched, before + 3 * 16 * 1024 + cvs);
    assert!(proxy.cache().contains(&h7));
    nbdcopy_equals(&u, &f.path("out.raw"), &f.data).await;
}
