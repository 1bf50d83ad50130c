//! Volumes on this host: a read-write volume's writes live in an overlay of their own in the
//! VM's runtime directory (`volume<i>.qcow2` over the block proxy's export of the version the
//! VM started from) until they are committed; a commit publishes them as the volume's next
//! version on an image server.
//!
//! A commit composes the chunks the overlay touches (the base chunk with the overlay's ranges
//! laid over it, as a snapshot does, [`crate::overlay::compose_touched`]), uploads those the server
//! lacks, and only then writes the new manifest, with the VM's fencing epoch: the server refuses
//! it when the volume was attached read-write elsewhere since (a newer epoch). A failure at any
//! point leaves the last committed version as it was. A running guest is paused while its
//! overlay is read (QMP `stop` drains and flushes its disks), then runs on while the chunks
//! upload. When a VM ends, [`commit_on_exit`] commits each of its read-write volumes before its
//! runtime directory goes; an overlay that cannot be committed is kept in `volumes-pending/`
//! of the host's data directory (the writes are recoverable there, never lost silently).

use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use vgrid_api::volume::{VolumeAttach, VolumeCommitted};
use vgrid_api::{ChunkHash, ImageRef, Manifest};

use crate::ctx::HostCtx;
use crate::error::AgentError;
use crate::overlay::{compose_touched, encode_all, export_of, SaveGuard, Upload};
use crate::spec::VmSpec;
use crate::vm::Vm;

/// Chunks encoded and sent per round.
const BATCH: usize = 64;

/// Where overlays that could not be committed are kept, in the host's data directory.
pub const PENDING_DIR: &str = "volumes-pending";

fn err(id: &str, volume: &str, cause: impl Into<String>) -> AgentError {
    AgentError::Volume { id: id.to_string(), volume: volume.to_string(), cause: cause.into() }
}

/// Commits volume `name` of the running VM `id` (`vgrid volume commit`): the guest is paused
/// while its writes are read, then runs on.
pub async fn commit_running(ctx: &HostCtx, id: &str, name: &str) -> Result<VolumeCommitted, AgentError> {
    let vm = ctx.vm(id).ok_or_else(|| AgentError::UnknownVm(id.to_string()))?;
    let spec = vm.spec().clone();
    let (i, att, base) = volume_of(&spec, id, name)?;
    let _saving = SaveGuard::take(vm.runtime_dir())
        .ok_or_else(|| err(id, name, "a snapshot, suspend or another commit of this VM is in progress"))?;
    commit_one(ctx, id, att, &base, &crate::runtime::volume_overlay(vm.runtime_dir(), i), Some(&vm)).await.map_err(|c| err(id, name, c))
}

/// Commits every read-write volume of VM `vm`, whose guest is paused for a suspend (its state
/// saved: the state's migration flushed its disks). Returns the first failure, naming the
/// volume (the caller resumes the guest; a volume committed before it stays committed).
pub(crate) async fn commit_paused(ctx: &HostCtx, vm: &Vm) -> Result<Vec<VolumeCommitted>, AgentError> {
    let spec = vm.spec().clone();
    let id = spec.id.as_str();
    let mut out = Vec::new();
    for (_, a, _) in spec.volumes().filter(|(_, a, _)| !a.readonly) {
        let (i, att, base) = volume_of(&spec, id, &a.name)?;
        let overlay = crate::runtime::volume_overlay(vm.runtime_dir(), i);
        let c = commit_one(ctx, id, att, &base, &overlay, None)
            .await
            .map_err(|c| err(id, &att.name, format!("cannot commit it for the suspend (the VM keeps running): {c}")))?;
        tracing::info!(vm = %id, volume = %c.volume, chunks = c.chunks_changed, bytes = c.uploaded_bytes, "volume committed for a suspend");
        out.push(c);
    }
    Ok(out)
}

/// After a suspend whose volumes [`commit_paused`] committed and whose QEMU has ended: their
/// overlays go (nothing is left to commit when the VM is released here; it resumes over the
/// committed versions).
pub(crate) fn drop_committed(vm: &Vm) {
    for (i, _, _) in vm.spec().volumes().filter(|(_, a, _)| !a.readonly) {
        let overlay = crate::runtime::volume_overlay(vm.runtime_dir(), i);
        if let Err(e) = std::fs::remove_file(&overlay) {
            tracing::warn!(vm = %vm.id(), "removing the committed volume overlay {}: {e}", overlay.display());
        }
    }
}

/// The read-write volume `name` of `spec`: its index, attachment and the version it started from.
fn volume_of<'a>(spec: &'a VmSpec, id: &str, name: &str) -> Result<(usize, &'a VolumeAttach, ImageRef), AgentError> {
    let (i, att, disk) = spec.volumes().find(|(_, a, _)| a.name == name).ok_or_else(|| err(id, name, "not attached to this VM"))?;
    if att.readonly {
        return Err(err(id, name, "attached read-only: it has no writes to commit"));
    }
    let base = export_of(disk).ok_or_else(|| err(id, name, "its disk is not an export of the block proxy"))?;
    Ok((i, att, base))
}

/// [`HostCtx::release`] of VM `id`, its read-write volumes committed first (QEMU is ended
/// first if it still runs: the guest's unflushed writes are lost, as in a crash).
pub async fn release(ctx: &HostCtx, id: &str) -> Result<(), AgentError> {
    commit_before_release(ctx, id).await;
    ctx.release(id).await
}

/// [`HostCtx::remove`] of VM `id`, its read-write volumes committed first.
pub async fn remove(ctx: &HostCtx, id: &str) -> Result<(), AgentError> {
    commit_before_release(ctx, id).await;
    ctx.remove(id).await
}

async fn commit_before_release(ctx: &HostCtx, id: &str) {
    let dir = ctx.runtime_dir(id);
    let vm = ctx.vm(id);
    let Some(spec) = vm.as_ref().map(|v| v.spec().clone()).or_else(|| crate::runtime::read_spec(&dir)) else { return };
    if spec.volumes().all(|(_, a, _)| a.readonly) {
        return;
    }
    if dir.join(crate::runtime::MIGRATED_MARKER).exists() {
        // Its writes went with it to the host it was migrated to (which commits them; this
        // host's epoch is fenced by then too).
        tracing::info!(vm = %id, "not committing the volumes of a VM migrated away: their writes run on at the destination");
        return;
    }
    if let Some(vm) = vm {
        if vm.exit_info().is_none() {
            let _ = vm.kill().await;
        }
    }
    commit_on_exit(ctx, id, &spec, &dir).await;
}

/// After VM `id`'s QEMU ended: commits each read-write volume's overlay in `dir`; one that
/// fails is moved to [`PENDING_DIR`] and logged with the cause.
pub async fn commit_on_exit(ctx: &HostCtx, id: &str, spec: &VmSpec, dir: &Path) {
    for (i, att, _) in spec.volumes().filter(|(_, a, _)| !a.readonly) {
        let overlay = crate::runtime::volume_overlay(dir, i);
        if !overlay.exists() {
            continue;
        }
        let r = match volume_of(spec, id, &att.name) {
            Ok((_, att, base)) => commit_one(ctx, id, att, &base, &overlay, None).await,
            Err(e) => Err(e.to_string()),
        };
        match r {
            Ok(c) => {
                tracing::info!(vm = %id, volume = %c.volume, chunks = c.chunks_changed, bytes = c.uploaded_bytes, "volume committed as its VM ended")
            }
            Err(cause) => {
                let kept = keep_pending(ctx, id, &att.name, &overlay);
                tracing::error!(vm = %id, volume = %att.name, kept = %kept.display(), "volume NOT committed as its VM ended (its writes are kept on this host): {cause}");
            }
        }
    }
}

/// Moves an overlay that could not be committed out of the runtime directory.
fn keep_pending(ctx: &HostCtx, id: &str, volume: &str, overlay: &Path) -> PathBuf {
    let dir = ctx.cfg.data_dir.join(PENDING_DIR);
    let to = dir.join(format!("{volume}.{id}.qcow2"));
    let moved = std::fs::create_dir_all(&dir).and_then(|_| std::fs::rename(overlay, &to));
    match moved {
        Ok(()) => to,
        Err(e) => {
            tracing::error!(vm = %id, %volume, "cannot move {} to {}: {e}", overlay.display(), to.display());
            overlay.to_path_buf()
        }
    }
}

/// Commits one overlay over `base`: composed while `paused` (a running guest) is paused.
async fn commit_one(
    ctx: &HostCtx,
    id: &str,
    att: &VolumeAttach,
    base: &ImageRef,
    overlay: &Path,
    running: Option<&Vm>,
) -> Result<VolumeCommitted, String> {
    let parent = ctx.proxy().resolve(base).await.map_err(|e| format!("reading version {base}: {e}"))?;
    let t0 = Instant::now();
    let running = running.filter(|vm| vm.exit_info().is_none());
    if let Some(vm) = running {
        vm.stop().await.map_err(|e| format!("pausing the guest: {e}"))?;
    }
    let touched = compose_touched(ctx, overlay, &parent).await;
    let paused_secs = if let Some(vm) = running {
        if let Err(e) = vm.cont().await {
            tracing::error!(vm = %id, "resuming the guest after reading volume {}: {e}", att.name);
        }
        t0.elapsed().as_secs_f64()
    } else {
        0.0
    };
    let touched = touched?;
    let mut disk = parent.disk.clone();
    let indices: Vec<u64> = touched.keys().copied().collect();
    let mut encoded: Vec<(ChunkHash, Bytes)> = Vec::new();
    for batch in indices.chunks(BATCH) {
        let enc = encode_all(batch.iter().map(|i| touched[i].clone()).collect()).await;
        for (i, e) in batch.iter().zip(&enc) {
            disk.chunks[*i as usize] = e.as_ref().map(|(h, _)| *h);
        }
        encoded.extend(enc.into_iter().flatten());
    }
    let mut up = Upload::begin(&ctx.servers().urls()).await?;
    let r = publish(&mut up, att, &parent, disk, &encoded).await;
    if r.is_err() {
        up.abort().await;
    }
    let (volume, changed, uploaded_bytes) = r?;
    Ok(VolumeCommitted { volume: volume.to_string(), chunks_changed: changed, uploaded_bytes, paused_secs })
}

/// Uploads the changed chunks and writes the next version (fenced by the VM's epoch), unless
/// the head already has exactly this disk (nothing written since the last commit). Returns the
/// version, the chunks that differ from the head before it and the bytes sent.
async fn publish(
    up: &mut Upload,
    att: &VolumeAttach,
    parent: &Manifest,
    disk: vgrid_api::Blob,
    encoded: &[(ChunkHash, Bytes)],
) -> Result<(ImageRef, u64, u64), String> {
    let head =
        up.client.manifest(&ImageRef { name: att.name.clone(), version: None }).await.map_err(|e| format!("the volume's head: {e}"))?;
    if head.disk == disk {
        return Ok((head.image_ref(), 0, 0));
    }
    let changed = if head.disk.chunks.len() == disk.chunks.len() {
        head.disk.chunks.iter().zip(&disk.chunks).filter(|(a, b)| a != b).count() as u64
    } else {
        disk.chunks.len() as u64
    };
    for batch in encoded.chunks(BATCH) {
        up.send(batch).await?;
    }
    let m = Manifest { version: 0, created: 0, disk, parent: Some(parent.image_ref()), state: None, ..parent.clone() };
    let stored = up.client.commit_fenced(&up.id, &m, att.epoch).await.map_err(|e| format!("commit: {e}"))?;
    tracing::info!(volume = %stored.image_ref(), epoch = ?att.epoch, "volume version committed");
    Ok((stored.image_ref(), changed, up.sent_bytes))
}
