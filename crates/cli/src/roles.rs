//! Role launchers: `vgrid up`, `vgrid coordinator`, `vgrid image-server`, `vgrid host` and
//! `vgrid image nbd` (a block proxy in the foreground). User commands live in their own files.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use std::time::Duration;
use vgrid_api::ImageRef;
use vgrid_coordinator::hosts::Registry;
use vgrid_coordinator::join::Joins;
use vgrid_coordinator::state::{RecordStore, StateConfig};
use vgrid_coordinator::Coordinator;
use vgrid_hostagent::agent::{Agent, AgentConfig, Heartbeat};
use vgrid_imagestore::store::ImageStore;
use vgrid_storeclient::StoreClient;
use vgrid_trust::node::JoinToken;
use vgrid_trust::tls::ProcessTls;
use vgrid_trust::{Ca, NodeCert, NodeRole};

use crate::output::{bytes, parse_size};
use crate::store::{use_store_token, ServerArg};
use crate::Ctx;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Data directory: images, host cache, VM runtime directories, state.
    #[arg(long, env = "VGRID_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the REST API (and of the embedded image server and host agent).
    #[arg(long, env = "VGRID_LISTEN", default_value = crate::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub host: HostOpts,
    #[command(flatten)]
    pub beats: BeatOpts,
    #[command(flatten)]
    pub users: UserOpts,
    #[command(flatten)]
    pub tls: TlsOpts,
    #[command(flatten)]
    pub metrics: MetricsOpts,
}

/// Where a role serves its Prometheus metrics.
#[derive(Args, Debug, Clone, Default)]
pub struct MetricsOpts {
    /// Serve Prometheus metrics at http://ADDR/metrics: plain HTTP with no authentication, on
    /// this address only (never on the API port), so bind it to loopback or a management
    /// network [default: no metrics listener].
    #[arg(long, env = "VGRID_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

impl MetricsOpts {
    /// Starts the listener when asked for; says where on stderr.
    async fn serve(&self) -> anyhow::Result<()> {
        if let Some(addr) = self.metrics_listen {
            let bound = vgrid_trust::metrics::serve(addr).await.with_context(|| format!("serving metrics on {addr}"))?;
            eprintln!("metrics at http://{bound}/metrics");
        }
        Ok(())
    }
}

/// TLS names of a role (every role serves HTTPS with a certificate of the grid CA).
#[derive(Args, Debug, Clone, Default)]
pub struct TlsOpts {
    /// An extra DNS name or IP address clients reach this role by, put in its certificate
    /// (repeatable); localhost, 127.0.0.1, ::1, the hostname, the listen and advertised
    /// addresses are always in it.
    #[arg(long = "tls-san", value_delimiter = ',')]
    pub sans: Vec<String>,
}

/// Users of a coordinator (`vgrid up`, `vgrid coordinator`).
#[derive(Args, Debug, Clone)]
pub struct UserOpts {
    /// Name of the first admin, created when the coordinator has no users [default: your
    /// login name].
    #[arg(long)]
    pub admin: Option<String>,
    /// The first admin's public key [default: your SSH key, or an ed25519 key made for you in
    /// ~/.config/vgrid].
    #[arg(long)]
    pub admin_key: Option<PathBuf>,
    /// How long a login token is valid, in seconds.
    #[arg(long, default_value_t = 12 * 3600)]
    pub token_ttl: u64,
}

impl UserOpts {
    /// Users and the audit log (`audit.log` in `data`), with the first admin made if needed.
    async fn open(&self, records: RecordStore, data: &Path) -> anyhow::Result<Arc<vgrid_coordinator::auth::Auth>> {
        let auth = vgrid_coordinator::auth::Auth::new(records, Some(data.join("audit.log")), Duration::from_secs(self.token_ttl))
            .await
            .map_err(|e| anyhow!("opening users: {e}"))?;
        crate::auth::bootstrap(&auth, self.admin.clone(), self.admin_key.clone()).await?;
        Ok(auth)
    }
}

/// Options of a compute host (`vgrid host`, and the one inside `vgrid up`).
#[derive(Args, Debug, Clone)]
pub struct HostOpts {
    /// Host name advertised to the coordinator [default: the machine's hostname].
    #[arg(long = "name", env = "VGRID_HOST_NAME")]
    pub name: Option<String>,
    /// Host chunk cache size bound.
    #[arg(long, default_value = "20G", value_parser = parse_size)]
    pub cache_size: u64,
    /// Memory the host offers to guests, in MiB [default: 3/4 of physical memory]; also the
    /// memory limit of the cgroup holding all guests.
    #[arg(long)]
    pub max_memory: Option<u64>,
    /// The owner's CPU cap: the fraction (0-1] of this machine's CPU time all guests together
    /// may use, enforced by a parent cgroup; CPU reservations beyond it are refused
    /// [default: uncapped].
    #[arg(long, env = "VGRID_MAX_SHARE", value_parser = parse_share)]
    pub max_share: Option<f64>,
    /// vCPUs the host offers to guests [default: 4 per CPU].
    #[arg(long)]
    pub max_cpus: Option<u32>,
    /// Image servers this host reads from first, in order (repeatable); then those the
    /// coordinator announces.
    #[arg(long = "image-server", env = "VGRID_IMAGE_SERVERS", value_delimiter = ',')]
    pub image_servers: Vec<String>,
    /// A label advertised for matchmaking, KEY=VALUE (repeatable), e.g. site=uf.
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// The owner's requirement over requests, a CEL expression over `request`
    /// (e.g. 'request.cpus <= 2').
    #[arg(long)]
    pub policy: Option<String>,
    /// The unprivileged user each guest's QEMU runs as when this runs as root (a system user
    /// with no login shell and no home; created if missing). Ignored when not root: QEMU then
    /// runs as the agent's own user.
    #[arg(long, env = "VGRID_QEMU_USER", default_value = vgrid_hostagent::DEFAULT_QEMU_USER)]
    pub qemu_user: String,
    /// How long a guest's read (of its disk, or of a restored guest's RAM) waits for an
    /// unreachable image server before the guest gets an I/O error: 90s, 10m, 2h, ...; `never`
    /// (or 0) waits for ever, like an NFS hard mount. Meanwhile every image server holding the
    /// image is tried again (backoff 0.2 s doubling to 5 s); the log, `vgrid image cache stats`
    /// and the VM's phase say what waits. Corrupt bytes fail the read at once.
    #[arg(long, env = "VGRID_FETCH_TIMEOUT", default_value = "10m", value_parser = crate::output::parse_bound)]
    pub fetch_timeout: Duration,
    /// Attach this host to site network NAME (defined by `vgrid net create`) through bridge
    /// BRIDGE, e.g. `farm=br0`; repeatable. The bridge is made if missing (then attach your
    /// uplink to it yourself: vgrid never touches a link it did not make). Guests on NAME get a
    /// tap on BRIDGE, the address the coordinator leased them by DHCP from this host, and a
    /// filter that drops frames with any other MAC or address. Needs root and nftables.
    #[arg(long = "network", value_name = "NAME=BRIDGE", value_parser = parse_network)]
    pub networks: Vec<(String, String)>,
    /// Whether users' `vgrid tunnel` may connect to this host's API directly (with a one-time
    /// ticket from the coordinator) to carry their tunnel networks' frames without the
    /// coordinator's relay: `on`, or `off` for a host users cannot reach (its guests' frames
    /// then always go through the relay).
    #[arg(long, default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub tunnel_direct: bool,
    /// Microseconds a guest's tunnel interface waits awake for the guest's answer after
    /// handing it frames, instead of sleeping until it comes: saves a wake-up of this agent per
    /// round trip (~0.1 ms on a VM), at the price of up to this much CPU per answered batch
    /// (one interface of the host at a time; after an unanswered wait, none for 100 ms).
    /// 0 turns it off.
    #[arg(long, value_name = "US", default_value_t = vgrid_api::tunnel::DEFAULT_POLL_US)]
    pub tunnel_poll_us: u64,
}

/// Heartbeat timing of the coordinator (`vgrid coordinator`, `vgrid up`).
#[derive(Args, Debug, Clone)]
pub struct BeatOpts {
    /// Seconds between heartbeats that hosts and image servers are asked for.
    #[arg(long, default_value_t = vgrid_api::host::HEARTBEAT_INTERVAL.as_secs())]
    pub heartbeat_interval: u64,
    /// Missed heartbeats after which a host is `lost`.
    #[arg(long, default_value_t = vgrid_api::host::LOST_AFTER_BEATS)]
    pub lost_after_beats: u32,
}

impl BeatOpts {
    fn registry(&self) -> Arc<Registry> {
        let i = Duration::from_secs(self.heartbeat_interval.max(1));
        Arc::new(Registry::new(i, i * self.lost_after_beats.max(1)))
    }
}

fn parse_share(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("invalid share {s:?}: expected a fraction such as 0.5"))?;
    if !(v > 0.0 && v <= 1.0) {
        return Err(format!("share {s} is out of range: more than 0, at most 1 (the whole machine)"));
    }
    Ok(v)
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("invalid label {s:?}: expected KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("invalid label {s:?}: empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// Address of the REST API.
    #[arg(long, env = "VGRID_LISTEN", default_value = crate::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Where the coordinator keeps its state.
    #[arg(long, env = "VGRID_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The state store: `redb` (the file state.redb in the data directory) or
    /// `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` (an etcd cluster several coordinators can
    /// share; prefix `vgrid` by default).
    #[arg(long, env = "VGRID_STATE", default_value = "redb")]
    pub state: String,
    /// With an etcd state: the TTL in seconds of the lease of this coordinator's candidacy in
    /// the leader election (a killed leader is replaced within it).
    #[arg(long, default_value_t = 5)]
    pub leader_ttl: u64,
    #[command(flatten)]
    pub beats: BeatOpts,
    #[command(flatten)]
    pub users: UserOpts,
    /// Image servers known by URL, besides those that register (repeatable).
    #[arg(long = "image-server", value_delimiter = ',')]
    pub image_servers: Vec<String>,
    #[command(flatten)]
    pub tls: TlsOpts,
    #[command(flatten)]
    pub metrics: MetricsOpts,
}

#[derive(Args, Debug)]
pub struct HostAgentArgs {
    /// The coordinator to register with (runs a host agent); several of one grid,
    /// comma-separated: joined through the first that answers, heartbeats to every one.
    #[arg(long, env = "VGRID_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Address of this host agent's API.
    #[arg(long, default_value = "127.0.0.1:7072")]
    pub listen: SocketAddr,
    /// URL the coordinator reaches this host at [default: https://LISTEN].
    #[arg(long)]
    pub advertise_url: Option<String>,
    /// Data directory: host cache and VM runtime directories.
    #[arg(long, env = "VGRID_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// One-time token to join the grid with (`vgrid join-token create --role host` on the
    /// coordinator); needed on the first start only, the certificate is kept in DATA/tls.
    #[arg(long, env = "VGRID_JOIN_TOKEN")]
    pub join_token: Option<String>,
    #[command(flatten)]
    pub tls: TlsOpts,
    #[command(flatten)]
    pub metrics: MetricsOpts,
    #[command(flatten)]
    pub host: HostOpts,
}

#[derive(Args, Debug)]
pub struct ImageServerArgs {
    /// Address to serve the image server's HTTP API on.
    #[arg(long, env = "VGRID_LISTEN", default_value = "127.0.0.1:7071")]
    pub listen: SocketAddr,
    /// Where images and chunks are stored (and, with --store, only this server's certificates).
    #[arg(long, env = "VGRID_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Keep images and chunks in an S3 bucket instead of DATA/images: s3://BUCKET[/PREFIX].
    /// Several image servers may share one bucket (upload pins and the garbage-collection
    /// lease are kept in it). Credentials and region come from AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION (or the instance's role); the server must honour
    /// conditional writes, which is checked at start.
    #[arg(long, env = "VGRID_STORE", value_name = "s3://BUCKET[/PREFIX]")]
    pub store: Option<vgrid_imagestore::shared::S3Location>,
    /// The S3 endpoint of an S3-compatible server (e.g. http://127.0.0.1:8333) [default:
    /// $AWS_ENDPOINT_URL, else AWS].
    #[arg(long, requires = "store", value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// A coordinator to advertise this server's images to; several of one grid,
    /// comma-separated: joined through the first that answers, advertised to every one.
    #[arg(long, env = "VGRID_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Name advertised to the coordinator [default: hostname:port].
    #[arg(long)]
    pub name: Option<String>,
    /// URL hosts reach this server at [default: https://LISTEN].
    #[arg(long)]
    pub advertise_url: Option<String>,
    /// One-time token to join the coordinator's grid with (`vgrid join-token create --role
    /// image-server`); needed on the first start only. Without --coordinator the server makes
    /// its own CA instead.
    #[arg(long, env = "VGRID_JOIN_TOKEN")]
    pub join_token: Option<String>,
    #[command(flatten)]
    pub tls: TlsOpts,
    #[command(flatten)]
    pub metrics: MetricsOpts,
}

/// The data directory given (`--data-dir`), else the default's `sub` directory, as an absolute
/// path: QEMU and the helpers it is handed to (sockets, overlays) run in other directories.
fn data_dir(given: Option<PathBuf>, sub: Option<&str>) -> anyhow::Result<PathBuf> {
    let d = given.unwrap_or_else(|| match sub {
        Some(s) => default_data_dir().join(s),
        None => default_data_dir(),
    });
    std::path::absolute(&d).with_context(|| format!("data directory {}: cannot make it absolute", d.display()))
}

/// `$VGRID_DATA_DIR`, else `$XDG_DATA_HOME/vgrid`, else `/var/lib/vgrid` for root (QEMU runs
/// as an unprivileged user that must reach the data, and cannot search /root), else
/// `~/.local/share/vgrid`.
fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("vgrid");
    }
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/vgrid");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/lib"));
    home.join(".local/share/vgrid")
}

fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("vgrid");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/cache"));
    home.join(".cache/vgrid")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Prints the line scripts wait for, ignoring a closed stdout.
fn announce(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn bind(addr: SocketAddr) -> anyhow::Result<(tokio::net::TcpListener, String)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} (is another vgrid running? use --listen)"))?;
    let url = format!("https://{}", listener.local_addr()?);
    Ok((listener, url))
}

/// The names a role's certificate is valid for.
fn sans_for(listen: SocketAddr, extra: &[String], advertise: Option<&str>) -> Vec<String> {
    let mut v: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into(), hostname()];
    if !listen.ip().is_unspecified() {
        v.push(listen.ip().to_string());
    }
    if let Some(h) =
        advertise.and_then(|a| reqwest::Url::parse(a).ok()).and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_string()))
    {
        v.push(h);
    }
    v.extend(extra.iter().cloned());
    v.sort();
    v.dedup();
    v
}

/// A role that holds a CA (a coordinator, `vgrid up`, a standalone image server): the CA in
/// `dir` (made on first start; an operator may put an existing `ca.crt` and `ca.key` there)
/// and a fresh certificate for this process.
fn own_ca(dir: &Path, name: &str, roles: &[NodeRole], sans: Vec<String>) -> anyhow::Result<(Ca, NodeCert)> {
    let ca = Ca::load_or_create(dir, name).map_err(|e| anyhow!("the grid CA: {e}"))?;
    let node = ca.issue_local(name, roles, &sans).map_err(|e| anyhow!("this node's certificate: {e}"))?;
    Ok((ca, node))
}

/// This process's certificate for all its clients and the local CLI's pin of `url`.
fn use_node_cert(node: &NodeCert, pin_url: Option<&str>) -> anyhow::Result<()> {
    vgrid_trust::tls::install(ProcessTls { ca_pem: node.ca_pem.clone(), identity: Some(node.clone()) });
    if let Some(u) = pin_url {
        crate::trust::pin(u, &node.ca_pem)?;
    }
    Ok(())
}

/// A host's or image server's certificate: the one kept in DATA/tls, or a new one got by
/// joining the grid of `coordinator` with `token`. A kept certificate that is not valid for
/// one of `sans` (the role now listens on, or is advertised at, another address) is renewed
/// through the coordinator, which the kept certificate authenticates to; if that fails, the
/// token joins again, and without one the role refuses to start, naming the addresses.
async fn joined_cert(
    data: &Path,
    coordinator: &str,
    token: Option<&str>,
    role: NodeRole,
    name: &str,
    sans: Vec<String>,
) -> anyhow::Result<NodeCert> {
    let dir = data.join("tls");
    if let Some(n) = NodeCert::load(&dir).map_err(|e| anyhow!("{e}"))? {
        let p = n.peer().map_err(|e| anyhow!("{e}"))?;
        if p.name != name || !p.is(role) {
            bail!(
                "{} holds the certificate of {} as {:?}, not of {role} {name}: use another --data-dir, or remove {} and join again",
                dir.display(),
                p.name,
                p.roles,
                dir.display()
            );
        }
        let missing = n.missing_names(&sans).map_err(|e| anyhow!("{}: {e}", dir.join("node.crt").display()))?;
        if missing.is_empty() {
            return Ok(n);
        }
        let have = n.names().unwrap_or_default().join(", ");
        eprintln!(
            "the certificate in {} is valid for {have}, not for {}: asking {coordinator} for one that is",
            dir.display(),
            missing.join(", ")
        );
        match vgrid_trust::node::renew(coordinator, &n, &sans).await {
            Ok(renewed) => {
                renewed.save(&dir).map_err(|e| anyhow!("{e}"))?;
                eprintln!("renewed the certificate of {role} {name} for {} (in {})", sans.join(", "), dir.display());
                return Ok(renewed);
            }
            Err(e) if token.is_none() => bail!(
                "this {role} listens on or is advertised at {}, which its certificate ({}, valid for {have}) does not name, and it could not get a new one: {e}. Start it where the coordinator can be reached, give --join-token to join again, or use the old address",
                missing.join(", "),
                dir.join("node.crt").display()
            ),
            Err(e) => eprintln!("renewing the certificate failed ({e}); joining again with the join token"),
        }
    }
    let Some(token) = token else {
        bail!("this {role} has not joined the grid yet: give --join-token (made on the coordinator by `vgrid join-token create --role {role}`)");
    };
    let token: JoinToken = token.parse().map_err(|e| anyhow!("{e}"))?;
    let n = vgrid_trust::node::join(coordinator, &token, role, name, &sans).await.map_err(|e| anyhow!("{e}"))?;
    n.save(&dir).map_err(|e| anyhow!("{e}"))?;
    eprintln!("joined the grid of {coordinator} as {role} {name} (certificate in {})", dir.display());
    Ok(n)
}

/// `on` or `off`.
fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?}: expected on or off")),
    }
}

/// `NAME=BRIDGE` of `--network`.
fn parse_network(s: &str) -> Result<(String, String), String> {
    let (n, b) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected NAME=BRIDGE, e.g. farm=br0"))?;
    vgrid_api::net::check_network_name(n).map_err(|e| e.to_string())?;
    let ok = !b.is_empty() && b.len() <= 15 && b.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c));
    if !ok {
        return Err(format!("bridge {b:?}: expected a Linux interface name (1-15 of a-z, A-Z, 0-9, '-', '_', '.')"));
    }
    Ok((n.to_string(), b.to_string()))
}

async fn start_agent(data: &std::path::Path, o: &HostOpts, extra_servers: Vec<String>) -> anyhow::Result<Arc<Agent>> {
    Agent::start(AgentConfig {
        name: o.name.clone().unwrap_or_else(hostname),
        data_dir: data.to_path_buf(),
        image_servers: o.image_servers.iter().cloned().chain(extra_servers).collect(),
        cache_max_bytes: o.cache_size,
        max_memory_mib: o.max_memory,
        max_cpus: o.max_cpus,
        max_share: o.max_share,
        qemu_user: o.qemu_user.clone(),
        fetch_timeout: (!o.fetch_timeout.is_zero()).then_some(o.fetch_timeout),
        networks: o.networks.iter().cloned().collect(),
        tunnel_direct: o.tunnel_direct,
        tunnel_poll: std::time::Duration::from_micros(o.tunnel_poll_us),
    })
    .await
    .map_err(|e| anyhow!("starting the host agent: {e}"))
}

fn heartbeat(o: &HostOpts, coordinator: &str, url: &str) -> Heartbeat {
    Heartbeat {
        coordinator: coordinator.to_string(),
        url: url.to_string(),
        labels: o.labels.iter().cloned().collect(),
        policy: o.policy.clone(),
        interval: None,
    }
}

/// The coordinator's state in `data` (`state.redb`).
fn open_state(data: &Path) -> anyhow::Result<vgrid_coordinator::state::State> {
    vgrid_coordinator::state::open(&StateConfig::Redb(data.join("state.redb"))).map_err(|e| anyhow!("{e}"))
}

/// The coordinator on `state`, with the recovery of what its previous run left half-done
/// started (queued VMs queued again, interrupted resumes, suspends and migrations settled).
async fn open_coordinator(state: &vgrid_coordinator::state::State, registry: Arc<Registry>) -> anyhow::Result<Arc<Coordinator>> {
    let coord = Coordinator::new(state.clone(), registry).await.map_err(|e| anyhow!("{e}"))?;
    coord.recover_interrupted().await.map_err(|e| anyhow!("{e}"))?;
    Ok(coord)
}

pub async fn up(a: UpArgs) -> anyhow::Result<ExitCode> {
    let data = data_dir(a.data_dir, None)?;
    std::fs::create_dir_all(&data).with_context(|| format!("creating data directory {}", data.display()))?;
    let (listener, url) = bind(a.listen).await?;
    let state = open_state(&data)?;
    let name = a.host.name.clone().unwrap_or_else(hostname);
    let roles = [NodeRole::Coordinator, NodeRole::Host, NodeRole::ImageServer];
    let (ca, node) = own_ca(&data.join("tls"), &name, &roles, sans_for(a.listen, &a.tls.sans, None))?;
    use_node_cert(&node, Some(&url))?;
    let joins = Arc::new(Joins::new(ca, state.records()));

    let store = Arc::new(ImageStore::open_local(data.join("images")).map_err(|e| anyhow!("opening the image store: {e}"))?);
    let agent = start_agent(&data.join("host"), &a.host, vec![url.clone()]).await?;
    let registry = a.beats.registry();
    registry.add_fixed_servers(a.host.image_servers.iter().cloned());
    let auth = a.users.open(state.records(), &data).await?;
    let coord = open_coordinator(&state, registry.clone()).await?;
    vgrid_coordinator::metrics::init(&coord);
    vgrid_blockproxy::metrics::init();
    a.metrics.serve().await?;

    let users: vgrid_trust::caller::Users = auth.clone();
    let app = vgrid_coordinator::http::router(coord.clone(), auth, Some(joins))
        .merge(vgrid_imagestore::server::router_with(store.clone(), Some(users.clone())))
        .merge(vgrid_hostagent::http::router(agent.clone(), Some(users)));
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopped = stop.clone();
    let server = tokio::spawn(vgrid_trust::tls::serve(listener, node, app, async move { stopped.notified().await }));
    // The embedded image server and host register like remote ones would.
    let interval = registry.interval;
    let adv = tokio::spawn(vgrid_imagestore::server::advertise_loop(store, url.clone(), "local".into(), url.clone(), interval));
    let beat = tokio::spawn(agent.clone().heartbeat_loop(heartbeat(&a.host, &url, &url)));
    let t0 = std::time::Instant::now();
    while (registry.host(agent.name()).is_none() || registry.image_servers().is_empty()) && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    announce(&format!("vgrid is up: API at {url} (data in {})", data.display()));
    eprintln!("  try: VGRID_URL={url} vgrid image ls");
    tracing::info!(%url, data = %data.display(), "vgrid up");
    shutdown_signal().await;
    eprintln!("vgrid: shutting down, stopping guests...");
    coord.stop_vms_on(agent.name()).await;
    beat.abort();
    adv.abort();
    agent.shutdown().await;
    stop.notify_one();
    server.await.ok();
    Ok(ExitCode::SUCCESS)
}

pub async fn coordinator(a: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    let data = data_dir(a.data_dir, Some("coordinator"))?;
    let config = StateConfig::parse(Some(&a.state), &data).map_err(|e| anyhow!(e))?;
    std::fs::create_dir_all(&data).with_context(|| format!("creating data directory {}", data.display()))?;
    let (listener, url) = bind(a.listen).await?;
    let state = vgrid_coordinator::state::connect(&config).await.map_err(|e| anyhow!("{e}"))?;
    let (ca, node) = own_ca(&data.join("tls"), &hostname(), &[NodeRole::Coordinator], sans_for(a.listen, &a.tls.sans, None))?;
    use_node_cert(&node, Some(&url))?;
    let fingerprint = ca.fingerprint();
    let joins = Arc::new(Joins::new(ca, state.records()));
    let registry = a.beats.registry();
    registry.add_fixed_servers(a.image_servers.iter().cloned());
    let auth = a.users.open(state.records(), &data).await?;
    // Several coordinators on one etcd: each serves the API and takes heartbeats; the elected
    // leader alone runs the once-per-grid work, and recovers the half-done work of the
    // coordinators before it each time it becomes leader (instead of at startup).
    let (coord, _leadership) = match &config {
        StateConfig::Etcd(c) => {
            let coord = Coordinator::new(state.clone(), registry).await.map_err(|e| anyhow!("{e}"))?;
            coord.mark_drained().await.map_err(|e| anyhow!("{e}"))?;
            let client = vgrid_coordinator::state::etcd::connect(c).await.map_err(|e| anyhow!("{e}"))?;
            let ttl = Duration::from_secs(a.leader_ttl.max(1));
            let leadership = vgrid_coordinator::leader::Leadership::campaign(client.clone(), c.election_key(), url.clone(), ttl);
            coord.lead_with(leadership.subscribe());
            // Its own presence, and the others' followed: the leader takes over the work of a
            // coordinator that goes, without waiting for a change of leader.
            let presence = vgrid_coordinator::leader::Presence::register(client.clone(), c.presence_prefix(), url.clone(), ttl);
            let every = Duration::from_secs(1);
            vgrid_coordinator::leader::follow_departures(Arc::downgrade(&coord), client, c.presence_prefix(), url.clone(), every);
            (coord, Some((leadership, presence)))
        }
        _ => (open_coordinator(&state, registry).await?, None),
    };
    vgrid_coordinator::metrics::init(&coord);
    a.metrics.serve().await?;
    announce(&format!("vgrid coordinator at {url} (data in {}, state {}, CA {fingerprint})", data.display(), a.state));
    vgrid_trust::tls::serve(listener, node, vgrid_coordinator::http::router(coord, auth, Some(joins)), shutdown_signal())
        .await
        .context("serving the API")?;
    Ok(ExitCode::SUCCESS)
}

pub async fn host(a: HostAgentArgs) -> anyhow::Result<ExitCode> {
    let Some(coordinators) = a.coordinator.clone() else {
        bail!("give --coordinator URL to run a host agent, or use `vgrid host ls` / `vgrid host show NAME`");
    };
    // Several coordinators of one grid (comma-separated): join and check users' tokens with
    // the first that answers; heartbeats fail over between all of them.
    let coordinator = crate::client::pick_coordinator(&coordinators);
    let data = data_dir(a.data_dir, Some("host"))?;
    std::fs::create_dir_all(&data).with_context(|| format!("creating data directory {}", data.display()))?;
    let (listener, url) = bind(a.listen).await?;
    let url = a.advertise_url.unwrap_or(url);
    let name = a.host.name.clone().unwrap_or_else(hostname);
    // Local problems first (QEMU's user, the data directory), before contacting the coordinator.
    vgrid_hostagent::qemu_user::resolve(&a.host.qemu_user, &data).map_err(|e| anyhow!("starting the host agent: {e}"))?;
    let sans = sans_for(a.listen, &a.tls.sans, Some(&url));
    let node = joined_cert(&data, &coordinator, a.join_token.as_deref(), NodeRole::Host, &name, sans).await?;
    use_node_cert(&node, None)?;
    let agent = start_agent(&data, &a.host, vec![]).await?;
    let hb = heartbeat(&a.host, &coordinators, &url);
    let http = vgrid_trust::tls::client_builder().build().expect("HTTP client");
    let first = Heartbeat { coordinator: coordinator.clone(), ..hb.clone() };
    if let Err(e) = agent.heartbeat_once(&http, &first).await {
        eprintln!("warning: first heartbeat failed (retrying in the background): {e}");
    }
    let beat = tokio::spawn(agent.clone().heartbeat_loop(hb));
    vgrid_blockproxy::metrics::init();
    a.metrics.serve().await?;
    announce(&format!("vgrid host {} at {url}, registered with {coordinator}", agent.name()));
    let users = vgrid_trust::caller::RemoteUsers::new(&coordinator);
    // SIGTERM/SIGINT (a service manager restarting the agent for an upgrade): stop beating at
    // once, stop serving within the shutdown grace, leave the guests running for the next
    // agent on this data directory (`vgrid host drain NAME` first takes the host out of
    // service, moving its guests away).
    let beats = beat.abort_handle();
    let signal = async move {
        shutdown_signal().await;
        eprintln!("vgrid host: stopping (guests keep running; `vgrid host drain` moves them away)");
        beats.abort();
    };
    let r = vgrid_trust::tls::serve(listener, node, vgrid_hostagent::http::router(agent.clone(), Some(users)), signal).await;
    beat.abort();
    let n = agent.leave().await;
    eprintln!("vgrid host: leaving {n} guests running for the next agent to adopt (`vgrid host` with --data-dir {})", data.display());
    r.context("serving the host API")?;
    Ok(ExitCode::SUCCESS)
}

pub async fn image_server(a: ImageServerArgs) -> anyhow::Result<ExitCode> {
    let data = data_dir(a.data_dir, Some("image-server"))?;
    let (listener, url) = bind(a.listen).await?;
    let url = a.advertise_url.unwrap_or(url);
    let name = a.name.clone().unwrap_or_else(|| format!("{}-{}", hostname(), listener.local_addr().map(|l| l.port()).unwrap_or(0)));
    let (store, kept_in) = match a.store {
        Some(mut at) => {
            at.endpoint = a.s3_endpoint.clone();
            let store = ImageStore::open_s3(&at, &name).await.map_err(|e| anyhow!("opening the image store: {e}"))?;
            (store, at.to_string())
        }
        None => {
            let dir = data.join("images");
            (ImageStore::open_local(&dir).map_err(|e| anyhow!("opening the image store: {e}"))?, dir.display().to_string())
        }
    };
    let store = Arc::new(store);
    let sans = sans_for(a.listen, &a.tls.sans, Some(&url));
    // Several coordinators of one grid (comma-separated): join and check users' tokens with the
    // first that answers, advertise the images to every one of them (each resolves images).
    let picked = a.coordinator.as_deref().map(crate::client::pick_coordinator);
    let users: Option<vgrid_trust::caller::Users> = picked.as_deref().map(|c| vgrid_trust::caller::RemoteUsers::new(c) as _);
    let node = match &picked {
        Some(c) => {
            let node = joined_cert(&data, c, a.join_token.as_deref(), NodeRole::ImageServer, &name, sans).await?;
            // The local CLI (`image import --image-server URL`) trusts its grid's CA at this URL.
            use_node_cert(&node, Some(&url))?;
            for to in a.coordinator.as_deref().unwrap_or_default().split(',').map(str::trim).filter(|u| !u.is_empty()) {
                let adv = vgrid_imagestore::server::advertise_loop(
                    store.clone(),
                    to.to_string(),
                    name.clone(),
                    url.clone(),
                    Duration::from_secs(5),
                );
                tokio::spawn(adv);
            }
            node
        }
        None => {
            // Its own CA, apart from where a joined certificate would go (DATA/tls).
            let (_, node) = own_ca(&data.join("tls").join("ca"), &name, &[NodeRole::ImageServer], sans)?;
            use_node_cert(&node, Some(&url))?;
            node
        }
    };
    announce(&format!("vgrid image server at {url} (images in {kept_in}, certificates in {})", data.display()));
    vgrid_trust::metrics::init();
    a.metrics.serve().await?;
    vgrid_trust::tls::serve(listener, node, vgrid_imagestore::server::router_with(store, users), shutdown_signal())
        .await
        .context("serving images")?;
    Ok(ExitCode::SUCCESS)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[derive(Args, Debug)]
pub struct NbdArgs {
    /// Export this image (NAME or NAME@VERSION); clients may also ask for any other image by name.
    pub image: String,
    /// Unix socket to listen on (clients: nbd+unix:///IMAGE?socket=PATH).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// TCP address to listen on as well (clients: nbd://ADDR/IMAGE).
    #[arg(long)]
    pub listen: Option<String>,
    /// Host chunk cache directory [default: $XDG_CACHE_HOME/vgrid/nbd-cache].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Cache size bound; least recently used chunks are evicted beyond it.
    #[arg(long, default_value = "10G", value_parser = parse_size)]
    pub cache_size: u64,
    #[command(flatten)]
    pub server: ServerArg,
}

pub async fn nbd(ctx: &Ctx, a: NbdArgs) -> anyhow::Result<ExitCode> {
    if a.socket.is_none() && a.listen.is_none() {
        bail!("give --socket PATH and/or --listen ADDR to serve on");
    }
    let r: ImageRef = a.image.parse()?;
    let url = a.server.url(ctx, crate::store::Want::Image(&a.image)).await?;
    crate::trust::trust(&url)?;
    // The proxy's own fetches go out with the user's token too.
    use_store_token(ctx).await;
    let client = StoreClient::new(&url).map_err(|e| anyhow!("{e}"))?;
    let m = client.manifest(&r).await.map_err(|e| anyhow!("{e}"))?;
    let cache_dir = a.cache_dir.unwrap_or_else(|| default_cache_dir().join("nbd-cache"));
    let servers = vgrid_blockproxy::Servers::from_urls(vec![url]).map_err(|e| anyhow!("image server {}: {e}", e.source_name()))?;
    let proxy = vgrid_blockproxy::BlockProxy::new(vgrid_blockproxy::ProxyConfig::new(&cache_dir, a.cache_size), Arc::new(servers))
        .map_err(|e| anyhow!("block proxy: {e}"))?;
    let mut handles = Vec::new();
    if let Some(sock) = &a.socket {
        let _ = std::fs::remove_file(sock);
        handles.push(proxy.serve_unix(sock).map_err(|e| anyhow!("{e}"))?);
        println!("serving {} ({}) on nbd+unix:///{}?socket={}", m.image_ref(), bytes(m.disk.size), a.image, sock.display());
    }
    if let Some(addr) = &a.listen {
        let h = proxy.serve_tcp(addr).await.map_err(|e| anyhow!("{e}"))?;
        let bound = h.tcp_addr().map(|a| a.to_string()).unwrap_or_else(|| addr.clone());
        handles.push(h);
        println!("serving {} on nbd://{}/{}", m.image_ref(), bound, a.image);
    }
    shutdown_signal().await;
    for h in handles {
        h.shutdown().await;
    }
    // Its clients are gone: the profile of what they read goes to the image server now.
    proxy.finish_recordings();
    proxy.flush_profiles(Duration::from_secs(5)).await;
    proxy.shutdown();
    if let Some(sock) = &a.socket {
        let _ = std::fs::remove_file(sock);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_data_dir_becomes_absolute() {
        // `vgrid up --data-dir d`: QEMU is given the block proxy's socket under it from
        // another working directory, so the path must not stay relative.
        let d = data_dir(Some(PathBuf::from("d/x")), None).unwrap();
        assert!(d.is_absolute(), "{}", d.display());
        assert_eq!(d, std::env::current_dir().unwrap().join("d/x"));
        let h = data_dir(None, Some("host")).unwrap();
        assert!(h.is_absolute() && h.ends_with("host"), "{}", h.display());
    }
}
