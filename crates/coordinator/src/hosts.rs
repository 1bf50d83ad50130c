//! The information service: hosts and image servers register by heartbeat and advertise what
//! they offer; a host that misses heartbeats becomes `lost`. Also the coordinator's HTTP client
//! of a host agent (`/host/v1`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vgrid_api::grid::{HostAd, HostRecord, HostState, ImageServerAd};
use vgrid_api::host::{HostHeartbeat, LaunchRequest, Launched, VmExit, VmPresence, VmReport};
use vgrid_api::vm::{ConsoleChunk, VmStop};
use vgrid_api::ErrorBody;

struct HostEntry {
    ad: HostAd,
    state: HostState,
    last_seen: Instant,
    vms: Vec<VmReport>,
    orphans: Vec<String>,
}

struct ServerEntry {
    ad: ImageServerAd,
    last_seen: Instant,
}

/// Hosts and image servers, kept in memory (hosts re-register within one heartbeat after a
/// coordinator restart; image servers' registrations are also written in the state store by
/// the coordinator and read back when it opens, so that a restarted coordinator can resolve
/// images before their next heartbeat).
pub struct Registry {
    hosts: Mutex<HashMap<String, HostEntry>>,
    servers: Mutex<HashMap<String, ServerEntry>>,
    /// Image servers configured by URL rather than registered (they need not heartbeat).
    fixed_servers: Mutex<Vec<String>>,
    pub interval: Duration,
    pub lost_after: Duration,
}

impl Registry {
    pub fn new(interval: Duration, lost_after: Duration) -> Self {
        Registry {
            hosts: Mutex::new(HashMap::new()),
            servers: Mutex::new(HashMap::new()),
            fixed_servers: Mutex::new(Vec::new()),
            interval,
            lost_after,
        }
    }

    /// Records a host heartbeat; returns whether the host was lost (or unknown) before.
    pub fn host_beat(&self, hb: HostHeartbeat) -> bool {
        let mut hosts = self.hosts.lock().unwrap();
        let returned = hosts.get(&hb.ad.name).map(|h| h.state == HostState::Lost).unwrap_or(true);
        let orphans = hosts.get(&hb.ad.name).map(|h| h.orphans.clone()).unwrap_or_default();
        hosts.insert(hb.ad.name.clone(), HostEntry { ad: hb.ad, state: HostState::Ready, last_seen: Instant::now(), vms: hb.vms, orphans });
        returned
    }

    /// Records the orphans found at a host's last heartbeat; logs when they change.
    pub fn set_orphans(&self, host: &str, orphans: Vec<String>) {
        if let Some(h) = self.hosts.lock().unwrap().get_mut(host) {
            if h.orphans != orphans {
                if !orphans.is_empty() {
                    tracing::warn!(host, ?orphans, "host runs QEMUs the coordinator has no record of (orphans; not killed)");
                }
                h.orphans = orphans;
            }
        }
    }

    /// Records an image server's heartbeat; returns whether it is new or moved (its URL
    /// changed), i.e. whether its registration must be written down again.
    pub fn server_beat(&self, ad: ImageServerAd) -> bool {
        let old = self.servers.lock().unwrap().insert(ad.name.clone(), ServerEntry { ad: ad.clone(), last_seen: Instant::now() });
        old.is_none_or(|o| o.ad.url != ad.url)
    }

    /// Marks hosts silent for longer than `lost_after` as lost; returns the newly lost names.
    pub fn sweep(&self) -> Vec<String> {
        let mut lost = Vec::new();
        for (name, h) in self.hosts.lock().unwrap().iter_mut() {
            if h.state == HostState::Ready && h.last_seen.elapsed() > self.lost_after {
                h.state = HostState::Lost;
                lost.push(name.clone());
            }
        }
        lost
    }

    /// Forgets image servers silent for longer than `lost_after`; returns their names.
    pub fn sweep_servers(&self) -> Vec<String> {
        let mut gone = Vec::new();
        self.servers.lock().unwrap().retain(|name, s| {
            let keep = s.last_seen.elapsed() <= self.lost_after;
            if !keep {
                gone.push(name.clone());
            }
            keep
        });
        gone
    }

    pub fn hosts(&self) -> Vec<HostRecord> {
        let mut v: Vec<HostRecord> = self
            .hosts
            .lock()
            .unwrap()
            .values()
            .map(|h| HostRecord {
                ad: h.ad.clone(),
                state: h.state,
                last_seen_secs: h.last_seen.elapsed().as_secs_f64(),
                vms: h.vms.clone(),
                orphans: h.orphans.clone(),
                // The registry knows heartbeats only; the coordinator adds its drains.
                draining: false,
            })
            .collect();
        v.sort_by(|a, b| a.ad.name.cmp(&b.ad.name));
        v
    }

    pub fn host(&self, name: &str) -> Option<HostRecord> {
        self.hosts().into_iter().find(|h| h.ad.name == name)
    }

    pub fn image_servers(&self) -> Vec<ImageServerAd> {
        let mut v: Vec<ImageServerAd> = self.servers.lock().unwrap().values().map(|s| s.ad.clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Adds image servers known by URL (e.g. `--image-server`), tried after registered ones.
    pub fn add_fixed_servers(&self, urls: impl IntoIterator<Item = String>) {
        let mut f = self.fixed_servers.lock().unwrap();
        for u in urls {
            if !f.contains(&u) {
                f.push(u);
            }
        }
    }

    /// Registered image servers, then fixed ones.
    pub fn image_server_urls(&self) -> Vec<String> {
        let mut urls: Vec<String> = self.image_servers().into_iter().map(|s| s.url).collect();
        for u in self.fixed_servers.lock().unwrap().iter() {
            if !urls.contains(u) {
                urls.push(u.clone());
            }
        }
        urls
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostCallError {
    #[error("host {host} ({url}) is unreachable: {source}")]
    Unreachable {
        host: String,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// An answer that is not the JSON expected.
    #[error("host {host} ({url}) is unreachable: malformed answer: {source}")]
    Malformed {
        host: String,
        url: String,
        #[source]
        source: serde_json::Error,
    },
    /// No answer body where one was expected (`what`: the request).
    #[error("host {host} ({url}) is unreachable: empty answer to {what}")]
    Empty { host: String, url: String, what: &'static str },
    #[error("host {host} refused (HTTP {status}): {message}")]
    Refused { host: String, status: u16, message: String },
}

/// HTTP client of one host agent.
#[derive(Clone)]
pub struct HostClient {
    pub name: String,
    pub url: String,
    pub(crate) http: reqwest::Client,
}

impl HostClient {
    pub fn new(name: &str, url: &str, http: reqwest::Client) -> Self {
        HostClient { name: name.into(), url: url.trim_end_matches('/').into(), http }
    }

    pub(crate) async fn call<T: serde::de::DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<Option<T>, HostCallError> {
        let unreachable = |source| HostCallError::Unreachable { host: self.name.clone(), url: self.url.clone(), source };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(unreachable)?;
        if !status.is_success() {
            let message =
                serde_json::from_slice::<ErrorBody>(&body).map(|e| e.error).unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(HostCallError::Refused { host: self.name.clone(), status: status.as_u16(), message });
        }
        if body.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&body).map(Some).map_err(|source| HostCallError::Malformed {
            host: self.name.clone(),
            url: self.url.clone(),
            source,
        })
    }

    /// The error of an answer without the body `what` (a request) should have had.
    pub(crate) fn empty(&self, what: &'static str) -> HostCallError {
        HostCallError::Empty { host: self.name.clone(), url: self.url.clone(), what }
    }

    pub(crate) fn u(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Gives the agent a one-time ticket for a direct tunnel connection (refused by a host
    /// that takes none).
    pub async fn tunnel_ticket(&self, t: &vgrid_api::tunnel::DirectTicket) -> Result<(), HostCallError> {
        self.call::<serde_json::Value>(self.http.post(self.u("/host/v1/tunnels/tickets")).json(t)).await?;
        Ok(())
    }

    pub async fn launch(&self, req: &LaunchRequest) -> Result<Launched, HostCallError> {
        let r: Option<Launched> = self.call(self.http.post(self.u("/host/v1/vms")).json(req)).await?;
        r.ok_or_else(|| self.empty("launch"))
    }

    pub async fn stop(&self, id: &str, force: bool) -> Result<(), HostCallError> {
        self.call::<serde_json::Value>(self.http.post(self.u(&format!("/host/v1/vms/{id}/stop"))).json(&VmStop { force })).await?;
        Ok(())
    }

    /// Long poll until the VM's QEMU exits.
    pub async fn wait(&self, id: &str) -> Result<VmExit, HostCallError> {
        let r: Option<VmExit> = self.call(self.http.get(self.u(&format!("/host/v1/vms/{id}/wait")))).await?;
        r.ok_or_else(|| self.empty("wait"))
    }

    /// Whether the host is saving VM `id` now, whether its QEMU runs (or ran and exited) and
    /// whether the host knows the VM at all (`None`: no answer).
    pub async fn saving(&self, id: &str) -> Option<VmPresence> {
        self.call(self.http.get(self.u(&format!("/host/v1/vms/{id}/saving")))).await.ok()?
    }

    pub async fn release(&self, id: &str) -> Result<(), HostCallError> {
        self.call::<serde_json::Value>(self.http.post(self.u(&format!("/host/v1/vms/{id}/release")))).await?;
        Ok(())
    }

    /// Commits volume `name` of the running VM `id` (the guest paused while its writes are read).
    pub async fn commit_volume(&self, id: &str, name: &str) -> Result<vgrid_api::volume::VolumeCommitted, HostCallError> {
        let r = self.call(self.http.post(self.u(&format!("/host/v1/vms/{id}/volumes/{name}/commit")))).await?;
        r.ok_or_else(|| self.empty("volume commit"))
    }

    pub async fn remove(&self, id: &str) -> Result<(), HostCallError> {
        self.call::<serde_json::Value>(self.http.delete(self.u(&format!("/host/v1/vms/{id}")))).await?;
        Ok(())
    }

    pub async fn console(&self, id: &str, offset: i64) -> Result<ConsoleChunk, HostCallError> {
        let r: Option<ConsoleChunk> = self.call(self.http.get(self.u(&format!("/host/v1/vms/{id}/console?offset={offset}")))).await?;
        Ok(r.unwrap_or(ConsoleChunk { offset: 0, next: 0, data: String::new() }))
    }

    pub fn stream_ws_url(&self, id: &str, stream: &str) -> String {
        format!("{}/host/v1/vms/{id}/{stream}/ws", self.url.replacen("http", "ws", 1))
    }
}
