//! The send buffer of a local (unix socket) NBD client's connection. Replies leave the cache by
//! `sendfile(2)`, which hands the socket references to page-cache pages: the proxy fills the
//! buffer at once and sleeps, and the client copies the bytes out. With the default buffer
//! (`net.core.wmem_default`, 208 KiB) a sequential reader empties it in tens of microseconds,
//! and the proxy is woken to refill it only once three quarters are gone (the unix socket's
//! rule): on a 2-vCPU VM the wake-up takes about as long as the client's copy of what is left,
//! so the client waited on the proxy for about half of every second (`perf`: CPUs idle half
//! the time during 1 MiB reads at depth 8; `bench/README.md`, `proxy`). A few MiB keep several
//! replies in flight, the wake-up hidden behind the client's copy. Not for TCP, whose buffers
//! the kernel sizes itself (setting one turns that off).

use std::os::fd::{AsFd, AsRawFd};

/// Bytes asked for a unix client's send buffer (the kernel doubles it for its bookkeeping).
pub(crate) const UNIX_SEND_BUFFER: libc::c_int = 4 << 20;

/// Sets `sock`'s send buffer to `bytes`: past `net.core.wmem_max` where the process may
/// (`SO_SNDBUFFORCE`, CAP_NET_ADMIN, which socket2 does not offer), else up to it
/// (`SO_SNDBUF`). Returns the size the kernel took (`SO_SNDBUF` read back).
pub(crate) fn widen(sock: &impl AsFd, bytes: libc::c_int) -> std::io::Result<usize> {
    let s = socket2::SockRef::from(sock);
    // SAFETY: setsockopt on a descriptor borrowed for the call, with a pointer to a local int.
    let forced = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            &bytes as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        s.set_send_buffer_size(bytes as usize)?;
    }
    s.send_buffer_size()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unix_socket_gets_the_send_buffer_asked_for_or_the_most_it_may() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let before = socket2::SockRef::from(&a).send_buffer_size().unwrap();
        let took = widen(&a, UNIX_SEND_BUFFER).unwrap();
        assert_eq!(took, socket2::SockRef::from(&a).send_buffer_size().unwrap(), "the answer is what the socket has now");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Root may pass wmem_max; the kernel doubles the value asked.
            assert_eq!(took, 2 * UNIX_SEND_BUFFER as usize, "as root, the buffer is the size asked for");
        } else {
            assert!(took >= before, "never smaller than the default ({before} -> {took})");
        }
    }

    #[test]
    fn a_descriptor_that_is_no_socket_is_an_error_not_a_panic() {
        let f = tempfile::tempfile().unwrap();
        let e = widen(&f, UNIX_SEND_BUFFER).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTSOCK), "{e}");
    }
}
