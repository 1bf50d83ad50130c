//! The tunnel relay's wire format: Ethernet frames of tunnel networks (`--net tunnel:NAME`)
//! between host agents, the coordinator's relay and `vgrid tunnel`, over WebSockets on the
//! coordinator's HTTPS port.
//!
//! * A host agent opens one connection per host, `GET /api/v1/tunnels/host?host=NAME`
//!   (authenticated by its grid certificate), and multiplexes every tunnel interface of its
//!   guests on it: each interface is a *port* the agent numbers; text messages
//!   ([`HostControl`]) attach and detach ports, binary messages carry frames.
//! * `vgrid tunnel NAME` opens `GET /api/v1/networks/NAME/tunnel` (the user's token); its
//!   frames travel on port 0.
//!
//! A binary message is a batch of records, each `port` (u32, big endian), `length` (u32, big
//! endian) and the frame: several frames per write, as QEMU's stream netdev writes each frame
//! after a 4-byte big-endian length.

use serde::{Deserialize, Serialize};

/// Largest frame a record may carry (QEMU's stream netdev sends at most 69,632 bytes; an
/// Ethernet frame of a 1500-byte MTU is 1514).
pub const MAX_FRAME: usize = 69_632;

/// Bytes of a record's header.
pub const RECORD_HEADER: usize = 8;

/// A batch is closed once it holds this many bytes (a frame that would pass it starts the next).
pub const MAX_BATCH: usize = 256 * 1024;

/// A control message of a host's connection (JSON text messages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostControl {
    /// Host → relay: port `port` carries interface `nic` (its index) of VM `vm`.
    Attach { port: u32, vm: String, nic: usize },
    /// Host → relay: port `port` is gone (its VM left this host).
    Detach { port: u32 },
    /// Relay → host: port `port` was refused (why, naming the VM and network); its frames are
    /// dropped until it is attached again.
    Refused { port: u32, error: String },
    /// Relay → host: port `port` joined network `network`.
    Attached { port: u32, network: String },
}

/// How long a direct-path ticket is valid after the coordinator issued it (it is used once).
pub const TICKET_TTL_SECS: u64 = 60;

/// The shortest ticket a host agent takes (and the longest).
pub const MIN_TICKET: usize = 16;
pub const MAX_TICKET: usize = 128;

/// The header that carries a direct-path ticket to a host agent.
pub const TICKET_HEADER: &str = "vgrid-tunnel-ticket";

/// A direct path to a host for `vgrid tunnel NAME` (`GET /api/v1/networks/NAME/tunnel/direct`):
/// a WebSocket to the host agent itself (`url`, TLS with the host's grid certificate) that
/// carries the frames of the network's guests on that host, so the coordinator neither relays
/// nor sees them. `ticket` (sent in [`TICKET_HEADER`], once, within [`TICKET_TTL_SECS`]) is
/// what the agent admits the user by: the coordinator gave it the same ticket for the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DirectEndpoint {
    pub host: String,
    pub url: String,
    pub ticket: String,
}

/// Coordinator → host agent (`POST /host/v1/tunnels/tickets`): admit one direct connection of
/// `owner`'s `vgrid tunnel` to tunnel network `network` with `ticket`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DirectTicket {
    /// At least [`MIN_TICKET`] characters (the coordinator issues 48 hex digits).
    #[schema(min_length = 16, max_length = 128)]
    pub ticket: String,
    #[schema(pattern = "^[a-z][a-z0-9_-]{0,31}$")]
    pub network: String,
    pub owner: String,
}

/// A control message on a direct link (JSON text), host agent → `vgrid tunnel`: the MACs of
/// the network's guests on this host, sent at connection and whenever they change. Frames
/// from the link with another source MAC are dropped, and frames for these MACs go only there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirectControl {
    Macs { macs: Vec<crate::net::MacAddr> },
}

/// A malformed batch: what is wrong, at which byte.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("truncated record at byte {at} of a {len}-byte batch")]
    Truncated { at: usize, len: usize },
    #[error("frame of {len} bytes at byte {at}: the largest is {MAX_FRAME}")]
    TooLarge { at: usize, len: usize },
    #[error("empty frame at byte {at}")]
    Empty { at: usize },
}

/// Appends one record (`port`, the frame) to `batch`.
pub fn push_record(batch: &mut Vec<u8>, port: u32, frame: &[u8]) {
    batch.extend_from_slice(&port.to_be_bytes());
    batch.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    batch.extend_from_slice(frame);
}

/// A batch (one WebSocket message): the record `first`, then those `next` yields (e.g. what a
/// queue holds now) until the batch reaches [`MAX_BATCH`] or `next` has none.
pub fn batch<F: AsRef<[u8]>>(first: (u32, F), mut next: impl FnMut() -> Option<(u32, F)>) -> Vec<u8> {
    let mut b = Vec::with_capacity(first.1.as_ref().len() + 64);
    push_record(&mut b, first.0, first.1.as_ref());
    while b.len() < MAX_BATCH {
        let Some((port, f)) = next() else { break };
        push_record(&mut b, port, f.as_ref());
    }
    b
}

/// The records of a batch, in order: `(port, frame)`; an error for a malformed one (the rest
/// of the batch is not read).
pub fn records(batch: &[u8]) -> impl Iterator<Item = Result<(u32, &[u8]), BatchError>> {
    let mut at = 0;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || at >= batch.len() {
            return None;
        }
        let r = record_at(batch, at);
        match &r {
            Ok((_, f)) => at += RECORD_HEADER + f.len(),
            Err(_) => failed = true,
        }
        Some(r)
    })
}

fn record_at(batch: &[u8], at: usize) -> Result<(u32, &[u8]), BatchError> {
    let head = batch.get(at..at + RECORD_HEADER).ok_or(BatchError::Truncated { at, len: batch.len() })?;
    let port = u32::from_be_bytes(head[..4].try_into().unwrap());
    let len = u32::from_be_bytes(head[4..].try_into().unwrap()) as usize;
    if len > MAX_FRAME {
        return Err(BatchError::TooLarge { at, len });
    }
    if len == 0 {
        return Err(BatchError::Empty { at });
    }
    let frame = batch.get(at + RECORD_HEADER..at + RECORD_HEADER + len).ok_or(BatchError::Truncated { at, len: batch.len() })?;
    Ok((port, frame))
}

/// The source MAC of an Ethernet frame (bytes 6-11), if it is long enough to have one.
pub fn source_mac(frame: &[u8]) -> Option<[u8; 6]> {
    frame.get(6..12).map(|m| m.try_into().unwrap())
}

/// The destination MAC of an Ethernet frame (bytes 0-5).
pub fn dest_mac(frame: &[u8]) -> Option<[u8; 6]> {
    frame.get(0..6).map(|m| m.try_into().unwrap())
}

/// The default of `vgrid tunnel --poll-us` and `vgrid host --tunnel-poll-us`: how long a link
/// that just sent frames towards a guest (the user's end) or into a guest (the host's end) waits
/// *awake* for the answer before it sleeps (a guest answers a ping in ~1 ms under TCG).
pub const DEFAULT_POLL_US: u64 = 2000;

/// After a wait that found no answer, the link does not wait awake again for this long: traffic
/// that is not answered (a stream one way) costs at most window / this of a CPU.
pub const POLL_QUIET: std::time::Duration = std::time::Duration::from_millis(100);

/// What one look at a link found, for [`AnswerPoll::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// The answer is there to read.
    Answer,
    /// Something else needs the thread (more frames to send, a frame from the other side, an
    /// error the ordinary read will report): stop waiting.
    OtherWork,
    /// Nothing yet.
    Nothing,
}

/// One link of a process waits awake at a time (at most one CPU spent so).
static POLLING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Waiting awake for a tunnel link's answer. Frames cross two user-space processes per
/// direction (the user's `vgrid tunnel`, the host agent); each that sleeps between a frame out
/// and the answer in is woken by it on an idle CPU, which on a VM costs ~0.1 ms, twice per round
/// trip: about what the guest's own answer costs. A link that just sent frames therefore looks
/// for the answer without sleeping, for at most the window (what `SO_BUSY_POLL` does for a
/// socket, one layer down), yielding the CPU between looks to whatever else is runnable. It
/// stops at once for other work, and after a window without an answer it does not poll again
/// for [`POLL_QUIET`].
#[derive(Debug, Clone)]
pub struct AnswerPoll {
    window: std::time::Duration,
    quiet_until: Option<std::time::Instant>,
}

impl AnswerPoll {
    /// A zero window never waits.
    pub fn new(window: std::time::Duration) -> AnswerPoll {
        AnswerPoll { window, quiet_until: None }
    }

    /// Calls `look` until it finds the answer (true), other work, or the window ends (false).
    /// Returns false at once when the window is zero, after a miss within [`POLL_QUIET`], or
    /// while another link of this process is waiting.
    pub fn wait(&mut self, mut look: impl FnMut() -> Look) -> bool {
        use std::sync::atomic::Ordering;
        if self.window.is_zero() {
            return false;
        }
        let start = std::time::Instant::now();
        if self.quiet_until.is_some_and(|t| start < t) {
            return false;
        }
        if POLLING.swap(true, Ordering::Acquire) {
            return false;
        }
        struct Release;
        impl Drop for Release {
            fn drop(&mut self) {
                POLLING.store(false, Ordering::Release);
            }
        }
        let _release = Release;
        loop {
            match look() {
                Look::Answer => return true,
                Look::OtherWork => return false,
                Look::Nothing => {}
            }
            if start.elapsed() >= self.window {
                self.quiet_until = Some(std::time::Instant::now() + POLL_QUIET);
                return false;
            }
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_takes_what_is_queued_up_to_its_size() {
        let mut queue = vec![(2u32, vec![2u8; 1514]), (3, vec![3u8; 60])].into_iter();
        let b = batch((1, vec![1u8; 60]), || queue.next());
        let ports: Vec<u32> = records(&b).map(|r| r.unwrap().0).collect();
        assert_eq!(ports, [1, 2, 3]);
        let mut endless = std::iter::repeat((0u32, vec![0u8; 60_000]));
        let b = batch((0, vec![0u8; 60_000]), || endless.next());
        assert_eq!(records(&b).count(), 5, "closed once past {MAX_BATCH} bytes");
    }

    #[test]
    fn batches_round_trip_and_refuse_malformed_records() {
        let mut b = Vec::new();
        push_record(&mut b, 7, &[1u8; 60]);
        push_record(&mut b, 0, &[2u8; 1514]);
        let got: Vec<_> = records(&b).collect::<Result<_, _>>().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].0, got[0].1.len()), (7, 60));
        assert_eq!((got[1].0, got[1].1.len()), (0, 1514));
        let cut = &b[..b.len() - 1];
        let last = records(cut).last().unwrap();
        assert!(matches!(last, Err(BatchError::Truncated { at: 68, .. })), "{last:?}");
        let mut big = Vec::new();
        big.extend_from_slice(&1u32.to_be_bytes());
        big.extend_from_slice(&(MAX_FRAME as u32 + 1).to_be_bytes());
        assert!(matches!(records(&big).next(), Some(Err(BatchError::TooLarge { .. }))));
        assert!(records(&[]).next().is_none());
    }

    #[test]
    fn control_messages_are_tagged() {
        let a = HostControl::Attach { port: 3, vm: "vm-1".into(), nic: 1 };
        let j = serde_json::to_string(&a).unwrap();
        assert_eq!(j, r#"{"attach":{"port":3,"vm":"vm-1","nic":1}}"#);
        assert_eq!(serde_json::from_str::<HostControl>(&j).unwrap(), a);
    }

    #[test]
    fn an_answer_poll_stops_at_the_answer_or_other_work_and_rests_after_a_miss() {
        // (One test: the process-wide one-waiter rule would make parallel tests race.)
        let mut looks = 0;
        let mut p = AnswerPoll::new(std::time::Duration::from_secs(5));
        assert!(p.wait(|| {
            looks += 1;
            if looks < 3 {
                Look::Nothing
            } else {
                Look::Answer
            }
        }));
        assert_eq!(looks, 3);
        assert!(!p.wait(|| Look::OtherWork));
        // A miss: the window ends, and the next wait within POLL_QUIET does not look at all.
        let mut p = AnswerPoll::new(std::time::Duration::from_millis(2));
        let t = std::time::Instant::now();
        assert!(!p.wait(|| Look::Nothing));
        assert!(t.elapsed() >= std::time::Duration::from_millis(2));
        let mut called = false;
        assert!(!p.wait(|| {
            called = true;
            Look::Answer
        }));
        assert!(!called, "no look within POLL_QUIET of a miss");
        // A zero window never looks; neither does a second waiter while one waits.
        assert!(!AnswerPoll::new(std::time::Duration::ZERO).wait(|| unreachable!()));
        let mut outer = AnswerPoll::new(std::time::Duration::from_secs(5));
        let mut inner_looked = None;
        assert!(outer.wait(|| {
            let mut inner = AnswerPoll::new(std::time::Duration::from_secs(5));
            inner_looked = Some(inner.wait(|| Look::Answer));
            Look::Answer
        }));
        assert_eq!(inner_looked, Some(false), "one waiter per process");
    }
}
