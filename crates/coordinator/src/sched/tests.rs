use super::*;
use std::collections::BTreeMap;

/// A host advertisement for tests (also the lifecycle's).
pub(crate) fn ad(name: &str, site: &str, cpus: u32, mem: u64) -> HostAd {
    HostAd {
        name: name.into(),
        url: format!("http://{name}:7070"),
        arch: "x86_64".into(),
        cpus,
        memory_mib: mem,
        free_cpus: cpus,
        free_memory_mib: mem,
        accel: "kvm".into(),
        qemu_version: "8.2.2".into(),
        network_modes: vec!["user".into()],
        labels: BTreeMap::from([("site".to_string(), site.to_string())]),
        ..HostAd::default()
    }
}

fn req(user: &str, cpus: u32, mem: u64) -> PlacementRequest {
    PlacementRequest { user: user.into(), image: "debian@12".into(), cpus, memory_mib: mem, cpu_share: 0.0, require: None, rank: None }
}

fn no_match(r: Result<Placement, PlaceError>) -> NoMatch {
    match r {
        Err(PlaceError::NoMatch(nm)) => nm,
        other => panic!("expected no match, got {other:?}"),
    }
}

#[test]
fn compile_reports_syntax_errors_with_position() {
    let e = Expr::compile("host.cpus >= 2 && (host.arch == ", ExprKind::Requirement).unwrap_err();
    let ExprError::Syntax { position, .. } = &e else { panic!("not a syntax error: {e}") };
    assert_eq!(position.line, 1);
    assert!(position.column > 18, "column {} should point past the open parenthesis: {e}", position.column);
    assert!(e.to_string().contains("line 1, column"), "{e}");

    // `=` is not a CEL operator: the error points at it.
    let e = Expr::compile("host.cpus >= 2 && host.arch = 'x'", ExprKind::Requirement).unwrap_err();
    let p = e.position().unwrap();
    assert_eq!((p.line, p.column, p.offset), (1, 29, 28), "{e}");
    let e = Expr::compile("host.cpus >= 2 &&\n  host.arch = 'x'", ExprKind::Requirement).unwrap_err();
    let p = e.position().unwrap();
    assert_eq!((p.line, p.column, p.offset), (2, 13, 30), "{e}");
}

#[test]
fn compile_refuses_other_variables_and_unknown_fields() {
    let e = Expr::compile("request.cpus < 4", ExprKind::Requirement).unwrap_err();
    match &e {
        ExprError::UnknownVariable { name, position, allowed, .. } => {
            assert_eq!(name, "request");
            assert_eq!(*allowed, "host");
            assert_eq!((position.line, position.column), (1, 1));
        }
        other => panic!("{other}"),
    }
    let e = Expr::compile("request.user == 'a' && host.cpus > 1", ExprKind::Policy).unwrap_err();
    assert!(matches!(e, ExprError::UnknownVariable { ref name, .. } if name == "host"), "{e}");
    let e = Expr::compile("host.cpu >= 2", ExprKind::Requirement).unwrap_err();
    assert!(matches!(e, ExprError::UnknownField { ref field, .. } if field == "cpu"), "{e}");
    // Comprehension variables are not free variables.
    Expr::compile("host.network_modes.exists(m, m == 'user')", ExprKind::Requirement).unwrap();
}

#[test]
fn compile_refuses_expressions_over_the_cost_limit() {
    let long = format!("host.cpus >= 1{}", " && host.cpus >= 1".repeat(200));
    let e = Expr::compile(&long, ExprKind::Requirement).unwrap_err();
    assert!(matches!(e, ExprError::TooCostly { .. }), "{e}");
    assert!(e.to_string().contains("cost limit"), "{e}");

    let deep = format!("{}host.cpus{} > 1", "(".repeat(100), ")".repeat(100));
    let e = Expr::compile(&deep, ExprKind::Requirement).unwrap_err();
    assert!(matches!(e, ExprError::TooCostly { .. }), "{e}");

    let nodes = format!("host.cpus in [{}]", (0..300).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
    let e = Expr::compile(&nodes, ExprKind::Requirement).unwrap_err();
    assert!(matches!(e, ExprError::TooCostly { .. }), "{e}");

    let nested = "[1,2].all(a, [1,2].all(b, [1,2].all(c, a + b + c > 0)))";
    let e = Expr::compile(nested, ExprKind::Rank).unwrap_err();
    assert!(matches!(e, ExprError::TooCostly { .. }), "{e}");
}

#[test]
fn clauses_are_split_at_top_level_and_classified() {
    let e = Expr::compile(
        r#"host.free_memory_mib >= 2048 && host.labels.site == "u&&f" && (host.cpus > 1 || host.accel == 'kvm')"#,
        ExprKind::Requirement,
    )
    .unwrap();
    let texts: Vec<&str> = e.clauses.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(texts, vec!["host.free_memory_mib >= 2048", r#"host.labels.site == "u&&f""#, "(host.cpus > 1 || host.accel == 'kvm')"]);
    let scopes: Vec<Scope> = e.clauses.iter().map(|c| c.scope).collect();
    assert_eq!(scopes, vec![Scope::Host, Scope::Class, Scope::Class]);
    // Not a top-level conjunction: one clause.
    let e = Expr::compile("host.cpus > 1 && host.cpus < 8 || host.accel == 'tcg'", ExprKind::Requirement).unwrap();
    assert_eq!(e.clauses.len(), 1);
}

#[test]
fn evaluation_errors_are_non_matches_with_a_reason() {
    let s = Scheduler::new();
    s.upsert(ad("h1", "uf", 4, 4096)).unwrap();
    // A label the host does not have, and a type error.
    let mut r = req("alice", 1, 512);
    r.require = Some("host.labels.rack == 'r1'".into());
    let nm = no_match(s.place(&r));
    assert_eq!(nm.refusals.len(), 1);
    assert_eq!(nm.refusals[0].clause, "host.labels.rack == 'r1'");
    assert!(nm.refusals[0].detail.contains("rack"), "{}", nm.refusals[0].detail);
    r.require = Some("host.cpus + 'x' == 1".into());
    let nm = no_match(s.place(&r));
    assert_eq!(nm.refusals[0].host, "h1");
    r.require = Some("host.cpus".into());
    let nm = no_match(s.place(&r));
    assert!(nm.refusals[0].detail.contains("not a bool"), "{}", nm.refusals[0].detail);
    // A rank that is not a number still places (it ranks last).
    r.require = None;
    r.rank = Some("host.arch".into());
    assert_eq!(s.place(&r).unwrap().host, "h1");
}

#[test]
fn invalid_request_expression_is_invalid_not_no_match() {
    let s = Scheduler::new();
    s.upsert(ad("h1", "uf", 4, 4096)).unwrap();
    let mut r = req("alice", 1, 512);
    r.require = Some("host.cpus >=".into());
    match s.place(&r) {
        Err(PlaceError::Invalid(e)) => assert!(e.position().is_some()),
        other => panic!("{other:?}"),
    }
    assert!(s.validate(&r).is_err());
}

#[test]
fn requirement_and_owner_policy_are_both_needed() {
    let s = Scheduler::new();
    let mut a = ad("a", "uf", 4, 8192);
    a.policy = Some(r#"request.user in ["alice"] && request.cpus <= 2"#.into());
    s.upsert(a).unwrap();
    s.upsert(ad("b", "ufl", 4, 8192)).unwrap();

    let mut r = req("alice", 2, 1024);
    r.require = Some(r#"host.labels.site == "uf""#.into());
    let p = s.place(&r).unwrap();
    assert_eq!(p.host, "a");
    s.release(p.reservation).unwrap();

    // The policy refuses bob on a; the requirement refuses b.
    r.user = "bob".into();
    let nm = no_match(s.place(&r));
    let by_host: BTreeMap<&str, &Refusal> = nm.refusals.iter().map(|x| (x.host.as_str(), x)).collect();
    assert_eq!(by_host["a"].clause, r#"owner policy: request.user in ["alice"]"#);
    assert!(by_host["a"].detail.contains(r#"request.user is "bob""#), "{}", by_host["a"].detail);
    assert_eq!(by_host["b"].clause, r#"host.labels.site == "uf""#);
    assert!(!nm.may_change(), "permanent refusals must not wait");

    // alice with 3 cpus: the policy's second clause.
    r.user = "alice".into();
    r.cpus = 3;
    let nm = no_match(s.place(&r));
    assert_eq!(nm.refusals[0].clause, "owner policy: request.cpus <= 2");

    // An invalid owner policy is refused at upsert.
    let mut c = ad("c", "uf", 4, 8192);
    c.policy = Some("request.user ==".into());
    assert!(matches!(s.upsert(c), Err(ExprError::Syntax { kind: ExprKind::Policy, .. })));
    assert_eq!(s.host_count(), 2);
}

#[test]
fn no_match_names_each_host_and_the_failing_clause() {
    let s = Scheduler::new();
    s.upsert(ad("h1", "ufl", 4, 4096)).unwrap();
    s.upsert(ad("h2", "uf", 2, 1024)).unwrap();
    let mut h3 = ad("h3", "uf", 8, 16384);
    h3.free_memory_mib = 1000;
    s.upsert(h3).unwrap();
    s.upsert(ad("h4", "uf", 8, 16384)).unwrap();
    s.set_state("h4", HostState::Lost);

    let mut r = req("alice", 2, 2048);
    r.require = Some(r#"host.cpus >= 2 && host.labels.site == "uf""#.into());
    let nm = no_match(s.place(&r));
    let got: Vec<(&str, &str)> = nm.refusals.iter().map(|x| (x.host.as_str(), x.clause.as_str())).collect();
    assert_eq!(got, vec![("h1", r#"host.labels.site == "uf""#), ("h2", "memory"), ("h3", "free_memory_mib"), ("h4", "state"),]);
    assert_eq!(nm.refusals[0].detail, r#"is false: host.labels.site is "ufl""#);
    assert!(nm.refusals[2].detail.contains("1000 MiB free"), "{}", nm.refusals[2].detail);
    let text = nm.to_string();
    for h in ["h1", "h2", "h3", "h4"] {
        assert!(text.contains(h), "{text}");
    }
    assert!(nm.may_change());

    let opts = PlaceOptions { arch: Some("aarch64".into()) };
    let nm = match s.place_with(&req("alice", 1, 1), &opts) {
        Err(PlaceError::NoMatch(nm)) => nm,
        other => panic!("{other:?}"),
    };
    assert!(nm.refusals.iter().filter(|x| x.host != "h4").all(|x| x.clause == "arch"), "{nm}");
}

#[test]
fn default_rank_prefers_the_image_in_cache_then_lower_load() {
    let s = Scheduler::new();
    // Four hosts: the sample (at least MIN_SAMPLE) covers them all.
    for i in 0..2 {
        let mut a = ad(&format!("h{i}"), "uf", 8, 16384);
        a.load_avg = i as f64;
        s.upsert(a).unwrap();
    }
    let mut cached = ad("warm", "uf", 8, 16384);
    cached.load_avg = 7.0;
    cached.image_cache.insert("debian@12".into(), 0.6);
    s.upsert(cached).unwrap();
    let mut less = ad("lukewarm", "uf", 8, 16384);
    less.load_avg = 1.5;
    less.image_cache.insert("debian@12".into(), 0.2);
    s.upsert(less).unwrap();

    let p = s.place(&req("alice", 1, 512)).unwrap();
    assert_eq!(p.host, "warm");
    s.release(p.reservation).unwrap();

    // Another image: the least loaded host.
    let mut r = req("alice", 1, 512);
    r.image = "alpine@3".into();
    assert_eq!(s.place(&r).unwrap().host, "h0");

    // A user rank overrides it.
    r.rank = Some("host.load_avg".into());
    assert_eq!(s.place(&r).unwrap().host, "warm");
}

#[test]
fn reservations_hold_capacity_until_the_next_ad() {
    let s = Scheduler::new();
    s.upsert(ad("h", "uf", 4, 4096)).unwrap();
    let a = s.place(&req("u", 2, 2048)).unwrap();
    let b = s.place(&req("u", 2, 2048)).unwrap();
    assert_eq!(s.free("h"), Some((0, 0)));
    let nm = no_match(s.place(&req("u", 1, 1)));
    assert_eq!(nm.refusals[0].clause, "free_cpus");

    // Confirmed: still held until the host advertises again.
    s.confirm(a.reservation).unwrap();
    assert_eq!(s.free("h"), Some((0, 0)));
    let mut next = ad("h", "uf", 4, 4096);
    next.free_cpus = 2;
    next.free_memory_mib = 2048;
    next.running_vms = 1;
    s.upsert(next).unwrap();
    // b is still pending: 2 advertised free minus 2 reserved.
    assert_eq!(s.free("h"), Some((0, 0)));
    s.release(b.reservation).unwrap();
    assert_eq!(s.free("h"), Some((2, 2048)));
    assert_eq!(s.release(b.reservation), Err(UnknownReservation(b.reservation)));
    assert!(matches!(s.confirm(a.reservation), Err(UnknownReservation(_))));

    // Expiry of unconfirmed reservations, and removal of a host.
    let c = s.place(&req("u", 1, 1)).unwrap();
    let expired = s.expire(Duration::ZERO);
    assert_eq!(expired.iter().map(|r| r.id).collect::<Vec<_>>(), vec![c.reservation]);
    let d = s.place(&req("u", 1, 1)).unwrap();
    assert!(s.remove("h"));
    assert!(s.release(d.reservation).is_err());
    assert!(no_match(s.place(&req("u", 1, 1))).refusals.is_empty());
}

#[test]
fn dynamic_clauses_see_free_figures_after_reservations() {
    let s = Scheduler::new();
    s.upsert(ad("h", "uf", 4, 4096)).unwrap();
    let mut r = req("u", 1, 1024);
    r.require = Some("host.free_memory_mib >= 3500 && host.labels.site == 'uf'".into());
    let p = s.place(&r).unwrap();
    let nm = no_match(s.place(&r));
    assert_eq!(nm.refusals[0].clause, "host.free_memory_mib >= 3500");
    assert_eq!(nm.refusals[0].detail, "is false: host.free_memory_mib is 3072");
    assert!(nm.refusals[0].transient);
    s.release(p.reservation).unwrap();
    s.place(&r).unwrap();
}

#[test]
fn classes_share_static_attributes() {
    let s = Scheduler::new();
    for i in 0..10 {
        s.upsert(ad(&format!("a{i}"), "uf", 4, 4096)).unwrap();
        s.upsert(ad(&format!("b{i}"), "ufl", 4, 4096)).unwrap();
    }
    assert_eq!(s.class_count(), 2);
    // A host changing its labels moves class; the emptied class goes.
    for i in 0..10 {
        s.upsert(ad(&format!("b{i}"), "uf", 4, 4096)).unwrap();
    }
    assert_eq!(s.class_count(), 1);
    let mut r = req("u", 1, 1);
    r.require = Some("host.labels.site == 'ufl'".into());
    assert_eq!(no_match(s.place(&r)).refusals.len(), 20);
}

#[tokio::test]
async fn queued_request_is_placed_when_capacity_frees_and_no_wait_fails_fast() {
    let s = Arc::new(Scheduler::new());
    s.upsert(ad("h", "uf", 2, 2048)).unwrap();
    let first = s.place(&req("u", 2, 1024)).unwrap();
    // --no-wait
    assert!(matches!(s.place_or_wait(&req("u", 1, 1), &PlaceOptions::default(), None).await, Err(PlaceError::NoMatch(_))));
    // A request no capacity could ever satisfy does not wait either.
    let mut never = req("u", 1, 1);
    never.require = Some("host.labels.site == 'mars'".into());
    assert!(matches!(
        s.place_or_wait(&never, &PlaceOptions::default(), Some(Duration::from_secs(3600))).await,
        Err(PlaceError::NoMatch(_))
    ));
    let waiter = {
        let s = s.clone();
        tokio::spawn(async move { s.place_or_wait(&req("u", 1, 1), &PlaceOptions::default(), Some(Duration::from_secs(3600))).await })
    };
    tokio::task::yield_now().await;
    s.release(first.reservation).unwrap();
    let p = waiter.await.unwrap().unwrap();
    assert_eq!(p.host, "h");

    // Time out when nothing frees.
    let _hold = s.place(&req("u", 1, 1)).unwrap();
    match s.place_or_wait(&req("u", 1, 1), &PlaceOptions::default(), Some(Duration::from_millis(50))).await {
        Err(PlaceError::TimedOut { last, .. }) => assert_eq!(last.refusals[0].clause, "free_cpus"),
        other => panic!("{other:?}"),
    }
}

/// What the placing threads of a test hold per host: a placement is counted after it is made
/// and uncounted before it is released, so the ledger never over-counts.
#[derive(Clone, Default)]
struct Ledger(Arc<Mutex<HashMap<String, (u32, u64)>>>);

impl Ledger {
    /// Counts a placement; fails the test if its host now holds more than 2 cpus or 4096 MiB
    /// (the tests' hosts).
    fn hold(&self, host: &str, cpus: u32, mem: u64) {
        let mut l = self.0.lock().unwrap();
        let e = l.entry(host.to_string()).or_default();
        e.0 += cpus;
        e.1 += mem;
        assert!(e.0 <= 2 && e.1 <= 4096, "{host} over-committed: {e:?} held of (2, 4096)");
    }

    fn unhold(&self, host: &str, cpus: u32, mem: u64) {
        let mut l = self.0.lock().unwrap();
        let e = l.get_mut(host).unwrap();
        e.0 -= cpus;
        e.1 -= mem;
    }
}

/// Placements score hosts without their locks while heartbeats replace the hosts' ads (load,
/// image cache, URL) under them: no host is over-committed, every placement carries a URL its
/// host advertised, and all capacity comes back. (The old ads are freed behind the readers.)
#[test]
fn placements_score_hosts_while_heartbeats_replace_their_ads() {
    const THREADS: usize = 3;
    const PER_THREAD: usize = 5_000;
    let s = Arc::new(Scheduler::new());
    for i in 0..3 {
        s.upsert(ad(&format!("h{i}"), "uf", 2, 4096)).unwrap();
    }
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let beats = {
        let (s, done) = (s.clone(), done.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let i = n % 3;
                let mut a = ad(&format!("h{i}"), "uf", 2, 4096);
                a.url = format!("http://h{i}:7070/beat{n}");
                a.load_avg = (n % 7) as f64;
                a.image_cache = BTreeMap::from([("debian@12".to_string(), (n % 10) as f64 / 10.0)]);
                s.upsert(a).unwrap();
                n += 1;
            }
            n
        })
    };
    let ledger = Ledger::default();
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (s, ledger) = (s.clone(), ledger.clone());
            std::thread::spawn(move || {
                let mut holding = std::collections::VecDeque::new();
                let mut placed = 0;
                for n in 0..PER_THREAD {
                    let mut r = req(&format!("u{t}"), 1, 1024);
                    if n % 2 == 0 {
                        r.require = Some("host.free_cpus >= 1 && host.load_avg < 6.0".into());
                        r.rank = Some("host.image_cache['debian@12'] - host.load_avg".into());
                    }
                    if let Ok(p) = s.place(&r) {
                        placed += 1;
                        assert!(p.url.starts_with(&format!("http://{}:7070", p.host)), "{} got the URL {}", p.host, p.url);
                        ledger.hold(&p.host, 1, 1024);
                        holding.push_back(p);
                    }
                    if holding.len() > 1 {
                        let p = holding.pop_front().unwrap();
                        ledger.unhold(&p.host, 1, 1024);
                        s.release(p.reservation).unwrap();
                    }
                }
                for p in holding {
                    ledger.unhold(&p.host, 1, 1024);
                    s.release(p.reservation).unwrap();
                }
                placed
            })
        })
        .collect();
    let placed: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let beats = beats.join().unwrap();
    assert!(placed > 0 && beats > 0, "placed {placed}, heartbeats {beats}");
    assert!(s.reservations().is_empty());
    for i in 0..3 {
        assert_eq!(s.free(&format!("h{i}")), Some((2, 4096)));
    }
}

/// Reservation ids come from blocks a thread takes at a time: unique across threads and across
/// the schedulers one thread uses by turns; a table's first id is 1.
#[test]
fn reservation_ids_are_unique_across_threads_and_tables() {
    let r = Arc::new(Reservations::default());
    assert_eq!(r.next_id(), 1);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let r = r.clone();
            std::thread::spawn(move || (0..1000).map(|_| r.next_id()).collect::<Vec<_>>())
        })
        .collect();
    let mut ids: Vec<u64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    ids.push(1);
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "an id was handed out twice");
    assert!(ids[0] >= 1);
    // One thread, two tables by turns: each table's ids stay unique.
    let (a, b) = (Reservations::default(), Reservations::default());
    let (mut ia, mut ib) = (Vec::new(), Vec::new());
    for _ in 0..600 {
        ia.push(a.next_id());
        ib.push(b.next_id());
    }
    for v in [&mut ia, &mut ib] {
        let n = v.len();
        v.sort();
        v.dedup();
        assert_eq!(v.len(), n);
    }
}

/// 200 concurrent requests against 10 small hosts: no host ever over capacity, every request
/// answered (placed at once, or queued and placed after releases).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_placements_never_overcommit() {
    let s = Arc::new(Scheduler::new());
    for i in 0..10 {
        let mut a = ad(&format!("h{i}"), if i % 2 == 0 { "uf" } else { "ufl" }, 4, 4096);
        a.policy = Some("request.cpus <= 2".into());
        s.upsert(a).unwrap();
    }
    let capacity: HashMap<String, (u32, u64)> = (0..10).map(|i| (format!("h{i}"), (4, 4096))).collect();
    let capacity = Arc::new(capacity);
    // Every placement records what it holds; checked against capacity at each step.
    let held: Arc<Mutex<HashMap<String, (u32, u64)>>> = Arc::new(Mutex::new(HashMap::new()));
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let (s, held, capacity) = (s.clone(), held.clone(), capacity.clone());
        tasks.push(tokio::spawn(async move {
            let mut r = req(&format!("u{i}"), 1 + i % 2, 512 + 256 * (i % 3) as u64);
            if i % 5 == 0 {
                r.require = Some("host.labels.site == 'uf' && host.free_cpus >= 1".into());
            }
            if i % 7 == 0 {
                r.rank = Some("host.free_memory_mib".into());
            }
            let p = s
                .place_or_wait(&r, &PlaceOptions::default(), Some(Duration::from_secs(600)))
                .await
                .map_err(|e| format!("request {i}: {e}"))?;
            {
                let mut h = held.lock().unwrap();
                let e = h.entry(p.host.clone()).or_default();
                e.0 += r.cpus;
                e.1 += r.memory_mib;
                let cap = capacity[&p.host];
                if e.0 > cap.0 || e.1 > cap.1 {
                    return Err(format!("{} over capacity: {:?} of {:?}", p.host, e, cap));
                }
            }
            tokio::task::yield_now().await;
            {
                let mut h = held.lock().unwrap();
                let e = h.get_mut(&p.host).unwrap();
                e.0 -= r.cpus;
                e.1 -= r.memory_mib;
            }
            // Half stop before the host confirms, half after it confirmed and re-advertised
            // (the simulated host's ad is unchanged: the VM is gone by then).
            if i % 2 == 0 {
                s.release(p.reservation).map_err(|e| e.to_string())?;
            } else {
                s.confirm(p.reservation).map_err(|e| e.to_string())?;
                s.release(p.reservation).map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(p.host)
        }));
    }
    let mut placed = 0;
    for t in tasks {
        t.await.unwrap().unwrap();
        placed += 1;
    }
    assert_eq!(placed, 200);
    assert!(s.reservations().is_empty());
    for i in 0..10 {
        assert_eq!(s.free(&format!("h{i}")), Some((4, 4096)));
    }
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Place { cpus: u32, mem: u64, site: Option<u8> },
        Release(usize),
        Confirm(usize),
        Ad { host: u8, free_cpus: u32, free_mem: u64 },
        Lost(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u32..4, 1u64..3000, proptest::option::of(0u8..3)).prop_map(|(cpus, mem, site)| Op::Place { cpus, mem, site }),
            2 => (0usize..64).prop_map(Op::Release),
            1 => (0usize..64).prop_map(Op::Confirm),
            1 => (0u8..5, 0u32..5, 0u64..4097).prop_map(|(host, free_cpus, free_mem)| Op::Ad { host, free_cpus, free_mem }),
            1 => (0u8..5).prop_map(Op::Lost),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// Whatever the order of ads, placements, confirmations and releases: a placement goes
        /// only to a ready host whose free figures (advertised minus reserved) cover it, and
        /// the free figures never exceed the last ad.
        #[test]
        fn placements_fit_free_capacity(ops in proptest::collection::vec(op(), 1..80)) {
            let s = Scheduler::new();
            let mut last_ad: HashMap<String, (u32, u64)> = HashMap::new();
            for h in 0..5u8 {
                let a = ad(&format!("h{h}"), &format!("s{}", h % 3), 4, 4096);
                last_ad.insert(a.name.clone(), (4, 4096));
                s.upsert(a).unwrap();
            }
            let mut held: Vec<ReservationId> = Vec::new();
            for op in ops {
                match op {
                    Op::Place { cpus, mem, site } => {
                        let before: HashMap<String, (u32, u64)> =
                            last_ad.keys().map(|n| (n.clone(), s.free(n).unwrap())).collect();
                        let mut r = req("u", cpus, mem);
                        r.require = site.map(|x| format!("host.labels.site == 's{x}'"));
                        match s.place(&r) {
                            Ok(p) => {
                                let (c, m) = before[&p.host];
                                prop_assert!(c >= cpus && m >= mem, "{} had {c}/{m}, got {cpus}/{mem}", p.host);
                                prop_assert_eq!(s.state(&p.host), Some(HostState::Ready));
                                if let Some(x) = site {
                                    prop_assert_eq!(p.host.trim_start_matches('h').parse::<u8>().unwrap() % 3, x);
                                }
                                held.push(p.reservation);
                            }
                            Err(PlaceError::NoMatch(nm)) => {
                                prop_assert_eq!(nm.refusals.len(), 5);
                                for rf in &nm.refusals {
                                    prop_assert!(rf.clause != "none", "{rf}");
                                }
                            }
                            Err(e) => prop_assert!(false, "{e}"),
                        }
                    }
                    Op::Release(i) if !held.is_empty() => {
                        let id = held.remove(i % held.len());
                        let _ = s.release(id);
                    }
                    Op::Confirm(i) if !held.is_empty() => {
                        let _ = s.confirm(held[i % held.len()]);
                    }
                    Op::Ad { host, free_cpus, free_mem } => {
                        let mut a = ad(&format!("h{host}"), &format!("s{}", host % 3), 4, 4096);
                        a.free_cpus = free_cpus.min(4);
                        a.free_memory_mib = free_mem;
                        last_ad.insert(a.name.clone(), (a.free_cpus, a.free_memory_mib));
                        s.upsert(a).unwrap();
                    }
                    Op::Lost(h) => {
                        s.set_state(&format!("h{h}"), HostState::Lost);
                    }
                    _ => {}
                }
                for (name, (c, m)) in &last_ad {
                    let (fc, fm) = s.free(name).unwrap();
                    prop_assert!(fc <= *c && fm <= *m);
                }
            }
        }
    }
}

async fn until_waiting(s: &Scheduler, n: usize) {
    for _ in 0..1000 {
        if s.waiting() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("expected {n} waiting requests, have {}", s.waiting());
}

/// Waiting requests are served in arrival order: freed capacity goes to the oldest waiter that
/// fits, a later request that fits in what is left is placed too (backfill), and a new request
/// does not overtake the waiters.
#[tokio::test]
async fn queued_requests_are_served_in_arrival_order_with_backfill() {
    let s = Arc::new(Scheduler::new());
    s.upsert(ad("h", "uf", 4, 4096)).unwrap();
    let hold = s.place(&req("u", 4, 1024)).unwrap();
    let spawn = |name: &'static str, cpus: u32| {
        let s = s.clone();
        tokio::spawn(async move {
            let p = s.place_or_wait(&req(name, cpus, 64), &PlaceOptions::default(), Some(Duration::from_secs(3600))).await;
            (name, p)
        })
    };
    let first = spawn("first", 3);
    until_waiting(&s, 1).await;
    let second = spawn("second", 3);
    until_waiting(&s, 2).await;
    let small = spawn("small", 1);
    until_waiting(&s, 3).await;
    // 4 cpus free: the oldest (3) first, then the small one fits in the last cpu; the second
    // 3-cpu request keeps waiting.
    s.release(hold.reservation).unwrap();
    let (_, p1) = first.await.unwrap();
    let p1 = p1.unwrap();
    let (_, p3) = small.await.unwrap();
    let p3 = p3.unwrap();
    until_waiting(&s, 1).await;
    assert!(!second.is_finished());
    // A newcomer that would fit nowhere else does not overtake the waiting one.
    let newcomer = spawn("newcomer", 3);
    until_waiting(&s, 2).await;
    s.release(p1.reservation).unwrap();
    let (_, p2) = second.await.unwrap();
    p2.unwrap();
    until_waiting(&s, 1).await;
    assert!(!newcomer.is_finished());
    s.release(p3.reservation).unwrap();
    // 1 cpu free is not enough for the newcomer: still waiting, not refused.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!newcomer.is_finished());
    newcomer.abort();
    let _ = newcomer.await;
    until_waiting(&s, 0).await;
}

/// A waiter that goes away (its request cancelled) leaves no reservation behind.
#[tokio::test]
async fn cancelled_waiter_leaves_no_reservation() {
    let s = Arc::new(Scheduler::new());
    s.upsert(ad("h", "uf", 2, 4096)).unwrap();
    let hold = s.place(&req("u", 2, 64)).unwrap();
    let w = {
        let s = s.clone();
        tokio::spawn(async move { s.place_or_wait(&req("w", 2, 64), &PlaceOptions::default(), Some(Duration::from_secs(3600))).await })
    };
    until_waiting(&s, 1).await;
    w.abort();
    let _ = w.await;
    assert_eq!(s.waiting(), 0);
    s.release(hold.reservation).unwrap();
    assert!(s.reservations().is_empty());
}

/// `matches()` (RE2-style regular expressions, linear time) works in requirements and policies;
/// an invalid pattern is a non-match with the reason, not a crash.
#[test]
fn regular_expressions_match_labels_and_users() {
    let s = Scheduler::new();
    let mut a = ad("a", "uf", 4, 8192);
    a.policy = Some(r#"request.user.matches("^(alice|carol)$")"#.into());
    s.upsert(a).unwrap();
    s.upsert(ad("b", "nw", 4, 8192)).unwrap();
    let mut r = req("alice", 1, 64);
    r.require = Some(r#"host.labels.site.matches("^u")"#.into());
    assert_eq!(s.place(&r).unwrap().host, "a");
    r.user = "bob".into();
    let nm = no_match(s.place(&r));
    assert!(nm.refusals.iter().any(|x| x.host == "a" && x.clause.contains("matches")), "{nm:?}");
    r.require = Some(r#"host.labels.site.matches("(")"#.into());
    let nm = no_match(s.place(&r));
    assert!(!nm.refusals.is_empty());
}

#[test]
fn rank_by_predicted_load_and_cpu_share_admission() {
    let s = Scheduler::new();
    let mut busy = ad("busy", "uf", 8, 8192);
    busy.load_now = 0.5;
    busy.load_predicted = 3.5;
    let mut calm = ad("calm", "uf", 8, 8192);
    calm.load_now = 2.0;
    calm.load_predicted = 0.25;
    s.upsert(busy).unwrap();
    s.upsert(calm).unwrap();
    // The rank sees the prediction, not only the current load.
    let mut r = req("u", 1, 256);
    r.rank = Some("-host.load_predicted".into());
    assert_eq!(s.place(&r).unwrap().host, "calm");
    r.rank = Some("-host.load_now".into());
    assert_eq!(s.place(&r).unwrap().host, "busy");
    r.rank = None;
    r.require = Some("host.load_predicted < 1.0".into());
    assert_eq!(s.place(&r).unwrap().host, "calm");

    // An owner's cap of 0.5 cores with 0.3 reserved: 0.2 fits, 0.3 waits, 0.6 never fits.
    let s = Scheduler::new();
    let mut capped = ad("capped", "uf", 8, 8192);
    capped.cpu_cap = 0.5;
    capped.free_cpu_share = 0.2;
    s.upsert(capped).unwrap();
    let mut r = req("u", 1, 256);
    r.cpu_share = 0.2;
    assert_eq!(s.place(&r).unwrap().host, "capped");
    r.cpu_share = 0.3;
    let nm = no_match(s.place(&r));
    assert_eq!(nm.refusals[0].clause, "free_cpu_share");
    assert!(nm.refusals[0].transient && nm.refusals[0].detail.contains("0.300 of 0.500 cores reserved, 0.200 free"), "{nm}");
    r.cpu_share = 0.6;
    let nm = no_match(s.place(&r));
    assert_eq!(nm.refusals[0].clause, "cpu_share");
    assert!(!nm.may_change(), "{nm}");
}

/// Four threads hammer `place` on three small hosts (2 cpus each), each thread holding up to
/// three placements of 1-2 cpus at a time (whether the hosts fill up depends on how the threads
/// interleave; nothing here depends on it):
/// the capacity they hold never exceeds a host's (checked on every placement against a ledger
/// that counts a placement only after it is made and uncounts it before it is released, so it
/// never over-counts), every refusal names each host and a real reason, and at the end every
/// placement was released exactly once and all capacity is back.
#[test]
fn parallel_placements_never_overcommit_and_are_all_accounted_for() {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 20_000;
    let s = Arc::new(Scheduler::new());
    for i in 0..3 {
        s.upsert(ad(&format!("h{i}"), "uf", 2, 4096)).unwrap();
    }
    let ledger = Ledger::default();
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (s, ledger) = (s.clone(), ledger.clone());
            std::thread::spawn(move || {
                let (mut placed, mut refused, mut released) = (0usize, 0usize, 0usize);
                let mut holding: std::collections::VecDeque<(Placement, u32, u64)> = Default::default();
                for n in 0..PER_THREAD {
                    let mut r = req(&format!("u{t}"), 1 + (n % 2) as u32, 512 * (1 + (n % 3) as u64));
                    if n % 4 == 0 {
                        r.require = Some("host.free_cpus >= 1 && host.labels.site == 'uf'".into());
                    }
                    if n % 3 == 0 {
                        r.rank = Some("host.free_memory_mib".into());
                    }
                    match s.place(&r) {
                        Ok(p) => {
                            placed += 1;
                            ledger.hold(&p.host, r.cpus, r.memory_mib);
                            holding.push_back((p, r.cpus, r.memory_mib));
                        }
                        Err(PlaceError::NoMatch(nm)) => {
                            refused += 1;
                            assert_eq!(nm.refusals.len(), 3, "{nm}");
                            for x in &nm.refusals {
                                assert!(["free_cpus", "free_memory_mib", "host.free_cpus >= 1"].contains(&x.clause.as_str()), "{x}");
                            }
                        }
                        Err(e) => panic!("{e}"),
                    }
                    if holding.len() > 2 || (n % 5 == 0 && !holding.is_empty()) {
                        let (p, cpus, mem) = holding.pop_front().unwrap();
                        ledger.unhold(&p.host, cpus, mem);
                        if n % 2 == 0 {
                            s.confirm(p.reservation).unwrap();
                        }
                        s.release(p.reservation).unwrap();
                        released += 1;
                    }
                }
                for (p, cpus, mem) in holding {
                    ledger.unhold(&p.host, cpus, mem);
                    s.release(p.reservation).unwrap();
                    released += 1;
                }
                (placed, refused, released)
            })
        })
        .collect();
    let (mut placed, mut refused, mut released) = (0, 0, 0);
    for w in workers {
        let (p, r, x) = w.join().unwrap();
        placed += p;
        refused += r;
        released += x;
    }
    assert_eq!(placed + refused, THREADS * PER_THREAD);
    assert_eq!(released, placed);
    assert!(placed > 0, "placed {placed}, refused {refused}");
    assert!(s.reservations().is_empty());
    for i in 0..3 {
        assert_eq!(s.free(&format!("h{i}")), Some((2, 4096)));
    }
}
