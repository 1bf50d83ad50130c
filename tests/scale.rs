//! The coordinator under load: 200 concurrent `vm run` requests (the REST call the CLI makes)
//! against ten simulated host agents. The coordinator and the image server are the real
//! processes; each simulated host is an HTTP server speaking the host agent's API
//! (`/host/v1`) and heartbeating like one, whose "VMs" run for a short while and power off.
//! Booting 200 real guests on this machine would take an hour; the scheduler's correctness
//! under concurrency does not depend on what runs behind the host API.
//!
//! Checked: no host is ever given more cpus or memory than it advertised (each simulated host
//! counts what it runs at every launch), every request is answered, every VM is launched exactly
//! once and ends `stopped`.

mod common;

use common::sim::{authed, start_sim, wait_ready, SimSpec};
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const HOSTS: usize = 10;
const HOST_CPUS: u64 = 4;
const HOST_MEM: u64 = 4096;
const REQUESTS: usize = 200;

#[test]
fn two_hundred_concurrent_runs_never_overcommit_a_host() {
    let dir = tempfile::Builder::new().prefix("vgs").tempdir_in("/tmp").unwrap();
    let p = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    let coordinator = Role::start(
        &["coordinator", "--listen", "127.0.0.1:0", "--data-dir", &p("coord"), "--heartbeat-interval", "1", "--lost-after-beats", "30"],
        dir.path().join("coord.log"),
    );
    let server = common::simgrid::tiny_image_server(dir.path(), &coordinator.url);

    // A token for the raw REST calls (the first admin is this machine's user, as for `vgrid up`).
    let o = std::process::Command::new(vgrid_bin()).args(["--json", "--url", &coordinator.url, "login"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let token = serde_json::from_slice::<Value>(&o.stdout).unwrap()["token"].as_str().unwrap().to_string();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    let coord = coordinator.url.clone();
    let token_copy = token.clone();
    let ca = std::fs::read_to_string(pinned_ca(&coordinator.url)).unwrap();
    let ca2 = ca.clone();
    let (sims, answers) = rt.block_on(async move {
        let mut sims = Vec::new();
        for i in 0..HOSTS {
            let site = if i % 2 == 0 { "uf" } else { "nw" };
            let spec = SimSpec { cpus: HOST_CPUS, memory_mib: HOST_MEM, labels: vec![("site".into(), site.into())], ..SimSpec::default() };
            sims.push(start_sim(format!("sim{i}"), coord.clone(), spec).await);
        }
        let http = authed(&token, &ca);
        wait_ready(&http, &coord, HOSTS, Duration::from_secs(30)).await;
        // 200 requests at once: 1 or 2 cpus, 512-1536 MiB; every fifth must land on site uf.
        let reqs = (0..REQUESTS).map(|i| {
            let http = http.clone();
            let coord = coord.clone();
            async move {
                let mut body = json!({
                    "image": "tiny", "name": format!("s{i}"), "cpus": 1 + i % 2, "memory_mib": 512 + 512 * (i % 3),
                });
                if i % 5 == 0 {
                    body["require"] = json!("host.labels.site == 'uf'");
                }
                let r = http.post(format!("{coord}/api/v1/vms")).json(&body).send().await.unwrap();
                let status = r.status();
                let v: Value = r.json().await.unwrap();
                (i, status, v)
            }
        });
        let answers = futures::future::join_all(reqs).await;
        (sims, answers)
    });

    let mut ids = HashMap::new();
    for (i, status, v) in &answers {
        assert!(status.is_success(), "request {i} answered {status}: {v}");
        ids.insert(v["id"].as_str().unwrap().to_string(), *i);
    }
    assert_eq!(ids.len(), REQUESTS, "every request got its own VM");

    // Every VM runs on a simulated host and powers off; queued ones are placed as capacity frees.
    let url = coordinator.url.clone();
    let log = coordinator.log.clone();
    let token2 = token_copy;
    let vms = rt.block_on(async move {
        let http = authed(&token2, &ca2);
        let t0 = Instant::now();
        loop {
            let vms: Value = http.get(format!("{url}/api/v1/vms")).send().await.unwrap().json().await.unwrap();
            let vms = vms.as_array().unwrap().clone();
            let done = vms.iter().filter(|v| v["state"] == "stopped" || v["state"] == "failed").count();
            if done == REQUESTS {
                break vms;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "{done}/{REQUESTS} VMs ended after 300 s; coordinator log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    for v in &vms {
        assert_eq!(v["state"], "stopped", "VM {} ended {}: {}", v["name"], v["state"], v["reason"]);
        let i = ids[v["id"].as_str().unwrap()];
        if i % 5 == 0 {
            let host = v["host"].as_str().unwrap();
            let n: usize = host.trim_start_matches("sim").parse().unwrap();
            assert_eq!(n % 2, 0, "VM {} required site uf but ran on {host}", v["name"]);
        }
    }
    let mut launches: Vec<String> = Vec::new();
    for s in &sims {
        let st = s.state.lock().unwrap();
        assert!(st.over.is_empty(), "host over capacity: {:?}", st.over);
        assert!(st.max_cpus <= HOST_CPUS && st.max_mem <= HOST_MEM);
        assert!(st.max_cpus > 0, "{} was never used", s.name);
        launches.extend(st.launches.iter().cloned());
    }
    let total = launches.len();
    launches.sort();
    launches.dedup();
    assert_eq!(total, REQUESTS, "each VM is launched once (launches: {total})");
    assert_eq!(launches.len(), REQUESTS);
    drop(rt);
    drop(server);
}
