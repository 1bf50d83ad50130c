//! Instantiating a VM on this host: admission within the owner's cap, the image opened through
//! the block proxy, boot files written into the runtime directory, QEMU launched on an overlay
//! over the proxy's export (or a warm image's state restored, see [`crate::restore`]) in its own
//! cgroup, and the launch recorded for re-adoption. Also the destination of a migration
//! prepares its VM here ([`prepare_spec`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use vgrid_api::host::{LaunchRequest, Launched};
use vgrid_api::vm::Forward;
use vgrid_api::Boot;

use crate::ctx::HostCtx;
use crate::error::AgentError;
use crate::spec::{BootSource, DiskSource, VmSpec};
use crate::vm::{LaunchOptions, Vm};
use crate::Accel;

/// Starts a VM: opens the image through the proxy, writes kernel/initrd, launches QEMU on
/// an overlay over the proxy's export (or restores a warm image's state), in its own cgroup
/// within the owner's cap. Returns once QEMU's QMP answers.
pub async fn launch(ctx: &HostCtx, req: LaunchRequest, progress: &(dyn Fn(&str) + Send + Sync)) -> Result<Launched, AgentError> {
    let id = req.id.clone();
    let accel = requested_accel(&req)?;
    let limits = ctx.res.admit(&id, &req.config.resources, req.config.memory_mib, accel.unwrap_or_else(crate::accel::detect))?;
    let fetched0 = ctx.proxy.stats().bytes_fetched;
    let r = launch_admitted(ctx, req, accel, &limits, fetched0, progress).await;
    if r.is_err() {
        ctx.res.release(&id);
        ctx.net.unplug(&id);
    }
    r
}

async fn launch_admitted(
    ctx: &HostCtx,
    req: LaunchRequest,
    accel: Option<Accel>,
    limits: &crate::cgroup::Limits,
    fetched0: u64,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<Launched, AgentError> {
    let id = req.id.clone();
    // Before anything is fetched: a forward whose host port is taken here would only make
    // QEMU fail later with a vaguer message (and a resume would have fetched its state).
    let forwards: Vec<Forward> = req.config.net.forwards().copied().collect();
    check_forwards(ctx, &id, &forwards)?;
    let (mut spec, dir, manifest) = prepare_spec(ctx, &req, progress).await?;
    // A warm image: its saved state is loaded instead of booting (see restore.rs).
    let resolved_accel = accel.unwrap_or_else(crate::accel::detect);
    if manifest.state.is_some() {
        progress("fetching saved state");
    }
    let incoming = crate::restore::prepare_incoming(ctx, &id, &manifest, req.config.cpus, req.config.memory_mib, resolved_accel)?;
    // A saved RAM paged in lazily: its export is opened now, the pager and QEMU start while
    // the state is fetched, and its hot pages come once the state is here (see
    // `open_saved_ram`); the export is held until QEMU runs.
    let _ram_export = match &incoming {
        Some(st) => crate::restore::open_saved_ram(ctx, &manifest, st).await,
        None => None,
    };
    progress(if incoming.is_some() { "restoring" } else { "booting" });
    let export = manifest.image_ref().to_string();
    let cgroup = ctx.res.create_group(&id, limits)?;
    let mut opts = LaunchOptions {
        cgroup: cgroup.clone(),
        disk_throttle: crate::qemu::args::DiskThrottle::of(&req.config.resources),
        ..ctx.launch_options()
    };
    // A warm image: QEMU waits for its state, which streams in while it is fetched; RAM
    // saved apart from the state is paged in lazily (or loaded first where it cannot be).
    opts.defer_incoming = incoming.is_some();
    if incoming.is_some() {
        // The pager and the overlays at once (two processes, ~20 and ~10 ms here).
        let (ram, overlays) = tokio::join!(
            crate::restore::saved_ram_backing(ctx, &id, &manifest, &dir, &opts),
            Vm::create_overlays_ahead(&spec, &dir, &opts)
        );
        if let Err(e) = overlays {
            crate::ram::stop_pager(&dir).await;
            return Err(e.into());
        }
        spec.ram = ram?;
        opts.reuse_overlay = true;
    }
    let vm = match Vm::launch_with(spec, &dir, &opts).await {
        Ok(vm) => vm,
        Err(e) => {
            crate::ram::stop_pager(&dir).await;
            return Err(e.into());
        }
    };
    if let Some(st) = incoming {
        crate::restore::prefetch_hot_pages(ctx, &vm, &manifest);
        // A console stalled when the state was saved runs on only with a client at load.
        vm.hold_console_for_load().await;
        let loaded = crate::restore::stream_incoming(&vm, st, vgrid_api::host::RESTORE_TIMEOUT).await;
        vm.release_console().await;
        if let Err(e) = loaded {
            let _ = vm.kill().await;
            return Err(e);
        }
    }
    crate::runtime::record_launch(&dir, &req);
    ctx.res.track(&vm, cgroup, limits, ctx.proxy.stats().bytes_fetched.saturating_sub(fetched0));
    let launched = Launched { pid: vm.pid(), accel: vm.accel() };
    ctx.insert_vm(&id, Arc::new(vm));
    tracing::info!(vm = %id, image = %export, pid = launched.pid, "QEMU started");
    Ok(launched)
}

/// Refuses a launch whose forwarded host ports cannot be bound on this host (QEMU binds
/// them on 127.0.0.1), naming the port and the cause.
pub(crate) fn check_forwards(ctx: &HostCtx, id: &str, forwards: &[Forward]) -> Result<(), AgentError> {
    for &Forward { host: h, guest: g } in forwards {
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", h)) {
            return Err(crate::resources::AdmissionError::Refused {
                host: ctx.cfg.name.clone(),
                id: id.to_string(),
                reason: format!("host port {h} (forwarded to guest port {g}) cannot be bound on 127.0.0.1: {e}"),
            }
            .into());
        }
    }
    Ok(())
}

/// Opens the image through the proxy, writes kernel/initrd into the runtime directory and
/// returns the spec of a VM on an overlay over the proxy's export, with that directory and
/// the image's manifest.
pub(crate) async fn prepare_spec(
    ctx: &HostCtx,
    req: &LaunchRequest,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<(VmSpec, PathBuf, Arc<vgrid_api::Manifest>), AgentError> {
    let id = req.id.clone();
    let dir = ctx.runtime_dir(&id);
    let accel = requested_accel(req)?;
    progress("fetching image");
    let t0 = Instant::now();
    // A resume instantiates its saved image; anything else the image it boots.
    let manifest = ctx.proxy.resolve(req.image()).await?;
    ctx.note_image(manifest.clone());
    std::fs::create_dir_all(&dir).map_err(|e| AgentError::Io {
        id: id.clone(),
        what: "runtime directory",
        path: dir.clone(),
        source: e,
    })?;
    // A kept directory was QEMU's user's: take it back before writing into it as root
    // (never from under a QEMU of this id that still runs).
    if ctx.qemu_user.is_some() && !ctx.has_vm(&id) {
        crate::qemu_user::reclaim(&dir).map_err(|e| AgentError::Io {
            id: id.clone(),
            what: "runtime directory",
            path: dir.clone(),
            source: e,
        })?;
    }
    // A warm image of a direct kernel boot restores without its kernel and initrd (they
    // are in the saved memory already): only the loader ROMs its state names.
    let restore_roms = match (&manifest.meta.boot, &manifest.state) {
        (Boot::Kernel { .. }, Some(st)) => crate::restore::state_loader_roms(ctx, &manifest, &st.blob).await,
        _ => None,
    };
    let boot = match &manifest.meta.boot {
        Boot::Firmware => BootSource::Firmware { bios: None },
        Boot::Kernel { .. } if restore_roms.is_some() => BootSource::Restore { option_roms: restore_roms.unwrap_or_default() },
        Boot::Kernel { kernel, initrd, cmdline } => {
            let kpath = dir.join("kernel");
            ctx.proxy.write_blob(&manifest, kernel, &kpath).await?;
            let ipath = match initrd {
                Some(i) => {
                    let p = dir.join("initrd");
                    ctx.proxy.write_blob(&manifest, i, &p).await?;
                    Some(p)
                }
                None => None,
            };
            BootSource::Kernel { kernel: kpath, initrd: ipath, cmdline: cmdline.clone() }
        }
    };
    tracing::debug!(vm = %id, image = %manifest.image_ref(), took_ms = t0.elapsed().as_millis() as u64, "boot files ready");
    let export = manifest.image_ref().to_string();
    let mut spec = VmSpec::new(&id, req.config.clone().with_accel(accel), DiskSource::nbd_unix(&ctx.nbd_socket, &export), boot);
    spec.volume_disks = volume_disks(ctx, &id, &req.config.volumes, progress).await?;
    // Site interfaces: their taps exist before QEMU opens them, their leases are served.
    ctx.net.plug(&id, &dir, &req.config, ctx.qemu_user.as_ref().map(|u| u.uid))?;
    Ok((spec, dir, manifest))
}

/// The block proxy's exports of the committed versions `volumes` start from (each must be
/// a volume, and a version pinned by the coordinator for a read-write one).
async fn volume_disks(
    ctx: &HostCtx,
    id: &str,
    volumes: &[vgrid_api::volume::VolumeAttach],
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<Vec<DiskSource>, AgentError> {
    let mut out = Vec::new();
    for v in volumes {
        progress(&format!("opening volume {}", v.name));
        let bad = |cause: String| AgentError::Volume { id: id.to_string(), volume: v.name.clone(), cause };
        let m = ctx.proxy.resolve(&v.image_ref()).await?;
        if m.meta.volume.is_none() {
            return Err(bad(format!("{} is an image, not a volume", m.image_ref())));
        }
        if !v.readonly && v.epoch.is_none() {
            return Err(bad("a read-write attach needs the coordinator's fencing epoch".into()));
        }
        out.push(DiskSource::nbd_unix(&ctx.nbd_socket, &m.image_ref().to_string()));
    }
    Ok(out)
}

/// The accelerator a launch request asks for (`None`: the host's choice), refusing KVM where it
/// does not work.
pub(crate) fn requested_accel(req: &LaunchRequest) -> Result<Option<Accel>, AgentError> {
    match req.config.accel {
        Some(Accel::Kvm) if !crate::kvm_usable() => Err(AgentError::NoKvm { id: req.id.clone() }),
        a => Ok(a),
    }
}
