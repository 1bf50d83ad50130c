//! A grid of a real coordinator and image server (processes) and simulated host agents
//! (`common::sim`), for the scenarios where hundreds of VMs are needed and what is checked is
//! the coordinator's (`tests/faults.rs`, the load of `common::load`). The coordinator can be
//! SIGKILLed and started again on the same address and data directory.
#![allow(dead_code)]

use super::sim::{authed, login_token, start_sim, wait_ready, Sim, SimSpec};
use super::*;
use serde_json::Value;
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

/// A coordinator, an image server holding a tiny image, and simulated hosts; the coordinator
/// can be SIGKILLed and started again on the same address and data directory.
pub struct SimGrid {
    pub dir: tempfile::TempDir,
    pub coordinator: Role,
    pub listen: String,
    pub restarts: usize,
    pub _server: Role,
    pub token: String,
    pub ca: String,
    pub rt: tokio::runtime::Runtime,
    pub sims: Vec<Sim>,
}

/// Image server `is0` (data in `dir/is`) advertising to `coordinators` (comma-separated),
/// holding image `tiny` (1 MiB, imported through the first coordinator): the simulated hosts
/// never read it, the coordinator resolves it.
pub fn tiny_image_server(dir: &std::path::Path, coordinators: &str) -> Role {
    let p = |s: &str| dir.join(s).to_str().unwrap().to_string();
    let server = Role::start(
        &["image-server", "--listen", "127.0.0.1:0", "--data-dir", &p("is"), "--coordinator", coordinators, "--name", "is0"],
        dir.join("is.log"),
    );
    std::fs::write(p("tiny.raw"), vec![7u8; 1 << 20]).unwrap();
    let first = coordinators.split(',').next().unwrap();
    let o = Command::new(vgrid_bin())
        .args(["image", "import", &p("tiny.raw"), "--name", "tiny", "--image-server", &server.url])
        .env("VGRID_URL", first)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    server
}

impl SimGrid {
    pub fn start(hosts: usize, spec: impl Fn(usize) -> SimSpec) -> SimGrid {
        let dir = tempfile::Builder::new().prefix("vgf").tempdir_in("/tmp").unwrap();
        let coordinator = Self::coordinator(&dir, "127.0.0.1:0", 0);
        let listen = coordinator.url.trim_start_matches("https://").to_string();
        let server = tiny_image_server(dir.path(), &coordinator.url);
        let token = login_token(&coordinator.url);
        let ca = std::fs::read_to_string(pinned_ca(&coordinator.url)).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
        let url = coordinator.url.clone();
        let specs: Vec<SimSpec> = (0..hosts).map(spec).collect();
        let http = authed(&token, &ca);
        let sims = rt.block_on(async move {
            let mut sims = Vec::new();
            for (i, s) in specs.into_iter().enumerate() {
                sims.push(start_sim(format!("sim{i}"), url.clone(), s).await);
            }
            wait_ready(&http, &url, hosts, Duration::from_secs(60)).await;
            sims
        });
        SimGrid { dir, coordinator, listen, restarts: 0, _server: server, token, ca, rt, sims }
    }

    pub fn coordinator(dir: &tempfile::TempDir, listen: &str, n: usize) -> Role {
        Role::coordinator(listen, &dir.path().join("coord"), 10, dir.path().join(format!("coord{n}.log")))
    }

    pub fn url(&self) -> String {
        self.coordinator.url.clone()
    }

    pub fn http(&self) -> reqwest::Client {
        authed(&self.token, &self.ca)
    }

    /// SIGKILL, as a crash.
    pub fn kill_coordinator(&mut self) {
        self.coordinator.kill();
    }

    /// Starts the coordinator again on the same address and data directory.
    pub fn start_coordinator(&mut self) {
        self.restarts += 1;
        self.coordinator = Self::coordinator(&self.dir, &self.listen, self.restarts);
    }

    pub fn coordinator_pid(&self) -> u32 {
        self.coordinator.child.as_ref().unwrap().id()
    }

    /// The coordinator's logs (every run), for assertion messages and figures.
    pub fn logs(&self) -> String {
        (0..=self.restarts)
            .map(|n| std::fs::read_to_string(self.dir.path().join(format!("coord{n}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn vms(&self) -> Vec<Value> {
        let (http, url) = (self.http(), self.url());
        self.rt.block_on(async move {
            http.get(format!("{url}/api/v1/vms")).send().await.unwrap().json::<Value>().await.unwrap().as_array().unwrap().clone()
        })
    }

    pub fn vm(&self, id: &str) -> Value {
        let (http, url) = (self.http(), self.url());
        let id = id.to_string();
        self.rt.block_on(async move { http.get(format!("{url}/api/v1/vms/{id}")).send().await.unwrap().json::<Value>().await.unwrap() })
    }

    pub fn wait_until(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}; coordinator log:\n{}", tail(&self.logs(), 60));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every launch on every simulated host, and the lines of hosts given more than they have.
    pub fn launches(&self) -> (HashMap<String, usize>, Vec<String>) {
        let mut n = HashMap::new();
        let mut over = Vec::new();
        for s in &self.sims {
            let st = s.state.lock().unwrap();
            for id in &st.launches {
                *n.entry(id.clone()).or_insert(0) += 1;
            }
            over.extend(st.over.iter().cloned());
        }
        (n, over)
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
