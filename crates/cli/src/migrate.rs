//! `vgrid vm migrate`: live migration of a running VM to another host, with progress.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use vgrid_api::migrate::{MigrationStatus, VmMigrate, DEFAULT_DOWNTIME_MS, DEFAULT_MAX_SECONDS};
use vgrid_api::vm::VmRecord;

use crate::output::print_json;
use crate::Ctx;

/// Move a running VM to another host without stopping it.
///
/// The destination opens the same image through its own cache, the VM's disk overlay is
/// mirrored to it, then memory is copied while the guest runs (pre-copy, auto-converge) and the
/// guest is paused only for the last pages (at most --downtime-ms). When the migration cannot
/// converge before --timeout, it is cancelled and the VM keeps running where it was. Prints
/// progress, then the downtime and total time as QEMU measured them; exits non-zero when the
/// migration did not complete.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// VM id, unique id prefix, or name.
    pub id: String,
    /// Destination host [default: the best other host that can take the VM].
    #[arg(long)]
    pub to: Option<String>,
    /// Longest pause of the guest at switchover, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_DOWNTIME_MS)]
    pub downtime_ms: u64,
    /// Cancel the migration (the VM runs on at the source) after this many seconds.
    #[arg(long, default_value_t = DEFAULT_MAX_SECONDS)]
    pub timeout: u64,
    /// Cap the memory transfer at this many MiB/s [default: QEMU's 128 MiB/s].
    #[arg(long)]
    pub max_bandwidth: Option<u64>,
}

pub async fn migrate(ctx: &Ctx, a: MigrateArgs) -> anyhow::Result<ExitCode> {
    let api = ctx.api();
    let req =
        VmMigrate { to: a.to.clone(), downtime_ms: Some(a.downtime_ms), max_seconds: Some(a.timeout), max_bandwidth_mib: a.max_bandwidth };
    let mut v: VmRecord = api.post(&format!("/api/v1/vms/{}/migrate", a.id), &req).await?;
    let id = v.id.clone();
    let t0 = Instant::now();
    let mut last_phase = String::new();
    let mut last_step = String::new();
    let mut last_print = Instant::now();
    if !ctx.json {
        if let Some(m) = &v.migration {
            println!(
                "migrating {} from {} to {} (downtime limit {} ms, timeout {} s)",
                v.id, m.from, m.to, m.downtime_limit_ms, m.max_seconds
            );
        }
    }
    // The coordinator's own guard cancels after the timeout; wait a little longer than that.
    let give_up = Duration::from_secs(a.timeout + 180);
    loop {
        let Some(m) = &v.migration else { anyhow::bail!("VM {id}: the coordinator recorded no migration") };
        if m.status != MigrationStatus::Active {
            break;
        }
        // A line when the step changes, and at most one every 2 s while it goes on.
        let step = m.phase.split(" (").next().unwrap_or("").to_string();
        if !ctx.json && m.phase != last_phase && (step != last_step || last_print.elapsed() >= Duration::from_secs(2)) {
            println!("  {:>6.1}s  {}", t0.elapsed().as_secs_f64(), m.phase);
            last_phase = m.phase.clone();
            last_step = step;
            last_print = Instant::now();
        }
        if t0.elapsed() > give_up {
            anyhow::bail!("VM {id}: the migration is still {} after {} s", m.phase, t0.elapsed().as_secs());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        v = api.get(&format!("/api/v1/vms/{id}")).await?;
    }
    let m = v.migration.clone().expect("checked above");
    if ctx.json {
        print_json(&v)?;
    } else {
        match m.status {
            MigrationStatus::Completed => println!(
                "migrated {id} from {} to {}: downtime {} ms, total {} ms (memory {} MiB, disk {} MiB)",
                m.from,
                m.to,
                m.downtime_ms.map(|d| d.to_string()).unwrap_or_else(|| "?".into()),
                m.total_ms.map(|d| d.to_string()).unwrap_or_else(|| "?".into()),
                m.ram_transferred_bytes.unwrap_or(0) >> 20,
                m.disk_bytes.unwrap_or(0) >> 20
            ),
            s => eprintln!(
                "migration of {id} to {} {}: {}; the VM is {} on {}",
                m.to,
                s.as_str(),
                m.error.as_deref().unwrap_or("no detail"),
                v.state.as_str(),
                v.host.as_deref().unwrap_or("?")
            ),
        }
    }
    Ok(if m.status == MigrationStatus::Completed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
