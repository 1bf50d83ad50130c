//! A small QMP (QEMU Machine Protocol) client over a unix socket.
//!
//! QMP is JSON objects, one per line. On connect QEMU sends a greeting (`{"QMP": {...}}`); the
//! client must send `qmp_capabilities` before anything else. Commands are
//! `{"execute": NAME, "arguments": {...}, "id": N}`; QEMU answers `{"return": ..., "id": N}` or
//! `{"error": {"class": ..., "desc": ...}, "id": N}`. Asynchronous events
//! (`{"event": NAME, "data": {...}, "timestamp": {...}}`) may arrive at any time; they are
//! delivered to every [`QmpClient::subscribe`] receiver.
//!
//! A QEMU QMP socket serves one client at a time.

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};

/// Default time a command may take before [`QmpError::Timeout`].
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// What went wrong talking QMP, always naming the socket or the command.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {after:?} connecting to QMP socket {path} (no greeting)")]
    ConnectTimeout { path: PathBuf, after: Duration },
    #[error("QMP socket {path}: bad greeting: {detail}")]
    Greeting { path: PathBuf, detail: String },
    #[error("QMP socket {path}: I/O error: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
    #[error("QMP command {command} timed out after {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("QMP connection {path} closed before command {command} was answered")]
    Closed { path: PathBuf, command: String },
    #[error("QMP socket {path}: cannot encode arguments of {command}: {source}")]
    Encode {
        path: PathBuf,
        command: String,
        #[source]
        source: serde_json::Error,
    },
}

/// An asynchronous QMP event (`SHUTDOWN`, `STOP`, `RESUME`, `POWERDOWN`, …).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub event: String,
    /// The event's `data` member (`Value::Null` when absent).
    pub data: Value,
    /// Seconds and microseconds since the epoch, as QEMU reported them.
    pub timestamp: Option<(i64, i64)>,
}

/// QEMU's version as announced in the QMP greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
    pub package: String,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, (String, String)>>>>>;

/// A connected, negotiated QMP session. Cheap to share behind an `Arc`; every method takes
/// `&self`.
pub struct QmpClient {
    path: PathBuf,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<QmpEvent>,
    closed: Arc<AtomicBool>,
    version: QmpVersion,
    reader: tokio::task::JoinHandle<()>,
    command_timeout: Duration,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient").field("path", &self.path).field("version", &self.version).finish()
    }
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl QmpClient {
    /// Connects to the QMP socket at `path`, reads the greeting and negotiates capabilities,
    /// all within `timeout`. One attempt: a missing socket is [`QmpError::Connect`].
    pub async fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<QmpClient, QmpError> {
        let path = path.as_ref().to_path_buf();
        let stream = match tokio::time::timeout(timeout, UnixStream::connect(&path)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(QmpError::Connect { path, source }),
            Err(_) => return Err(QmpError::ConnectTimeout { path, after: timeout }),
        };
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read);
        let greeting = match tokio::time::timeout(timeout, read_json_line(&mut lines)).await {
            Ok(Ok(Some(v))) => v,
            Ok(Ok(None)) => return Err(QmpError::Greeting { path, detail: "connection closed before the greeting".into() }),
            Ok(Err(source)) => return Err(QmpError::Io { path, source }),
            Err(_) => return Err(QmpError::ConnectTimeout { path, after: timeout }),
        };
        let version = parse_greeting(&greeting).ok_or_else(|| QmpError::Greeting { path: path.clone(), detail: greeting.to_string() })?;

        let (events, _) = broadcast::channel(256);
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let closed = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(read_loop(path.clone(), lines, pending.clone(), events.clone(), closed.clone()));
        let client = QmpClient {
            path,
            writer: tokio::sync::Mutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            events,
            closed,
            version,
            reader,
            command_timeout: timeout.max(DEFAULT_COMMAND_TIMEOUT),
        };
        client.execute_timeout("qmp_capabilities", None, timeout).await?;
        Ok(client)
    }

    /// The socket this client is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// QEMU's version from the greeting.
    pub fn version(&self) -> &QmpVersion {
        &self.version
    }

    /// A receiver of every event arriving from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// True once QEMU closed the connection (e.g. it exited).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Runs `command` with optional `arguments` (a JSON object) and returns its `return` value,
    /// waiting at most the default command timeout.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_timeout(command, arguments, self.command_timeout).await
    }

    /// [`QmpClient::execute`] with an explicit timeout.
    pub async fn execute_timeout(&self, command: &str, arguments: Option<Value>, timeout: Duration) -> Result<Value, QmpError> {
        self.request(command, arguments, None, timeout).await
    }

    /// Hands QEMU a copy of `fd` under `name` (`getfd`, the descriptor riding on the command's
    /// own message as `SCM_RIGHTS`), for a later command to use as `fd:NAME` (`migrate`,
    /// `migrate-incoming`, …). The caller's `fd` stays the caller's to close.
    pub async fn pass_fd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        self.request("getfd", Some(json!({ "fdname": name })), Some(fd), self.command_timeout).await.map(|_| ())
    }

    async fn request(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let closed_err = || QmpError::Closed { path: self.path.clone(), command: command.to_string() };
        if self.is_closed() {
            return Err(closed_err());
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg).map_err(|source| QmpError::Encode {
            path: self.path.clone(),
            command: command.to_string(),
            source,
        })?;
        line.push(b'\n');

        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        // The reader may have seen EOF between the check above and the insert.
        if self.is_closed() {
            self.pending.lock().unwrap().remove(&id);
            return Err(closed_err());
        }
        tracing::debug!(qmp = %self.path.display(), command, id, "qmp execute");
        let result = tokio::time::timeout(timeout, async {
            {
                let mut w = self.writer.lock().await;
                if let Err(source) = write_message(&mut w, &line, fd).await {
                    return Err(if self.is_closed() || source.kind() == std::io::ErrorKind::BrokenPipe {
                        closed_err()
                    } else {
                        QmpError::Io { path: self.path.clone(), source }
                    });
                }
            }
            match rx.await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err((class, desc))) => Err(QmpError::Command { command: command.to_string(), class, desc }),
                Err(_) => Err(closed_err()),
            }
        })
        .await;
        match result {
            Ok(r) => r,
            Err(_) => {
                self.pending.lock().unwrap().remove(&id);
                Err(QmpError::Timeout { command: command.to_string(), after: timeout })
            }
        }
    }
}

/// Writes one command line; with `fd`, its first bytes carry the descriptor (`SCM_RIGHTS`).
async fn write_message(w: &mut OwnedWriteHalf, line: &[u8], fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    let Some(fd) = fd else {
        return w.write_all(line).await;
    };
    let stream: &UnixStream = w.as_ref();
    let sent = stream
        .async_io(tokio::io::Interest::WRITABLE, || {
            let fds = [fd.as_raw_fd()];
            sendmsg::<()>(stream.as_raw_fd(), &[IoSlice::new(line)], &[ControlMessage::ScmRights(&fds)], MsgFlags::MSG_NOSIGNAL, None)
                .map_err(std::io::Error::from)
        })
        .await?;
    w.write_all(&line[sent..]).await
}

async fn read_json_line(r: &mut BufReader<OwnedReadHalf>) -> std::io::Result<Option<Value>> {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(t) {
            Ok(v) => return Ok(Some(v)),
            Err(e) => {
                tracing::warn!(line = t, error = %e, "ignoring a QMP line that is not JSON");
            }
        }
    }
}

fn parse_greeting(v: &Value) -> Option<QmpVersion> {
    let ver = v.get("QMP")?.get("version")?;
    let q = ver.get("qemu")?;
    let n = |k: &str| q.get(k).and_then(Value::as_u64).map(|x| x as u32);
    Some(QmpVersion {
        major: n("major")?,
        minor: n("minor")?,
        micro: n("micro")?,
        package: ver.get("package").and_then(Value::as_str).unwrap_or("").trim().to_string(),
    })
}

async fn read_loop(
    path: PathBuf,
    mut lines: BufReader<OwnedReadHalf>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    closed: Arc<AtomicBool>,
) {
    loop {
        let msg = match read_json_line(&mut lines).await {
            Ok(Some(v)) => v,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(qmp = %path.display(), error = %e, "QMP read failed");
                break;
            }
        };
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let timestamp = msg.get("timestamp").and_then(|t| Some((t.get("seconds")?.as_i64()?, t.get("microseconds")?.as_i64()?)));
            let ev = QmpEvent { event: name.to_string(), data: msg.get("data").cloned().unwrap_or(Value::Null), timestamp };
            tracing::debug!(qmp = %path.display(), event = %ev.event, "qmp event");
            let _ = events.send(ev);
            continue;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            tracing::debug!(qmp = %path.display(), %msg, "QMP reply without our id");
            continue;
        };
        let Some(tx) = pending.lock().unwrap().remove(&id) else {
            continue;
        };
        let reply = if let Some(r) = msg.get("return") {
            Ok(r.clone())
        } else if let Some(e) = msg.get("error") {
            let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            Err((s("class"), s("desc")))
        } else {
            Err(("ProtocolError".to_string(), format!("unexpected reply {msg}")))
        };
        let _ = tx.send(reply);
    }
    closed.store(true, Ordering::SeqCst);
    // Dropping the senders wakes every waiter with "closed".
    pending.lock().unwrap().clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A scripted fake QMP server, to test the protocol handling without QEMU.
    async fn serve(listener: UnixListener, script: Vec<(&'static str, &'static str)>) {
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"test\"}, \"capabilities\": []}}\n").await.unwrap();
        for (expect, reply) in script {
            let v = read_json_line(&mut r).await.unwrap().unwrap();
            assert_eq!(v["execute"], expect);
            let id = v["id"].clone();
            let mut rep: Value = serde_json::from_str(reply).unwrap();
            if rep.get("event").is_none() {
                rep["id"] = id;
            }
            w.write_all(format!("{rep}\n").as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn negotiates_executes_and_reports_errors_and_events() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("q.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(serve(
            l,
            vec![
                ("qmp_capabilities", r#"{"return": {}}"#),
                ("query-status", r#"{"return": {"status": "running", "running": true}}"#),
                ("bogus", r#"{"error": {"class": "CommandNotFound", "desc": "The command bogus has not been found"}}"#),
            ],
        ));
        let c = QmpClient::connect(&sock, Duration::from_secs(5)).await.unwrap();
        assert_eq!(c.version().major, 10);
        let st = c.execute("query-status", None).await.unwrap();
        assert_eq!(st["status"], "running");
        match c.execute("bogus", Some(json!({"x": 1}))).await {
            Err(QmpError::Command { command, class, desc }) => {
                assert_eq!(command, "bogus");
                assert_eq!(class, "CommandNotFound");
                assert!(desc.contains("bogus"));
            }
            other => panic!("expected a command error, got {other:?}"),
        }
        server.await.unwrap();
        // Server closed the connection: further commands fail with Closed.
        let err = c.execute("query-status", None).await.unwrap_err();
        assert!(matches!(err, QmpError::Closed { .. }), "{err}");
        assert!(c.is_closed());
    }

    #[tokio::test]
    async fn delivers_events_and_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("q.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let (go_tx, go_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 9}, \"package\": \"\"}, \"capabilities\": []}}\n").await.unwrap();
            let v = read_json_line(&mut r).await.unwrap().unwrap();
            w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", v["id"]).as_bytes()).await.unwrap();
            go_rx.await.unwrap();
            w.write_all(b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n").await.unwrap();
            // Never answer the next command.
            let _ = read_json_line(&mut r).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let c = QmpClient::connect(&sock, Duration::from_secs(5)).await.unwrap();
        let mut ev = c.subscribe();
        go_tx.send(()).unwrap();
        let e = ev.recv().await.unwrap();
        assert_eq!(e.event, "STOP");
        assert_eq!(e.timestamp, Some((1, 2)));
        let err = c.execute_timeout("query-status", None, Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(err, QmpError::Timeout { ref command, .. } if command == "query-status"), "{err}");
        server.abort();
    }

    #[tokio::test]
    async fn missing_socket_is_a_connect_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("absent.sock");
        let err = QmpClient::connect(&sock, Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, QmpError::Connect { .. }));
        assert!(err.to_string().contains("absent.sock"), "{err}");
    }

    /// Against a real QEMU (no guest: `-machine none`): `getfd` succeeds only when a descriptor
    /// came with the message, and QEMU then holds it under the name until `closefd`.
    #[tokio::test]
    async fn passes_a_descriptor_that_qemu_holds_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let qemu = std::env::var_os("VGRID_QEMU_SYSTEM").unwrap_or_else(|| "qemu-system-x86_64".into());
        let mut child = tokio::process::Command::new(qemu)
            .args(["-machine", "none", "-nodefaults", "-display", "none", "-S", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .kill_on_drop(true)
            .spawn()
            .expect("qemu-system-x86_64 starts (scripts/install-deps.sh installs it)");
        let mut c = None;
        for _ in 0..500 {
            if let Ok(q) = QmpClient::connect(&sock, Duration::from_secs(5)).await {
                c = Some(q);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let c = c.expect("QEMU's QMP socket answers");
        // Without a descriptor QEMU refuses the command.
        let err = c.execute("getfd", Some(json!({"fdname": "none"}))).await.unwrap_err();
        assert!(matches!(err, QmpError::Command { .. }), "{err}");
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        c.pass_fd("mig", std::os::fd::AsFd::as_fd(&a)).await.unwrap();
        c.execute("closefd", Some(json!({"fdname": "mig"}))).await.expect("QEMU holds the descriptor under its name");
        let err = c.execute("closefd", Some(json!({"fdname": "mig"}))).await.unwrap_err();
        assert!(err.to_string().contains("mig"), "{err}");
        let _ = c.execute("quit", None).await;
        let _ = child.wait().await;
    }
}
