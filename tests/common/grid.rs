//! A grid of separate role processes for tests that boot real guests: a coordinator, an image
//! server and host agents, each with its own port and data directory (`tests/migrate.rs`,
//! `tests/faults.rs`). Agents can be killed and restarted with the same name and data
//! directory; the coordinator can be restarted on the same address.
#![allow(dead_code)]

use super::simgrid::tail;
use super::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct RoleGrid {
    pub dir: tempfile::TempDir,
    pub coordinator: Role,
    pub _server: Role,
    pub hosts: Vec<(String, Role)>,
    /// Environment every role process of the grid gets (e.g. `VGRID_METRICS_LISTEN`).
    pub env: Vec<(String, String)>,
}

impl RoleGrid {
    pub fn start(hosts: &[&str]) -> RoleGrid {
        Self::start_env(hosts, &[])
    }

    /// [`RoleGrid::start`] with `env` for every role process.
    pub fn start_env(hosts: &[&str], env: &[(&str, &str)]) -> RoleGrid {
        // Short path: unix socket paths (runtime dirs) must stay under 108 bytes.
        let dir = tempfile::Builder::new().prefix("vgm").tempdir_in("/tmp").unwrap();
        let coordinator = Role::coordinator_env("127.0.0.1:0", &dir.path().join("coord"), 3, dir.path().join("coord.log"), env);
        let server = image_server_is0(dir.path(), &coordinator.url, "is0.log", env);
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut g = RoleGrid { dir, coordinator, _server: server, hosts: vec![], env };
        for h in hosts {
            g.start_host(h);
        }
        g.wait_registered(hosts.len());
        g.import_sample();
        g
    }

    pub fn start_host(&mut self, name: &str) {
        self.start_host_env(name, &[]);
    }

    /// [`RoleGrid::start_host`] with extra environment variables for the agent.
    pub fn start_host_env(&mut self, name: &str, env: &[(&str, &str)]) {
        let data = self.host_dir(name);
        let args = [
            "host",
            "--coordinator",
            &self.coordinator.url,
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
            "--data-dir",
            data.to_str().unwrap(),
        ];
        // A restarted host keeps its name and data directory (and so its runtime directories).
        let log = self.dir.path().join(format!("{name}-{}.log", self.hosts.len()));
        let mut all: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        all.extend_from_slice(env);
        let r = Role::start_env(&args, log, &all);
        self.hosts.retain(|(n, _)| n != name);
        self.hosts.push((name.to_string(), r));
    }

    /// SIGKILLs the coordinator and starts it again on the same address and data directory.
    /// (Hosts and the image server register again at their next heartbeat; callers that need
    /// them wait with [`RoleGrid::wait_registered`].)
    pub fn restart_coordinator(&mut self) {
        self.coordinator.kill();
        let listen = self.coordinator.url.trim_start_matches("https://").trim_end_matches('/').to_string();
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.coordinator = Role::coordinator_env(&listen, &self.dir.path().join("coord"), 3, self.dir.path().join("coord2.log"), &env);
    }

    /// SIGKILLs the image server and starts it again with the same data directory (on a new
    /// port: it registers again with the coordinator under its new address).
    pub fn restart_image_server(&mut self) {
        self._server.kill();
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self._server = image_server_is0(self.dir.path(), &self.coordinator.url, "is0-again.log", &env);
    }

    /// Waits until `hosts` hosts and the image server are registered (again, after a restart).
    pub fn wait_registered(&self, hosts: usize) {
        self.wait_until("hosts and the image server to register", Duration::from_secs(60), || {
            self.json(&["host", "ls"]).as_array().map(|a| a.len()) == Some(hosts) && self.image_servers() == 1
        });
    }

    pub fn host(&mut self, name: &str) -> &mut Role {
        &mut self.hosts.iter_mut().find(|(n, _)| n == name).unwrap().1
    }

    pub fn host_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn runtime_dir(&self, host: &str, id: &str) -> PathBuf {
        self.host_dir(host).join("vms").join(id)
    }

    pub fn image_servers(&self) -> usize {
        let body = api_get(&self.coordinator.url, "/api/v1/image-servers");
        serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v.as_array().map(|a| a.len())).unwrap_or(0)
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        cli_at(&self.coordinator.url, args)
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        json_at(&self.coordinator.url, args)
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for f in
            ["coord.log", "coord2.log"].iter().map(|f| f.to_string()).chain(self.hosts.iter().map(|(_, r)| r.log.display().to_string()))
        {
            let p = self.dir.path().join(&f);
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            s.push_str(&format!("--- {f}\n{}\n", tail(&text, 15)));
        }
        // The guests' consoles too: a wait for what a guest prints fails with what it did print.
        for (name, _) in &self.hosts {
            let Ok(vms) = std::fs::read_dir(self.host_dir(name).join("vms")) else { continue };
            for vm in vms.flatten() {
                let log = console_log(&vm.path());
                s.push_str(&format!("--- console of {} on {name}\n{}\n", vm.file_name().to_string_lossy(), tail(&log, 15)));
            }
        }
        s
    }

    pub fn wait_until(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn import_sample(&self) {
        import_sample_at(&self.coordinator.url, &self._server.url);
    }

    /// Boots a VM on `host` and waits for the shell prompt (a boot slot, a timeout, one retry).
    pub fn run_on(&self, host: &str, name: &str) -> serde_json::Value {
        self.run_where(&format!("host.name == {host:?}"), name)
    }

    /// Boots the sample guest as `name` on a host meeting `require` (any host when empty), up
    /// to the shell prompt; one retry.
    pub fn run_where(&self, require: &str, name: &str) -> serde_json::Value {
        self.run_with(require, name, &[])
    }

    /// [`RoleGrid::run_where`] with more `vm run` arguments (e.g. `--volume NAME`).
    pub fn run_with(&self, require: &str, name: &str, extra: &[&str]) -> serde_json::Value {
        let _slot = boot_slot().unwrap();
        let mut last = String::new();
        for attempt in 1..=2 {
            let n = if attempt == 1 { name.to_string() } else { format!("{name}-retry") };
            let mut args = vec!["--json", "vm", "run", "sample", "--name", &n, "--wait-for", PROMPT, "--timeout", "120"];
            if !require.is_empty() {
                args.extend(["--require", require]);
            }
            args.extend(extra);
            let o = self.cli(&args);
            if o.status.success() {
                return serde_json::from_slice(&o.stdout).unwrap();
            }
            last = String::from_utf8_lossy(&o.stderr).into_owned();
            eprintln!("boot attempt {attempt} of {name} failed: {last}");
            let _ = self.cli(&["vm", "rm", "--force", &n]);
        }
        panic!("VM {name} did not boot twice: {last}\n{}", self.logs());
    }
}

impl Drop for RoleGrid {
    fn drop(&mut self) {
        // Agents first (they leave their guests running for a next agent), then the QEMUs.
        for (_, h) in self.hosts.iter_mut() {
            h.terminate();
        }
        for (name, _) in &self.hosts {
            kill_guests_under(&self.host_dir(name));
        }
    }
}

/// Starts image server `is0` on `dir/is0` (a new loopback port each time) advertising to the
/// coordinator at `coordinator`, logging to `dir/log`.
pub fn image_server_is0(dir: &Path, coordinator: &str, log: &str, env: &[(&str, &str)]) -> Role {
    let data = dir.join("is0");
    Role::start_env(
        &["image-server", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap(), "--coordinator", coordinator, "--name", "is0"],
        dir.join(log),
        env,
    )
}

/// Types `cmd` on the VM's serial console socket in `dir`, and keeps the connection until
/// QEMU has read all of it: QEMU reads typed bytes only as the guest's UART takes them (a
/// guest that a loaded machine runs late under TCG takes seconds) and drops what is unread
/// when the client goes away; a fixed wait lost the end of a command now and then. What the
/// guest prints meanwhile is drained (unread, it would stall the guest's console).
pub fn type_on_console(dir: &Path, cmd: &str) {
    let s = type_draining(dir, cmd);
    let t0 = Instant::now();
    while unread(&s) > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "QEMU did not read {cmd:?} typed on the console in {} within 120 s",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Closed for the drain's clone too: QEMU serves the next client only once this one is gone.
    let _ = s.shutdown(std::net::Shutdown::Both);
}

/// Connects to the console socket in `dir`, drains what the guest prints while the connection
/// is open (QEMU holds the guest's console output back once the socket's buffer is full, each
/// character may take a message of its own) and types `cmd`. Shut the connection down when
/// done: the drain's clone keeps it open otherwise.
fn type_draining(dir: &Path, cmd: &str) -> std::os::unix::net::UnixStream {
    let mut s = std::os::unix::net::UnixStream::connect(dir.join("console.sock")).expect("console socket");
    let mut drain = s.try_clone().unwrap();
    std::thread::spawn(move || std::io::copy(&mut drain, &mut std::io::sink()));
    s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    s
}

/// Bytes written on a unix stream socket that its peer has not read yet (`SIOCOUTQ`, which
/// is `TIOCOUTQ` on Linux).
fn unread(s: &std::os::unix::net::UnixStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: the ioctl writes one int through a pointer to a live local.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    assert!(r == 0, "SIOCOUTQ on the console socket: {}", std::io::Error::last_os_error());
    n.max(0) as usize
}

/// Types `cmd` on the console in `dir` and keeps the connection open until a line that is
/// exactly `until` shows (a guest just restored may read its input late). `until` must be
/// output only, not a part of `cmd` (the shell echoes what is typed: compute it, `$((1+1))`).
pub fn console_until(g: &RoleGrid, dir: &Path, cmd: &str, until: &str) {
    let s = type_draining(dir, cmd);
    let t0 = std::time::Instant::now();
    while !console_has_line(dir, until) {
        let log = console_log(dir);
        let tail = &log[log.len().saturating_sub(2000)..];
        assert!(t0.elapsed() < Duration::from_secs(120), "no line {until:?} on the console after 120 s:\n{tail}\n{}", g.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
}

pub fn console_log(dir: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(dir.join("console.log")).unwrap_or_default()).replace('\r', "")
}

/// Whether the console in `dir` printed a line that is exactly `line`: the guest's output, not
/// the echo of the typed command that names it (`...; echo read-done`).
pub fn console_has_line(dir: &Path, line: &str) -> bool {
    console_log(dir).lines().any(|l| l.trim() == line)
}

/// How many QEMUs run for VM `id` (their command line names it).
pub fn qemus_of(id: &str) -> usize {
    let o = Command::new("pgrep").args(["-f", &format!("guest={id},")]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).lines().count()
}

/// Imports the sample guest as image `sample` through the coordinator at `url`, its chunks on
/// the image server at `server`.
pub fn import_sample_at(url: &str, server: &str) {
    let g = sample_guest().unwrap();
    let o = Command::new(vgrid_bin())
        .args(["image", "import", g.disk.to_str().unwrap(), "--name", "sample", "--kernel", g.kernel.to_str().unwrap()])
        .args(["--initrd", g.initrd.to_str().unwrap(), "--cmdline", &g.cmdline, "--image-server", server])
        .env("VGRID_URL", url)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
