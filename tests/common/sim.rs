//! Simulated host agents: HTTP servers speaking the host agent's API (`/host/v1`: launch, wait,
//! stop, release, remove, presence, and in `sim_moves` suspend, snapshot, restore and both ends
//! of a live migration) that join the grid like a real host (a one-time token, a certificate of
//! the grid CA) and heartbeat every 500 ms with the VMs they "run". A simulated VM runs for its
//! configured lifetime (then powers off) or until it is stopped. Each host counts what it runs
//! at every launch, so a test can check that it was never given more than it advertised, and
//! that no VM was launched twice.
//!
//! Used where booting hundreds of real guests on this machine would take hours while what is
//! checked (the coordinator's scheduling, records and recovery) does not depend on what runs
//! behind the host API (`tests/scale.rs`, `tests/faults.rs`).
#![allow(dead_code)]

use axum::extract::{Path, Query, State};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vgrid_api::grid::HostAd;
use vgrid_api::host::{ExitInfo, HeartbeatReply, HostHeartbeat, LaunchRequest, Launched, VmExit, VmPresence, VmReport};
use vgrid_api::vm::{Accel, ConsoleChunk};

/// What a simulated host offers and how its VMs behave.
#[derive(Clone)]
pub struct SimSpec {
    pub cpus: u64,
    pub memory_mib: u64,
    /// The lifetime of the n-th VM launched on this host (`None`: runs until stopped).
    pub life: fn(u64) -> Option<Duration>,
    /// How long a launch takes before the host answers (the VM is admitted at once and runs
    /// at the end, even if the caller went away meanwhile, as a real agent's launch does).
    pub launch_time: Duration,
    /// Labels of the host's advertisement.
    pub labels: Vec<(String, String)>,
    /// How long a suspend or snapshot keeps the guest paused before its state is uploaded.
    pub save_time: Duration,
    /// How long a live migration copies before it completes (half mirroring the disk, half
    /// copying memory).
    pub migrate_time: Duration,
    /// How long after a VM's QEMU ended the host's long poll answers that it did (a host slow
    /// to notice an exit: its answer comes after what the coordinator did meanwhile).
    pub exit_seen_after: Duration,
}

/// What a simulated VM prints on its console, [`CONSOLE_AFTER`] after its launch.
pub const CONSOLE_TEXT: &str = "sim: booted\n";
/// When a simulated VM's console shows [`CONSOLE_TEXT`].
pub const CONSOLE_AFTER: Duration = Duration::from_secs(2);

impl Default for SimSpec {
    fn default() -> Self {
        SimSpec {
            cpus: 4,
            memory_mib: 4096,
            life: |n| Some(Duration::from_millis(100 + (n * 137 % 600))),
            launch_time: Duration::from_millis(20),
            labels: vec![],
            save_time: Duration::from_millis(50),
            migrate_time: Duration::from_millis(300),
            exit_seen_after: Duration::ZERO,
        }
    }
}

#[derive(Default)]
pub struct SimState {
    /// id -> (cpus, memory, power-off time if any)
    pub running: HashMap<String, (u64, u64, Option<Instant>)>,
    /// Admitted, not running yet.
    pub launching: HashSet<String>,
    /// Ran and ended (powered off or stopped), kept until released or removed, as an agent
    /// keeps a VM whose QEMU exited.
    pub exited: HashSet<String>,
    /// Every launch, in order (a VM launched twice shows twice).
    pub launches: Vec<String>,
    /// When each VM was launched (last launch).
    pub launched_at: HashMap<String, Instant>,
    pub max_cpus: u64,
    pub max_mem: u64,
    /// One line per launch that took the host over what it advertised.
    pub over: Vec<String>,
    /// The image each VM here runs (`NAME@VERSION`; its saved image once restored).
    pub image_of: HashMap<String, String>,
    /// Sources of completed migrations: paused, with everything sent, until removed here or
    /// resumed by a cancel (they stay in `running`, as a real agent keeps their QEMU).
    pub paused: HashSet<String>,
    /// VMs being saved (snapshot or suspend).
    pub saving: HashSet<String>,
    /// VMs whose QEMU was killed once saved (a suspend): their end is a SIGKILL.
    pub killed: HashSet<String>,
    /// Prepared destinations of migrations (admitted: they count in what the host uses).
    pub incoming: HashMap<String, super::sim_moves::Incoming>,
    /// Migrations this host sent or sends, by VM.
    pub outgoing: HashMap<String, super::sim_moves::Outgoing>,
    /// Every save committed here: (VM, saved image `NAME@VERSION`, suspend).
    pub saves: Vec<(String, String, bool)>,
    /// Every launch that restored a saved image: (VM, image), after its state was read back.
    pub restores: Vec<(String, String)>,
    /// Every migration received and taken over here (VM ids), after both streams arrived.
    pub received: Vec<String>,
    /// The image servers the coordinator named in its last heartbeat answer.
    pub image_servers: Vec<String>,
}

impl SimState {
    /// (cpus, memory) promised: running (and paused) VMs and prepared destinations.
    pub fn in_use(&self) -> (u64, u64) {
        let (c, m) = self.running.values().fold((0, 0), |(c, m), v| (c + v.0, m + v.1));
        self.incoming.values().fold((c, m), |(c, m), i| (c + i.cpus, m + i.memory_mib))
    }

    /// Notes the figures after an admission, and a line if it took the host over `spec`.
    pub fn note_admission(&mut self, host: &str, spec: &SimSpec, id: &str) {
        let (c, m) = self.in_use();
        self.max_cpus = self.max_cpus.max(c);
        self.max_mem = self.max_mem.max(m);
        if c > spec.cpus || m > spec.memory_mib {
            self.over.push(format!("{host}: {c} cpus / {m} MiB in use after admitting {id}"));
        }
    }

    /// Forgets VM `id` entirely (release, remove: its QEMU ends, its migrations go).
    fn forget(&mut self, id: &str) {
        self.running.remove(id);
        self.exited.remove(id);
        self.paused.remove(id);
        self.incoming.remove(id);
        self.outgoing.remove(id);
        self.image_of.remove(id);
        self.killed.remove(id);
    }
}

#[derive(Clone)]
pub struct Sim {
    pub name: String,
    pub spec: SimSpec,
    pub state: Arc<Mutex<SimState>>,
    pub(crate) seq: Arc<AtomicU64>,
    /// This host's client (its grid certificate), for the image servers.
    pub(crate) http: reqwest::Client,
    /// While false the host neither heartbeats nor answers (a partition).
    pub reachable: Arc<AtomicBool>,
    /// While true every request is answered 503 (an agent that cannot serve), heartbeats go on.
    pub failing: Arc<AtomicBool>,
}

impl Sim {
    /// (cpus, memory) in use.
    pub fn used(&self) -> (u64, u64) {
        self.state.lock().unwrap().in_use()
    }
}

async fn launch(State(sim): State<Sim>, Json(req): Json<LaunchRequest>) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Some(image) = &req.restore {
        // A resume: the saved state is read back from an image server first (a real host
        // restores QEMU from it), and must be the one saved for this VM.
        if let Err((status, e)) = super::sim_moves::read_saved_state(&sim, &req.id, image).await {
            return (status, Json(json!({ "error": e }))).into_response();
        }
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    sim.state.lock().unwrap().launching.insert(req.id.clone());
    // The launch goes on when the caller goes away (a coordinator killed meanwhile).
    tokio::spawn(async move {
        tokio::time::sleep(sim.spec.launch_time).await;
        let id = req.id.clone();
        let n = sim.seq.fetch_add(1, Ordering::SeqCst);
        let until = (sim.spec.life)(n).map(|d| Instant::now() + d);
        let mut s = sim.state.lock().unwrap();
        s.launching.remove(&id);
        s.launches.push(id.clone());
        s.launched_at.insert(id.clone(), Instant::now());
        s.running.insert(id.clone(), (req.config.cpus as u64, req.config.memory_mib, until));
        s.exited.remove(&id);
        s.image_of.insert(id.clone(), req.image().to_string());
        if let Some(image) = &req.restore {
            s.restores.push((id.clone(), image.to_string()));
        }
        s.note_admission(&sim.name, &sim.spec, &id);
        let _ = tx.send(Launched { pid: 10_000 + n as u32, accel: Accel::Tcg });
    });
    Json(rx.await.expect("simulated launch")).into_response()
}

/// Long poll until the VM ends (its lifetime passed, or it was stopped, suspended or removed);
/// an unknown VM has ended already (it powered off).
async fn wait(State(sim): State<Sim>, Path(id): Path<String>) -> Json<VmExit> {
    let present = {
        let s = sim.state.lock().unwrap();
        s.running.contains_key(&id) || s.exited.contains(&id)
    };
    loop {
        let until = sim.state.lock().unwrap().running.get(&id).map(|v| v.2);
        match until {
            None => break,
            Some(Some(t)) if Instant::now() >= t => {
                // Powered off: its capacity is free before the coordinator hears of it.
                let mut s = sim.state.lock().unwrap();
                s.running.remove(&id);
                s.exited.insert(id.clone());
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    if present {
        tokio::time::sleep(sim.spec.exit_seen_after).await;
    }
    let exit = if sim.state.lock().unwrap().killed.remove(&id) {
        ExitInfo { code: None, signal: Some(9) }
    } else {
        ExitInfo { code: Some(0), signal: None }
    };
    Json(VmExit { exit, console_tail: vec![], cause: None, present })
}

async fn stop(State(sim): State<Sim>, Path(id): Path<String>) -> Json<Value> {
    let mut s = sim.state.lock().unwrap();
    if s.running.remove(&id).is_some() {
        s.paused.remove(&id);
        s.exited.insert(id);
    }
    Json(json!({}))
}

/// Release and remove: the host forgets the VM (a paused migration source ends here).
async fn forget(State(sim): State<Sim>, Path(id): Path<String>) -> Json<Value> {
    sim.state.lock().unwrap().forget(&id);
    Json(json!({}))
}

async fn presence(State(sim): State<Sim>, Path(id): Path<String>) -> Json<VmPresence> {
    let s = sim.state.lock().unwrap();
    let running = s.running.contains_key(&id);
    let exited = s.exited.contains(&id);
    let known = running || exited || s.launching.contains(&id) || s.incoming.contains_key(&id);
    Json(VmPresence { saving: s.saving.contains(&id), running, known, exited })
}

/// The console log: [`CONSOLE_TEXT`] once [`CONSOLE_AFTER`] has passed since the launch.
async fn console(State(sim): State<Sim>, Path(id): Path<String>, Query(q): Query<HashMap<String, String>>) -> Json<ConsoleChunk> {
    let at = sim.state.lock().unwrap().launched_at.get(&id).copied();
    let log = if at.is_some_and(|t| t.elapsed() >= CONSOLE_AFTER) { CONSOLE_TEXT } else { "" };
    let offset: usize = q.get("offset").and_then(|o| o.parse().ok()).unwrap_or(0);
    let from = offset.min(log.len());
    Json(ConsoleChunk { offset: from as u64, next: log.len() as u64, data: log[from..].to_string() })
}

/// Starts a simulated host named `name` on a free port, joined to `coordinator`: several
/// coordinators of one grid comma-separated (joined through the first, heartbeats to each, as
/// a host agent does).
pub async fn start_sim(name: String, coordinators: String, spec: SimSpec) -> Sim {
    let coordinator = coordinators.split(',').next().unwrap_or_default().to_string();
    let token: vgrid_trust::node::JoinToken = tokio::task::spawn_blocking({
        let c = coordinator.clone();
        move || super::join_token(&c, "host")
    })
    .await
    .unwrap()
    .parse()
    .unwrap();
    let node = vgrid_trust::node::join(&coordinator, &token, vgrid_trust::NodeRole::Host, &name, &["127.0.0.1".into()]).await.unwrap();
    let http = vgrid_trust::tls::client_builder_for(&node.ca_pem, Some(&node)).unwrap().timeout(Duration::from_secs(10)).build().unwrap();
    let sim = Sim {
        name: name.clone(),
        spec,
        state: Default::default(),
        seq: Default::default(),
        http: http.clone(),
        reachable: Arc::new(AtomicBool::new(true)),
        failing: Arc::new(AtomicBool::new(false)),
    };
    let (gate, failing) = (sim.reachable.clone(), sim.failing.clone());
    let app = Router::new()
        .route("/host/v1/vms", post(launch))
        .route("/host/v1/vms/{id}/wait", get(wait))
        .route("/host/v1/vms/{id}/stop", post(stop))
        .route("/host/v1/vms/{id}/release", post(forget))
        .route("/host/v1/vms/{id}/saving", get(presence))
        .route("/host/v1/vms/{id}/console", get(console))
        .route("/host/v1/vms/{id}", delete(forget))
        .merge(super::sim_moves::routes())
        .layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
            let (up, failing) = (gate.load(Ordering::SeqCst), failing.load(Ordering::SeqCst));
            async move {
                use axum::response::IntoResponse;
                if !up {
                    // Partitioned: the request never gets an answer.
                    std::future::pending::<axum::response::Response>().await
                } else if failing {
                    let body = Json(json!({"error": "simulated host agent out of service"}));
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, body).into_response()
                } else {
                    next.run(req).await
                }
            }
        }))
        .with_state(sim.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(vgrid_trust::tls::serve(listener, node, app, std::future::pending()));
    for c in coordinators.split(',') {
        tokio::spawn(heartbeats(sim.clone(), c.to_string(), url.clone(), http.clone()));
    }
    sim
}

/// Every 500 ms while reachable: the host's advertisement and the VMs it runs (prepared
/// destinations as `incoming`); keeps the image servers the answer names.
async fn heartbeats(beat: Sim, coordinator: String, url: String, http: reqwest::Client) {
    loop {
        if beat.reachable.load(Ordering::SeqCst) {
            let (vms, used) = {
                let s = beat.state.lock().unwrap();
                let mut vms: Vec<VmReport> = s.running.keys().map(|id| VmReport { id: id.clone(), pid: 1, incoming: false }).collect();
                vms.extend(s.incoming.keys().map(|id| VmReport { id: id.clone(), pid: 1, incoming: true }));
                (vms, s.in_use())
            };
            let ad = HostAd {
                name: beat.name.clone(),
                url: url.clone(),
                arch: "x86_64".into(),
                cpus: beat.spec.cpus as u32,
                memory_mib: beat.spec.memory_mib,
                free_cpus: beat.spec.cpus.saturating_sub(used.0) as u32,
                free_memory_mib: beat.spec.memory_mib.saturating_sub(used.1),
                accel: "tcg".into(),
                qemu_version: super::sim_moves::QEMU_VERSION.into(),
                network_modes: vec!["user".into()],
                labels: beat.spec.labels.iter().cloned().collect(),
                running_vms: vms.len() as u32,
                ..HostAd::default()
            };
            let hb = HostHeartbeat { ad, vms, usage: vec![], waiting: vec![] };
            if let Ok(r) = http.post(format!("{coordinator}/api/v1/hosts/heartbeat")).json(&hb).send().await {
                if let Ok(reply) = r.json::<HeartbeatReply>().await {
                    beat.state.lock().unwrap().image_servers = reply.image_servers;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A client sending the bearer token with every request, trusting the grid CA `ca` (PEM).
pub fn authed(token: &str, ca: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    vgrid_trust::tls::client_builder_for(ca, None).unwrap().default_headers(h).timeout(Duration::from_secs(60)).build().unwrap()
}

/// A local user's login token for the coordinator at `url` (the first admin is this machine's
/// user, as for `vgrid up`).
pub fn login_token(url: &str) -> String {
    super::json_at(url, &["login"])["token"].as_str().unwrap().to_string()
}

/// Waits until `n` hosts are `ready` at the coordinator.
pub async fn wait_ready(http: &reqwest::Client, coord: &str, n: usize, timeout: Duration) {
    let t0 = Instant::now();
    loop {
        let ready = match http.get(format!("{coord}/api/v1/hosts")).send().await {
            Ok(r) => r.json::<Value>().await.ok().and_then(|h| h.as_array().map(|a| a.iter().filter(|h| h["state"] == "ready").count())),
            Err(_) => None,
        }
        .unwrap_or(0);
        if ready >= n {
            return;
        }
        assert!(t0.elapsed() < timeout, "only {ready} of {n} simulated hosts ready after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The answer to one `POST /api/v1/vms`, sent again as a client would: after a connection
/// error (the coordinator is down: to the next of `urls`, the same one when there is only
/// one) and after a 503 (retryable by contract). A 409 naming the VM as existing after a
/// resend means the first attempt was recorded: the VM is looked up.
#[derive(Debug, Default)]
pub struct Answer {
    pub id: Option<String>,
    /// Non-retryable error answers (status, body).
    pub error: Option<(u16, String)>,
    pub connection_errors: usize,
    pub retryable: usize,
    pub found_after_resend: bool,
}

/// `POST /api/v1/vms` with `body` to `urls[first]`, retried as [`Answer`] says until `deadline`.
pub async fn create_with_retry(http: &reqwest::Client, urls: &[String], first: usize, body: &Value, deadline: Instant) -> Answer {
    let mut a = Answer::default();
    let name = body["name"].as_str().unwrap_or_default().to_string();
    let mut at = first;
    loop {
        assert!(Instant::now() < deadline, "request for {name} still unanswered: {a:?}");
        let url = &urls[at];
        match http.post(format!("{url}/api/v1/vms")).json(body).send().await {
            Err(_) => {
                a.connection_errors += 1;
                at = (at + 1) % urls.len();
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
