//! Scheduler benchmark (run by `bench/scheduler`): simulated host ads in process, a CEL
//! requirement and rank, placements per second, placement latency, memory per 1,000 hosts.
//!
//! `sched_bench [--hosts N] [--placements N] [--rounds N] [--threads N] [--window N]`
//!
//! Each round makes `placements` placements on one warm scheduler. Every placement reserves;
//! the oldest of the last `window` reservations is then confirmed and the host re-advertises
//! (or, one time in four, the placement is released as failed), so capacity keeps cycling; one
//! host heartbeat (a refreshed ad) comes in per 10 placements. Throughput counts all of that
//! work; the latency figures time `place` alone. Memory: resident set before and after loading
//! the ads and a warm-up round, per 1,000 hosts. With `--threads N` > 1, each round is then made
//! by N threads on the one scheduler (`scaling_Nt`) and by N threads with a scheduler each
//! (`separate_scaling_Nt`: what the threads of this process give when they share no scheduler
//! memory). `bench/scheduler` runs it a second time with 100,000 hosts and one thread.

/// The vgrid binary's allocator (src/main.rs), so the figures are the coordinator's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vgrid_api::grid::{HostAd, PlacementRequest};
use vgrid_coordinator::sched::{PlaceError, Scheduler};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const SITES: u64 = 16;
const IMAGES: u64 = 20;

fn host_ad(i: usize, rng: &mut Rng) -> HostAd {
    // Sites are homogeneous-ish, as real ones are: two machine types per site, ARM hosts at a
    // few sites, TCG-only hosts at a few others.
    let site = rng.below(SITES);
    let types = [(8u32, 16384u64), (16, 32768), (32, 65536), (64, 131072), (16, 65536)];
    let (cpus, memory_mib) = types[((site + rng.below(2)) % types.len() as u64) as usize];
    let policy = match rng.below(4) {
        0 => Some("request.cpus <= 8".to_string()),
        1 => Some(r#"request.user in ["alice", "bob", "carol", "dave", "erin"] || request.cpus <= 2"#.to_string()),
        _ => None,
    };
    let mut image_cache = BTreeMap::new();
    for _ in 0..3 {
        image_cache.insert(format!("img{}@1", rng.below(IMAGES)), (rng.below(100) as f64) / 100.0);
    }
    HostAd {
        name: format!("host-{i:05}"),
        url: format!("https://host-{i:05}.site{site}.example:7070"),
        arch: if site.is_multiple_of(5) && rng.below(4) == 0 { "aarch64" } else { "x86_64" }.into(),
        cpus,
        memory_mib,
        free_cpus: cpus,
        free_memory_mib: memory_mib,
        accel: if site % 7 == 3 && rng.below(3) == 0 { "tcg" } else { "kvm" }.into(),
        qemu_version: "8.2.2".into(),
        network_modes: vec!["user".into()],
        labels: BTreeMap::from([("site".to_string(), format!("site{site}")), ("domain".to_string(), format!("site{site}.example"))]),
        policy,
        load_avg: rng.unit() * cpus as f64,
        running_vms: rng.below(4) as u32,
        image_cache,
        ..HostAd::default()
    }
}

const REQUIREMENTS: &[&str] = &[
    r#"host.labels.site in ["site1", "site2", "site3", "site4", "site5", "site6", "site7", "site8"] && host.accel == "kvm" && host.free_memory_mib >= 4096"#,
    r#"host.cpus >= 16 && host.arch == "x86_64""#,
    r#"host.labels.domain.endsWith(".example") && host.free_cpus >= 2 && host.load_avg < 24.0"#,
    r#"host.memory_mib >= 32768 && "user" in host.network_modes"#,
];
const RANKS: &[&str] =
    &["double(host.free_memory_mib) / 1024.0 - host.load_avg", "double(host.free_cpus) - host.load_avg / double(host.cpus)"];
const USERS: &[&str] = &["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"];

fn request(rng: &mut Rng) -> PlacementRequest {
    PlacementRequest {
        user: USERS[rng.below(USERS.len() as u64) as usize].into(),
        image: format!("img{}@1", rng.below(IMAGES)),
        cpus: 1 + rng.below(4) as u32,
        memory_mib: 1024 * (1 + rng.below(4)),
        cpu_share: 0.0,
        require: Some(REQUIREMENTS[rng.below(REQUIREMENTS.len() as u64) as usize].into()),
        rank: if rng.below(2) == 0 { Some(RANKS[rng.below(RANKS.len() as u64) as usize].into()) } else { None },
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok())))
        .unwrap_or(0)
}

/// This thread's CPU time so far (ns, /proc/thread-self/schedstat) and how often it blocked
/// (voluntary context switches: waiting for a lock, or sleeping).
fn thread_cpu() -> (u64, u64) {
    let ns = std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0);
    let switches = std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("voluntary_ctxt_switches:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0);
    (ns, switches)
}

struct Round {
    per_s: f64,
    lat: Vec<Duration>,
    no_match: usize,
    /// CPU seconds this thread used, and its voluntary context switches.
    cpu_s: f64,
    blocked: u64,
}

/// `placements` placements by one thread, cycling capacity as described at the top.
fn run(s: &Scheduler, ads: &[HostAd], placements: usize, window: usize, seed: u64) -> Round {
    let mut rng = Rng(seed | 1);
    let mut lat = Vec::with_capacity(placements);
    let mut outstanding: VecDeque<(String, u64, u32, u64)> = VecDeque::new();
    let mut no_match = 0;
    let cpu0 = thread_cpu();
    let t0 = Instant::now();
    for n in 0..placements {
        let req = request(&mut rng);
        let t = Instant::now();
        let r = s.place(&req);
        lat.push(t.elapsed());
        match r {
            Ok(p) => outstanding.push_back((p.host, p.reservation, req.cpus, req.memory_mib)),
            Err(PlaceError::NoMatch(_)) => no_match += 1,
            Err(e) => panic!("{e}"),
        }
        if outstanding.len() > window {
            let (_host, id, _, _) = outstanding.pop_front().expect("non-empty");
            if rng.below(4) == 0 {
                let _ = s.release(id);
            } else {
                // The VM ran and has since stopped (it is not in the next ad).
                let _ = s.confirm(id);
                let _ = s.release(id);
            }
        }
        if n % 10 == 0 {
            let i = rng.below(ads.len() as u64) as usize;
            let mut ad = ads[i].clone();
            ad.load_avg = rng.unit() * ad.cpus as f64;
            let _ = s.upsert(ad);
        }
    }
    let elapsed = t0.elapsed();
    let cpu1 = thread_cpu();
    for (_, id, _, _) in outstanding {
        let _ = s.release(id);
    }
    let (cpu_s, blocked) = ((cpu1.0 - cpu0.0) as f64 / 1e9, cpu1.1 - cpu0.1);
    Round { per_s: placements as f64 / elapsed.as_secs_f64(), lat, no_match, cpu_s, blocked }
}

/// `threads` threads placing at once, each its share of `placements` on scheduler `t % len`:
/// placements per second, per CPU second, and the threads' voluntary switches.
fn parallel_round(
    scheds: &[Arc<Scheduler>],
    ads: &Arc<[HostAd]>,
    placements: usize,
    window: usize,
    threads: usize,
    round: usize,
) -> (f64, f64, u64) {
    let t0 = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (s, ads) = (scheds[t % scheds.len()].clone(), ads.clone());
            std::thread::spawn(move || {
                let r = run(&s, &ads, placements / threads, window / threads, 1000 + (round * threads + t) as u64);
                (r.lat.len(), r.cpu_s, r.blocked)
            })
        })
        .collect();
    let (mut n, mut cpu_s, mut blocked) = (0usize, 0.0f64, 0u64);
    for h in handles {
        let (tn, tc, tb) = h.join().expect("bench thread");
        n += tn;
        cpu_s += tc;
        blocked += tb;
    }
    let per_cpu = if cpu_s > 0.0 { n as f64 / cpu_s } else { 0.0 };
    (n as f64 / t0.elapsed().as_secs_f64(), per_cpu, blocked)
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `--hosts`, `--placements`, `--rounds`, `--threads`, `--window`.
fn parse_args() -> (usize, usize, usize, usize, usize) {
    let (mut hosts, mut placements, mut rounds, mut threads, mut window) = (10_000usize, 50_000usize, 3usize, 2usize, 2_000usize);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).and_then(|v| v.parse::<usize>().ok());
        match (args[i].as_str(), v) {
            ("--hosts", Some(v)) => hosts = v,
            ("--placements", Some(v)) => placements = v,
            ("--rounds", Some(v)) => rounds = v.max(1),
            ("--threads", Some(v)) => threads = v.max(1),
            ("--window", Some(v)) => window = v,
            _ => {
                eprintln!("usage: sched_bench [--hosts N] [--placements N] [--rounds N] [--threads N] [--window N]");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    (hosts, placements, rounds, threads, window)
}

/// The baseline of the threads' scaling inside this process: one scheduler per thread, each
/// with every host (built here, like the shared one), so the threads share the process
/// (allocator, address space) but no scheduler memory.
fn separate_schedulers(ads: &[HostAd], threads: usize, window: usize) -> Vec<Arc<Scheduler>> {
    (0..threads)
        .map(|t| {
            let own = Arc::new(Scheduler::new());
            for ad in ads.iter() {
                own.upsert(ad.clone()).expect("valid ad");
            }
            run(&own, ads, ads.len().clamp(5_000, 20_000), window, 11 + t as u64);
            own
        })
        .collect()
}

fn main() {
    let (hosts, placements, rounds, threads, window) = parse_args();
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let ads: Arc<[HostAd]> = (0..hosts).map(|i| host_ad(i, &mut rng)).collect();
    let rss0 = rss_kib();
    let s = Arc::new(Scheduler::new());
    for ad in ads.iter() {
        s.upsert(ad.clone()).expect("valid ad");
    }
    let rss_loaded = rss_kib();
    // Warm: the class verdicts of every kind of request cached, the allocator's arenas grown.
    let warm = run(&s, &ads, hosts.clamp(5_000, 20_000), window, 7);
    let rss_warm = rss_kib();
    let mib_per_1000 = (rss_warm.saturating_sub(rss0)) as f64 / 1024.0 / (hosts as f64 / 1000.0);
    let mib_per_1000_loaded = (rss_loaded.saturating_sub(rss0)) as f64 / 1024.0 / (hosts as f64 / 1000.0);
    eprintln!(
        "sched_bench: {hosts} hosts in {} classes; RSS {} MiB before, {} MiB loaded, {} MiB warm; warm-up {:.0}/s",
        s.class_count(),
        rss0 / 1024,
        rss_loaded / 1024,
        rss_warm / 1024,
        warm.per_s
    );

    let separate = if threads > 1 { separate_schedulers(&ads, threads, window) } else { Vec::new() };
    let mut per_s_sep = Vec::new();
    let mut per_s = Vec::new();
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    let mut per_s_mt = Vec::new();
    // Placements per CPU second, one thread and many; voluntary switches of the many.
    let mut per_cpu_s = Vec::new();
    let mut per_cpu_s_mt = Vec::new();
    let mut blocked_mt = 0u64;
    let mut no_match = 0;
    for round in 0..rounds {
        let mut r = run(&s, &ads, placements, window, 100 + round as u64);
        r.lat.sort();
        eprintln!(
            "sched_bench: round {round}: {:.0} placements/s, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms, {} no-match",
            r.per_s,
            quantile(&r.lat, 0.5),
            quantile(&r.lat, 0.99),
            quantile(&r.lat, 1.0),
            r.no_match
        );
        per_s.push(r.per_s);
        if r.cpu_s > 0.0 {
            per_cpu_s.push(placements as f64 / r.cpu_s);
        }
        p50.push(quantile(&r.lat, 0.5));
        p99.push(quantile(&r.lat, 0.99));
        no_match += r.no_match;

        if threads > 1 {
            let (rate, per_cpu, blocked) = parallel_round(std::slice::from_ref(&s), &ads, placements, window, threads, round);
            eprintln!(
                "sched_bench: round {round}: {threads} threads: {rate:.0} placements/s, {per_cpu:.0} per CPU second, {blocked} voluntary switches"
            );
            let (sep, _, _) = parallel_round(&separate, &ads, placements, window, threads, round);
            eprintln!("sched_bench: round {round}: {threads} threads, a scheduler each: {sep:.0} placements/s");
            per_s_sep.push(sep);
            per_s_mt.push(rate);
            if per_cpu > 0.0 {
                per_cpu_s_mt.push(per_cpu);
            }
            blocked_mt += blocked;
        }
    }
    let spread = |v: &[f64]| {
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    };
    let (lo, hi) = spread(&per_s);
    let mt = if per_s_mt.is_empty() { 0.0 } else { median(&mut per_s_mt.clone()) };
    let one = median(&mut per_s.clone());
    let sep = if per_s_sep.is_empty() { 0.0 } else { median(&mut per_s_sep) };
    // How much of a thread's CPU time still places when `threads` place at once: with idle
    // cores, scaling_Nt would be about N times this (less only by time spent blocked).
    let efficiency = if per_cpu_s.is_empty() || per_cpu_s_mt.is_empty() {
        0.0
    } else {
        median(&mut per_cpu_s_mt.clone()) / median(&mut per_cpu_s.clone())
    };
    println!(
        "placements/s median {:.0} (min {:.0}, max {:.0}) over {rounds} rounds of {placements}; p50 {:.3} ms; p99 {:.3} ms; {threads} threads {:.0}/s; no-match {}",
        median(&mut per_s.clone()),
        lo,
        hi,
        median(&mut p50.clone()),
        median(&mut p99.clone()),
        mt,
        no_match
    );
    println!(
        "scheduler: placements_per_s={:.0} p99_ms={:.3} mib_per_1000_hosts={:.2} p50_ms={:.3} placements_per_s_{threads}t={:.0} scaling_{threads}t={:.2} cpu_efficiency_{threads}t={:.2} separate_scaling_{threads}t={:.2} blocked_{threads}t={blocked_mt} mib_per_1000_hosts_loaded={:.2} hosts={hosts} classes={} rounds={rounds} spread={:.0}-{:.0}",
        one,
        median(&mut p99),
        mib_per_1000,
        median(&mut p50),
        mt,
        if one > 0.0 { mt / one } else { 0.0 },
        efficiency,
        if one > 0.0 { sep / one } else { 0.0 },
        mib_per_1000_loaded,
        s.class_count(),
        lo,
        hi
    );
}
