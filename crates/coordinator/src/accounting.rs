//! Accounting: per-VM and per-user resource use, from the counters hosts report with their
//! heartbeats, kept in the state store so that it survives restarts of hosts and coordinator.
//!
//! A host reports *cumulative* counters per VM with a `generation` (when the VM's cgroup, and
//! so its counters, started). For a report of the generation already seen the coordinator adds
//! the difference to the last report (never negative: a counter that goes back adds nothing);
//! for a newer generation it adds the whole counters; reports of an older generation are
//! ignored. Re-sending a report, or an agent that restarts and reports the same counters again,
//! therefore never counts twice. Each addition is also kept in a one-minute bucket so that
//! `GET /api/v1/usage?since=T` can sum a period.

use serde::{Deserialize, Serialize};
use vgrid_api::usage::{UsageReport, UsageTotals, UserUsage, VmUsage, VmUsageReport};
use vgrid_api::vm::VmRecord;

use crate::state::{StateError, UsageStore, UsageTable};

/// Bucket length, seconds.
pub const BUCKET_SECS: u64 = 60;

/// The user a VM is billed to: its owner.
pub fn user_of(rec: &VmRecord) -> String {
    rec.owner.clone()
}

/// Counters of the last report of the current generation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Seen {
    cpu_ns: u64,
    memory_mib_s: f64,
    disk_read_bytes: u64,
    disk_write_bytes: u64,
    fetched_bytes: u64,
}

/// What is stored per VM.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct VmAcct {
    #[serde(flatten)]
    info: VmUsage,
    generation: u64,
    seen: Seen,
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Adds report `r` to `a`; returns what it added.
fn apply(a: &mut VmAcct, r: &VmUsageReport) -> UsageTotals {
    let mut d = UsageTotals::default();
    let cur = Seen {
        cpu_ns: r.cpu_ns,
        memory_mib_s: r.memory_mib_s,
        disk_read_bytes: r.disk_read_bytes,
        disk_write_bytes: r.disk_write_bytes,
        fetched_bytes: r.fetched_bytes,
    };
    if r.generation < a.generation {
        return d;
    }
    let base = if r.generation == a.generation { a.seen.clone() } else { Seen::default() };
    d.cpu_ns = cur.cpu_ns.saturating_sub(base.cpu_ns);
    d.memory_mib_seconds = (cur.memory_mib_s - base.memory_mib_s).max(0.0);
    d.disk_read_bytes = cur.disk_read_bytes.saturating_sub(base.disk_read_bytes);
    d.disk_write_bytes = cur.disk_write_bytes.saturating_sub(base.disk_write_bytes);
    d.fetched_bytes = cur.fetched_bytes.saturating_sub(base.fetched_bytes);
    d.cpu_seconds = d.cpu_ns as f64 / 1e9;
    a.seen = Seen {
        cpu_ns: base.cpu_ns.max(cur.cpu_ns),
        memory_mib_s: base.memory_mib_s.max(cur.memory_mib_s),
        disk_read_bytes: base.disk_read_bytes.max(cur.disk_read_bytes),
        disk_write_bytes: base.disk_write_bytes.max(cur.disk_write_bytes),
        fetched_bytes: base.fetched_bytes.max(cur.fetched_bytes),
    };
    a.generation = r.generation;
    let stored = a.info.usage.stored_bytes;
    a.info.usage.stored_bytes = 0;
    a.info.usage.add(&d);
    a.info.usage.stored_bytes = if r.stored_bytes > 0 || r.finished { r.stored_bytes } else { stored };
    a.info.memory_limit_bytes = r.memory_limit_bytes;
    a.info.memory_peak_bytes = a.info.memory_peak_bytes.max(r.memory_peak_bytes);
    a.info.memory_limit_hits = a.info.memory_limit_hits.max(r.memory_limit_hits);
    a.info.oom_kills = a.info.oom_kills.max(r.oom_kills);
    a.info.ram_remote_bytes = if r.finished { None } else { r.ram_remote_bytes };
    d
}

fn is_zero(d: &UsageTotals) -> bool {
    d.cpu_ns == 0 && d.memory_mib_seconds == 0.0 && d.disk_read_bytes == 0 && d.disk_write_bytes == 0 && d.fetched_bytes == 0
}

pub struct Accounting {
    usage: UsageStore,
    /// Orders this process's read-modify-writes of the rows (a heartbeat's reports).
    lock: tokio::sync::Mutex<()>,
}

impl Accounting {
    pub fn new(usage: UsageStore) -> Accounting {
        Accounting { usage, lock: Default::default() }
    }

    /// The row `key` of `table`, decoded (`None` when absent or unreadable).
    async fn row<T: serde::de::DeserializeOwned>(&self, table: UsageTable, key: &str) -> Result<Option<T>, StateError> {
        Ok(self
            .usage
            .scan_usage(table, key)
            .await?
            .into_iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, e)| serde_json::from_slice(&e.value).ok()))
    }

    /// The accounting record of VM `id` (its last report's gauges among them).
    pub async fn vm(&self, id: &str) -> Option<VmUsage> {
        self.row::<VmAcct>(UsageTable::Vms, id).await.ok().flatten().map(|a| a.info)
    }

    /// Records the reports of `host`'s heartbeat. `record` finds the VM's record (for its name
    /// and user); reports of VMs the coordinator does not know are still accounted.
    pub async fn record(&self, host: &str, reports: &[VmUsageReport], record: impl Fn(&str) -> Option<VmRecord>) -> Result<(), StateError> {
        if reports.is_empty() {
            return Ok(());
        }
        let _g = self.lock.lock().await;
        let t = now();
        let bucket = t - t % BUCKET_SECS;
        let mut rows = Vec::new();
        for r in reports {
            let mut a = match self.row::<VmAcct>(UsageTable::Vms, &r.id).await? {
                Some(a) => a,
                None => {
                    let mut a = VmAcct::default();
                    a.info.vm = r.id.clone();
                    a.info.first = t;
                    a
                }
            };
            if r.generation < a.generation {
                // A late report of an earlier run of this VM: already superseded.
                continue;
            }
            if let Some(rec) = record(&r.id) {
                a.info.name = rec.name.clone();
                a.info.image = rec.config.image().to_string();
                a.info.user = user_of(&rec);
            }
            if a.info.user.is_empty() {
                a.info.user = "anonymous".into();
            }
            a.info.host = host.to_string();
            let d = apply(&mut a, r);
            a.info.last = t;
            if !is_zero(&d) {
                let key = format!("{}/{:020}", r.id, bucket);
                let mut b: UsageTotals = self.row(UsageTable::Buckets, &key).await?.unwrap_or_default();
                b.add(&d);
                rows.push((UsageTable::Buckets, key, serde_json::to_vec(&b).unwrap_or_default()));
            }
            rows.push((UsageTable::Vms, r.id.clone(), serde_json::to_vec(&a).unwrap_or_default()));
        }
        self.usage.put_usage(rows).await.map(|_| ())
    }

    /// Use per VM and per user since `since` (seconds since the epoch; the minute holding it
    /// counts whole; 0: everything), optionally of one user only.
    pub async fn report(&self, user: Option<&str>, since: u64) -> Result<UsageReport, StateError> {
        let mut vms = Vec::new();
        for (_, v) in self.usage.scan_usage(UsageTable::Vms, "").await? {
            let Ok(a) = serde_json::from_slice::<VmAcct>(&v.value) else { continue };
            if user.is_some_and(|u| u != a.info.user) {
                continue;
            }
            let mut info = a.info.clone();
            if since > 0 {
                if info.last < since - since % BUCKET_SECS {
                    continue;
                }
                let stored = info.usage.stored_bytes;
                let mut sum = UsageTotals::default();
                for (k, b) in self.usage.scan_usage(UsageTable::Buckets, &format!("{}/", a.info.vm)).await? {
                    let start: u64 = k.rsplit('/').next().and_then(|s| s.parse().ok()).unwrap_or(0);
                    if start + BUCKET_SECS > since {
                        if let Ok(b) = serde_json::from_slice::<UsageTotals>(&b.value) {
                            sum.add(&b);
                        }
                    }
                }
                sum.stored_bytes = stored;
                info.usage = sum;
            }
            vms.push(info);
        }
        vms.sort_by(|a, b| a.user.cmp(&b.user).then(a.first.cmp(&b.first)).then(a.vm.cmp(&b.vm)));
        let mut users: Vec<UserUsage> = Vec::new();
        for v in &vms {
            match users.iter_mut().find(|u| u.user == v.user) {
                Some(u) => {
                    u.vms += 1;
                    u.usage.add(&v.usage);
                }
                None => users.push(UserUsage { user: v.user.clone(), vms: 1, usage: v.usage.clone() }),
            }
        }
        Ok(UsageReport { since, users, vms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{open, StateConfig};

    fn rep(id: &str, generation: u64, cpu_ns: u64, mem: f64) -> VmUsageReport {
        VmUsageReport {
            id: id.into(),
            generation,
            cpu_ns,
            memory_mib_s: mem,
            disk_read_bytes: cpu_ns / 10,
            fetched_bytes: 100,
            stored_bytes: 4096,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn deltas_generations_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let state = open(&StateConfig::Redb(path.clone())).unwrap().usage();
            let acc = Accounting::new(state);
            let none = |_: &str| None;
            acc.record("h1", &[rep("vm-a", 10, 1_000_000_000, 50.0)], none).await.unwrap();
            // The same report again (a retried heartbeat, or a restarted agent re-adopting the
            // VM with the same counters): nothing more.
            acc.record("h1", &[rep("vm-a", 10, 1_000_000_000, 50.0)], none).await.unwrap();
            acc.record("h1", &[rep("vm-a", 10, 3_000_000_000, 80.0)], none).await.unwrap();
            // A counter that went back within a generation adds nothing.
            acc.record("h1", &[rep("vm-a", 10, 2_000_000_000, 80.0)], none).await.unwrap();
            let r = acc.report(None, 0).await.unwrap();
            assert_eq!(r.vms[0].usage.cpu_ns, 3_000_000_000);
            assert_eq!(r.vms[0].usage.memory_mib_seconds, 80.0);
            assert_eq!(r.vms[0].usage.fetched_bytes, 100);
        }
        // The coordinator restarts: totals are still there; a new generation (the VM started
        // again, counters from zero) adds its whole counters; an old generation is ignored.
        let state = open(&StateConfig::Redb(path.clone())).unwrap().usage();
        let acc = Accounting::new(state);
        let none = |_: &str| None;
        acc.record("h2", &[rep("vm-a", 20, 500_000_000, 5.0)], none).await.unwrap();
        acc.record("h1", &[rep("vm-a", 10, 9_000_000_000, 500.0)], none).await.unwrap();
        acc.record("h2", &[rep("vm-b", 1, 7, 1.0)], none).await.unwrap();
        let r = acc.report(None, 0).await.unwrap();
        let a = r.vms.iter().find(|v| v.vm == "vm-a").unwrap();
        assert_eq!(a.usage.cpu_ns, 3_500_000_000);
        assert_eq!(a.usage.cpu_seconds, 3.5);
        assert_eq!(a.usage.memory_mib_seconds, 85.0);
        assert_eq!(a.usage.fetched_bytes, 200);
        assert_eq!(a.usage.stored_bytes, 4096);
        assert_eq!(a.host, "h2");
        assert_eq!(r.users.len(), 1);
        assert_eq!(r.users[0].user, "anonymous");
        assert_eq!(r.users[0].vms, 2);
        assert_eq!(r.users[0].usage.cpu_ns, 3_500_000_007);
        // Everything happened in this minute: since now counts it all, a later since nothing.
        let t = now();
        assert_eq!(acc.report(None, t).await.unwrap().users[0].usage.cpu_ns, 3_500_000_007);
        assert!(acc.report(None, t + 3600).await.unwrap().vms.is_empty());
        assert!(acc.report(Some("someone-else"), 0).await.unwrap().vms.is_empty());
    }
}
