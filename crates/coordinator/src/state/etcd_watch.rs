//! Watches of the etcd backend: one task per watch feeds a channel; when etcd's stream breaks
//! (etcd down, a member restarting, a keep-alive missed) the task watches again from the
//! revision after the last one it delivered, retrying until etcd answers, so a watcher sees
//! every change once and in order across the outage. A start revision that etcd compacted away
//! ends the watch with [`StateError::Compacted`].

use std::time::Duration;

use etcd_client::{Client, GetOptions};

use super::etcd::{event, receiver_stream, watch_options, EtcdError};
use super::{Revision, StateError, WatchEvent, WatchStream};

/// What a watch task needs of the store.
pub(super) struct Parts {
    pub client: Client,
    pub endpoints: String,
    pub kv: String,
    pub base: i64,
}

impl Parts {
    fn err(&self, message: String) -> StateError {
        StateError::backend(EtcdError { endpoints: self.endpoints.clone(), message })
    }

    fn rev(&self, etcd: i64) -> Revision {
        (etcd - self.base).max(0) as Revision
    }
}

/// How long a broken watch waits before it watches again.
const RETRY: Duration = Duration::from_millis(500);

/// Starts a watch of the store's `prefix` from store revision `from` (0: the next write).
pub(super) async fn watch(p: Parts, prefix: String, from: Revision) -> Result<WatchStream, StateError> {
    let key = format!("{}{prefix}", p.kv);
    let mut c = p.client.clone();
    let start = if from == 0 {
        // From the next write: pin it now, so a re-watch cannot skip what came in between.
        let r = c.get(p.kv.as_str(), Some(GetOptions::new().with_count_only())).await.map_err(|e| p.err(e.to_string()))?;
        r.header().map_or(p.base, |h| h.revision()) + 1
    } else {
        let start = from as i64 + p.base;
        // A read at a compacted revision fails at once (etcd keeps revision C of a compaction
        // at C, and a watch from C works): tell the caller now, as the other backends do,
        // rather than in the stream.
        if let Err(e) = c.get(p.kv.as_str(), Some(GetOptions::new().with_count_only().with_revision(start))).await {
            if e.to_string().contains("compacted") {
                let oldest = compacted_at(&p, &key, start).await;
                return Err(StateError::Compacted { requested: from, oldest });
            }
            if !e.to_string().contains("future") {
                return Err(p.err(e.to_string()));
            }
        }
        start
    };
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(follow(p, key, start, tx));
    Ok(receiver_stream(rx))
}

/// The store revision etcd keeps changes from, as a watch from `start` reports it.
async fn compacted_at(p: &Parts, key: &str, start: i64) -> Revision {
    let mut c = p.client.clone();
    let probe = async {
        let mut s = c.watch(key, Some(watch_options(key, start))).await.ok()?;
        while let Ok(Some(m)) = s.message().await {
            if m.compact_revision() > 0 {
                return Some(m.compact_revision());
            }
        }
        None
    };
    match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Ok(Some(r)) => p.rev(r),
        _ => p.rev(start) + 1,
    }
}

type Tx = tokio::sync::mpsc::Sender<Result<WatchEvent, StateError>>;

/// Follows etcd's watch from `next`, watching again after every break, until the receiver is
/// dropped or the history it needs is compacted.
async fn follow(p: Parts, key: String, mut next: i64, tx: Tx) {
    let mut c = p.client.clone();
    let mut reported = false;
    loop {
        let stream = tokio::select! {
            s = c.watch(key.as_str(), Some(watch_options(&key, next))) => s,
            _ = tx.closed() => return,
        };
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                if !reported {
                    tracing::warn!(error = %p.err(e.to_string()), "state watch broken; watching again when etcd answers");
                    reported = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => continue,
                    _ = tx.closed() => return,
                }
            }
        };
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = tx.closed() => return,
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) | Err(_) => break,
            };
            if resp.compact_revision() > 0 {
                let e = StateError::Compacted { requested: p.rev(next), oldest: p.rev(resp.compact_revision()) };
                let _ = tx.send(Err(e)).await;
                return;
            }
            if resp.canceled() {
                break;
            }
            reported = false;
            for e in resp.events() {
                let Some(ev) = event(&p.kv, p.base, e) else { continue };
                next = next.max(e.kv().map_or(next, |kv| kv.mod_revision() + 1));
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = tx.closed() => return,
        }
    }
}
