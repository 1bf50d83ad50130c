//! Admission and placement: a new VM (`create`), a queued one once a host frees up; every
//! admitting write commits with the store-side checks of [`super::guard`].
//!
//! The scheduler's in-memory reservations are the fast path for choosing a host; the store
//! decides. A record that admits a VM somewhere is written in one batch with its claims and
//! with conditions that the claims it was checked against (the owner's, for the quota; the
//! host's, for its capacity) did not change since they were read; a conflict re-checks (and
//! when the host is full after all, places again), a bounded number of times. No in-process lock
//! is needed for correctness: two coordinators on one store never over-admit.

use std::sync::Arc;

use vgrid_api::auth::Quota;
use vgrid_api::grid::{Future, FuturesQuery, PlacementRequest};
use vgrid_api::host::LaunchRequest;
use vgrid_api::vm::{VmConfig, VmCreate, VmRecord};
use vgrid_api::{ImageRef, Manifest};

use super::claims;
use super::guard::{limited, Admit};
use super::records::CAS_RETRIES;
use super::table::{self, Event};
use super::{new_id, now, Coordinator, CoordinatorError, QUEUE_TIMEOUT};
use crate::hosts::HostClient;
use crate::lifecycle::admission::{check_quota, check_warm, explain, launch_request, placement_request, warm_requirement};
use crate::sched::{PlaceError, PlaceOptions, Placement};

/// The id of the VM that a create with client request id `rid` by `owner` makes: the same for
/// every send of that request, so that its record (written only if absent) is made once.
pub(crate) fn request_vm_id(owner: &str, rid: &str) -> String {
    let h = blake3::hash(format!("{owner}\0{rid}").as_bytes());
    format!("vm-{}", hex::encode(&h.as_bytes()[..6]))
}

impl Coordinator {
    /// Refuses early (before placing) what the commit would refuse: the quota, host ports
    /// forwarded already, a name taken.
    async fn precheck(&self, owner: &str, quota: &Quota, config: &VmConfig, name: Option<&str>) -> Result<(), CoordinatorError> {
        if limited(quota) {
            let (rows, _) = self.state.store().range(&claims::owner_prefix(owner)).await?;
            check_quota(claims::totals(&rows, ""), owner, quota, config.cpus, config.memory_mib)?;
        }
        for f in config.net.forwards() {
            if self.holder(&claims::port_key(f.host)).await?.is_some() {
                return Err(self.refusal(&claims::port_key(f.host)).await);
            }
        }
        if let Some(n) = name {
            if self.holder(&claims::name_key(n)).await?.is_some() {
                return Err(self.refusal(&claims::name_key(n)).await);
            }
        }
        for v in config.volumes.iter().filter(|v| !v.readonly) {
            if self.holder(&claims::volume_key(&v.name)).await?.is_some() {
                return Err(self.refusal(&claims::volume_key(&v.name)).await);
            }
        }
        Ok(())
    }

    /// Validates a request, places it on a host, records the VM as `pending` and starts it in
    /// the background. Nothing is recorded when validation or placement fails.
    /// `admin`: the owner is an admin (may attach volumes that belong to nobody).
    pub async fn create(self: &Arc<Self>, req: VmCreate, owner: &str, admin: bool, quota: &Quota) -> Result<VmRecord, CoordinatorError> {
        let config = req.validate()?;
        if let Some(rec) = self.created_by_request(&req, owner).await? {
            return Ok(rec);
        }
        match self.create_new(&req, config, owner, admin, quota).await {
            // Two sends of one request at once (to two coordinators): the other one made it.
            Err(e) => match self.created_by_request(&req, owner).await? {
                Some(rec) => Ok(rec),
                None => Err(e),
            },
            ok => ok,
        }
    }

    /// The VM a create with `req.request_id` by `owner` made already, if one did: a request
    /// sent again (its answer was lost, or it went to another coordinator) is answered with it.
    pub(crate) async fn created_by_request(&self, req: &VmCreate, owner: &str) -> Result<Option<VmRecord>, CoordinatorError> {
        let Some(rid) = &req.request_id else { return Ok(None) };
        let found = self.record(&request_vm_id(owner, rid)).await?.filter(|r| r.owner == owner);
        if let Some(r) = &found {
            tracing::info!(vm = %r.id, request = %rid, "create sent again: answered with the VM it made");
        }
        Ok(found)
    }

    async fn create_new(
        self: &Arc<Self>,
        req: &VmCreate,
        mut config: VmConfig,
        owner: &str,
        admin: bool,
        quota: &Quota,
    ) -> Result<VmRecord, CoordinatorError> {
        // One manifest fetch per create: the owner check asks the server it came from.
        let (manifest, server) = self.resolve_image_at(config.image()).await?;
        self.check_image_read(&server, &manifest.name, owner, admin).await?;
        self.resolve_volumes(&mut config.volumes, crate::volumes::Asker { user: owner, admin }).await?;
        let (rec, placed, preq, opts) = self.admit_new(req, config, &manifest, owner, quota).await?;
        // The claim is the record's now: from here on only this VM's commits are accepted.
        if let Err(e) = self.fence_volumes(&rec).await {
            if let Some(p) = &placed {
                let _ = self.sched.release(p.reservation);
            }
            let _ = self.remove(&rec.id, true).await;
            return Err(e);
        }
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

    /// The admission of a create of `config` running `manifest`: checks, placement (or the
    /// queue), and the record written with its claims. Nothing is started.
    pub(crate) async fn admit_new(
        &self,
        req: &VmCreate,
        mut config: VmConfig,
        manifest: &Manifest,
        owner: &str,
        quota: &Quota,
    ) -> Result<(VmRecord, Option<Placement>, PlacementRequest, PlaceOptions), CoordinatorError> {
        // The record and every launch name the version resolved now.
        config.boot.image = manifest.image_ref();
        check_warm(manifest, config.cpus, config.memory_mib)?;
        let require = warm_requirement(manifest, req.require.clone());
        let preq = placement_request(owner, manifest, &config, &require, &req.rank);
        self.sched.validate(&preq)?;
        let opts = PlaceOptions { arch: Some(manifest.meta.arch.clone()) };

        self.precheck(owner, quota, &config, req.name.as_deref()).await?;
        let id = req.request_id.as_deref().map(|r| request_vm_id(owner, r)).unwrap_or_else(new_id);
        // A name vgrid makes is the image's and 6 hex digits of the id (24 bits: among
        // thousands of VMs two meet now and then); taken, it becomes all 12 of them.
        let mut name = req.name.clone().unwrap_or_else(|| format!("{}-{}", manifest.name, &id[3..9]));
        let long_name = format!("{}-{}", manifest.name, &id[3..]);
        let admit = Admit { quota: Some(quota.clone()) };
        let mut attempt = 0;
        loop {
            // The interfaces' addresses and MACs are the record's: chosen now, claimed with it.
            let mut config = config.clone();
            // A cloud image's hostname is its VM's name unless the request names one.
            if let Some(ci) = &mut config.cloud_init {
                ci.hostname.get_or_insert_with(|| vgrid_api::cloudinit::hostname_of(&name));
            }
            self.assign_network_identity(&mut config, &id, owner, attempt).await?;
            let mut rec = VmRecord::new(&id, &name, owner, config, now());
            rec.require = req.require.clone();
            rec.rank = req.rank.clone();
            match self.insert(rec, &preq, &opts, req.no_wait, &admit).await {
                Err(CoordinatorError::NetworkIdentityTaken(why)) if attempt + 1 < CAS_RETRIES as u32 => {
                    tracing::debug!(vm = %id, "{why}; choosing again");
                    attempt += 1;
                }
                Err(CoordinatorError::Conflict(why))
                    if req.name.is_none() && name != long_name && why == super::guard::name_taken(&name) =>
                {
                    tracing::debug!(vm = %id, "generated name {name} is taken; using the whole id");
                    name = long_name.clone();
                }
                r => return r.map(|(rec, placed)| (rec, placed, preq, opts)),
            }
        }
    }

    /// Places the new VM `new` (or queues it) and writes its record with its claims; a host
    /// found full by the store (another coordinator took it) is refreshed and placement tried
    /// again.
    async fn insert(
        &self,
        new: VmRecord,
        preq: &PlacementRequest,
        opts: &PlaceOptions,
        no_wait: bool,
        admit: &Admit,
    ) -> Result<(VmRecord, Option<Placement>), CoordinatorError> {
        let mut last = None;
        for _ in 0..CAS_RETRIES {
            let placed = self.first_placement(&new.id, preq, opts, no_wait)?;
            let mut rec = new.clone();
            let ev = match &placed {
                Some(p) => Event::Placed { host: p.host.clone() },
                None => Event::Queued,
            };
            table::advance(&mut rec, &ev, now()).map_err(|source| CoordinatorError::Transition { id: rec.id.clone(), source })?;
            let mut outcome = Ok(false);
            for _ in 0..CAS_RETRIES {
                // The record is the reservation from now on.
                outcome = self.try_commit(None, Some(&rec), Some(admit)).await;
                if !matches!(outcome, Ok(false)) {
                    break;
                }
                tokio::task::yield_now().await;
            }
            match (outcome, &placed) {
                (Ok(true), _) => {
                    if let Some(p) = &placed {
                        self.hand_over(p).await;
                    }
                    return Ok((rec, placed));
                }
                (Err(CoordinatorError::Capacity(e)), Some(p)) => {
                    // Full after all (another coordinator took it): place again.
                    let _ = self.sched.release(p.reservation);
                    self.refresh_host(&p.host).await;
                    last = Some(CoordinatorError::Capacity(e));
                }
                (outcome, _) => {
                    if let Some(p) = &placed {
                        let _ = self.sched.release(p.reservation);
                    }
                    return Err(outcome.err().unwrap_or_else(|| CoordinatorError::Contended(rec.id.clone())));
                }
            }
        }
        Err(last.unwrap_or_else(|| CoordinatorError::Contended(new.id.clone())))
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
            Ok(p) => {
                crate::metrics::placed("run");
                Ok(Some(p))
            }
            Err(PlaceError::NoMatch(nm)) if nm.may_change() && !no_wait => {
                if nm.refusals.is_empty() {
                    tracing::info!(vm = %id, "queued behind {} waiting requests", self.sched.waiting());
                } else {
                    tracing::info!(vm = %id, "no host can take it now; queued: {nm}");
                }
                Ok(None)
            }
            Err(e) => {
                crate::metrics::refused("run", &e);
                Err(place_error(e))
            }
        }
    }

    /// Which hosts could start a VM like `req` now, and why not the others: one answer per
    /// host, in name order. Nothing is reserved.
    pub async fn futures(&self, req: &FuturesQuery, user: &str) -> Result<Vec<Future>, CoordinatorError> {
        // The bounds a VM's request has (the document's, too).
        vgrid_api::config::check_cpus(req.cpus)?;
        vgrid_api::config::check_memory(req.memory_mib)?;
        let image = match &req.image {
            Some(i) => {
                let r: ImageRef = i.parse().map_err(CoordinatorError::Image)?;
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
            require: with_networks(req.require.clone(), &req.nics)?,
            rank: None,
        };
        self.sched.validate(&base)?;
        let opts = PlaceOptions { arch: image.as_ref().map(|m| m.meta.arch.clone()) };
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
    pub(crate) async fn requeue(self: Arc<Self>, vm: VmRecord) {
        let image = vm.config.image().clone();
        let mut manifest = None;
        for _ in 0..120 {
            match self.resolve_image(&image).await {
                Ok(m) => {
                    manifest = Some(m);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
            }
        }
        let Some(manifest) = manifest else {
            let reason = format!("queued across a coordinator restart, and no image server has {image} since");
            let _ = self.apply(&vm.id, Event::QueueGaveUp { reason }).await;
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
        let _held = self.hold(&id);
        for _ in 0..CAS_RETRIES {
            let p = match self.sched.place_or_wait(&preq, &opts, Some(QUEUE_TIMEOUT)).await {
                Ok(p) => {
                    crate::metrics::placed("run");
                    p
                }
                Err(e) => {
                    crate::metrics::refused("run", &e);
                    let _ = self.apply(&id, Event::QueueGaveUp { reason: e.to_string() }).await;
                    return;
                }
            };
            // Placed only while it is still queued (not stopped or removed meanwhile, nor
            // placed by another coordinator that queued it too, one taking over from it).
            let placed = Event::Placed { host: p.host.clone() };
            let taken = std::sync::atomic::AtomicBool::new(false);
            let event = |r: &VmRecord| {
                taken.store(r.host.is_some(), std::sync::atomic::Ordering::SeqCst);
                (r.host.is_none()).then(|| placed.clone())
            };
            match self.transact(&id, event, |_| {}, Some(&Admit::default())).await {
                Ok(_) if taken.load(std::sync::atomic::Ordering::SeqCst) => {
                    let _ = self.sched.release(p.reservation);
                    self.refresh_host(&p.host).await;
                    return;
                }
                Ok(_) => {
                    self.hand_over(&p).await;
                    tracing::info!(vm = %id, host = %p.host, "queued VM placed");
                    let client = HostClient::new(&p.host, &p.url, self.http.clone());
                    self.run(client, launch).await;
                    return;
                }
                Err(CoordinatorError::Capacity(_)) => {
                    // Another coordinator filled the host: wait again.
                    let _ = self.sched.release(p.reservation);
                    self.refresh_host(&p.host).await;
                }
                Err(_) => {
                    let _ = self.sched.release(p.reservation);
                    return;
                }
            }
        }
    }
}

/// A placement that failed, as the API answers it.
pub(crate) fn place_error(e: PlaceError) -> CoordinatorError {
    match e {
        PlaceError::NoMatch(nm) => CoordinatorError::Capacity(explain(&nm)),
        PlaceError::Invalid(e) => e.into(),
        e @ PlaceError::TimedOut { .. } => CoordinatorError::Waited(e),
    }
}

/// A futures query's requirement with its interfaces' network clauses (as a VM's placement
/// has them).
fn with_networks(require: Option<String>, nics: &[vgrid_api::net::Nic]) -> Result<Option<String>, CoordinatorError> {
    let net = vgrid_api::net::NetConfig::requested(nics, &[])?;
    net.validate()?;
    let require = require.filter(|r| !r.trim().is_empty());
    Ok(match (require, crate::networks::network_requirement(&net)) {
        (r, None) => r,
        (None, Some(n)) => Some(n),
        (Some(r), Some(n)) => Some(format!("({r}) && {n}")),
    })
}
