//! Busy polling of a connection's next request: a client that sends its next request within a
//! few microseconds of the last reply (one read in flight, one after another: a guest reading
//! a file, fio at queue depth 1) gets it read while this task is still running, instead of
//! this worker sleeping in `epoll_wait` and being woken again: on this class of machine (a VM,
//! 2 vCPUs) that sleep and wake cost about as much as the whole request (~20 us of ~45 us).
//! It is what the kernel's `SO_BUSY_POLL` and the guest's `haltpoll` do one layer down, and is
//! bounded the same way: a connection polls only while its client keeps the pace ([`STREAK`]
//! requests in a row came soon after their replies, each alone: a client with several reads in flight
//! sends batches and is never polled), for at most the window, and at most `max` connections
//! of a proxy poll at once.

use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The connections of one proxy polling at the moment, and how many may.
#[derive(Debug)]
pub(crate) struct Pollers {
    window: Duration,
    max: usize,
    now: AtomicUsize,
    /// The connection that received the last request, and when (microseconds since `epoch`).
    last_id: AtomicU64,
    last_at: AtomicU64,
    /// Until when (microseconds since `epoch`) several connections count as busy.
    crowded_until: AtomicU64,
    epoch: Instant,
    next_id: AtomicU64,
}

/// How long after its last request a connection counts as busy.
const ACTIVE_FOR: Duration = Duration::from_millis(1);

impl Pollers {
    /// `window` zero disables polling; `max` connections may poll at once (at least one).
    pub(crate) fn new(window: Duration, max: usize) -> Pollers {
        Pollers {
            window,
            max: max.max(1),
            now: AtomicUsize::new(0),
            last_id: AtomicU64::new(u64::MAX),
            last_at: AtomicU64::new(0),
            crowded_until: AtomicU64::new(0),
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
        }
    }

    /// The state of one connection.
    pub(crate) fn connection(&self) -> ConnPoll<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        ConnPoll { pollers: self, id, streak: 0, since: Instant::now(), missed: false }
    }

    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// Connection `id` received a request at `at`. When the request before went to another
    /// connection less than [`ACTIVE_FOR`] earlier, several connections are busy for a while
    /// (see [`SEEN_WITHIN_WINDOWS`]).
    fn request(&self, id: u64, at: Instant) {
        let t = self.micros(at);
        let prev_id = self.last_id.swap(id, Ordering::Relaxed);
        let prev_at = self.last_at.swap(t, Ordering::Relaxed);
        let active_for = ACTIVE_FOR.as_micros() as u64;
        if prev_id != id && prev_id != u64::MAX && t.saturating_sub(prev_at) < active_for {
            self.crowded_until.fetch_max(t + active_for, Ordering::Relaxed);
        }
    }

    /// Whether several connections are busy at `now` (see [`Pollers::request`]).
    fn crowded(&self, now: Instant) -> bool {
        self.micros(now) < self.crowded_until.load(Ordering::Relaxed)
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

/// How much later than the window a request read the ordinary way may be seen and still count
/// towards the streak, as a multiple of the window. The ordinary way sees a request only after
/// this worker's own wake-up, which on a VM whose idle CPUs halt costs as much as a quick
/// client's whole turnaround or more (2026-12-07, 2 vCPUs: fio at depth 1 came back within
/// 30 us of each reply, the worker saw it 60-100 us after; with the window as the bar no
/// request ever counted and nothing was polled). A poll that waited its whole window in vain
/// resets the streak, so a client slower than the window is polled at most once in
/// `STREAK + 1` requests. Only while one connection is busy: a worker serving several does not
/// sleep between their requests, and with this bar for all, one of 4 fio clients at depth 1
/// was polled nearly all the time and the 4 read 37k IOPS against 76-95k (2 vCPUs, 2026-12-07);
/// then the window itself is the bar, as before.
const SEEN_WITHIN_WINDOWS: u32 = 4;

/// Whether one connection's client keeps the pace, and since when it is waited for.
pub(crate) struct ConnPoll<'a> {
    pollers: &'a Pollers,
    id: u64,
    /// Requests in a row that came alone (nothing behind them) and soon enough (see
    /// [`ConnPoll::arrived`]).
    streak: u32,
    /// When the connection started waiting for its next request.
    since: Instant,
    /// The last poll waited its whole window without the whole header.
    missed: bool,
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
        self.missed = false;
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
                self.missed = true;
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
    /// requests in a row came soon enough ([`SEEN_WITHIN_WINDOWS`]) with nothing behind them,
    /// and not after a poll that waited in vain.
    pub(crate) fn arrived(&mut self, fd: RawFd, more_buffered: bool) {
        if self.pollers.window.is_zero() {
            // Polling is off: nothing to judge, nothing to track.
            return;
        }
        let now = Instant::now();
        self.pollers.request(self.id, now);
        let waited = now.duration_since(self.since);
        let window = self.pollers.window;
        let quick = !self.missed && (waited <= window || (waited <= window * SEEN_WITHIN_WINDOWS && !self.pollers.crowded(now)));
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
    fn a_request_seen_after_the_workers_wake_up_counts_but_not_after_a_vain_poll() {
        // A window long enough that a sleep overshooting on a loaded machine stays within the bar.
        let pollers = Pollers::new(Duration::from_millis(50), 1);
        let (a, mut b) = pair();
        let fd = a.as_raw_fd();
        let mut c = pollers.connection();
        let mut hb = [0u8; 4];
        // Not yet polled; the request is seen 60 ms after the reply (the client was quick, the
        // worker's wake-up was not): later than the window, within SEEN_WITHIN_WINDOWS of it.
        assert_eq!(c.poll(fd, &mut hb), 0);
        std::thread::sleep(Duration::from_millis(60));
        c.arrived(fd, false);
        assert_eq!(c.streak, 1, "counts towards the streak");
        // Seen later than SEEN_WITHIN_WINDOWS windows: the streak starts again.
        assert_eq!(c.poll(fd, &mut hb), 0);
        std::thread::sleep(Duration::from_millis(50 * u64::from(SEEN_WITHIN_WINDOWS) + 5));
        c.arrived(fd, false);
        assert_eq!(c.streak, 0, "too late");
        // Polled, in vain for the whole window, then the request comes a moment later: it was
        // soon enough to count, but the poll missed it, so the streak starts again.
        c.streak = STREAK;
        assert_eq!(c.poll(fd, &mut hb), 0, "nothing came within the window");
        b.write_all(b"late").unwrap();
        (&a).read_exact(&mut hb).unwrap();
        c.arrived(fd, false);
        assert_eq!(c.streak, 0, "a vain poll resets the streak");
    }

    #[test]
    fn while_several_connections_are_busy_only_requests_within_the_window_count() {
        let pollers = Pollers::new(Duration::from_millis(5), 1);
        let (a, _b) = pair();
        let fd = a.as_raw_fd();
        let mut c = pollers.connection();
        let other = pollers.connection();
        let mut hb = [0u8; 4];
        // Requests to one connection only: never crowded.
        c.arrived(fd, false);
        c.arrived(fd, false);
        assert!(!pollers.crowded(Instant::now()));
        // Another connection's request right after: crowded for ACTIVE_FOR.
        pollers.request(other.id, Instant::now());
        assert!(pollers.crowded(Instant::now()));
        // Seen later than the window (not polled yet): does not count while crowded...
        c.streak = 1;
        assert_eq!(c.poll(fd, &mut hb), 0);
        std::thread::sleep(Duration::from_millis(10));
        pollers.request(other.id, Instant::now());
        c.arrived(fd, false);
        assert_eq!(c.streak, 0, "seen after the window while another connection is busy");
        // ... and within the window it does.
        assert_eq!(c.poll(fd, &mut hb), 0);
        pollers.request(other.id, Instant::now());
        c.arrived(fd, false);
        assert_eq!(c.streak, 1, "seen within the window");
        // A request of another connection long after this one's last: not crowded.
        let later = Instant::now() + ACTIVE_FOR * 3;
        pollers.request(other.id, later);
        assert!(!pollers.crowded(later));
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
