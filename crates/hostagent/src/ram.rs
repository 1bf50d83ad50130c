//! Guest RAM as a file, so that a saved guest's memory can be an image like its disk.
//!
//! - **Shared** (how guests run when the host has a tmpfs, `/dev/shm`): QEMU maps its RAM from
//!   a file there (`memory-backend-file,share=on`), which the agent unlinks as soon as QEMU
//!   holds it (the memory goes with QEMU, whatever happens to the agent). Saving such a guest
//!   writes only the devices' state into the migration stream (QEMU's `x-ignore-shared`); the
//!   agent reads the RAM from QEMU's descriptor and stores it as chunks of its own blob, zero
//!   pages not at all ([`copy_sparse`]).
//! - **Lazy** (a guest restored from such a save): QEMU maps the saved RAM privately
//!   (copy-on-write) from a read-only file that `qemu-storage-daemon` serves through FUSE from
//!   the block proxy's `IMAGE@VERSION/ram` export. A page comes over the network when the guest
//!   first touches it; the guest runs long before its memory has arrived. The pager is its own
//!   process: like QEMU's NBD disk it outlives an agent restart and reconnects to the proxy.
//! - **Anonymous**: plain `-m` memory (no tmpfs); saves carry the RAM in the stream.

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How a guest's RAM is backed (recorded in its spec).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RamBacking {
    /// Anonymous memory (`-m`).
    #[default]
    Anonymous,
    /// A shared file on tmpfs, unlinked once QEMU has opened it.
    Shared { path: PathBuf },
    /// A private mapping of `path`, a FUSE file the pager serves from the proxy's `export`.
    Lazy { path: PathBuf, export: String },
}

impl RamBacking {
    /// QEMU arguments for `memory_mib` of RAM backed this way (besides `-m`).
    pub fn qemu_args(&self, memory_mib: u64) -> Vec<String> {
        let q = |p: &Path| p.display().to_string().replace(',', ",,");
        let object = match self {
            RamBacking::Anonymous => return vec![],
            RamBacking::Shared { path } => format!("memory-backend-file,id={RAM_ID},size={memory_mib}M,mem-path={},share=on", q(path)),
            RamBacking::Lazy { path, .. } => {
                format!("memory-backend-file,id={RAM_ID},size={memory_mib}M,mem-path={},share=off,readonly=on,rom=off", q(path))
            }
        };
        vec!["-object".into(), object]
    }

    /// The `-machine` option naming the backend (empty for anonymous memory).
    pub fn machine_option(&self) -> &'static str {
        match self {
            RamBacking::Anonymous => "",
            _ => ",memory-backend=pc.ram",
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            RamBacking::Anonymous => "anonymous",
            RamBacking::Shared { .. } => "shared",
            RamBacking::Lazy { .. } => "lazy",
        }
    }
}

/// The backend's id, which is also its RAM block's name in migration streams: the name QEMU
/// gives the RAM of a `pc` machine with plain `-m`, so states move between both kinds.
const RAM_ID: &str = "pc.ram";
/// Page size of the RAM image (x86).
pub const PAGE: usize = 4096;
/// The pager's read-only RAM file in a runtime directory (a FUSE mount point).
pub const LAZY_FILE: &str = "ram.img";
/// KiB a page fault on the pager's file reads around the faulting page: none at first (the
/// pages a restored guest touches first are recorded, and later served, page by page as the
/// image's hot pages), about half a RAM chunk once the host fetches the rest of the RAM.
const FAULT_READAHEAD_KB: [u32; 2] = [0, 32];
/// When the readahead grows: with the block proxy's background fetch of a saved RAM.
const READAHEAD_GROWS_AFTER: Duration = Duration::from_secs(3);
/// The pager's pid, in the runtime directory.
const PAGER_PID: &str = "pager.pid";
/// Filesystem magic numbers (statfs `f_type`).
const TMPFS_MAGIC: i64 = 0x0102_1994;
const FUSE_MAGIC: i64 = 0x6573_5546;

/// Where shared RAM files go: `$VGRID_RAM_DIR` (`none` disables them), else `/dev/shm/vgrid`
/// when `/dev/shm` is a tmpfs. `None`: guests get anonymous memory.
pub fn default_ram_dir() -> Option<PathBuf> {
    match std::env::var_os("VGRID_RAM_DIR") {
        Some(v) if v == "none" || v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => (fs_type(Path::new("/dev/shm")) == Some(TMPFS_MAGIC)).then(|| PathBuf::from("/dev/shm/vgrid")),
    }
}

// The type of `f_type` differs between platforms (i64 here).
#[allow(clippy::unnecessary_cast)]
fn fs_type(p: &Path) -> Option<i64> {
    nix::sys::statfs::statfs(p).ok().map(|s| s.filesystem_type().0 as i64)
}

/// The pager binary: `$VGRID_QEMU_STORAGE_DAEMON`, else `qemu-storage-daemon` on PATH.
pub fn pager_binary() -> PathBuf {
    std::env::var_os("VGRID_QEMU_STORAGE_DAEMON").map(PathBuf::from).unwrap_or_else(|| "qemu-storage-daemon".into())
}

/// Whether this host can page RAM lazily: a FUSE device and the pager binary.
pub fn lazy_supported() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        let fuse = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse").is_ok();
        let pager = std::process::Command::new(pager_binary())
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !fuse || !pager {
            tracing::info!(
                fuse,
                pager,
                "no lazy RAM restore on this host (needs /dev/fuse and qemu-storage-daemon): warm images load eagerly"
            );
        }
        fuse && pager
    })
}

/// Makes a fresh, empty RAM file for VM `id` in `ram_dir` (mode 0600, owned by `owner` when
/// given); QEMU sizes it. The directory is the agent's (0711: QEMU may open, not list).
pub fn create_shared(ram_dir: &Path, id: &str, owner: Option<(u32, u32)>) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(ram_dir)?;
    std::fs::set_permissions(ram_dir, std::fs::Permissions::from_mode(0o711))?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let path = ram_dir.join(format!("{id}.{}.{nanos:x}.ram", std::process::id()));
    let f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&path)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
    }
    Ok(path)
}

/// Opens the shared RAM file QEMU `pid` maps (found among its descriptors: a `.ram` file of
/// `ram_dir`, unlinked or not).
pub fn open_shared(pid: u32, ram_dir: &Path) -> std::io::Result<std::fs::File> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?;
    for fd in fds.flatten() {
        let Ok(link) = std::fs::read_link(fd.path()) else { continue };
        let s = link.to_string_lossy();
        let name = s.strip_suffix(" (deleted)").unwrap_or(&s);
        let p = Path::new(name);
        if p.parent() == Some(ram_dir) && name.ends_with(".ram") {
            return std::fs::File::open(fd.path());
        }
    }
    Err(std::io::Error::other(format!("QEMU {pid} holds no RAM file of {}", ram_dir.display())))
}

/// Copies `src` (a RAM file of `size` bytes) into a new sparse file `dst`, leaving out holes
/// and all-zero pages. Returns the bytes of non-zero pages written.
pub fn copy_sparse(src: &std::fs::File, dst: &Path, size: u64) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let _ = std::fs::remove_file(dst);
    let out = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(dst)?;
    out.set_len(size)?;
    const BUF: usize = 1 << 20;
    let mut buf = vec![0u8; BUF];
    let mut written = 0u64;
    let mut off = 0u64;
    while off < size {
        // Skip the holes of the tmpfs file (never touched pages).
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(src.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole is left
        }
        off = data as u64;
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), off as libc::off_t, libc::SEEK_HOLE) };
        let end = if hole < 0 { size } else { (hole as u64).min(size) };
        while off < end {
            let n = ((end - off) as usize).min(BUF);
            src.read_exact_at(&mut buf[..n], off)?;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    out.write_all_at(page, off + (i * PAGE) as u64)?;
                    written += page.len() as u64;
                }
            }
            off += n as u64;
        }
    }
    Ok(written)
}

/// Makes `cmd` (QEMU of a lazily restored guest) ignore its own `madvise(MADV_HUGEPAGE)` on
/// guest RAM: on a file mapping that advice makes every page fault read two 2 MiB folios
/// ahead (the kernel's THP readahead), which fetched two thirds of a guest's saved RAM before
/// it answered. Without it a fault reads the file's readahead window (128 KiB). A seccomp
/// filter installed before exec returns success for that one call; everything else passes.
pub fn ignore_hugepage_advice(cmd: &mut tokio::process::Command) {
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
    #[cfg(target_arch = "x86_64")]
    const NR_MADVISE: u32 = 28;
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xc000_00b7; // AUDIT_ARCH_AARCH64
    #[cfg(target_arch = "aarch64")]
    const NR_MADVISE: u32 = 233;
    const MADV_HUGEPAGE: u32 = 14;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_ERRNO_0: u32 = 0x0005_0000;
    let stmt = |code: u16, k: u32| libc::sock_filter { code, jt: 0, jf: 0, k };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter { code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16, jt, jf, k };
    let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    // seccomp_data: nr @0, arch @4, args[i] @16 + 8 i (low half first on little-endian).
    let filter: Vec<libc::sock_filter> = vec![
        stmt(ld, 4),
        jeq(ARCH, 0, 4),
        stmt(ld, 0),
        jeq(NR_MADVISE, 0, 2),
        stmt(ld, 16 + 2 * 8),
        jeq(MADV_HUGEPAGE, 1, 0),
        stmt(ret, RET_ALLOW),
        stmt(ret, RET_ERRNO_0),
    ];
    // SAFETY: runs in the forked child before exec; two prctl calls on the filter the
    // closure owns (prepared before the fork); no allocation.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut libc::sock_filter };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const libc::sock_fprog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The pager of a lazily restored guest: `qemu-storage-daemon` exporting the NBD export
/// `export` of the proxy at `nbd_socket` as the read-only file `DIR/ram.img` (FUSE), which
/// QEMU (as `owner`) maps. Returns once the file is mounted with `size` bytes.
pub async fn start_pager(dir: &Path, nbd_socket: &Path, export: &str, size: u64, owner: Option<(u32, u32)>) -> Result<PathBuf, String> {
    let file = dir.join(LAZY_FILE);
    stop_pager(dir).await;
    let _ = std::fs::remove_file(&file);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&file)
        .map_err(|e| format!("creating {}: {e}", file.display()))?;
    let q = |p: &Path| p.display().to_string().replace(',', ",,");
    let log = std::fs::File::create(dir.join("pager.log")).map_err(|e| format!("pager log: {e}"))?;
    let log2 = log.try_clone().map_err(|e| format!("pager log: {e}"))?;
    let mut cmd = tokio::process::Command::new(pager_binary());
    cmd.arg("--blockdev")
        .arg(format!(
            // A long reconnect delay: while the agent restarts, a guest touching a page not
            // yet here waits for it instead of failing.
            "driver=nbd,node-name=ram,server.type=unix,server.path={},export={},read-only=on,reconnect-delay={}",
            q(nbd_socket),
            export.replace(',', ",,"),
            crate::qemu::NBD_RECONNECT_DELAY_S
        ))
        .arg("--export")
        .arg(format!("type=fuse,id=ram,node-name=ram,mountpoint={},writable=off,allow-other=on", q(&file)))
        .arg("--pidfile")
        .arg(dir.join(PAGER_PID))
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(false)
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| format!("starting {}: {e}", pager_binary().display()))?;
    let t0 = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("pager.log")).unwrap_or_default();
            return Err(format!("the pager exited ({st}): {}", log.trim()));
        }
        let mounted = fs_type(&file) == Some(FUSE_MAGIC);
        if mounted && std::fs::metadata(&file).is_ok_and(|m| m.len() == size) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.start_kill();
            return Err(format!("the pager did not mount {} within 20 s", file.display()));
        }
        // A statfs and a stat a try: cheap next to the pager's ~15 ms start, on its path.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The pager is not our child in spirit: it lives as long as the guest does (reaped here
    // if it ends while this agent runs).
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(&file, Some(uid), Some(gid)).map_err(|e| format!("handing {} to QEMU's user: {e}", file.display()))?;
    }
    // What a page fault reads around it (not the default 128 KiB): see FAULT_READAHEAD_KB.
    if let Ok(m) = std::fs::metadata(&file) {
        use std::os::unix::fs::MetadataExt;
        let (major, minor) = (libc::major(m.dev()), libc::minor(m.dev()));
        let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
        let set = move |kb: u32| {
            if let Err(e) = std::fs::write(&knob, kb.to_string()) {
                tracing::debug!(knob, "cannot set the pager's readahead: {e}");
            }
        };
        set(FAULT_READAHEAD_KB[0]);
        tokio::spawn(async move {
            tokio::time::sleep(READAHEAD_GROWS_AFTER).await;
            set(FAULT_READAHEAD_KB[1]);
        });
    }
    tracing::debug!(dir = %dir.display(), export, took_ms = t0.elapsed().as_millis() as u64, "RAM pager mounted");
    Ok(file)
}

/// Pages a run of [`prefetch_pages`] reads at most (one FUSE read request: 128 KiB).
const PREFETCH_RUN_PAGES: u64 = 32;

/// Reads pages `pages` (numbers of `page`-byte pages, in the order they are wanted) of a
/// pager file into the page cache, without waiting for them (`POSIX_FADV_WILLNEED`, runs of
/// consecutive pages merged). A guest's fault on such a page then maps it from the cache
/// instead of asking the pager (measured ~45 us a page through FUSE, ~0.5 us from the cache).
///
/// Only useful once QEMU has opened the file: the pager's FUSE export drops the file's cache
/// at every open. Returns the number of runs asked for.
pub fn prefetch_pages(file: &Path, page: u64, pages: &[u64]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(file)?;
    let mut runs = 0;
    let mut i = 0;
    while i < pages.len() {
        let first = pages[i];
        let mut n = 1;
        while i + (n as usize) < pages.len() && n < PREFETCH_RUN_PAGES && pages[i + n as usize] == first + n {
            n += 1;
        }
        // SAFETY: an advice on a descriptor we own; no memory is passed.
        let r = unsafe {
            libc::posix_fadvise(f.as_raw_fd(), (first * page) as libc::off_t, (n * page) as libc::off_t, libc::POSIX_FADV_WILLNEED)
        };
        if r != 0 {
            return Err(std::io::Error::from_raw_os_error(r));
        }
        runs += 1;
        i += n as usize;
    }
    Ok(runs)
}

/// Drops the page cache of lazily restored guests' pager files that no mapping uses any more.
///
/// A guest's first write to a page of its privately mapped RAM copies the page out of the
/// pager file's page cache, which stays behind, clean and unused, and counts in the VM's
/// memory cgroup a second time (measured: 123 MB of cache beside 140 MB of guest memory after
/// the guest wrote 120 MB). `POSIX_FADV_DONTNEED` drops such unmapped pages; pages still mapped
/// stay, and a dropped page the guest reads again comes back from the pager (the host cache).
/// `files` keeps each VM's pager file open between calls (an open on FUSE asks the pager; a
/// drop does not); `lazy` lists the lazily restored VMs (id, runtime directory) now.
pub async fn trim_page_cache(files: &mut HashMap<String, std::fs::File>, lazy: &[(String, PathBuf)]) {
    files.retain(|id, _| lazy.iter().any(|(l, _)| l == id));
    for (id, dir) in lazy {
        if !files.contains_key(id) {
            let path = dir.join(LAZY_FILE);
            let open = tokio::task::spawn_blocking(move || std::fs::File::open(path));
            match tokio::time::timeout(Duration::from_secs(2), open).await {
                Ok(Ok(Ok(f))) => {
                    files.insert(id.clone(), f);
                }
                Ok(Ok(Err(e))) => tracing::debug!(vm = %id, "cannot open the pager file: {e}"),
                _ => tracing::debug!(vm = %id, "opening the pager file did not finish in 2 s"),
            }
        }
    }
    for (id, f) in files.iter() {
        use std::os::fd::AsRawFd;
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if r != 0 {
            tracing::debug!(vm = %id, "dropping the pager file's unused cache: error {r}");
        }
    }
}

/// The pager's pid, if the pid file names a live pager of this directory.
fn pager_pid(dir: &Path) -> Option<i32> {
    let text = crate::qemu_user::read_file(&dir.join(PAGER_PID)).ok()?;
    let pid: i32 = String::from_utf8_lossy(&text).trim().parse().ok()?;
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let needle = dir.join(LAZY_FILE).display().to_string().replace(',', ",,");
    String::from_utf8_lossy(&cmd).contains(&needle).then_some(pid)
}

/// Whether a pager serves this runtime directory.
pub fn pager_running(dir: &Path) -> bool {
    pager_pid(dir).is_some()
}

/// Stops the pager of a runtime directory (its guest has ended) and unmounts its file.
pub async fn stop_pager(dir: &Path) {
    if let Some(pid) = pager_pid(dir) {
        let p = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..100 {
            if nix::sys::signal::kill(p, None).is_err() || !pager_running(dir) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if pager_running(dir) {
            let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
        }
    }
    let file = dir.join(LAZY_FILE);
    if fs_type(&file) == Some(FUSE_MAGIC) {
        if let Ok(c) = std::ffi::CString::new(file.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid NUL-terminated path; MNT_DETACH never blocks on the mount.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn qemu_args_per_backing() {
        assert!(RamBacking::Anonymous.qemu_args(256).is_empty());
        assert_eq!(RamBacking::Anonymous.machine_option(), "");
        let s = RamBacking::Shared { path: "/dev/shm/vgrid/a,b.ram".into() }.qemu_args(256).join(" ");
        assert_eq!(s, "-object memory-backend-file,id=pc.ram,size=256M,mem-path=/dev/shm/vgrid/a,,b.ram,share=on");
        let l = RamBacking::Lazy { path: "/r/ram.img".into(), export: "w@1/ram".into() }.qemu_args(64).join(" ");
        assert!(l.contains("mem-path=/r/ram.img,share=off,readonly=on,rom=off"), "{l}");
        assert_eq!(RamBacking::Lazy { path: "/r".into(), export: String::new() }.machine_option(), ",memory-backend=pc.ram");
    }

    #[test]
    fn old_specs_have_anonymous_ram() {
        let b: RamBacking = serde_json::from_str(r#"{"kind":"shared","path":"/x"}"#).unwrap();
        assert_eq!(b, RamBacking::Shared { path: "/x".into() });
    }

    #[test]
    fn prefetch_merges_runs_of_consecutive_pages_up_to_a_cap() {
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("ram");
        std::fs::File::create(&f).unwrap().write_all_at(&[1u8; PAGE], 99 * PAGE as u64).unwrap();
        // 3,4,5 | 9 | 8 (not after 9) | 40..80 in runs of 32 and 8.
        let mut pages = vec![3, 4, 5, 9, 8];
        pages.extend(40..80);
        assert_eq!(prefetch_pages(&f, PAGE as u64, &pages).unwrap(), 5);
        assert_eq!(prefetch_pages(&f, PAGE as u64, &[]).unwrap(), 0);
        assert!(prefetch_pages(&d.path().join("missing"), PAGE as u64, &[1]).is_err());
    }

    #[test]
    fn sparse_copy_leaves_out_zero_pages() {
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&src).unwrap();
        f.set_len(64 * PAGE as u64).unwrap();
        f.write_all_at(&[7u8; PAGE], 3 * PAGE as u64).unwrap();
        f.write_all_at(&[0u8; PAGE], 5 * PAGE as u64).unwrap(); // written, but zero
        f.write_all_at(b"tail", 64 * PAGE as u64 - 4).unwrap();
        let dst = d.path().join("dst");
        let n = copy_sparse(&f, &dst, 64 * PAGE as u64).unwrap();
        assert_eq!(n, 2 * PAGE as u64);
        assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 <= 4 * PAGE as u64, "the copy is sparse");
    }
}
