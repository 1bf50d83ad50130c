//! `vgrid vm console`: the VM's serial console over the API's WebSocket, the local terminal in
//! raw mode; Ctrl-] detaches (as telnet and virsh do).

use anyhow::{anyhow, Context};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use vgrid_api::vm::VmRecord;

use crate::Ctx;

/// Ctrl-]
const DETACH: u8 = 0x1d;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens VM `v`'s `stream` (`console`, `vnc`) through the coordinator, with the user's login.
async fn open(ctx: &Ctx, v: &VmRecord, stream: &str, what: &str) -> anyhow::Result<Ws> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let api = ctx.api();
    // One coordinator of the list (`VGRID_URL=c1,c2`): the first that accepts a connection.
    let base = crate::client::pick_coordinator(&ctx.url);
    let ws_url = format!("{}/api/v1/vms/{}/{stream}/ws", base.trim_end_matches('/').replacen("http", "ws", 1), v.id);
    let mut req = ws_url.as_str().into_client_request().map_err(|e| anyhow!("{what} URL {ws_url}: {e}"))?;
    if let Some(t) = api.token() {
        req.headers_mut().insert("authorization", format!("Bearer {t}").parse().map_err(|_| anyhow!("malformed token"))?);
    }
    let (ws, _) = vgrid_trust::tls::ws_connect(req).await.map_err(|e| match e {
        tokio_tungstenite::tungstenite::Error::Http(r) => {
            let body = r.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            anyhow!("{what} of VM {} refused (HTTP {}): {}", v.id, r.status().as_u16(), body)
        }
        e => anyhow!("cannot open the {what} of VM {} at {ws_url}: {e}", v.id),
    })?;
    Ok(ws)
}

pub async fn attach(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let v: VmRecord = ctx.api().get(&format!("/api/v1/vms/{id}")).await?;
    let ws = open(ctx, &v, "console", "console").await?;
    eprintln!("Connected to the console of {} ({}). Ctrl-] detaches; press Enter for a prompt.\r", v.id, v.name);
    let raw = RawMode::enable();
    let (mut tx, mut rx) = ws.split();
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let mut buf = [0u8; 1024];
    let result: anyhow::Result<()> = async {
        loop {
            tokio::select! {
                n = stdin.read(&mut buf) => {
                    let n = n.context("reading the terminal")?;
                    if n == 0 { break; }
                    if let Some(p) = buf[..n].iter().position(|&b| b == DETACH) {
                        if p > 0 { tx.send(Message::Binary(buf[..p].to_vec().into())).await?; }
                        break;
                    }
                    tx.send(Message::Binary(buf[..n].to_vec().into())).await?;
                }
                m = rx.next() => match m {
                    Some(Ok(Message::Binary(b))) => { stdout.write_all(&b).await?; stdout.flush().await?; }
                    Some(Ok(Message::Text(t))) => { stdout.write_all(t.as_bytes()).await?; stdout.flush().await?; }
                    Some(Ok(Message::Close(_))) | None => { eprint!("\r\n[console closed: the VM stopped]\r\n"); break; }
                    Some(Err(e)) => return Err(anyhow!("console connection: {e}")),
                    _ => {}
                }
            }
        }
        Ok(())
    }
    .await;
    drop(raw);
    eprintln!("\ndetached from {}", v.id);
    result
}

/// `vgrid vm vnc`: offers VM `id`'s graphical console on `listen` (a local TCP address) to any
/// VNC viewer; each connection gets its own WebSocket through the coordinator (authenticated as
/// the user: another user's VM is refused). Runs until Ctrl-C.
pub async fn vnc(ctx: &Ctx, id: &str, listen: &str) -> anyhow::Result<()> {
    let v: VmRecord = ctx.api().get(&format!("/api/v1/vms/{id}")).await?;
    // Refused now (not at the first viewer) when the VM is not ours or has no display.
    drop(open(ctx, &v, "vnc", "VNC display").await?);
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
    let local = listener.local_addr()?;
    println!("VNC display of {} ({}) at {local}: connect a viewer (vncviewer {}::{}); Ctrl-C ends", v.id, v.name, local.ip(), local.port());
    use std::io::Write;
    std::io::stdout().flush().ok();
    loop {
        let (conn, peer) = tokio::select! {
            a = listener.accept() => a.context("accepting a viewer")?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let ws = match open(ctx, &v, "vnc", "VNC display").await {
            Ok(ws) => ws,
            Err(e) => {
                eprintln!("viewer {peer}: {e}");
                continue;
            }
        };
        tokio::spawn(async move {
            let (rd, wr) = conn.into_split();
            if let Err(e) = pipe(rd, wr, ws).await {
                tracing::debug!("viewer {peer}: {e}");
            }
        });
    }
}

/// `vgrid vm ssh-proxy`: the VM's ssh port (through the coordinator and its host) on stdin and
/// stdout, for ssh's `ProxyCommand` (what `vgrid vm ssh` sets).
pub async fn ssh_proxy(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let v: VmRecord = ctx.api().get(&format!("/api/v1/vms/{id}")).await?;
    let ws = open(ctx, &v, "ssh", "ssh port").await?;
    pipe(tokio::io::stdin(), tokio::io::stdout(), ws).await
}

/// Carries bytes between a local reader and writer (a TCP connection, stdin and stdout) and a
/// WebSocket of binary frames until either side closes.
async fn pipe(mut rd: impl AsyncRead + Unpin, mut wr: impl AsyncWrite + Unpin, ws: Ws) -> anyhow::Result<()> {
    let (mut tx, mut rx) = ws.split();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => {
                let n = n?;
                if n == 0 { break; }
                tx.send(Message::Binary(buf[..n].to_vec().into())).await?;
            }
            m = rx.next() => match m {
                Some(Ok(Message::Binary(b))) => {
                    wr.write_all(&b).await?;
                    wr.flush().await?;
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Err(e)) => return Err(e.into()),
                _ => {}
            }
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    Ok(())
}

/// Puts the terminal in raw mode while alive (when stdin is a terminal).
struct RawMode(Option<libc::termios>);

impl RawMode {
    fn enable() -> Self {
        unsafe {
            if libc::isatty(0) != 1 {
                return RawMode(None);
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return RawMode(None);
            }
            let orig = t;
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(0, libc::TCSANOW, &t);
            RawMode(Some(orig))
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, &t);
            }
        }
    }
}
