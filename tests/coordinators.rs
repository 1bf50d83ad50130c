//! Several coordinators on one etcd (issue 16): two `vgrid coordinator --state etcd://…`
//! processes sharing one grid CA, an image server and ten simulated host agents heartbeating
//! to both, 200 concurrent `vm run` REST calls spread over both coordinators, and the leader
//! SIGKILLed mid-way. A client whose coordinator dies sends its request to the other one (a 409
//! "exists already" then means the first attempt was recorded: the VM is looked up).
//!
//! Checked: the other coordinator becomes leader (`GET /api/v1/health`'s `leader`, its log);
//! every request is answered with its own VM; every VM is launched exactly once and ends
//! `stopped` (the queued, placed and starting VMs of the dead leader are taken over by the new
//! one); no host is ever given more than it advertised; nothing is left running on a host.
//! Fails, saying so, when the `etcd` binary is not installed (`scripts/install-deps.sh`).

mod common;

use common::sim::{authed, create_with_retry, login_token, start_sim, wait_ready, Sim, SimSpec};
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const HOSTS: usize = 10;
const REQUESTS: usize = 200;

/// A one-member etcd on loopback, killed when dropped.
struct Etcd {
    child: Child,
    port: u16,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_etcd(dir: &std::path::Path) -> Option<Etcd> {
    let found = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("etcd").is_file()));
    if !found {
        eprintln!("no etcd binary on PATH (scripts/install-deps.sh installs Debian's etcd-server)");
        return None;
    }
    let (port, peer_port) = (free_port(), free_port());
    let client = format!("http://127.0.0.1:{port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let log = std::fs::File::create(dir.join("etcd.log")).unwrap();
    let child = Command::new("etcd")
        .args(["--name", "n1", "--data-dir", dir.join("etcd").to_str().unwrap()])
        .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("n1={peer}")])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting etcd");
    let etcd = Etcd { child, port };
    let t0 = Instant::now();
    loop {
        let o = Command::new("curl").args(["-s", "-m", "2", &format!("{client}/health")]).output().unwrap();
        if String::from_utf8_lossy(&o.stdout).contains("true") {
            return Some(etcd);
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "etcd did not become healthy; see {}", dir.join("etcd.log").display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn coordinator(dir: &std::path::Path, name: &str, state: &str) -> Role {
    let data = dir.join(name);
    let args = [
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--state",
        state,
        "--heartbeat-interval",
        "1",
        "--lost-after-beats",
        "30",
        "--leader-ttl",
        "3",
    ];
    Role::start(&args, dir.join(format!("{name}.log")))
}

/// Whether the coordinator at `url` says it leads (`None`: it does not answer).
async fn leads(http: &reqwest::Client, url: &str) -> Option<bool> {
    let r = http.get(format!("{url}/api/v1/health")).timeout(Duration::from_secs(2)).send().await.ok()?;
    r.json::<Value>().await.ok()?["leader"].as_bool()
}

#[test]
fn two_coordinators_take_over_from_a_killed_leader_under_two_hundred_runs() {
    let dir = tempfile::Builder::new().prefix("vgc").tempdir_in("/tmp").unwrap();
    let etcd = start_etcd(dir.path()).expect("etcd is needed: scripts/install-deps.sh installs Debian's etcd-server");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    let (mut first, second, ca) = two_coordinators(&rt, dir.path(), &format!("etcd://127.0.0.1:{}/grid", etcd.port));
    let urls = vec![first.url.clone(), second.url.clone()];
    let both = urls.join(",");

    let server = common::simgrid::tiny_image_server(dir.path(), &both);
    // One login: the token is kept in the shared state, good at both coordinators.
    let token = login_token(&first.url);
    let http = authed(&token, &ca);

    let spec = SimSpec {
        cpus: 4,
        memory_mib: 4096,
        // 1-3 s: some end while the leader is dead, before the other takes over.
        life: |n| Some(Duration::from_millis(1000 + (n * 397 % 2000))),
        launch_time: Duration::from_millis(150),
        ..SimSpec::default()
    };
    let sims = rt.block_on({
        let (http, urls, both) = (http.clone(), urls.clone(), both.clone());
        async move {
            let mut sims = Vec::new();
            for i in 0..HOSTS {
                sims.push(start_sim(format!("sim{i}"), both.clone(), spec.clone()).await);
            }
            for u in &urls {
                wait_ready(&http, u, HOSTS, Duration::from_secs(60)).await;
            }
            sims
        }
    });
    let status: Vec<Option<bool>> = rt.block_on(async { futures::future::join_all(urls.iter().map(|u| leads(&http, u))).await });
    assert_eq!(status, vec![Some(true), Some(false)], "exactly the first coordinator leads");

    // 200 runs at once, alternately to each coordinator.
    let answered = Arc::new(AtomicUsize::new(0));
    let burst = rt.spawn({
        let (http, urls, count) = (http.clone(), urls.clone(), answered.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(300);
            let reqs = (0..REQUESTS).map(|i| {
                let (http, urls, count) = (http.clone(), urls.clone(), count.clone());
                async move {
                    let body = json!({"image": "tiny", "name": format!("b{i}"), "cpus": 1 + i % 2, "memory_mib": 512 + 512 * (i % 3)});
                    let a = create_with_retry(&http, &urls, i % 2, &body, deadline).await;
                    count.fetch_add(1, Ordering::SeqCst);
                    (i, a)
                }
            });
            futures::future::join_all(reqs).await
        }
    });
    // The leader is killed once a quarter of the burst is answered: VMs are then queued,
    // placed, starting (launches in flight) and running, on both coordinators.
    let t0 = Instant::now();
    while answered.load(Ordering::SeqCst) < REQUESTS / 4 {
        assert!(t0.elapsed() < Duration::from_secs(120), "the burst does not progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    let before_kill = answered.load(Ordering::SeqCst);
    first.kill();
    let killed = Instant::now();
    let u1 = second.url.clone();
    rt.block_on(async {
        while leads(&http, &u1).await != Some(true) {
            assert!(killed.elapsed() < Duration::from_secs(120), "the second coordinator never leads");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let takeover = killed.elapsed();
    let answers = rt.block_on(burst).unwrap();
    let all_answered = killed.elapsed();

    let mut ids = HashMap::new();
    let (mut conn, mut resent) = (0, 0);
    for (i, a) in &answers {
        assert!(a.error.is_none(), "request {i} got a non-retryable answer: {:?}", a.error);
        conn += a.connection_errors.min(1);
        resent += a.found_after_resend as usize;
        let id = a.id.clone().unwrap_or_else(|| panic!("request {i} has no VM: {a:?}"));
        assert!(ids.insert(id, *i).is_none(), "two requests got the same VM");
    }

    // Everything ends at the surviving coordinator.
    let log1 = dir.path().join("c1.log");
    check_all_stopped_once(&rt, &http, &u1, &log1, &ids, &sims);
    let drained = killed.elapsed();
    let log = std::fs::read_to_string(&log1).unwrap();
    assert!(log.contains("leading the grid"), "the second coordinator's log does not say it took over:\n{log}");
    let adopted = log.matches("a launch interrupted by a coordinator restart completed").count();
    let sent_again = log.matches("the launch never reached the host before the coordinator restarted").count();
    let requeued = log.matches("queued again after the coordinator restarted").count();
    eprintln!(
        "COORDINATORS-FIGURES\t{REQUESTS} requests over 2 coordinators on {HOSTS} hosts; {before_kill} answered before the leader was killed; \
         the other led {:.1}s after the kill (lease TTL 3 s); {conn} requests saw a connection error and went to the other ({resent} found recorded by 409); \
         all answered {:.1}s after the kill; taken over: {adopted} launches adopted, {sent_again} sent again, {requeued} queued again; \
         all {REQUESTS} stopped, each launched once, {:.1}s after the kill",
        takeover.as_secs_f64(),
        all_answered.as_secs_f64(),
        drained.as_secs_f64()
    );
    drop(rt);
    drop(server);
    drop(second);
    drop(etcd);
}

/// The first coordinator makes the grid's CA and leads; the second gets a copy of the CA
/// (DATA/tls, as docs/etcd.md says) and stands by. Returns both and the CA.
fn two_coordinators(rt: &tokio::runtime::Runtime, dir: &std::path::Path, state: &str) -> (Role, Role, String) {
    let first = coordinator(dir, "c0", state);
    let ca = std::fs::read_to_string(pinned_ca(&first.url)).unwrap();
    let anon = vgrid_trust::tls::client_builder_for(&ca, None).unwrap().build().unwrap();
    rt.block_on(async {
        let t0 = Instant::now();
        while leads(&anon, &first.url).await != Some(true) {
            assert!(t0.elapsed() < Duration::from_secs(60), "the first coordinator never leads");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    std::fs::create_dir_all(dir.join("c1")).unwrap();
    assert!(Command::new("cp").arg("-r").arg(dir.join("c0/tls")).arg(dir.join("c1/")).status().unwrap().success());
    let second = coordinator(dir, "c1", state);
    assert_eq!(std::fs::read_to_string(pinned_ca(&second.url)).unwrap(), ca, "both coordinators serve with the grid's CA");
    (first, second, ca)
}

/// Waits until every VM has ended at the surviving coordinator `url`, then checks: one record
/// per request (`ids`), each `stopped`, each launched exactly once, no simulated host ever over
/// capacity nor running anything now.
fn check_all_stopped_once(
    rt: &tokio::runtime::Runtime,
    http: &reqwest::Client,
    url: &str,
    log: &std::path::Path,
    ids: &HashMap<String, usize>,
    sims: &[common::sim::Sim],
) {
    let vms: Vec<Value> = rt.block_on(async {
        let t0 = Instant::now();
        loop {
            let vms: Value = http.get(format!("{url}/api/v1/vms")).send().await.unwrap().json().await.unwrap();
            let vms = vms.as_array().unwrap().clone();
            let done = vms.iter().filter(|v| matches!(v["state"].as_str(), Some("stopped" | "failed" | "lost"))).count();
            if done >= REQUESTS {
                break vms;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "{done}/{REQUESTS} VMs ended after 300 s; surviving coordinator's log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    assert_eq!(vms.len(), REQUESTS, "one record per request");
    for v in &vms {
        assert!(ids.contains_key(v["id"].as_str().unwrap()), "a VM nobody asked for: {v}");
        assert_eq!(v["state"], "stopped", "VM {} ended {}: {}", v["name"], v["state"], v["reason"]);
    }
    let mut launches: HashMap<String, usize> = HashMap::new();
    for s in sims {
        let st = s.state.lock().unwrap();
        assert!(st.over.is_empty(), "host over capacity: {:?}", st.over);
        assert!(st.running.is_empty(), "{} still runs {:?} after every record ended (orphans)", s.name, st.running.keys());
        for id in &st.launches {
            *launches.entry(id.clone()).or_default() += 1;
        }
    }
    let twice: Vec<_> = launches.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "launched more than once: {twice:?}");
    assert_eq!(launches.len(), REQUESTS, "every VM launched once");
}

/// Two coordinators on one etcd (`c[0]` leads), the tiny image server, and simulated hosts
/// heartbeating to both, ready at both. Dropped in field order: the runtime first, etcd last.
struct Two {
    rt: tokio::runtime::Runtime,
    sims: Vec<Sim>,
    _server: Role,
    c: Vec<Role>,
    /// The coordinators' URLs, and both comma-separated (as `VGRID_URL` takes them).
    urls: Vec<String>,
    both: String,
    http: reqwest::Client,
    _etcd: Etcd,
    dir: tempfile::TempDir,
}

fn two_on_etcd(hosts: &[(&str, SimSpec)]) -> Two {
    let dir = tempfile::Builder::new().prefix("vgc").tempdir_in("/tmp").unwrap();
    let etcd = start_etcd(dir.path()).expect("etcd is needed: scripts/install-deps.sh installs Debian's etcd-server");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (first, second, ca) = two_coordinators(&rt, dir.path(), &format!("etcd://127.0.0.1:{}/grid", etcd.port));
    let urls = vec![first.url.clone(), second.url.clone()];
    let both = urls.join(",");
    let server = common::simgrid::tiny_image_server(dir.path(), &both);
    let http = authed(&login_token(&first.url), &ca);
    let sims = rt.block_on(async {
        let mut sims = Vec::new();
        for (name, spec) in hosts {
            sims.push(start_sim(name.to_string(), both.clone(), spec.clone()).await);
        }
        for u in &urls {
            wait_ready(&http, u, hosts.len(), Duration::from_secs(60)).await;
        }
        sims
    });
    Two { rt, sims, _server: server, c: vec![first, second], urls, both, http, _etcd: etcd, dir }
}

impl Two {
    /// VM `name`'s record at coordinator `at` (`Null`: none, or no answer).
    fn vm(&self, at: usize, name: &str) -> Value {
        let url = format!("{}/api/v1/vms/{name}", self.urls[at]);
        self.rt.block_on(async {
            match self.http.get(url).send().await {
                Ok(r) if r.status().is_success() => r.json().await.unwrap_or(Value::Null),
                _ => Value::Null,
            }
        })
    }

    /// Waits until VM `name` is in `state` (or a phase starting so: `queued`) at coordinator `at`.
    fn wait_state(&self, at: usize, name: &str, state: &str) -> Value {
        let t0 = Instant::now();
        loop {
            let v = self.vm(at, name);
            if v["state"] == state || v["phase"].as_str().is_some_and(|p| p.starts_with(state)) {
                return v;
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "VM {name} is not {state} at {} after 120 s: {v}", self.urls[at]);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// POSTs `body` to `path` at coordinator `at`, expecting success.
    fn post(&self, at: usize, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.urls[at]);
        self.rt.block_on(async {
            let r = self.http.post(&url).json(&body).send().await.unwrap();
            let status = r.status();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            assert!(status.is_success(), "POST {url}: {status} {v}");
            v
        })
    }

    /// How many times VM `id` was launched, over all hosts.
    fn launches(&self, id: &str) -> usize {
        self.sims.iter().map(|s| s.state.lock().unwrap().launches.iter().filter(|l| *l == id).count()).sum()
    }
}

/// A listener on loopback that takes every connection and closes it at once, unanswered (a
/// coordinator that accepts and then fails): its `https://` URL.
fn dropping_listener() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    url
}

/// The CLI given both coordinators (`VGRID_URL=c0,c1`). `vm run` of a VM queued for capacity
/// follows it through c0, the leader; c0 is SIGKILLed: the CLI's long poll moves to c1 and says
/// so, c1 takes over the queue, capacity is freed through c1, and the CLI reports the VM
/// running, launched once. With c0 dead `vm ls` answers; with a listener that drops every
/// connection listed first, `vm ls` and `vm run` move on and answer (the run launched once).
#[test]
fn the_cli_moves_to_the_other_coordinator_when_one_fails() {
    let spec = SimSpec { cpus: 2, memory_mib: 2048, life: |_| None, launch_time: Duration::from_millis(50), ..SimSpec::default() };
    let mut g = two_on_etcd(&[("sim0", spec)]);
    let (c0, c1) = (g.urls[0].clone(), g.urls[1].clone());
    g.post(0, "/api/v1/vms", json!({"image": "tiny", "name": "fill", "cpus": 2, "memory_mib": 512}));
    g.wait_state(0, "fill", "running");

    let run = |url: &str, name: &str| {
        Command::new(vgrid_bin())
            .args(["--json", "vm", "run", "tiny", "--name", name, "--cpus", "1", "--memory", "256"])
            .env("VGRID_URL", url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let waiter = run(&g.both, "waiter");
    g.wait_state(1, "waiter", "queued");
    g.c[0].kill();
    g.post(1, "/api/v1/vms/fill/stop", json!({}));
    let out = waiter.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log1 = g.dir.path().join("c1.log");
    assert!(
        out.status.success(),
        "vm run through {c0},{c1} with {c0} killed failed: {stderr}\nc1: {}",
        std::fs::read_to_string(log1).unwrap()
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "running", "{v}");
    assert!(
        stderr.contains(&format!("coordinator {c0} ")) && stderr.contains(&format!("moving to {c1}")),
        "the CLI did not say it moved: {stderr}"
    );
    assert_eq!(g.launches(v["id"].as_str().unwrap()), 1, "waiter launched once");
    eprintln!("CLI-FAILOVER\tvm run's long poll moved: {}", stderr.lines().find(|l| l.contains("moving to")).unwrap_or_default());

    // c0 dead, listed first: refused at connect, c1 answers.
    let ls = json_at(&g.both, &["vm", "ls"]);
    let names: Vec<&str> = ls.as_array().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
    assert!(names.contains(&"waiter") && names.contains(&"fill"), "{ls}");

    // A coordinator that accepts and drops connections, listed first.
    let list = format!("{},{}", dropping_listener(), g.both);
    let o = cli_at(&list, &["--json", "vm", "ls"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "vm ls through {list}: {stderr}");
    assert!(stderr.contains(&format!("moving to {c0}")) && stderr.contains(&format!("moving to {c1}")), "{stderr}");
    let again = run(&list, "again").wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "vm run through {list}: {stderr}");
    let v: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!((v["state"].as_str(), g.launches(v["id"].as_str().unwrap())), (Some("running"), 1), "{v}");
    let all = g.rt.block_on(async { g.http.get(format!("{c1}/api/v1/vms")).send().await.unwrap().json::<Value>().await.unwrap() });
    assert_eq!(all.as_array().unwrap().len(), 3, "one VM per run: {all}");
    eprintln!(
        "CLI-FAILOVER\tvm ls and vm run through a dropping listener and a dead coordinator: {}",
        stderr.lines().filter(|l| l.contains("moving to")).count()
    );
}

/// The non-leader (c1) is SIGKILLed while it holds work: a VM it placed whose launch takes 3 s
/// (in flight), and two VMs it queued for capacity that only frees later. The leader (c0) sees
/// c1's presence key go with its lease and takes that work over at once (no change of leader):
/// the capacity freed through c0 goes to the queued VMs, the launch is settled, and each VM
/// runs, launched exactly once.
#[test]
fn the_leader_takes_over_the_work_of_a_killed_non_leader() {
    let fast = SimSpec { cpus: 2, memory_mib: 2048, life: |_| None, launch_time: Duration::from_millis(50), ..SimSpec::default() };
    let slow = SimSpec { cpus: 1, launch_time: Duration::from_secs(3), ..fast.clone() };
    let mut g = two_on_etcd(&[("sim0", fast), ("sim1", slow)]);
    g.post(0, "/api/v1/vms", json!({"image": "tiny", "name": "fill", "cpus": 2, "memory_mib": 512}));
    assert_eq!(g.wait_state(0, "fill", "running")["host"], "sim0");
    // Through c1, the non-leader: one launching on sim1 (the only room), two queued.
    let vm = |name: &str| json!({"image": "tiny", "name": name, "cpus": 1, "memory_mib": 256});
    g.post(1, "/api/v1/vms", vm("slow"));
    g.post(1, "/api/v1/vms", vm("q1"));
    g.post(1, "/api/v1/vms", vm("q2"));
    g.wait_state(1, "q2", "queued");
    let slow = g.vm(1, "slow");
    assert!(slow["state"] == "pending" || slow["state"] == "starting", "slow is launching when c1 is killed: {slow}");
    g.c[1].kill();
    let killed = Instant::now();
    g.post(0, "/api/v1/vms/fill/stop", json!({}));
    let mut ids = Vec::new();
    for name in ["slow", "q1", "q2"] {
        let v = g.wait_state(0, name, "running");
        assert_eq!(g.launches(v["id"].as_str().unwrap()), 1, "{name} launched once: {v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let all_running = killed.elapsed();
    let log = std::fs::read_to_string(g.dir.path().join("c0.log")).unwrap();
    assert!(log.contains("coordinator gone (its presence key expired)"), "c0 did not see c1 go:\n{log}");
    assert_eq!(g.vm(0, "q1")["host"], "sim0");
    // Nothing ran twice anywhere, nothing else ran.
    let mut launched: Vec<String> = g.sims.iter().flat_map(|s| s.state.lock().unwrap().launches.clone()).collect();
    launched.sort();
    let fill = g.vm(0, "fill")["id"].as_str().unwrap().to_string();
    let mut want = ids.clone();
    want.push(fill);
    want.sort();
    assert_eq!(launched, want, "each VM launched once");
    eprintln!("NON-LEADER-KILLED\tc1 killed holding 1 launch and 2 queued VMs; all 3 running at c0, each launched once, {:.1}s after the kill (presence TTL 3 s)", all_running.as_secs_f64());
}

/// A drain through c0 holds at once for placements through c1 (the store's drain record: c1
/// follows it, and a placement commits only while the host has none): `vm run` through c1
/// right after `host drain sim0` through c0 lands on sim1 only, and with sim1 full a create
/// through c1 is refused naming the drain. `host undrain` through c0 puts sim0 back for c1.
#[test]
fn a_drain_through_one_coordinator_holds_for_placements_through_the_other() {
    let spec = SimSpec { cpus: 2, memory_mib: 2048, life: |_| None, launch_time: Duration::from_millis(50), ..SimSpec::default() };
    let g = two_on_etcd(&[("sim0", spec.clone()), ("sim1", spec)]);
    let (c0, c1) = (g.urls[0].clone(), g.urls[1].clone());
    let d = json_at(&c0, &["host", "drain", "sim0"]);
    assert_eq!(d["host"], "sim0", "{d}");
    let run = |url: &str, name: &str| json_at(url, &["vm", "run", "tiny", "--name", name, "--cpus", "1", "--memory", "256"]);
    for name in ["d1", "d2"] {
        let v = run(&c1, name);
        assert_eq!((v["state"].as_str(), v["host"].as_str()), (Some("running"), Some("sim1")), "{name} through c1: {v}");
    }
    // sim1 full, sim0 drained: nowhere now.
    let refused = g.rt.block_on(async {
        let body = json!({"image": "tiny", "name": "d3", "cpus": 1, "memory_mib": 256, "no_wait": true});
        let r = g.http.post(format!("{c1}/api/v1/vms")).json(&body).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    assert_eq!(refused.0, 409, "{refused:?}");
    assert!(refused.1.contains("sim0") && refused.1.contains("draining"), "the refusal names the drain: {refused:?}");
    let hosts: Value = g.rt.block_on(async { g.http.get(format!("{c1}/api/v1/hosts")).send().await.unwrap().json().await.unwrap() });
    let sim0 = hosts.as_array().unwrap().iter().find(|h| h["ad"]["name"] == "sim0").cloned().unwrap_or_default();
    assert_eq!(sim0["draining"], true, "c1 shows sim0 draining: {sim0}");

    json_at(&c0, &["host", "undrain", "sim0"]);
    let v = run(&c1, "d4");
    assert_eq!((v["state"].as_str(), v["host"].as_str()), (Some("running"), Some("sim0")), "after undrain through c0: {v}");
}
