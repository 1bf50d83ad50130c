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
