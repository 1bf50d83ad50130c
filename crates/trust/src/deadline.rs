//! A bound on how long a client may take to send its first request's headers: a connection
//! whose header block has not ended [`HEADER_READ_TIMEOUT`] after the TLS handshake is closed.
//! Slow-loris clients (many connections dripping header bytes) thereby hold a connection for a
//! bounded time; hyper's own header timeout needs a timer `axum::serve` does not give it. Once
//! the headers are in, the connection is the server's as before (long polls, WebSockets and
//! streamed answers are not cut).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How long a new connection may take to send its first request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// An I/O stream that fails its reads once [`HEADER_READ_TIMEOUT`] has passed without the
/// first blank line (the end of a header block: `\r\n\r\n` or `\n\n`).
pub struct HeaderDeadline<S> {
    inner: S,
    /// Until the headers ended: the deadline and the line feeds seen in a row (`\r` ignored).
    pending: Option<(Pin<Box<tokio::time::Sleep>>, u8)>,
}

impl<S> HeaderDeadline<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        HeaderDeadline { inner, pending: Some((Box::pin(tokio::time::sleep(timeout)), 0)) }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("the request headers did not arrive within {} s", HEADER_READ_TIMEOUT.as_secs()))
}

impl<S: AsyncRead + Unpin> AsyncRead for HeaderDeadline<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let Some((sleep, feeds)) = &mut this.pending else { return r };
        match &r {
            Poll::Ready(Ok(())) => {
                for &b in &buf.filled()[before..] {
                    match b {
                        b'\n' => *feeds += 1,
                        b'\r' => {}
                        _ => *feeds = 0,
                    }
                    if *feeds >= 2 {
                        this.pending = None;
                        return r;
                    }
                }
                if sleep.is_elapsed() {
                    return Poll::Ready(Err(timed_out()));
                }
            }
            Poll::Pending => {
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(timed_out()));
                }
            }
            Poll::Ready(Err(_)) => {}
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeaderDeadline<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_header_block_that_does_not_end_in_time_fails_the_read_and_one_that_ends_does_not() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut s = HeaderDeadline::new(server, Duration::from_millis(300));
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let mut buf = [0u8; 256];
        assert!(s.read(&mut buf).await.unwrap() > 0);
        let e = s.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);

        let (mut client, server) = tokio::io::duplex(1024);
        let mut s = HeaderDeadline::new(server, Duration::from_millis(300));
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        assert!(s.read(&mut buf).await.unwrap() > 0);
        // Past the headers nothing times out: an idle connection waits (here 3 times as long).
        let idle = tokio::time::timeout(Duration::from_millis(900), s.read(&mut buf)).await;
        assert!(idle.is_err(), "a read after the headers ended was cut: {idle:?}");
        client.write_all(b"more").await.unwrap();
        assert_eq!(s.read(&mut buf).await.unwrap(), 4);
    }
}
