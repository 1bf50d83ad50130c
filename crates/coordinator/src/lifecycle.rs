//! VM lifecycle: validation, placement on a registered host, state transitions, failure
//! reasons, and reconciliation with hosts that go silent and come back. Which state each event
//! leads to is the table in [`table`].

pub mod table;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Mutex;
use vgrid_api::auth::Quota;
use vgrid_api::grid::{Future, FuturesQuery, HostAd, HostRecord, HostState};
use vgrid_api::host::{ExitInfo, HostHeartbeat, LaunchRequest};
use vgrid_api::vm::{ConfigError, ConsoleChunk, VmCreate, VmRecord, VmState};
use vgrid_api::{ImageRef, Manifest};
use vgrid_storeclient::StoreClient;

use crate::admission::{check_forwards_free, check_quota, explain, free_share, launch_request, placement_request, reserved};
use crate::hosts::{HostCallError, HostClient, Registry};
use crate::sched::{ExprError, PlaceError, PlaceOptions, Placement, Scheduler};
use crate::state::{LegacyStore, StateError};
use vgrid_api::grid::PlacementRequest;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("{0}")]
    BadRequest(String),
    /// A VM configuration that fails its static checks (HTTP 400).
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("unknown image {0}: no image server has it (see `vgrid image ls`)")]
    UnknownImage(String),
    #[error("no VM with id or name {0:?}")]
    UnknownVm(String),
    #[error("no host named {0:?}")]
    UnknownHost(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Capacity(String),
    #[error(transparent)]
    Expr(#[from] ExprError),
    #[error("image servers: {0}")]
    Store(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Host(#[from] HostCallError),
    /// A user's quota would be exceeded (HTTP 403).
    #[error("{0}")]
    Quota(String),
}

pub(crate) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The coordinator: VM records, the registry of hosts and image servers, placement.
pub struct Coordinator {
    pub(crate) state: Arc<dyn LegacyStore>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) sched: Scheduler,
    pub(crate) http: reqwest::Client,
    /// Serialises admission (capacity checks against records) and state transitions.
    pub(crate) lock: Mutex<()>,
    /// Held while a host's free figures are computed from the records and given to the
    /// scheduler, and while a placement's reservation is handed over to its record, so that an
    /// advertisement computed from older records never replaces a newer one (which would give
    /// the host more than it has).
    ads: std::sync::Mutex<()>,
    accounting: crate::accounting::Accounting,
    /// Bumped whenever a VM record changes: long-polling readers wait on it.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Coordinator {
    /// Opens the coordinator and starts its background work (lost-host sweeps). VMs that were
    /// starting when it stopped become `failed`; running ones are watched again once their host
    /// reports in, so a restart neither loses nor duplicates a VM.
    pub async fn new(state: Arc<dyn LegacyStore>, registry: Arc<Registry>) -> Result<Arc<Self>, CoordinatorError> {
        let http = vgrid_trust::tls::client_builder().connect_timeout(Duration::from_secs(5)).build().expect("HTTP client");
        let accounting = crate::accounting::Accounting::new(state.clone());
        let c = Arc::new(Coordinator {
            state,
            registry,
            sched: Scheduler::new(),
            http,
            lock: Mutex::new(()),
            ads: Default::default(),
            accounting,
            changed: tokio::sync::watch::channel(0).0,
        });
        for vm in c.state.list_vms()? {
            match vm.state {
                VmState::Pending if vm.host.is_none() => {
                    // Queued when the coordinator stopped: queue it again.
                    let me = c.clone();
                    tokio::spawn(async move { me.requeue(vm).await });
                }
                VmState::Pending | VmState::Starting if vm.saved_image.is_some() && vm.started.is_none() => {
                    // A resume in flight: its host goes on restoring without us.
                    let me = c.clone();
                    tokio::spawn(async move { me.recover_resuming(vm.id).await });
                }
                VmState::Pending | VmState::Starting => {
                    c.update(&vm.id, |v| {
                        v.state = VmState::Failed;
                        v.phase = "failed".into();
                        v.reason = Some("the coordinator restarted while this VM was starting".into());
                        v.stopped = Some(now());
                    });
                }
                VmState::Running | VmState::Stopping | VmState::Unknown | VmState::Suspending => {
                    if vm.state == VmState::Suspending {
                        let me = c.clone();
                        let id = vm.id.clone();
                        tokio::spawn(async move { me.recover_suspending(id).await });
                    }
                    let me = c.clone();
                    tokio::spawn(async move { me.watch(vm.id.clone()).await });
                }
                VmState::Migrating => {
                    // The migration's driver died with the coordinator: undo it, keep watching.
                    let me = c.clone();
                    tokio::spawn(async move { me.migration_interrupted(vm).await });
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
                    c.sched.set_state(&host, crate::sched::HostState::Lost);
                    c.host_lost(&host);
                }
            }
        });
        Ok(c)
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Per-VM and per-user resource use.
    pub fn accounting(&self) -> &crate::accounting::Accounting {
        &self.accounting
    }

    pub(crate) fn client(&self, host: &str) -> Result<HostClient, CoordinatorError> {
        let h = self.registry.host(host).ok_or_else(|| CoordinatorError::UnknownHost(host.to_string()))?;
        Ok(HostClient::new(&h.ad.name, &h.ad.url, self.http.clone()))
    }

    /// A host heartbeat: records the ad; VMs of a returning host that it still runs are
    /// running again.
    pub fn heartbeat(&self, hb: HostHeartbeat) -> Result<Vec<String>, CoordinatorError> {
        let name = hb.ad.name.clone();
        // An owner policy that is not valid CEL is refused before anything is recorded.
        {
            let _ads = self.ads_guard();
            self.sched.upsert(self.adjusted(hb.ad.clone()))?;
        }
        let running: Vec<String> = hb.vms.iter().filter(|v| !v.incoming).map(|v| v.id.clone()).collect();
        if let Err(e) = self.accounting.record(&name, &hb.usage, |id| self.state.get_vm(id).ok().flatten()) {
            tracing::error!(host = %name, "cannot record usage: {e}");
        }
        let report = hb.vms.clone();
        let returned = self.registry.host_beat(hb);
        let orphans = self.reconcile(&name, &report);
        self.registry.set_orphans(&name, orphans);
        if returned {
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
        Ok(self.registry.image_server_urls())
    }

    /// A host's ad with free cpus and memory net of the VMs recorded on it (the records are
    /// the reservations; the host's own figures lag by a heartbeat).
    fn adjusted(&self, mut ad: HostAd) -> HostAd {
        let vms = self.state.list_vms().unwrap_or_default();
        let (cpus, mem) = reserved(&vms, &ad.name);
        ad.free_cpus = ad.cpus.saturating_sub(cpus);
        ad.free_memory_mib = ad.memory_mib.saturating_sub(mem);
        ad.free_cpu_share = free_share(&vms, &ad);
        ad
    }

    /// Refreshes the scheduler's view of `host` after its VMs changed.
    pub(crate) fn refresh_host(&self, host: &str) {
        let _ads = self.ads_guard();
        self.refresh_host_locked(host);
    }

    fn ads_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.ads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The VM's record (already written) holds the capacity of placement `p` from now on: the
    /// host's free figures are recomputed with it before the reservation is released.
    pub(crate) fn hand_over(&self, p: &Placement) {
        let _ads = self.ads_guard();
        self.refresh_host_locked(&p.host);
        let _ = self.sched.release(p.reservation);
    }

    fn refresh_host_locked(&self, host: &str) {
        if let Some(h) = self.registry.host(host) {
            let ready = h.state == HostState::Ready;
            let _ = self.sched.upsert(self.adjusted(h.ad));
            if !ready {
                self.sched.set_state(host, crate::sched::HostState::Lost);
            }
        }
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
                h.ad.free_cpu_share = free_share(&vms, &h.ad);
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
    pub async fn create(self: &Arc<Self>, req: VmCreate, owner: &str, quota: &Quota) -> Result<VmRecord, CoordinatorError> {
        let mut config = req.validate()?;
        let manifest = self.resolve_image(config.image()).await?;
        // The record and every launch name the version resolved now.
        config.boot.image = manifest.image_ref();
        crate::mobile::check_warm(&manifest, config.cpus, config.memory_mib)?;
        let require = crate::mobile::warm_requirement(&manifest, req.require.clone());
        let preq = placement_request(owner, &manifest, &config, &require, &req.rank);
        self.sched.validate(&preq)?;
        let opts = PlaceOptions { arch: Some(manifest.meta.arch.clone()) };

        let guard = self.lock.lock().await;
        let all = self.state.list_vms()?;
        check_quota(&all, owner, quota, config.cpus, config.memory_mib)?;
        check_forwards_free(&all, &config)?;
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
        let placed = self.first_placement(&id, &preq, &opts, req.no_wait)?;
        let mut rec = VmRecord::new(&id, &name, owner, config, now());
        rec.phase = if placed.is_some() { "placed".into() } else { "queued: no host can take it now".into() };
        rec.host = placed.as_ref().map(|p| p.host.clone());
        rec.require = req.require.clone();
        rec.rank = req.rank.clone();
        // The record is the reservation from now on.
        if let Err(e) = self.state.put_vm(&rec) {
            if let Some(p) = &placed {
                let _ = self.sched.release(p.reservation);
            }
            return Err(e.into());
        }
        if let Some(p) = &placed {
            self.hand_over(p);
        }
        drop(guard);

        let launch = launch_request(&rec, None);
        let me = self.clone();
        match placed {
            Some(p) => {
                tracing::info!(vm = %rec.id, image = %manifest.image_ref(), host = %p.host, "VM placed");
                let client = HostClient::new(&p.host, &p.url, self.http.clone());
                tokio::spawn(async move { me.run(client, launch).await });
            }
            None => {
                tokio::spawn(async move { me.queued(preq, opts, launch).await });
            }
        }
        Ok(rec)
    }

    /// A new VM's placement now, or `None` when it is to wait in the queue (behind other
    /// waiting requests, or because no host can take it now and it may wait).
    fn first_placement(
        &self,
        id: &str,
        preq: &PlacementRequest,
        opts: &PlaceOptions,
        no_wait: bool,
    ) -> Result<Option<Placement>, CoordinatorError> {
        // While other requests wait for capacity, a new one joins the queue behind them instead
        // of taking capacity first (the queue places it at once if it fits after them).
        let attempt = if self.sched.waiting() > 0 && !no_wait {
            Err(PlaceError::NoMatch(crate::sched::NoMatch { refusals: Vec::new() }))
        } else {
            self.sched.place_with(preq, opts)
        };
        match attempt {
            Ok(p) => Ok(Some(p)),
            Err(PlaceError::NoMatch(nm)) if nm.may_change() && !no_wait => {
                if nm.refusals.is_empty() {
                    tracing::info!(vm = %id, "queued behind {} waiting requests", self.sched.waiting());
                } else {
                    tracing::info!(vm = %id, "no host can take it now; queued: {nm}");
                }
                Ok(None)
            }
            Err(PlaceError::NoMatch(nm)) => Err(CoordinatorError::Capacity(explain(&nm))),
            Err(PlaceError::Invalid(e)) => Err(e.into()),
            Err(e @ PlaceError::TimedOut { .. }) => Err(CoordinatorError::Capacity(e.to_string())),
        }
    }

    /// Which hosts could start a VM like `req` now, and why not the others: one answer per
    /// host, in name order. Nothing is reserved.
    pub async fn futures(&self, req: &FuturesQuery, user: &str) -> Result<Vec<Future>, CoordinatorError> {
        let image = match &req.image {
            Some(i) => {
                let r: ImageRef = i.parse().map_err(|e: vgrid_api::ManifestError| CoordinatorError::BadRequest(e.to_string()))?;
                Some(self.resolve_image(&r).await?)
            }
            None => None,
        };
        let base = PlacementRequest {
            user: user.to_string(),
            image: image.as_ref().map(|m| m.image_ref().to_string()).unwrap_or_default(),
            cpus: req.cpus,
            memory_mib: req.memory_mib,
            cpu_share: 0.0,
            require: req.require.clone().filter(|r| !r.trim().is_empty()),
            rank: None,
        };
        self.sched.validate(&base)?;
        let opts = PlaceOptions { arch: image.as_ref().map(|m| m.meta.arch.clone()) };
        let _guard = self.lock.lock().await;
        let mut out = Vec::new();
        for h in self.registry.hosts() {
            let name = h.ad.name.clone();
            // The same request pinned to this host: its answer is this host's verdict.
            let pin = format!("host.name == {:?}", name);
            let mut one = base.clone();
            one.require = Some(match &base.require {
                Some(r) => format!("({r}) && {pin}"),
                None => pin.clone(),
            });
            let verdict = match self.sched.place_with(&one, &opts) {
                Ok(p) => {
                    let _ = self.sched.release(p.reservation);
                    None
                }
                Err(PlaceError::NoMatch(nm)) => Some(
                    nm.refusals
                        .iter()
                        .find(|r| r.host == name)
                        .map(|r| format!("`{}` {}", r.clause.replace(&format!(" && {pin}"), ""), r.detail))
                        .unwrap_or_else(|| "refused".into()),
                ),
                Err(e) => Some(e.to_string()),
            };
            out.push(Future { host: name, state: h.state, could_start: verdict.is_none(), why_not: verdict });
        }
        Ok(out)
    }

    /// Queues again a VM that was queued when the coordinator stopped, once an image server
    /// that has its image has registered.
    async fn requeue(self: Arc<Self>, vm: VmRecord) {
        let image = vm.config.image().clone();
        let mut manifest = None;
        for _ in 0..120 {
            match self.resolve_image(&image).await {
                Ok(m) => {
                    manifest = Some(m);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        let Some(manifest) = manifest else {
            self.update(&vm.id, |v| {
                if v.state == VmState::Pending {
                    v.state = VmState::Failed;
                    v.phase = "failed".into();
                    v.reason = Some(format!("queued across a coordinator restart, and no image server has {image} since"));
                    v.stopped = Some(now());
                }
            });
            return;
        };
        tracing::info!(vm = %vm.id, "queued again after the coordinator restarted");
        let preq = placement_request(&vm.owner, &manifest, &vm.config, &vm.require, &vm.rank);
        let opts = PlaceOptions { arch: Some(manifest.meta.arch.clone()) };
        self.queued(preq, opts, launch_request(&vm, None)).await;
    }

    /// Waits for a host for a queued VM, then starts it there.
    async fn queued(self: Arc<Self>, preq: PlacementRequest, opts: PlaceOptions, launch: LaunchRequest) {
        let id = launch.id.clone();
        let r = self.sched.place_or_wait(&preq, &opts, Some(QUEUE_TIMEOUT)).await;
        let guard = self.lock.lock().await;
        let still_wanted = self.state.get_vm(&id).ok().flatten().map(|v| v.state == VmState::Pending).unwrap_or(false);
        match r {
            Ok(p) if still_wanted => {
                self.update(&id, |v| {
                    v.host = Some(p.host.clone());
                    v.phase = "placed".into();
                });
                self.hand_over(&p);
                drop(guard);
                tracing::info!(vm = %id, host = %p.host, "queued VM placed");
                let client = HostClient::new(&p.host, &p.url, self.http.clone());
                self.run(client, launch).await;
            }
            Ok(p) => {
                let _ = self.sched.release(p.reservation);
            }
            Err(e) => {
                self.update(&id, |v| {
                    if v.state == VmState::Pending {
                        v.state = VmState::Failed;
                        v.phase = "failed".into();
                        v.reason = Some(e.to_string());
                        v.stopped = Some(now());
                    }
                });
            }
        }
    }

    /// Waits up to `wait` for a VM record to change (any record: the caller re-reads its own).
    pub async fn wait_change(&self, wait: Duration, still: impl Fn() -> bool) {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        while still() {
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return;
            }
        }
    }

    pub(crate) fn update(&self, id: &str, f: impl FnOnce(&mut VmRecord)) -> Option<VmRecord> {
        let mut rec = self.state.get_vm(id).ok()??;
        let was_active = rec.state.is_active();
        let was = rec.state;
        f(&mut rec);
        if rec.state != was {
            rec.state_since = Some(now());
        }
        if let Err(e) = self.state.put_vm(&rec) {
            tracing::error!(vm = %id, "cannot record VM state: {e}");
        }
        self.changed.send_modify(|n| *n += 1);
        if was_active && !rec.state.is_active() {
            if let Some(h) = &rec.host {
                // Its capacity is free again: queued requests may fit now.
                self.refresh_host(h);
            }
        }
        Some(rec)
    }

    pub(crate) async fn run(self: Arc<Self>, client: HostClient, req: LaunchRequest) {
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
                        v.accel = Some(l.accel);
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
                if crate::mobile::resume_failed(&self, &req, &client.name, &e.to_string()) {
                    return;
                }
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
    pub(crate) async fn watch(self: Arc<Self>, id: String) {
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
            let waited = client.wait(&id).await;
            if waited.is_ok() && self.moved_or_migrating(&id, &host).await {
                continue;
            }
            // The state now, not before the long poll: a stop may have begun meanwhile.
            let stopping = self.state.get_vm(&id).ok().flatten().map(|v| v.state == VmState::Stopping).unwrap_or(false);
            match waited {
                Ok(exit) if exit.exit.code.is_some() || exit.exit.signal.is_some() || stopping || exit.present => {
                    let mut tail = exit.console_tail;
                    if let Some(c) = exit.cause {
                        tail.insert(0, format!("(host: {c})"));
                    }
                    self.exited(&client, &id, exit.exit, tail).await;
                    return;
                }
                Ok(_) => {
                    // The host answers but does not run this VM (it restarted without it).
                    let _ = client.release(&id).await;
                    self.update(&id, |v| {
                        if v.state.is_active() {
                            v.state = VmState::Lost;
                            v.phase = "lost".into();
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

    async fn exited(&self, client: &HostClient, id: &str, exit: ExitInfo, console: Vec<String>) {
        let _ = client.release(id).await;
        self.update(id, |v| {
            v.pid = None;
            if matches!(v.state, VmState::Suspending | VmState::Suspended) {
                // Its QEMU ended because it was saved (see mobile.rs).
                return;
            }
            v.stopped = Some(now());
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
        if rec.state == VmState::Migrating && !force {
            let to = rec.migration.as_ref().map(|m| m.to.clone()).unwrap_or_default();
            return Err(CoordinatorError::Conflict(format!(
                "VM {} is migrating to {to}; wait for the migration to end, or stop it with --force",
                rec.id
            )));
        }
        match rec.state {
            VmState::Stopped | VmState::Failed | VmState::Lost => return Ok(rec),
            VmState::Stopping if !force => return Ok(rec),
            VmState::Suspended | VmState::Suspending => {
                return Err(CoordinatorError::Conflict(format!(
                    "VM {} is {}: resume it (`vgrid vm resume`) or remove it (`vgrid vm rm`)",
                    rec.id,
                    rec.state.as_str()
                )))
            }
            _ => {}
        }
        if rec.host.is_none() {
            // Queued, never placed: nothing runs anywhere.
            return Ok(self
                .update(&rec.id, |v| {
                    v.state = VmState::Stopped;
                    v.phase = "stopped".into();
                    v.reason = Some("stopped while queued".into());
                    v.stopped = Some(now());
                })
                .unwrap_or(rec));
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
        // A suspended VM's old host only keeps its console log: failing to reach it is no reason
        // to keep the VM.
        let force = force || rec.state == VmState::Suspended;
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
        self.changed.send_modify(|n| *n += 1);
        if let Some(h) = &rec.host {
            self.refresh_host(h);
        }
        if let Some(img) = &rec.saved_image {
            self.delete_saved_image(img).await;
        }
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

/// How long a queued VM waits for a host before it fails.
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(3600);

fn new_id() -> String {
    let b: [u8; 6] = rand::random();
    format!("vm-{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
}
