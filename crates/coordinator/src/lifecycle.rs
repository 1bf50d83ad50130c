//! The core of the coordinator: VM records and their one write path ([`records`]: every state
//! change is an [`table::Event`] through the lifecycle [`table`], written with compare-and-swap),
//! the claims a record holds in the store ([`claims`]), admission and placement ([`admit`]),
//! launching and watching a VM ([`run`]), and the hosts' free figures as the scheduler sees
//! them. Features (suspend/resume, migration, reconciliation and the recovery after a restart,
//! accounting) are built on this core and never the reverse: the top (`http`, the role
//! launchers) calls them.

pub(crate) mod admission;
pub mod admit;
pub mod claims;
pub mod guard;
pub mod records;
pub mod run;
pub mod table;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vgrid_api::grid::{HostAd, HostRecord, HostState, ImageServerAd};
use vgrid_api::vm::{ConfigError, VmRecord, VmState};
use vgrid_api::{ImageRef, Manifest};
use vgrid_storeclient::StoreClient;

use self::table::{Event, TransitionError};
use crate::hosts::{HostCallError, HostClient, Registry};
use crate::sched::{ExprError, Placement, Scheduler};
use crate::state::{State, StateError, VmStore};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("{0}")]
    BadRequest(String),
    /// An image name or reference that is not valid (HTTP 400).
    #[error("{0}")]
    Image(#[source] vgrid_api::ManifestError),
    /// A VM configuration that fails its static checks (HTTP 400).
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("unknown image {0}: no image server has it (see `vgrid image ls`)")]
    UnknownImage(String),
    #[error("no VM with id or name {0:?}")]
    UnknownVm(String),
    #[error("no host named {0:?}")]
    UnknownHost(String),
    #[error("no network named {0:?} (see `vgrid net ls`)")]
    UnknownNetwork(String),
    /// A network definition or interface that fails its static checks (HTTP 400).
    #[error(transparent)]
    Net(#[from] vgrid_api::net::NetError),
    /// An address or MAC another admission took first (retried with another; HTTP 409).
    #[error("{0}")]
    NetworkIdentityTaken(String),
    /// What the caller may not do (HTTP 403).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Capacity(String),
    /// No host could take the request in the time it waited (HTTP 409).
    #[error("{0}")]
    Waited(#[source] crate::sched::PlaceError),
    #[error(transparent)]
    Expr(#[from] ExprError),
    /// An operation whose outcome is not known yet and is being settled in the background
    /// (HTTP 504: follow the VM's record).
    #[error("{0}")]
    Settling(String),
    /// No image server is registered (yet): retryable (HTTP 503 with Retry-After).
    #[error("image servers: no image server is registered yet; try again shortly")]
    NoImageServer,
    /// An image server that failed to answer (HTTP 502).
    #[error("image servers: {0}")]
    ImageServer(#[source] vgrid_storeclient::ClientError),
    /// The image is on no image server that answered, and one failed (HTTP 502).
    #[error("image servers: {image} not found on the reachable image servers; {source}")]
    NotOnReachable {
        image: String,
        #[source]
        source: vgrid_storeclient::ClientError,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Host(#[from] HostCallError),
    /// A user's quota would be exceeded (HTTP 403).
    #[error("{0}")]
    Quota(String),
    /// An event the lifecycle table refuses in the VM's state (HTTP 409).
    #[error("VM {id}: {source}")]
    Transition {
        id: String,
        #[source]
        source: TransitionError,
    },
    /// Too many concurrent writers of one VM's record: the write lost every compare-and-swap.
    #[error("VM {0} changes too often to be written now; try again")]
    Contended(String),
}

pub(crate) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The coordinator: VM records, the registry of hosts and image servers, placement.
pub struct Coordinator {
    pub(crate) state: State,
    pub(crate) vms: VmStore,
    pub(crate) registry: Arc<Registry>,
    pub(crate) sched: Scheduler,
    pub(crate) http: reqwest::Client,
    /// Held while a host's free figures are computed from the store's claims and given to the
    /// scheduler, and while a placement's reservation is handed over to its record, so that an
    /// advertisement computed from older claims never replaces a newer one (which would give
    /// the host more than it has). Local to this process: it orders this scheduler's view,
    /// admission itself is decided by the store.
    ads: tokio::sync::Mutex<()>,
    accounting: crate::accounting::Accounting,
    /// The tunnel networks' switches (frames of `--net tunnel:NAME`).
    pub(crate) relay: crate::relay::Relay,
    /// Whether this coordinator leads the grid (several coordinators on one etcd: the
    /// election's view, [`Coordinator::lead_with`]); unset: it is alone and always leads.
    leader: std::sync::OnceLock<tokio::sync::watch::Receiver<bool>>,
    /// The VMs (and drains) this process works on now (launching, queued, watched, migrated,
    /// suspended), with how many tasks hold each: a coordinator that becomes leader recovers
    /// the others' half-done work, never its own.
    in_hand: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    /// Held by a take-over while it runs: one at a time (leadership won and a coordinator gone
    /// at once), the second seeing what the first holds.
    taking_over: tokio::sync::Mutex<()>,
}

/// A VM (or drain) held in hand by one task of this coordinator until dropped.
pub(crate) struct InHand {
    held: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    key: String,
}

impl Drop for InHand {
    fn drop(&mut self) {
        let mut m = self.held.lock().unwrap();
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

impl Coordinator {
    /// Opens the coordinator on `state` and starts its background work (lost-host sweeps, the
    /// store's host claims followed). The caller then starts the recovery of what a previous
    /// run left half-done, [`Coordinator::recover_interrupted`] (the `reconcile` feature).
    pub async fn new(state: State, registry: Arc<Registry>) -> Result<Arc<Self>, CoordinatorError> {
        // Idle connections to hosts are bounded (a few per host, dropped after 20 s): a burst of
        // requests to a thousand hosts must not leave thousands of descriptors open for minutes.
        let http = vgrid_trust::tls::client_builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(4)
            .pool_idle_timeout(Duration::from_secs(20))
            .build()
            .expect("HTTP client");
        let accounting = crate::accounting::Accounting::new(state.usage());
        let c = Arc::new(Coordinator {
            vms: state.vms(),
            state,
            registry,
            sched: Scheduler::new(),
            http,
            ads: Default::default(),
            accounting,
            relay: Default::default(),
            leader: Default::default(),
            in_hand: Default::default(),
            taking_over: Default::default(),
        });
        c.build_claims().await?;
        c.load_image_servers().await?;
        let weak = Arc::downgrade(&c);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(c) = weak.upgrade() else { break };
                c.relay.log_drops();
                // Every coordinator stops placing on a silent host; the leader alone changes
                // the records of its VMs (the next leader does it for hosts lost meanwhile).
                let leads = c.is_leader();
                for host in c.registry.sweep() {
                    c.sched.set_state(&host, crate::sched::HostState::Lost);
                    if leads {
                        c.host_lost(&host).await;
                    }
                }
                for server in c.registry.sweep_servers() {
                    tracing::warn!(server, "image server forgotten: it missed its heartbeats");
                    if !leads {
                        continue;
                    }
                    if let Err(e) = c.state.store().delete(&crate::state::records::record_key(IMAGE_SERVERS, &server)).await {
                        tracing::warn!(server, "cannot forget the image server's registration: {e}");
                    }
                }
            }
        });
        let weak = Arc::downgrade(&c);
        tokio::spawn(async move { Coordinator::follow_claims(weak).await });
        let weak = Arc::downgrade(&c);
        tokio::spawn(async move { Coordinator::follow_drains(weak).await });
        Ok(c)
    }

    /// Whether this coordinator leads the grid: it alone runs the work done once per grid
    /// (hosts marked lost and their VMs settled, forgotten image servers unregistered, the
    /// records changed from hosts' reports, the recovery of a dead coordinator's work).
    /// Every coordinator serves the API, admits (the store decides) and takes heartbeats.
    pub fn is_leader(&self) -> bool {
        self.leader.get().is_none_or(|rx| *rx.borrow())
    }

    /// Follows the leadership `rx` (from [`crate::leader::Leadership::subscribe`]) instead of
    /// leading alone. Each time this coordinator becomes leader it takes over the grid's
    /// half-done work that no task of its own holds ([`Coordinator::take_over`]): VMs a dead
    /// coordinator was launching, queueing, watching, suspending or migrating, its drains, and
    /// the VMs of hosts that went silent while it did not lead. Called once, before the
    /// coordinator serves (no startup recovery then: leading starts it).
    pub fn lead_with(self: &Arc<Self>, mut rx: tokio::sync::watch::Receiver<bool>) {
        if self.leader.set(rx.clone()).is_err() {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let leads = *rx.borrow_and_update();
                if leads {
                    let Some(c) = weak.upgrade() else { return };
                    c.take_over().await;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// What a coordinator that has just become leader does: the recovery of half-done work
    /// (as after a restart, [`Coordinator::recover_interrupted`], skipping what this process
    /// holds), and the records of VMs on hosts this coordinator already holds lost.
    pub async fn take_over(self: &Arc<Self>) {
        let _one = self.taking_over.lock().await;
        tracing::info!("leading the grid: taking over the half-done work of the coordinators before");
        let lost: Vec<String> = self.registry.hosts().into_iter().filter(|h| h.state == HostState::Lost).map(|h| h.ad.name).collect();
        for host in lost {
            self.host_lost(&host).await;
        }
        if let Err(e) = self.recover_interrupted().await {
            tracing::error!("taking over as leader: cannot read the records to recover: {e}");
        }
    }

    /// Holds `key` (a VM id, `drain:HOST`) in hand while the result lives.
    pub(crate) fn hold(&self, key: &str) -> InHand {
        *self.in_hand.lock().unwrap().entry(key.to_string()).or_default() += 1;
        InHand { held: self.in_hand.clone(), key: key.to_string() }
    }

    /// Whether a task of this coordinator holds `key`.
    pub(crate) fn in_hand(&self, key: &str) -> bool {
        self.in_hand.lock().unwrap().contains_key(key)
    }

    /// Writes the claims of records written before claims existed (idempotent: claims that
    /// match their records stay, missing ones are written, stale ones go).
    async fn build_claims(&self) -> Result<(), CoordinatorError> {
        let store = self.state.store();
        let (vms, at) = self.vms.list_vms().await?;
        let records: Vec<VmRecord> = vms.into_iter().map(|(v, _)| v).collect();
        let want = claims::expected(&records);
        let (have, _) = store.range(claims::CLAIMS).await?;
        let mut txn = crate::state::Txn::new().when_unchanged_since(crate::state::vms::VMS, at);
        let mut n = 0;
        for (k, h) in &want {
            let same = have
                .iter()
                .find(|(hk, _)| hk == k)
                .is_some_and(|(_, e)| crate::state::decode::<claims::Held>(k, &e.value).ok().as_ref() == Some(h));
            if !same {
                txn = txn.put(k.clone(), crate::state::encode(h));
                n += 1;
            }
        }
        for (k, _) in have.iter().filter(|(k, _)| !want.contains_key(k)) {
            txn = txn.delete(k.clone());
            n += 1;
        }
        if n > 0 {
            store.batch(txn).await?;
            tracing::info!(claims = n, "claims of the VM records rebuilt");
        }
        Ok(())
    }

    /// Registers the image servers written down by a previous run: they count as seen now
    /// (forgotten if they do not heartbeat within the lost-after time), so that images resolve
    /// right after a restart instead of failing until their next heartbeat.
    async fn load_image_servers(&self) -> Result<(), CoordinatorError> {
        let (rows, _) = self.state.records().list_records(IMAGE_SERVERS).await?;
        for (name, e) in rows {
            match serde_json::from_slice::<ImageServerAd>(&e.value) {
                Ok(ad) => {
                    self.registry.server_beat(ad);
                }
                Err(err) => tracing::warn!(server = %name, "ignoring an unreadable image server registration: {err}"),
            }
        }
        Ok(())
    }

    /// An image server's heartbeat: registered in memory, and written down in the state store
    /// when it is new or moved.
    pub async fn image_server_beat(&self, ad: ImageServerAd) -> Result<(), CoordinatorError> {
        if self.registry.server_beat(ad.clone()) {
            let stored = ImageServerAd { images: vec![], ..ad };
            let value = serde_json::to_vec(&stored).expect("an image server ad serializes");
            self.state.records().put_record(IMAGE_SERVERS, &stored.name, value).await?;
        }
        Ok(())
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

    /// Records a host's advertisement for the scheduler, with its free figures net of the
    /// claims on it. An owner policy that is not valid CEL is refused before anything is
    /// recorded.
    pub(crate) async fn advertise(&self, ad: HostAd) -> Result<(), CoordinatorError> {
        let _ads = self.ads.lock().await;
        let ad = self.adjusted(ad).await;
        self.sched.upsert(ad)?;
        Ok(())
    }

    /// A host's ad with free cpus, memory and cpu share net of the claims on it in the store
    /// (the claims are the reservations, whichever coordinator wrote them; the host's own
    /// figures lag by a heartbeat), and never more than the host itself reports free.
    async fn adjusted(&self, mut ad: HostAd) -> HostAd {
        let used = match self.state.store().range(&claims::host_prefix(&ad.name)).await {
            Ok((rows, _)) => claims::totals(&rows, ""),
            Err(e) => {
                tracing::error!(host = %ad.name, "cannot read the host's claims: {e}");
                claims::Totals::default()
            }
        };
        // What the host reports in use counts too: a VM it runs that no record holds a claim
        // for (an orphan, a launch adopted a moment from now) takes capacity all the same.
        ad.free_cpus = ad.cpus.saturating_sub(used.cpus).min(ad.free_cpus);
        ad.free_memory_mib = ad.memory_mib.saturating_sub(used.memory_mib).min(ad.free_memory_mib);
        ad.free_cpu_share = if ad.cpu_cap <= 0.0 { 0.0 } else { (ad.cpu_cap - used.cpu_cores).max(0.0) };
        ad
    }

    /// Refreshes the scheduler's view of `host` after its VMs changed.
    pub(crate) async fn refresh_host(&self, host: &str) {
        let _ads = self.ads.lock().await;
        self.refresh_host_locked(host).await;
    }

    /// The VM's record (already written with its claims) holds the capacity of placement `p`
    /// from now on: the reservation is released and the host's free figures are recomputed
    /// from the claims. (Released first: a view that counts both for a moment would refuse
    /// placements that fit; one that counts neither is corrected by the store's check.)
    pub(crate) async fn hand_over(&self, p: &Placement) {
        let _ads = self.ads.lock().await;
        let _ = self.sched.release(p.reservation);
        self.refresh_host_locked(&p.host).await;
    }

    async fn refresh_host_locked(&self, host: &str) {
        if let Some(h) = self.registry.host(host) {
            let ready = h.state == HostState::Ready;
            let _ = self.sched.upsert(self.adjusted(h.ad).await);
            if !ready {
                self.sched.set_state(host, crate::sched::HostState::Lost);
            }
        }
    }

    /// Follows the store's host claims: capacity freed or taken by any coordinator on the
    /// same store refreshes this scheduler's view of the host (waking queued requests).
    async fn follow_claims(weak: std::sync::Weak<Coordinator>) {
        use futures::StreamExt;
        let prefix = format!("{}host/", claims::CLAIMS);
        loop {
            let Some(c) = weak.upgrade() else { return };
            let store = c.state.store().clone();
            drop(c);
            let Ok(at) = store.revision().await else { return };
            let Ok(mut changes) = store.watch(&prefix, at + 1).await else { return };
            while let Some(ev) = changes.next().await {
                let Ok(ev) = ev else { break };
                let Some(c) = weak.upgrade() else { return };
                if let Some(host) = ev.key[prefix.len()..].split('/').next() {
                    c.refresh_host(host).await;
                }
            }
        }
    }

    async fn host_lost(&self, host: &str) {
        tracing::warn!(host, "host lost: it missed its heartbeats");
        for vm in self.records().await.unwrap_or_default() {
            if vm.host.as_deref() == Some(host) && matches!(vm.state, VmState::Running | VmState::Stopping) {
                let _ = self.apply(&vm.id, Event::HostSilent { host: host.to_string() }).await;
            }
        }
    }

    /// Hosts with their advertisements, as the coordinator accounts for them.
    pub async fn hosts(&self) -> Vec<HostRecord> {
        let mut out = Vec::new();
        for mut h in self.registry.hosts() {
            h.ad = self.adjusted(h.ad).await;
            h.draining = self.sched.is_draining(&h.ad.name);
            out.push(h);
        }
        out
    }

    pub async fn list(&self) -> Result<Vec<VmRecord>, CoordinatorError> {
        let mut v = self.records().await?;
        v.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        Ok(v)
    }

    /// Finds a VM by id, id prefix (unique) or name.
    pub async fn get(&self, key: &str) -> Result<VmRecord, CoordinatorError> {
        if let Some(v) = self.record(key).await? {
            return Ok(v);
        }
        let all = self.records().await?;
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
        Ok(self.resolve_image_at(image).await?.0)
    }

    /// [`Coordinator::resolve_image`], and a client of the image server it came from.
    pub(crate) async fn resolve_image_at(&self, image: &ImageRef) -> Result<(Manifest, StoreClient), CoordinatorError> {
        let servers = self.registry.image_server_urls();
        if servers.is_empty() {
            return Err(CoordinatorError::NoImageServer);
        }
        let mut failure = None;
        for url in servers {
            let client = StoreClient::new(&url).map_err(CoordinatorError::ImageServer)?;
            match client.manifest(image).await {
                Ok(m) => return Ok((m, client)),
                Err(e) if e.is_not_found() => {}
                Err(e) => failure = Some(e),
            }
        }
        match failure {
            Some(source) => Err(CoordinatorError::NotOnReachable { image: image.to_string(), source }),
            None => Err(CoordinatorError::UnknownImage(image.to_string())),
        }
    }

    /// The manifest of saved image `saved` (NAME@V).
    pub(crate) async fn resolve_saved(&self, saved: &str) -> Result<Manifest, CoordinatorError> {
        let image: ImageRef = saved.parse().map_err(CoordinatorError::Image)?;
        self.resolve_image(&image).await
    }

    /// Deletes a VM's saved image from every image server that has it (best effort).
    pub(crate) async fn delete_saved_image(&self, image: &str) {
        let Ok(r) = image.parse::<ImageRef>() else { return };
        for url in self.registry.image_server_urls() {
            let Ok(client) = StoreClient::new(&url) else { continue };
            match client.delete(&r).await {
                Ok(rep) => tracing::info!(image, server = %url, chunks_freed = rep.chunks_freed, "saved image deleted"),
                Err(e) if e.is_not_found() => {}
                Err(e) => tracing::warn!(image, server = %url, "cannot delete saved image: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod etcd_tests;
#[cfg(test)]
mod scaleout_bench;
#[cfg(test)]
mod tests;

/// The state store's table of image servers' registrations (`records/image_servers/NAME`).
pub const IMAGE_SERVERS: &str = "image_servers";

/// How long a queued VM waits for a host before it fails.
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(3600);

fn new_id() -> String {
    let b: [u8; 6] = rand::random();
    format!("vm-{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
}
