//! The recent changes of an in-process backend, for its watchers: a bounded log of the last
//! [`DEFAULT_KEPT`] changes plus a `tokio::sync::watch` channel carrying the store's revision.
//!
//! A watcher replays the log from the revision it asks for, then waits for the revision to move
//! and reads the log again from where it stopped; so it never misses or reorders a change while
//! the log still holds what it has not read. The log starts empty when the store opens (nothing
//! before it can be replayed) and drops its oldest changes when full: a watcher that asks for,
//! or falls behind to, a revision no longer kept gets [`StateError::Compacted`] (as etcd's
//! watchers do after a compaction) and must read the keys again and watch from there.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};

use futures::StreamExt;
use tokio::sync::watch;

use super::{Revision, StateError, WatchEvent, WatchStream};

/// Changes kept for watchers.
pub const DEFAULT_KEPT: usize = 10_000;

struct Log {
    events: VecDeque<WatchEvent>,
    /// Every change with a revision from here on is in `events`.
    oldest: Revision,
    revision: Revision,
}

/// The change log of one store.
pub struct History {
    log: Mutex<Log>,
    tip: watch::Sender<Revision>,
    kept: usize,
}

impl History {
    /// The history of a store at `revision`, keeping at most `kept` changes.
    pub fn new(revision: Revision, kept: usize) -> Arc<History> {
        let log = Log { events: VecDeque::new(), oldest: revision + 1, revision };
        Arc::new(History { log: Mutex::new(log), tip: watch::channel(revision).0, kept: kept.max(1) })
    }

    /// The store's revision as last recorded.
    pub fn revision(&self) -> Revision {
        *self.tip.borrow()
    }

    /// Records the changes of a committed write at `revision`. Backends call it in revision
    /// order, before the next write commits (under their writer lock).
    pub fn record(&self, revision: Revision, events: Vec<WatchEvent>) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.events.extend(events);
        while log.events.len() > self.kept {
            if let Some(e) = log.events.pop_front() {
                log.oldest = log.oldest.max(e.mod_revision + 1);
            }
        }
        log.revision = revision;
        drop(log);
        self.tip.send_replace(revision);
    }

    /// The kept changes under `prefix` from revision `from` on, and the revision they reach.
    fn since(&self, prefix: &str, from: Revision) -> Result<(Vec<WatchEvent>, Revision), StateError> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if from < log.oldest {
            return Err(StateError::Compacted { requested: from, oldest: log.oldest });
        }
        let start = log.events.partition_point(|e| e.mod_revision < from);
        let events = log.events.range(start..).filter(|e| e.key.starts_with(prefix)).cloned().collect();
        Ok((events, log.revision))
    }

    /// A watch of the changes under `prefix` from revision `from` (0: from the next one).
    pub fn watch(self: &Arc<Self>, prefix: &str, from: Revision) -> Result<WatchStream, StateError> {
        let from = if from == 0 { self.revision() + 1 } else { from };
        // Fail now rather than as the first item when the start is already gone.
        self.since(prefix, from)?;
        let cursor = Cursor {
            history: Arc::downgrade(self),
            changed: self.tip.subscribe(),
            prefix: prefix.to_string(),
            next: from,
            ready: VecDeque::new(),
            done: false,
        };
        Ok(futures::stream::unfold(cursor, Cursor::step).boxed())
    }
}

/// Where a watcher is.
struct Cursor {
    /// Weak: the watch ends when the store closes.
    history: Weak<History>,
    changed: watch::Receiver<Revision>,
    prefix: String,
    /// The first revision not read from the log yet.
    next: Revision,
    ready: VecDeque<WatchEvent>,
    done: bool,
}

impl Cursor {
    async fn step(mut self) -> Option<(Result<WatchEvent, StateError>, Cursor)> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Some((Ok(e), self));
            }
            if self.done {
                return None;
            }
            // Mark the current revision seen before reading, so that a change recorded after
            // the read wakes `changed()` below.
            self.changed.borrow_and_update();
            let history = self.history.upgrade()?;
            match history.since(&self.prefix, self.next) {
                Ok((events, revision)) => {
                    self.ready.extend(events);
                    self.next = self.next.max(revision + 1);
                }
                Err(e) => {
                    self.done = true;
                    return Some((Err(e), self));
                }
            }
            drop(history);
            if self.ready.is_empty() && self.changed.changed().await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::EventKind;

    fn put(key: &str, rev: Revision) -> WatchEvent {
        WatchEvent { kind: EventKind::Put, key: key.into(), value: vec![rev as u8], mod_revision: rev }
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_is_told_to_read_again() {
        let h = History::new(0, 3);
        let mut w = h.watch("a/", 1).unwrap();
        h.record(1, vec![put("a/1", 1)]);
        assert_eq!(w.next().await.unwrap().unwrap().key, "a/1");
        // Four more changes while the watcher sleeps: the log keeps three, the watcher needs 2..
        for r in 2..=5 {
            h.record(r, vec![put(&format!("a/{r}"), r)]);
        }
        let e = w.next().await.unwrap().unwrap_err();
        assert!(matches!(e, StateError::Compacted { requested: 2, oldest: 3 }), "{e}");
        assert!(w.next().await.is_none());
        // From what is kept it replays; from before it refuses at once.
        let mut w = h.watch("a/", 3).unwrap();
        assert_eq!(w.next().await.unwrap().unwrap().mod_revision, 3);
        assert!(matches!(h.watch("a/", 2), Err(StateError::Compacted { .. })));
    }

    #[tokio::test]
    async fn a_watch_ends_when_the_store_closes() {
        let h = History::new(7, 10);
        assert!(matches!(h.watch("", 7), Err(StateError::Compacted { requested: 7, oldest: 8 })));
        let mut w = h.watch("", 0).unwrap();
        h.record(8, vec![put("x", 8)]);
        assert_eq!(w.next().await.unwrap().unwrap().mod_revision, 8);
        drop(h);
        assert!(w.next().await.is_none());
    }
}
