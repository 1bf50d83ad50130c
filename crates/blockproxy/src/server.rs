//! NBD server: accepts connections on unix sockets and TCP, negotiates (fixed newstyle), then
//! serves requests of each connection concurrently: the reader keeps reading requests while
//! reads are in flight; replies are written whole under the connection's writer lock.

use crate::busy::Pollers;
use crate::cache::ChunkFile;
use crate::error::ProxyError;
use crate::export::Export;
use crate::protocol::{self as p, ClientOption, Command, Negotiated};
use crate::proxy::BlockProxy;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Requests of one connection processed at once.
const MAX_INFLIGHT: u32 = 64;
/// Write payloads larger than this are not drained (connection closed instead).
const MAX_DRAIN: u32 = 64 * 1024 * 1024;
/// Option payloads larger than this close the connection (denial of service).
const MAX_OPTION_DISCARD: u32 = 16 * 1024 * 1024;

/// Where a server listens.
#[derive(Debug, Clone)]
enum Listening {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

/// A running NBD listener. Dropping the handle leaves the server running; call
/// [`ServerHandle::shutdown`] (or [`BlockProxy::shutdown`]) to stop it.
pub struct ServerHandle {
    listening: Listening,
    token: CancellationToken,
    task: JoinHandle<()>,
}

impl ServerHandle {
    /// The bound TCP address (useful with port 0).
    pub fn tcp_addr(&self) -> Option<std::net::SocketAddr> {
        match &self.listening {
            Listening::Tcp(a) => Some(*a),
            Listening::Unix(_) => None,
        }
    }
    /// The unix socket path.
    pub fn unix_path(&self) -> Option<&Path> {
        match &self.listening {
            Listening::Unix(p) => Some(p),
            Listening::Tcp(_) => None,
        }
    }
    /// Stops accepting, ends this listener's connections after their in-flight requests, and
    /// removes the unix socket file.
    pub async fn shutdown(self) {
        self.token.cancel();
        let _ = self.task.await;
    }
    /// Waits until the server stops (after a shutdown).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

impl BlockProxy {
    /// Serves NBD on the unix socket `path` (a stale socket file there is replaced; a live one
    /// is an error). Must be called inside a tokio runtime; returns once listening.
    pub fn serve_unix(self: &Arc<Self>, path: impl AsRef<Path>) -> Result<ServerHandle, ProxyError> {
        self.serve_unix_with(path, None)
    }

    /// [`BlockProxy::serve_unix`], with the socket's mode and group set before the first
    /// connection is accepted (e.g. `0o660` and the group of an unprivileged QEMU user, so that
    /// QEMU processes running as that user can connect and nobody else can).
    pub fn serve_unix_with(self: &Arc<Self>, path: impl AsRef<Path>, access: Option<SocketAccess>) -> Result<ServerHandle, ProxyError> {
        let path = path.as_ref().to_path_buf();
        let addr = || path.display().to_string();
        let setup_err = |step: String| move |source: std::io::Error| ProxyError::SocketSetup { addr: addr(), step, source };
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(ProxyError::SocketInUse { addr: addr() });
            }
            std::fs::remove_file(&path).map_err(setup_err("cannot remove stale socket".into()))?;
        }
        let listener = UnixListener::bind(&path).map_err(|source| ProxyError::Listen { addr: addr(), source })?;
        if let Some(a) = access {
            use std::os::unix::fs::PermissionsExt;
            if let Some(gid) = a.gid {
                std::os::unix::fs::chown(&path, None, Some(gid)).map_err(setup_err(format!("cannot give the socket to group {gid}")))?;
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(a.mode))
                .map_err(setup_err(format!("cannot set the socket's mode to {:o}", a.mode)))?;
        }
        let token = self.shutdown_token().child_token();
        let proxy = self.clone();
        let t = token.clone();
        let sock = path.clone();
        let task = tokio::spawn(async move {
            tracing::info!(socket = %sock.display(), "NBD server listening");
            loop {
                tokio::select! {
                    _ = t.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok((s, _)) => {
                            let peer = format!("unix:{}", sock.display());
                            if let Err(e) = crate::sndbuf::widen(&s, crate::sndbuf::UNIX_SEND_BUFFER) {
                                tracing::debug!(peer, "cannot widen the client's send buffer: {e}");
                            }
                            let (r, w) = s.into_split();
                            tokio::spawn(serve_connection(proxy.clone(), r, Writer::Unix(w), peer, t.child_token()));
                        }
                        Err(e) => accept_failed(&sock.display().to_string(), e).await,
                    },
                }
            }
            let _ = std::fs::remove_file(&sock);
        });
        Ok(ServerHandle { listening: Listening::Unix(path), token, task })
    }

    /// Serves NBD on a TCP address (`127.0.0.1:10809`, port 0 for any). Must be called inside
    /// a tokio runtime; returns once listening.
    pub async fn serve_tcp(self: &Arc<Self>, addr: &str) -> Result<ServerHandle, ProxyError> {
        let listen_err = |source| ProxyError::Listen { addr: addr.to_string(), source };
        let listener = TcpListener::bind(addr).await.map_err(listen_err)?;
        let local = listener.local_addr().map_err(listen_err)?;
        let token = self.shutdown_token().child_token();
        let proxy = self.clone();
        let t = token.clone();
        let task = tokio::spawn(async move {
            tracing::info!(addr = %local, "NBD server listening");
            loop {
                tokio::select! {
                    _ = t.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok((s, peer)) => {
                            let _ = s.set_nodelay(true);
                            let (r, w) = s.into_split();
                            tokio::spawn(serve_connection(proxy.clone(), r, Writer::Tcp(w), format!("tcp:{peer}"), t.child_token()));
                        }
                        Err(e) => accept_failed(&local.to_string(), e).await,
                    },
                }
            }
        });
        Ok(ServerHandle { listening: Listening::Tcp(local), token, task })
    }
}

async fn accept_failed(addr: &str, e: std::io::Error) {
    tracing::warn!(addr, "accept failed: {e}");
    // Typically EMFILE: back off instead of spinning.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("connection I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Fatal(#[from] p::FatalError),
    /// The export asked for with `NBD_OPT_EXPORT_NAME` cannot be opened.
    #[error(transparent)]
    Open(#[from] ProxyError),
    #[error("option {option} with {len} bytes of data is too large")]
    TooLarge { option: u32, len: u32 },
}

struct Session {
    export: Arc<Export>,
    neg: Negotiated,
}

/// The sending half of a client connection. Chunk data goes from the cache file to the socket
/// with `sendfile(2)`: no copy through user space (and none at all into a unix socket on
/// kernels that splice pages).
pub(crate) enum Writer {
    Unix(tokio::net::unix::OwnedWriteHalf),
    Tcp(tokio::net::tcp::OwnedWriteHalf),
}

/// Zeroes for the all-zero parts of simple replies.
static ZEROES: [u8; 64 * 1024] = [0u8; 64 * 1024];

trait ReadyFd: AsRawFd {
    async fn ready_write(&self) -> std::io::Result<()>;
    fn try_write_io<R>(&self, f: impl FnOnce() -> std::io::Result<R>) -> std::io::Result<R>;
}

impl ReadyFd for tokio::net::UnixStream {
    async fn ready_write(&self) -> std::io::Result<()> {
        self.writable().await
    }
    fn try_write_io<R>(&self, f: impl FnOnce() -> std::io::Result<R>) -> std::io::Result<R> {
        self.try_io(Interest::WRITABLE, f)
    }
}

impl ReadyFd for tokio::net::TcpStream {
    async fn ready_write(&self) -> std::io::Result<()> {
        self.writable().await
    }
    fn try_write_io<R>(&self, f: impl FnOnce() -> std::io::Result<R>) -> std::io::Result<R> {
        self.try_io(Interest::WRITABLE, f)
    }
}

async fn sendfile_all<S: ReadyFd>(sock: &S, file: &std::fs::File, offset: u64, len: usize) -> std::io::Result<()> {
    let mut off = offset as libc::off_t;
    let mut left = len;
    while left > 0 {
        sock.ready_write().await?;
        let r = sock.try_write_io(|| {
            // SAFETY: both descriptors are open for the duration of the call; `off` is a valid
            // pointer to a local.
            let n = unsafe { libc::sendfile(sock.as_raw_fd(), file.as_raw_fd(), &mut off, left) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match r {
            Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "cached chunk file is shorter than expected")),
            Ok(n) => left -= n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Writer {
    fn raw_fd(&self) -> std::os::unix::io::RawFd {
        match self {
            Writer::Unix(w) => w.as_ref().as_raw_fd(),
            Writer::Tcp(w) => w.as_ref().as_raw_fd(),
        }
    }
    async fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Writer::Unix(w) => w.write_all(b).await,
            Writer::Tcp(w) => w.write_all(b).await,
        }
    }
    async fn shutdown(&mut self) -> std::io::Result<()> {
        match self {
            Writer::Unix(w) => w.shutdown().await,
            Writer::Tcp(w) => w.shutdown().await,
        }
    }
    async fn send_file(&mut self, file: &std::fs::File, offset: u64, len: usize) -> std::io::Result<()> {
        match self {
            Writer::Unix(w) => sendfile_all(w.as_ref(), file, offset, len).await,
            Writer::Tcp(w) => sendfile_all(w.as_ref(), file, offset, len).await,
        }
    }
    /// On TCP, holds partial frames back until `cork(false)` (one reply, few packets).
    fn cork(&self, on: bool) {
        if let Writer::Tcp(w) = self {
            let v: libc::c_int = on as libc::c_int;
            // SAFETY: setsockopt on our open socket with a pointer to a local int.
            unsafe {
                libc::setsockopt(
                    w.as_ref().as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_CORK,
                    &v as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
    async fn send_zeroes(&mut self, mut len: usize) -> std::io::Result<()> {
        while len > 0 {
            let n = len.min(ZEROES.len());
            self.write_all(&ZEROES[..n]).await?;
            len -= n;
        }
        Ok(())
    }
}

/// Serves one client connection until it disconnects or the token fires.
pub(crate) async fn serve_connection<R>(proxy: Arc<BlockProxy>, rd: R, mut wr: Writer, peer: String, token: CancellationToken)
where
    R: AsyncRead + Send + Unpin + 'static,
{
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let session = tokio::select! {
        _ = token.cancelled() => return,
        r = handshake(&proxy, &mut rd, &mut wr) => r,
    };
    let session = match session {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(ConnError::Io(e)) => {
            tracing::debug!(peer, "connection closed during handshake: {e}");
            return;
        }
        Err(e) => {
            tracing::warn!(peer, "closing connection during handshake: {e}");
            return;
        }
    };
    tracing::debug!(peer, export = session.export.name(), structured = session.neg.structured, "client connected");
    let span = tracing::info_span!("nbd", image = %session.export.image(), peer = %peer);
    transmission(rd, wr, session, &proxy.shared.pollers, peer, token).instrument(span).await;
}

/// Negotiates options until the client starts transmission (`Some`) or aborts (`None`).
async fn handshake<R>(proxy: &BlockProxy, rd: &mut R, wr: &mut Writer) -> Result<Option<Session>, ConnError>
where
    R: AsyncRead + Unpin,
{
    wr.write_all(&p::greeting()).await?;
    let mut fb = [0u8; 4];
    rd.read_exact(&mut fb).await?;
    let mut hs = Handshake { cflags: p::parse_client_flags(fb)?, structured: false, meta_export: None, _held: None };
    loop {
        let Some((option, data)) = read_option(rd, wr).await? else { continue };
        let mut out = Vec::new();
        let opt = match p::parse_option(option, &data) {
            Ok(o) => o,
            Err(e) if option == p::OPT_EXPORT_NAME => return Err(p::FatalError::ExportName(e).into()),
            Err(e) => {
                p::option_error(&mut out, option, p::REP_ERR_INVALID, &e.0);
                wr.write_all(&out).await?;
                continue;
            }
        };
        match hs.answer(proxy, option, opt, &mut out).await? {
            Answered::Next => wr.write_all(&out).await?,
            Answered::Start(session) => {
                wr.write_all(&out).await?;
                return Ok(Some(session));
            }
            Answered::Abort => {
                let _ = wr.write_all(&out).await;
                return Ok(None);
            }
        }
    }
}

/// Reads one option's header and data: `None` when its data was too large to read (the
/// client got an error reply, and may go on).
async fn read_option<R>(rd: &mut R, wr: &mut Writer) -> Result<Option<(u32, Vec<u8>)>, ConnError>
where
    R: AsyncRead + Unpin,
{
    let mut hb = [0u8; 16];
    rd.read_exact(&mut hb).await?;
    let h = p::parse_option_header(&hb)?;
    if h.len > p::MAX_OPTION_LEN {
        if h.len > MAX_OPTION_DISCARD || h.option == p::OPT_EXPORT_NAME {
            return Err(ConnError::TooLarge { option: h.option, len: h.len });
        }
        tokio::io::copy(&mut (&mut *rd).take(h.len as u64), &mut tokio::io::sink()).await?;
        let mut out = Vec::new();
        p::option_error(&mut out, h.option, p::REP_ERR_TOO_BIG, &format!("option data of {} bytes is too large", h.len));
        wr.write_all(&out).await?;
        return Ok(None);
    }
    let mut data = vec![0u8; h.len as usize];
    rd.read_exact(&mut data).await?;
    Ok(Some((h.option, data)))
}

/// What the option phase has settled so far.
struct Handshake {
    cflags: p::ClientFlags,
    structured: bool,
    /// Export name the base:allocation context was selected for.
    meta_export: Option<String>,
    /// The export of the last successful NBD_OPT_INFO, kept open so the NBD_OPT_GO that
    /// usually follows gets the same version without resolving it again.
    _held: Option<Arc<Export>>,
}

/// After one option's reply: go on negotiating, start transmission, or close.
enum Answered {
    Next,
    Start(Session),
    Abort,
}

impl Handshake {
    /// Answers one option into `out`.
    async fn answer(&mut self, proxy: &BlockProxy, option: u32, opt: ClientOption, out: &mut Vec<u8>) -> Result<Answered, ConnError> {
        match opt {
            ClientOption::ExportName(name) => {
                // No way to report an error here but closing the connection.
                let export = proxy.open_export(&name).await?;
                let neg = Negotiated { size: export.size(), structured: self.structured, meta_context: self.meta_for(&name) };
                out.extend_from_slice(&p::export_name_reply(export.size(), neg.flags(), self.cflags.no_zeroes));
                return Ok(Answered::Start(Session { export, neg }));
            }
            ClientOption::Abort => {
                p::option_reply(out, option, p::REP_ACK, &[]);
                return Ok(Answered::Abort);
            }
            ClientOption::List => {
                for name in proxy.known_exports() {
                    p::rep_server(out, &name, "");
                }
                p::option_reply(out, option, p::REP_ACK, &[]);
            }
            ClientOption::StartTls => {
                p::option_error(out, option, p::REP_ERR_UNSUP, "TLS is not supported by the vgrid block proxy");
            }
            ClientOption::Info(req) | ClientOption::Go(req) => return Ok(self.info_or_go(proxy, option, req, out).await),
            ClientOption::StructuredReply => {
                if self.structured {
                    p::option_error(out, option, p::REP_ERR_INVALID, "structured replies already negotiated");
                } else {
                    self.structured = true;
                    p::option_reply(out, option, p::REP_ACK, &[]);
                }
            }
            ClientOption::ListMetaContext(q) | ClientOption::SetMetaContext(q) => self.meta_context(option, q, out),
            ClientOption::Unsupported(o) => {
                p::option_error(out, o, p::REP_ERR_UNSUP, &format!("option {o} is not supported by the vgrid block proxy"));
            }
        }
        Ok(Answered::Next)
    }

    /// Whether the base:allocation context was selected for export `name`.
    fn meta_for(&self, name: &str) -> bool {
        self.meta_export.as_deref() == Some(name)
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO`: the export's size, flags and the information asked for;
    /// a GO that succeeds starts transmission.
    async fn info_or_go(&mut self, proxy: &BlockProxy, option: u32, req: p::InfoRequest, out: &mut Vec<u8>) -> Answered {
        let go = option == p::OPT_GO;
        let export = match proxy.open_export(&req.name).await {
            Ok(export) => export,
            Err(e) => {
                tracing::info!(export = req.name, "export refused: {e}");
                p::option_error(out, option, p::REP_ERR_UNKNOWN, &format!("vgrid: {e}"));
                return Answered::Next;
            }
        };
        let neg = Negotiated { size: export.size(), structured: self.structured, meta_context: self.meta_for(&req.name) };
        p::info_export(out, option, export.size(), neg.flags());
        if req.requests.contains(&p::INFO_NAME) {
            p::info_string(out, option, p::INFO_NAME, &req.name);
        }
        if req.requests.contains(&p::INFO_DESCRIPTION) {
            let d = format!("vgrid image {} ({} bytes)", export.image(), export.size());
            p::info_string(out, option, p::INFO_DESCRIPTION, &d);
        }
        p::info_block_size(out, option, 1, p::PREFERRED_BLOCK, p::MAX_PAYLOAD);
        p::option_reply(out, option, p::REP_ACK, &[]);
        if go {
            return Answered::Start(Session { export, neg });
        }
        self._held = Some(export);
        Answered::Next
    }

    /// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: only base:allocation exists.
    fn meta_context(&mut self, option: u32, q: p::MetaQuery, out: &mut Vec<u8>) {
        let set = option == p::OPT_SET_META_CONTEXT;
        if set {
            self.meta_export = None;
        }
        if !self.structured {
            p::option_error(out, option, p::REP_ERR_INVALID, "negotiate structured replies first");
            return;
        }
        if p::meta_query_matches(&q.queries, set) {
            let id = if set { p::BASE_ALLOCATION_ID } else { 0 };
            p::rep_meta_context(out, option, id, p::BASE_ALLOCATION);
            if set {
                self.meta_export = Some(q.export.clone());
            }
        }
        p::option_reply(out, option, p::REP_ACK, &[]);
    }
}

/// State shared by the reader loop and the request tasks of one connection.
struct Conn {
    writer: tokio::sync::Mutex<Writer>,
    export: Arc<Export>,
    neg: Negotiated,
    peer: String,
    /// Fired when a reply could not be sent whole: the stream is out of step, close it.
    broken: CancellationToken,
    /// Fired when no reply can reach the client any more (it closed the connection without
    /// `NBD_CMD_DISC`, or a reply failed): its requests still in flight are dropped (a read
    /// waiting for an image server stops waiting for a client that is gone).
    gone: CancellationToken,
}

/// One piece of a reply: protocol bytes, a range of a chunk file, or zeroes.
enum Piece {
    Bytes(Vec<u8>),
    File { file: ChunkFile, offset: u32, len: usize },
    Zeroes(usize),
}

impl Conn {
    async fn send(&self, bytes: &[u8]) -> bool {
        let mut w = self.writer.lock().await;
        match w.write_all(bytes).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(peer = self.peer, "reply not sent: {e}");
                self.broken.cancel();
                self.gone.cancel();
                false
            }
        }
    }

    async fn send_pieces(&self, pieces: &[Piece]) {
        let mut w = self.writer.lock().await;
        w.cork(true);
        for piece in pieces {
            let r = match piece {
                Piece::Bytes(b) => w.write_all(b).await,
                Piece::File { file, offset, len } => w.send_file(file.file(), *offset as u64, *len).await,
                Piece::Zeroes(n) => w.send_zeroes(*n).await,
            };
            if let Err(e) = r {
                // Part of a reply may be out: the only safe move is to drop the connection.
                tracing::warn!(peer = self.peer, export = self.export.name(), "reply failed midway, closing connection: {e}");
                self.broken.cancel();
                self.gone.cancel();
                return;
            }
        }
        w.cork(false);
    }

    /// Appends the pieces carrying `[offset, offset+len)` of the disk: file ranges for stored
    /// chunks, zeroes for zero chunks.
    fn data_pieces(&self, first: u64, files: &[Option<ChunkFile>], offset: u64, len: u32, out: &mut Vec<Piece>) {
        let cs = self.export.chunk_size() as u64;
        let end = offset + len as u64;
        let mut pos = offset;
        while pos < end {
            let idx = pos / cs;
            let in_chunk = (pos % cs) as u32;
            let n = (cs - in_chunk as u64).min(end - pos) as usize;
            match &files[(idx - first) as usize] {
                Some(f) => out.push(Piece::File { file: f.clone(), offset: in_chunk, len: n }),
                None => match out.last_mut() {
                    Some(Piece::Zeroes(z)) => *z += n,
                    _ => out.push(Piece::Zeroes(n)),
                },
            }
            pos += n as u64;
        }
    }

    /// Answers a read; `run`: the bytes the connection read contiguously just before it (see
    /// [`Export::files_for`]).
    async fn read(&self, cookie: u64, offset: u64, len: u32, df: bool, run: u64) {
        let t0 = std::time::Instant::now();
        self.read_inner(cookie, offset, len, df, run).await;
        crate::metrics::nbd_read(len, t0.elapsed());
    }

    async fn read_inner(&self, cookie: u64, offset: u64, len: u32, df: bool, run: u64) {
        if let Some(data) = self.export.hot_read(offset, len as u64).await {
            self.reply_data(cookie, offset, &data).await;
            return;
        }
        let (first, files) = match self.export.files_for(offset, len as u64, Some(run)).await {
            Ok(f) => f,
            Err(e) => {
                self.send(&p::error_reply(self.neg.structured, p::EIO, cookie, &e.to_string())).await;
                return;
            }
        };
        self.reply_read(cookie, offset, len, df, first, &files).await;
    }

    /// Answers a read in its own task (holding one of the connection's `permit`s); dropped
    /// unanswered if the client goes away meanwhile.
    #[allow(clippy::too_many_arguments)]
    fn spawn_read(self: &Arc<Self>, permit: tokio::sync::OwnedSemaphorePermit, cookie: u64, offset: u64, len: u32, df: bool, run: u64) {
        let c = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = c.gone.cancelled() => {}
                _ = c.read(cookie, offset, len, df, run) => {}
            }
            drop(permit);
        });
    }

    /// Answers `NBD_CMD_CACHE` (fetches the range into the cache) like [`Conn::spawn_read`].
    fn spawn_cache(self: &Arc<Self>, permit: tokio::sync::OwnedSemaphorePermit, cookie: u64, offset: u64, len: u32) {
        let c = self.clone();
        tokio::spawn(async move {
            let files = tokio::select! {
                _ = c.gone.cancelled() => None,
                r = c.export.files(offset, len as u64) => Some(r),
            };
            let reply = match files {
                None => None,
                Some(Ok(_)) => Some(p::ok_reply(c.neg.structured, cookie)),
                Some(Err(e)) => Some(p::error_reply(c.neg.structured, p::EIO, cookie, &e.to_string())),
            };
            if let Some(reply) = reply {
                c.send(&reply).await;
            }
            drop(permit);
        });
    }

    /// Sends the reply to a read whose bytes are at hand (hot pages: never holes).
    async fn reply_data(&self, cookie: u64, offset: u64, data: &[u8]) {
        let mut buf;
        if self.neg.structured {
            let hl = p::STRUCTURED_HEADER_LEN;
            buf = vec![0u8; hl + 8];
            p::structured_header(&mut buf[..hl], p::REPLY_FLAG_DONE, p::REPLY_TYPE_OFFSET_DATA, cookie, 8 + data.len() as u32);
            buf[hl..hl + 8].copy_from_slice(&offset.to_be_bytes());
        } else {
            buf = p::simple_reply_vec(0, cookie);
        }
        buf.extend_from_slice(data);
        self.send(&buf).await;
    }

    /// Sends the reply to a read whose chunk files are at hand.
    async fn reply_read(&self, cookie: u64, offset: u64, len: u32, df: bool, first: u64, files: &[Option<ChunkFile>]) {
        let export = &self.export;
        let mut pieces = Vec::with_capacity(4);
        if !self.neg.structured {
            pieces.push(Piece::Bytes(p::simple_reply_vec(0, cookie)));
            self.data_pieces(first, files, offset, len, &mut pieces);
        } else {
            let segs = if df {
                vec![p::Segment { offset, len, hole: false }]
            } else {
                p::read_segments(offset, len, export.chunk_size(), |i| export.is_zero_chunk(i))
            };
            for (k, s) in segs.iter().enumerate() {
                let flags = if k + 1 == segs.len() { p::REPLY_FLAG_DONE } else { 0 };
                let mut h = vec![0u8; p::STRUCTURED_HEADER_LEN + if s.hole { 12 } else { 8 }];
                let hl = p::STRUCTURED_HEADER_LEN;
                if s.hole {
                    p::structured_header(&mut h[..hl], flags, p::REPLY_TYPE_OFFSET_HOLE, cookie, 12);
                    h[hl..hl + 8].copy_from_slice(&s.offset.to_be_bytes());
                    h[hl + 8..hl + 12].copy_from_slice(&s.len.to_be_bytes());
                    pieces.push(Piece::Bytes(h));
                } else {
                    p::structured_header(&mut h[..hl], flags, p::REPLY_TYPE_OFFSET_DATA, cookie, 8 + s.len);
                    h[hl..hl + 8].copy_from_slice(&s.offset.to_be_bytes());
                    pieces.push(Piece::Bytes(h));
                    self.data_pieces(first, files, s.offset, s.len, &mut pieces);
                }
            }
        }
        let data_len: usize = pieces
            .iter()
            .map(|p| match p {
                Piece::Bytes(b) => b.len(),
                Piece::File { len, .. } => *len,
                Piece::Zeroes(n) => *n,
            })
            .sum();
        if data_len <= SMALL_REPLY {
            // Small replies: one buffer, one write (cheaper than a sendfile per piece).
            match flatten(&pieces, data_len) {
                Ok(buf) => {
                    self.send(&buf).await;
                }
                Err(e) => {
                    tracing::error!(peer = self.peer, image = %export.image(), offset, "reading cached chunk failed: {e}");
                    self.send(&p::error_reply(
                        self.neg.structured,
                        p::EIO,
                        cookie,
                        &format!("image {}: reading cached chunk failed: {e}", export.image()),
                    ))
                    .await;
                }
            }
        } else {
            self.send_pieces(&pieces).await;
        }
    }
}

/// Replies up to this size are copied into one buffer and written at once.
const SMALL_REPLY: usize = 64 * 1024;

fn flatten(pieces: &[Piece], len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut pos = 0;
    for p in pieces {
        match p {
            Piece::Bytes(b) => buf[pos..pos + b.len()].copy_from_slice(b),
            Piece::File { file, offset, len } => file.read_at(&mut buf[pos..pos + len], *offset)?,
            Piece::Zeroes(_) => {} // already zero
        }
        pos += match p {
            Piece::Bytes(b) => b.len(),
            Piece::File { len, .. } => *len,
            Piece::Zeroes(n) => *n,
        };
    }
    Ok(buf)
}

async fn transmission<R>(mut rd: BufReader<R>, wr: Writer, session: Session, pollers: &Pollers, peer: String, token: CancellationToken)
where
    R: AsyncRead + Unpin,
{
    let Session { export, neg } = session;
    let fd = wr.raw_fd();
    let mut polling = pollers.connection();
    let broken = token.child_token();
    let conn = Arc::new(Conn {
        writer: tokio::sync::Mutex::new(wr),
        export: export.clone(),
        neg,
        peer: peer.clone(),
        broken: broken.clone(),
        gone: CancellationToken::new(),
    });
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT as usize));
    let mut next_expected = u64::MAX;
    // Bytes read contiguously up to `next_expected` (the current sequential run).
    let mut run = 0u64;
    loop {
        let mut hb = [0u8; p::REQUEST_LEN];
        // A client that keeps the pace gets its next request read by polling (`busy.rs`).
        let polled = if rd.buffer().is_empty() { polling.poll(fd, &mut hb) } else { 0 };
        let r = if polled == hb.len() {
            Ok(polled)
        } else {
            tokio::select! {
                biased;
                _ = broken.cancelled() => break,
                r = rd.read_exact(&mut hb[polled..]) => r,
            }
        };
        polling.arrived(fd, !rd.buffer().is_empty());
        if let Err(e) = r {
            if e.kind() != std::io::ErrorKind::UnexpectedEof {
                tracing::debug!(peer, "connection read failed: {e}");
            }
            // Closed without NBD_CMD_DISC: nobody reads the replies of what is in flight.
            conn.gone.cancel();
            break;
        }
        let req = match p::parse_request(&hb) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(peer, export = export.name(), "{e}; closing connection");
                break;
            }
        };
        match p::check_request(&req, &neg) {
            Err(refusal) => {
                if refusal.drain > 0 {
                    if refusal.drain > MAX_DRAIN {
                        tracing::warn!(peer, export = export.name(), "write of {} bytes refused; closing connection", refusal.drain);
                        break;
                    }
                    let drained = tokio::io::copy(&mut (&mut rd).take(refusal.drain as u64), &mut tokio::io::sink()).await;
                    if !matches!(drained, Ok(n) if n == refusal.drain as u64) {
                        break;
                    }
                }
                tracing::debug!(peer, export = export.name(), error = refusal.error, "request refused: {}", refusal.message);
                conn.send(&p::error_reply(neg.structured, refusal.error, req.cookie, &refusal.message)).await;
            }
            Ok(Command::Disconnect) => break,
            Ok(Command::Flush) => {
                conn.send(&p::ok_reply(neg.structured, req.cookie)).await;
            }
            Ok(Command::BlockStatus { offset, len, req_one }) => {
                let ext = p::allocation_extents(offset, len, export.size(), export.chunk_size(), req_one, |i| export.is_zero_chunk(i));
                conn.send(&p::block_status_reply(req.cookie, &ext)).await;
            }
            Ok(Command::Read { offset, len, df }) => {
                // A read that continues the previous one is sequential: its misses fetch
                // ahead within their chunk as far as the run so far, and past a chunk of run
                // whole chunks are read ahead; any other read fetches only the blocks it covers.
                let before = if offset == next_expected { run } else { 0 };
                run = before.saturating_add(len as u64);
                next_expected = offset + len as u64;
                if before > 0 {
                    export.readahead(next_expected, run);
                }
                // Fast path: a small read of hot pages or of cached chunks is answered inline,
                // no task (while hot pages load, the read waits for them in its task).
                let hot = export.hot_read_now(offset, len as u64);
                if let Ok(Some(data)) = &hot {
                    conn.reply_data(req.cookie, offset, data).await;
                    continue;
                }
                if len as usize <= SMALL_REPLY && hot.is_ok() {
                    if let Some((first, files)) = export.cached_files(offset, len as u64) {
                        conn.reply_read(req.cookie, offset, len, df, first, &files).await;
                        continue;
                    }
                }
                let Ok(permit) = slots.clone().acquire_owned().await else { break };
                conn.spawn_read(permit, req.cookie, offset, len, df, before);
            }
            Ok(Command::Cache { offset, len }) => {
                let Ok(permit) = slots.clone().acquire_owned().await else { break };
                conn.spawn_cache(permit, req.cookie, offset, len);
            }
        }
    }
    // Let in-flight requests finish and reply before the connection closes.
    let _ = slots.acquire_many(MAX_INFLIGHT).await;
    let _ = conn.writer.lock().await.shutdown().await;
    tracing::debug!(peer, export = export.name(), "client disconnected");
}

impl BlockProxy {
    /// Export names for `NBD_OPT_LIST`: images staged locally (their manifests are kept).
    pub(crate) fn known_exports(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.config().cache_dir.join("manifests"))
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// Who may connect to a unix-socket NBD server: the socket's mode and group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// File mode of the socket (connecting needs write permission), e.g. `0o660`.
    pub mode: u32,
    /// Group of the socket; `None` keeps the creating process's group.
    pub gid: Option<u32>,
}
