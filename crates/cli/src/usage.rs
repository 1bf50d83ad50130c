//! `vgrid usage` (accounting per VM and per user) and the resource flags of `vgrid vm run`.

use std::process::ExitCode;

use clap::Args;
use vgrid_api::usage::UsageReport;
use vgrid_api::vm::Resources;

use crate::output::{bytes, print_json, table};
use crate::Ctx;

/// Resource control flags of `vgrid vm run`.
#[derive(Args, Debug, Clone, Default)]
pub struct ResourceArgs {
    /// CPU reservation as a fraction of one core (e.g. 0.2), for all of the VM's QEMU threads
    /// together; enforced as CFS bandwidth [default: none, the VM competes fairly].
    #[arg(long, value_name = "FRACTION", conflicts_with = "cpu_slice")]
    pub cpu_share: Option<f64>,
    /// CPU reservation as a (slice, period): MS of CPU time every --cpu-period MS.
    #[arg(long, value_name = "MS", requires = "cpu_period")]
    pub cpu_slice: Option<u64>,
    /// Period of the CPU reservation in ms [default: 100].
    #[arg(long, value_name = "MS")]
    pub cpu_period: Option<u64>,
    /// Limit on the VM's whole QEMU memory in MiB; the guest is killed if it needs more
    /// [default: --memory plus the measured QEMU overhead].
    #[arg(long, value_name = "MIB")]
    pub memory_limit: Option<u64>,
    /// Guest disk bandwidth limit, bytes per second (K, M, G suffixes), reads and writes together.
    #[arg(long, value_name = "BYTES", value_parser = crate::output::parse_size)]
    pub disk_bps: Option<u64>,
    /// Guest disk operations per second limit.
    #[arg(long, value_name = "N")]
    pub disk_iops: Option<u64>,
}

impl ResourceArgs {
    pub fn to_api(&self) -> Resources {
        Resources {
            cpu_share: self.cpu_share,
            cpu_slice_ms: self.cpu_slice,
            cpu_period_ms: self.cpu_period,
            memory_limit_mib: self.memory_limit,
            disk_bps: self.disk_bps,
            disk_iops: self.disk_iops,
        }
    }
}

/// One line describing a VM's resource control, e.g. `cpu 0.20 core, memory limit 600 MiB`.
pub fn describe(r: &Resources) -> String {
    let mut parts = Vec::new();
    match (r.cpu_share, r.cpu_slice_ms) {
        (Some(s), _) => parts.push(format!("cpu {s:.2} core (period {} ms)", r.cpu_period_ms.unwrap_or(100))),
        (None, Some(sl)) => parts.push(format!("cpu {sl} ms every {} ms", r.cpu_period_ms.unwrap_or(100))),
        _ => {}
    }
    if let Some(m) = r.memory_limit_mib {
        parts.push(format!("memory limit {m} MiB"));
    }
    if let Some(b) = r.disk_bps {
        parts.push(format!("disk {}/s", bytes(b)));
    }
    if let Some(n) = r.disk_iops {
        parts.push(format!("disk {n} IOPS"));
    }
    parts.join(", ")
}

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  vgrid usage\n  vgrid usage --user anonymous --since 1h\n  vgrid usage --since 2026-11-26T00:00:00Z --json\n\n\
CPU-seconds come from the VMs' cgroup counters, memory MiB-seconds integrate the cgroup's memory\n\
use sampled every second, DISK READ is what the guests read from their disks, FETCHED what hosts\n\
fetched from image servers for them, STORED what their overlays hold now. Totals survive restarts\n\
of hosts and coordinator."
)]
pub struct UsageArgs {
    /// Only this user's VMs.
    #[arg(long)]
    pub user: Option<String>,
    /// Only use since T: seconds since the epoch, a UTC time YYYY-MM-DDTHH:MM[:SS][Z], or an age
    /// such as 90s, 30m, 2h, 7d (to the minute) [default: everything].
    #[arg(long, value_name = "T", value_parser = parse_since)]
    pub since: Option<u64>,
}

/// Parses `--since` into seconds since the epoch.
pub fn parse_since(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    let bad = || format!("invalid time {s:?}: expected seconds since the epoch, YYYY-MM-DDTHH:MM[:SS][Z], or an age like 30m, 2h, 7d");
    if let Some(unit) = s.chars().last().filter(|c| "smhd".contains(*c)) {
        if let Ok(n) = s[..s.len() - 1].parse::<u64>() {
            let mult = match unit {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                _ => 86400,
            };
            return Ok(now.saturating_sub(n * mult));
        }
    }
    // YYYY-MM-DD[THH:MM[:SS]][Z], UTC.
    let t = s.trim_end_matches('Z');
    let (date, time) = t.split_once(['T', ' ']).unwrap_or((t, "00:00"));
    let d: Vec<i64> = date.split('-').map(|x| x.parse().map_err(|_| bad())).collect::<Result<_, _>>()?;
    let tm: Vec<i64> = time.split(':').map(|x| x.parse().map_err(|_| bad())).collect::<Result<_, _>>()?;
    if d.len() != 3 || !(2..=3).contains(&tm.len()) || !(1..=12).contains(&d[1]) || !(1..=31).contains(&d[2]) || tm[0] > 23 || tm[1] > 59 {
        return Err(bad());
    }
    let days = days_from_civil(d[0], d[1], d[2]);
    let secs = days * 86400 + tm[0] * 3600 + tm[1] * 60 + tm.get(2).copied().unwrap_or(0);
    u64::try_from(secs).map_err(|_| bad())
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

pub async fn run(ctx: &Ctx, a: UsageArgs) -> anyhow::Result<ExitCode> {
    let mut q = Vec::new();
    if let Some(u) = &a.user {
        q.push(format!("user={}", u.replace('&', "%26").replace(' ', "%20")));
    }
    if let Some(t) = a.since {
        q.push(format!("since={t}"));
    }
    let path = if q.is_empty() { "/api/v1/usage".to_string() } else { format!("/api/v1/usage?{}", q.join("&")) };
    let r: UsageReport = ctx.api().get(&path).await?;
    if ctx.json {
        print_json(&r)?;
        return Ok(ExitCode::SUCCESS);
    }
    let row = |who: String, n: String, u: &vgrid_api::usage::UsageTotals| {
        vec![
            who,
            n,
            format!("{:.1}", u.cpu_seconds),
            format!("{:.0}", u.memory_mib_seconds),
            bytes(u.disk_read_bytes),
            bytes(u.fetched_bytes),
            bytes(u.stored_bytes),
        ]
    };
    let users = r.users.iter().map(|u| row(u.user.clone(), u.vms.to_string(), &u.usage)).collect();
    println!("{}", table(&["USER", "VMS", "CPU-S", "MEM MIB-S", "DISK READ", "FETCHED", "STORED"], users));
    println!();
    let vms = r
        .vms
        .iter()
        .map(|v| {
            let mut cells = row(format!("{} ({})", v.vm, v.name), v.user.clone(), &v.usage);
            cells.push(v.host.clone());
            if v.oom_kills > 0 {
                cells.push(format!("OOM-killed at {} MiB", v.memory_limit_bytes >> 20));
            } else {
                cells.push(String::new());
            }
            cells
        })
        .collect();
    println!("{}", table(&["VM", "USER", "CPU-S", "MEM MIB-S", "DISK READ", "FETCHED", "STORED", "HOST", "NOTE"], vms));
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_forms() {
        assert_eq!(parse_since("1700000000").unwrap(), 1_700_000_000);
        assert_eq!(parse_since("1970-01-02T00:00:00Z").unwrap(), 86400);
        assert_eq!(parse_since("2026-11-26T14:30Z").unwrap(), 1_795_703_400);
        assert_eq!(parse_since("2000-03-01").unwrap(), 951_868_800);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let h = parse_since("2h").unwrap();
        assert!(now - h >= 7200 && now - h < 7210);
        assert!(parse_since("yesterday").unwrap_err().contains("invalid time"));
        assert!(parse_since("2026-13-01").is_err());
    }
}
