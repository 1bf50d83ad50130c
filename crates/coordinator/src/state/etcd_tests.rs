//! The etcd backend against a real etcd started on loopback (skipped, saying so, without the
//! `etcd` binary): the conformance suite, an outage of etcd, compaction.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::etcd_server::EtcdServer;
use super::{EtcdStore, EventKind, StateError, StateStore, Txn};

/// A fresh etcd per test: the suite counts revisions from 1, which needs a cluster of its own.
async fn fresh() -> Option<(EtcdServer, Arc<dyn StateStore>)> {
    let server = EtcdServer::start().await?;
    let store = EtcdStore::open(&server.config("conformance")).await.unwrap();
    Some((server, Arc::new(store) as Arc<dyn StateStore>))
}

mod conformance {
    crate::conformance_suite!(match super::fresh().await {
        Some(s) => s,
        None => return,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_fails_clearly_then_everything_resumes() {
    let Some(mut server) = EtcdServer::start().await else { return };
    let store = EtcdStore::open(&server.config("outage")).await.unwrap();
    for i in 0..50u32 {
        store.put(&format!("vms/{i:03}"), i.to_le_bytes().to_vec()).await.unwrap();
    }
    let (before, at) = store.range("vms/").await.unwrap();
    let mut watch = store.watch("vms/", at + 1).await.unwrap();
    let mut from_start = store.watch("vms/", 1).await.unwrap();

    server.kill();
    // While etcd is down every call fails, naming where etcd was; none panics or hangs.
    let endpoint = server.endpoint();
    for e in [
        store.get("vms/001").await.unwrap_err(),
        store.put("vms/new", vec![1]).await.unwrap_err(),
        store.range("vms/").await.unwrap_err(),
        store.revision().await.unwrap_err(),
    ] {
        assert!(matches!(e, StateError::Backend(_)), "{e}");
        assert!(e.to_string().contains(&endpoint), "{e}");
    }
    let e = EtcdStore::open(&server.config("other")).await.err().expect("opening fails while etcd is down");
    assert!(e.to_string().contains(&endpoint), "{e}");
    tokio::time::sleep(Duration::from_secs(10)).await;
    server.restart().await;

    // Back: nothing lost or changed, writes go on at the next revisions, and the watch
    // opened before the outage resumes where it was: it sees the writes made after, in order.
    let (after, at2) = wait_ok(|| store.range("vms/")).await;
    assert_eq!(after, before);
    assert_eq!(at2, at);
    let r = store.batch(Txn::new().put("vms/050", vec![50]).delete("vms/000")).await.unwrap().revision;
    assert_eq!(r, at + 1);
    let e = tokio::time::timeout(Duration::from_secs(30), watch.next()).await.expect("the watch resumes").unwrap().unwrap();
    assert_eq!((e.kind, e.key.as_str(), e.mod_revision), (EventKind::Put, "vms/050", r));
    let e = watch.next().await.unwrap().unwrap();
    assert_eq!((e.kind, e.key.as_str(), e.mod_revision), (EventKind::Delete, "vms/000", r));
    // The other replays everything once, in order, across the outage.
    let mut seen = Vec::new();
    while seen.len() < 52 {
        let e = tokio::time::timeout(Duration::from_secs(30), from_start.next()).await.expect("a change").unwrap().unwrap();
        seen.push(e.mod_revision);
    }
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert_eq!(seen.first(), Some(&1));
    assert_eq!(seen.last(), Some(&r));
}

/// Calls `f` until it succeeds (etcd coming back up).
async fn wait_ok<T, F, Fut>(f: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, StateError>>,
{
    let t0 = std::time::Instant::now();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => assert!(t0.elapsed() < Duration::from_secs(60), "etcd did not come back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_from_compacted_history_says_so() {
    let Some(server) = EtcdServer::start().await else { return };
    let store = EtcdStore::open(&server.config("compact")).await.unwrap();
    for i in 0..10u8 {
        store.put("k", vec![i]).await.unwrap();
    }
    store.compact(6).await.unwrap();
    match store.watch("", 3).await {
        Err(StateError::Compacted { requested: 3, oldest }) => assert_eq!(oldest, 6),
        Err(e) => panic!("expected Compacted, got {e}"),
        Ok(_) => panic!("expected Compacted, got a watch"),
    }
    // From the compaction on, the history is there.
    let mut w = store.watch("", 6).await.unwrap();
    assert_eq!(w.next().await.unwrap().unwrap().value, [5]);
    // Values etcd would refuse are refused first, naming the key.
    let e = store.put("big", vec![0; super::etcd::MAX_VALUE + 1]).await.unwrap_err();
    assert!(matches!(&e, StateError::TooLarge { key, .. } if key == "big"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stores_on_one_prefix_share_keys_and_revisions() {
    let Some(server) = EtcdServer::start().await else { return };
    let a = EtcdStore::open(&server.config("shared")).await.unwrap();
    let b = EtcdStore::open(&server.config("shared")).await.unwrap();
    let other = EtcdStore::open(&server.config("shared2")).await.unwrap();
    let r = a.put("x", vec![1]).await.unwrap();
    assert_eq!(b.get("x").await.unwrap().unwrap().mod_revision, r);
    assert!(other.get("x").await.unwrap().is_none());
    assert!(b.put_if("x", vec![2], super::Expect::Absent).await.unwrap_err().is_conflict());
}
