//! VM lifecycle: validation, placement on a registered host, state transitions, failure
//! reasons, and reconciliation with hosts that go silent and come back.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Mutex;
use vgrid_api::grid::HostAd;
use vgrid_api::vm::{ConsoleChunk, VmCreate, VmRecord, VmState};
use vgrid_api::{ImageRef, Manifest};
use vgrid_hostagent::agent::LaunchRequest;
use vgrid_imagestore::client::StoreClient;

use crate::hosts::{HostCallError, HostClient, HostHeartbeat, HostRecord, HostState, Registry};
use crate::state::{StateError, StateStore};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("{0}")]
    BadRequest(String),
    #[error("unknown image {0}: no image server has it (see `vgrid image ls`)")]
    UnknownImage(String),
    #[error("no VM with id or name {0:?}")]
    UnknownVm(String),
    #[error("no host named {0:?}")]
    UnknownHost(String),
    #[error("{0}")]
    Conflict(String),
    #[error("no host can take this VM now:\n{0}")]
    Capacity(String),
    #[error("image servers: {0}")]
    Store(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Host(#[from] HostCallError),
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The coordinator: VM records, the registry of hosts and image servers, placement.
pub struct Coordinator {
    state: Arc<dyn StateStore>,
    registry: Arc<Registry>,
    http: reqwest::Client,
    /// Serialises admission (capacity checks against records) and state transitions.
    lock: Mutex<()>,
}

impl Coordinator {
    /// Opens the coordinator and starts its background work (lost-host sweeps). VMs that were
    /// starting when it stopped become `failed`; running ones are watched again once their host
    /// reports in, so a restart neither loses nor duplicates a VM.
    pub async fn new(state: Arc<dyn StateStore>, registry: Arc<Registry>) -> Result<Arc<Self>, CoordinatorError> {
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build().expect("HTTP client");
        let c = Arc::new(Coordinator { state, registry, http, lock: Mutex::new(()) });
        for vm in c.state.list_vms()? {
            match vm.state {
                VmState::Pending | VmState::Starting => {
                    c.update(&vm.id, |v| {
                        v.state = VmState::Failed;
                        v.phase = "failed".into();
                        v.reason = Some("the coordinator restarted while this VM was starting".into());
                        v.stopped = Some(now());
                    });
                }
                VmState::Running | VmState::Stopping | VmState::Unknown => {
                    let me = c.clone();
                    tokio::spawn(async move { me.watch(vm.id.clone()).await });
                }
                _ => {}
            }
        }
        let weak = Arc::downgrade(&c);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(c) = weak.upgrade() else { break };
                for host in c.registry.sweep() {
                    c.host_lost(&host);
                }
            }
        });
        Ok(c)
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    fn client(&self, host: &str) -> Result<HostClient, CoordinatorError> {
        let h = self.registry.host(host).ok_or_else(|| CoordinatorError::UnknownHost(host.to_string()))?;
        Ok(HostClient::new(&h.ad.name, &h.ad.url, self.http.clone()))
    }

    /// A host heartbeat: records the ad; VMs of a returning host that it still runs are
    /// running again.
    pub fn heartbeat(&self, hb: HostHeartbeat) -> Vec<String> {
        let name = hb.ad.name.clone();
        let running: Vec<String> = hb.vms.iter().map(|v| v.id.clone()).collect();
        if self.registry.host_beat(hb) {
            tracing::info!(host = %name, "host ready");
            for vm in self.state.list_vms().unwrap_or_default() {
                if vm.host.as_deref() == Some(name.as_str()) && vm.state == VmState::Unknown && running.contains(&vm.id) {
                    self.update(&vm.id, |v| {
                        v.state = VmState::Running;
                        v.phase = "running".into();
                        v.reason = None;
                    });
                }
            }
        }
        self.registry.image_server_urls()
    }

    fn host_lost(&self, host: &str) {
        tracing::warn!(host, "host lost: it missed its heartbeats");
        for vm in self.state.list_vms().unwrap_or_default() {
            if vm.host.as_deref() == Some(host) && matches!(vm.state, VmState::Running | VmState::Stopping) {
                self.update(&vm.id, |v| {
                    v.state = VmState::Unknown;
                    v.phase = "unknown".into();
                    v.reason = Some(format!("host {host} missed its heartbeats"));
                });
            }
        }
    }

    /// Hosts with their advertisements, as the coordinator accounts for them.
    pub fn hosts(&self) -> Vec<HostRecord> {
        let vms = self.state.list_vms().unwrap_or_default();
        self.registry
            .hosts()
            .into_iter()
            .map(|mut h| {
                let (cpus, mem) = reserved(&vms, &h.ad.name);
                h.ad.free_cpus = h.ad.cpus.saturating_sub(cpus);
                h.ad.free_memory_mib = h.ad.memory_mib.saturating_sub(mem);
                h
            })
            .collect()
    }

    pub fn list(&self) -> Result<Vec<VmRecord>, CoordinatorError> {
        let mut v = self.state.list_vms()?;
        v.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        Ok(v)
    }

    /// Finds a VM by id, id prefix (unique) or name.
    pub fn get(&self, key: &str) -> Result<VmRecord, CoordinatorError> {
        if let Some(v) = self.state.get_vm(key)? {
            return Ok(v);
        }
        let all = self.state.list_vms()?;
        let by_name: Vec<_> = all.iter().filter(|v| v.name == key).collect();
        if by_name.len() == 1 {
            return Ok(by_name[0].clone());
        }
        let by_prefix: Vec<_> = all.iter().filter(|v| v.id.starts_with(key)).collect();
        match by_prefix.len() {
            1 => Ok(by_prefix[0].clone()),
            0 if by_name.is_empty() => Err(CoordinatorError::UnknownVm(key.to_string())),
            _ => Err(CoordinatorError::BadRequest(format!("{key:?} is ambiguous: it matches several VMs; use the full id"))),
        }
    }

    /// The manifest of `image` from the first registered image server that has it.
    pub async fn resolve_image(&self, image: &ImageRef) -> Result<Manifest, CoordinatorError> {
        let servers = self.registry.image_server_urls();
        if servers.is_empty() {
            return Err(CoordinatorError::Store("no image server is registered".into()));
        }
        let mut failure = None;
        for url in servers {
            let client = StoreClient::new(&url).map_err(|e| CoordinatorError::Store(e.to_string()))?;
            match client.manifest(image).await {
                Ok(m) => return Ok(m),
                Err(e) if e.is_not_found() => {}
                Err(e) => failure = Some(e.to_string()),
            }
        }
        match failure {
            Some(f) => Err(CoordinatorError::Store(format!("{image} not found on the reachable image servers; {f}"))),
            None => Err(CoordinatorError::UnknownImage(image.to_string())),
        }
    }

    /// Validates a request, places it on a host, records the VM as `pending` and starts it in
    /// the background. Nothing is recorded when validation or placement fails.
    pub async fn create(self: &Arc<Self>, req: VmCreate) -> Result<VmRecord, CoordinatorError> {
        let image: ImageRef =
            req.image.parse().map_err(|e: vgrid_api::ManifestError| CoordinatorError::BadRequest(e.to_string()))?;
        if req.cpus == 0 || req.cpus > 64 {
            return Err(CoordinatorError::BadRequest(format!("cpus {} is out of range 1-64", req.cpus)));
        }
        if req.memory_mib < 32 {
            return Err(CoordinatorError::BadRequest(format!("memory {} MiB is too small: at least 32 MiB", req.memory_mib)));
        }
        if let Some(a) = &req.accel {
            if a != "kvm" && a != "tcg" {
                return Err(CoordinatorError::BadRequest(format!("accel {a:?}: expected kvm or tcg")));
            }
        }
        if let Some(n) = &req.name {
            vgrid_api::manifest::validate_name(n).map_err(|_| {
                CoordinatorError::BadRequest(format!("invalid VM name {n:?}: use 1-64 characters of A-Z a-z 0-9 . _ -"))
            })?;
        }
        let manifest = self.resolve_image(&image).await?;

        let guard = self.lock.lock().await;
        let all = self.state.list_vms()?;
        for f in &req.forwards {
            if all.iter().any(|v| v.state.is_active() && v.forwards.iter().any(|g| g.host == f.host)) {
                return Err(CoordinatorError::Conflict(format!("host port {} is already forwarded to another VM", f.host)));
            }
        }
        let id = new_id();
        let name = match req.name.clone() {
            Some(n) => {
                if all.iter().any(|v| v.name == n) {
                    return Err(CoordinatorError::Conflict(format!("a VM named {n:?} exists already")));
                }
                n
            }
            None => format!("{}-{}", manifest.name, &id[3..9]),
        };
        let host = self.place(&req, &manifest, &all)?;
        let rec = VmRecord {
            id: id.clone(),
            name,
            image: req.image.clone(),
            image_version: Some(manifest.version),
            cpus: req.cpus,
            memory_mib: req.memory_mib,
            forwards: req.forwards.clone(),
            state: VmState::Pending,
            phase: "placed".into(),
            reason: None,
            host: Some(host.name.clone()),
            accel: req.accel.clone(),
            pid: None,
            created: now(),
            started: None,
            stopped: None,
        };
        // The record is the reservation: capacity counts it from now on.
        self.state.put_vm(&rec)?;
        drop(guard);
        tracing::info!(vm = %rec.id, image = %manifest.image_ref(), host = %host.name, "VM placed");

        let launch = LaunchRequest {
            id: id.clone(),
            image: manifest.image_ref(),
            cpus: req.cpus,
            memory_mib: req.memory_mib,
            forwards: req.forwards.iter().map(|f| (f.host, f.guest)).collect(),
            accel: req.accel.clone(),
        };
        let client = HostClient::new(&host.name, &host.url, self.http.clone());
        let me = self.clone();
        tokio::spawn(async move { me.run(client, launch).await });
        Ok(rec)
    }

    /// Chooses a host: ready, same architecture, enough unreserved cpus and memory; the one with
    /// most of the image cached, then the most free memory. Explains every refusal.
    fn place(&self, req: &VmCreate, manifest: &Manifest, vms: &[VmRecord]) -> Result<HostAd, CoordinatorError> {
        let hosts = self.registry.hosts();
        if hosts.is_empty() {
            return Err(CoordinatorError::Capacity("  no host is registered".into()));
        }
        let image = manifest.image_ref().to_string();
        let mut refusals = Vec::new();
        let mut best: Option<(f64, u64, HostAd)> = None;
        for h in hosts {
            let ad = h.ad;
            let (rc, rm) = reserved(vms, &ad.name);
            let (free_cpus, free_mem) = (ad.cpus.saturating_sub(rc), ad.memory_mib.saturating_sub(rm));
            let why = if h.state != HostState::Ready {
                Some("lost (missed heartbeats)".to_string())
            } else if ad.arch != manifest.meta.arch {
                Some(format!("arch {} but the image is {}", ad.arch, manifest.meta.arch))
            } else if req.memory_mib > ad.memory_mib {
                Some(format!("memory {} MiB exceeds what it offers ({} MiB)", req.memory_mib, ad.memory_mib))
            } else if req.memory_mib > free_mem {
                Some(format!("memory {} MiB exceeds its free memory ({} of {} MiB free)", req.memory_mib, free_mem, ad.memory_mib))
            } else if req.cpus > free_cpus {
                Some(format!("{} cpus exceed its free cpus ({} of {})", req.cpus, free_cpus, ad.cpus))
            } else if req.accel.as_deref() == Some("kvm") && ad.accel != "kvm" {
                Some("KVM asked for, the host has only TCG".to_string())
            } else {
                None
            };
            match why {
                Some(w) => refusals.push(format!("  {}: {w}", ad.name)),
                None => {
                    let cached = ad.image_cache.get(&image).copied().unwrap_or(0.0);
                    let better = match &best {
                        None => true,
                        Some((c, m, _)) => cached > *c || (cached == *c && free_mem > *m),
                    };
                    if better {
                        best = Some((cached, free_mem, ad));
                    }
                }
            }
        }
        best.map(|b| b.2).ok_or_else(|| CoordinatorError::Capacity(refusals.join("\n")))
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut VmRecord)) -> Option<VmRecord> {
        let mut rec = self.state.get_vm(id).ok()??;
        f(&mut rec);
        if let Err(e) = self.state.put_vm(&rec) {
            tracing::error!(vm = %id, "cannot record VM state: {e}");
        }
        Some(rec)
    }

    async fn run(self: Arc<Self>, client: HostClient, req: LaunchRequest) {
        let id = req.id.clone();
        self.update(&id, |v| {
            v.state = VmState::Starting;
            v.phase = "fetching image and booting".into();
        });
        match client.launch(&req).await {
            Ok(l) => {
                let rec = self.update(&id, |v| {
                    if v.state == VmState::Starting {
                        v.state = VmState::Running;
                        v.phase = "running".into();
                        v.pid = Some(l.pid);
                        v.accel = Some(l.accel.clone());
                        v.started = Some(now());
                    }
                });
                match rec {
                    Some(r) if r.state == VmState::Running => {
                        tracing::info!(vm = %id, host = %client.name, pid = l.pid, accel = %l.accel, "VM running");
                        self.watch(id).await;
                    }
                    Some(_) => {
                        // Stopped while it was starting: it must not keep running.
                        tracing::info!(vm = %id, "VM was stopped while starting; killing it");
                        let _ = client.stop(&id, true).await;
                        let _ = client.release(&id).await;
                        self.update(&id, |v| {
                            if v.state.is_active() {
                                v.state = VmState::Stopped;
                                v.phase = "stopped".into();
                                v.stopped = Some(now());
                            }
                        });
                    }
                    None => {
                        // Removed while it was starting.
                        let _ = client.stop(&id, true).await;
                        let _ = client.remove(&id).await;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(vm = %id, "VM failed to start: {e}");
                let _ = client.stop(&id, true).await;
                let _ = client.release(&id).await;
                self.update(&id, |v| {
                    v.state = VmState::Failed;
                    v.phase = "failed".into();
                    v.reason = Some(e.to_string());
                    v.stopped = Some(now());
                });
            }
        }
    }

    /// Follows a placed VM until its QEMU exits, through host outages.
    async fn watch(self: Arc<Self>, id: String) {
        loop {
            let Some(rec) = self.state.get_vm(&id).ok().flatten() else { return };
            if !rec.state.is_active() {
                return;
            }
            let host = rec.host.clone().unwrap_or_default();
            let client = match self.registry.host(&host) {
                Some(h) if h.state == HostState::Ready => HostClient::new(&h.ad.name, &h.ad.url, self.http.clone()),
                _ => {
                    // Unknown or lost host: wait for it to report in.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            match client.wait(&id).await {
                Ok(exit) if exit.exit.code.is_some() || exit.exit.signal.is_some() || rec.state == VmState::Stopping => {
                    self.exited(&client, &id, exit.exit, exit.console_tail).await;
                    return;
                }
                Ok(_) => {
                    // The host answers but does not run this VM (it restarted without it).
                    self.update(&id, |v| {
                        if v.state.is_active() {
                            v.state = VmState::Failed;
                            v.phase = "failed".into();
                            v.reason = Some(format!("host {host} no longer runs this VM"));
                            v.stopped = Some(now());
                        }
                    });
                    return;
                }
                Err(e) => {
                    tracing::debug!(vm = %id, "waiting on host {host}: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    async fn exited(&self, client: &HostClient, id: &str, exit: vgrid_hostagent::ExitInfo, console: Vec<String>) {
        let _ = client.release(id).await;
        self.update(id, |v| {
            v.stopped = Some(now());
            v.pid = None;
            if v.state == VmState::Stopping {
                v.state = VmState::Stopped;
                v.phase = "stopped".into();
            } else if exit.success() {
                // The guest powered itself off: a normal stop.
                v.state = VmState::Stopped;
                v.phase = "stopped".into();
                v.reason = Some("the guest powered off".into());
            } else {
                v.state = VmState::Failed;
                v.phase = "failed".into();
                v.reason = Some(format!("QEMU exited unexpectedly ({exit}); last console lines:\n{}", console.join("\n")));
                tracing::warn!(vm = %id, "QEMU exited unexpectedly: {exit}");
            }
        });
    }

    /// Stops a VM: ACPI power-down (then quit after a timeout), or a kill with `force`.
    pub async fn stop(&self, key: &str, force: bool) -> Result<VmRecord, CoordinatorError> {
        let rec = self.get(key)?;
        match rec.state {
            VmState::Stopped | VmState::Failed => return Ok(rec),
            VmState::Stopping if !force => return Ok(rec),
            _ => {}
        }
        let host = rec.host.clone().unwrap_or_default();
        let client = self.client(&host);
        if rec.state == VmState::Unknown && !force {
            return Err(CoordinatorError::Conflict(format!(
                "VM {} is unknown: its host {host} is not answering; use --force to forget it",
                rec.id
            )));
        }
        self.update(&rec.id, |v| {
            v.state = VmState::Stopping;
            v.phase = "stopping".into();
        });
        match client {
            Ok(c) => {
                if let Err(e) = c.stop(&rec.id, force).await {
                    if !force {
                        return Err(e.into());
                    }
                    tracing::warn!(vm = %rec.id, "forced stop: host did not answer: {e}");
                }
            }
            Err(e) if !force => return Err(e),
            Err(_) => {}
        }
        // The watcher records `stopped`; wait for it briefly so callers see the end state.
        for _ in 0..100 {
            let r = self.get(&rec.id)?;
            if !r.state.is_active() {
                return Ok(r);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(self
            .update(&rec.id, |v| {
                if v.state.is_active() && (force || v.started.is_none()) {
                    v.state = VmState::Stopped;
                    v.phase = "stopped".into();
                    v.stopped = Some(now());
                }
            })
            .unwrap_or(rec))
    }

    /// Removes a VM: stops it if asked to and deletes its runtime directory and record.
    pub async fn remove(&self, key: &str, force: bool) -> Result<VmRecord, CoordinatorError> {
        let rec = self.get(key)?;
        if rec.state.is_active() {
            if !force {
                return Err(CoordinatorError::Conflict(format!(
                    "VM {} is {}; stop it first or remove it with --force",
                    rec.id,
                    rec.state.as_str()
                )));
            }
            self.stop(&rec.id, true).await?;
        }
        if let Some(host) = &rec.host {
            match self.client(host) {
                Ok(c) => {
                    if let Err(e) = c.remove(&rec.id).await {
                        if !force {
                            return Err(e.into());
                        }
                        tracing::warn!(vm = %rec.id, "removing on host {host}: {e}");
                    }
                }
                Err(e) if !force => return Err(e),
                Err(_) => {}
            }
        }
        self.state.delete_vm(&rec.id)?;
        tracing::info!(vm = %rec.id, "VM removed");
        Ok(rec)
    }

    /// A page of a VM's console log, from its host.
    pub async fn console(&self, key: &str, offset: i64) -> Result<ConsoleChunk, CoordinatorError> {
        let rec = self.get(key)?;
        let Some(host) = &rec.host else { return Ok(ConsoleChunk { offset: 0, next: 0, data: String::new() }) };
        Ok(self.client(host)?.console(&rec.id, offset).await?)
    }

    /// The host's WebSocket URL of a running VM's console.
    pub fn console_ws_url(&self, key: &str) -> Result<(VmRecord, String), CoordinatorError> {
        let rec = self.get(key)?;
        if rec.state != VmState::Running {
            return Err(CoordinatorError::Conflict(format!("VM {} is {}, not running", rec.id, rec.state.as_str())));
        }
        let url = self.client(rec.host.as_deref().unwrap_or_default())?.console_ws_url(&rec.id);
        Ok((rec, url))
    }

    /// Stops every active VM placed on `host` (used when `vgrid up` shuts down).
    pub async fn stop_vms_on(&self, host: &str) {
        let vms: Vec<VmRecord> = self
            .state
            .list_vms()
            .unwrap_or_default()
            .into_iter()
            .filter(|v| v.state.is_active() && v.host.as_deref() == Some(host))
            .collect();
        let futs = vms.iter().map(|v| self.stop(&v.id, false));
        for (v, r) in vms.iter().zip(futures::future::join_all(futs).await) {
            if let Err(e) = r {
                tracing::warn!(vm = %v.id, "stopping at shutdown: {e}");
            }
        }
    }
}

/// Cpus and memory of the active VMs recorded on `host`.
fn reserved(vms: &[VmRecord], host: &str) -> (u32, u64) {
    vms.iter()
        .filter(|v| v.state.is_active() && v.host.as_deref() == Some(host))
        .fold((0, 0), |(c, m), v| (c + v.cpus, m + v.memory_mib))
}

fn new_id() -> String {
    let b: [u8; 6] = rand::random();
    format!("vm-{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
}
