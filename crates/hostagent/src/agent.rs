//! The host agent: one block proxy (NBD on a unix socket, over the host chunk cache) and the
//! QEMU guests of this host, each on a qcow2 overlay backed by the proxy's export.
//!
//! The coordinator (in process for `vgrid up`) asks it to launch, stop and remove VMs; the
//! agent reports each VM's exit. Kernel and initrd of direct-boot images reach the host as
//! chunks through the same cache and are written into the VM's runtime directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vgrid_api::host::{HeartbeatReply, HostHeartbeat, LaunchRequest, Launched, PullProgress, VmReport, POWERDOWN_TIMEOUT};
use vgrid_api::vm::Forward;
use vgrid_api::{Boot, ErrorBody, ImageRef};
use vgrid_blockproxy::{BlockProxy, ProxyConfig, ServerHandle, Servers, SourceError};

use crate::spec::{BootSource, DiskSource, VmSpec};
use crate::vm::{ExitInfo, LaunchOptions, Vm, VmError};
use crate::Accel;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Host name as advertised.
    pub name: String,
    /// Holds `cache/` (chunk cache), `vms/<id>/` (runtime directories) and `nbd.sock`.
    pub data_dir: PathBuf,
    /// Image servers, tried in order for every manifest and chunk.
    pub image_servers: Vec<String>,
    pub cache_max_bytes: u64,
    /// Memory offered to guests [default: 3/4 of physical memory].
    pub max_memory_mib: Option<u64>,
    /// vCPUs offered to guests [default: 4 per host CPU].
    pub max_cpus: Option<u32>,
    /// The owner's CPU cap: this fraction of the machine's CPU time for all guests together
    /// (a parent cgroup; CPU reservations beyond it are refused). None: uncapped.
    pub max_share: Option<f64>,
    /// The unprivileged user guests' QEMU runs as when the agent is root (created if missing;
    /// default `vgrid-qemu`). Ignored, with a log line, when the agent is not root.
    pub qemu_user: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("image server {url}: {source}")]
    Source {
        url: String,
        #[source]
        source: SourceError,
    },
    #[error("block proxy: {0}")]
    Proxy(#[from] vgrid_blockproxy::ProxyError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("VM {0} is not on this host")]
    UnknownVm(String),
    #[error("VM {id}: {what} {path}: {source}")]
    Io {
        id: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {id}: KVM was asked for but is not usable on this host")]
    NoKvm { id: String },
    #[error(transparent)]
    Admission(#[from] crate::resources::AdmissionError),
    #[error(transparent)]
    Save(#[from] crate::save::SaveError),
    #[error(transparent)]
    Restore(#[from] crate::restore::RestoreError),
    #[error("VM {id}: migration: {detail}")]
    Migration { id: String, detail: String },
    #[error(transparent)]
    QemuUser(#[from] crate::qemu_user::QemuUserError),
}

impl AgentError {
    /// An image server of the list could not be used (its URL is the error's source name).
    fn servers(source: SourceError) -> AgentError {
        AgentError::Source { url: source.source_name().to_string(), source }
    }
}

/// Where and how a host announces itself.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    /// The coordinator's base URL.
    pub coordinator: String,
    /// This agent's base URL as the coordinator reaches it.
    pub url: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// The owner's requirement over requests (CEL), advertised as is.
    pub policy: Option<String>,
    /// Override the interval the coordinator asks for.
    pub interval: Option<Duration>,
}

struct Slot {
    vm: Arc<Vm>,
}

pub struct Agent {
    cfg: AgentConfig,
    servers: Arc<Servers>,
    proxy: Arc<BlockProxy>,
    nbd_socket: PathBuf,
    nbd: Mutex<Option<ServerHandle>>,
    vms: Mutex<HashMap<String, Slot>>,
    /// Images this host opened, for the cache fractions it advertises.
    images: Mutex<HashMap<String, Arc<vgrid_api::Manifest>>>,
    accel: Accel,
    qemu_version: String,
    memory_mib: u64,
    cpus: u32,
    res: Arc<crate::resources::HostResources>,
    migrations: crate::migrate::Migrations,
    /// Who QEMU runs as: `None` is the agent's own user (the agent is not root).
    qemu_user: Option<crate::qemu_user::QemuUser>,
}

impl Agent {
    /// Opens the cache, starts the NBD server on `DATA_DIR/nbd.sock`, probes QEMU and the CPU.
    pub async fn start(cfg: AgentConfig) -> Result<Arc<Agent>, AgentError> {
        let io = |what: &'static str, path: &Path, e: std::io::Error| AgentError::Io {
            id: "-".into(),
            what,
            path: path.to_path_buf(),
            source: e,
        };
        std::fs::create_dir_all(cfg.data_dir.join("vms")).map_err(|e| io("data directory", &cfg.data_dir, e))?;
        let qemu_user = crate::qemu_user::resolve(&cfg.qemu_user, &cfg.data_dir.join("vms"))?;
        let servers = Arc::new(Servers::from_urls(cfg.image_servers.clone()).map_err(AgentError::servers)?);
        let proxy = BlockProxy::new(ProxyConfig::new(cfg.data_dir.join("cache"), cfg.cache_max_bytes), servers.clone())?;
        let nbd_socket = cfg.data_dir.join("nbd.sock");
        let _ = std::fs::remove_file(&nbd_socket);
        // QEMU (as its own user) connects to the proxy: the socket is for that user's group.
        let access = qemu_user.as_ref().map(|u| vgrid_blockproxy::SocketAccess { mode: 0o660, gid: Some(u.gid) });
        let handle = proxy.serve_unix_with(&nbd_socket, access)?;
        let qemu_version = crate::qemu::qemu_version()
            .await
            .map(|v| format!("{}.{}.{}", v.major, v.minor, v.micro))
            .unwrap_or_else(|e| format!("unavailable: {e}"));
        let phys = physical_memory_mib();
        let memory_mib = cfg.max_memory_mib.unwrap_or(phys * 3 / 4);
        // vCPUs are overcommitted 4:1, as OpenStack's default cpu_allocation_ratio.
        let cpus = cfg.max_cpus.unwrap_or_else(|| 4 * std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1));
        let accel = crate::accel::detect();
        let res = crate::resources::HostResources::new(&cfg.name, cfg.max_share, Some(memory_mib), &cfg.data_dir.join("vms"))
            .map(Arc::new)
            .map_err(|e| AgentError::Io {
                id: "-".into(),
                what: "resource control",
                path: "/sys/fs/cgroup".into(),
                source: std::io::Error::other(e),
            })?;
        tracing::info!(host = %cfg.name, accel = accel.as_str(), memory_mib, cpus, nbd = %nbd_socket.display(), "host agent started");
        let agent = Arc::new(Agent {
            cfg,
            servers,
            proxy,
            nbd_socket,
            nbd: Mutex::new(Some(handle)),
            vms: Mutex::new(HashMap::new()),
            images: Mutex::new(HashMap::new()),
            accel,
            qemu_version,
            memory_mib,
            cpus,
            res,
            migrations: Default::default(),
            qemu_user,
        });
        // Load and usage sampling, every second (disk counters every 5 s), while the agent lives.
        let weak = Arc::downgrade(&agent);
        tokio::spawn(async move {
            let mut slow_in = 0u32;
            let mut pager_files = HashMap::new();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(a) = weak.upgrade() else { break };
                let vms: Vec<Arc<Vm>> = a.vms.lock().unwrap().values().map(|s| s.vm.clone()).collect();
                let ram_remote: HashMap<String, u64> = vms
                    .iter()
                    .filter_map(|vm| match &vm.spec().ram {
                        crate::ram::RamBacking::Lazy { export, .. } => Some((vm.id().to_string(), a.proxy.uncached_bytes(export)?)),
                        _ => None,
                    })
                    .collect();
                a.res.tick(&vms, a.proxy.stats().bytes_fetched, slow_in == 0, &ram_remote).await;
                if slow_in == 0 {
                    let lazy: Vec<(String, std::path::PathBuf)> = vms
                        .iter()
                        .filter(|vm| ram_remote.contains_key(vm.id()))
                        .map(|vm| (vm.id().to_string(), vm.runtime_dir().to_path_buf()))
                        .collect();
                    crate::ram::trim_page_cache(&mut pager_files, &lazy).await;
                }
                slow_in = if slow_in == 0 { 4 } else { slow_in - 1 };
            }
        });
        // QEMUs an earlier agent of this data directory started keep running: take them back.
        crate::adopt::adopt_all(&agent).await;
        Ok(agent)
    }

    /// Resource control, accounting and load of this host.
    pub fn resources(&self) -> &Arc<crate::resources::HostResources> {
        &self.res
    }

    pub(crate) fn migrations(&self) -> &crate::migrate::Migrations {
        &self.migrations
    }

    pub(crate) fn has_vm(&self, id: &str) -> bool {
        self.vms.lock().unwrap().contains_key(id)
    }

    /// Takes `vm` as one of this host's VMs (adopted, or received by a migration).
    pub(crate) fn insert_vm(&self, id: &str, vm: Arc<Vm>) {
        self.vms.lock().unwrap().insert(id.to_string(), Slot { vm });
    }

    pub(crate) fn data_dir(&self) -> &Path {
        &self.cfg.data_dir
    }

    /// Remembers an opened image (for the cache fractions this host advertises).
    pub(crate) fn note_image(&self, manifest: Arc<vgrid_api::Manifest>) {
        self.images.lock().unwrap().insert(manifest.image_ref().to_string(), manifest);
    }

    /// The block proxy's NBD socket (QEMU's disks and the RAM pagers connect to it).
    pub fn nbd_socket(&self) -> &Path {
        &self.nbd_socket
    }

    pub fn proxy(&self) -> &Arc<BlockProxy> {
        &self.proxy
    }

    /// The image servers this host reads from.
    pub fn servers(&self) -> &Arc<Servers> {
        &self.servers
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Launch options every QEMU of this agent starts with (its user).
    pub(crate) fn launch_options(&self) -> LaunchOptions {
        LaunchOptions { run_as: self.qemu_user.clone(), ..LaunchOptions::default() }
    }

    /// The user guests' QEMU runs as; `None`: the agent's own.
    pub fn qemu_user(&self) -> Option<&crate::qemu_user::QemuUser> {
        self.qemu_user.as_ref()
    }

    pub(crate) fn runtime_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("vms").join(id)
    }

    pub fn console_log(&self, id: &str) -> PathBuf {
        self.runtime_dir(id).join("console.log")
    }
    pub fn console_socket(&self, id: &str) -> PathBuf {
        self.runtime_dir(id).join("console.sock")
    }

    /// The last `n` console lines of a VM (empty when there is no log).
    pub fn console_tail(&self, id: &str, n: usize) -> Vec<String> {
        let Ok(data) = crate::qemu_user::read_file(&self.console_log(id)) else { return vec![] };
        let text = String::from_utf8_lossy(&data);
        let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(n)..].iter().map(|s| s.to_string()).collect()
    }

    /// QEMU version of this host (`MAJOR.MINOR.MICRO`).
    pub fn qemu_version(&self) -> &str {
        &self.qemu_version
    }

    pub(crate) fn vm(&self, id: &str) -> Option<Arc<Vm>> {
        self.vms.lock().unwrap().get(id).map(|s| s.vm.clone())
    }

    /// Starts a VM: opens the image through the proxy, writes kernel/initrd, launches QEMU on
    /// an overlay over the proxy's export (or restores a warm image's state), in its own cgroup
    /// within the owner's cap. Returns once QEMU's QMP answers.
    pub async fn launch(&self, req: LaunchRequest, progress: &(dyn Fn(&str) + Send + Sync)) -> Result<Launched, AgentError> {
        let id = req.id.clone();
        let accel = requested_accel(&req)?;
        let limits = self.res.admit(&id, &req.config.resources, req.config.memory_mib, accel.unwrap_or_else(crate::accel::detect))?;
        let fetched0 = self.proxy.stats().bytes_fetched;
        let r = self.launch_admitted(req, accel, &limits, fetched0, progress).await;
        if r.is_err() {
            self.res.release(&id);
        }
        r
    }

    async fn launch_admitted(
        &self,
        req: LaunchRequest,
        accel: Option<Accel>,
        limits: &crate::cgroup::Limits,
        fetched0: u64,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Launched, AgentError> {
        let id = req.id.clone();
        // Before anything is fetched: a forward whose host port is taken here would only make
        // QEMU fail later with a vaguer message (and a resume would have fetched its state).
        let forwards: Vec<Forward> = req.config.net.forwards().copied().collect();
        self.check_forwards(&id, &forwards)?;
        let (mut spec, dir, manifest) = self.prepare_spec(&req, progress).await?;
        // A warm image: its saved state is loaded instead of booting (see restore.rs).
        let resolved_accel = accel.unwrap_or_else(crate::accel::detect);
        if manifest.state.is_some() {
            progress("fetching saved state");
        }
        let incoming = crate::restore::prepare_incoming(self, &id, &manifest, req.config.cpus, req.config.memory_mib, resolved_accel)?;
        progress(if incoming.is_some() { "restoring" } else { "booting" });
        let export = manifest.image_ref().to_string();
        let cgroup = self.res.create_group(&id, limits)?;
        let mut opts = LaunchOptions {
            cgroup: cgroup.clone(),
            disk_throttle: crate::qemu::args::DiskThrottle::of(&req.config.resources),
            ..self.launch_options()
        };
        // A warm image: QEMU waits for its state, which streams in while it is fetched; RAM
        // saved apart from the state is paged in lazily (or loaded first where it cannot be).
        opts.defer_incoming = incoming.is_some();
        if incoming.is_some() {
            spec.ram = crate::restore::saved_ram_backing(self, &id, &manifest, &dir, &opts).await?;
        }
        let vm = match Vm::launch_with(spec, &dir, &opts).await {
            Ok(vm) => vm,
            Err(e) => {
                crate::ram::stop_pager(&dir).await;
                return Err(e.into());
            }
        };
        if let Some(st) = incoming {
            if let Err(e) = crate::restore::stream_incoming(&vm, st, vgrid_api::host::RESTORE_TIMEOUT).await {
                let _ = vm.kill().await;
                return Err(e);
            }
        }
        crate::adopt::record_launch(&dir, &req);
        self.res.track(&vm, cgroup, limits, self.proxy.stats().bytes_fetched.saturating_sub(fetched0));
        let launched = Launched { pid: vm.pid(), accel: vm.accel() };
        self.vms.lock().unwrap().insert(id.clone(), Slot { vm: Arc::new(vm) });
        tracing::info!(vm = %id, image = %export, pid = launched.pid, "QEMU started");
        Ok(launched)
    }

    /// Refuses a launch whose forwarded host ports cannot be bound on this host (QEMU binds
    /// them on 127.0.0.1), naming the port and the cause.
    pub(crate) fn check_forwards(&self, id: &str, forwards: &[Forward]) -> Result<(), AgentError> {
        for &Forward { host: h, guest: g } in forwards {
            if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", h)) {
                return Err(crate::resources::AdmissionError::Refused {
                    host: self.cfg.name.clone(),
                    id: id.to_string(),
                    reason: format!("host port {h} (forwarded to guest port {g}) cannot be bound on 127.0.0.1: {e}"),
                }
                .into());
            }
        }
        Ok(())
    }

    /// Opens the image through the proxy, writes kernel/initrd into the runtime directory and
    /// returns the spec of a VM on an overlay over the proxy's export, with that directory and
    /// the image's manifest.
    pub(crate) async fn prepare_spec(
        &self,
        req: &LaunchRequest,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(VmSpec, PathBuf, Arc<vgrid_api::Manifest>), AgentError> {
        let id = req.id.clone();
        let dir = self.runtime_dir(&id);
        let accel = requested_accel(req)?;
        progress("fetching image");
        let t0 = Instant::now();
        // A resume instantiates its saved image; anything else the image it boots.
        let manifest = self.proxy.resolve(req.image()).await?;
        self.images.lock().unwrap().insert(manifest.image_ref().to_string(), manifest.clone());
        std::fs::create_dir_all(&dir).map_err(|e| AgentError::Io {
            id: id.clone(),
            what: "runtime directory",
            path: dir.clone(),
            source: e,
        })?;
        // A kept directory was QEMU's user's: take it back before writing into it as root
        // (never from under a QEMU of this id that still runs).
        if self.qemu_user.is_some() && !self.has_vm(&id) {
            crate::qemu_user::reclaim(&dir).map_err(|e| AgentError::Io {
                id: id.clone(),
                what: "runtime directory",
                path: dir.clone(),
                source: e,
            })?;
        }
        // A warm image of a direct kernel boot restores without its kernel and initrd (they
        // are in the saved memory already): only the loader ROMs its state names.
        let restore_roms = match (&manifest.meta.boot, &manifest.state) {
            (Boot::Kernel { .. }, Some(st)) => crate::restore::state_loader_roms(self, &manifest, &st.blob).await,
            _ => None,
        };
        let boot = match &manifest.meta.boot {
            Boot::Firmware => BootSource::Firmware { bios: None },
            Boot::Kernel { .. } if restore_roms.is_some() => BootSource::Restore { option_roms: restore_roms.unwrap_or_default() },
            Boot::Kernel { kernel, initrd, cmdline } => {
                let kpath = dir.join("kernel");
                self.proxy.write_blob(&manifest, kernel, &kpath).await?;
                let ipath = match initrd {
                    Some(i) => {
                        let p = dir.join("initrd");
                        self.proxy.write_blob(&manifest, i, &p).await?;
                        Some(p)
                    }
                    None => None,
                };
                BootSource::Kernel { kernel: kpath, initrd: ipath, cmdline: cmdline.clone() }
            }
        };
        tracing::debug!(vm = %id, image = %manifest.image_ref(), took_ms = t0.elapsed().as_millis() as u64, "boot files ready");
        let export = manifest.image_ref().to_string();
        let spec = VmSpec::new(&id, req.config.clone().with_accel(accel), DiskSource::nbd_unix(&self.nbd_socket, &export), boot);
        Ok((spec, dir, manifest))
    }

    /// Resolves when the VM's QEMU exits.
    pub async fn wait_exit(&self, id: &str) -> ExitInfo {
        match self.vm(id) {
            Some(vm) => crate::adopt::exit_of(&vm, vm.wait_exit().await),
            None => ExitInfo::unknown(),
        }
    }

    /// The VMs this host runs.
    pub fn vms(&self) -> Vec<VmReport> {
        let mut v: Vec<VmReport> =
            self.vms.lock().unwrap().iter().map(|(id, s)| VmReport { id: id.clone(), pid: s.vm.pid(), incoming: false }).collect();
        v.extend(self.migrations.incoming_ids().into_iter().map(|(id, pid)| VmReport { id, pid, incoming: true }));
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Memory and cpus promised to the VMs this host runs.
    pub fn used(&self) -> (u32, u64) {
        let (ic, im) = self.migrations.incoming_used();
        let vms = self.vms.lock().unwrap();
        vms.values().fold((ic, im), |(c, m), s| (c + s.vm.spec().config.cpus, m + s.vm.spec().config.memory_mib))
    }

    /// This host's advertisement.
    pub fn ad(&self, url: &str, labels: std::collections::BTreeMap<String, String>, policy: Option<String>) -> vgrid_api::grid::HostAd {
        let (used_cpus, used_mem) = self.used();
        vgrid_api::grid::HostAd {
            name: self.cfg.name.clone(),
            url: url.to_string(),
            arch: std::env::consts::ARCH.into(),
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            free_cpus: self.cpus.saturating_sub(used_cpus),
            free_memory_mib: self.memory_mib.saturating_sub(used_mem),
            accel: self.accel.as_str().into(),
            qemu_version: self.qemu_version.clone(),
            network_modes: vec!["user".into()],
            labels,
            policy,
            load_avg: load_average(),
            running_vms: self.vms.lock().unwrap().len() as u32,
            image_cache: self.image_cache(),
            load_now: self.res.load().now,
            load_predicted: self.res.load().predicted,
            cpu_cap: self.res.cap_cores().unwrap_or(0.0),
            free_cpu_share: self.res.free_share(),
            cgroups: self.res.cgroup_version(),
        }
    }

    /// For each image this host opened, the fraction of its stored chunks in the cache.
    fn image_cache(&self) -> std::collections::BTreeMap<String, f64> {
        let images: Vec<(String, Arc<vgrid_api::Manifest>)> =
            self.images.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let cache = self.proxy.cache();
        images
            .into_iter()
            .map(|(name, m)| {
                let (mut total, mut held) = (0u64, 0u64);
                for h in m.all_chunks() {
                    total += 1;
                    if cache.contains(h) {
                        held += 1;
                    }
                }
                (name, if total == 0 { 1.0 } else { held as f64 / total as f64 })
            })
            .collect()
    }

    /// Stops a VM: ACPI power-down with a timeout (then quit, then kill), or a kill at once.
    pub async fn stop(&self, id: &str, force: bool) -> Result<(), AgentError> {
        let Some(vm) = self.vm(id) else { return Ok(()) };
        if force {
            vm.kill().await?;
        } else {
            let out = vm.powerdown(POWERDOWN_TIMEOUT).await?;
            tracing::info!(vm = %id, method = ?out.method, exit = %out.exit, "VM stopped");
        }
        Ok(())
    }

    /// Forgets an exited VM and removes what it no longer needs: sockets, overlay, boot files.
    /// The console log stays until [`Agent::remove`].
    pub async fn release(&self, id: &str) -> Result<(), AgentError> {
        self.migrations.forget_outgoing(id);
        self.incoming_abort(id).await?;
        let slot = self.vms.lock().unwrap().remove(id);
        if let Some(s) = slot {
            s.vm.release_console().await;
            let _ = s.vm.kill().await;
        }
        self.res.release(id);
        let dir = self.runtime_dir(id);
        // A lazily restored guest's RAM pager ends with it (and its mount with it).
        crate::ram::stop_pager(&dir).await;
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_name() != "console.log" && e.file_name() != crate::migrate::CONSOLE_HISTORY {
                    let p = e.path();
                    let r = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
                    if let Err(err) = r {
                        tracing::warn!(vm = %id, path = %p.display(), "cannot remove: {err}");
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes everything of a VM on this host (kills QEMU if it still runs).
    pub async fn remove(&self, id: &str) -> Result<(), AgentError> {
        self.release(id).await?;
        let dir = self.runtime_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(AgentError::Io { id: id.into(), what: "runtime directory", path: dir, source: e }),
        }
    }

    /// Stages a whole image into the cache, reporting progress on `tx`.
    pub async fn pull(&self, image: &ImageRef, tx: tokio::sync::mpsc::Sender<PullProgress>) {
        let t0 = Instant::now();
        let last = Mutex::new(Instant::now() - Duration::from_secs(1));
        let cb = |done: u64, total: u64| {
            let mut l = last.lock().unwrap();
            if l.elapsed() >= Duration::from_millis(100) || done == total {
                *l = Instant::now();
                let _ = tx.try_send(PullProgress { done, total, ..Default::default() });
            }
        };
        let r = self.proxy.pull(image, &cb).await;
        let msg = match r {
            Ok(rep) => PullProgress {
                image: Some(rep.image.to_string()),
                done: rep.bytes_total,
                total: rep.bytes_total,
                fetched_bytes: rep.bytes_fetched,
                seconds: t0.elapsed().as_secs_f64(),
                finished: true,
                error: None,
            },
            Err(e) => PullProgress { error: Some(e.to_string()), ..Default::default() },
        };
        let _ = tx.send(msg).await;
    }

    /// Registers with the coordinator and refreshes the advertisement every interval it asks
    /// for; adopts the image server list it answers with. Runs until the process ends; a
    /// coordinator that does not answer is retried at the same pace.
    pub async fn heartbeat_loop(self: Arc<Self>, hb: Heartbeat) {
        let http = vgrid_trust::tls::client_builder().timeout(Duration::from_secs(10)).build().expect("HTTP client");
        let mut interval = vgrid_api::host::HEARTBEAT_INTERVAL;
        let mut failing = false;
        loop {
            match self.heartbeat_once(&http, &hb).await {
                Ok(reply) => {
                    if failing {
                        tracing::info!(coordinator = %hb.coordinator, "coordinator reachable again");
                    }
                    failing = false;
                    interval = Duration::from_secs(reply.interval_secs.max(1));
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(coordinator = %hb.coordinator, "heartbeat failed: {e}");
                    }
                    failing = true;
                }
            }
            tokio::time::sleep(hb.interval.unwrap_or(interval)).await;
        }
    }

    /// One heartbeat; returns the coordinator's answer (the interval it asks for, the image
    /// servers it knows).
    pub async fn heartbeat_once(&self, http: &reqwest::Client, hb: &Heartbeat) -> Result<HeartbeatReply, String> {
        let body = HostHeartbeat { ad: self.ad(&hb.url, hb.labels.clone(), hb.policy.clone()), vms: self.vms(), usage: self.res.reports() };
        let url = format!("{}/api/v1/hosts/heartbeat", hb.coordinator.trim_end_matches('/'));
        let resp = http.post(&url).json(&body).send().await.map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        let answer = resp.bytes().await.map_err(|e| format!("{url}: malformed answer: {e}"))?;
        let malformed = |e: serde_json::Error| format!("{url}: malformed answer: {e}");
        if !status.is_success() {
            let e: ErrorBody = serde_json::from_slice(&answer).map_err(malformed)?;
            return Err(format!("{url}: HTTP {status}: {}", e.error));
        }
        let reply: HeartbeatReply = serde_json::from_slice(&answer).map_err(malformed)?;
        // Servers configured on this host first, then those the coordinator knows.
        let mut servers = self.cfg.image_servers.clone();
        for s in &reply.image_servers {
            if !servers.iter().any(|x| x == s) {
                servers.push(s.clone());
            }
        }
        self.res.delivered(&body.usage);
        if !servers.is_empty() {
            self.servers.set_urls(servers).map_err(|e| AgentError::servers(e).to_string())?;
        }
        Ok(reply)
    }

    /// Kills any guest still running (the coordinator stops them gracefully first) and stops
    /// serving NBD.
    pub async fn shutdown(&self) {
        for (id, _) in self.migrations.incoming_ids() {
            let _ = self.incoming_abort(&id).await;
        }
        let ids: Vec<String> = self.vms.lock().unwrap().keys().cloned().collect();
        for id in ids {
            let _ = self.stop(&id, false).await;
            let _ = self.release(&id).await;
        }
        let h = self.nbd.lock().unwrap().take();
        if let Some(h) = h {
            h.shutdown().await;
        }
        self.proxy.flush_profiles(Duration::from_secs(5)).await;
        self.proxy.shutdown();
        self.res.shutdown();
        let _ = std::fs::remove_file(&self.nbd_socket);
    }
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok())).unwrap_or(0.0)
}

fn physical_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        })
        .map(|kib| kib / 1024)
        .unwrap_or(1024)
}

/// The accelerator a launch request asks for (`None`: the host's choice), refusing KVM where it
/// does not work.
pub(crate) fn requested_accel(req: &LaunchRequest) -> Result<Option<Accel>, AgentError> {
    match req.config.accel {
        Some(Accel::Kvm) if !crate::kvm_usable() => Err(AgentError::NoKvm { id: req.id.clone() }),
        a => Ok(a),
    }
}
