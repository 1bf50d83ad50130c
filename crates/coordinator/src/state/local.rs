//! What the in-process backends share: their synchronous core ([`LocalStore`]), the semantics
//! of a [`Txn`] written once over any ordered table ([`apply`]), and the async face
//! ([`InProcess`]) that serves [`StateStore`] from the core — inline for a backend whose calls
//! never block, on tokio's blocking pool for one that does disk I/O.

use std::collections::HashSet;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::history::History;
use super::{Committed, Condition, Entry, EventKind, Listing, Op, Revision, StateError, StateStore, Txn, WatchEvent, WatchStream};

/// The synchronous core of an in-process backend.
pub trait LocalStore: Send + Sync + 'static {
    /// Whether its calls block on I/O (then the async face runs them with `spawn_blocking`).
    const BLOCKING: bool;

    fn read(&self, key: &str) -> Result<Option<Entry>, StateError>;

    /// The keys under `prefix` in key order and the revision of that snapshot.
    fn scan(&self, prefix: &str) -> Result<Listing, StateError>;

    /// Applies `txn` with [`apply`] in one write transaction, then records its changes in
    /// [`LocalStore::history`] before the next write can commit.
    fn commit(&self, txn: &Txn) -> Result<Committed, StateError>;

    fn history(&self) -> &Arc<History>;
}

/// A table a transaction reads and writes: what [`apply`] needs from a backend.
pub trait KvTx {
    fn read(&self, key: &str) -> Result<Option<Entry>, StateError>;

    /// The first key under `prefix` (in key order) whose mod revision fails `ok`, with that
    /// revision.
    fn first_under(&self, prefix: &str, ok: &dyn Fn(Revision) -> bool) -> Result<Option<(String, Revision)>, StateError>;

    fn write(&mut self, key: &str, entry: Entry) -> Result<(), StateError>;

    /// Whether the key was there.
    fn remove(&mut self, key: &str) -> Result<bool, StateError>;
}

/// Checks `txn`'s conditions against `tx` and, when they all hold, applies its ops at revision
/// `current + 1`. Returns what was committed and the changes for watchers; on an error the
/// caller must not commit (a condition failed before anything was written; a backend error may
/// come after some writes).
pub fn apply(tx: &mut impl KvTx, txn: &Txn, current: Revision) -> Result<(Committed, Vec<WatchEvent>), StateError> {
    let mut seen = HashSet::new();
    if let Some(op) = txn.ops.iter().find(|op| !seen.insert(op.key())) {
        return Err(StateError::DuplicateKey { key: op.key().to_string() });
    }
    for c in &txn.conditions {
        check(tx, c)?;
    }
    let revision = current + 1;
    let (mut events, mut deleted) = (Vec::new(), 0);
    for op in &txn.ops {
        match op {
            Op::Put { key, value } => {
                let create_revision = tx.read(key)?.map_or(revision, |e| e.create_revision);
                tx.write(key, Entry { value: value.clone(), create_revision, mod_revision: revision })?;
                events.push(WatchEvent { kind: EventKind::Put, key: key.clone(), value: value.clone(), mod_revision: revision });
            }
            Op::Delete { key } => {
                if tx.remove(key)? {
                    deleted += 1;
                    events.push(WatchEvent { kind: EventKind::Delete, key: key.clone(), value: Vec::new(), mod_revision: revision });
                }
            }
        }
    }
    let revision = if events.is_empty() { current } else { revision };
    Ok((Committed { revision, deleted }, events))
}

fn check(tx: &impl KvTx, c: &Condition) -> Result<(), StateError> {
    match c {
        Condition::Key(key, expect) => {
            let found = tx.read(key)?.map(|e| e.mod_revision);
            if !expect.holds(found) {
                return Err(StateError::Conflict { key: key.clone(), expected: *expect, found });
            }
        }
        Condition::Prefix(prefix, expect) => {
            if let Some((key, found)) = tx.first_under(prefix, &|r| expect.holds(Some(r)))? {
                return Err(StateError::Conflict { key, expected: *expect, found: Some(found) });
            }
        }
    }
    Ok(())
}

/// The async face of an in-process backend `B`; cloning it shares the backend.
pub struct InProcess<B>(pub(crate) Arc<B>);

impl<B> Clone for InProcess<B> {
    fn clone(&self) -> Self {
        InProcess(self.0.clone())
    }
}

impl<B: LocalStore> InProcess<B> {
    /// The synchronous core.
    pub fn core(&self) -> &B {
        &self.0
    }

    /// Runs `f` on the core: inline, or on the blocking pool when `B` blocks.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&B) -> Result<T, StateError> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, StateError>> {
        if B::BLOCKING {
            let b = self.0.clone();
            Box::pin(async move { tokio::task::spawn_blocking(move || f(&*b)).await.map_err(StateError::backend)? })
        } else {
            Box::pin(std::future::ready(f(&*self.0)))
        }
    }
}

impl<B: LocalStore> StateStore for InProcess<B> {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Entry>, StateError>> {
        let key = key.to_string();
        self.run(move |b| b.read(&key))
    }

    fn range<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, StateError>> {
        let prefix = prefix.to_string();
        self.run(move |b| b.scan(&prefix))
    }

    fn batch(&self, txn: Txn) -> BoxFuture<'_, Result<Committed, StateError>> {
        self.run(move |b| b.commit(&txn))
    }

    fn watch<'a>(&'a self, prefix: &'a str, from: Revision) -> BoxFuture<'a, Result<WatchStream, StateError>> {
        Box::pin(std::future::ready(self.0.history().watch(prefix, from)))
    }

    fn revision(&self) -> BoxFuture<'_, Result<Revision, StateError>> {
        Box::pin(std::future::ready(Ok(self.0.history().revision())))
    }
}
