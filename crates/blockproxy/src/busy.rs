//! Busy polling of a connection's next request: a client that sends its next request within a
//! few microseconds of the last reply (one read in flight, one after another: a guest reading
//! a file, fio at queue depth 1) gets it read while this task is still running, instead of
//! this worker sleeping in `epoll_wait` and being woken again: on this class of machine (a VM,
//! 2 vCPUs) that sleep and wake cost about as much as the whole request (~20 us of ~45 us).
//! It is what the kernel's `SO_BUSY_POLL` and the guest's `haltpoll` do one layer down, and is
//! bounded the same way: a connection polls only while its client keeps the pace (the last
//! gap was within the window), for at most the window, yielding to the runtime between tries,
//! and at most [`Pollers::max`] connections of a proxy poll at once.

use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The connections of one proxy polling at the moment, and how many may.
#[derive(Debug)]
pub(crate) struct Pollers {
    window: Duration,
    max: usize,
    now: AtomicUsize,
}

impl Pollers {
    /// `window` zero disables polling; `max` connections may poll at once (at least one).
    pub(crate) fn new(window: Duration, max: usize) -> Pollers {
        Pollers { window, max: max.max(1), now: AtomicUsize::new(0) }
    }

    /// The state of one connection.
    pub(crate) fn connection(&self) -> ConnPoll<'_> {
        ConnPoll { pollers: self, hot: true, since: Instant::now() }
    }
}

/// Held while a connection polls.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether one connection's client keeps the pace, and since when it is waited for.
pub(crate) struct ConnPoll<'a> {
    pollers: &'a Pollers,
    /// The last request came within the window of the one before: poll for the next.
    hot: bool,
    /// When the connection started waiting for its next request.
    since: Instant,
}

impl ConnPoll<'_> {
    /// Reads what it can of the next request header into `hb` from the socket `fd` (whose
    /// buffered reader holds nothing) while the client keeps the pace: returns the bytes read,
    /// `hb.len()` when the whole header came. The caller reads the rest the ordinary way, and
    /// then calls [`ConnPoll::arrived`].
    pub(crate) async fn poll(&mut self, fd: RawFd, hb: &mut [u8]) -> usize {
        self.since = Instant::now();
        let p = self.pollers;
        if !self.hot || p.window.is_zero() {
            return 0;
        }
        if p.now.fetch_add(1, Ordering::Relaxed) >= p.max {
            p.now.fetch_sub(1, Ordering::Relaxed);
            return 0;
        }
        let _slot = Slot(&p.now);
        let mut got = 0;
        loop {
            // SAFETY: `fd` is the connection's open socket for the duration of the call; the
            // pointer and length describe the unfilled part of `hb`.
            let n = unsafe { libc::recv(fd, hb[got..].as_mut_ptr().cast(), hb.len() - got, libc::MSG_DONTWAIT) };
            if n > 0 {
                got += n as usize;
                if got == hb.len() {
                    return got;
                }
                continue;
            }
            // End of stream or an error: the ordinary read reports it.
            if n == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock {
                return got;
            }
            if self.since.elapsed() >= p.window {
                return got;
            }
            // Other tasks of this worker run meanwhile (and its I/O driver is polled).
            tokio::task::yield_now().await;
        }
    }

    /// The next request header is here (however it came): the connection keeps polling if it
    /// came within the window.
    pub(crate) fn arrived(&mut self) {
        self.hot = self.since.elapsed() <= self.pollers.window;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::io::AsRawFd;

    #[tokio::test]
    async fn a_header_sent_within_the_window_is_read_by_polling() {
        let pollers = Pollers::new(Duration::from_secs(5), 1);
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = pollers.connection();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            b.write_all(b"0123").unwrap();
            std::thread::sleep(Duration::from_millis(20));
            b.write_all(b"4567").unwrap();
            b
        });
        let mut hb = [0u8; 8];
        assert_eq!(c.poll(a.as_raw_fd(), &mut hb).await, 8, "both halves of the header, read by polling");
        assert_eq!(&hb, b"01234567");
        c.arrived();
        assert!(c.hot, "it came within the window");
        assert_eq!(pollers.now.load(Ordering::Relaxed), 0, "the slot is given back");
        drop(writer.join().unwrap());
        // The peer closed: polling ends at once with nothing, the ordinary read sees the end.
        let mut hb = [0u8; 8];
        assert_eq!(c.poll(a.as_raw_fd(), &mut hb).await, 0);
    }

    #[tokio::test]
    async fn a_slow_client_stops_being_polled_until_it_keeps_the_pace_again() {
        let pollers = Pollers::new(Duration::from_millis(5), 1);
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = pollers.connection();
        let mut hb = [0u8; 4];
        let t = Instant::now();
        assert_eq!(c.poll(a.as_raw_fd(), &mut hb).await, 0, "nothing came within the window");
        assert!(t.elapsed() >= Duration::from_millis(5), "it polled for the whole window");
        std::thread::sleep(Duration::from_millis(10));
        c.arrived();
        assert!(!c.hot, "the request came after the window");
        // Cold: no polling at all, even with the header already there.
        b.write_all(b"abcd").unwrap();
        assert_eq!(c.poll(a.as_raw_fd(), &mut hb).await, 0);
        c.arrived();
        assert!(c.hot, "this one came at once: poll for the next");
    }

    #[tokio::test]
    async fn only_max_connections_poll_at_once_and_zero_disables() {
        let pollers = Pollers::new(Duration::from_secs(5), 1);
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.write_all(b"abcd").unwrap();
        let _held = Slot(&pollers.now);
        pollers.now.fetch_add(1, Ordering::Relaxed);
        let mut c = pollers.connection();
        let mut hb = [0u8; 4];
        assert_eq!(c.poll(a.as_raw_fd(), &mut hb).await, 0, "the one slot is taken");
        let off = Pollers::new(Duration::ZERO, 4);
        let mut c = off.connection();
        assert_eq!(c.poll(a.as_raw_fd(), &mut hb).await, 0, "a zero window never polls");
    }
}
