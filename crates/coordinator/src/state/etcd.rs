//! The etcd backend (`--state etcd://HOST:PORT[,HOST:PORT…][/PREFIX]`): the key space under
//! `PREFIX/kv/` of an etcd v3 cluster, mapped one to one as the table in [`super`] says.
//!
//! * **Revisions** are etcd's, less the revision at which this store was created (the
//!   create revision of `PREFIX/meta/base`, written once when the prefix is first used): a store
//!   on its own etcd counts 1, 2, 3… as redb does. Writes elsewhere in the cluster (another
//!   prefix, the coordinators' leader election) also advance etcd's revision, so there the
//!   revisions still increase with every write but may skip numbers.
//! * **Transactions** are etcd Txns: the conditions become Compares (a prefix condition a
//!   Compare with a range end), the ops the success branch; the failure branch reads back what
//!   each condition looked at (keys only, one key per condition), so that a conflict names the
//!   first condition that failed and what it found, as the other backends do.
//! * **Watches** are etcd watches that re-watch from the revision after the last one delivered
//!   when the stream breaks (etcd down, a member restarting) and keep trying until etcd is back;
//!   a watch whose next revision was compacted away ends with [`StateError::Compacted`].
//! * **Compaction**: every `compact_every` the store compacts etcd's history up to the revision it
//!   saw one period earlier, so between one and two periods of changes stay watchable.
//! * **Size**: etcd refuses requests over 1.5 MiB; a value over [`MAX_VALUE`] or a batch over
//!   [`MAX_BATCH`] is refused here with [`StateError::TooLarge`] (large data belongs on the image
//!   servers, never in the state).
//!
//! Every backend error names the endpoints, so "etcd is down" reads as such.

use std::sync::{Arc, Weak};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, GetResponse, KeyValue, TxnOp, TxnOpResponse, WatchOptions,
};
use futures::future::BoxFuture;
use futures::StreamExt;

use super::{Committed, Condition, Entry, EventKind, Expect, Listing, Op, Revision, StateError, StateStore, Txn, WatchEvent, WatchStream};

/// The largest value the etcd backend stores (etcd's request limit is 1.5 MiB).
pub const MAX_VALUE: usize = 1 << 20;
/// The largest batch (keys and values together) it sends.
pub const MAX_BATCH: usize = (1 << 20) + (1 << 18);
/// Keys a range reads per request (all at one revision).
const PAGE: i64 = 1000;

/// Where the state lives in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://HOST:PORT` of each member.
    pub endpoints: Vec<String>,
    /// The key prefix (no trailing `/`), `vgrid` by default.
    pub prefix: String,
    /// How often history is compacted (see the module doc).
    pub compact_every: Duration,
}

impl EtcdConfig {
    /// Parses `etcd://HOST:PORT[,HOST:PORT…][/PREFIX]`.
    pub fn parse(url: &str) -> Result<EtcdConfig, String> {
        let rest = url.strip_prefix("etcd://").ok_or_else(|| format!("{url:?}: expected etcd://HOST:PORT[,HOST:PORT...][/PREFIX]"))?;
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) => (h, p.trim_end_matches('/')),
            None => (rest, ""),
        };
        let prefix = if prefix.is_empty() { "vgrid" } else { prefix };
        let mut endpoints = Vec::new();
        for h in hosts.split(',') {
            let ok = h.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(format!("{url:?}: {h:?} is not HOST:PORT"));
            }
            endpoints.push(format!("http://{h}"));
        }
        Ok(EtcdConfig { endpoints, prefix: prefix.to_string(), compact_every: Duration::from_secs(300) })
    }

    /// The endpoints as one string, for messages.
    pub fn members(&self) -> String {
        self.endpoints.join(",")
    }

    /// The key of the coordinators' leader election.
    pub fn election_key(&self) -> String {
        format!("{}/leader", self.prefix)
    }

    /// The prefix of the coordinators' presence keys ([`crate::leader::Presence`]).
    pub fn presence_prefix(&self) -> String {
        format!("{}/coordinators", self.prefix)
    }
}

/// What etcd said, with where etcd was.
#[derive(Debug, thiserror::Error)]
#[error("etcd at {endpoints}: {message}")]
pub struct EtcdError {
    pub endpoints: String,
    pub message: String,
}

struct Inner {
    client: Client,
    config: EtcdConfig,
    /// `PREFIX/kv/`.
    kv: String,
    /// etcd's revision when the store was created: store revision = etcd revision - base.
    base: i64,
}

/// The etcd store (cheap to clone: clones share the connection).
#[derive(Clone)]
pub struct EtcdStore(Arc<Inner>);

/// A connected client with the timeouts the store uses.
pub async fn connect(config: &EtcdConfig) -> Result<Client, StateError> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(10))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(3))
        .with_keep_alive_while_idle(true);
    Client::connect(&config.endpoints, Some(opts))
        .await
        .map_err(|e| StateError::Open { path: format!("etcd at {}", config.members()), source: e.into() })
}

impl EtcdStore {
    /// Connects and creates the store's base key if this prefix is new. Fails when etcd cannot
    /// be reached, naming the endpoints.
    pub async fn open(config: &EtcdConfig) -> Result<EtcdStore, StateError> {
        let client = connect(config).await?;
        let open_err = |e: etcd_client::Error| StateError::Open { path: format!("etcd at {}", config.members()), source: e.into() };
        let meta = format!("{}/meta/base", config.prefix);
        let kv = format!("{}/kv/", config.prefix);
        let mut c = client.clone();
        let txn = etcd_client::Txn::new()
            .when([Compare::create_revision(meta.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(meta.as_str(), b"vgrid state".to_vec(), None)])
            .or_else([TxnOp::get(meta.as_str(), None)]);
        // Refuse a prefix that holds keys but no base (not made by this code).
        if c.get(kv.as_str(), Some(GetOptions::new().with_prefix().with_count_only())).await.map_err(open_err)?.count() > 0
            && c.get(meta.as_str(), None).await.map_err(open_err)?.kvs().is_empty()
        {
            let source = format!("{kv} holds keys but {meta} is missing: not a vgrid state, or damaged").into();
            return Err(StateError::Open { path: format!("etcd at {}", config.members()), source });
        }
        let resp = c.txn(txn).await.map_err(open_err)?;
        let base = if resp.succeeded() {
            resp.header().map_or(0, |h| h.revision())
        } else {
            first_get(&resp.op_responses(), 0).and_then(|g| g.kvs().first().map(|kv| kv.create_revision())).unwrap_or(0)
        };
        let inner = Arc::new(Inner { client, config: config.clone(), kv, base });
        tokio::spawn(compact_loop(Arc::downgrade(&inner), config.compact_every));
        Ok(EtcdStore(inner))
    }

    /// The etcd client (for the leader election on the same cluster).
    pub fn client(&self) -> Client {
        self.0.client.clone()
    }

    pub fn config(&self) -> &EtcdConfig {
        &self.0.config
    }

    /// Compacts etcd's history up to store revision `revision` now (tests; the store does it
    /// by itself every `compact_every`).
    pub async fn compact(&self, revision: Revision) -> Result<(), StateError> {
        let mut c = self.0.client.clone();
        c.compact(self.0.etcd_rev(revision), None).await.map_err(|e| self.0.err(e))?;
        Ok(())
    }
}

fn first_get(responses: &[TxnOpResponse], at: usize) -> Option<&GetResponse> {
    match responses.get(at) {
        Some(TxnOpResponse::Get(g)) => Some(g),
        _ => None,
    }
}

/// Compacts up to the revision seen one period earlier, until the store is dropped.
async fn compact_loop(inner: Weak<Inner>, every: Duration) {
    let mut previous: Option<i64> = None;
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else { return };
        let mut c = inner.client.clone();
        if let Some(p) = previous {
            // Another coordinator may have compacted further already: that error is harmless.
            if let Err(e) = c.compact(p, None).await {
                tracing::debug!(error = %inner.err(e), revision = p, "etcd compaction");
            }
        }
        if let Ok(r) = inner.current().await {
            previous = Some(r);
        }
    }
}

impl Inner {
    fn err(&self, e: etcd_client::Error) -> StateError {
        let message = match &e {
            etcd_client::Error::GRpcStatus(s) => format!("{} ({:?})", s.message(), s.code()),
            other => other.to_string(),
        };
        StateError::backend(EtcdError { endpoints: self.config.members(), message })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.kv)
    }

    fn unkey(&self, key: &[u8]) -> String {
        String::from_utf8_lossy(key.strip_prefix(self.kv.as_bytes()).unwrap_or(key)).into_owned()
    }

    fn rev(&self, etcd: i64) -> Revision {
        (etcd - self.base).max(0) as Revision
    }

    fn etcd_rev(&self, rev: Revision) -> i64 {
        rev as i64 + self.base
    }

    fn entry(&self, kv: &KeyValue) -> Entry {
        Entry { value: kv.value().to_vec(), create_revision: self.rev(kv.create_revision()), mod_revision: self.rev(kv.mod_revision()) }
    }

    /// etcd's revision now.
    async fn current(&self) -> Result<i64, StateError> {
        let mut c = self.client.clone();
        let r = c.get(self.kv.as_str(), Some(GetOptions::new().with_count_only())).await.map_err(|e| self.err(e))?;
        Ok(r.header().map_or(self.base, |h| h.revision()))
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StateError> {
        let mut c = self.client.clone();
        let r = c.get(self.key(key), None).await.map_err(|e| self.err(e))?;
        Ok(r.kvs().first().map(|kv| self.entry(kv)))
    }

    /// Every key under `prefix`, in pages, all read at the revision of the first page.
    async fn range(&self, prefix: &str) -> Result<Listing, StateError> {
        let full = self.key(prefix);
        let end = prefix_end(full.as_bytes());
        let mut c = self.client.clone();
        let (mut rows, mut at, mut from) = (Vec::new(), 0i64, full.into_bytes());
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if at > 0 {
                opts = opts.with_revision(at);
            }
            let r = c.get(from.clone(), Some(opts)).await.map_err(|e| self.err(e))?;
            if at == 0 {
                at = r.header().map_or(self.base, |h| h.revision());
            }
            rows.extend(r.kvs().iter().map(|kv| (self.unkey(kv.key()), self.entry(kv))));
            match r.kvs().last() {
                Some(last) if r.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((rows, self.rev(at))),
            }
        }
    }
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Inner {
    fn compare(&self, c: &Condition) -> Compare {
        let (key, expect, prefix) = match c {
            Condition::Key(k, e) => (self.key(k), *e, false),
            Condition::Prefix(p, e) => (self.key(p), *e, true),
        };
        let cmp = match expect {
            Expect::Absent => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            Expect::ModRevision(r) => Compare::mod_revision(key.as_str(), CompareOp::Equal, self.etcd_rev(r)),
            Expect::NotModifiedAfter(r) => Compare::mod_revision(key.as_str(), CompareOp::Less, self.etcd_rev(r) + 1),
        };
        if prefix {
            cmp.with_range(prefix_end(key.as_bytes()))
        } else {
            cmp
        }
    }

    /// The reads of the failure branch for condition `c`: what shows it failed.
    fn probes(&self, c: &Condition) -> Vec<TxnOp> {
        let one = || GetOptions::new().with_keys_only().with_limit(1);
        match c {
            Condition::Key(k, _) => vec![TxnOp::get(self.key(k), Some(GetOptions::new().with_keys_only()))],
            Condition::Prefix(p, e) => {
                let (key, end) = (self.key(p), prefix_end(self.key(p).as_bytes()));
                let under = || one().with_range(end.clone());
                match *e {
                    Expect::Absent => vec![TxnOp::get(key, Some(under()))],
                    Expect::NotModifiedAfter(r) => vec![TxnOp::get(key, Some(under().with_min_mod_revision(self.etcd_rev(r) + 1)))],
                    Expect::ModRevision(r) => vec![
                        TxnOp::get(key.as_str(), Some(under().with_min_mod_revision(self.etcd_rev(r) + 1))),
                        TxnOp::get(key.as_str(), Some(under().with_max_mod_revision((self.etcd_rev(r) - 1).max(1)))),
                    ],
                }
            }
        }
    }

    /// The first condition the failure branch's reads show failing.
    fn conflict(&self, conditions: &[Condition], responses: &[TxnOpResponse]) -> StateError {
        let mut at = 0;
        for c in conditions {
            let n = self.probes(c).len();
            let found: Vec<&KeyValue> = (at..at + n).filter_map(|i| first_get(responses, i)).flat_map(|g| g.kvs().first()).collect();
            at += n;
            match c {
                Condition::Key(key, expect) => {
                    let found = found.first().map(|kv| self.rev(kv.mod_revision()));
                    if !expect.holds(found) {
                        return StateError::Conflict { key: key.clone(), expected: *expect, found };
                    }
                }
                Condition::Prefix(_, expect) => {
                    if let Some(kv) = found.into_iter().min_by(|a, b| a.key().cmp(b.key())) {
                        return StateError::Conflict {
                            key: self.unkey(kv.key()),
                            expected: *expect,
                            found: Some(self.rev(kv.mod_revision())),
                        };
                    }
                }
            }
        }
        StateError::backend(EtcdError {
            endpoints: self.config.members(),
            message: "the transaction's conditions failed, but none does on reading back (a prefix condition at a revision over no key?)"
                .into(),
        })
    }

    async fn batch(&self, txn: Txn) -> Result<Committed, StateError> {
        check_batch(&txn)?;
        let compares: Vec<Compare> = txn.conditions.iter().map(|c| self.compare(c)).collect();
        let ops: Vec<TxnOp> = txn
            .ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value } => TxnOp::put(self.key(key), value.clone(), None),
                Op::Delete { key } => TxnOp::delete(self.key(key), None),
            })
            .collect();
        let probes: Vec<TxnOp> = txn.conditions.iter().flat_map(|c| self.probes(c)).collect();
        let mut c = self.client.clone();
        let resp = c.txn(etcd_client::Txn::new().when(compares).and_then(ops).or_else(probes)).await.map_err(|e| self.err(e))?;
        let responses = resp.op_responses();
        if !resp.succeeded() {
            return Err(self.conflict(&txn.conditions, &responses));
        }
        let deleted = responses
            .iter()
            .map(|r| match r {
                TxnOpResponse::Delete(d) => d.deleted() as usize,
                _ => 0,
            })
            .sum();
        Ok(Committed { revision: self.rev(resp.header().map_or(self.base, |h| h.revision())), deleted })
    }
}

/// Refuses a key twice in a batch and values etcd would refuse.
fn check_batch(txn: &Txn) -> Result<(), StateError> {
    let mut seen = std::collections::HashSet::new();
    if let Some(op) = txn.ops.iter().find(|op| !seen.insert(op.key())) {
        return Err(StateError::DuplicateKey { key: op.key().to_string() });
    }
    let mut total = 0;
    for op in &txn.ops {
        let size = match op {
            Op::Put { value, .. } => value.len(),
            Op::Delete { .. } => 0,
        };
        if size > MAX_VALUE {
            return Err(StateError::TooLarge { key: op.key().to_string(), size, limit: MAX_VALUE });
        }
        total += size + op.key().len();
    }
    if total > MAX_BATCH {
        let key = txn.ops.first().map(|o| o.key().to_string()).unwrap_or_default();
        return Err(StateError::TooLarge { key, size: total, limit: MAX_BATCH });
    }
    Ok(())
}

impl StateStore for EtcdStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Entry>, StateError>> {
        Box::pin(self.0.get(key))
    }

    fn range<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, StateError>> {
        Box::pin(self.0.range(prefix))
    }

    fn batch(&self, txn: Txn) -> BoxFuture<'_, Result<Committed, StateError>> {
        Box::pin(self.0.batch(txn))
    }

    fn watch<'a>(&'a self, prefix: &'a str, from: Revision) -> BoxFuture<'a, Result<WatchStream, StateError>> {
        Box::pin(watch(self.0.clone_parts(), prefix.to_string(), from))
    }

    fn revision(&self) -> BoxFuture<'_, Result<Revision, StateError>> {
        Box::pin(async move { Ok(self.0.rev(self.0.current().await?)) })
    }
}

impl Inner {
    fn clone_parts(&self) -> Parts {
        Parts { client: self.client.clone(), endpoints: self.config.members(), kv: self.kv.clone(), base: self.base }
    }
}

/// Converts one etcd event under `kv` into the store's.
fn event(kv_prefix: &str, base: i64, e: &etcd_client::Event) -> Option<WatchEvent> {
    let kv = e.kv()?;
    let key = String::from_utf8_lossy(kv.key().strip_prefix(kv_prefix.as_bytes()).unwrap_or(kv.key())).into_owned();
    let mod_revision = (kv.mod_revision() - base).max(0) as Revision;
    Some(match e.event_type() {
        EventType::Put => WatchEvent { kind: EventKind::Put, key, value: kv.value().to_vec(), mod_revision },
        EventType::Delete => WatchEvent { kind: EventKind::Delete, key, value: Vec::new(), mod_revision },
    })
}

/// Options of a watch from etcd revision `start` under `key`'s prefix.
fn watch_options(key: &str, start: i64) -> WatchOptions {
    WatchOptions::new().with_range(prefix_end(key.as_bytes())).with_start_revision(start)
}

/// Makes a [`WatchStream`] of a channel's receiver.
fn receiver_stream(rx: tokio::sync::mpsc::Receiver<Result<WatchEvent, StateError>>) -> WatchStream {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) }).boxed()
}

// --- Watches ---------------------------------------------------------------------------------
// One task per watch feeds a channel; when etcd's stream breaks (etcd down, a member restarting,
// a keep-alive missed) the task watches again from the revision after the last one it
// delivered, retrying until etcd answers, so a watcher sees every change once and in order
// across the outage. A start revision that etcd compacted away ends the watch with
// [`StateError::Compacted`].

/// What a watch task needs of the store.
struct Parts {
    client: Client,
    endpoints: String,
    kv: String,
    base: i64,
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
async fn watch(p: Parts, prefix: String, from: Revision) -> Result<WatchStream, StateError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_say_what_is_wrong() {
        let c = EtcdConfig::parse("etcd://127.0.0.1:2379").unwrap();
        assert_eq!((c.endpoints, c.prefix.as_str()), (vec!["http://127.0.0.1:2379".to_string()], "vgrid"));
        let c = EtcdConfig::parse("etcd://a:1,b:2/grid/one/").unwrap();
        assert_eq!((c.endpoints.len(), c.prefix.as_str()), (2, "grid/one"));
        for bad in ["http://a:1", "etcd://a", "etcd://a:x", "etcd://:1", "etcd://a:1,,b:2"] {
            assert!(EtcdConfig::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(prefix_end(b"a/"), b"a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
    }

    #[test]
    fn oversized_values_are_refused_before_etcd_sees_them() {
        let e = check_batch(&Txn::new().put("big", vec![0; MAX_VALUE + 1])).unwrap_err();
        assert!(matches!(&e, StateError::TooLarge { key, .. } if key == "big"), "{e}");
        assert!(e.to_string().contains("big"), "{e}");
        let many = (0..3).fold(Txn::new(), |t, i| t.put(format!("k{i}"), vec![0; MAX_VALUE / 2]));
        assert!(matches!(check_batch(&many), Err(StateError::TooLarge { .. })));
        check_batch(&Txn::new().put("ok", vec![0; MAX_VALUE])).unwrap();
    }
}
