//! The host agent: one block proxy (NBD on a unix socket, over the host chunk cache) and the
//! QEMU guests of this host, each on a qcow2 overlay backed by the proxy's export.
//!
//! The coordinator (in process for `vgrid up`) asks it to launch, stop and remove VMs; the
//! agent reports each VM's exit. Kernel and initrd of direct-boot images reach the host as
//! chunks through the same cache and are written into the VM's runtime directory.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vgrid_api::host::{HeartbeatReply, HostHeartbeat, PullProgress};
use vgrid_api::{ErrorBody, ImageRef};
use vgrid_blockproxy::{BlockProxy, ProxyConfig, ServerHandle, Servers};

pub use crate::ctx::{AgentConfig, HostCtx};
pub use crate::error::AgentError;
use crate::vm::{ExitInfo, Vm};

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

/// A running host agent: the [`HostCtx`] its features work on, the NBD server's handle, and
/// the loops of the process (sampling, heartbeat). Dereferences to its [`HostCtx`].
pub struct Agent {
    ctx: Arc<HostCtx>,
    nbd: Mutex<Option<ServerHandle>>,
}

impl std::ops::Deref for Agent {
    type Target = HostCtx;
    fn deref(&self) -> &HostCtx {
        &self.ctx
    }
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
        // The image servers the coordinator named last time are read from at once: a guest
        // this agent re-adopts below may be waiting for a chunk before the first heartbeat.
        let mut urls = cfg.image_servers.clone();
        for s in learned_servers(&cfg.data_dir) {
            if !urls.contains(&s) {
                urls.push(s);
            }
        }
        let servers = Arc::new(Servers::from_urls(urls).map_err(AgentError::servers)?);
        let proxy_config =
            ProxyConfig { fetch_timeout: cfg.fetch_timeout, ..ProxyConfig::new(cfg.data_dir.join("cache"), cfg.cache_max_bytes) };
        let proxy = BlockProxy::new(proxy_config, servers.clone())?;
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
        let net = crate::networks::SiteNets::start(cfg.networks.clone())?;
        net.tunnels.allow_direct(cfg.tunnel_direct);
        net.tunnels.poll_answers(cfg.tunnel_poll);
        tracing::info!(host = %cfg.name, accel = accel.as_str(), memory_mib, cpus, nbd = %nbd_socket.display(), "host agent started");
        let ctx = Arc::new(HostCtx {
            cfg,
            servers,
            proxy,
            nbd_socket,
            vms: Mutex::new(HashMap::new()),
            images: Mutex::new(HashMap::new()),
            accel,
            qemu_version,
            memory_mib,
            cpus,
            res,
            migrations: Default::default(),
            qemu_user,
            net,
        });
        spawn_sampler(&ctx);
        // QEMUs an earlier agent of this data directory started keep running: take them back.
        crate::adopt::adopt_all(&ctx).await;
        Ok(Arc::new(Agent { ctx, nbd: Mutex::new(Some(handle)) }))
    }

    /// The context the agent's features work on (for those that outlive a request).
    pub fn ctx(&self) -> &Arc<HostCtx> {
        &self.ctx
    }

    /// Resolves when the VM's QEMU exits.
    pub async fn wait_exit(&self, id: &str) -> ExitInfo {
        match self.vm(id) {
            Some(vm) => crate::adopt::exit_of(&vm, vm.wait_exit().await),
            None => ExitInfo::unknown(),
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
    /// coordinator that does not answer is retried at the same pace. `hb.coordinator` may list
    /// several coordinators of one grid, comma-separated: the agent heartbeats to every one of
    /// them, each at its own pace (so every coordinator knows every host: each places on all
    /// of them, and the leader marks lost those that go silent). The usage reports go to one
    /// coordinator at a time (accounting is a read-modify-write of the VM's row: one writer),
    /// the next one after a failed heartbeat.
    pub async fn heartbeat_loop(self: Arc<Self>, hb: Heartbeat) {
        let urls: Vec<String> = hb.coordinator.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect();
        if let Some(first) = urls.first() {
            self.net.tunnels.connect(first, &self.cfg.name);
        }
        let usage_to = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let beats: Vec<_> = (0..urls.len())
            .map(|i| {
                let hb = Heartbeat { coordinator: urls[i].clone(), ..hb.clone() };
                tokio::spawn(self.clone().beat_one(hb, i, urls.len(), usage_to.clone()))
            })
            .collect();
        // Ends (and ends the beats, aborted with it) when the caller aborts it.
        struct AbortAll(Vec<tokio::task::JoinHandle<()>>);
        impl Drop for AbortAll {
            fn drop(&mut self) {
                self.0.iter().for_each(|t| t.abort());
            }
        }
        let _all = AbortAll(beats);
        std::future::pending::<()>().await;
    }

    /// The heartbeats to coordinator `i` of `n` (`hb.coordinator`); with the usage reports
    /// while `usage_to` names it.
    async fn beat_one(self: Arc<Self>, hb: Heartbeat, i: usize, n: usize, usage_to: Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::Ordering;
        let http = vgrid_trust::tls::client_builder().timeout(Duration::from_secs(10)).build().expect("HTTP client");
        let mut interval = vgrid_api::host::HEARTBEAT_INTERVAL;
        let mut failing = false;
        loop {
            let usage = usage_to.load(Ordering::SeqCst) == i;
            match self.heartbeat_to(&http, &hb, usage).await {
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
                    if usage && n > 1 && usage_to.compare_exchange(i, (i + 1) % n, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                        tracing::warn!(coordinator = %hb.coordinator, "usage reports go to the next coordinator");
                    }
                }
            }
            tokio::time::sleep(hb.interval.unwrap_or(interval)).await;
        }
    }

    /// One heartbeat; returns the coordinator's answer (the interval it asks for, the image
    /// servers it knows).
    pub async fn heartbeat_once(&self, http: &reqwest::Client, hb: &Heartbeat) -> Result<HeartbeatReply, String> {
        self.heartbeat_to(http, hb, true).await
    }

    /// One heartbeat to `hb.coordinator` (one URL), with the usage reports if `usage`.
    async fn heartbeat_to(&self, http: &reqwest::Client, hb: &Heartbeat, usage: bool) -> Result<HeartbeatReply, String> {
        let body = HostHeartbeat {
            ad: self.ad(&hb.url, hb.labels.clone(), hb.policy.clone()),
            vms: self.vms(),
            usage: if usage { self.res.reports() } else { vec![] },
            waiting: crate::waits::vms_waiting(self),
        };
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
        self.net.learn(&reply.networks);
        if !servers.is_empty() && self.servers.set_urls(servers).map_err(|e| AgentError::servers(e).to_string())? {
            remember_servers(&self.cfg.data_dir, &reply.image_servers);
        }
        Ok(reply)
    }

    /// Stops this agent and leaves its guests running for the next agent on the same data
    /// directory to adopt (`crate::adopt`), as a restart for an upgrade wants: every QEMU, its
    /// runtime directory and `launch.json` stay; QEMU's NBD client waits for the next agent's
    /// proxy on the same socket (its reads wait, they do not fail), as after a `kill -9`.
    /// Only what cannot survive the agent is ended: a QEMU still waiting for an incoming
    /// migration (the migration dies with the agent). Boot-profile uploads under way get a few
    /// seconds. Returns how many guests were left running.
    pub async fn leave(&self) -> usize {
        for (id, _) in self.migrations.incoming_ids() {
            let _ = self.incoming_abort(&id).await;
        }
        self.proxy.flush_profiles(Duration::from_secs(3)).await;
        self.res.persist();
        let n = self.vms.lock().unwrap().len();
        tracing::info!(guests = n, "leaving {n} guests running for the next agent to adopt");
        n
    }

    /// Kills any guest still running (the coordinator stops them gracefully first) and stops
    /// serving NBD: the end of `vgrid up`, where the guests go with the machine's only agent.
    /// The boot profiles being recorded are uploaded (their guests have ended) within seconds.
    pub async fn shutdown(&self) {
        for (id, _) in self.migrations.incoming_ids() {
            let _ = self.incoming_abort(&id).await;
        }
        let ids: Vec<String> = self.vms.lock().unwrap().keys().cloned().collect();
        for id in ids {
            let _ = self.stop(&id, false).await;
            let _ = crate::volume::release(self, &id).await;
        }
        let h = self.nbd.lock().unwrap().take();
        if let Some(h) = h {
            h.shutdown().await;
        }
        // The guests have ended: their boots' profiles are complete, upload them now rather
        // than lose them with the process.
        self.proxy.finish_recordings();
        self.proxy.flush_profiles(Duration::from_secs(5)).await;
        self.proxy.shutdown();
        self.res.shutdown();
        let _ = std::fs::remove_file(&self.nbd_socket);
    }
}

/// Load and usage sampling, every second (disk counters every 5 s), while the context lives.
fn spawn_sampler(ctx: &Arc<HostCtx>) {
    let weak = Arc::downgrade(ctx);
    tokio::spawn(async move {
        let mut slow_in = 0u32;
        let mut pager_files = HashMap::new();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(a) = weak.upgrade() else { break };
            let vms: Vec<Arc<Vm>> = a.vms.lock().unwrap().values().cloned().collect();
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

/// Where the agent keeps the image servers the coordinator named last (in its data directory).
const LEARNED_SERVERS: &str = "image-servers.json";

/// The image servers the coordinator named at the last heartbeat of an earlier run (none when
/// unknown or unreadable: the first heartbeat names them again).
fn learned_servers(data_dir: &Path) -> Vec<String> {
    let path = data_dir.join(LEARNED_SERVERS);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), "ignoring the image servers learned earlier: {e}");
            vec![]
        }),
        Err(_) => vec![],
    }
}

/// Records the image servers the coordinator named (written whole, then renamed into place).
fn remember_servers(data_dir: &Path, urls: &[String]) {
    let path = data_dir.join(LEARNED_SERVERS);
    let r = serde_json::to_vec(urls).map_err(std::io::Error::other).and_then(|b| crate::qemu_user::replace_file(&path, &b));
    if let Err(e) = r {
        tracing::warn!(path = %path.display(), "cannot record the image servers: {e}");
    }
}
