//! Durable coordinator state behind one async seam, [`StateStore`]: a byte-level key-value store
//! shaped like etcd's so that the etcd backend maps onto it one to one, with two
//! in-process backends ([`redb`]: one file, `DATA/state.redb`; [`memory`]: for tests), one
//! shared by several coordinators ([`etcd`]: `--state etcd://…`), and a typed
//! layer on top for the coordinator ([`VmStore`], [`RecordStore`], [`UsageStore`]).
//!
//! The model:
//! * keys are strings in one flat, ordered space; each table is a prefix (`vms/`, `usage/vms/`,
//!   `usage/buckets/`, `records/TABLE/`, see [`vms`] and [`records`]); values are bytes (the
//!   typed layer stores JSON);
//! * the store has a **revision** that increases by one with every write transaction that
//!   changes something; each key carries the revision that created it (`create_revision`) and
//!   the one that last changed it (`mod_revision`), like etcd's;
//! * writes can be conditional ([`Expect`]: absent, at a mod revision, not modified after a
//!   revision) and grouped into an all-or-nothing [`Txn`] whose conditions may also cover a whole
//!   prefix ("no VM record changed since I read them at revision r");
//! * [`StateStore::watch`] streams the changes under a prefix from a revision on: what long polls
//!   and the queue wait on.
//!
//! | here | etcd v3 |
//! | --- | --- |
//! | `get(key)` | `Range(key)` |
//! | `range(prefix)` | `Range(prefix, range_end = prefix_end(prefix))`, the header's revision |
//! | `batch(Txn)` | `Txn(compare, success = puts/deletes, failure = range of the compared keys)` |
//! | `Condition::Key(k, Absent)` | `Compare(CREATE, k, EQUAL, 0)` |
//! | `Condition::Key(k, ModRevision(r))` | `Compare(MOD, k, EQUAL, r)` |
//! | `Condition::Key(k, NotModifiedAfter(r))` | `Compare(MOD, k, LESS, r + 1)` |
//! | `Condition::Prefix(p, e)` | the same compare with `range_end = prefix_end(p)` |
//! | `watch(prefix, from)` | `Watch(prefix, range_end, start_revision = from)` |
//! | [`StateError::Compacted`] | `ErrCompacted` (the watcher reads again) |
//!
//! This module owns the format of the coordinator's state and its revisions; it must never hold
//! coordinator logic (what a VM may do is the lifecycle's business, not the store's), and a
//! backend must never reorder or drop a committed change in what it reports to watchers.

use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::BoxStream;

pub mod etcd;
pub mod history;
pub mod local;
pub mod memory;
pub mod records;
pub mod redb;
pub mod vms;

#[cfg(any(test, feature = "testing"))]
pub mod conformance;
#[cfg(any(test, feature = "testing"))]
pub mod etcd_server;
#[cfg(test)]
mod etcd_tests;

pub use self::etcd::{EtcdConfig, EtcdStore};
pub use self::redb::RedbStore;
pub use memory::MemoryStore;
pub use records::{RecordStore, UsageStore, UsageTable};
pub use vms::{VmChange, VmStore};

/// The store-wide revision: 0 for an empty store that was never written, then +1 per committed
/// write transaction.
pub type Revision = u64;

/// A backend's own error, kept as the source of [`StateError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Keys with their entries, in key order, and the revision they were read at.
pub type Listing = (Vec<(String, Entry)>, Revision);

/// A stored value with its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Vec<u8>,
    /// The revision that created the key (it stays while the key is only changed).
    pub create_revision: Revision,
    /// The revision that last wrote the key.
    pub mod_revision: Revision,
}

/// What a conditional write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// No such key.
    Absent,
    /// The key exists and was last written at exactly this revision (compare-and-swap).
    ModRevision(Revision),
    /// The key is absent or was last written at this revision or before.
    NotModifiedAfter(Revision),
}

impl Expect {
    /// Whether a key last written at `found` (`None`: absent) meets this expectation.
    pub fn holds(self, found: Option<Revision>) -> bool {
        match self {
            Expect::Absent => found.is_none(),
            Expect::ModRevision(r) => found == Some(r),
            Expect::NotModifiedAfter(r) => found.is_none_or(|f| f <= r),
        }
    }
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Absent => write!(f, "absent"),
            Expect::ModRevision(r) => write!(f, "at mod revision {r}"),
            Expect::NotModifiedAfter(r) => write!(f, "not modified after revision {r}"),
        }
    }
}

/// A condition of a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// One key meets the expectation.
    Key(String, Expect),
    /// Every key now under the prefix meets it (vacuously true when there is none). A key
    /// deleted under the prefix does not fail it, as in etcd: with
    /// `Prefix(p, NotModifiedAfter(r))` a reader that saw the keys under `p` at revision `r` learns
    /// that none of them changed and none was added, not that none went away.
    Prefix(String, Expect),
}

/// A write of a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// An all-or-nothing write: when every condition holds, every op is applied at one new
/// revision; otherwise nothing is written and the batch fails with the first condition that did
/// not hold ([`StateError::Conflict`]). A key may appear in at most one op (as in etcd).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub conditions: Vec<Condition>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Txn {
        Txn::default()
    }

    /// Only if `key` meets `expect`.
    pub fn when(mut self, key: impl Into<String>, expect: Expect) -> Txn {
        self.conditions.push(Condition::Key(key.into(), expect));
        self
    }

    /// Only if every key under `prefix` meets `expect`.
    pub fn when_prefix(mut self, prefix: impl Into<String>, expect: Expect) -> Txn {
        self.conditions.push(Condition::Prefix(prefix.into(), expect));
        self
    }

    /// Only if no key under `prefix` was written after `revision` (see [`Condition::Prefix`]).
    pub fn when_unchanged_since(self, prefix: impl Into<String>, revision: Revision) -> Txn {
        self.when_prefix(prefix, Expect::NotModifiedAfter(revision))
    }

    pub fn put(self, key: impl Into<String>, value: Vec<u8>) -> Txn {
        self.op(Op::Put { key: key.into(), value })
    }

    pub fn delete(self, key: impl Into<String>) -> Txn {
        self.op(Op::Delete { key: key.into() })
    }

    pub fn op(mut self, op: Op) -> Txn {
        self.ops.push(op);
        self
    }
}

/// What a committed [`Txn`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// The revision of its writes; the store's revision unchanged when it wrote nothing (only
    /// deletes of absent keys, or no ops).
    pub revision: Revision,
    /// How many of its deletes removed a key.
    pub deleted: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub key: String,
    /// The new value (empty for a delete).
    pub value: Vec<u8>,
    /// The revision of the change.
    pub mod_revision: Revision,
}

/// The changes under a prefix, in revision order (and within a revision in the order of the
/// batch's ops). It ends when the store closes; it yields [`StateError::Compacted`], then ends,
/// when the changes it still had to deliver are no longer kept.
pub type WatchStream = BoxStream<'static, Result<WatchEvent, StateError>>;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: BoxError,
    },
    #[error("state database: {0}")]
    Backend(#[source] BoxError),
    /// A condition of a write did not hold: `key` was expected `expected` and was found absent
    /// (`None`) or last written at revision `found`.
    #[error("state key {key}: expected {expected}, found {}", found_text(.found))]
    Conflict { key: String, expected: Expect, found: Option<Revision> },
    #[error("state record {key} is unreadable: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// A watch asked for changes from a revision the store no longer keeps (it fell behind, or
    /// started from before the store's history): read the keys again (`range`) and watch from
    /// the revision read at + 1.
    #[error("state watch from revision {requested}: changes are kept from revision {oldest} on only; read again and watch from there")]
    Compacted { requested: Revision, oldest: Revision },
    #[error("state batch names key {key} more than once")]
    DuplicateKey { key: String },
    /// A value (or a whole batch) larger than the backend takes (etcd: 1.5 MiB per request);
    /// large data belongs on the image servers, never in the state.
    #[error("state value {key}: {size} bytes, more than the {limit} bytes the state store takes")]
    TooLarge { key: String, size: usize, limit: usize },
}

fn found_text(found: &Option<Revision>) -> String {
    match found {
        None => "absent".into(),
        Some(r) => format!("mod revision {r}"),
    }
}

impl StateError {
    /// A condition that did not hold (retry after reading again).
    pub fn is_conflict(&self) -> bool {
        matches!(self, StateError::Conflict { .. })
    }

    pub(crate) fn backend(e: impl Into<BoxError>) -> StateError {
        StateError::Backend(e.into())
    }
}

/// Decodes a JSON value stored under `key`.
pub fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StateError> {
    serde_json::from_slice(bytes).map_err(|source| StateError::Corrupt { key: key.to_string(), source })
}

/// Encodes a value as stored (JSON).
pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("state values serialise")
}

/// The seam every state backend implements. Object-safe: the coordinator holds an
/// `Arc<dyn StateStore>`. Reads see committed writes only; every method may be called from many
/// tasks at once.
pub trait StateStore: Send + Sync + 'static {
    /// The value under `key` with its revisions.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Entry>, StateError>>;

    /// Every key under `prefix` ("" for all), in key order, and the revision they were read at
    /// (one snapshot).
    fn range<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, StateError>>;

    /// Applies a [`Txn`] all or nothing.
    fn batch(&self, txn: Txn) -> BoxFuture<'_, Result<Committed, StateError>>;

    /// The changes under `prefix` with a revision `>= from` (0: from the next write on). Fails at
    /// once with [`StateError::Compacted`] when `from` is older than the changes the store keeps.
    /// The usual pattern: `let (keys, rev) = range(p)`, then `watch(p, rev + 1)`.
    fn watch<'a>(&'a self, prefix: &'a str, from: Revision) -> BoxFuture<'a, Result<WatchStream, StateError>>;

    /// The store's revision now.
    fn revision(&self) -> BoxFuture<'_, Result<Revision, StateError>>;

    /// Writes `value` under `key`; returns the revision of the write.
    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<Revision, StateError>> {
        Box::pin(async move { Ok(self.batch(Txn::new().put(key, value)).await?.revision) })
    }

    /// Writes `value` under `key` if the key meets `expect`, else fails with
    /// [`StateError::Conflict`].
    fn put_if<'a>(&'a self, key: &'a str, value: Vec<u8>, expect: Expect) -> BoxFuture<'a, Result<Revision, StateError>> {
        Box::pin(async move { Ok(self.batch(Txn::new().when(key, expect).put(key, value)).await?.revision) })
    }

    /// Deletes `key`; the revision of the delete, or `None` when there was no such key.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Revision>, StateError>> {
        Box::pin(async move {
            let c = self.batch(Txn::new().delete(key)).await?;
            Ok((c.deleted > 0).then_some(c.revision))
        })
    }

    /// Deletes `key` if it meets `expect`, else fails with [`StateError::Conflict`].
    fn delete_if<'a>(&'a self, key: &'a str, expect: Expect) -> BoxFuture<'a, Result<Revision, StateError>> {
        Box::pin(async move { Ok(self.batch(Txn::new().when(key, expect).delete(key)).await?.revision) })
    }
}

/// Which backend holds the coordinator's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateConfig {
    /// One redb file (`DATA/state.redb`); a file of the previous layout is migrated at open.
    Redb(PathBuf),
    /// In memory, gone with the process (tests).
    Memory,
    /// An etcd cluster (`etcd://HOST:PORT[,HOST:PORT…][/PREFIX]`), shared by coordinators.
    Etcd(EtcdConfig),
}

impl StateConfig {
    /// `--state`: `etcd://…`, else the redb file in `data`.
    pub fn parse(state: Option<&str>, data: &std::path::Path) -> Result<StateConfig, String> {
        match state {
            None | Some("") | Some("redb") => Ok(StateConfig::Redb(data.join("state.redb"))),
            Some(s) if s.starts_with("etcd://") => EtcdConfig::parse(s).map(StateConfig::Etcd),
            Some(s) => Err(format!(
                "--state {s:?}: expected redb (the file state.redb in the data directory) or etcd://HOST:PORT[,HOST:PORT...][/PREFIX]"
            )),
        }
    }
}

/// The coordinator's state, opened: the async store and its typed tables (every handle shares
/// the same keys, revisions and watches).
#[derive(Clone)]
pub struct State {
    store: Arc<dyn StateStore>,
}

/// Opens the coordinator's state (blocking: call it at startup). An etcd state needs
/// [`connect`].
pub fn open(config: &StateConfig) -> Result<State, StateError> {
    Ok(match config {
        StateConfig::Redb(path) => State { store: Arc::new(RedbStore::open(path)?) },
        StateConfig::Memory => State { store: Arc::new(MemoryStore::new()) },
        StateConfig::Etcd(c) => {
            return Err(StateError::Open {
                path: format!("etcd at {}", c.members()),
                source: "an etcd state is opened with state::connect".into(),
            })
        }
    })
}

/// Opens the coordinator's state, connecting to etcd for an etcd state (then it fails, naming
/// the endpoints, when etcd does not answer).
pub async fn connect(config: &StateConfig) -> Result<State, StateError> {
    match config {
        StateConfig::Etcd(c) => Ok(State { store: Arc::new(EtcdStore::open(c).await?) }),
        other => open(other),
    }
}

impl State {
    /// The byte-level store.
    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    pub fn vms(&self) -> VmStore {
        VmStore::new(self.store.clone())
    }

    pub fn records(&self) -> RecordStore {
        RecordStore::new(self.store.clone())
    }

    pub fn usage(&self) -> UsageStore {
        UsageStore::new(self.store.clone())
    }
}
