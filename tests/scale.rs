//! The coordinator under load: 200 concurrent `vm run` requests (the REST call the CLI makes)
//! against ten simulated host agents. The coordinator and the image server are the real
//! processes; each simulated host is an HTTP server speaking the host agent's API
//! (`/host/v1`) and heartbeating like one, whose "VMs" run for a short while and power off.
//! Booting 200 real guests on this machine would take an hour; the scheduler's correctness
//! under concurrency does not depend on what runs behind the host API.
//!
//! Checked: no host is ever given more cpus or memory than it advertised (each simulated host
//! counts what it runs at every launch), every request is answered, every VM is launched exactly
//! once and ends `stopped`.

mod common;

use axum::extract::{Path, State};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vgrid_api::grid::HostAd;
use vgrid_api::host::{ExitInfo, HostHeartbeat, LaunchRequest, Launched, VmExit, VmReport};
use vgrid_api::vm::Accel;

const HOSTS: usize = 10;
const HOST_CPUS: u64 = 4;
const HOST_MEM: u64 = 4096;
const REQUESTS: usize = 200;

#[derive(Default)]
struct SimState {
    /// id -> (cpus, memory, power-off time)
    running: HashMap<String, (u64, u64, Instant)>,
    launches: Vec<String>,
    max_cpus: u64,
    max_mem: u64,
    over: Vec<String>,
}

#[derive(Clone)]
struct Sim {
    name: String,
    state: Arc<Mutex<SimState>>,
    seq: Arc<std::sync::atomic::AtomicU64>,
}

async fn launch(State(sim): State<Sim>, Json(req): Json<LaunchRequest>) -> Json<Launched> {
    let id = req.id.clone();
    let cpus = req.config.cpus as u64;
    let mem = req.config.memory_mib;
    let n = sim.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    // Lifetimes of 100-700 ms, varied so that VMs end in a mixed order.
    let life = Duration::from_millis(100 + (n * 137 % 600));
    {
        let mut s = sim.state.lock().unwrap();
        s.launches.push(id.clone());
        s.running.insert(id.clone(), (cpus, mem, Instant::now() + life));
        let (c, m) = s.running.values().fold((0, 0), |(c, m), v| (c + v.0, m + v.1));
        s.max_cpus = s.max_cpus.max(c);
        s.max_mem = s.max_mem.max(m);
        if c > HOST_CPUS || m > HOST_MEM {
            let msg = format!("{}: {c} cpus / {m} MiB in use after launching {id}", sim.name);
            s.over.push(msg);
        }
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    Json(Launched { pid: 10_000 + n as u32, accel: Accel::Tcg })
}

async fn wait(State(sim): State<Sim>, Path(id): Path<String>) -> Json<VmExit> {
    let until = sim.state.lock().unwrap().running.get(&id).map(|v| v.2);
    if let Some(t) = until {
        tokio::time::sleep_until(t.into()).await;
        // Powered off: its capacity is free before the coordinator hears of it.
        sim.state.lock().unwrap().running.remove(&id);
    }
    Json(VmExit { exit: ExitInfo { code: Some(0), signal: None }, console_tail: vec![], cause: None, present: false })
}

async fn ok() -> Json<Value> {
    Json(json!({}))
}

/// Starts a simulated host on a free port; it heartbeats to `coordinator` every 500 ms.
async fn start_sim(name: String, coordinator: String) -> Sim {
    let sim = Sim { name: name.clone(), state: Default::default(), seq: Default::default() };
    let app = Router::new()
        .route("/host/v1/vms", post(launch))
        .route("/host/v1/vms/{id}/wait", get(wait))
        .route("/host/v1/vms/{id}/stop", post(ok))
        .route("/host/v1/vms/{id}/release", post(ok))
        .route("/host/v1/vms/{id}", delete(ok))
        .with_state(sim.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    // Joins the grid like a real host: a one-time token, a certificate of the grid CA.
    let token: vgrid_trust::node::JoinToken = tokio::task::spawn_blocking({
        let c = coordinator.clone();
        move || join_token(&c, "host")
    })
    .await
    .unwrap()
    .parse()
    .unwrap();
    let node = vgrid_trust::node::join(&coordinator, &token, vgrid_trust::NodeRole::Host, &name, &["127.0.0.1".into()]).await.unwrap();
    let http = vgrid_trust::tls::client_builder_for(&node.ca_pem, Some(&node)).unwrap().build().unwrap();
    tokio::spawn(vgrid_trust::tls::serve(listener, node, app, std::future::pending()));
    let beat = sim.clone();
    tokio::spawn(async move {
        loop {
            let vms: Vec<VmReport> = {
                let s = beat.state.lock().unwrap();
                s.running.keys().map(|id| VmReport { id: id.clone(), pid: 1, incoming: false }).collect()
            };
            let site = if name.ends_with(['0', '2', '4', '6', '8']) { "uf" } else { "nw" };
            let ad = HostAd {
                name: name.clone(),
                url: url.clone(),
                arch: "x86_64".into(),
                cpus: HOST_CPUS as u32,
                memory_mib: HOST_MEM,
                free_cpus: HOST_CPUS as u32,
                free_memory_mib: HOST_MEM,
                accel: "tcg".into(),
                qemu_version: "10.0.0".into(),
                network_modes: vec!["user".into()],
                labels: [("site".to_string(), site.to_string())].into(),
                running_vms: vms.len() as u32,
                ..HostAd::default()
            };
            let hb = HostHeartbeat { ad, vms, usage: vec![], waiting: vec![] };
            let _ = http.post(format!("{coordinator}/api/v1/hosts/heartbeat")).json(&hb).send().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    sim
}

/// A client sending the bearer token with every request.
fn authed(token: &str, ca: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    vgrid_trust::tls::client_builder_for(ca, None).unwrap().default_headers(h).build().unwrap()
}

#[test]
fn two_hundred_concurrent_runs_never_overcommit_a_host() {
    let dir = tempfile::Builder::new().prefix("vgs").tempdir_in("/tmp").unwrap();
    let p = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    let coordinator = Role::start(
        &["coordinator", "--listen", "127.0.0.1:0", "--data-dir", &p("coord"), "--heartbeat-interval", "1", "--lost-after-beats", "30"],
        dir.path().join("coord.log"),
    );
    let server = Role::start(
        &["image-server", "--listen", "127.0.0.1:0", "--data-dir", &p("is"), "--coordinator", &coordinator.url, "--name", "is0"],
        dir.path().join("is.log"),
    );
    // A small image: the simulated hosts never read it, the coordinator resolves it.
    std::fs::write(p("tiny.raw"), vec![7u8; 1 << 20]).unwrap();
    let o = std::process::Command::new(vgrid_bin())
        .args(["image", "import", &p("tiny.raw"), "--name", "tiny", "--image-server", &server.url])
        .env("VGRID_URL", &coordinator.url)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // A token for the raw REST calls (the first admin is this machine's user, as for `vgrid up`).
    let o = std::process::Command::new(vgrid_bin()).args(["--json", "--url", &coordinator.url, "login"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let token = serde_json::from_slice::<Value>(&o.stdout).unwrap()["token"].as_str().unwrap().to_string();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    let coord = coordinator.url.clone();
    let token_copy = token.clone();
    let ca = std::fs::read_to_string(pinned_ca(&coordinator.url)).unwrap();
    let ca2 = ca.clone();
    let (sims, answers) = rt.block_on(async move {
        let mut sims = Vec::new();
        for i in 0..HOSTS {
            sims.push(start_sim(format!("sim{i}"), coord.clone()).await);
        }
        let http = authed(&token, &ca);
        let t0 = Instant::now();
        loop {
            let hosts: Value = http.get(format!("{coord}/api/v1/hosts")).send().await.unwrap().json().await.unwrap();
            let ready = hosts.as_array().unwrap().iter().filter(|h| h["state"] == "ready").count();
            if ready == HOSTS {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "only {ready} simulated hosts registered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // 200 requests at once: 1 or 2 cpus, 512-1536 MiB; every fifth must land on site uf.
        let reqs = (0..REQUESTS).map(|i| {
            let http = http.clone();
            let coord = coord.clone();
            async move {
                let mut body = json!({
                    "image": "tiny", "name": format!("s{i}"), "cpus": 1 + i % 2, "memory_mib": 512 + 512 * (i % 3),
                });
                if i % 5 == 0 {
                    body["require"] = json!("host.labels.site == 'uf'");
                }
                let r = http.post(format!("{coord}/api/v1/vms")).json(&body).send().await.unwrap();
                let status = r.status();
                let v: Value = r.json().await.unwrap();
                (i, status, v)
            }
        });
        let answers = futures::future::join_all(reqs).await;
        (sims, answers)
    });

    let mut ids = HashMap::new();
    for (i, status, v) in &answers {
        assert!(status.is_success(), "request {i} answered {status}: {v}");
        ids.insert(v["id"].as_str().unwrap().to_string(), *i);
    }
    assert_eq!(ids.len(), REQUESTS, "every request got its own VM");

    // Every VM runs on a simulated host and powers off; queued ones are placed as capacity frees.
    let url = coordinator.url.clone();
    let log = coordinator.log.clone();
    let token2 = token_copy;
    let vms = rt.block_on(async move {
        let http = authed(&token2, &ca2);
        let t0 = Instant::now();
        loop {
            let vms: Value = http.get(format!("{url}/api/v1/vms")).send().await.unwrap().json().await.unwrap();
            let vms = vms.as_array().unwrap().clone();
            let done = vms.iter().filter(|v| v["state"] == "stopped" || v["state"] == "failed").count();
            if done == REQUESTS {
                break vms;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "{done}/{REQUESTS} VMs ended after 300 s; coordinator log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    for v in &vms {
        assert_eq!(v["state"], "stopped", "VM {} ended {}: {}", v["name"], v["state"], v["reason"]);
        let i = ids[v["id"].as_str().unwrap()];
        if i % 5 == 0 {
            let host = v["host"].as_str().unwrap();
            let n: usize = host.trim_start_matches("sim").parse().unwrap();
            assert_eq!(n % 2, 0, "VM {} required site uf but ran on {host}", v["name"]);
        }
    }
    let mut launches: Vec<String> = Vec::new();
    for s in &sims {
        let st = s.state.lock().unwrap();
        assert!(st.over.is_empty(), "host over capacity: {:?}", st.over);
        assert!(st.max_cpus <= HOST_CPUS && st.max_mem <= HOST_MEM);
        assert!(st.max_cpus > 0, "{} was never used", s.name);
        launches.extend(st.launches.iter().cloned());
    }
    let total = launches.len();
    launches.sort();
    launches.dedup();
    assert_eq!(total, REQUESTS, "each VM is launched once (launches: {total})");
    assert_eq!(launches.len(), REQUESTS);
    drop(rt);
    drop(server);
}
