//! Saving a running guest as a **warm image** (its QEMU migration
//! stream plus its disk as changed so far, the original image as parent) (starting a guest
//! from such an image is [`crate::restore`]). Suspend is the same save followed
//! by the end of QEMU; resume is a launch of the saved image on any host.
//!
//! The new disk blob is composed without copying the base: `qemu-img map` on the VM's qcow2
//! overlay says which ranges the guest wrote; chunks the overlay does not touch keep the
//! parent's chunk hashes, touched chunks are the parent's chunk (read through the host cache)
//! with the overlay's bytes laid over it, read straight from the qcow2 file at the offsets the
//! map gives. Only those chunks and the state's chunks are uploaded, through an image server
//! upload session, and the manifest is committed last: a failure leaves no image and, for a
//! suspend, a running guest.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use vgrid_api::host::{SaveRequest, SAVE_TIMEOUT};
use vgrid_api::vm::SavedImage;
use vgrid_api::{Blob, ChunkHash, Manifest, SavedRam, SavedState, StateMeta};

use crate::ctx::HostCtx;
use crate::error::{AgentError, SaveError};
use crate::overlay::{compose_touched, encode_all, export_of, SaveGuard, Upload, SAVING_MARKER};
use crate::vm::Vm;

/// Name of the state file a save writes in the runtime directory (removed once uploaded).
const SAVE_FILE: &str = "state.save";
/// Chunk size of a saved RAM: a guest's first page faults after a restore are scattered, and
/// each fetches its whole chunk (the pager's file reads ahead 32 KiB, see `crate::ram`).
const RAM_CHUNK_SIZE: u32 = 64 << 10;
/// The guest's RAM copied for saving (non-zero pages, sparse), in the runtime directory.
const RAM_SAVE_FILE: &str = "ram.save";
/// Chunks hashed, checked and uploaded per round.
const UPLOAD_BATCH: usize = 64;

/// After the agent restarted: a VM whose save the previous agent did not finish (it was killed
/// while the guest was paused for it) is resumed, and the half-written state files go. A save
/// whose memory copy still runs is cancelled first (by `migrate::settle_after_restart`, called
/// before this). The coordinator learns from the host that the VM runs on.
pub(crate) async fn settle_after_restart(vm: &Vm) {
    let dir = vm.runtime_dir().to_path_buf();
    if !dir.join(SAVING_MARKER).exists() {
        return;
    }
    let status = match vm.execute("query-status", None).await {
        Ok(st) => st.get("status").and_then(serde_json::Value::as_str).unwrap_or("").to_string(),
        Err(e) => {
            tracing::warn!(vm = %vm.id(), "adopted after an interrupted save, but its status is unknown: {e}");
            return;
        }
    };
    tracing::warn!(vm = %vm.id(), status, "adopted with a save the previous agent did not finish; the guest runs on");
    if status != "running" {
        resume_guest(vm).await;
    }
    for f in [SAVE_FILE, RAM_SAVE_FILE, SAVING_MARKER] {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

/// What was read while the guest was paused.
struct Captured {
    state_path: PathBuf,
    state_bytes: u64,
    /// The RAM saved apart from the stream (a guest on a shared RAM file).
    ram_path: Option<PathBuf>,
    /// Composed bytes of the chunks the overlay touches.
    touched: BTreeMap<u64, Vec<u8>>,
    machine: String,
    cpus: u32,
    memory_mib: u64,
    accel: String,
}

/// Saves VM `id` as a new warm image `req.name` whose parent is the image it runs from.
/// With `suspend`, QEMU ends once the image is committed (the host's capacity is free);
/// otherwise, and whenever saving fails, the guest runs on.
pub async fn save_vm(ctx: &HostCtx, id: &str, req: &SaveRequest, suspend: bool) -> Result<SavedImage, AgentError> {
    vgrid_api::manifest::validate_name(&req.name).map_err(|_| SaveError::BadName(req.name.clone()))?;
    let vm = ctx.vm(id).ok_or_else(|| AgentError::UnknownVm(id.to_string()))?;
    let fail = |cause: String| AgentError::from(SaveError::Save { id: id.to_string(), cause });
    let _saving = SaveGuard::take(vm.runtime_dir()).ok_or_else(|| fail("another snapshot or suspend of this VM is in progress".into()))?;
    if !suspend {
        if let Some((_, a, _)) = vm.spec().volumes().find(|(_, a, _)| !a.readonly) {
            return Err(fail(format!(
                "volume {} is attached read-write: a warm image would not hold its writes (suspend the VM, or stop it, instead)",
                a.name
            )));
        }
    }
    let parent_ref = export_of(&vm.spec().disk).ok_or_else(|| fail("its disk is not an image of the block proxy".into()))?;
    let parent = ctx.proxy().resolve(&parent_ref).await?;
    // The save goes to an image server: its upload session opens before the guest pauses, so
    // that with none reachable the save is refused at once and the guest never pauses (a
    // guest waiting on a chunk from the image servers would hold QEMU's pause until its
    // timeout).
    let mut up = Upload::begin(&ctx.servers().urls()).await.map_err(|cause| {
        AgentError::from(SaveError::Upload {
            id: id.to_string(),
            image: req.name.clone(),
            cause: format!("the image servers are needed to save, and none opened an upload: {cause}"),
        })
    })?;
    let t0 = Instant::now();
    let captured = match capture(ctx, &vm, &parent).await {
        Ok(c) => c,
        Err(e) => {
            resume_guest(&vm).await;
            up.abort().await;
            return Err(e);
        }
    };
    // A suspend commits the read-write volumes while the guest is paused (its disks flushed
    // by the state's migration): the guest resumes over exactly these versions, anywhere.
    if suspend {
        if let Err(e) = crate::volume::commit_paused(ctx, &vm).await {
            let _ = std::fs::remove_file(&captured.state_path);
            if let Some(p) = &captured.ram_path {
                let _ = std::fs::remove_file(p);
            }
            resume_guest(&vm).await;
            up.abort().await;
            return Err(e);
        }
    }
    let paused_secs = t0.elapsed().as_secs_f64();
    if !suspend {
        // A snapshot: the guest goes on while its saved copy uploads.
        resume_guest(&vm).await;
    }
    let r = upload_image(ctx, &mut up, id, &req.name, &parent, &captured).await;
    let _ = std::fs::remove_file(&captured.state_path);
    if let Some(p) = &captured.ram_path {
        let _ = std::fs::remove_file(p);
    }
    let (manifest, new_chunks, uploaded) = match r {
        Ok(v) => v,
        Err(e) => {
            if suspend {
                resume_guest(&vm).await;
            }
            return Err(e);
        }
    };
    if suspend {
        // Saved: the guest ends here; it resumes from the image (and its volumes from the
        // versions just committed: their overlays have nothing more to commit).
        let _ = vm.kill().await;
        crate::volume::drop_committed(&vm);
    }
    let saved = SavedImage {
        image: manifest.image_ref().to_string(),
        parent: Some(parent.image_ref().to_string()),
        state_bytes: captured.state_bytes,
        disk_chunks_new: new_chunks,
        disk_chunks_total: manifest.disk.chunks.len() as u64,
        uploaded_bytes: uploaded,
        paused_secs,
        total_secs: t0.elapsed().as_secs_f64(),
    };
    tracing::info!(vm = %id, image = %saved.image, state_bytes = saved.state_bytes, new_chunks, uploaded, suspend, "VM saved as an image");
    Ok(saved)
}

/// Pauses the guest, writes its state to a file and composes the touched disk chunks.
/// The guest stays paused.
async fn capture(ctx: &HostCtx, vm: &Vm, parent: &Manifest) -> Result<Captured, AgentError> {
    let id = vm.id().to_string();
    let fail = |cause: String| AgentError::from(SaveError::Save { id: id.clone(), cause });
    let state_path = vm.runtime_dir().join(SAVE_FILE);
    let machine = current_machine(vm).await;
    let state_bytes = vm.save_state_with(&state_path, SAVE_TIMEOUT, true).await?;
    // A shared RAM file was left out of the stream: copy its non-zero pages while the
    // guest is paused (a snapshot's guest runs on while they upload).
    let ram_path = match &vm.spec().ram {
        crate::ram::RamBacking::Shared { path } if vm.ram_saved_apart() => {
            let ram_dir = path.parent().unwrap_or(Path::new("/"));
            let dst = vm.runtime_dir().join(RAM_SAVE_FILE);
            let t = Instant::now();
            let src = crate::ram::open_shared(vm.pid(), ram_dir).map_err(|e| fail(format!("the guest's RAM: {e}")))?;
            let size = vm.spec().config.memory_mib << 20;
            let data = tokio::task::block_in_place(|| crate::ram::copy_sparse(&src, &dst, size))
                .map_err(|e| fail(format!("copying the guest's RAM to {}: {e}", dst.display())))?;
            tracing::info!(vm = %id, data, took_ms = t.elapsed().as_millis() as u64, "guest RAM copied for saving");
            Some(dst)
        }
        _ => None,
    };
    // The migration flushed the guest's writes to the overlay; read it while paused.
    let touched = compose_touched(ctx, &vm.overlay_path(), parent).await.map_err(fail)?;
    let spec = vm.spec();
    Ok(Captured {
        state_path,
        state_bytes,
        ram_path,
        touched,
        machine,
        cpus: spec.config.cpus,
        memory_mib: spec.config.memory_mib,
        accel: vm.accel().as_str().to_string(),
    })
}

/// Uploads the state and the new disk chunks in session `up`, then commits the manifest.
/// Returns it, the number of changed disk chunks and the bytes sent.
async fn upload_image(
    ctx: &HostCtx,
    up: &mut Upload,
    id: &str,
    name: &str,
    parent: &Manifest,
    cap: &Captured,
) -> Result<(Manifest, u64, u64), AgentError> {
    let fail = |cause: String| AgentError::from(SaveError::Upload { id: id.to_string(), image: name.to_string(), cause });
    let r = upload_session(ctx, up, name, parent, cap).await;
    match r {
        Ok(v) => Ok(v),
        Err(cause) => {
            up.abort().await;
            Err(fail(cause))
        }
    }
}

async fn upload_session(
    ctx: &HostCtx,
    up: &mut Upload,
    name: &str,
    parent: &Manifest,
    cap: &Captured,
) -> Result<(Manifest, u64, u64), String> {
    let cs = parent.chunk_size;
    // The disk: the parent's chunk list with the touched chunks replaced.
    let mut disk = parent.disk.clone();
    let indices: Vec<u64> = cap.touched.keys().copied().collect();
    let mut new_chunks = 0;
    for batch in indices.chunks(UPLOAD_BATCH) {
        let data: Vec<Vec<u8>> = batch.iter().map(|i| cap.touched[i].clone()).collect();
        let enc = encode_all(data).await;
        for (i, e) in batch.iter().zip(&enc) {
            let h = e.as_ref().map(|(h, _)| *h);
            if disk.chunks[*i as usize] != h {
                new_chunks += 1;
            }
            disk.chunks[*i as usize] = h;
        }
        let present: Vec<(ChunkHash, Bytes)> = enc.into_iter().flatten().collect();
        up.send(&present).await?;
    }
    // The state, and the RAM saved apart from it.
    let state = upload_file(up, &cap.state_path, cap.state_bytes, cs).await?;
    let ram = match &cap.ram_path {
        Some(p) => Some(SavedRam { chunk_size: RAM_CHUNK_SIZE, blob: upload_file(up, p, cap.memory_mib << 20, RAM_CHUNK_SIZE).await? }),
        None => None,
    };
    // Chunks of the parent this server lacks (the parent may live on another server):
    // read them through the cache and send them too.
    let mut wanted: HashMap<ChunkHash, (&Blob, usize)> = HashMap::new();
    for b in parent_blobs(parent) {
        for (idx, c) in b.chunks.iter().enumerate() {
            if let Some(h) = c {
                wanted.entry(*h).or_insert((b, idx));
            }
        }
    }
    let hashes: Vec<ChunkHash> = wanted.keys().copied().filter(|h| !up.sent(h)).collect();
    for batch in hashes.chunks(1024) {
        let missing = up.client.missing(&up.id, batch).await.map_err(|e| e.to_string())?;
        for h in missing {
            let (b, idx) = wanted[&h];
            let one = Blob { size: b.chunk_len(cs, idx) as u64, chunks: vec![Some(h)] };
            let data = ctx.proxy().read_blob(parent, &one).await.map_err(|e| e.to_string())?;
            let enc = encode_all(vec![data]).await;
            let present: Vec<(ChunkHash, Bytes)> = enc.into_iter().flatten().collect();
            up.send(&present).await?;
        }
    }
    let meta = StateMeta {
        qemu_version: ctx.qemu_version().to_string(),
        machine: cap.machine.clone(),
        cpus: cap.cpus,
        memory_mib: cap.memory_mib,
        accel: cap.accel.clone(),
        saved: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        loader_roms: state_loader_roms(&cap.state_path, cs),
    };
    let m = Manifest {
        schema: vgrid_api::manifest::SCHEMA_VERSION,
        name: name.to_string(),
        version: 0,
        created: 0,
        chunk_size: cs,
        disk,
        meta: parent.meta.clone(),
        parent: Some(parent.image_ref()),
        state: Some(SavedState { blob: state, meta, ram }),
    };
    let m = up.client.commit(&up.id, &m).await.map_err(|e| format!("commit: {e}"))?;
    Ok((m, new_chunks, up.sent_bytes))
}

/// The kernel loader ROMs of the saved state at `path`, from its first `cs` bytes (where a
/// restore would look for them, see [`crate::restore::loader_roms`]); `None` if that is no
/// QEMU migration stream or cannot be read.
fn state_loader_roms(path: &Path, cs: u32) -> Option<Vec<String>> {
    let file = crate::qemu_user::open_file(path).ok()?;
    let len = file.metadata().ok()?.len().min(cs as u64) as usize;
    let mut head = vec![0u8; len];
    file.read_exact_at(&mut head, 0).ok()?;
    crate::restore::stream_loader_roms(&head)
}

/// Uploads the file at `path` (`size` bytes) as a blob of `cs`-byte chunks, in batches;
/// all-zero chunks are not sent.
async fn upload_file(up: &mut Upload, path: &Path, size: u64, cs: u32) -> Result<Blob, String> {
    let file = crate::qemu_user::open_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let n = size.div_ceil(cs as u64);
    let mut blob = Blob { size, chunks: Vec::with_capacity(n as usize) };
    let mut i = 0u64;
    while i < n {
        let end = (i + UPLOAD_BATCH as u64).min(n);
        let mut data = Vec::new();
        for j in i..end {
            let len = state_chunk_len(size, cs, j);
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, j * cs as u64).map_err(|e| format!("{}: {e}", path.display()))?;
            data.push(buf);
        }
        let enc = encode_all(data).await;
        blob.chunks.extend(enc.iter().map(|e| e.as_ref().map(|(h, _)| *h)));
        let present: Vec<(ChunkHash, Bytes)> = enc.into_iter().flatten().collect();
        up.send(&present).await?;
        i = end;
    }
    Ok(blob)
}

/// Length of chunk `j` of a blob of `size` bytes.
fn state_chunk_len(size: u64, cs: u32, j: u64) -> usize {
    (size - j * cs as u64).min(cs as u64) as usize
}

fn parent_blobs(m: &Manifest) -> Vec<&Blob> {
    let mut v = vec![&m.disk];
    if let vgrid_api::Boot::Kernel { kernel, initrd, .. } = &m.meta.boot {
        v.push(kernel);
        v.extend(initrd.iter());
    }
    v
}

/// Continues a guest paused for saving (a failure is only logged: the caller reports the
/// save error).
async fn resume_guest(vm: &Vm) {
    if let Err(e) = vm.cont().await {
        tracing::error!(vm = %vm.id(), "cannot resume the guest after saving: {e}");
    }
}

/// The versioned machine type `pc` resolves to in this QEMU (what the state needs).
async fn current_machine(vm: &Vm) -> String {
    let Ok(v) = vm.execute("query-machines", None).await else { return "pc".into() };
    v.as_array()
        .into_iter()
        .flatten()
        .find(|m| m.get("alias").and_then(|a| a.as_str()) == Some("pc"))
        .and_then(|m| m.get("name").and_then(|n| n.as_str()))
        .unwrap_or("pc")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_state_records_its_loader_roms_for_the_manifest() {
        let d = tempfile::tempdir().unwrap();
        let mut s = b"QEVM\x00\x00\x00\x03".to_vec();
        for name in ["pc.ram", "/rom@genroms/linuxboot_dma.bin"] {
            s.push(name.len() as u8);
            s.extend_from_slice(name.as_bytes());
            s.extend_from_slice(&65536u64.to_be_bytes());
        }
        let state = d.path().join("state");
        std::fs::write(&state, &s).unwrap();
        assert_eq!(state_loader_roms(&state, 256 * 1024), Some(vec!["linuxboot_dma.bin".to_string()]));
        // A firmware boot's stream: recorded as none. Not a QEMU stream, or no file: unknown.
        std::fs::write(&state, b"QEVM\x00\x00\x00\x03\x06pc.ram").unwrap();
        assert_eq!(state_loader_roms(&state, 256 * 1024), Some(vec![]));
        std::fs::write(&state, b"not a stream").unwrap();
        assert_eq!(state_loader_roms(&state, 256 * 1024), None);
        assert_eq!(state_loader_roms(&d.path().join("missing"), 256 * 1024), None);
    }
}
