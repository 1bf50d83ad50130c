//! Busy polling of a connection's next request: a client that sends its next request within a
//! few microseconds of the last reply (one read in flight, one after another: a guest reading
//! a file, fio at queue depth 1) gets it read while this task is still running, instead of
//! this worker sleeping in `epoll_wait` and being woken again: on this class of machine (a VM,
//! 2 vCPUs) that sleep and wake cost about as much as the whole request (~20 us of ~45 us).
//! It is what the kernel's `SO_BUSY_POLL` and the guest's `haltpoll` do one layer down, and is
//! bounded the same way: a connection polls only while its client keeps the pace ([`STREAK`]
//! requests in a row came within the window, each alone: a client with several reads in flight
//! sends batches and is never polled), for at most the window, and at most `max` connections
//! of a proxy poll at once.

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
        ConnPoll { pollers: self, streak: 0, since: Instant::now() }
    }
}

/// Held while a connection polls.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Requests in a row that must come alone and within the window before a connection is polled:
/// a client with several reads in flight (its requests come in batches) is not, as polling
/// would only break its batches into single requests and cost it throughput.
const STREAK: u32 = 4;

/// How often a polling connection tries its socket.
const TRY_EVERY: Duration = Duration::from_micros(1);

/// Whether one connection's client keeps the pace, and since when it is waited for.
pub(crate) struct ConnPoll<'a> {
    pollers: &'a Pollers,
    /// Requests in a row that came alone (nothing behind them) within the window.
    streak: u32,
    /// When the connection started waiting for its next request.
    since: Instant,
}

impl ConnPoll<'_> {
    /// Reads what it can of the next request header into `hb` from the socket `fd` (whose
    /// buffered reader holds nothing) while the client keeps the pace: returns the bytes read,
    /// `hb.len()` when the whole header came. The caller reads the rest the ordinary way, and
    /// then calls [`ConnPoll::arrived`].
    ///
    /// The worker thread spins for at most the window without yielding (yielding to the
    /// runtime between tries measured slower: 1.30-1.69x nbdkit at depth 1 against 1.66-1.82x);
    /// other tasks of this worker wait that long at most, and the other workers are free.
    pub(crate) fn poll(&mut self, fd: RawFd, hb: &mut [u8]) -> usize {
        self.since = Instant::now();
        let p = self.pollers;
        if self.streak < STREAK || p.window.is_zero() {
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
                    crate::metrics::busy_polled();
                    return got;
                }
                continue;
            }
            // End of stream or an error: the ordinary read reports it.
            if n == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock {
                return got;
            }
            let tried = Instant::now();
            if tried.duration_since(self.since) >= p.window {
                return got;
            }
            // Not a syscall per instant: the client's send takes the same socket locks.
            while tried.elapsed() < TRY_EVERY {
                std::hint::spin_loop();
            }
        }
    }

    /// The next request header is here (however it came); `more_buffered`: the caller's
    /// buffered reader holds bytes after it. The connection is polled for the next once enough
    /// requests in a row came within the window with nothing behind them.
    pub(crate) fn arrived(&mut self, fd: RawFd, more_buffered: bool) {
        let quick = self.since.elapsed() <= self.pollers.window;
        self.streak = if quick && !more_buffered && !bytes_waiting(fd) { self.streak.saturating_add(1) } else { 0 };
    }
}

/// Whether the socket `fd` holds unread bytes.
fn bytes_waiting(fd: RawFd) -> bool {
    let mut b = 0u8;
    // SAFETY: a one-byte peek into a local on the connection's open socket.
    unsafe { libc::recv(fd, (&mut b as *mut u8).cast(), 1, libc::MSG_DONTWAIT | libc::MSG_PEEK) > 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::io::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (a, b)
    }

    /// A connection whose client has kept the pace: polled from its next request on.
    fn hot(pollers: &Pollers) -> ConnPoll<'_> {
        let mut c = pollers.connection();
        c.streak = STREAK;
        c
    }

    #[test]
    fn a_client_that_keeps_the_pace_is_polled_and_gets_its_header_read() {
        let pollers = Pollers::new(Duration::from_secs(5), 1);
        let (a, mut b) = pair();
        let fd = a.as_raw_fd();
        let mut c = pollers.connection();
        let mut hb = [0u8; 8];
        // Requests that come at once and alone: polled from the STREAK-th on.
        for _ in 0..STREAK {
            assert_eq!(c.poll(fd, &mut hb), 0, "not polled before the streak");
            c.arrived(fd, false);
        }
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            b.write_all(b"0123").unwrap();
            std::thread::sleep(Duration::from_millis(20));
            b.write_all(b"4567").unwrap();
            b
        });
        assert_eq!(c.poll(fd, &mut hb), 8, "both halves of the header, read by polling");
        assert_eq!(&hb, b"01234567");
        assert_eq!(pollers.now.load(Ordering::Relaxed), 0, "the slot is given back");
        c.arrived(fd, false);
        assert_eq!(c.streak, STREAK + 1);
        drop(writer.join().unwrap());
        // The peer closed: polling ends at once with nothing; the ordinary read sees the end.
        assert_eq!(c.poll(fd, &mut hb), 0);
    }

    #[test]
    fn a_slow_client_is_not_polled_until_it_keeps_the_pace_again() {
        let pollers = Pollers::new(Duration::from_millis(5), 1);
        let (a, mut b) = pair();
        let fd = a.as_raw_fd();
        let mut c = hot(&pollers);
        let mut hb = [0u8; 4];
        let t = Instant::now();
        assert_eq!(c.poll(fd, &mut hb), 0, "nothing came within the window");
        assert!(t.elapsed() >= Duration::from_millis(5), "it polled for the whole window");
        std::thread::sleep(Duration::from_millis(10));
        c.arrived(fd, false);
        assert_eq!(c.streak, 0, "the request came after the window");
        // Cold: not polled, even with the header there.
        b.write_all(b"abcd").unwrap();
        assert_eq!(c.poll(fd, &mut hb), 0);
        (&a).read_exact(&mut hb).unwrap();
        c.arrived(fd, false);
        assert_eq!(c.streak, 1, "this one came at once and alone");
    }

    #[test]
    fn a_client_with_requests_behind_the_last_is_not_polled() {
        let pollers = Pollers::new(Duration::from_secs(5), 1);
        let (a, mut b) = pair();
        let fd = a.as_raw_fd();
        let mut c = hot(&pollers);
        let mut hb = [0u8; 4];
        b.write_all(b"headnext").unwrap();
        assert_eq!(c.poll(fd, &mut hb), 4);
        c.arrived(fd, true);
        assert_eq!(c.streak, 0, "more in the caller's buffer");
        c.streak = STREAK;
        assert_eq!(c.poll(fd, &mut hb), 4);
        assert_eq!(&hb, b"next");
        b.write_all(b"more").unwrap();
        c.arrived(fd, false);
        assert_eq!(c.streak, 0, "more waiting in the socket");
    }

    #[test]
    fn only_max_connections_poll_at_once_and_zero_disables() {
        let pollers = Pollers::new(Duration::from_secs(5), 1);
        let (a, mut b) = pair();
        let fd = a.as_raw_fd();
        b.write_all(b"abcd").unwrap();
        pollers.now.fetch_add(1, Ordering::Relaxed);
        let mut c = hot(&pollers);
        let mut hb = [0u8; 4];
        assert_eq!(c.poll(fd, &mut hb), 0, "the one slot is taken");
        pollers.now.fetch_sub(1, Ordering::Relaxed);
        assert_eq!(c.poll(fd, &mut hb), 4, "and once it is free");
        let off = Pollers::new(Duration::ZERO, 4);
        let mut c = hot(&off);
        b.write_all(b"efgh").unwrap();
        assert_eq!(c.poll(fd, &mut hb), 0, "a zero window never polls");
    }
}
