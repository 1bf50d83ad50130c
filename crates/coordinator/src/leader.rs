//! Which coordinator leads, when several share one etcd state: an etcd election (the election
//! API on `PREFIX/leader`, each candidate's key bound to a lease of `ttl`). The leader keeps its
//! lease alive; a leader killed outright stops doing so, its key goes with its lease after at
//! most `ttl`, and the next candidate is elected. A leader that cannot renew its lease for
//! two thirds of `ttl` (etcd down, a partition) steps down by itself before its lease can
//! expire, so two coordinators never both believe they lead while etcd works.
//!
//! A coordinator on redb or in memory is alone: [`Leadership::sole`] always leads.

use std::time::{Duration, Instant};

use etcd_client::Client;
use tokio::sync::watch;

/// Whether this coordinator leads now, kept up to date by a background task.
pub struct Leadership {
    rx: watch::Receiver<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Leadership {
    /// The only coordinator: always the leader.
    pub fn sole() -> Leadership {
        let (_tx, rx) = watch::channel(true);
        Leadership { rx, task: None }
    }

    /// Stands for election `name` as `me` (shown as the leader's value), with leases of `ttl`.
    pub fn campaign(client: Client, name: String, me: String, ttl: Duration) -> Leadership {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(run(client, name, me, ttl, tx));
        Leadership { rx, task: Some(task) }
    }

    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// A receiver that sees every change of leadership.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.rx.clone()
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn run(mut client: Client, name: String, me: String, ttl: Duration, tx: watch::Sender<bool>) {
    let secs = ttl.as_secs().max(1) as i64;
    loop {
        match term(&mut client, &name, &me, secs, &tx).await {
            Ok(()) => {}
            Err(e) => tracing::warn!(election = %name, "leader election: {e}; standing again"),
        }
        tx.send_replace(false);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One lease: campaign with it, lead while it is renewed, return when it is lost (the error
/// as text: etcd's error type is large).
async fn term(client: &mut Client, name: &str, me: &str, ttl: i64, tx: &watch::Sender<bool>) -> Result<(), String> {
    let lease = client.lease_grant(ttl, None).await.map_err(|e| e.to_string())?.id();
    let result = async {
        let (mut keeper, mut stream) = client.clone().lease_keep_alive(lease).await?;
        let period = Duration::from_millis(ttl as u64 * 1000 / 3);
        let keep = async {
            let mut renewed = Instant::now();
            loop {
                tokio::time::sleep(period).await;
                let round = async {
                    keeper.keep_alive().await?;
                    match stream.message().await? {
                        Some(r) if r.ttl() > 0 => Ok(()),
                        _ => Err(etcd_client::Error::LeaseKeepAliveError("the lease expired".into())),
                    }
                };
                match tokio::time::timeout(period, round).await {
                    Ok(Ok(())) => renewed = Instant::now(),
                    Ok(Err(e)) => return e,
                    Err(_) if renewed.elapsed() >= period * 2 => {
                        return etcd_client::Error::LeaseKeepAliveError("the lease was not renewed in time".into())
                    }
                    Err(_) => {}
                }
            }
        };
        tokio::pin!(keep);
        let mut election = client.clone();
        tokio::select! {
            won = election.campaign(name, me, lease) => {
                won?;
                tracing::info!(election = %name, me, "leading");
                tx.send_replace(true);
                let e = keep.await;
                tracing::warn!(election = %name, me, "no longer leading: {e}");
                Err(e)
            }
            e = &mut keep => Err(e),
        }
    }
    .await;
    // Best effort: let the next candidate in now rather than after the lease's TTL.
    let _ = client.lease_revoke(lease).await;
    result.map_err(|e: etcd_client::Error| e.to_string())
}

/// This coordinator's presence in the grid: the key `PREFIX/ME` (its value `me`) bound to a
/// lease of its own, renewed by a background task; a coordinator killed outright stops
/// renewing, and its key goes with the lease after at most `ttl`. The leader follows the keys
/// ([`follow_departures`]) and takes over the work of a coordinator whose key went.
pub struct Presence {
    task: tokio::task::JoinHandle<()>,
}

impl Presence {
    pub fn register(client: Client, prefix: String, me: String, ttl: Duration) -> Presence {
        let task = tokio::spawn(async move {
            let secs = ttl.as_secs().max(1) as i64;
            let key = presence_key(&prefix, &me);
            loop {
                if let Err(e) = present_for_a_lease(&client, &key, &me, secs).await {
                    tracing::warn!(key, "coordinator presence: {e}; registering again");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Presence { task }
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The presence key of coordinator `me` (a URL) under `prefix`.
fn presence_key(prefix: &str, me: &str) -> String {
    let safe: String = me.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect();
    format!("{prefix}/{safe}")
}

/// Puts `key` = `me` with a new lease and renews it until that fails.
async fn present_for_a_lease(client: &Client, key: &str, me: &str, ttl: i64) -> Result<(), String> {
    let mut client = client.clone();
    let lease = client.lease_grant(ttl, None).await.map_err(|e| e.to_string())?.id();
    let put = etcd_client::PutOptions::new().with_lease(lease);
    client.put(key, me, Some(put)).await.map_err(|e| e.to_string())?;
    let (mut keeper, mut stream) = client.lease_keep_alive(lease).await.map_err(|e| e.to_string())?;
    let period = Duration::from_millis(ttl as u64 * 1000 / 3);
    loop {
        tokio::time::sleep(period).await;
        keeper.keep_alive().await.map_err(|e| e.to_string())?;
        match tokio::time::timeout(period * 2, stream.message()).await {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("the lease was not renewed in time".into()),
            _ => return Err("the lease expired".into()),
        }
    }
}

/// The coordinators present under `prefix` now (their URLs).
pub async fn present(client: &Client, prefix: &str) -> Result<std::collections::BTreeSet<String>, String> {
    let opts = etcd_client::GetOptions::new().with_prefix();
    let r = client.clone().get(format!("{prefix}/"), Some(opts)).await.map_err(|e| e.to_string())?;
    Ok(r.kvs().iter().filter_map(|kv| kv.value_str().ok().map(str::to_string)).collect())
}

/// While `coord` lives: every `period`, the coordinators present under `prefix`; when one
/// seen before is gone (killed, or cut off from etcd for a lease's TTL) and this coordinator
/// leads, the work no task of its own holds is taken over ([`crate::Coordinator::take_over`]):
/// the VMs the gone coordinator was queueing, launching, watching, suspending or migrating are
/// queued again, settled from their host or watched, as after a change of leader.
pub fn follow_departures(coord: std::sync::Weak<crate::Coordinator>, client: Client, prefix: String, me: String, period: Duration) {
    tokio::spawn(async move {
        let mut seen = std::collections::BTreeSet::new();
        loop {
            tokio::time::sleep(period).await;
            let Some(c) = coord.upgrade() else { return };
            let now = match present(&client, &prefix).await {
                Ok(now) => now,
                Err(e) => {
                    tracing::warn!(prefix, "cannot read which coordinators are present: {e}");
                    continue;
                }
            };
            let gone: Vec<&String> = seen.difference(&now).filter(|u| **u != me).collect();
            if !gone.is_empty() && c.is_leader() {
                for u in &gone {
                    tracing::warn!(coordinator = %u, "coordinator gone (its presence key expired): taking over its work");
                }
                c.take_over().await;
            }
            seen = now;
        }
    });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Leadership;
    use crate::state::etcd_server::EtcdServer;

    async fn until(l: &Leadership, want: bool) {
        let mut rx = l.subscribe();
        while *rx.borrow_and_update() != want {
            rx.changed().await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_leads_and_another_takes_over_when_it_goes() {
        let Some(server) = EtcdServer::start().await else { return };
        let ttl = Duration::from_secs(2);
        let client = || async { crate::state::etcd::connect(&server.config("g")).await.unwrap() };
        let a = Leadership::campaign(client().await, "g/leader".into(), "a".into(), ttl);
        tokio::time::timeout(Duration::from_secs(30), until(&a, true)).await.expect("a leads");
        let b = Leadership::campaign(client().await, "g/leader".into(), "b".into(), ttl);
        let c = Leadership::campaign(client().await, "g/leader".into(), "c".into(), ttl);
        // While a lives, it alone leads.
        tokio::time::sleep(ttl * 2).await;
        assert!(a.is_leader() && !b.is_leader() && !c.is_leader());
        // a dies without a word (its task stops renewing; its lease expires): one other leads.
        drop(a);
        let t0 = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(30), async {
            while !(b.is_leader() || c.is_leader()) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("another leads");
        eprintln!("took over {:?} after the leader went (lease TTL {ttl:?})", t0.elapsed());
        tokio::time::sleep(ttl).await;
        assert!(b.is_leader() != c.is_leader(), "exactly one leads");
    }
}
