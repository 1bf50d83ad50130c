//! The fault suite, coordinator side: faults injected while work goes on, invariants checked
//! at the end. Real processes (coordinator, image server) and simulated host agents
//! (`common::sim`), where hundreds of VMs are needed and what is checked is the coordinator's:
//! a coordinator SIGKILLed during a launch and in a burst of runs, and a load held. The
//! scenarios with real guests (host agents killed, a network partition) are in
//! `tests/faults_guests.rs`. Each scenario prints its figures on lines
//! `FAULTS-FIGURES<TAB>SCENARIO<TAB>TEXT`, which `scripts/faults` gathers into its summary table
//! (with what was injected, the work during it and the invariant, which it lists).
//!
//! The cheap scenarios run with the workspace's tests; the load held for minutes is `#[ignore]`
//! and run by `scripts/faults`.

mod common;

use common::sim::{authed, login_token, start_sim, wait_ready, Sim, SimSpec, CONSOLE_AFTER, CONSOLE_TEXT};
use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A coordinator, an image server holding a tiny image, and simulated hosts; the coordinator
/// can be SIGKILLed and started again on the same address and data directory.
struct SimGrid {
    dir: tempfile::TempDir,
    coordinator: Role,
    listen: String,
    restarts: usize,
    _server: Role,
    token: String,
    ca: String,
    rt: tokio::runtime::Runtime,
    sims: Vec<Sim>,
}

impl SimGrid {
    fn start(hosts: usize, spec: impl Fn(usize) -> SimSpec) -> SimGrid {
        let dir = tempfile::Builder::new().prefix("vgf").tempdir_in("/tmp").unwrap();
        let coordinator = Self::coordinator(&dir, "127.0.0.1:0", 0);
        let listen = coordinator.url.trim_start_matches("https://").to_string();
        let p = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
        let server = Role::start(
            &["image-server", "--listen", "127.0.0.1:0", "--data-dir", &p("is"), "--coordinator", &coordinator.url, "--name", "is0"],
            dir.path().join("is.log"),
        );
        // A small image: the simulated hosts never read it, the coordinator resolves it.
        std::fs::write(p("tiny.raw"), vec![7u8; 1 << 20]).unwrap();
        let o = Command::new(vgrid_bin())
            .args(["image", "import", &p("tiny.raw"), "--name", "tiny", "--image-server", &server.url])
            .env("VGRID_URL", &coordinator.url)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
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

    fn coordinator(dir: &tempfile::TempDir, listen: &str, n: usize) -> Role {
        let data = dir.path().join("coord");
        Role::start(
            &[
                "coordinator",
                "--listen",
                listen,
                "--data-dir",
                data.to_str().unwrap(),
                "--heartbeat-interval",
                "1",
                "--lost-after-beats",
                "10",
            ],
            dir.path().join(format!("coord{n}.log")),
        )
    }

    fn url(&self) -> String {
        self.coordinator.url.clone()
    }

    fn http(&self) -> reqwest::Client {
        authed(&self.token, &self.ca)
    }

    /// SIGKILL, as a crash.
    fn kill_coordinator(&mut self) {
        self.coordinator.kill();
    }

    /// Starts the coordinator again on the same address and data directory.
    fn start_coordinator(&mut self) {
        self.restarts += 1;
        self.coordinator = Self::coordinator(&self.dir, &self.listen, self.restarts);
    }

    fn coordinator_pid(&self) -> u32 {
        self.coordinator.child.as_ref().unwrap().id()
    }

    /// The coordinator's logs (every run), for assertion messages and figures.
    fn logs(&self) -> String {
        (0..=self.restarts)
            .map(|n| std::fs::read_to_string(self.dir.path().join(format!("coord{n}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn vms(&self) -> Vec<Value> {
        let (http, url) = (self.http(), self.url());
        self.rt.block_on(async move {
            http.get(format!("{url}/api/v1/vms")).send().await.unwrap().json::<Value>().await.unwrap().as_array().unwrap().clone()
        })
    }

    fn vm(&self, id: &str) -> Value {
        let (http, url) = (self.http(), self.url());
        let id = id.to_string();
        self.rt.block_on(async move { http.get(format!("{url}/api/v1/vms/{id}")).send().await.unwrap().json::<Value>().await.unwrap() })
    }

    fn wait_until(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}; coordinator log:\n{}", tail(&self.logs(), 60));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every launch on every simulated host, and the lines of hosts given more than they have.
    fn launches(&self) -> (HashMap<String, usize>, Vec<String>) {
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

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The answer to one `POST /api/v1/vms`, sent again as a client would: after a connection
/// error (the coordinator is down) and after a 503 (retryable by contract). A 409 naming the
/// VM as existing after a resend means the first attempt was recorded: the VM is looked up.
#[derive(Debug, Default)]
struct Answer {
    id: Option<String>,
    /// Non-retryable error answers (status, body).
    error: Option<(u16, String)>,
    connection_errors: usize,
    retryable: usize,
    found_after_resend: bool,
}

async fn create_with_retry(http: &reqwest::Client, url: &str, body: &Value, deadline: Instant) -> Answer {
    let mut a = Answer::default();
    let name = body["name"].as_str().unwrap_or_default().to_string();
    loop {
        assert!(Instant::now() < deadline, "request for {name} still unanswered: {a:?}");
        match http.post(format!("{url}/api/v1/vms")).json(body).send().await {
            Err(_) => {
                a.connection_errors += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(r) => {
                let status = r.status().as_u16();
                let v: Value = r.json().await.unwrap_or(Value::Null);
                match status {
                    200..=299 => {
                        a.id = v["id"].as_str().map(String::from);
                        return a;
                    }
                    503 => {
                        a.retryable += 1;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    409 if a.connection_errors > 0 && v["error"].as_str().is_some_and(|e| e.contains("exists already")) => {
                        // Recorded by the attempt whose answer the crash swallowed.
                        let got: Value = http.get(format!("{url}/api/v1/vms/{name}")).send().await.unwrap().json().await.unwrap();
                        a.id = got["id"].as_str().map(String::from);
                        a.found_after_resend = true;
                        return a;
                    }
                    _ => {
                        a.error = Some((status, v.to_string()));
                        return a;
                    }
                }
            }
        }
    }
}

/// Coordinator SIGKILL while a VM's launch is in flight on its host (the launch completes
/// while the coordinator is down); restarted, it must adopt the VM its host runs (not fail
/// it), keep counting its capacity (a second VM that does not fit waits), and answer a create
/// right after the restart (the image server's registration survives it).
#[test]
fn coordinator_killed_during_a_launch_adopts_the_vm() {
    let spec = |_| SimSpec { cpus: 2, memory_mib: 2048, life: |_| None, launch_time: Duration::from_secs(4), labels: vec![] };
    let mut g = SimGrid::start(1, spec);
    let (http, url) = (g.http(), g.url());
    let a: Value = g.rt.block_on(async {
        let body = json!({"image": "tiny", "name": "inflight", "cpus": 2, "memory_mib": 1024});
        http.post(format!("{url}/api/v1/vms")).json(&body).send().await.unwrap().json().await.unwrap()
    });
    let id = a["id"].as_str().unwrap_or_else(|| panic!("{a}")).to_string();
    g.wait_until("the launch to be sent", Duration::from_secs(30), || g.vm(&id)["state"] == "starting");
    g.kill_coordinator();
    // The host completes the launch while nobody listens.
    g.wait_until("the host to run it", Duration::from_secs(30), || g.sims[0].state.lock().unwrap().running.contains_key(&id));
    g.start_coordinator();
    let t0 = Instant::now();
    let (http, url) = (g.http(), g.url());
    // Right away (before any heartbeat of the image server): a create is answered.
    let (status, b): (u16, Value) = g.rt.block_on(async {
        let body = json!({"image": "tiny", "name": "after", "cpus": 1, "memory_mib": 512});
        let r = http.post(format!("{url}/api/v1/vms")).json(&body).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    });
    assert_eq!(status, 201, "a create right after the restart: {b}");
    let bid = b["id"].as_str().unwrap().to_string();
    g.wait_until("the launched VM adopted", Duration::from_secs(60), || g.vm(&id)["state"] != "starting");
    let adopted = t0.elapsed();
    let v = g.vm(&id);
    assert_eq!(v["state"], "running", "a VM its host runs is adopted, not failed: {v}");
    assert_eq!(v["host"], "sim0", "{v}");
    // Its capacity still counts: the second VM does not fit next to it and waits.
    std::thread::sleep(Duration::from_secs(2));
    let w = g.vm(&bid);
    assert_eq!(w["state"], "pending", "{w}");
    assert!(w["host"].is_null(), "placed on a host the adopted VM fills: {w}");
    // Once the first stops, the second runs there; nothing ran twice, nothing over capacity.
    let (http, url) = (g.http(), g.url());
    let stopped: Value = g
        .rt
        .block_on(async { http.post(format!("{url}/api/v1/vms/{id}/stop")).json(&json!({})).send().await.unwrap().json().await.unwrap() });
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    g.wait_until("the queued VM to run", Duration::from_secs(60), || g.vm(&bid)["state"] == "running");
    let (launches, over) = g.launches();
    assert!(over.is_empty(), "{over:?}");
    assert_eq!(launches.get(&id), Some(&1), "{launches:?}");
    assert_eq!(launches.get(&bid), Some(&1), "{launches:?}");
    figures(
        "coordinator-kill-launch",
        &format!(
            "adopted {:.1}s after the restart; create right after the restart answered {status}; 2nd VM queued until capacity freed; launches {}/{}",
            adopted.as_secs_f64(),
            launches.values().sum::<usize>(),
            2
        ),
    );
}

/// A host agent that cannot answer for a while right after a VM started on it (answers 503
/// for 4 s, as an agent being restarted is unreachable): `vgrid vm run --wait-for` keeps
/// waiting through it and reports the text it waited for once the host answers again, instead
/// of failing on the first "host unreachable".
#[test]
fn vm_run_waits_through_an_unreachable_host() {
    let spec = |_| SimSpec { life: |_| None, ..SimSpec::default() };
    let g = SimGrid::start(1, spec);
    let text = CONSOLE_TEXT.trim();
    let cli = Command::new(vgrid_bin())
        .args(["--json", "vm", "run", "tiny", "--name", "patient", "--wait-for", text, "--timeout", "60"])
        .env("VGRID_URL", g.url())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    g.wait_until("the launch", Duration::from_secs(30), || !g.sims[0].state.lock().unwrap().launches.is_empty());
    g.sims[0].failing.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    std::thread::sleep(CONSOLE_AFTER * 2);
    g.sims[0].failing.store(false, Ordering::SeqCst);
    let out = cli.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vm run gave up while its host was out of service: {err}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "running", "{v}");
    figures(
        "agent-unreachable-wait-for",
        &format!(
            "host answered 503 for {:.1}s after the launch; vm run --wait-for returned success {:.1}s after it began",
            (CONSOLE_AFTER * 2).as_secs_f64(),
            t0.elapsed().as_secs_f64()
        ),
    );
}

/// How many requests the burst sends (`VGRID_FAULTS_BURST`, default 200).
fn burst_size() -> usize {
    std::env::var("VGRID_FAULTS_BURST").ok().and_then(|s| s.parse().ok()).unwrap_or(200)
}

/// Coordinator SIGKILL in a burst of concurrent `vm run` requests on simulated hosts: every
/// request is answered (or retryable: a connection error, a 503), no VM is started twice or
/// lost (each recorded once, launched once, ending `stopped`), the queue survives (VMs queued
/// at the kill run later), no host is given more than it has.
#[test]
fn coordinator_killed_in_a_burst_of_runs() {
    let n = burst_size();
    let hosts = 10;
    let spec = |_| SimSpec {
        cpus: 4,
        memory_mib: 4096,
        // 1-3 s: some end while the coordinator is down.
        life: |n| Some(Duration::from_millis(1000 + (n * 397 % 2000))),
        launch_time: Duration::from_millis(150),
        labels: vec![],
    };
    let mut g = SimGrid::start(hosts, spec);
    let (http, url) = (g.http(), g.url());
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    let burst = g.rt.spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(240);
        let reqs = (0..n).map(|i| {
            let (http, url, count) = (http.clone(), url.clone(), count.clone());
            async move {
                let body = json!({"image": "tiny", "name": format!("b{i}"), "cpus": 1 + i % 2, "memory_mib": 512 + 512 * (i % 3)});
                let a = create_with_retry(&http, &url, &body, deadline).await;
                count.fetch_add(1, Ordering::SeqCst);
                (i, a)
            }
        });
        futures::future::join_all(reqs).await
    });
    // Kill once a quarter of the burst is answered: VMs are then queued, placed, starting
    // (launches in flight) and running.
    let t0 = Instant::now();
    while answered.load(Ordering::SeqCst) < n / 4 {
        assert!(t0.elapsed() < Duration::from_secs(120), "the burst does not progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    let before_kill = answered.load(Ordering::SeqCst);
    g.kill_coordinator();
    std::thread::sleep(Duration::from_secs(2));
    g.start_coordinator();
    let restarted_at = Instant::now();
    let answers = g.rt.block_on(burst).unwrap();
    let all_answered = restarted_at.elapsed();

    let mut ids = HashMap::new();
    let (mut conn, mut retryable, mut resent) = (0, 0, 0);
    for (i, a) in &answers {
        assert!(a.error.is_none(), "request {i} got a non-retryable answer: {:?}", a.error);
        conn += a.connection_errors.min(1);
        retryable += a.retryable;
        resent += a.found_after_resend as usize;
        let id = a.id.clone().unwrap_or_else(|| panic!("request {i} has no VM: {a:?}"));
        assert!(ids.insert(id, *i).is_none(), "two requests got the same VM");
    }
    // Everything ends: VMs power off after their lifetime; queued ones run as capacity frees.
    let t1 = Instant::now();
    g.wait_until("every VM to end", Duration::from_secs(300), || {
        g.vms().iter().filter(|v| v["state"] == "stopped" || v["state"] == "failed" || v["state"] == "lost").count() >= n
    });
    let drained = t1.elapsed();
    let vms = g.vms();
    assert_eq!(vms.len(), n, "one record per request");
    for v in &vms {
        assert!(ids.contains_key(v["id"].as_str().unwrap()), "a VM nobody asked for: {v}");
        assert_eq!(v["state"], "stopped", "VM {} ended {}: {}", v["name"], v["state"], v["reason"]);
    }
    let (launches, over) = g.launches();
    assert!(over.is_empty(), "hosts over capacity: {over:?}");
    let twice: Vec<_> = launches.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "launched more than once: {twice:?}");
    assert_eq!(launches.len(), n, "every VM launched once");
    let logs = g.logs();
    let adopted = logs.matches("a launch interrupted by a coordinator restart completed").count();
    let resent_launches = logs.matches("the launch never reached the host before the coordinator restarted").count();
    let requeued = logs.matches("requeued").count();
    figures(
        "coordinator-kill-burst",
        &format!(
            "{n} requests on {hosts} hosts; {before_kill} answered before the kill; {conn} saw a connection error and resent ({resent} found recorded by 409), {retryable} 503s; all answered {:.1}s after the restart; launches adopted after restart {adopted}, sent again {resent_launches}, requeue log lines {requeued}; all {n} stopped, each launched once, {:.1}s to drain",
            all_answered.as_secs_f64(),
            drained.as_secs_f64()
        ),
    );
}

/// The load's percentiles of one route.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// (VmRSS in KiB, open fds) of process `pid`.
fn rss_and_fds(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    (rss, fds)
}

/// Load held: `clients` concurrent clients each create `per_client` VMs on `hosts` simulated
/// hosts, wait for them to run, read them, list, stop and remove them, in cycles until
/// `duration` has passed. Every request must be answered with success, the state must be
/// consistent at the end (no record, no claim: every host's free figures equal its totals,
/// no simulated host runs anything), and the coordinator's open fds must come back to where
/// they were after the first cycle (no leak). Prints p50/p99/max per route and the
/// coordinator's memory and fds over time.
fn load(scenario: &str, hosts: usize, clients: usize, per_client: usize, duration: Duration) {
    let spec = |_| SimSpec { cpus: 32, memory_mib: 65536, life: |_| None, launch_time: Duration::from_millis(20), labels: vec![] };
    let g = SimGrid::start(hosts, spec);
    let (http, url) = (g.http(), g.url());
    let pid = g.coordinator_pid();
    let samples = Arc::new(std::sync::Mutex::new(Vec::<(f64, u64, usize)>::new()));
    let stop_sampling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (samples, stop) = (samples.clone(), stop_sampling.clone());
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                let (rss, fds) = rss_and_fds(pid);
                samples.lock().unwrap().push((t0.elapsed().as_secs_f64(), rss, fds));
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let t0 = Instant::now();
    let (lat, cycles, errors) = g.rt.block_on(async move {
        let end = Instant::now() + duration;
        let lat: Arc<std::sync::Mutex<BTreeMap<&'static str, Vec<f64>>>> = Default::default();
        let errors: Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        let cycles = Arc::new(AtomicUsize::new(0));
        let tasks = (0..clients).map(|c| {
            let (http, url, lat, errors, cycles) = (http.clone(), url.clone(), lat.clone(), errors.clone(), cycles.clone());
            async move {
                // One request, timed under its route; an error answer or none is recorded.
                let call = |route: &'static str, req: reqwest::RequestBuilder| {
                    let (lat, errors) = (lat.clone(), errors.clone());
                    async move {
                        let t = Instant::now();
                        let r = req.send().await;
                        let ms = t.elapsed().as_secs_f64() * 1000.0;
                        lat.lock().unwrap().entry(route).or_default().push(ms);
                        match r {
                            Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
                            Ok(r) => {
                                let s = r.status();
                                let body = r.text().await.unwrap_or_default();
                                errors.lock().unwrap().push(format!("{route}: {s} {body}"));
                                None
                            }
                            Err(e) => {
                                errors.lock().unwrap().push(format!("{route}: {e}"));
                                None
                            }
                        }
                    }
                };
                let mut cycle = 0;
                loop {
                    let mut ids = Vec::new();
                    for k in 0..per_client {
                        let body = json!({"image": "tiny", "name": format!("c{c}-{cycle}-{k}"), "cpus": 1, "memory_mib": 256});
                        if let Some(v) = call("POST /vms", http.post(format!("{url}/api/v1/vms")).json(&body)).await {
                            ids.push(v["id"].as_str().unwrap().to_string());
                        }
                    }
                    for id in &ids {
                        loop {
                            let q = format!("{url}/api/v1/vms/{id}?wait_ms=2000&state=pending");
                            match call("GET /vms/{id} (long poll)", http.get(q)).await {
                                Some(v) if v["state"] == "running" => break,
                                Some(v) if v["state"] == "pending" || v["state"] == "starting" => {
                                    tokio::time::sleep(Duration::from_millis(50)).await
                                }
                                _ => break,
                            }
                        }
                    }
                    call("GET /vms", http.get(format!("{url}/api/v1/vms"))).await;
                    call("GET /hosts", http.get(format!("{url}/api/v1/hosts"))).await;
                    for id in &ids {
                        call("GET /vms/{id}", http.get(format!("{url}/api/v1/vms/{id}"))).await;
                        call("POST /vms/{id}/stop", http.post(format!("{url}/api/v1/vms/{id}/stop")).json(&json!({}))).await;
                        call("DELETE /vms/{id}", http.delete(format!("{url}/api/v1/vms/{id}"))).await;
                    }
                    cycle += 1;
                    cycles.fetch_add(1, Ordering::SeqCst);
                    if Instant::now() > end {
                        break;
                    }
                }
            }
        });
        futures::future::join_all(tasks).await;
        let lat = std::mem::take(&mut *lat.lock().unwrap());
        let errors = std::mem::take(&mut *errors.lock().unwrap());
        (lat, cycles.load(Ordering::SeqCst), errors)
    });
    let took = t0.elapsed();
    // Let the watchers finish and the fds settle, then take the last sample.
    std::thread::sleep(Duration::from_secs(3));
    stop_sampling.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let samples = samples.lock().unwrap().clone();
    assert!(errors.is_empty(), "{} requests failed, e.g. {:?}", errors.len(), &errors[..errors.len().min(5)]);

    // Consistent at the end: no record left, every host's capacity free again, nothing runs.
    assert!(g.vms().is_empty(), "records left: {:?}", g.vms().iter().take(3).collect::<Vec<_>>());
    let (http, url) = (g.http(), g.url());
    let hosts_now: Value =
        g.rt.block_on(async move { http.get(format!("{url}/api/v1/hosts")).send().await.unwrap().json().await.unwrap() });
    for h in hosts_now.as_array().unwrap() {
        assert_eq!(h["ad"]["free_cpus"], h["ad"]["cpus"], "capacity not given back: {h}");
        assert_eq!(h["ad"]["free_memory_mib"], h["ad"]["memory_mib"], "memory not given back: {h}");
    }
    for s in &g.sims {
        assert!(s.state.lock().unwrap().running.is_empty(), "{} still runs VMs", s.name);
    }
    let (launches, over) = g.launches();
    assert!(over.is_empty(), "{over:?}");
    assert!(launches.values().all(|n| *n == 1), "a VM launched twice");
    let total_vms = launches.len();

    let mut lines = Vec::new();
    let mut requests = 0;
    for (route, mut v) in lat {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        requests += v.len();
        lines.push(format!(
            "{route}: n={} p50={:.1}ms p99={:.1}ms max={:.1}ms",
            v.len(),
            percentile(&v, 0.5),
            percentile(&v, 0.99),
            v.last().copied().unwrap_or(0.0)
        ));
    }
    // Memory and fds: after the first tenth of the run (warm), at the peak, at the end.
    let warm = samples.iter().find(|s| s.0 >= took.as_secs_f64() / 10.0).or(samples.first()).copied().unwrap_or_default();
    let last = samples.last().copied().unwrap_or_default();
    let max_rss = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let max_fds = samples.iter().map(|s| s.2).max().unwrap_or(0);
    // No leak of descriptors: back to (about) where the warm coordinator was, whatever the load.
    assert!(last.2 <= warm.2 + 64, "the coordinator's fds grew from {} to {} (max {max_fds})", warm.2, last.2);
    figures(
        scenario,
        &format!(
            "{clients} clients x {per_client} VMs on {hosts} hosts for {:.0}s: {cycles} cycles, {total_vms} VMs created+run+stopped+removed, {requests} requests all answered 2xx; coordinator RSS warm {} MiB, max {} MiB, end {} MiB; fds warm {}, max {max_fds}, end {}; {}",
            took.as_secs_f64(),
            warm.1 / 1024,
            max_rss / 1024,
            last.1 / 1024,
            warm.2,
            last.2,
            lines.join("; ")
        ),
    );
}

/// The load run's duration (`VGRID_FAULTS_DURATION` seconds, default 600).
fn load_duration() -> Duration {
    Duration::from_secs(std::env::var("VGRID_FAULTS_DURATION").ok().and_then(|s| s.parse().ok()).unwrap_or(600))
}

/// The CI smoke of the load: the same shape, for 20 s.
#[test]
fn load_smoke() {
    load("load-smoke", 50, 50, 20, Duration::from_secs(20));
}

/// 1,000 VMs on 50 simulated hosts by 50 concurrent clients for `VGRID_FAULTS_DURATION`.
#[test]
#[ignore = "minutes of load; run by scripts/faults"]
fn load_held() {
    load("load", 50, 50, 20, load_duration());
}
