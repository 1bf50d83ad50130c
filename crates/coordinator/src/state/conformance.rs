//! One test suite for every [`StateStore`] backend: each test is an async fn over a fresh, empty
//! store, and [`conformance_suite!`](crate::conformance_suite) instantiates all of them as
//! `#[tokio::test]`s for one backend. A new backend adds one line below (or, from another crate,
//! enables the `testing` feature and calls the macro).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::{Committed, Condition, EventKind, Expect, Revision, StateError, StateStore, Txn, WatchEvent, WatchStream};

/// Instantiates the whole suite for a backend: `$make` is an expression giving
/// `(guard, Arc<dyn StateStore>)` for a fresh store (the guard lives as long as the test: a
/// temporary directory, say).
#[macro_export]
macro_rules! conformance_suite {
    ($make:expr) => {
        $crate::conformance_suite!(@tests $make;
            get_put_delete, revisions_increase_and_follow_writes, put_if_absent_and_at_revision, delete_if,
            a_failed_condition_writes_nothing_and_names_itself, a_key_twice_in_a_batch_is_refused,
            the_prefix_condition, range_is_ordered_and_prefixes_are_isolated, watch_replays_then_follows_in_order,
            concurrent_swaps_lose_no_update);
    };
    (@tests $make:expr; $($name:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            let (_guard, store) = $make;
            $crate::state::conformance::$name(store).await;
        }
    )*};
}

type Store = Arc<dyn StateStore>;

async fn value(s: &Store, key: &str) -> Option<Vec<u8>> {
    s.get(key).await.unwrap().map(|e| e.value)
}

fn conflict(e: StateError) -> (String, Expect, Option<Revision>) {
    match e {
        StateError::Conflict { key, expected, found } => (key, expected, found),
        other => panic!("expected a conflict, got {other}"),
    }
}

async fn next(w: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), w.next()).await.expect("a change within 10 s").expect("the watch goes on").unwrap()
}

pub async fn get_put_delete(s: Store) {
    assert!(s.get("k").await.unwrap().is_none());
    s.put("k", b"v1".to_vec()).await.unwrap();
    assert_eq!(value(&s, "k").await.unwrap(), b"v1");
    s.put("k", b"v2".to_vec()).await.unwrap();
    assert_eq!(value(&s, "k").await.unwrap(), b"v2");
    s.put("empty", Vec::new()).await.unwrap();
    assert_eq!(value(&s, "empty").await.unwrap(), b"");
    assert!(s.delete("k").await.unwrap().is_some());
    assert!(s.get("k").await.unwrap().is_none());
    assert_eq!(s.delete("k").await.unwrap(), None);
}

pub async fn revisions_increase_and_follow_writes(s: Store) {
    assert_eq!(s.revision().await.unwrap(), 0);
    let r1 = s.put("a", b"1".to_vec()).await.unwrap();
    let r2 = s.put("b", b"1".to_vec()).await.unwrap();
    let r3 = s.put("a", b"2".to_vec()).await.unwrap();
    assert_eq!((r1, r2, r3), (1, 2, 3));
    let a = s.get("a").await.unwrap().unwrap();
    assert_eq!((a.create_revision, a.mod_revision), (r1, r3));
    let b = s.get("b").await.unwrap().unwrap();
    assert_eq!((b.create_revision, b.mod_revision), (r2, r2));
    // A write that changes nothing does not move the revision.
    assert_eq!(s.delete("nonesuch").await.unwrap(), None);
    assert_eq!(s.batch(Txn::new()).await.unwrap(), Committed { revision: r3, deleted: 0 });
    assert_eq!(s.revision().await.unwrap(), r3);
    // A deleted and re-created key starts a new life.
    assert_eq!(s.delete("a").await.unwrap(), Some(4));
    let r5 = s.put("a", b"3".to_vec()).await.unwrap();
    let a = s.get("a").await.unwrap().unwrap();
    assert_eq!((a.create_revision, a.mod_revision, r5), (5, 5, 5));
    let (_, at) = s.range("").await.unwrap();
    assert_eq!(at, 5);
}

pub async fn put_if_absent_and_at_revision(s: Store) {
    let r1 = s.put_if("k", b"1".to_vec(), Expect::Absent).await.unwrap();
    assert_eq!(conflict(s.put_if("k", b"x".to_vec(), Expect::Absent).await.unwrap_err()), ("k".into(), Expect::Absent, Some(r1)));
    let r2 = s.put_if("k", b"2".to_vec(), Expect::ModRevision(r1)).await.unwrap();
    // A writer that read at r1 loses, and learns what it lost to.
    let e = s.put_if("k", b"x".to_vec(), Expect::ModRevision(r1)).await.unwrap_err();
    assert!(e.to_string().contains("state key k: expected at mod revision 1, found mod revision 2"), "{e}");
    assert_eq!(conflict(e), ("k".into(), Expect::ModRevision(r1), Some(r2)));
    assert_eq!(conflict(s.put_if("new", b"x".to_vec(), Expect::ModRevision(r2)).await.unwrap_err()).2, None);
    // Not modified after: absent or old enough.
    s.put_if("new", b"x".to_vec(), Expect::NotModifiedAfter(r2)).await.unwrap();
    assert!(s.put_if("k", b"3".to_vec(), Expect::NotModifiedAfter(r1)).await.unwrap_err().is_conflict());
    s.put_if("k", b"3".to_vec(), Expect::NotModifiedAfter(r2)).await.unwrap();
    assert_eq!(value(&s, "k").await.unwrap(), b"3");
}

pub async fn delete_if(s: Store) {
    let r1 = s.put("k", b"1".to_vec()).await.unwrap();
    let r2 = s.put("k", b"2".to_vec()).await.unwrap();
    assert_eq!(conflict(s.delete_if("k", Expect::ModRevision(r1)).await.unwrap_err()), ("k".into(), Expect::ModRevision(r1), Some(r2)));
    assert!(s.get("k").await.unwrap().is_some());
    assert_eq!(s.delete_if("k", Expect::ModRevision(r2)).await.unwrap(), r2 + 1);
    assert!(s.get("k").await.unwrap().is_none());
    assert!(s.delete_if("k", Expect::ModRevision(r2)).await.unwrap_err().is_conflict());
}

pub async fn a_failed_condition_writes_nothing_and_names_itself(s: Store) {
    let r1 = s.put("a", b"1".to_vec()).await.unwrap();
    s.put("b", b"1".to_vec()).await.unwrap();
    let txn = Txn::new()
        .when("a", Expect::ModRevision(r1))
        .when("b", Expect::Absent)
        .when("c", Expect::Absent)
        .put("a", b"2".to_vec())
        .put("c", b"2".to_vec())
        .delete("b");
    let e = s.batch(txn).await.unwrap_err();
    assert_eq!(conflict(e), ("b".into(), Expect::Absent, Some(2)));
    assert_eq!(value(&s, "a").await.unwrap(), b"1");
    assert_eq!(value(&s, "b").await.unwrap(), b"1");
    assert!(s.get("c").await.unwrap().is_none());
    assert_eq!(s.revision().await.unwrap(), 2);
    // The same batch with conditions that hold writes everything at one revision.
    let txn =
        Txn::new().when("a", Expect::ModRevision(r1)).when("c", Expect::Absent).put("a", b"2".to_vec()).put("c", b"2".to_vec()).delete("b");
    assert_eq!(s.batch(txn).await.unwrap(), Committed { revision: 3, deleted: 1 });
    assert_eq!(s.get("a").await.unwrap().unwrap().mod_revision, 3);
    assert_eq!(s.get("c").await.unwrap().unwrap().mod_revision, 3);
    assert!(s.get("b").await.unwrap().is_none());
}

pub async fn a_key_twice_in_a_batch_is_refused(s: Store) {
    let e = s.batch(Txn::new().put("k", b"1".to_vec()).delete("k")).await.unwrap_err();
    assert!(matches!(&e, StateError::DuplicateKey { key } if key == "k"), "{e}");
    assert!(s.get("k").await.unwrap().is_none());
    assert_eq!(s.revision().await.unwrap(), 0);
}

pub async fn the_prefix_condition(s: Store) {
    s.put("vms/a", b"1".to_vec()).await.unwrap();
    s.put("vms/b", b"1".to_vec()).await.unwrap();
    let (_, read_at) = s.range("vms/").await.unwrap();
    // Changes outside the prefix (even one sharing its first letters) do not matter.
    s.put("vmsx", b"1".to_vec()).await.unwrap();
    s.put("usage/vms/a", b"1".to_vec()).await.unwrap();
    let admit = |key: &str| Txn::new().when_unchanged_since("vms/", read_at).put(key, b"new".to_vec());
    let r = s.batch(admit("vms/c")).await.unwrap().revision;
    // Now a key under the prefix is newer than what was read: refused, naming it.
    let e = s.batch(admit("vms/d")).await.unwrap_err();
    assert_eq!(conflict(e), ("vms/c".into(), Expect::NotModifiedAfter(read_at), Some(r)));
    assert!(s.get("vms/d").await.unwrap().is_none());
    // A delete under the prefix does not fail it (as in etcd: only keys present are compared).
    let (_, read_at) = s.range("vms/").await.unwrap();
    s.delete("vms/a").await.unwrap();
    s.batch(Txn::new().when_unchanged_since("vms/", read_at).put("other", vec![])).await.unwrap();
    // Other expectations over a prefix: none there; all at one revision.
    assert!(s.batch(Txn::new().when_prefix("none/", Expect::Absent).put("none/x", vec![])).await.is_ok());
    assert_eq!(conflict(s.batch(Txn::new().when_prefix("vms/", Expect::Absent)).await.unwrap_err()).0, "vms/b");
    let c = s.batch(Txn::new().put("p/1", vec![]).put("p/2", vec![])).await.unwrap().revision;
    s.batch(Txn::new().when_prefix("p/", Expect::ModRevision(c))).await.unwrap();
    assert!(s.batch(Txn::new().when_prefix("p/", Expect::ModRevision(c - 1))).await.unwrap_err().is_conflict());
    assert_eq!(Txn::new().when_unchanged_since("vms/", 7).conditions, [Condition::Prefix("vms/".into(), Expect::NotModifiedAfter(7))]);
}

pub async fn range_is_ordered_and_prefixes_are_isolated(s: Store) {
    for k in ["vms/b", "usage/vms/a", "vms/a", "vms/a/x", "vms", "vmsa", "vms/c", "usage/buckets/a/1"] {
        s.put(k, k.as_bytes().to_vec()).await.unwrap();
    }
    let (rows, at) = s.range("vms/").await.unwrap();
    assert_eq!(rows.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["vms/a", "vms/a/x", "vms/b", "vms/c"]);
    assert!(rows.iter().all(|(k, e)| e.value == k.as_bytes()));
    assert_eq!(at, 8);
    let (rows, _) = s.range("usage/").await.unwrap();
    assert_eq!(rows.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["usage/buckets/a/1", "usage/vms/a"]);
    assert!(s.range("nothing/").await.unwrap().0.is_empty());
    assert_eq!(s.range("").await.unwrap().0.len(), 8);
}

pub async fn watch_replays_then_follows_in_order(s: Store) {
    let r1 = s.put("a/1", b"x".to_vec()).await.unwrap();
    s.put("b/1", b"y".to_vec()).await.unwrap();
    let r3 = s.batch(Txn::new().put("a/2", b"z".to_vec()).delete("a/1")).await.unwrap().revision;
    // From r1: the kept changes under a/, in order, only those.
    let mut w = s.watch("a/", r1).await.unwrap();
    let mut now = s.watch("a/", 0).await.unwrap();
    let got: Vec<_> = [next(&mut w).await, next(&mut w).await, next(&mut w).await]
        .into_iter()
        .map(|e| (e.kind, e.key, e.value, e.mod_revision))
        .collect();
    assert_eq!(
        got,
        [
            (EventKind::Put, "a/1".into(), b"x".to_vec(), r1),
            (EventKind::Put, "a/2".into(), b"z".to_vec(), r3),
            (EventKind::Delete, "a/1".into(), Vec::new(), r3),
        ]
    );
    // Then it follows new changes, as does a watch from "now".
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 0..20u8 {
                s.put(&format!("a/{}", i % 3), vec![i]).await.unwrap();
                s.put("b/1", vec![i]).await.unwrap();
            }
            s.delete("a/0").await.unwrap();
        })
    };
    for w in [&mut w, &mut now] {
        let mut last = r3;
        for i in 0..20u8 {
            let e = next(w).await;
            assert_eq!((e.kind, e.key.as_str(), e.value.as_slice()), (EventKind::Put, format!("a/{}", i % 3).as_str(), &[i][..]));
            assert!(e.mod_revision > last);
            last = e.mod_revision;
        }
        assert_eq!(next(w).await.kind, EventKind::Delete);
    }
    writer.await.unwrap();
    // Watching from a revision in the future waits for it.
    let at = s.revision().await.unwrap();
    let mut later = s.watch("", at + 2).await.unwrap();
    s.put("c", vec![1]).await.unwrap();
    s.put("c", vec![2]).await.unwrap();
    assert_eq!(next(&mut later).await.value, [2]);
}

pub async fn concurrent_swaps_lose_no_update(s: Store) {
    const TASKS: u64 = 32;
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                loop {
                    let (n, expect) = match s.get("counter").await.unwrap() {
                        Some(e) => (u64::from_le_bytes(e.value.try_into().unwrap()), Expect::ModRevision(e.mod_revision)),
                        None => (0, Expect::Absent),
                    };
                    match s.put_if("counter", (n + 1).to_le_bytes().to_vec(), expect).await {
                        Ok(r) => return r,
                        Err(e) if e.is_conflict() => tokio::task::yield_now().await,
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    let mut won = Vec::new();
    for t in tasks {
        won.push(t.await.unwrap());
    }
    let e = s.get("counter").await.unwrap().unwrap();
    assert_eq!(u64::from_le_bytes(e.value.try_into().unwrap()), TASKS);
    // Exactly one writer won each revision.
    won.sort();
    assert_eq!(won, (1..=TASKS).collect::<Vec<_>>());
}

#[cfg(test)]
mod memory {
    use std::sync::Arc;

    use crate::state::{MemoryStore, StateStore};

    crate::conformance_suite!(((), Arc::new(MemoryStore::new()) as Arc<dyn StateStore>));
}

#[cfg(test)]
mod redb {
    use std::sync::Arc;

    use crate::state::{RedbStore, StateStore};

    crate::conformance_suite!({
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("state.redb")).unwrap();
        (dir, Arc::new(store) as Arc<dyn StateStore>)
    });
}
