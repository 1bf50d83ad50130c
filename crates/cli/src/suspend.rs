//! `vgrid vm suspend`, `vgrid vm resume` and `vgrid image snapshot`: saving running VMs on the
//! image servers and restoring them (clients of the coordinator's REST API).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use vgrid_api::vm::{SavedImage, Suspended, VmRecord, VmResume, VmSnapshot, VmState};

use crate::client::HttpError;
use crate::output::{bytes, print_json, Progress};
use crate::Ctx;

#[derive(Args, Debug)]
pub struct SuspendArgs {
    /// VM id, unique id prefix, or name.
    pub id: String,
}

#[derive(Args, Debug)]
pub struct ResumeArgs {
    /// VM id, unique id prefix, or name of a suspended VM.
    pub id: String,
    /// Requirement over the host ad (CEL) for the host to resume on, e.g. 'host.labels.site == "uf"'.
    #[arg(long)]
    pub require: Option<String>,
    /// Resume on this host (same as --require 'host.name == "HOST"').
    #[arg(long)]
    pub host: Option<String>,
    /// Give up waiting after this many seconds (the restore goes on).
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// The running VM to save (id, unique id prefix, or name).
    pub vm: String,
    /// Name of the new warm image (a new version when it exists).
    #[arg(long)]
    pub name: String,
}

fn spinner(ctx: &Ctx, msg: String) -> Progress {
    Progress::spinner(ctx.json, msg)
}

fn summary(s: &SavedImage) -> String {
    format!(
        "state {}, {} of {} disk chunks changed, {} uploaded, guest paused {:.1}s",
        bytes(s.state_bytes),
        s.disk_chunks_new,
        s.disk_chunks_total,
        bytes(s.uploaded_bytes),
        s.paused_secs
    )
}

pub async fn suspend(ctx: &Ctx, a: SuspendArgs) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    let sp = spinner(ctx, format!("{}: saving memory and disk to the image servers", a.id));
    let r: anyhow::Result<Suspended> = ctx.api().post(&format!("/api/v1/vms/{}/suspend", a.id), &serde_json::json!({})).await;
    let s = match r {
        Ok(s) => s,
        Err(e) if HttpError::is_transient(&e) => {
            // The host did not answer (its agent went away): the coordinator settles what
            // became of the save from the host; report that, not the lost answer.
            sp.set_message(format!("{}: the host did not answer; waiting for the outcome of the save", a.id));
            let v = settled_suspend(ctx, &a.id, &e).await;
            sp.finish_and_clear();
            let v = v?;
            if ctx.json {
                // The shape of `Suspended`, without the save's figures (nobody heard them).
                print_json(&serde_json::json!({"vm": v, "saved": null}))?;
            } else {
                println!(
                    "VM {} ({}) suspended in {:.1}s: saved as {} (its host stopped answering meanwhile)",
                    v.id,
                    v.name,
                    t0.elapsed().as_secs_f64(),
                    v.saved_image.clone().unwrap_or_default()
                );
                println!("resume it with: vgrid vm resume {} [--host HOST | --require EXPR]", v.id);
            }
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => {
            sp.finish_and_clear();
            bail!("{e}; the VM keeps running");
        }
    };
    sp.finish_and_clear();
    if ctx.json {
        print_json(&s)?;
    } else {
        println!(
            "VM {} ({}) suspended in {:.1}s: saved as {} ({})",
            s.vm.id,
            s.vm.name,
            t0.elapsed().as_secs_f64(),
            s.saved.image,
            summary(&s.saved)
        );
        println!("resume it with: vgrid vm resume {} [--host HOST | --require EXPR]", s.vm.id);
    }
    Ok(ExitCode::SUCCESS)
}

/// Follows VM `id` while it is `suspending` after its suspend went unanswered (`cause`): the
/// record once `suspended`, else an error with the state the VM ended in and why.
async fn settled_suspend(ctx: &Ctx, id: &str, cause: &anyhow::Error) -> anyhow::Result<VmRecord> {
    let api = ctx.api();
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        match api.get::<VmRecord>(&format!("/api/v1/vms/{id}")).await {
            Ok(v) if v.state == VmState::Suspended => return Ok(v),
            Ok(v) if v.state == VmState::Running => {
                // The save failed (the host refused, or settled it as failed): nothing changed.
                let why = v.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
                bail!("suspend of VM {} failed: {cause}; the VM keeps running{why}", v.id)
            }
            Ok(v) if v.state != VmState::Suspending => {
                let why = v.reason.clone().unwrap_or_else(|| "no reason recorded".into());
                bail!("suspend of VM {} failed: it is {} ({why}); its host had stopped answering: {cause}", v.id, v.state.as_str())
            }
            Ok(_) => {}
            Err(e) if HttpError::is_transient(&e) => {}
            Err(e) => return Err(e),
        }
        if Instant::now() > deadline {
            bail!(
                "VM {id} is still suspending {}s after its host stopped answering ({cause}); see `vgrid vm show {id}`",
                SETTLE_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How long `vm suspend` follows a suspend its host did not answer.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

pub async fn resume(ctx: &Ctx, a: ResumeArgs) -> anyhow::Result<ExitCode> {
    let api = ctx.api();
    let t0 = Instant::now();
    let req = VmResume { require: a.require.clone(), host: a.host.clone() };
    let mut v: VmRecord = api.post(&format!("/api/v1/vms/{}/resume", a.id), &req).await?;
    let sp = spinner(ctx, format!("{}: {}", v.id, v.phase));
    let deadline = t0 + Duration::from_secs(a.timeout);
    loop {
        sp.set_message(format!("{} {}: {} ({:.1}s)", v.id, v.name, v.phase, t0.elapsed().as_secs_f64()));
        match v.state {
            VmState::Running => break,
            VmState::Suspended | VmState::Failed | VmState::Stopped => {
                sp.finish_and_clear();
                if ctx.json {
                    print_json(&v)?;
                }
                bail!("VM {} is {}: {}", v.id, v.state.as_str(), v.reason.clone().unwrap_or_else(|| "no reason recorded".into()));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            sp.finish_and_clear();
            bail!("VM {} is still {} after {}s (see `vgrid vm show {}`)", v.id, v.phase, a.timeout, v.id);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        v = api.get(&format!("/api/v1/vms/{}", v.id)).await?;
    }
    sp.finish_and_clear();
    if ctx.json {
        print_json(&v)?;
    } else {
        println!("VM {} ({}) resumed on {} in {:.1}s", v.id, v.name, v.host.clone().unwrap_or_default(), t0.elapsed().as_secs_f64());
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn snapshot(ctx: &Ctx, a: SnapshotArgs) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    let sp = spinner(ctx, format!("{}: saving memory and disk as image {}", a.vm, a.name));
    let r: anyhow::Result<SavedImage> =
        ctx.api().post(&format!("/api/v1/vms/{}/snapshot", a.vm), &VmSnapshot { name: a.name.clone() }).await;
    sp.finish_and_clear();
    let s = r?;
    if ctx.json {
        print_json(&s)?;
    } else {
        println!(
            "warm image {} saved from VM {} in {:.1}s (parent {}; {})",
            s.image,
            a.vm,
            t0.elapsed().as_secs_f64(),
            s.parent.clone().unwrap_or_default(),
            summary(&s)
        );
        println!("start VMs from it with: vgrid vm run {}", s.image);
    }
    Ok(ExitCode::SUCCESS)
}
