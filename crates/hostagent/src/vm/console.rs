//! The guest's serial console: its log (tail, waiting for a text) and its socket (typing).

use super::{Vm, VmError};
use crate::runtime::tail_file;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::net::UnixStream;

impl Vm {
    /// Last `n` lines of the console log.
    pub fn tail_console(&self, n: usize) -> Vec<String> {
        tail_file(&self.console_log_path(), n)
    }

    /// Current length in bytes of the console log (an offset for [`Vm::wait_for_console_from`]).
    pub fn console_log_len(&self) -> u64 {
        std::fs::metadata(self.console_log_path()).map(|m| m.len()).unwrap_or(0)
    }

    /// Waits until `text` appears anywhere in the console log; returns the line holding it.
    pub async fn wait_for_console(&self, text: &str, timeout: Duration) -> Result<String, VmError> {
        self.wait_for_console_from(0, text, timeout).await
    }

    /// Waits until `text` appears in the console log after byte `offset`; returns the line
    /// holding it. Fails if QEMU exits first or `timeout` passes, with the last console lines.
    pub async fn wait_for_console_from(&self, offset: u64, text: &str, timeout: Duration) -> Result<String, VmError> {
        let path = self.console_log_path();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf: Vec<u8> = Vec::new();
        let mut pos = offset;
        let needle = text.as_bytes();
        loop {
            let exited = self.exit_info();
            // Read what is new since the last look.
            if let Ok(mut f) = tokio::fs::File::open(&path).await {
                if f.seek(std::io::SeekFrom::Start(pos)).await.is_ok() {
                    let mut chunk = Vec::new();
                    if let Ok(n) = f.read_to_end(&mut chunk).await {
                        pos += n as u64;
                        buf.extend_from_slice(&chunk);
                    }
                }
            }
            if let Some(i) = find(&buf, needle) {
                let start = buf[..i].iter().rposition(|&b| b == b'\n').map(|p| p + 1).unwrap_or(0);
                let end = buf[i..].iter().position(|&b| b == b'\n').map(|p| i + p).unwrap_or(buf.len());
                return Ok(String::from_utf8_lossy(&buf[start..end]).trim_end_matches('\r').to_string());
            }
            // Keep only a tail long enough to hold a match straddling two reads, plus its line.
            if buf.len() > 64 * 1024 + needle.len() {
                buf.drain(..buf.len() - 64 * 1024);
            }
            if let Some(exit) = exited {
                return Err(VmError::ConsoleExited {
                    id: self.spec.id.clone(),
                    text: text.to_string(),
                    exit,
                    tail: self.tail_console(20).join("\n"),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(VmError::ConsoleTimeout {
                    id: self.spec.id.clone(),
                    text: text.to_string(),
                    after: timeout,
                    tail: self.tail_console(20).join("\n"),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new connection to the serial console socket (for an interactive console). QEMU serves
    /// one console client at a time: while [`Vm::send_console`] holds its connection (until
    /// [`Vm::release_console`]), a second client connects but sees nothing. The client must
    /// keep reading: unread output fills the socket and stalls the guest's serial console.
    pub async fn console_connect(&self) -> Result<UnixStream, VmError> {
        let p = self.console_socket_path();
        UnixStream::connect(&p).await.map_err(|source| VmError::Io { id: self.spec.id.clone(), path: p, source })
    }

    /// Types `text` on the serial console, over a connection kept open for later calls.
    /// What the guest prints back on it is discarded (it is in the console log): a client
    /// that never reads would fill the socket and stall the guest's serial output.
    pub async fn send_console(&self, text: &str) -> Result<(), VmError> {
        let mut guard = self.console.lock().await;
        let c = self.kept_console(&mut guard).await?;
        if let Err(source) = c.write.write_all(text.as_bytes()).await {
            *guard = None;
            return Err(VmError::Io { id: self.spec.id.clone(), path: self.console_socket_path(), source });
        }
        Ok(())
    }

    /// The kept console connection, made (with its task draining what the guest prints) if
    /// there is none.
    async fn kept_console<'a>(&self, guard: &'a mut Option<ConsoleWriter>) -> Result<&'a mut ConsoleWriter, VmError> {
        if guard.is_none() {
            let (mut read, write) = self.console_connect().await?.into_split();
            let drain = tokio::spawn(async move {
                let mut sink = tokio::io::sink();
                let _ = tokio::io::copy(&mut read, &mut sink).await;
            });
            *guard = Some(ConsoleWriter { write, drain });
        }
        Ok(guard.as_mut().expect("console connected above"))
    }

    /// Holds a draining console connection while QEMU loads a guest's state (a migration or
    /// a restore), until [`Vm::release_console`]. A guest whose console was stalled where it
    /// was saved or migrated from (a client there stopped reading, so its UART waits to send)
    /// loads waiting still, and QEMU re-arms that wait only on a console client connected at
    /// load time: with none, the guest's console output (and whatever writes to it) stays
    /// blocked forever. Held across the load, the connection takes the waiting output, and the
    /// console runs on after [`Vm::release_console`] (a console with no client discards).
    pub async fn hold_console_for_load(&self) {
        let mut guard = self.console.lock().await;
        if let Err(e) = self.kept_console(&mut guard).await {
            tracing::warn!(vm = %self.spec.id, "no console connection while the state loads (a console stalled at the source stays so): {e}");
        }
    }

    /// Closes the connection [`Vm::send_console`] or [`Vm::hold_console_for_load`] keeps.
    pub async fn release_console(&self) {
        *self.console.lock().await = None;
    }
}

/// The console connection [`Vm::send_console`] keeps, with the task draining its read side.
pub(super) struct ConsoleWriter {
    write: tokio::net::unix::OwnedWriteHalf,
    drain: tokio::task::JoinHandle<()>,
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        self.drain.abort();
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}
