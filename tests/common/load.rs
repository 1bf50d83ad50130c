//! The load held (`tests/faults.rs`: `load_smoke`, `load_held`): concurrent clients drive VMs
//! through their whole lifecycle on simulated hosts (`common::sim`, `common::sim_moves`) while
//! the coordinator's latency per route, memory and descriptors are measured and the hosts are
//! watched for a VM running at two places; at the end the coordinator's state must agree with
//! the hosts' and the image server's.
#![allow(dead_code)]

use super::figures;
use super::sim::{Sim, SimSpec};
use super::simgrid::SimGrid;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The load's percentiles of one route.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// (VmRSS in KiB, open fds) of process `pid`.
pub fn rss_and_fds(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    (rss, fds)
}

/// What the clients did, counted.
#[derive(Default)]
struct Counts {
    cycles: AtomicUsize,
    vms: AtomicUsize,
    suspended: AtomicUsize,
    resumed_pinned: AtomicUsize,
    resumed_anywhere: AtomicUsize,
    migrated: AtomicUsize,
}

/// The clients' shared view: the coordinator, the hosts, latencies by route, failures.
struct Load {
    http: reqwest::Client,
    url: String,
    sims: Vec<Sim>,
    lat: Mutex<BTreeMap<&'static str, Vec<f64>>>,
    errors: Mutex<Vec<String>>,
    counts: Counts,
}

impl Load {
    fn error(&self, e: String) {
        self.errors.lock().unwrap().push(e);
    }

    /// One request, timed under its route; an error answer or none is recorded.
    async fn call(&self, route: &'static str, req: reqwest::RequestBuilder) -> Option<Value> {
        let t = Instant::now();
        let r = req.send().await;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        self.lat.lock().unwrap().entry(route).or_default().push(ms);
        match r {
            Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
            Ok(r) => {
                let s = r.status();
                let body = r.text().await.unwrap_or_default();
                self.error(format!("{route}: {s} {body}"));
                None
            }
            Err(e) => {
                self.error(format!("{route}: {e}"));
                None
            }
        }
    }

    /// Long-polls VM `id` while it is in one of `states`; its record once it left them.
    async fn wait_out_of(&self, id: &str, states: &[&str]) -> Option<Value> {
        let mut seen = "pending".to_string();
        loop {
            let q = format!("{}/api/v1/vms/{id}?wait_ms=2000&state={seen}", self.url);
            let v = self.call("GET /vms/{id} (long poll)", self.http.get(q)).await?;
            let st = v["state"].as_str().unwrap_or_default().to_string();
            if !states.contains(&st.as_str()) {
                return Some(v);
            }
            seen = st;
        }
    }

    /// Whether record `v` (running) agrees with the hosts: its host runs it, unpaused, and no
    /// other host runs it unpaused.
    fn check_placed(&self, v: &Value, after: &str) {
        let (id, host) = (v["id"].as_str().unwrap_or_default(), v["host"].as_str().unwrap_or_default());
        let runs: Vec<&str> = self
            .sims
            .iter()
            .filter(|s| {
                let st = s.state.lock().unwrap();
                st.running.contains_key(id) && !st.paused.contains(id)
            })
            .map(|s| s.name.as_str())
            .collect();
        if runs != [host] {
            self.error(format!("after {after}: VM {id} is recorded running on {host} but runs on {runs:?}"));
        }
    }

    /// A host other than `host` (`simN`), for a resume pinned elsewhere.
    fn other_host(&self, host: &str) -> String {
        let n: usize = host.trim_start_matches("sim").parse().unwrap_or(0);
        format!("sim{}", (n + 1) % self.sims.len())
    }
}

/// One client's cycle: create `per_client` VMs and wait for them, suspend them, resume them
/// (every other one pinned to another host), migrate them live, read, list, stop and remove.
async fn cycle(l: &Load, c: usize, cycle: usize, per_client: usize) {
    let url = &l.url;
    let mut ids = Vec::new();
    for k in 0..per_client {
        let body = json!({"image": "tiny", "name": format!("c{c}-{cycle}-{k}"), "cpus": 1, "memory_mib": 256});
        if let Some(v) = l.call("POST /vms", l.http.post(format!("{url}/api/v1/vms")).json(&body)).await {
            ids.push(v["id"].as_str().unwrap().to_string());
        }
    }
    l.counts.vms.fetch_add(ids.len(), Ordering::SeqCst);
    let running = |v: &Option<Value>, after: &str| match v {
        Some(v) if v["state"] == "running" => {
            l.check_placed(v, after);
            true
        }
        Some(v) => {
            l.error(format!("after {after}: VM {} is {} ({})", v["id"], v["state"], v["reason"]));
            false
        }
        None => false,
    };
    let mut live = Vec::new();
    for id in &ids {
        if running(&l.wait_out_of(id, &["pending", "starting"]).await, "create") {
            live.push(id.clone());
        }
    }
    live = suspend_and_resume(l, &live, &running).await;
    migrate_all(l, &live, &running).await;
    l.call("GET /vms", l.http.get(format!("{url}/api/v1/vms"))).await;
    l.call("GET /hosts", l.http.get(format!("{url}/api/v1/hosts"))).await;
    for id in &ids {
        l.call("GET /vms/{id}", l.http.get(format!("{url}/api/v1/vms/{id}"))).await;
        l.call("POST /vms/{id}/stop", l.http.post(format!("{url}/api/v1/vms/{id}/stop")).json(&json!({}))).await;
        l.call("DELETE /vms/{id}", l.http.delete(format!("{url}/api/v1/vms/{id}"))).await;
    }
}

/// Suspends each of `ids`, then resumes each (odd ones pinned to another host than the one
/// it was suspended on); the VMs running again.
async fn suspend_and_resume(l: &Load, ids: &[String], running: &impl Fn(&Option<Value>, &str) -> bool) -> Vec<String> {
    let url = &l.url;
    let mut suspended = Vec::new();
    for id in ids {
        let s = l.call("POST /vms/{id}/suspend", l.http.post(format!("{url}/api/v1/vms/{id}/suspend"))).await;
        match s {
            Some(s) if s["vm"]["state"] == "suspended" && s["saved"]["image"].as_str().is_some() => {
                l.counts.suspended.fetch_add(1, Ordering::SeqCst);
                suspended.push((id.clone(), s["vm"]["host"].as_str().unwrap_or_default().to_string()));
            }
            Some(s) => l.error(format!("suspend of {id} answered {s}")),
            None => {}
        }
    }
    let mut resumed = Vec::new();
    for (k, (id, host)) in suspended.iter().enumerate() {
        let pin = (k % 2 == 1).then(|| l.other_host(host));
        let body = match &pin {
            Some(h) => json!({ "host": h }),
            None => json!({}),
        };
        if l.call("POST /vms/{id}/resume", l.http.post(format!("{url}/api/v1/vms/{id}/resume")).json(&body)).await.is_some() {
            resumed.push((id.clone(), pin));
        }
    }
    let mut live = Vec::new();
    for (id, pin) in resumed {
        let v = l.wait_out_of(&id, &["pending", "starting"]).await;
        if !running(&v, "resume") {
            continue;
        }
        let at = v.as_ref().and_then(|v| v["host"].as_str()).unwrap_or_default().to_string();
        match pin {
            Some(h) if h != at => l.error(format!("VM {id} resumed on {at}, not on {h} as asked")),
            Some(_) => {
                l.counts.resumed_pinned.fetch_add(1, Ordering::SeqCst);
            }
            None => {
                l.counts.resumed_anywhere.fetch_add(1, Ordering::SeqCst);
            }
        }
        live.push(id);
    }
    live
}

/// Migrates each of `ids` live to any other host and waits for each to run there.
async fn migrate_all(l: &Load, ids: &[String], running: &impl Fn(&Option<Value>, &str) -> bool) {
    let url = &l.url;
    let mut moving = Vec::new();
    for id in ids {
        let r = l.call("POST /vms/{id}/migrate", l.http.post(format!("{url}/api/v1/vms/{id}/migrate")).json(&json!({}))).await;
        if let Some(v) = r {
            moving.push((id.clone(), v["host"].as_str().unwrap_or_default().to_string()));
        }
    }
    for (id, from) in moving {
        let v = l.wait_out_of(&id, &["migrating"]).await;
        if !running(&v, "migration") {
            continue;
        }
        let v = v.unwrap();
        let (to, status) = (v["host"].as_str().unwrap_or_default(), v["migration"]["status"].as_str().unwrap_or_default());
        if to == from || status != "completed" {
            l.error(format!("migration of {id} from {from}: runs on {to}, migration {status}: {}", v["migration"]));
        } else {
            l.counts.migrated.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Samples every 250 ms which VMs run (unpaused) on more than one host; answers them.
async fn watch_two_places(sims: Vec<Sim>, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut seen = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let mut at: HashMap<String, Vec<String>> = HashMap::new();
        for s in &sims {
            let st = s.state.lock().unwrap();
            for id in st.running.keys().filter(|id| !st.paused.contains(*id)) {
                at.entry(id.clone()).or_default().push(s.name.clone());
            }
        }
        seen.extend(at.into_iter().filter(|(_, h)| h.len() > 1).map(|(id, h)| format!("{id} on {h:?}")));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    seen
}

/// The lines of `log` that name a VM id (`vm-` and 12 hex digits) found in `errors`.
fn lines_naming(log: &str, errors: &[String]) -> String {
    let ids: HashSet<&str> = errors
        .iter()
        .flat_map(|e| e.match_indices("vm-").map(move |(i, _)| &e[i..(i + 15).min(e.len())]))
        .filter(|id| id.len() == 15 && id[3..].bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    log.lines().filter(|l| ids.iter().any(|id| l.contains(id))).collect::<Vec<_>>().join("\n")
}

/// Appends the coordinator's (seconds, RSS KiB, fds) to `into` every second until `stop`.
fn sample(pid: u32, into: Arc<Mutex<Vec<(f64, u64, usize)>>>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let t0 = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            let (rss, fds) = rss_and_fds(pid);
            into.lock().unwrap().push((t0.elapsed().as_secs_f64(), rss, fds));
            std::thread::sleep(Duration::from_secs(1));
        }
    })
}

/// Descriptors the coordinator may hold at the end over its warm count.
const FD_SLACK: usize = 64;

/// The sample after the first tenth of a run that took `took` (warm).
fn warm_sample(samples: &[(f64, u64, usize)], took: Duration) -> (f64, u64, usize) {
    samples.iter().find(|s| s.0 >= took.as_secs_f64() / 10.0).or(samples.first()).copied().unwrap_or_default()
}

/// Load held: `clients` concurrent clients each drive `per_client` VMs on `hosts` simulated
/// hosts through [`cycle`] until `duration` has passed (at least one cycle). Every request
/// must be answered with success, every step must end where it should (running after a
/// create and a resume, on the host asked for; suspended with a saved image; running on
/// another host after a migration), each record must agree with the hosts at each step and no
/// VM may run at two places at any sample; at the end nothing is left (records, claims, VMs
/// on hosts, saved images on the image server), every saved state was restored once, and the
/// coordinator's open fds are back to where they were warm. Prints p50/p99/max per route and
/// the coordinator's memory and fds.
pub fn load(scenario: &str, hosts: usize, clients: usize, per_client: usize, duration: Duration) {
    let spec = |_| SimSpec { cpus: 32, memory_mib: 65536, life: |_| None, ..SimSpec::default() };
    let g = SimGrid::start(hosts, spec);
    let l = Arc::new(Load {
        http: g.http(),
        url: g.url(),
        sims: g.sims.clone(),
        lat: Default::default(),
        errors: Default::default(),
        counts: Counts::default(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let samples: Arc<Mutex<Vec<(f64, u64, usize)>>> = Default::default();
    let sampler = sample(g.coordinator_pid(), samples.clone(), stop.clone());
    let two_places = g.rt.spawn(watch_two_places(g.sims.clone(), stop.clone()));
    let t0 = Instant::now();
    let run = l.clone();
    g.rt.block_on(async move {
        let end = Instant::now() + duration;
        let tasks = (0..clients).map(|c| {
            let l = run.clone();
            async move {
                let mut n = 0;
                loop {
                    cycle(&l, c, n, per_client).await;
                    n += 1;
                    l.counts.cycles.fetch_add(1, Ordering::SeqCst);
                    if Instant::now() > end {
                        break;
                    }
                }
            }
        });
        futures::future::join_all(tasks).await;
    });
    let took = t0.elapsed();
    // The coordinator keeps a few connections per host open while idle (its client's pool drops
    // them after 20 s): wait for them to go (at most 60 s), then take the last sample.
    let settle = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let warm = warm_sample(&samples.lock().unwrap(), took);
    while settle.elapsed() < Duration::from_secs(60) && rss_and_fds(g.coordinator_pid()).1 > warm.2 + FD_SLACK {
        std::thread::sleep(Duration::from_secs(1));
    }
    let settled = settle.elapsed();
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let samples = samples.lock().unwrap().clone();
    let two_places = g.rt.block_on(two_places).unwrap();
    let errors = std::mem::take(&mut *l.errors.lock().unwrap());
    assert!(
        errors.is_empty(),
        "{} requests or steps failed, e.g. {:#?}\ncoordinator log lines of those VMs:\n{}",
        errors.len(),
        &errors[..errors.len().min(8)],
        lines_naming(&g.logs(), &errors[..errors.len().min(8)])
    );
    assert!(two_places.is_empty(), "VMs ran at two places: {:?}", &two_places[..two_places.len().min(5)]);
    let accounted = check_end(&g);
    report(
        scenario,
        &l,
        (hosts, clients, per_client),
        took,
        &samples,
        &format!("{accounted}; fds settled {:.0}s after the load", settled.as_secs_f64()),
    );
}

/// The state at the end agrees with the hosts and the image server: no record left, every
/// host's capacity free, nothing on any simulated host, each VM launched once and restored
/// once per suspend from a state saved for it, each saved image restored once and deleted
/// with its VM. Answers a line of what was accounted.
fn check_end(g: &SimGrid) -> String {
    assert!(g.vms().is_empty(), "records left: {:?}", g.vms().iter().take(3).collect::<Vec<_>>());
    let (http, url) = (g.http(), g.url());
    let hosts_now: Value =
        g.rt.block_on(async move { http.get(format!("{url}/api/v1/hosts")).send().await.unwrap().json().await.unwrap() });
    for h in hosts_now.as_array().unwrap() {
        assert_eq!(h["ad"]["free_cpus"], h["ad"]["cpus"], "capacity not given back: {h}");
        assert_eq!(h["ad"]["free_memory_mib"], h["ad"]["memory_mib"], "memory not given back: {h}");
    }
    let (mut saves, mut restores, mut received) = (Vec::new(), Vec::new(), 0);
    for s in &g.sims {
        let st = s.state.lock().unwrap();
        assert!(st.running.is_empty() && st.incoming.is_empty() && st.saving.is_empty(), "{} still holds VMs", s.name);
        saves.extend(st.saves.iter().cloned());
        restores.extend(st.restores.iter().cloned());
        received += st.received.len();
    }
    let (launches, over) = g.launches();
    assert!(over.is_empty(), "{over:?}");
    let mut restored: HashMap<&str, usize> = HashMap::new();
    for (vm, image) in &restores {
        assert!(saves.iter().any(|(v, i, _)| v == vm && i == image), "VM {vm} restored from {image}, which no host saved for it");
        *restored.entry(image.as_str()).or_default() += 1;
    }
    for (vm, image, suspend) in &saves {
        assert_eq!(restored.get(image.as_str()).copied().unwrap_or(0), *suspend as usize, "saved image {image} of VM {vm}");
    }
    for (vm, n) in &launches {
        let r = restores.iter().filter(|(v, _)| v == vm).count();
        assert_eq!(*n, 1 + r, "VM {vm} launched {n} times for {r} restores");
    }
    // Every saved image went with its VM (or was superseded): only the base image is left.
    let base = g.sims[0].state.lock().unwrap().image_servers[0].clone();
    let http = g.sims[0].http.clone();
    let images: Value =
        g.rt.block_on(async move { http.get(format!("{base}/store/v1/images")).send().await.unwrap().json().await.unwrap() });
    let names: Vec<&str> = images.as_array().unwrap().iter().filter_map(|i| i["name"].as_str()).collect();
    assert!(names.iter().all(|n| *n == "tiny"), "images left on the image server: {names:?}");
    format!(
        "{} VMs launched, {} states saved and committed, {} restored from them (each once), {} migrations received, no saved image left",
        launches.len(),
        saves.len(),
        restores.len(),
        received
    )
}

/// Prints the scenario's figures: counts, per-route latencies, the coordinator's memory and
/// fds (warm, max, end); fails if the fds grew.
fn report(scenario: &str, l: &Load, shape: (usize, usize, usize), took: Duration, samples: &[(f64, u64, usize)], accounted: &str) {
    let (hosts, clients, per_client) = shape;
    let mut lines = Vec::new();
    let mut requests = 0;
    for (route, v) in l.lat.lock().unwrap().iter() {
        let mut v = v.clone();
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
    let warm = warm_sample(samples, took);
    let last = samples.last().copied().unwrap_or_default();
    let max_rss = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let max_fds = samples.iter().map(|s| s.2).max().unwrap_or(0);
    let c = &l.counts;
    let n = |a: &AtomicUsize| a.load(Ordering::SeqCst);
    figures(
        scenario,
        &format!(
            "{clients} clients x {per_client} VMs on {hosts} hosts for {:.0}s: {} cycles, {} VMs created, suspended {}, resumed {} (pinned to another host {}), migrated live {}, stopped and removed; {requests} requests all answered 2xx; {accounted}; no VM at two places; coordinator RSS warm {} MiB, max {} MiB, end {} MiB; fds warm {}, max {max_fds}, end {}; {}",
            took.as_secs_f64(),
            n(&c.cycles),
            n(&c.vms),
            n(&c.suspended),
            n(&c.resumed_pinned) + n(&c.resumed_anywhere),
            n(&c.resumed_pinned),
            n(&c.migrated),
            warm.1 / 1024,
            max_rss / 1024,
            last.1 / 1024,
            warm.2,
            last.2,
            lines.join("; ")
        ),
    );
    // No leak of descriptors: back to (about) where the warm coordinator was, whatever the load.
    assert!(last.2 <= warm.2 + FD_SLACK, "the coordinator's fds grew from {} to {} (max {max_fds})", warm.2, last.2);
}
