//! VM lifecycle: validation, placement on the (local) host, state transitions, failure reasons.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::Mutex;
use vgrid_api::vm::{HostInfo, VmCreate, VmRecord, VmState};
use vgrid_api::ImageRef;
use vgrid_hostagent::agent::{Agent, AgentError, LaunchRequest};
use vgrid_hostagent::ExitInfo;
use vgrid_blockproxy::ProxyError;

use crate::state::{StateError, StateStore};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("{0}")]
    BadRequest(String),
    #[error("unknown image {0}: no image server has it (see `vgrid image ls`)")]
    UnknownImage(String),
    #[error("no VM with id or name {0:?}")]
    UnknownVm(String),
    #[error("{0}")]
    Conflict(String),
    #[error("insufficient capacity: {0}")]
    Capacity(String),
    #[error("image server: {0}")]
    Store(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("host agent: {0}")]
    Agent(#[from] AgentError),
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The coordinator of a single-node grid.
pub struct Coordinator {
    state: Arc<dyn StateStore>,
    agent: Arc<Agent>,
    /// Serialises admission (capacity checks) and state transitions.
    lock: Mutex<()>,
}

impl Coordinator {
    /// Opens the coordinator. VMs recorded as active whose QEMU is gone (the process was not
    /// stopped cleanly) become `failed` with that reason: no VM stays in a transitional state.
    pub async fn new(state: Arc<dyn StateStore>, agent: Arc<Agent>) -> Result<Arc<Self>, CoordinatorError> {
        for mut vm in state.list_vms()? {
            if vm.state.is_active() {
                vm.state = VmState::Failed;
                vm.reason = Some(
                    "the coordinator restarted while this VM was active; its QEMU was not re-adopted"
                        .into(),
                );
                vm.stopped = Some(now());
                state.put_vm(&vm)?;
            }
        }
        Ok(Arc::new(Coordinator { state, agent, lock: Mutex::new(()) }))
    }

    pub fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }

    pub fn hosts(&self) -> Vec<HostInfo> {
        let mut info = self.agent.info();
        let active = self.active_vms();
        let used: u64 = active.iter().map(|v| v.memory_mib).sum();
        info.free_memory_mib = info.memory_mib.saturating_sub(used);
        info.running_vms = active.len() as u32;
        vec![info]
    }

    fn active_vms(&self) -> Vec<VmRecord> {
        self.state.list_vms().unwrap_or_default().into_iter().filter(|v| v.state.is_active()).collect()
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
            _ => Err(CoordinatorError::BadRequest(format!(
                "{key:?} is ambiguous: it matches several VMs; use the full id"
            ))),
        }
    }

    /// Validates a request, records the VM as `pending` and starts it in the background.
    pub async fn create(self: &Arc<Self>, req: VmCreate) -> Result<VmRecord, CoordinatorError> {
        let image: ImageRef =
            req.image.parse().map_err(|e: vgrid_api::ManifestError| CoordinatorError::BadRequest(e.to_string()))?;
        if req.cpus == 0 || req.cpus > 64 {
            return Err(CoordinatorError::BadRequest(format!("cpus {} is out of range 1-64", req.cpus)));
        }
        if req.memory_mib < 32 {
            return Err(CoordinatorError::BadRequest(format!(
                "memory {} MiB is too small: at least 32 MiB",
                req.memory_mib
            )));
        }
        if let Some(a) = &req.accel {
            if a != "kvm" && a != "tcg" {
                return Err(CoordinatorError::BadRequest(format!("accel {a:?}: expected kvm or tcg")));
            }
        }
        if let Some(n) = &req.name {
            vgrid_api::manifest::validate_name(n)
                .map_err(|_| CoordinatorError::BadRequest(format!("invalid VM name {n:?}: use 1-64 characters of A-Z a-z 0-9 . _ -")))?;
        }
        // The image servers the host reads from are the ones that must have the image.
        let manifest = match self.agent.proxy().resolve(&image).await {
            Ok(m) => m,
            Err(ProxyError::ImageNotFound { .. }) => return Err(CoordinatorError::UnknownImage(image.to_string())),
            Err(e) => return Err(CoordinatorError::Store(e.to_string())),
        };

        let _g = self.lock.lock().await;
        let host = self.hosts().remove(0);
        if req.memory_mib > host.memory_mib {
            return Err(CoordinatorError::Capacity(format!(
                "memory {} MiB exceeds what host {} offers ({} MiB)",
                req.memory_mib, host.name, host.memory_mib
            )));
        }
        if req.cpus > host.cpus {
            return Err(CoordinatorError::Capacity(format!(
                "{} cpus exceed what host {} offers ({} cpus)",
                req.cpus, host.name, host.cpus
            )));
        }
        if req.memory_mib > host.free_memory_mib {
            return Err(CoordinatorError::Capacity(format!(
                "memory {} MiB exceeds host {}'s free memory ({} of {} MiB free)",
                req.memory_mib, host.name, host.free_memory_mib, host.memory_mib
            )));
        }
        let active = self.active_vms();
        for f in &req.forwards {
            if active.iter().any(|v| v.forwards.iter().any(|g| g.host == f.host)) {
                return Err(CoordinatorError::Conflict(format!(
                    "host port {} is already forwarded to another VM",
                    f.host
                )));
            }
        }
        let all = self.state.list_vms()?;
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
        let rec = VmRecord {
            id: id.clone(),
            name,
            image: req.image.clone(),
            image_version: Some(manifest.version),
            cpus: req.cpus,
            memory_mib: req.memory_mib,
            forwards: req.forwards.clone(),
            state: VmState::Pending,
            phase: "placing".into(),
            reason: None,
            host: Some(host.name.clone()),
            accel: req.accel.clone(),
            pid: None,
            created: now(),
            started: None,
            stopped: None,
        };
        self.state.put_vm(&rec)?;
        drop(_g);
        tracing::info!(vm = %rec.id, image = %image, "VM accepted");

        let me = self.clone();
        let launch = LaunchRequest {
            id: id.clone(),
            image: ImageRef { name: manifest.name.clone(), version: Some(manifest.version) },
            cpus: req.cpus,
            memory_mib: req.memory_mib,
            forwards: req.forwards.iter().map(|f| (f.host, f.guest)).collect(),
            accel: req.accel.clone(),
        };
        tokio::spawn(async move { me.run(launch).await });
        Ok(rec)
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut VmRecord)) -> Option<VmRecord> {
        let mut rec = self.state.get_vm(id).ok()??;
        f(&mut rec);
        if let Err(e) = self.state.put_vm(&rec) {
            tracing::error!(vm = %id, "cannot record VM state: {e}");
        }
        Some(rec)
    }

    async fn run(self: Arc<Self>, req: LaunchRequest) {
        let id = req.id.clone();
        self.update(&id, |v| {
            v.state = VmState::Starting;
            v.phase = "fetching image".into();
        });
        let me = self.clone();
        let pid_id = id.clone();
        let progress = move |phase: &str| {
            me.update(&pid_id, |v| {
                if v.state == VmState::Starting {
                    v.phase = phase.to_string();
                }
            });
        };
        match self.agent.launch(req, &progress).await {
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
                        tracing::info!(vm = %id, pid = l.pid, accel = %l.accel, "VM running");
                        let exit = self.agent.wait_exit(&id).await;
                        self.exited(&id, exit).await;
                    }
                    Some(_) => {
                        // Stopped while it was starting: it must not keep running.
                        tracing::info!(vm = %id, "VM was stopped while starting; killing it");
                        let _ = self.agent.stop(&id, true).await;
                        let _ = self.agent.release(&id).await;
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
                        let _ = self.agent.stop(&id, true).await;
                        let _ = self.agent.remove(&id).await;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(vm = %id, "VM failed to start: {e}");
                let _ = self.agent.stop(&id, true).await;
                self.update(&id, |v| {
                    v.state = VmState::Failed;
                    v.phase = "failed".into();
                    v.reason = Some(e.to_string());
                    v.stopped = Some(now());
                });
            }
        }
    }

    async fn exited(&self, id: &str, exit: ExitInfo) {
        let console = self.agent.console_tail(id, 10);
        let _ = self.agent.release(id).await;
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
                v.reason = Some(format!(
                    "QEMU exited unexpectedly ({exit}); last console lines:\n{}",
                    console.join("\n")
                ));
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
        self.update(&rec.id, |v| {
            v.state = VmState::Stopping;
            v.phase = "stopping".into();
        });
        self.agent.stop(&rec.id, force).await?;
        // The exit watcher records `stopped`; wait for it briefly so callers see the end state.
        for _ in 0..100 {
            let r = self.get(&rec.id)?;
            if !r.state.is_active() {
                return Ok(r);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // Stopped before it ever ran (still starting): record it here.
        Ok(self
            .update(&rec.id, |v| {
                if v.state.is_active() {
                    v.state = VmState::Stopped;
                    v.phase = "stopped".into();
                    v.stopped = Some(now());
                }
            })
            .unwrap_or(rec))
    }

    /// Removes a VM: stops it if needed and deletes its runtime directory and record.
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
        self.agent.remove(&rec.id).await?;
        self.state.delete_vm(&rec.id)?;
        tracing::info!(vm = %rec.id, "VM removed");
        Ok(rec)
    }

    /// Stops every active VM (used when `vgrid up` shuts down).
    pub async fn shutdown(&self) {
        let vms = self.active_vms();
        let futs = vms.iter().map(|v| self.stop(&v.id, false));
        for (v, r) in vms.iter().zip(futures::future::join_all(futs).await) {
            if let Err(e) = r {
                tracing::warn!(vm = %v.id, "stopping at shutdown: {e}");
            }
        }
    }
}

fn new_id() -> String {
    let b: [u8; 6] = rand::random();
    format!("vm-{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
}
