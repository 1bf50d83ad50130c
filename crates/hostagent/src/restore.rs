//! Starting a guest from a warm image ([`crate::save`]) instead of booting it: the kernel
//! loader ROMs its saved state holds, the state streamed into QEMU's `-incoming` through the
//! host cache, and the guest's RAM when it was saved apart (paged in lazily, or loaded into a
//! shared RAM file).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use vgrid_api::{Blob, Manifest, SavedRam};

use crate::ctx::HostCtx;
use crate::error::{AgentError, RestoreError};
use crate::vm::Vm;

/// Option ROMs QEMU adds for a direct kernel boot (x86): a state saved from such a boot has
/// one of them as a RAM block, `/rom@genroms/NAME`.
const LOADER_ROMS: [&str; 5] = ["linuxboot_dma.bin", "linuxboot.bin", "multiboot_dma.bin", "multiboot.bin", "pvh.bin"];

/// The kernel loader ROMs among the RAM blocks of a QEMU migration stream that begins with
/// `head` (the RAM section lists each block as a length byte, its name and its size).
pub fn loader_roms(head: &[u8]) -> Vec<String> {
    const PREFIX: &[u8] = b"/rom@genroms/";
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(p) = head[i..].windows(PREFIX.len()).position(|w| w == PREFIX) {
        let at = i + p;
        i = at + PREFIX.len();
        let Some(&len) = at.checked_sub(1).and_then(|j| head.get(j)) else { continue };
        let Some(name) = head.get(at..at + len as usize).and_then(|n| n.strip_prefix(PREFIX)) else { continue };
        let name = String::from_utf8_lossy(name).into_owned();
        if LOADER_ROMS.contains(&name.as_str()) && !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// For a warm image of a direct kernel boot: the loader ROMs its saved state has as RAM blocks
/// (QEMU 10's `pc` machine has none: its kernel loader ROM is not migrated): as the manifest
/// records them, else read from the state's first chunk (through the host cache, where the
/// restore finds it again). `None`
/// (the boot files are fetched after all) when that chunk cannot be read or is no QEMU
/// migration stream.
pub(crate) async fn state_loader_roms(ctx: &HostCtx, manifest: &Manifest, state: &Blob) -> Option<Vec<String>> {
    if let Some(roms) = manifest.state.as_ref().and_then(|s| s.meta.loader_roms.clone()) {
        return Some(roms);
    }
    let first = state.chunks.first()?.as_ref()?;
    let one = Blob { size: state.size.min(manifest.chunk_size as u64), chunks: vec![Some(*first)] };
    stream_loader_roms(&ctx.proxy().read_blob(manifest, &one).await.ok()?)
}

/// [`loader_roms`] of `head` if it begins a QEMU migration stream, `None` otherwise.
pub(crate) fn stream_loader_roms(head: &[u8]) -> Option<Vec<String>> {
    head.starts_with(b"QEVM").then(|| loader_roms(head))
}

/// Chunks of the state fetched per request batch while streaming it into QEMU.
const STREAM_BATCH: usize = 8;
/// Batches fetched ahead of the one QEMU is reading (with [`STREAM_BATCH`] chunks of the
/// default 256 KiB: 16 MiB in flight at most).
const STREAM_AHEAD: usize = 8;
/// The socket QEMU reads a streamed state from (in the runtime directory; removed once used).
const INCOMING_SOCKET: &str = "state.sock";

/// A warm image's state on its way into QEMU: batches of its bytes, in order, fetched through
/// the host cache ahead of QEMU by a background task that starts before QEMU does.
pub(crate) struct IncomingState {
    image: String,
    size: u64,
    /// The guest's RAM is not in the stream (saved apart).
    ram_apart: bool,
    batches: tokio::sync::mpsc::Receiver<Result<Vec<u8>, AgentError>>,
    fetcher: tokio::task::JoinHandle<()>,
    /// True once the fetcher has filled the batches ahead of QEMU; closed once it has ended
    /// (every batch fetched, or a fetch failed): either ends a wait for it.
    fetched: tokio::sync::watch::Receiver<bool>,
}

impl Drop for IncomingState {
    fn drop(&mut self) {
        self.fetcher.abort();
    }
}

/// For a launch of a warm image: checks that this host and request can load its state and
/// starts fetching it through the host cache ([`STREAM_AHEAD`] batches of [`STREAM_BATCH`]
/// chunks concurrently, handed over in order). `None` for an image without state.
pub(crate) fn prepare_incoming(
    ctx: &HostCtx,
    id: &str,
    manifest: &std::sync::Arc<Manifest>,
    cpus: u32,
    memory_mib: u64,
    accel: crate::Accel,
) -> Result<Option<IncomingState>, AgentError> {
    let Some(st) = &manifest.state else { return Ok(None) };
    let fail = |cause: String| AgentError::from(RestoreError { id: id.to_string(), image: manifest.image_ref().to_string(), cause });
    if let Some(why) = st.meta.incompatibility(cpus, memory_mib, ctx.qemu_version()) {
        return Err(fail(why));
    }
    if !st.meta.accel.is_empty() && st.meta.accel != accel.as_str() {
        return Err(fail(format!("the state was saved under {} and this host runs guests under {}", st.meta.accel, accel.as_str())));
    }
    let cs = manifest.chunk_size as u64;
    let blob = st.blob.clone();
    let parts: Vec<Blob> = (0..blob.chunks.len())
        .step_by(STREAM_BATCH)
        .map(|i| {
            let end = (i + STREAM_BATCH).min(blob.chunks.len());
            let start = i as u64 * cs;
            Blob { size: (blob.size - start).min((end - i) as u64 * cs), chunks: blob.chunks[i..end].to_vec() }
        })
        .collect();
    let (tx, rx) = tokio::sync::mpsc::channel(STREAM_AHEAD);
    let (done_tx, fetched) = tokio::sync::watch::channel(false);
    let proxy = ctx.proxy().clone();
    let m = manifest.clone();
    let fetcher = tokio::spawn(async move {
        use futures::StreamExt;
        let mut batches = futures::stream::iter(parts)
            .map(|part| {
                let (proxy, m) = (proxy.clone(), m.clone());
                async move { proxy.read_blob(&m, &part).await.map_err(AgentError::from) }
            })
            .buffered(STREAM_AHEAD);
        while let Some(b) = batches.next().await {
            let stop = b.is_err();
            if tx.capacity() == 0 {
                // As much as may wait for QEMU is here (a large state streams as QEMU reads).
                let _ = done_tx.send(true);
            }
            if tx.send(b).await.is_err() || stop {
                return;
            }
        }
    });
    Ok(Some(IncomingState {
        image: manifest.image_ref().to_string(),
        size: blob.size,
        ram_apart: st.ram.is_some(),
        batches: rx,
        fetcher,
        fetched,
    }))
}

/// Feeds a state into `vm` (started with `-incoming defer`) while it arrives: QEMU listens on
/// a unix socket in the runtime directory (`migrate-incoming`), the batches are written to it
/// in order, then the guest is resumed once QEMU has loaded everything.
pub(crate) async fn stream_incoming(vm: &Vm, mut st: IncomingState, timeout: Duration) -> Result<(), AgentError> {
    use tokio::io::AsyncWriteExt;
    let id = vm.id().to_string();
    let fail = |cause: String| AgentError::from(RestoreError { id: id.clone(), image: st.image.clone(), cause });
    let sock = vm.runtime_dir().join(INCOMING_SOCKET);
    let _ = std::fs::remove_file(&sock);
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    // A stream without the RAM says so (`x-ignore-shared`), and QEMU must read it that way.
    if st.ram_apart {
        vm.set_ignore_shared(true).await.map_err(|e| fail(format!("x-ignore-shared: {e}")))?;
    }
    vm.execute("migrate-incoming", Some(serde_json::json!({"uri": format!("unix:{}", sock.display())})))
        .await
        .map_err(|e| fail(format!("migrate-incoming: {e}")))?;
    let mut conn = None;
    for _ in 0..200 {
        match tokio::net::UnixStream::connect(&sock).await {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let _ = std::fs::remove_file(&sock);
    let mut conn = conn.ok_or_else(|| fail(format!("QEMU does not listen on {}", sock.display())))?;
    let mut sent = 0u64;
    let qemu_gone = |e: std::io::Error, sent: u64| {
        let detail = loaded_error(vm);
        fail(format!("QEMU stopped reading the state after {sent} bytes ({e}){detail}"))
    };
    loop {
        let next = tokio::time::timeout_at(deadline, st.batches.recv()).await.map_err(|_| fail(format!("not loaded after {timeout:?}")))?;
        match next {
            Some(Ok(data)) => {
                tokio::time::timeout_at(deadline, conn.write_all(&data))
                    .await
                    .map_err(|_| fail(format!("not loaded after {timeout:?}")))?
                    .map_err(|e| qemu_gone(e, sent))?;
                sent += data.len() as u64;
            }
            Some(Err(e)) => return Err(fail(format!("fetching the state failed after {sent} bytes: {e}"))),
            None => break,
        }
    }
    if sent != st.size {
        return Err(fail(format!("the state stream ended after {sent} of {} bytes", st.size)));
    }
    let _ = conn.shutdown().await;
    let fetched_secs = t0.elapsed().as_secs_f64();
    loop {
        if let Some(exit) = vm.exit_info() {
            return Err(fail(format!("QEMU exited while loading the state ({exit}){}", loaded_error(vm))));
        }
        let status = vm.execute("query-status", None).await?;
        let status = status.get("status").and_then(serde_json::Value::as_str).unwrap_or("").to_string();
        if status != "inmigrate" {
            let mig = vm.execute("query-migrate", None).await?;
            if mig.get("status").and_then(serde_json::Value::as_str) == Some("failed") {
                let desc = mig.get("error-desc").and_then(serde_json::Value::as_str).unwrap_or("no detail");
                return Err(fail(format!("loading the state failed: {desc}")));
            }
            if st.ram_apart {
                // Only for this load: a later live migration of this guest sends its RAM.
                vm.set_ignore_shared(false).await?;
            }
            if status == "paused" || status == "postmigrate" || status == "prelaunch" {
                vm.cont().await?;
            }
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(fail(format!("still loading after {timeout:?}")));
        }
        // QEMU loads a device state (the RAM apart) in 5-20 ms: asked every 1 ms at first,
        // every 5 ms once it takes longer (a state with the RAM in it takes seconds).
        let pause = if t0.elapsed().as_secs_f64() < fetched_secs + 0.1 { 1 } else { 5 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    tracing::info!(vm = %id, image = %st.image, bytes = sent, fetched_secs, total_secs = t0.elapsed().as_secs_f64(),
        "state streamed into QEMU, guest resumed");
    Ok(())
}

/// How a VM restored from `manifest` (a warm image) gets its RAM: for a state saved with its
/// RAM apart, a private mapping of that RAM served lazily by a pager ([`crate::ram`]); where
/// the host has no FUSE or no pager, a shared RAM file filled before QEMU starts. A state with
/// the RAM inside the stream: the host's usual backing.
pub(crate) async fn saved_ram_backing(
    ctx: &HostCtx,
    id: &str,
    manifest: &Manifest,
    dir: &Path,
    opts: &crate::vm::LaunchOptions,
) -> Result<crate::ram::RamBacking, AgentError> {
    use crate::ram::RamBacking;
    let Some(saved) = manifest.state.as_ref().and_then(|s| s.ram.as_ref()) else { return Ok(RamBacking::Anonymous) };
    let ram = &saved.blob;
    let fail = |cause: String| AgentError::from(RestoreError { id: id.to_string(), image: manifest.image_ref().to_string(), cause });
    let owner = opts.run_as.as_ref().map(|u| (u.uid, u.gid));
    if crate::ram::lazy_supported() {
        let export = format!("{}{}", manifest.image_ref(), vgrid_blockproxy::export::RAM_EXPORT_SUFFIX);
        let path = crate::ram::start_pager(dir, ctx.nbd_socket(), &export, ram.size, owner)
            .await
            .map_err(|e| fail(format!("paging its RAM in: {e}")))?;
        return Ok(RamBacking::Lazy { path, export });
    }
    let Some(ram_dir) = &opts.ram_dir else {
        return Err(fail("its RAM was saved apart from its state, and this host has neither FUSE with qemu-storage-daemon (to page it in) nor a tmpfs RAM directory (to load it)".into()));
    };
    let path = crate::ram::create_shared(ram_dir, id, owner).map_err(|e| fail(format!("{}: {e}", ram_dir.display())))?;
    let t = Instant::now();
    if let Err(e) = fill_sparse(ctx, manifest, saved, &path).await {
        let _ = std::fs::remove_file(&path);
        return Err(fail(format!("loading its RAM: {e}")));
    }
    tracing::info!(vm = %id, image = %manifest.image_ref(), took_ms = t.elapsed().as_millis() as u64, "saved RAM loaded (no lazy paging on this host)");
    Ok(RamBacking::Shared { path })
}

/// For a warm image whose RAM is saved apart and paged in lazily here: opens the proxy's
/// export of that RAM at once, which looks up the image's profile, and returns it (to be held
/// until QEMU runs; the pager opens the same export, and the pager and QEMU start while the
/// state is fetched). The hot pages it brings are fetched only once `st`, the state, is in the
/// cache (at most [`STATE_FIRST_WITHIN`]): the bundle is the largest thing a restore fetches
/// (1.06 MB for the sample guest against a 151 KB state); on a congested link it queues ahead
/// of whatever is asked after it, and QEMU needs the state first (measured over the 100 Mbit/s
/// link with both at once: the state stream took 50 ms instead of 15).
/// `None`: nothing to open, or the open failed (the pager's own open then says why).
pub(crate) async fn open_saved_ram(
    ctx: &HostCtx,
    manifest: &Manifest,
    st: &IncomingState,
) -> Option<std::sync::Arc<vgrid_blockproxy::Export>> {
    manifest.state.as_ref()?.ram.as_ref()?;
    if !crate::ram::lazy_supported() {
        return None;
    }
    let mut fetched = st.fetched.clone();
    let hold: vgrid_blockproxy::Hold = Box::pin(async move {
        let _ = tokio::time::timeout(STATE_FIRST_WITHIN, fetched.wait_for(|done| *done)).await;
    });
    let name = format!("{}{}", manifest.image_ref(), vgrid_blockproxy::export::RAM_EXPORT_SUFFIX);
    ctx.proxy().open_export_holding(&name, Some(hold)).await.ok()
}

/// How long a restore holds back its hot pages for its state at most.
const STATE_FIRST_WITHIN: Duration = Duration::from_secs(5);

/// How long the prefetch of hot pages waits for their bundle's table.
const HOT_TABLE_WAIT: Duration = Duration::from_secs(3);

/// For a guest restored with lazily paged RAM: once QEMU has mapped the pager file, reads the
/// pages the image's hot-page bundle announces into that file's page cache, in the
/// background, so the resumed guest's first touches of them are not each a round trip
/// through the pager ([`crate::ram::prefetch_pages`]). Nothing without a bundle.
pub(crate) fn prefetch_hot_pages(ctx: &HostCtx, vm: &Vm, manifest: &Manifest) {
    let crate::ram::RamBacking::Lazy { path, .. } = &vm.spec().ram else { return };
    let (proxy, path, image, id) = (ctx.proxy().clone(), path.clone(), manifest.image_ref(), vm.id().to_string());
    tokio::spawn(async move {
        let Some((page, pages)) = proxy.hot_pages_announced(&image, HOT_TABLE_WAIT).await else { return };
        let t0 = Instant::now();
        let n = pages.len();
        match tokio::task::spawn_blocking(move || crate::ram::prefetch_pages(&path, page, &pages)).await {
            Ok(Ok(runs)) => {
                tracing::debug!(vm = %id, image = %image, pages = n, runs, took_ms = t0.elapsed().as_millis() as u64, "hot pages asked into the RAM file's cache")
            }
            Ok(Err(e)) => tracing::debug!(vm = %id, image = %image, "hot pages not prefetched: {e}"),
            Err(e) => tracing::debug!(vm = %id, "hot pages not prefetched: {e}"),
        }
    });
}

/// Writes the stored chunks of `blob` at their offsets in the file `path` (zero chunks stay
/// holes), fetching through the host cache.
async fn fill_sparse(ctx: &HostCtx, manifest: &Manifest, ram: &SavedRam, path: &Path) -> Result<(), String> {
    use futures::StreamExt;
    let blob = &ram.blob;
    let file = std::fs::OpenOptions::new().write(true).open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    file.set_len(blob.size).map_err(|e| format!("{}: {e}", path.display()))?;
    let cs = ram.chunk_size;
    let stored: Vec<(usize, Blob)> = blob
        .chunks
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.map(|h| (i, Blob { size: blob.chunk_len(cs, i) as u64, chunks: vec![Some(h)] })))
        .collect();
    let proxy = ctx.proxy().clone();
    let m = std::sync::Arc::new(manifest.clone());
    let mut reads = futures::stream::iter(stored)
        .map(move |(i, one)| {
            let (proxy, m) = (proxy.clone(), m.clone());
            async move { (i, proxy.read_blob_chunked(&m, &one, cs).await) }
        })
        .buffer_unordered(STREAM_AHEAD);
    while let Some((i, data)) = reads.next().await {
        let data = data.map_err(|e| e.to_string())?;
        file.write_all_at(&data, i as u64 * cs as u64).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// What QEMU's log says about a failed load (empty when nothing).
fn loaded_error(vm: &Vm) -> String {
    let log = std::fs::read_to_string(vm.runtime_dir().join(crate::runtime::QEMU_LOG)).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(3).collect();
    if tail.is_empty() {
        String::new()
    } else {
        format!("; QEMU says: {}", tail.into_iter().rev().collect::<Vec<_>>().join(" / "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_roms_come_from_the_ram_block_list() {
        // The RAM section of a QEMU 10 stream of a direct kernel boot (names as QEMU writes them:
        // a length byte, the name, the block's size as a big-endian u64).
        let mut s = b"QEVM\x00\x00\x00\x03".to_vec();
        for name in ["pc.ram", "/rom@etc/acpi/tables", "/rom@genroms/linuxboot_dma.bin", "0000:00:03.0/virtio-net-pci.rom"] {
            s.push(name.len() as u8);
            s.extend_from_slice(name.as_bytes());
            s.extend_from_slice(&65536u64.to_be_bytes());
        }
        assert_eq!(loader_roms(&s), vec!["linuxboot_dma.bin".to_string()]);
        // A firmware boot has none; a name cut off at the end of the chunk is ignored.
        assert!(loader_roms(b"\x06pc.ram\x00\x00").is_empty());
        assert!(loader_roms(b"\x1e/rom@genroms/linuxboot_dma.b").is_empty());
    }
}
