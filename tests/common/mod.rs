//! The workspace's integration-test harness: a `vgrid up` process per test (own temp data
//! directory, a free port), the `vgrid` CLI against it, the cached sample guest imported as
//! `sample`, and cleanup that kills what it started even when a test fails.
#![allow(dead_code)]

pub mod grid;
pub mod lan;
pub mod load;
pub mod s3;
pub mod sim;
pub mod sim_moves;
pub mod simgrid;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use vgrid_hostagent::testkit::{
    boot_slot, debian_guest, sample_guest, SampleGuest, BOOTED_MARKER, DEBIAN_BOOTED_MARKER, DISK_MARKER, PROMPT,
};

/// The Python of a tool venv `scripts/install-deps.sh` makes under the cache (`DIR` such as
/// `selenium-4.50.0`); a clear failure when it is missing.
pub fn tool_python(dir: &str) -> PathBuf {
    let cache = std::env::var_os("VGRID_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/vgrid"));
    let py = cache.join(dir).join("bin/python3");
    assert!(py.exists(), "{} is missing: run scripts/install-deps.sh", py.display());
    py
}

/// `vgrid image import` of guest `g` as image `name` (kernel, initrd and command line), to be
/// followed by the caller's options.
pub fn import_args<'a>(g: &'a SampleGuest, name: &'a str) -> Vec<&'a str> {
    vec![
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
    ]
}

pub fn vgrid_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vgrid"))
}

/// The `RUST_LOG` of the roles a test starts: `info`, or `VGRID_TEST_LOG` (e.g.
/// `vgrid_coordinator=debug,info` to follow a flaky test's VMs).
pub fn role_log_level() -> String {
    std::env::var("VGRID_TEST_LOG").unwrap_or_else(|_| "info".to_string())
}

/// A running `vgrid up` in a temporary data directory; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Up {
    pub child: Option<Child>,
    pub url: String,
    pub data: tempfile::TempDir,
    /// The arguments it was started with besides its data directory (kept for a restart).
    extra: Vec<String>,
}

impl Up {
    pub fn start() -> Up {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Up {
        // Short path: unix socket paths (runtime dirs) must stay under 108 bytes.
        let data = tempfile::Builder::new().prefix("vg").tempdir_in("/tmp").expect("temp dir");
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let (child, url) = Self::spawn(data.path(), &extra);
        Up { child: Some(child), url, data, extra }
    }

    /// Stops this `vgrid up` gracefully (as [`Up::terminate`]) and starts it again on the same
    /// data directory and arguments (a new port); its log starts anew.
    pub fn restart(&mut self) {
        self.terminate();
        let (child, url) = Self::spawn(self.data.path(), &self.extra);
        self.child = Some(child);
        self.url = url;
    }

    fn spawn(data: &Path, extra: &[String]) -> (Child, String) {
        let mut child = Command::new(vgrid_bin())
            .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .args(extra)
            .env("RUST_LOG", role_log_level())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(data.join("up.log")).unwrap()))
            .spawn()
            .expect("spawning vgrid up");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        let mut reader = BufReader::new(stdout);
        reader.read_line(&mut line).expect("reading vgrid up's first line");
        // Keep draining stdout so that vgrid up never writes into a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("https://"))
            .unwrap_or_else(|| {
                panic!("vgrid up printed no URL: {line:?}; log:\n{}", std::fs::read_to_string(data.join("up.log")).unwrap_or_default())
            })
            .to_string();
        (child, url)
    }

    /// Runs the CLI against this instance.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(vgrid_bin()).args(args).env("VGRID_URL", &self.url).stdin(Stdio::null()).output().expect("running vgrid")
    }

    /// Runs the CLI and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(o.status.success(), "vgrid {args:?} failed: {}\n{}", String::from_utf8_lossy(&o.stderr), self.log_tail());
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs the CLI with `--json` and parses its output.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("vgrid {args:?}: not JSON ({e}): {out}"))
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.data.path().join("up.log")).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    pub fn runtime_dir(&self, id: &str) -> PathBuf {
        self.data.path().join("host/vms").join(id)
    }

    /// Imports the cached sample guest as `sample`.
    pub fn import_sample(&self) {
        self.import_sample_as("sample", "");
    }

    /// Imports the cached sample guest as public image `name`, `cmdline_extra` appended to its
    /// kernel command line.
    pub fn import_sample_as(&self, name: &str, cmdline_extra: &str) {
        let g = sample_guest().expect("sample guest");
        let cmdline = format!("{} {cmdline_extra}", g.cmdline);
        self.ok(&[
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
            cmdline.trim_end(),
            "--public",
        ]);
    }

    /// `vm run` waiting for `marker`, with a boot slot, a timeout and one retry. Returns the VM record.
    pub fn run_vm(&self, image: &str, name: &str, marker: &str, extra: &[&str]) -> serde_json::Value {
        let _slot = boot_slot().expect("boot slot");
        let mut last = String::new();
        for attempt in 1..=2 {
            let vm_name = format!("{name}{}", if attempt == 1 { String::new() } else { format!("-retry{attempt}") });
            let mut args = vec!["--json", "vm", "run", image, "--name", &vm_name, "--wait-for", marker, "--timeout", "90"];
            args.extend_from_slice(extra);
            let o = self.cli(&args);
            if o.status.success() {
                return serde_json::from_slice(&o.stdout).expect("vm run --json output");
            }
            last = format!("{}{}", String::from_utf8_lossy(&o.stderr), String::from_utf8_lossy(&o.stdout));
            eprintln!("boot attempt {attempt} of {name} failed: {last}");
            let _ = self.cli(&["vm", "rm", "--force", &vm_name]);
        }
        panic!("VM {name} did not boot twice: {last}\n{}", self.log_tail());
    }

    pub fn vm(&self, id: &str) -> serde_json::Value {
        self.json(&["vm", "show", id])
    }

    pub fn cache_stats(&self) -> serde_json::Value {
        self.json(&["image", "cache", "stats"])
    }

    /// Waits until `f` holds, polling every 100 ms, up to `timeout`.
    pub fn wait_until(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !f() {
            if t0.elapsed() > timeout {
                panic!("timed out after {timeout:?} waiting for {what}\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM and wait (graceful shutdown); returns whether it exited by itself.
    pub fn terminate(&mut self) -> bool {
        self.child.take().map(|c| stop_child(c, Duration::from_secs(60))).unwrap_or(true)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            stop_child(c, Duration::from_secs(30));
        }
        // Anything left (it should not be): QEMUs, RAM pagers and their mounts.
        kill_guests_under(self.data.path());
    }
}

/// Kills every process whose command line names a path under `dir` (guests' QEMUs and RAM
/// pagers outlive their host agent by design, so a failed test would leave them running) and
/// lazily unmounts the FUSE mounts under it.
pub fn kill_guests_under(dir: &Path) {
    let needle = format!("{}/", dir.to_string_lossy().trim_end_matches('/'));
    if needle.len() < 6 {
        return;
    }
    let me = std::process::id();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(&needle) {
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for m in mounts.lines().filter_map(|l| l.split(' ').nth(1)).filter(|m| m.starts_with(&needle)) {
        let _ = Command::new("umount").args(["-l", m]).status();
    }
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Sends `cmd` to the VM's serial console socket and waits until `until` shows in its console log.
pub fn console_exec(up: &Up, id: &str, cmd: &str, until: &str) {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let dir = up.runtime_dir(id);
    let log = dir.join("console.log");
    let before = std::fs::read(&log).map(|v| v.len()).unwrap_or(0);
    let mut s = UnixStream::connect(dir.join("console.sock")).expect("console socket");
    s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    up.wait_until(&format!("{until:?} on the console of {id}"), Duration::from_secs(60), || {
        std::fs::read(&log).map(|v| String::from_utf8_lossy(&v[before.min(v.len())..]).contains(until)).unwrap_or(false)
    });
}

/// Waits until the serial console of the VM whose runtime directory is `dir` has shown `prompt`
/// (text typed before a shell reads it may be lost), types `cmd` there and returns the first
/// whole line the console printed after it that contains `until`. Typed again every 10 s while
/// no such line came, until `timeout`. Reads what QEMU sends back meanwhile: QEMU writes the
/// console to the socket a byte at a time, and a client that does not read stalls the guest's
/// serial output (and so the echo of its input) after about 280 bytes.
pub fn console_line(dir: &Path, prompt: &str, cmd: &str, until: &str, timeout: Duration) -> Result<String, String> {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let log = dir.join("console.log");
    let t0 = Instant::now();
    while !std::fs::read(&log).is_ok_and(|v| String::from_utf8_lossy(&v).contains(prompt)) {
        if t0.elapsed() > timeout {
            let text = std::fs::read(&log).map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default();
            return Err(format!("no {prompt:?} on the console within {timeout:?}; it printed:\n{text}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = std::fs::read(&log).map(|v| v.len()).unwrap_or(0);
    let mut s = UnixStream::connect(dir.join("console.sock")).map_err(|e| format!("console socket in {}: {e}", dir.display()))?;
    s.set_read_timeout(Some(Duration::from_millis(200))).map_err(|e| format!("console socket: {e}"))?;
    let mut drain = [0u8; 4096];
    let mut typed = None::<Instant>;
    loop {
        if typed.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            s.write_all(format!("{cmd}\n").as_bytes()).map_err(|e| format!("typing on the console: {e}"))?;
            typed = Some(Instant::now());
        }
        let text = std::fs::read(&log).map(|v| String::from_utf8_lossy(&v[before.min(v.len())..]).into_owned()).unwrap_or_default();
        // Only whole lines: the last one may still be arriving.
        let whole = text.rsplit_once('\n').map(|(w, _)| w).unwrap_or("");
        if let Some(line) = whole.lines().find(|l| l.contains(until)) {
            return Ok(line.trim_end_matches('\r').to_string());
        }
        if t0.elapsed() > timeout {
            return Err(format!("no line with {until:?} on the console within {timeout:?} after typing {cmd:?}; it printed:\n{text}"));
        }
        // Waits up to 200 ms for the console's output (which the log above has too).
        match s.read(&mut drain) {
            Ok(0) => return Err(format!("QEMU closed the console socket; it printed:\n{text}")),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(format!("reading the console socket: {e}")),
        }
    }
}

/// A vgrid role started as its own process (`vgrid coordinator|host|image-server ...`),
/// killed on drop. `url` is the first `https://` word of its first stdout line. A host or image
/// server given `--coordinator URL` and no `--join-token` gets a fresh one-time token from that
/// coordinator (made by the local admin through the CLI), as an operator would hand it over.
pub struct Role {
    pub child: Option<Child>,
    pub url: String,
    pub log: PathBuf,
}

impl Role {
    pub fn start(args: &[&str], log: PathBuf) -> Role {
        Self::start_env(args, log, &[])
    }

    /// A coordinator on `listen` with data directory `data`, heartbeats every second and
    /// hosts lost after `lost_after_beats` missed beats, logging to `log`.
    pub fn coordinator(listen: &str, data: &Path, lost_after_beats: u32, log: PathBuf) -> Role {
        Self::coordinator_env(listen, data, lost_after_beats, log, &[])
    }

    /// [`Role::coordinator`] with extra environment variables.
    pub fn coordinator_env(listen: &str, data: &Path, lost_after_beats: u32, log: PathBuf, env: &[(&str, &str)]) -> Role {
        let beats = lost_after_beats.to_string();
        let args = [
            "coordinator",
            "--listen",
            listen,
            "--data-dir",
            data.to_str().unwrap(),
            "--heartbeat-interval",
            "1",
            "--lost-after-beats",
            &beats,
        ];
        Self::start_env(&args, log, env)
    }

    /// [`Role::start`] with extra environment variables.
    pub fn start_env(args: &[&str], log: PathBuf, env: &[(&str, &str)]) -> Role {
        Self::start_cmd(Command::new(vgrid_bin()), args, log, env)
    }

    /// [`Role::start`] inside network namespace `ns` (`ip netns exec NS vgrid ARGS`: the
    /// process is `vgrid` itself, so killing the child kills the role).
    pub fn start_in_netns(ns: &str, args: &[&str], log: PathBuf) -> Role {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(vgrid_bin());
        Self::start_cmd(cmd, args, log, &[])
    }

    fn start_cmd(mut cmd: Command, args: &[&str], log: PathBuf, env: &[(&str, &str)]) -> Role {
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let joins = matches!(args.first().map(|a| a.as_str()), Some("host" | "image-server"));
        if joins && !args.iter().any(|a| a == "--join-token") {
            if let Some(i) = args.iter().position(|a| a == "--coordinator") {
                let token = join_token(&args[i + 1], &args[0]);
                args.extend(["--join-token".to_string(), token]);
            }
        }
        let mut child = cmd
            .args(&args)
            .env("RUST_LOG", role_log_level())
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("spawning a vgrid role");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        let mut reader = BufReader::new(stdout);
        reader.read_line(&mut line).expect("reading the role's first line");
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let url =
            line.split_whitespace().find(|w| w.starts_with("https://")).map(|w| w.trim_end_matches([',', ')']).to_string()).unwrap_or_else(
                || panic!("vgrid {args:?} printed no URL: {line:?}; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default()),
            );
        Role { child: Some(child), url, log }
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (at most 30 s, then SIGKILL); returns whether it exited by itself.
    pub fn terminate(&mut self) -> bool {
        self.child.take().map(|c| stop_child(c, Duration::from_secs(30))).unwrap_or(true)
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// SIGTERM, wait up to `timeout`, then SIGKILL. Returns whether it exited by itself.
pub fn stop_child(mut c: Child, timeout: Duration) -> bool {
    unsafe {
        libc::kill(c.id() as i32, libc::SIGTERM);
    }
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if let Ok(Some(_)) = c.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = c.kill();
    let _ = c.wait();
    false
}

/// Runs the CLI against the coordinator at `url`.
pub fn cli_at(url: &str, args: &[&str]) -> Output {
    Command::new(vgrid_bin()).args(args).env("VGRID_URL", url).stdin(Stdio::null()).output().expect("running vgrid")
}

/// Runs the CLI with `--json` against the coordinator at `url`, expects success, parses stdout.
pub fn json_at(url: &str, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let o = cli_at(url, &a);
    assert!(o.status.success(), "vgrid {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A one-time join token for `role` (`host` or `image-server`) from the coordinator at `url`.
pub fn join_token(url: &str, role: &str) -> String {
    json_at(url, &["join-token", "create", "--role", role])["token"].as_str().unwrap().to_string()
}

/// The CA the CLI pinned for the coordinator at `url` (a PEM file), pinning it if needed.
pub fn pinned_ca(url: &str) -> PathBuf {
    PathBuf::from(json_at(url, &["ca"])["pinned_in"].as_str().unwrap())
}

/// `curl -s` that trusts only the CA pinned for `url`.
pub fn curl_for(url: &str) -> Command {
    let mut c = Command::new("curl");
    c.arg("-s").arg("--cacert").arg(pinned_ca(url));
    c
}

/// GET `path` of the REST API at `url` with a login token (the local user's, as the CLI logs
/// in); returns the body.
pub fn api_get(url: &str, path: &str) -> Vec<u8> {
    let token = json_at(url, &["login"])["token"].as_str().unwrap().to_string();
    curl_for(url).args(["-H", &format!("authorization: Bearer {token}"), &format!("{url}{path}")]).output().unwrap().stdout
}

/// How long each read waited for an image server, in seconds, as a host's log says ("the read
/// goes on after waiting 4.2 s", the block proxy's line when a server answers again).
pub fn read_waits(log: &str) -> Vec<f64> {
    log.lines().filter_map(|l| l.split("the read goes on after waiting ").nth(1)?.split_whitespace().next()?.parse().ok()).collect()
}

/// Opens a TLS connection to the server at `url` and keeps it open until the child is killed
/// (`openssl s_client`): with `idle`, one request was answered and the connection waits for
/// the next (HTTP keep-alive); otherwise a request's head was only begun (a slow or stuck
/// client). Either must not keep a role that is asked to stop from exiting.
pub fn hold_connection(url: &str, idle: bool) -> Child {
    use std::io::Write;
    let addr = url.trim_start_matches("https://").trim_end_matches('/');
    let mut c = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client");
    let head = if idle { "GET /api/v1/health HTTP/1.1\r\nHost: vgrid\r\n\r\n" } else { "GET /api/v1/health HTTP/1.1\r\nHost: vg" };
    c.stdin.as_mut().unwrap().write_all(head.as_bytes()).unwrap();
    // The connection is up once the server answered (idle) or the handshake is surely over.
    let mut out = c.stdout.take().unwrap();
    if idle {
        let mut b = [0u8; 12];
        let _ = std::io::Read::read_exact(&mut out, &mut b);
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    } else {
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        std::thread::sleep(Duration::from_secs(1));
    }
    c
}

/// Prints a scenario's figures for `scripts/faults`.
pub fn figures(scenario: &str, text: &str) {
    println!("FAULTS-FIGURES\t{scenario}\t{text}");
    eprintln!("[{scenario}] {text}");
}
