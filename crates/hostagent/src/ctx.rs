//! The host's context: what every feature of the agent works on. Its configuration and data
//! directory, the image servers and the block proxy (with its NBD socket), resource control,
//! the QEMU user and version, and the one table of this host's guests: those that run, those
//! it is receiving and those it is sending away.
//!
//! Features ([`crate::instantiate`], [`crate::save`], [`crate::restore`], [`crate::migrate`],
//! [`crate::adopt`]) take a [`HostCtx`]; it calls none of them. The [`crate::agent::Agent`]
//! builds it at start and adds what only the running process has (the NBD server's handle,
//! the sampling and heartbeat loops).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vgrid_api::host::{VmReport, POWERDOWN_TIMEOUT};
use vgrid_api::migrate::Migration;
use vgrid_blockproxy::{BlockProxy, Servers};

use crate::error::AgentError;
use crate::resources::HostResources;
use crate::vm::{LaunchOptions, Vm};
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
    /// How long a guest's read waits for unreachable image servers before it fails
    /// (`vgrid_blockproxy::ProxyConfig::fetch_timeout`; `None`: for ever).
    pub fetch_timeout: Option<std::time::Duration>,
    /// The site networks this host is attached to: network name → bridge (made if missing).
    pub networks: std::collections::BTreeMap<String, String>,
    /// Whether users' `vgrid tunnel` may connect to this agent directly (else their guests'
    /// frames always go through the coordinator's relay).
    pub tunnel_direct: bool,
    /// How long a tunnel port waits awake for its guest's answer after handing it frames
    /// (`vgrid_api::tunnel::AnswerPoll`; zero: never).
    pub tunnel_poll: std::time::Duration,
}

/// A VM this host sends away: its status as the source sees it, and how to cancel it.
pub(crate) struct Outgoing {
    pub(crate) status: Mutex<Migration>,
    pub(crate) cancel: tokio::sync::watch::Sender<bool>,
    pub(crate) started: Instant,
}

/// The migrations of one host: VMs it is receiving and VMs it is sending.
#[derive(Default)]
pub struct Migrations {
    pub(crate) incoming: Mutex<HashMap<String, Arc<Vm>>>,
    pub(crate) outgoing: Mutex<HashMap<String, Arc<Outgoing>>>,
}

impl Migrations {
    /// Ids of the VMs this host is receiving.
    pub fn incoming_ids(&self) -> Vec<(String, u32)> {
        self.incoming.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.pid())).collect()
    }
    /// Cpus and memory of the VMs this host is receiving.
    pub fn incoming_used(&self) -> (u32, u64) {
        self.incoming.lock().unwrap().values().fold((0, 0), |(c, m), v| (c + v.spec().config.cpus, m + v.spec().config.memory_mib))
    }
    pub(crate) fn forget_outgoing(&self, id: &str) {
        self.outgoing.lock().unwrap().remove(id);
    }
}

/// What the agent's features share (see the module's documentation).
pub struct HostCtx {
    pub(crate) cfg: AgentConfig,
    pub(crate) servers: Arc<Servers>,
    pub(crate) proxy: Arc<BlockProxy>,
    pub(crate) nbd_socket: PathBuf,
    /// The guests that run here (launched, adopted or received).
    pub(crate) vms: Mutex<HashMap<String, Arc<Vm>>>,
    /// Images this host opened, for the cache fractions it advertises.
    pub(crate) images: Mutex<HashMap<String, Arc<vgrid_api::Manifest>>>,
    pub(crate) accel: Accel,
    pub(crate) qemu_version: String,
    pub(crate) memory_mib: u64,
    pub(crate) cpus: u32,
    pub(crate) res: Arc<HostResources>,
    pub(crate) migrations: Migrations,
    /// Who QEMU runs as: `None` is the agent's own user (the agent is not root).
    pub(crate) qemu_user: Option<crate::qemu_user::QemuUser>,
    /// The site networks this host is attached to, and its guests' interfaces on them.
    pub(crate) net: crate::networks::SiteNets,
}

impl HostCtx {
    /// Resource control, accounting and load of this host.
    pub fn resources(&self) -> &Arc<HostResources> {
        &self.res
    }

    pub(crate) fn migrations(&self) -> &Migrations {
        &self.migrations
    }

    pub(crate) fn has_vm(&self, id: &str) -> bool {
        self.vms.lock().unwrap().contains_key(id)
    }

    pub(crate) fn vm(&self, id: &str) -> Option<Arc<Vm>> {
        self.vms.lock().unwrap().get(id).cloned()
    }

    /// Takes `vm` as one of this host's VMs (launched, adopted, or received by a migration).
    pub(crate) fn insert_vm(&self, id: &str, vm: Arc<Vm>) {
        self.vms.lock().unwrap().insert(id.to_string(), vm);
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

    /// QEMU version of this host (`MAJOR.MINOR.MICRO`).
    pub fn qemu_version(&self) -> &str {
        &self.qemu_version
    }

    pub(crate) fn runtime_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("vms").join(id)
    }

    pub fn console_log(&self, id: &str) -> PathBuf {
        self.runtime_dir(id).join(crate::runtime::CONSOLE_LOG)
    }
    pub fn console_socket(&self, id: &str) -> PathBuf {
        self.runtime_dir(id).join(crate::runtime::CONSOLE_SOCKET)
    }
    pub fn vnc_socket(&self, id: &str) -> PathBuf {
        self.runtime_dir(id).join(crate::runtime::VNC_SOCKET)
    }

    /// The last `n` console lines of a VM (empty when there is no log).
    pub fn console_tail(&self, id: &str, n: usize) -> Vec<String> {
        let Ok(data) = crate::qemu_user::read_file(&self.console_log(id)) else { return vec![] };
        let text = String::from_utf8_lossy(&data);
        let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(n)..].iter().map(|s| s.to_string()).collect()
    }

    /// The VMs this host runs, and those it is receiving.
    pub fn vms(&self) -> Vec<VmReport> {
        let mut v: Vec<VmReport> =
            self.vms.lock().unwrap().iter().map(|(id, vm)| VmReport { id: id.clone(), pid: vm.pid(), incoming: false }).collect();
        v.extend(self.migrations.incoming_ids().into_iter().map(|(id, pid)| VmReport { id, pid, incoming: true }));
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Memory and cpus promised to the VMs this host runs.
    pub fn used(&self) -> (u32, u64) {
        let (ic, im) = self.migrations.incoming_used();
        let vms = self.vms.lock().unwrap();
        vms.values().fold((ic, im), |(c, m), vm| (c + vm.spec().config.cpus, m + vm.spec().config.memory_mib))
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
            network_modes: if self.net.names().is_empty() {
                vec!["user".into(), "tunnel".into()]
            } else {
                vec!["user".into(), "site".into(), "tunnel".into()]
            },
            networks: self.net.names(),
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

    /// For each image this host opened, the fraction of its stored chunks in the cache (a
    /// chunk read in part counts the part: a lazily booted image is held as far as it was read).
    fn image_cache(&self) -> std::collections::BTreeMap<String, f64> {
        let images: Vec<(String, Arc<vgrid_api::Manifest>)> =
            self.images.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let cache = self.proxy.cache();
        images
            .into_iter()
            .map(|(name, m)| {
                let total = m.all_chunks().count();
                let held = cache.held(m.all_chunks());
                (name, if total == 0 { 1.0 } else { held / total as f64 })
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

    /// Destination: gives up an incoming migration (kills its QEMU, removes its directory).
    pub async fn incoming_abort(&self, id: &str) -> Result<(), AgentError> {
        let vm = self.migrations.incoming.lock().unwrap().remove(id);
        if let Some(vm) = vm {
            vm.cleanup().await?;
            self.net.unplug(id);
            self.res.release(id);
            tracing::info!(vm = %id, "incoming migration abandoned");
        }
        Ok(())
    }

    /// Forgets an exited VM and removes what it no longer needs: sockets, overlay, boot files.
    /// The console log stays until [`HostCtx::remove`].
    pub async fn release(&self, id: &str) -> Result<(), AgentError> {
        self.migrations.forget_outgoing(id);
        self.incoming_abort(id).await?;
        let vm = self.vms.lock().unwrap().remove(id);
        if let Some(vm) = vm {
            vm.release_console().await;
            let _ = vm.kill().await;
        }
        self.res.release(id);
        self.net.unplug(id);
        let dir = self.runtime_dir(id);
        // A lazily restored guest's RAM pager ends with it (and its mount with it).
        crate::ram::stop_pager(&dir).await;
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_name() != crate::runtime::CONSOLE_LOG && e.file_name() != crate::runtime::CONSOLE_HISTORY {
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
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok())).unwrap_or(0.0)
}
