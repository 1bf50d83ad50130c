//! `vgrid host drain NAME` and `vgrid host undrain NAME` (admins): taking a host out of service
//! before its agent stops for good, and back.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vgrid_api::grid::{Drain, DrainStep, DrainedVm};

use crate::output::print_json;
use crate::Ctx;

/// Longest `--wait` follows a drain.
const WAIT_AT_MOST: Duration = Duration::from_secs(3600);

pub async fn drain(ctx: &Ctx, name: &str, wait: bool) -> anyhow::Result<ExitCode> {
    let path = format!("/api/v1/hosts/{name}/drain");
    let mut d: Drain = ctx.api().post(&path, &serde_json::json!({})).await?;
    if !ctx.json {
        println!("host {name} is draining: no new placements; its VMs are live-migrated away, else suspended to the image servers");
    }
    if !wait {
        if ctx.json {
            print_json(&d)?;
        } else {
            println!("follow it with `vgrid host drain {name} --wait`; `vgrid host undrain {name}` puts the host back in service");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let t0 = Instant::now();
    let mut shown: HashMap<String, (DrainStep, Option<String>)> = HashMap::new();
    loop {
        if !ctx.json {
            for v in &d.vms {
                let now = (v.step, v.to.clone());
                if shown.get(&v.id) != Some(&now) {
                    println!("{:>8.1}s  {}", t0.elapsed().as_secs_f64(), line(v));
                    shown.insert(v.id.clone(), now);
                }
            }
        }
        if d.finished.is_some() {
            break;
        }
        if t0.elapsed() > WAIT_AT_MOST {
            anyhow::bail!(
                "host {name} is still draining after {} s; `vgrid host drain {name} --wait` follows it again",
                WAIT_AT_MOST.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        d = ctx.api().get(&path).await?;
    }
    let failed = d.failed().count();
    if ctx.json {
        print_json(&d)?;
    } else {
        let count = |s: DrainStep| d.vms.iter().filter(|v| v.step == s).count();
        println!(
            "host {name} drained in {:.1} s: {} VMs migrated, {} suspended, {failed} failed",
            t0.elapsed().as_secs_f64(),
            count(DrainStep::Migrated),
            count(DrainStep::Suspended)
        );
        if failed == 0 {
            println!("no VM is left on {name}: its agent may now be stopped; `vgrid host undrain {name}` puts it back in service");
        } else {
            println!("{failed} VMs are still on {name} (see above); `vgrid host drain {name}` tries them again");
        }
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// One VM's step as a progress line.
fn line(v: &DrainedVm) -> String {
    let who = if v.name.is_empty() || v.name == v.id { v.id.clone() } else { format!("{} ({})", v.name, v.id) };
    let to = v.to.as_deref().map(|t| format!(" to {t}")).unwrap_or_default();
    let detail = v.detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default();
    format!("{who} {}{to}{detail}", v.step.as_str())
}

pub async fn undrain(ctx: &Ctx, name: &str) -> anyhow::Result<ExitCode> {
    let d: Option<Drain> = ctx.api().delete(&format!("/api/v1/hosts/{name}/drain")).await?;
    if ctx.json {
        print_json(&d)?;
    } else if d.is_some() {
        println!("host {name} is back in service: VMs are placed on it again");
    } else {
        println!("host {name} was not draining; it is in service");
    }
    Ok(ExitCode::SUCCESS)
}
