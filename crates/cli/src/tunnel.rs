//! `vgrid tunnel NAME`: the user's end of tunnel network NAME. Carries Ethernet frames between
//! a local device (a tap, made when missing and optionally enslaved to a bridge of the user's
//! LAN, or passt with `--user-mode`) and the coordinator's relay, over a WebSocket on the
//! coordinator's HTTPS port authenticated by the user's token (`vgrid_api::tunnel`). It
//! reconnects with backoff while the coordinator restarts, and never touches a device it did
//! not make (a tap it made vanishes with it).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use vgrid_api::tunnel::{batch, records, AnswerPoll, DirectControl, DirectEndpoint, Look, MAX_FRAME, TICKET_HEADER};

use crate::tunnel_switch::{LinkId, Switch, LOCAL, RELAY};

/// The arguments of `vgrid tunnel` (its help is on `Cmd::Tunnel`).
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("end").required(true).multiple(true).args(["tap", "bridge", "user_mode"])))]
pub struct TunnelArgs {
    /// Your tunnel network.
    pub name: String,
    /// The local tap device the frames go to and come from.
    #[arg(long)]
    pub tap: Option<String>,
    /// A bridge of your LAN: the tap is made and enslaved to it (the bridge must exist).
    #[arg(long)]
    pub bridge: Option<String>,
    /// End the tunnel in passt (Debian package `passt`): no tap, no privileges.
    #[arg(long, conflicts_with_all = ["tap", "bridge", "netns"])]
    pub user_mode: bool,
    /// Make the tap in this network namespace (`ip netns add NS`), not in the current one.
    #[arg(long)]
    pub netns: Option<String>,
    /// Carry every frame through the coordinator's relay: no direct links to the hosts of
    /// your VMs (by default each host that takes them gets one, and its VMs' frames then
    /// travel between you and it only).
    #[arg(long)]
    pub relay_only: bool,
    /// Microseconds a link waits awake for the answer after sending your frames towards the
    /// VMs, instead of sleeping until it comes: saves a wake-up of this process per round trip
    /// (~0.1 ms on a VM), at the price of up to this much CPU per answered batch (after an
    /// unanswered wait, none for 100 ms). 0 turns it off.
    #[arg(long, value_name = "US", default_value_t = vgrid_api::tunnel::DEFAULT_POLL_US)]
    pub poll_us: u64,
}

pub async fn run(ctx: &crate::Ctx, a: TunnelArgs) -> anyhow::Result<ExitCode> {
    vgrid_api::net::check_network_name(&a.name)?;
    let api = ctx.api();
    // The network must be one of yours (this also logs in when needed).
    let _: serde_json::Value = api.get(&format!("/api/v1/networks/{}", a.name)).await.map_err(|e| anyhow!("tunnel {}: {e}", a.name))?;
    let (end, what, _child) = open_end(&a).await?;
    let poll = Poll { window: Duration::from_micros(a.poll_us), local: end.raw_fd() };
    let end = Arc::new(end);
    let sw = Arc::new(Switch::default());
    let (tx, rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    sw.add(LOCAL, tx);
    tokio::spawn(read_local(end.clone(), sw.clone()));
    tokio::spawn(write_local(end, rx));
    if !a.relay_only {
        tokio::spawn(direct_links(api.clone(), a.name.clone(), sw.clone(), poll));
    }
    let url = format!("{}/api/v1/networks/{}/tunnel", ctx.url.replacen("http", "ws", 1), a.name);
    let mut backoff = Duration::from_millis(500);
    loop {
        match connect(&api, &url).await {
            Ok(ws) => {
                eprintln!("tunnel {}: connected to {}; carrying frames between {what} and the VMs of network {}", a.name, ctx.url, a.name);
                backoff = Duration::from_millis(500);
                let why = carry(ws, &sw, RELAY, poll).await;
                eprintln!("tunnel {}: connection to the relay lost ({why}); reconnecting", a.name);
            }
            Err(Refusal::Final(e)) => bail!("tunnel {}: {e}", a.name),
            Err(Refusal::Retry(e)) => {
                eprintln!("tunnel {}: relay unreachable ({e}); retrying in {:.1} s", a.name, backoff.as_secs_f64());
            }
        }
        let (d, s) = (sw.dropped.load(Ordering::Relaxed), sw.spoofed.load(Ordering::Relaxed));
        if d + s > 0 {
            eprintln!("tunnel {}: frames dropped so far: {d} on full queues, {s} from direct links with a MAC not their VMs'", a.name);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Frames queued towards each link before frames are dropped.
const QUEUE: usize = 1024;

/// How often the coordinator is asked for hosts to link to directly, and how long a host
/// whose link failed is left on the relay before it is tried again.
const DIRECT_POLL: Duration = Duration::from_secs(3);
const DIRECT_RETRY: Duration = Duration::from_secs(30);

/// Keeps a direct link to every host that runs a VM of network `name` and takes one (asking
/// the coordinator for tickets every few seconds); a host that cannot be reached stays on
/// the relay.
async fn direct_links(api: crate::Api, name: String, sw: Arc<Switch>, poll: Poll) {
    let mut links: HashMap<String, tokio::task::JoinHandle<bool>> = HashMap::new();
    let mut failed: HashMap<String, std::time::Instant> = HashMap::new();
    let mut next: LinkId = RELAY + 1;
    let mut warned = false;
    loop {
        // Links that ended: a failed one waits before the next try.
        for (host, h) in links.iter() {
            if h.is_finished() {
                failed.insert(host.clone(), std::time::Instant::now());
            }
        }
        links.retain(|_, h| !h.is_finished());
        failed.retain(|_, t| t.elapsed() < DIRECT_RETRY);
        let skip: Vec<&str> = links.keys().chain(failed.keys()).map(String::as_str).collect();
        let path = format!("/api/v1/networks/{name}/tunnel/direct?skip={}", skip.join(","));
        match api.get::<Vec<DirectEndpoint>>(&path).await {
            Ok(eps) => {
                warned = false;
                for ep in eps {
                    let (sw, name, id) = (sw.clone(), name.clone(), next);
                    next += 1;
                    links.insert(ep.host.clone(), tokio::spawn(async move { direct_link(ep, id, &sw, &name, poll).await }));
                }
            }
            Err(e) if !warned => {
                eprintln!("tunnel {name}: asking for direct links: {e} (the relay carries every frame meanwhile)");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(DIRECT_POLL).await;
    }
}

/// One direct link to a host agent, for as long as it lasts.
async fn direct_link(ep: DirectEndpoint, id: LinkId, sw: &Switch, name: &str, poll: Poll) -> bool {
    let url = ep.url.replacen("http", "ws", 1);
    let ws = match connect_direct(&url, &ep.ticket).await {
        Ok(ws) => ws,
        Err(e) => {
            eprintln!("tunnel {name}: no direct link to host {} ({e}); its VMs stay on the relay", ep.host);
            return false;
        }
    };
    eprintln!("tunnel {name}: direct link to host {} ({}): its VMs' frames no longer pass the coordinator", ep.host, ep.url);
    let why = carry(ws, sw, id, poll).await;
    eprintln!("tunnel {name}: direct link to host {} ended ({why}); its VMs are on the relay until it is back", ep.host);
    true
}

async fn connect_direct(url: &str, ticket: &str) -> anyhow::Result<Ws> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request()?;
    req.headers_mut().insert(TICKET_HEADER, ticket.parse()?);
    match tokio::time::timeout(Duration::from_secs(10), vgrid_trust::tls::ws_connect(req)).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(r))) => {
            let body = r.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            let msg = serde_json::from_str::<vgrid_api::ErrorBody>(&body).map(|e| e.error).unwrap_or(body);
            bail!("HTTP {}: {msg}", r.status().as_u16())
        }
        Ok(Err(e)) => Err(e.into()),
        Err(_) => bail!("no answer within 10 s"),
    }
}

enum Refusal {
    Final(String),
    Retry(String),
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(api: &crate::Api, url: &str) -> Result<Ws, Refusal> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().map_err(|e| Refusal::Final(format!("URL {url}: {e}")))?;
    if let Some(t) = api.token() {
        req.headers_mut().insert("authorization", format!("Bearer {t}").parse().map_err(|_| Refusal::Final("malformed token".into()))?);
    }
    match vgrid_trust::tls::ws_connect(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            let body = r.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            let msg = serde_json::from_str::<vgrid_api::ErrorBody>(&body).map(|e| e.error).unwrap_or(body);
            let code = r.status().as_u16();
            // The coordinator restarting answers 5xx; a refusal (4xx) is final.
            if (400..500).contains(&code) {
                Err(Refusal::Final(format!("refused (HTTP {code}): {msg}")))
            } else {
                Err(Refusal::Retry(format!("HTTP {code}: {msg}")))
            }
        }
        Err(e) => Err(Refusal::Retry(e.to_string())),
    }
}

/// How a link waits for answers: the window ([`AnswerPoll`]) and the local end's descriptor (a
/// frame there is other work that ends a wait).
#[derive(Debug, Clone, Copy)]
struct Poll {
    window: Duration,
    local: RawFd,
}

/// Carries frames between link `id` of the switch and the WebSocket until the connection
/// ends; returns why it ended.
async fn carry(ws: Ws, sw: &Switch, id: LinkId, poll: Poll) -> String {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    sw.add(id, tx);
    let fd = match ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(s) => s.as_raw_fd(),
        tokio_tungstenite::MaybeTlsStream::Rustls(s) => s.get_ref().0.as_raw_fd(),
        _ => -1,
    };
    let mut answers = AnswerPoll::new(if fd < 0 { Duration::ZERO } else { poll.window });
    let (mut wtx, mut wrx) = ws.split();
    let why = loop {
        let got = tokio::select! {
            f = rx.recv() => {
                let Some(f) = f else { break "replaced".to_string() };
                let b = batch((0, f), || rx.try_recv().ok().map(|f| (0, f)));
                if let Err(e) = wtx.send(Message::Binary(b.into())).await {
                    break e.to_string();
                }
                // The answer usually follows within a millisecond: wait for it awake, unless a
                // message is already buffered (TLS, WebSocket) or other work comes. On this
                // command's one-thread runtime the read below then finds its event at once.
                match wrx.next().now_or_never() {
                    Some(m) => m,
                    None => {
                        answers.wait(|| look(fd, poll.local, !rx.is_empty()));
                        continue;
                    }
                }
            }
            m = wrx.next() => m,
        };
        match got {
            Some(Ok(Message::Binary(b))) => {
                for r in records(&b) {
                    match r {
                        Ok((_, f)) => sw.input(id, f.to_vec()),
                        Err(e) => {
                            tracing::warn!("malformed batch on tunnel link {id}: {e}");
                            break;
                        }
                    }
                }
                // Let the links' writers send before this one reads again: the read that
                // finds nothing more would otherwise come first (a syscall per frame of RTT).
                tokio::task::yield_now().await;
            }
            Some(Ok(Message::Text(t))) => {
                if let Ok(DirectControl::Macs { macs }) = serde_json::from_str(&t) {
                    sw.announce(id, &macs);
                }
            }
            Some(Ok(Message::Close(_))) | None => break "closed by the other end".into(),
            Some(Err(e)) => break e.to_string(),
            _ => {}
        }
    };
    sw.remove(id);
    why
}

/// One look for a link's answer: its socket `fd` readable, or other work (a frame at the local
/// end `local`, frames queued for the link: `queued`).
fn look(fd: RawFd, local: RawFd, queued: bool) -> Look {
    if queued {
        return Look::OtherWork;
    }
    let mut fds = [libc::pollfd { fd, events: libc::POLLIN, revents: 0 }, libc::pollfd { fd: local, events: libc::POLLIN, revents: 0 }];
    // SAFETY: two pollfd in an array of two (poll ignores a negative fd); no waiting (0 ms).
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 0) };
    if n == 0 {
        Look::Nothing
    } else if n > 0 && fds[1].revents == 0 && fds[0].revents & libc::POLLIN != 0 {
        Look::Answer
    } else {
        Look::OtherWork
    }
}

/// Reads frames from the local end for as long as this command runs.
async fn read_local(end: Arc<End>, sw: Arc<Switch>) {
    // One buffer for every read (a fresh zeroed 68 KiB per frame cost more than the frame).
    let mut scratch = vec![0u8; MAX_FRAME];
    loop {
        match end.recv(&mut scratch).await {
            Ok(f) if f.is_empty() => {}
            Ok(f) => {
                sw.input(LOCAL, f);
                tokio::task::yield_now().await;
            }
            Err(e) => {
                eprintln!("tunnel: reading the local device: {e}");
                return;
            }
        }
    }
}

/// Writes the frames switched to the local end.
async fn write_local(end: Arc<End>, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(f) = rx.recv().await {
        if let Err(e) = end.send(&f).await {
            eprintln!("tunnel: writing to the local device: {e}");
            return;
        }
    }
}

/// The local end of the tunnel.
enum End {
    Tap(AsyncFd<OwnedFd>),
    /// passt's end of a socket pair: QEMU's stream framing.
    Stream(tokio::sync::Mutex<tokio::net::unix::OwnedReadHalf>, tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>),
}

impl End {
    fn raw_fd(&self) -> RawFd {
        match self {
            End::Tap(fd) => fd.get_ref().as_raw_fd(),
            End::Stream(rd, _) => rd.try_lock().map(|r| r.as_ref().as_raw_fd()).unwrap_or(-1),
        }
    }

    /// The next frame; `buf` (at least [`MAX_FRAME`] bytes) is the tap's read buffer.
    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<Vec<u8>> {
        match self {
            End::Tap(fd) => loop {
                let mut g = fd.readable().await?;
                let r = g.try_io(|fd| {
                    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    if n < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(n as usize)
                    }
                });
                if let Ok(r) = r {
                    return Ok(buf[..r?].to_vec());
                }
            },
            End::Stream(rd, _) => {
                let mut rd = rd.lock().await;
                let mut len = [0u8; 4];
                rd.read_exact(&mut len).await?;
                let n = u32::from_be_bytes(len) as usize;
                if n > MAX_FRAME {
                    return Err(std::io::Error::other(format!("passt sent a frame of {n} bytes")));
                }
                let mut f = vec![0u8; n];
                rd.read_exact(&mut f).await?;
                Ok(f)
            }
        }
    }

    async fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        match self {
            End::Tap(fd) => loop {
                let mut g = fd.writable().await?;
                let r = g.try_io(|fd| {
                    let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
                    if n < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                });
                if let Ok(r) = r {
                    return r;
                }
            },
            End::Stream(_, wr) => {
                let mut wr = wr.lock().await;
                let mut b = Vec::with_capacity(frame.len() + 4);
                b.extend_from_slice(&(frame.len() as u32).to_be_bytes());
                b.extend_from_slice(frame);
                wr.write_all(&b).await
            }
        }
    }
}

/// Opens the local end: the tap (made, brought up and enslaved when it was missing), or passt.
async fn open_end(a: &TunnelArgs) -> anyhow::Result<(End, String, Option<tokio::process::Child>)> {
    if a.user_mode {
        let (end, child) = spawn_passt()?;
        return Ok((end, "passt (user mode)".into(), Some(child)));
    }
    let tap = a.tap.clone().unwrap_or_else(|| format!("vgt-{}", a.name).chars().take(15).collect());
    let (fd, made) = open_tap(&tap, a.netns.as_deref()).with_context(|| format!("tunnel {}: tap {tap}", a.name))?;
    let ip = |args: &[&str]| -> anyhow::Result<()> {
        let mut full: Vec<&str> = Vec::new();
        if let Some(ns) = &a.netns {
            full.extend(["-n", ns]);
        }
        full.extend(args);
        let o = std::process::Command::new("ip").args(&full).output().context("running ip (iproute2)")?;
        if !o.status.success() {
            bail!("ip {}: {}", full.join(" "), String::from_utf8_lossy(&o.stderr).trim());
        }
        Ok(())
    };
    let mut what = format!("tap {tap}");
    if made {
        if let Some(br) = &a.bridge {
            ip(&["link", "set", &tap, "master", br]).with_context(|| format!("tunnel {}: enslaving tap {tap} to bridge {br}", a.name))?;
            what = format!("tap {tap} on bridge {br}");
        }
        ip(&["link", "set", &tap, "up"])?;
        eprintln!("tunnel {}: made {what} (it goes when this command ends)", a.name);
    } else if let Some(br) = &a.bridge {
        bail!(
            "tunnel {}: tap {tap} exists and vgrid tunnel enslaves only a tap it makes: drop --bridge {br} or name another --tap",
            a.name
        );
    } else {
        eprintln!("tunnel {}: using the existing tap {tap} as it is", a.name);
    }
    // SAFETY: the tap's queue is ours alone (just opened), and stays open while registered.
    let fd = unsafe { AsyncFd::register(fd) }.map_err(|_| anyhow!("tunnel {}: registering tap {tap} with the runtime", a.name))?;
    Ok((End::Tap(fd), what, None))
}

/// Opens tap `name` (in namespace `netns`), making it when missing. Returns its queue and
/// whether it was made.
fn open_tap(name: &str, netns: Option<&str>) -> anyhow::Result<(OwnedFd, bool)> {
    if name.is_empty() || name.len() > 15 {
        bail!("a device name has 1-15 bytes");
    }
    let name = name.to_string();
    let netns = netns.map(|n| format!("/run/netns/{n}"));
    // A thread of its own: setns() changes the namespace of the calling thread only.
    std::thread::spawn(move || -> anyhow::Result<(OwnedFd, bool)> {
        if let Some(ns) = &netns {
            let f = std::fs::File::open(ns).with_context(|| format!("network namespace {ns}"))?;
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("entering network namespace {ns}: {}", std::io::Error::last_os_error());
            }
        }
        let cname = std::ffi::CString::new(name.clone())?;
        let existed = unsafe { libc::if_nametoindex(cname.as_ptr()) } != 0;
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if fd < 0 {
            bail!("opening /dev/net/tun: {} (a tap needs CAP_NET_ADMIN or a tap made for you: ip tuntap add NAME mode tap user $USER; or use --user-mode)", std::io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // struct ifreq: the name (16 bytes), then the flags.
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        let flags: libc::c_short = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) } != 0 {
            bail!("attaching to tap {name}: {} (it may be another kind of device, or not yours)", std::io::Error::last_os_error());
        }
        Ok((fd, !existed))
    })
    .join()
    .map_err(|_| anyhow!("the thread opening the tap panicked"))?
}

/// Starts passt on one end of a socket pair (`--fd`), in the foreground, quiet.
fn spawn_passt() -> anyhow::Result<(End, tokio::process::Child)> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().context("socket pair for passt")?;
    let child_fd = theirs.as_raw_fd();
    let mut cmd = tokio::process::Command::new("passt");
    cmd.args(["--foreground", "--quiet", "--one-off", "--fd", &child_fd.to_string()]).kill_on_drop(true);
    unsafe {
        cmd.pre_exec(move || {
            // Keep passt's end open across exec.
            let flags = libc::fcntl(child_fd, libc::F_GETFD);
            libc::fcntl(child_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting passt (install the Debian package passt: scripts/install-deps.sh)")?;
    drop(theirs);
    ours.set_nonblocking(true)?;
    let (rd, wr) = tokio::net::UnixStream::from_std(ours)?.into_split();
    Ok((End::Stream(tokio::sync::Mutex::new(rd), tokio::sync::Mutex::new(wr)), child))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A look for a link's answer: nothing yet, the answer, or other work (a frame at the local
    /// end, frames queued for the link) that must not wait behind it.
    #[test]
    fn a_look_tells_the_answer_from_other_work() {
        let (link, host) = std::os::unix::net::UnixStream::pair().unwrap();
        let (local, lan) = std::os::unix::net::UnixStream::pair().unwrap();
        let (fd, lfd) = (link.as_raw_fd(), local.as_raw_fd());
        assert_eq!(look(fd, lfd, false), Look::Nothing);
        assert_eq!(look(fd, lfd, true), Look::OtherWork);
        (&host).write_all(b"answer").unwrap();
        assert_eq!(look(fd, lfd, false), Look::Answer);
        assert_eq!(look(fd, -1, false), Look::Answer, "no local descriptor (not opened yet)");
        (&lan).write_all(b"frame").unwrap();
        assert_eq!(look(fd, lfd, false), Look::OtherWork);
    }
}
