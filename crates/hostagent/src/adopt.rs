//! Re-adoption: a host agent that restarts (even after `kill -9`) takes back the QEMUs its
//! predecessor started in the same data directory.
//!
//! Each VM's runtime directory holds what that needs: `spec.json` (the spec as launched),
//! `pid` (QEMU's `-pidfile`), `launch.json` (the coordinator's [`LaunchRequest`], see [`crate::runtime::record_launch`]: id, the VM's
//! configuration, the image restored if any; files of earlier versions read too) and the QMP
//! and console sockets. At start the agent scans
//! `DATA/vms/*`: a directory whose pid is a live QEMU of that directory is adopted
//! ([`Vm::adopt`] reconnects QMP; the console socket is reopened on demand) and reported at the
//! next heartbeat; one whose QEMU is gone is cleaned like an exited VM (its console log stays)
//! and so reported as no longer running; a QEMU that was still waiting for an incoming
//! migration is killed (the migration it belonged to died with the agent), and an adopted QEMU
//! caught in the middle of an outgoing migration has it cancelled and runs on. The block proxy
//! serves the same socket path again (`DATA/nbd.sock`), so QEMU's NBD client reconnects to it at
//! its next read of the base image.

use std::sync::Arc;

use vgrid_api::host::LaunchRequest;

use crate::ctx::HostCtx;
use crate::runtime::{INCOMING_MARKER, LAUNCH_FILE, PID_FILE, SPEC_FILE};
use crate::vm::{LaunchOptions, Vm};

/// Marks (in the runtime directory) that the guest of an adopted QEMU shut itself down.
const GUEST_SHUTDOWN: &str = "guest-shutdown";

/// An adopted QEMU is not our child: its exit status is unknown. Watching QMP for `SHUTDOWN`
/// tells a guest that powered itself off (reported as exit code 0) from a QEMU that died.
fn watch_guest_shutdown(vm: &Arc<Vm>) {
    let mut ev = vm.events();
    let dir = vm.runtime_dir().to_path_buf();
    let _ = std::fs::remove_file(dir.join(GUEST_SHUTDOWN));
    tokio::spawn(async move {
        loop {
            match ev.recv().await {
                Ok(e) if e.event == "SHUTDOWN" => {
                    let _ = crate::qemu_user::write_file(&dir.join(GUEST_SHUTDOWN), e.data.to_string().as_bytes());
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            }
        }
    });
}

/// The exit of a VM, completed for adopted QEMUs whose guest powered off (code 0).
pub(crate) fn exit_of(vm: &Vm, exit: crate::vm::ExitInfo) -> crate::vm::ExitInfo {
    if exit.code.is_none() && exit.signal.is_none() {
        if let Ok(data) = std::fs::read_to_string(vm.runtime_dir().join(GUEST_SHUTDOWN)) {
            if data.contains("\"guest\":true") || data.contains("\"guest\": true") {
                return crate::vm::ExitInfo { code: Some(0), signal: None };
            }
        }
    }
    exit
}

/// What [`adopt_all`] found.
#[derive(Debug, Default, Clone)]
pub struct AdoptReport {
    pub adopted: Vec<String>,
    pub gone: Vec<String>,
    pub killed_incoming: Vec<String>,
}

/// Scans the runtime directories and adopts every QEMU that still runs.
pub(crate) async fn adopt_all(ctx: &Arc<HostCtx>) -> AdoptReport {
    let mut rep = AdoptReport::default();
    let vms = ctx.data_dir().join("vms");
    let Ok(rd) = std::fs::read_dir(&vms) else { return rep };
    let mut dirs: Vec<_> = rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    for dir in dirs {
        let Some(id) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else { continue };
        // Stopped VMs keep only their console log: nothing to adopt.
        if !dir.join(SPEC_FILE).exists() || !dir.join(PID_FILE).exists() {
            continue;
        }
        let incoming = dir.join(INCOMING_MARKER).exists();
        // A QEMU that runs but does not answer QMP yet (busy, or waiting for a page its RAM
        // pager fetches through the proxy this agent has just started again) is asked again
        // before anything is decided about it.
        let mut adopted = Vm::adopt(&dir, &LaunchOptions::default()).await;
        for _ in 0..3 {
            match &adopted {
                Err(e) if crate::runtime::qemu_runs_in(&dir) => {
                    tracing::warn!(vm = %id, "its QEMU runs but did not answer ({e}); asking again");
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    adopted = Vm::adopt(&dir, &LaunchOptions::default()).await;
                }
                _ => break,
            }
        }
        match adopted {
            Ok(vm) if incoming => {
                tracing::warn!(vm = %id, pid = vm.pid(), "killing a QEMU left waiting for an incoming migration");
                let _ = vm.cleanup().await;
                rep.killed_incoming.push(id);
            }
            Ok(vm) => {
                tracing::info!(vm = %id, pid = vm.pid(), "re-adopted running QEMU");
                ctx.net.adopt(&id, &dir, &vm.spec().config, ctx.qemu_user.as_ref().map(|u| u.uid));
                crate::migrate::settle_after_restart(&vm).await;
                crate::save::settle_after_restart(&vm).await;
                if let Some(req) = std::fs::read(dir.join(LAUNCH_FILE)).ok().and_then(|b| serde_json::from_slice::<LaunchRequest>(&b).ok())
                {
                    // Its reservation, cgroup (which QEMU never left) and accounting continue
                    // (the counters' generation is kept in its runtime directory).
                    let res = ctx.resources();
                    match res.admit(&id, &req.config.resources, req.config.memory_mib, vm.accel()) {
                        Ok(limits) => match res.create_group(&id, &limits) {
                            Ok(cg) => res.track(&vm, cg, &limits, 0),
                            Err(e) => tracing::warn!(vm = %id, "re-adopted, but its cgroup cannot be restored: {e}"),
                        },
                        Err(e) => tracing::warn!(vm = %id, "re-adopted over this host's cap: {e}"),
                    }
                    // The export QEMU reads is back as soon as the proxy serves; resolving the
                    // manifest only restores the advertised cache fraction, once the image
                    // servers are known (the first heartbeat names them).
                    let a = ctx.clone();
                    tokio::spawn(async move {
                        for _ in 0..30 {
                            if let Ok(m) = a.proxy().resolve(req.image()).await {
                                a.note_image(m);
                                return;
                            }
                            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                        }
                    });
                }
                let vm = Arc::new(vm);
                watch_guest_shutdown(&vm);
                ctx.insert_vm(&id, vm);
                rep.adopted.push(id);
            }
            Err(e) if crate::runtime::qemu_runs_in(&dir) => {
                // Never remove what a live QEMU uses: it shows as an orphan in `host show`.
                tracing::error!(vm = %id, "not adopted, its QEMU runs but does not answer QMP: {e}; left alone");
            }
            Err(e) => {
                tracing::warn!(vm = %id, "not adopted, its QEMU is gone: {e}");
                if incoming {
                    let _ = std::fs::remove_dir_all(&dir);
                } else {
                    // Like an exited VM: everything but the console log goes.
                    let _ = ctx.release(&id).await;
                }
                rep.gone.push(id);
            }
        }
    }
    if !(rep.adopted.is_empty() && rep.gone.is_empty() && rep.killed_incoming.is_empty()) {
        tracing::info!(adopted = ?rep.adopted, gone = ?rep.gone, killed_incoming = ?rep.killed_incoming, "runtime directories scanned");
    }
    rep
}
