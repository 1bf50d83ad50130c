//! The write path and admission against the store (memory backend, no hosts, no guests): one
//! VM's concurrent events, and two coordinators sharing one store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use vgrid_api::auth::Quota;
use vgrid_api::config::Accel;
use vgrid_api::grid::HostAd;
use vgrid_api::host::HostHeartbeat;
use vgrid_api::manifest::{Blob, Boot, ImageMeta};
use vgrid_api::vm::{VmCreate, VmState};
use vgrid_api::Manifest;

use super::claims::{self, Held};
use super::table::{self, Event};
use super::{Coordinator, CoordinatorError};
use crate::hosts::Registry;
use crate::state::{decode, open, State, StateConfig};

fn registry() -> Arc<Registry> {
    Arc::new(Registry::new(Duration::from_secs(3600), Duration::from_secs(7200)))
}

async fn coordinator(state: &State) -> Arc<Coordinator> {
    let c = Coordinator::new(state.clone(), registry()).await.unwrap();
    c.recover_interrupted().await.unwrap();
    c
}

pub(super) fn ad(name: &str, cpus: u32, memory_mib: u64) -> HostAd {
    // Nothing listens there: these tests never launch.
    HostAd { url: "http://127.0.0.1:9".into(), ..crate::sched::tests::ad(name, "test", cpus, memory_mib) }
}

pub(super) async fn beat(c: &Coordinator, ad: HostAd) {
    c.heartbeat(HostHeartbeat { ad, vms: Vec::new(), usage: Vec::new(), waiting: Vec::new() }).await.unwrap();
}

fn manifest() -> Manifest {
    Manifest {
        schema: 1,
        name: "sample".into(),
        version: 1,
        created: 0,
        chunk_size: 65536,
        disk: Blob { size: 0, chunks: Vec::new() },
        meta: ImageMeta { os: "test".into(), arch: "x86_64".into(), boot: Boot::Firmware, volume: None },
        parent: None,
        state: None,
    }
}

pub(super) fn create(name: Option<&str>, cpus: u32, host_port: Option<u16>) -> VmCreate {
    let forwards: Vec<serde_json::Value> = host_port.iter().map(|p| serde_json::json!({"host": p, "guest": 80})).collect();
    serde_json::from_value(serde_json::json!({
        "image": "sample@1", "name": name, "cpus": cpus, "memory_mib": 128, "forwards": forwards, "no_wait": true
    }))
    .unwrap()
}

/// Admits a create on `c` (nothing is launched): the record, or the error.
pub(super) async fn admit(c: &Coordinator, req: VmCreate, owner: &str, quota: &Quota) -> Result<vgrid_api::vm::VmRecord, CoordinatorError> {
    let config = req.validate()?;
    Ok(c.admit_new(&req, config, &manifest(), owner, quota).await?.0)
}

/// Checks that the claims in the store are exactly those the records hold.
async fn assert_claims_match_records(state: &State) {
    let (vms, _) = state.vms().list_vms().await.unwrap();
    let records: Vec<_> = vms.into_iter().map(|(v, _)| v).collect();
    let (rows, _) = state.store().range(claims::CLAIMS).await.unwrap();
    let stored: BTreeMap<String, Held> = rows.iter().map(|(k, e)| (k.clone(), decode(k, &e.value).unwrap())).collect();
    assert_eq!(stored, claims::expected(&records));
}

/// Runs `n` admissions of `req(i)` concurrently, alternating between the two coordinators.
async fn race(
    cs: &[Arc<Coordinator>; 2],
    n: usize,
    req: impl Fn(usize) -> VmCreate,
    owner: &str,
    quota: &Quota,
) -> (usize, Vec<CoordinatorError>) {
    let futs = (0..n).map(|i| {
        let c = cs[i % 2].clone();
        let (r, q, o) = (req(i), quota.clone(), owner.to_string());
        tokio::spawn(async move { admit(&c, r, &o, &q).await })
    });
    let mut ok = 0;
    let mut errs = Vec::new();
    for r in futures::future::join_all(futs).await {
        match r.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => errs.push(e),
        }
    }
    (ok, errs)
}

async fn two_on_one_store(hosts: &[(&str, u32)]) -> (State, [Arc<Coordinator>; 2]) {
    let state = open(&StateConfig::Memory).unwrap();
    two_on([state.clone(), state], hosts).await
}

/// Two coordinators, each on its own handle of one store (two connections to one etcd, say),
/// both told of the same hosts.
pub(super) async fn two_on(states: [State; 2], hosts: &[(&str, u32)]) -> (State, [Arc<Coordinator>; 2]) {
    let cs = [coordinator(&states[0]).await, coordinator(&states[1]).await];
    let state = states[0].clone();
    for c in &cs {
        for (h, cpus) in hosts {
            beat(c, ad(h, *cpus, 1 << 20)).await;
        }
    }
    (state, cs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_events_on_one_vm_end_as_one_order_of_them_and_lose_no_write() {
    let state = open(&StateConfig::Memory).unwrap();
    let c = coordinator(&state).await;
    for i in 0..40 {
        let id = format!("vm-{i}");
        let mut rec = crate::state::vms::tests::record(&id, "starting");
        rec.host = Some("h1".into());
        assert!(c.try_commit(None, Some(&rec), None).await.unwrap());
        let stop = Event::StopRequested { force: false };
        let launched = Event::Launched { pid: 42, accel: Accel::Kvm };
        let before = state.store().revision().await.unwrap();
        let (a, b) = tokio::join!(c.apply(&id, stop.clone()), c.apply(&id, launched.clone()));
        a.unwrap();
        b.unwrap();
        let (got, _) = state.vms().get_vm(&id).await.unwrap().unwrap();
        // Either order, evaluated by the table on the record alone.
        let order = |first: &Event, second: &Event| {
            let mut r = rec.clone();
            let n = [first, second].iter().filter(|e| table::advance(&mut r, e, 0).unwrap()).count();
            (r, n)
        };
        let (stop_first, n1) = order(&stop, &launched);
        let (launch_first, n2) = order(&launched, &stop);
        let same = |r: &vgrid_api::vm::VmRecord| r.state == got.state && r.phase == got.phase && r.pid == got.pid;
        assert!(same(&stop_first) || same(&launch_first), "{got:?}");
        assert_eq!(got.state, VmState::Stopping);
        // Every write the winning order makes is in the store: none was lost to the other.
        let writes = state.store().revision().await.unwrap() - before;
        let expected = if same(&launch_first) && got.pid.is_some() { n2 } else { n1 };
        assert_eq!(writes as usize, expected, "{got:?}");
    }
    // An event the table refuses is an error naming the state and the event; nothing changes.
    let e = c.apply("vm-0", Event::SuspendRequested).await.unwrap_err();
    assert!(matches!(e, CoordinatorError::Transition { .. }));
    assert_eq!(e.to_string(), "VM vm-0: a VM that is stopping cannot take event suspend_requested");
    assert!(std::error::Error::source(&e).is_some());
    assert_claims_match_records(&state).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_on_one_store_never_exceed_a_quota() {
    never_exceed_a_quota(two_on_one_store(QUOTA_HOSTS).await).await;
}

pub(super) const QUOTA_HOSTS: &[(&str, u32)] = &[("h1", 64), ("h2", 64)];
pub(super) const ONE_SMALL_HOST: &[(&str, u32)] = &[("h1", 4)];
pub(super) const ONE_BIG_HOST: &[(&str, u32)] = &[("h1", 64)];

pub(super) async fn never_exceed_a_quota((state, cs): (State, [Arc<Coordinator>; 2])) {
    let quota = Quota { vms: Some(3), ..Default::default() };
    let (ok, errs) = race(&cs, 10, |_| create(None, 1, None), "alice", &quota).await;
    assert_eq!(ok, 3, "{errs:?}");
    for e in &errs {
        assert!(matches!(e, CoordinatorError::Quota(m) if m.starts_with("quota exceeded: user alice may have 3 VMs")), "{e}");
    }
    // Another user is not counted against alice.
    assert!(admit(&cs[1], create(None, 1, None), "bob", &quota).await.is_ok());
    assert_claims_match_records(&state).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_on_one_store_never_exceed_a_host() {
    never_exceed_a_host(two_on_one_store(ONE_SMALL_HOST).await).await;
}

pub(super) async fn never_exceed_a_host((state, cs): (State, [Arc<Coordinator>; 2])) {
    let (ok, errs) = race(&cs, 10, |_| create(None, 1, None), "alice", &Quota::default()).await;
    assert_eq!(ok, 4, "{errs:?}");
    for e in &errs {
        assert!(matches!(e, CoordinatorError::Capacity(_)), "{e}");
    }
    let (rows, _) = state.store().range(&claims::host_prefix("h1")).await.unwrap();
    assert_eq!(claims::totals(&rows, "").cpus, 4);
    assert_claims_match_records(&state).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_on_one_store_never_share_a_name_or_a_host_port() {
    never_share_a_name_or_a_host_port(two_on_one_store(ONE_BIG_HOST).await).await;
}

pub(super) async fn never_share_a_name_or_a_host_port((state, cs): (State, [Arc<Coordinator>; 2])) {
    let (ok, errs) = race(&cs, 6, |_| create(Some("web"), 1, None), "alice", &Quota::default()).await;
    assert_eq!(ok, 1, "{errs:?}");
    for e in &errs {
        assert_eq!(e.to_string(), "a VM named \"web\" exists already");
        assert!(matches!(e, CoordinatorError::Conflict(_)));
    }
    let (ok, errs) = race(&cs, 6, |i| create(Some(&format!("p{i}")), 1, Some(8080)), "alice", &Quota::default()).await;
    assert_eq!(ok, 1, "{errs:?}");
    for e in &errs {
        assert_eq!(e.to_string(), "host port 8080 is already forwarded to another VM");
    }
    assert_claims_match_records(&state).await;
    // Removed, the name and the port are free again.
    let web = cs[0].get("web").await.unwrap();
    cs[1].delete_record(&web.id).await.unwrap();
    assert!(admit(&cs[0], create(Some("web"), 1, None), "alice", &Quota::default()).await.is_ok());
    assert_claims_match_records(&state).await;
}

#[tokio::test]
async fn claims_of_records_written_before_claims_are_built_at_open() {
    let state = open(&StateConfig::Memory).unwrap();
    let mut rec = crate::state::vms::tests::record("vm-1", "running");
    rec.host = Some("h1".into());
    state.vms().put_vm(&rec).await.unwrap();
    state.vms().put_vm(&crate::state::vms::tests::record("vm-2", "stopped")).await.unwrap();
    state.store().put("claims/name/gone", b"{\"vm\":\"vm-0\"}".to_vec()).await.unwrap();
    let _c = coordinator(&state).await;
    assert_claims_match_records(&state).await;
    let rev = state.store().revision().await.unwrap();
    // Opening again changes nothing.
    let _d = coordinator(&state).await;
    assert_eq!(state.store().revision().await.unwrap(), rev);
}

#[tokio::test]
async fn image_servers_are_known_right_after_a_restart() {
    use vgrid_api::grid::ImageServerAd;
    let state = open(&StateConfig::Memory).unwrap();
    let c = coordinator(&state).await;
    let ad = ImageServerAd { name: "is0".into(), url: "https://127.0.0.1:9".into(), images: vec![] };
    c.image_server_beat(ad.clone()).await.unwrap();
    drop(c);
    // A new coordinator on the same store (a restart), before any heartbeat of the server.
    let c = coordinator(&state).await;
    assert_eq!(c.registry().image_server_urls(), vec![ad.url.clone()]);
    // With none registered at all, images cannot resolve yet: retryable, not a failure.
    let empty = open(&StateConfig::Memory).unwrap();
    let c = coordinator(&empty).await;
    let e = c.resolve_image(&"sample@1".parse().unwrap()).await.unwrap_err();
    assert!(matches!(e, CoordinatorError::NoImageServer), "{e}");
}

fn on_net(nics: &[&str]) -> VmCreate {
    let nics: Vec<serde_json::Value> = nics
        .iter()
        .map(|n| {
            let (mode, net) = n.split_once(':').unwrap_or((n, ""));
            if net.is_empty() {
                serde_json::json!({"mode": mode})
            } else {
                serde_json::json!({"mode": mode, "network": net})
            }
        })
        .collect();
    serde_json::from_value(serde_json::json!({"image": "sample@1", "cpus": 1, "memory_mib": 128, "nics": nics, "no_wait": true})).unwrap()
}

fn site_net(name: &str, cidr: &str, range: &str) -> vgrid_api::net::NetworkCreate {
    serde_json::from_value(serde_json::json!({"name": name, "kind": "site", "cidr": cidr, "range": range})).unwrap()
}

const ADMIN: crate::networks::Asker<'static> = crate::networks::Asker { user: "root", admin: true };

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_never_lease_one_address_twice_and_rm_frees_it() {
    let state = open(&StateConfig::Memory).unwrap();
    let cs = [coordinator(&state).await, coordinator(&state).await];
    for c in &cs {
        beat(c, HostAd { networks: vec!["farm".into()], ..ad("h1", 64, 1 << 20) }).await;
        beat(c, ad("h2", 64, 1 << 20)).await;
    }
    cs[0].create_network(site_net("farm", "10.20.0.0/24", "10.20.0.100-10.20.0.104"), ADMIN).await.unwrap();
    let (ok, errs) = race(&cs, 8, |_| on_net(&["site:farm"]), "alice", &Quota::default()).await;
    assert_eq!(ok, 5, "{errs:?}");
    for e in &errs {
        assert!(matches!(e, CoordinatorError::Capacity(m) if m.contains("network \"farm\" has no free address")), "{e}");
    }
    let (vms, _) = state.vms().list_vms().await.unwrap();
    let mut addrs: Vec<String> = vms.iter().filter_map(|(v, _)| v.config.net.nics[0].address()).map(|a| a.to_string()).collect();
    addrs.sort();
    assert_eq!(addrs, ["10.20.0.100", "10.20.0.101", "10.20.0.102", "10.20.0.103", "10.20.0.104"]);
    // Every one placed on the host attached to the network, with the MAC its address gives.
    for (v, _) in &vms {
        assert_eq!(v.host.as_deref(), Some("h1"), "{v:?}");
        let nic = &v.config.net.nics[0];
        assert_eq!(nic.mac(), Some(vgrid_api::net::MacAddr::for_site("farm", nic.address().unwrap())));
    }
    assert_claims_match_records(&state).await;
    let info = cs[1].network_info("farm", ADMIN).await.unwrap();
    assert_eq!((info.leases.len(), info.free, info.hosts.clone()), (5, 0, vec!["h1".to_string()]));
    // A network in use is not removed; the error names its VMs.
    let e = cs[0].delete_network("farm", ADMIN).await.unwrap_err().to_string();
    assert!(e.contains("in use by 5 VM(s)"), "{e}");
    // The record's removal frees its address for the next VM.
    let (gone, rev) = state.vms().get_vm(&vms[0].0.id).await.unwrap().unwrap();
    assert!(cs[0].try_commit(Some((&gone, rev)), None, None).await.unwrap());
    let next = admit(&cs[1], on_net(&["site:farm"]), "bob", &Quota::default()).await.unwrap();
    assert_eq!(next.config.net.nics[0].address(), gone.config.net.nics[0].address());
    assert_claims_match_records(&state).await;
}

#[tokio::test]
async fn networks_refuse_what_they_cannot_give_with_reasons() {
    let state = open(&StateConfig::Memory).unwrap();
    let c = coordinator(&state).await;
    beat(&c, ad("h2", 64, 1 << 20)).await;
    let alice = crate::networks::Asker { user: "alice", admin: false };
    // Site networks are an admin's; they may not overlap.
    let e = c.create_network(site_net("farm", "10.20.0.0/24", "10.20.0.100-10.20.0.199"), alice).await.unwrap_err();
    assert!(matches!(e, CoordinatorError::Forbidden(_)), "{e}");
    c.create_network(site_net("farm", "10.20.0.0/24", "10.20.0.100-10.20.0.199"), ADMIN).await.unwrap();
    let e = c.create_network(site_net("farm2", "10.20.0.0/16", "10.20.1.100-10.20.1.199"), ADMIN).await.unwrap_err().to_string();
    assert!(e.contains("overlaps site network \"farm\""), "{e}");
    let e = c.create_network(site_net("farm", "10.30.0.0/24", "10.30.0.2-10.30.0.9"), ADMIN).await.unwrap_err().to_string();
    assert!(e.contains("exists already"), "{e}");
    // No host is attached to farm: the placement refusal names the clause.
    let e = admit(&c, on_net(&["site:farm"]), "alice", &Quota::default()).await.unwrap_err().to_string();
    assert!(e.contains("\"farm\" in host.networks"), "{e}");
    // `vgrid futures --net site:farm` says the same of each host.
    let q: vgrid_api::grid::FuturesQuery =
        serde_json::from_value(serde_json::json!({"nics": [{"mode": "site", "network": "farm"}]})).unwrap();
    let f = c.futures(&q, "alice").await.unwrap();
    assert!(
        !f.is_empty() && f.iter().all(|f| !f.could_start && f.why_not.as_deref().unwrap_or("").contains("\"farm\" in host.networks")),
        "{f:?}"
    );
    // Unknown networks, the wrong mode, another user's tunnel.
    let e = admit(&c, on_net(&["site:nope"]), "alice", &Quota::default()).await.unwrap_err();
    assert!(matches!(&e, CoordinatorError::UnknownNetwork(n) if n == "nope"), "{e}");
    let e = admit(&c, on_net(&["tunnel:farm"]), "alice", &Quota::default()).await.unwrap_err().to_string();
    assert!(e.contains("is a site network"), "{e}");
    let tunnel = serde_json::from_value(serde_json::json!({"name": "home", "kind": "tunnel"})).unwrap();
    c.create_network(tunnel, alice).await.unwrap();
    let bob = crate::networks::Asker { user: "bob", admin: false };
    let e = admit(&c, on_net(&["tunnel:home"]), "bob", &Quota::default()).await.unwrap_err();
    assert!(matches!(&e, CoordinatorError::UnknownNetwork(n) if n == "home"), "{e}");
    assert!(c.list_networks(bob).await.unwrap().iter().all(|n| n.network.name != "home"));
    assert!(matches!(c.network_info("home", bob).await.unwrap_err(), CoordinatorError::UnknownNetwork(_)));
    assert_eq!(c.list_networks(alice).await.unwrap().len(), 2);
    // Nothing was leased by the refusals.
    assert!(c.leases("farm").await.unwrap().is_empty());
    assert_claims_match_records(&state).await;
}

/// Two coordinators on one store following an election: while neither leads, a host that
/// goes silent is lost in both schedulers but its VM's record is left alone; the one that
/// becomes leader marks it `unknown` (the records of hosts lost while it did not lead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_settles_a_lost_hosts_vms_and_a_new_leader_catches_up() {
    let state = open(&StateConfig::Memory).unwrap();
    let quick = || Arc::new(Registry::new(Duration::from_millis(100), Duration::from_millis(300)));
    let (a, b) = (Coordinator::new(state.clone(), quick()).await.unwrap(), Coordinator::new(state.clone(), quick()).await.unwrap());
    let (_ta, ra) = tokio::sync::watch::channel(false);
    let (tb, rb) = tokio::sync::watch::channel(false);
    a.lead_with(ra);
    b.lead_with(rb);
    assert!(!a.is_leader() && !b.is_leader());
    for c in [&a, &b] {
        beat(c, ad("h1", 4, 1 << 20)).await;
    }
    let rec = admit(&a, create(Some("v"), 1, None), "alice", &Quota::default()).await.unwrap();
    assert_eq!(rec.host.as_deref(), Some("h1"));
    a.apply(&rec.id, Event::LaunchSent).await.unwrap();
    a.apply(&rec.id, Event::Launched { pid: 7, accel: Accel::Tcg }).await.unwrap();
    // h1 stops beating: both registries lose it; no one leads, the record stays `running`.
    let lost = |c: &Arc<Coordinator>| c.registry.host("h1").is_some_and(|h| h.state == vgrid_api::grid::HostState::Lost);
    tokio::time::timeout(Duration::from_secs(30), async {
        while !(lost(&a) && lost(&b)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("h1 lost in both registries");
    // A full sweep round after both saw it lost.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(a.get(&rec.id).await.unwrap().state, VmState::Running, "a coordinator that does not lead changed the record");
    // b leads: it takes over and settles the lost host's VM.
    tb.send_replace(true);
    tokio::time::timeout(Duration::from_secs(30), async {
        while a.get(&rec.id).await.unwrap().state != VmState::Unknown {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the new leader marks the lost host's VM unknown");
    assert!(b.is_leader() && !a.is_leader());
}

/// A name vgrid makes (the image's and 6 hex digits of the id: 24 bits, so among thousands of
/// VMs two meet now and then) that another VM holds already becomes the image's and the whole
/// id, not a refusal of a create that named nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_name_taken_already_becomes_the_whole_id() {
    let (state, cs) = two_on_one_store(ONE_BIG_HOST).await;
    let rid = "cli-0123456789abcdef";
    let id = super::admit::request_vm_id("alice", rid);
    let short = format!("sample-{}", &id[3..9]);
    let holder = admit(&cs[0], create(Some(&short), 1, None), "bob", &Quota::default()).await.unwrap();
    let made = admit(&cs[1], VmCreate { request_id: Some(rid.into()), ..create(None, 1, None) }, "alice", &Quota::default()).await.unwrap();
    assert_eq!((made.id.as_str(), made.name.as_str()), (id.as_str(), format!("sample-{}", &id[3..]).as_str()));
    assert_eq!(holder.name, short);
    // A name the request asked for is still refused when taken.
    let e = admit(&cs[0], create(Some(&short), 1, None), "alice", &Quota::default()).await.unwrap_err();
    assert_eq!(e.to_string(), format!("a VM named {short:?} exists already"));
    assert_eq!(state.vms().list_vms().await.unwrap().0.len(), 2);
    assert_claims_match_records(&state).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_sent_again_with_its_request_id_finds_the_vm_it_made() {
    let (state, cs) = two_on_one_store(ONE_BIG_HOST).await;
    let with_id = |name: Option<&str>| VmCreate { request_id: Some("cli-0123456789abcdef".into()), ..create(name, 1, None) };
    // Nothing made yet: nothing found.
    assert!(cs[0].created_by_request(&with_id(None), "alice").await.unwrap().is_none());
    let first = admit(&cs[0], with_id(None), "alice", &Quota::default()).await.unwrap();
    assert_eq!(first.id, super::admit::request_vm_id("alice", "cli-0123456789abcdef"));
    // The same request sent to the other coordinator: found there, not made again.
    let found = cs[1].created_by_request(&with_id(None), "alice").await.unwrap().expect("the VM the first send made");
    assert_eq!((found.id.as_str(), found.name.as_str()), (first.id.as_str(), first.name.as_str()));
    // Admitted again anyway (two sends at once), it is refused: its record exists.
    assert!(admit(&cs[1], with_id(None), "alice", &Quota::default()).await.is_err());
    // Another user's request with the same id is another request.
    assert!(cs[1].created_by_request(&with_id(None), "bob").await.unwrap().is_none());
    let bobs = admit(&cs[1], with_id(Some("bobs")), "bob", &Quota::default()).await.unwrap();
    assert_ne!(bobs.id, first.id);
    assert_eq!(state.vms().list_vms().await.unwrap().0.len(), 2, "one VM per request");
    assert_claims_match_records(&state).await;
    // A malformed request id is refused, naming it.
    let bad = VmCreate { request_id: Some("x y".into()), ..create(None, 1, None) };
    assert_eq!(bad.validate().unwrap_err().to_string(), "invalid request_id \"x y\": use 8-64 characters of A-Z a-z 0-9 _ -");
}
