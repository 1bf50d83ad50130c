//! `bench/scaleout`'s program (an ignored test, run by the bench script with `--ignored`):
//! admissions (placement, claims and the record in one compare-and-swap) by `COORDINATORS`
//! coordinators at once over `HOSTS` simulated host ads, with the state on a real etcd (each
//! coordinator on its own connection, as separate processes would be) against the same on one
//! redb file. Prints the figures and the line `scaleout: key=value ...`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::tests::{ad, admit, beat, create};
use super::Coordinator;
use crate::hosts::Registry;
use crate::state::etcd_server::EtcdServer;
use crate::state::{connect, open, State, StateConfig};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Run {
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    writes_per_placement: f64,
}

/// `placements` admissions spread over the coordinators, `concurrency` at a time.
async fn run(states: Vec<State>, hosts: usize, placements: usize, concurrency: usize) -> Run {
    let mut cs = Vec::new();
    for s in &states {
        let registry = Arc::new(Registry::new(Duration::from_secs(3600), Duration::from_secs(7200)));
        let c = Coordinator::new(s.clone(), registry).await.unwrap();
        c.recover_interrupted().await.unwrap();
        for h in 0..hosts {
            beat(&c, ad(&format!("h{h:05}"), 64, 1 << 20)).await;
        }
        cs.push(c);
    }
    let store = states[0].store().clone();
    let r0 = store.revision().await.unwrap();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let (cs, next) = (cs.clone(), next.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < placements {
                    let c = &cs[(w + lat.len()) % cs.len()];
                    let t = Instant::now();
                    admit(c, create(None, 1, None), "bench", &Default::default()).await.unwrap();
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<Duration> = Vec::new();
    for w in workers {
        lat.extend(w.await.unwrap());
    }
    let secs = t0.elapsed().as_secs_f64();
    let writes = store.revision().await.unwrap() - r0;
    lat.sort();
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1000.0;
    Run { per_s: lat.len() as f64 / secs, p50_ms: q(0.5), p99_ms: q(0.99), writes_per_placement: writes as f64 / lat.len() as f64 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: bench/run scaleout"]
async fn scaleout() {
    let hosts = env("HOSTS", 1000);
    let placements = env("PLACEMENTS", 2000);
    let coordinators = env("COORDINATORS", 3);
    let concurrency = env("CONCURRENCY", 32);
    let Some(server) = EtcdServer::start().await else { panic!("scaleout needs etcd (scripts/install-deps.sh)") };
    let config = StateConfig::Etcd(server.config("bench"));
    let mut etcd_states = Vec::new();
    for _ in 0..coordinators {
        etcd_states.push(connect(&config).await.unwrap());
    }
    let dir = tempfile::tempdir().unwrap();
    let redb = open(&StateConfig::Redb(dir.path().join("state.redb"))).unwrap();
    let redb_states = vec![redb; coordinators];
    eprintln!("{hosts} hosts, {coordinators} coordinators, {placements} placements, {concurrency} at a time");
    let e = run(etcd_states, hosts, placements, concurrency).await;
    let r = run(redb_states, hosts, placements, concurrency).await;
    for (name, x) in [("etcd", &e), ("redb", &r)] {
        eprintln!(
            "{name}: {:.0} placements/s, p50 {:.2} ms, p99 {:.2} ms, {:.2} write transactions per placement",
            x.per_s, x.p50_ms, x.p99_ms, x.writes_per_placement
        );
    }
    println!(
        "scaleout: etcd_vs_redb={:.3} p99_ms={:.2} etcd_placements_per_s={:.0} redb_placements_per_s={:.0} redb_p99_ms={:.2} \
         etcd_writes_per_placement={:.2} hosts={hosts} coordinators={coordinators} placements={placements}",
        e.per_s / r.per_s,
        e.p99_ms,
        e.per_s,
        r.per_s,
        r.p99_ms,
        e.writes_per_placement
    );
}
