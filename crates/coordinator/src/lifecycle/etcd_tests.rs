//! Admission by two coordinators, each with its own connection to one real etcd (started on
//! loopback by the test; skipped, saying so, without the `etcd` binary): the claims in the store
//! decide, so neither a quota, nor a host, nor a name or a host port is ever given twice.

use super::tests::{never_exceed_a_host, never_exceed_a_quota, never_share_a_name_or_a_host_port, two_on};
use super::tests::{ONE_BIG_HOST, ONE_SMALL_HOST, QUOTA_HOSTS};
use crate::state::etcd_server::EtcdServer;
use crate::state::{connect, State, StateConfig};

/// Two handles of one etcd store, as two coordinator processes would have.
async fn two_connections(server: &EtcdServer) -> [State; 2] {
    let config = StateConfig::Etcd(server.config("grid"));
    [connect(&config).await.unwrap(), connect(&config).await.unwrap()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_on_etcd_never_exceed_a_quota() {
    let Some(server) = EtcdServer::start().await else { return };
    never_exceed_a_quota(two_on(two_connections(&server).await, QUOTA_HOSTS).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_on_etcd_never_exceed_a_host() {
    let Some(server) = EtcdServer::start().await else { return };
    never_exceed_a_host(two_on(two_connections(&server).await, ONE_SMALL_HOST).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_on_etcd_never_share_a_name_or_a_host_port() {
    let Some(server) = EtcdServer::start().await else { return };
    never_share_a_name_or_a_host_port(two_on(two_connections(&server).await, ONE_BIG_HOST).await).await;
}

/// What the design writes to etcd, counted in etcd transactions (each is one revision): per
/// placement, per steady heartbeat, per VM state change. Printed for bench/README's estimate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_writes_per_placement_heartbeat_and_state_change() {
    use super::table::Event;
    use super::tests::{ad, admit, beat, create};
    let Some(server) = EtcdServer::start().await else { return };
    let state = connect(&StateConfig::Etcd(server.config("count"))).await.unwrap();
    let c = super::Coordinator::new(
        state.clone(),
        crate::hosts::Registry::new(std::time::Duration::from_secs(3600), std::time::Duration::from_secs(7200)).into(),
    )
    .await
    .unwrap();
    c.recover_interrupted().await.unwrap();
    let rev = || async { state.store().revision().await.unwrap() };
    beat(&c, ad("h1", 64, 1 << 20)).await;
    let r0 = rev().await;
    for _ in 0..10 {
        beat(&c, ad("h1", 64, 1 << 20)).await;
    }
    let heartbeats = rev().await - r0;
    let r1 = rev().await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(admit(&c, create(None, 1, None), "alice", &Default::default()).await.unwrap().id);
    }
    let placements = rev().await - r1;
    let r2 = rev().await;
    // Two changes each: pending → starting (the launch sent), starting → running.
    for id in &ids {
        c.apply(id, Event::LaunchSent).await.unwrap();
        c.apply(id, Event::Launched { pid: 42, accel: vgrid_api::config::Accel::Kvm }).await.unwrap();
    }
    let changes = (rev().await - r2) / 2;
    eprintln!(
        "etcd write transactions: per placement {:.1}, per steady heartbeat {:.1}, per VM state change {:.1}",
        placements as f64 / 10.0,
        heartbeats as f64 / 10.0,
        changes as f64 / 10.0
    );
    // Each is a compare-and-swap batch: an admission is at least one, a change exactly one.
    assert!(placements >= 10, "{placements}");
    assert_eq!(changes, 10);
}
