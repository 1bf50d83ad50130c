//! Fixtures for tests that boot real guests (this crate's and the workspace's `tests/`):
//! the sample guest built by `scripts/build-sample-guest.sh` and the stock Debian guest built by
//! `scripts/build-debian-guest.sh` (both cached), a machine-wide limit on
//! how many test guests boot at once, and "a timeout and one retry" around every boot.
//! Production code never calls this module.

use crate::spec::{BootSource, DiskSource, VmSpec};
use std::fmt::Display;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// What went wrong preparing a test fixture.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TestkitError {
    #[error("guest script {script}: {detail}")]
    GuestScript { script: PathBuf, detail: String },
    #[error("boot slot lock {path}: {detail}")]
    Slot { path: PathBuf, detail: String },
    #[error("{what}: both boot attempts failed: first: {first}; second: {second}")]
    BootFailed { what: String, first: String, second: String },
}

/// A cached guest's files, as a guest script leaves them (see `scripts/build-sample-guest.sh`
/// and `scripts/build-debian-guest.sh`).
#[derive(Debug, Clone)]
pub struct SampleGuest {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The pristine ext4 disk (the sample's: 64 MiB). Copy it before use; never boot it directly.
    pub disk: PathBuf,
    /// The recommended kernel command line (the sample's ends with `vgrid.mode=shell`).
    pub cmdline: String,
}

/// Console line printed once the guest's init has mounted the disk.
pub const BOOTED_MARKER: &str = "vgrid-sample: booted";
/// Console line the Debian guest prints once systemd has reached multi-user.target.
pub const DEBIAN_BOOTED_MARKER: &str = "vgrid-debian: booted";
/// Console text printed from the disk's `/etc/vgrid-sample`.
pub const DISK_MARKER: &str = "vgrid-sample-disk-ok";
/// The guest shell's prompt.
pub const PROMPT: &str = "vgrid# ";

impl SampleGuest {
    /// Direct kernel boot of the sample with the recommended cmdline plus `extra` (e.g.
    /// `vgrid.mode=poweroff`, `vgrid.net=dhcp`; a later `vgrid.mode=` wins).
    pub fn boot(&self, extra: &str) -> BootSource {
        let cmdline = if extra.is_empty() { self.cmdline.clone() } else { format!("{} {extra}", self.cmdline) };
        BootSource::Kernel { kernel: self.kernel.clone(), initrd: Some(self.initrd.clone()), cmdline }
    }

    /// A 1-CPU, 256 MiB spec of the sample on `disk` (TCG/KVM chosen automatically).
    pub fn spec(&self, id: &str, disk: DiskSource, extra_cmdline: &str) -> VmSpec {
        let config = vgrid_api::vm::VmConfig::new(vgrid_api::ImageRef { name: "sample".into(), version: None });
        VmSpec::new(id, config, disk, self.boot(extra_cmdline))
    }
}

/// The workspace's `scripts/build-sample-guest.sh` (or `$VGRID_SAMPLE_GUEST_SCRIPT`).
pub fn sample_guest_script() -> PathBuf {
    std::env::var_os("VGRID_SAMPLE_GUEST_SCRIPT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-sample-guest.sh"))
}

/// Builds (first call on this machine, or after the script changed) or finds the sample guest.
/// Runs the script once per process; the script itself caches across processes.
pub fn sample_guest() -> Result<SampleGuest, TestkitError> {
    static CELL: OnceLock<Result<SampleGuest, TestkitError>> = OnceLock::new();
    CELL.get_or_init(build_sample_guest).clone()
}

fn build_sample_guest() -> Result<SampleGuest, TestkitError> {
    guest_from_script(&sample_guest_script(), &[])
}

/// The workspace's `scripts/build-debian-guest.sh` (or `$VGRID_DEBIAN_GUEST_SCRIPT`).
pub fn debian_guest_script() -> PathBuf {
    std::env::var_os("VGRID_DEBIAN_GUEST_SCRIPT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-debian-guest.sh"))
}

/// The stock Debian guest (systemd, ext4 root; see `scripts/build-debian-guest.sh`), or `None`
/// when it was never built on this machine and `VGRID_DEBIAN_GUEST=1` does not ask for it:
/// building it takes minutes (debootstrap), so tests using it skip unless asked or cached. A
/// cache from an older version of the script is rebuilt. Runs the script once per process.
pub fn debian_guest() -> Result<Option<SampleGuest>, TestkitError> {
    static CELL: OnceLock<Result<Option<SampleGuest>, TestkitError>> = OnceLock::new();
    CELL.get_or_init(|| cached_debian(&[])).clone()
}

/// The stock cloud image flavour of the Debian guest (`build-debian-guest.sh --cloud`:
/// cloud-init, no automatic login, root locked), on the same terms as [`debian_guest`].
pub fn debian_cloud_guest() -> Result<Option<SampleGuest>, TestkitError> {
    static CELL: OnceLock<Result<Option<SampleGuest>, TestkitError>> = OnceLock::new();
    CELL.get_or_init(|| cached_debian(&["--cloud"])).clone()
}

fn cached_debian(flags: &[&str]) -> Result<Option<SampleGuest>, TestkitError> {
    let script = debian_guest_script();
    let asked = std::env::var("VGRID_DEBIAN_GUEST").is_ok_and(|v| v == "1");
    if !asked && !script_cache_dir(&script, flags)?.join("stamp").is_file() {
        return Ok(None);
    }
    guest_from_script(&script, flags).map(Some)
}

/// Where a guest script keeps its cache (`SCRIPT [FLAGS] --dir`).
fn script_cache_dir(script: &Path, flags: &[&str]) -> Result<PathBuf, TestkitError> {
    let err = |detail: String| TestkitError::GuestScript { script: script.to_path_buf(), detail };
    let out = std::process::Command::new("bash")
        .arg(script)
        .args(flags)
        .arg("--dir")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| err(format!("cannot run bash: {e}")))?;
    if !out.status.success() {
        return Err(err(format!("--dir failed with {}: {}", out.status, String::from_utf8_lossy(&out.stderr))));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Runs a guest script (it builds or finds its cached guest) and returns the guest's files.
fn guest_from_script(script: &Path, flags: &[&str]) -> Result<SampleGuest, TestkitError> {
    let err = |detail: String| TestkitError::GuestScript { script: script.to_path_buf(), detail };
    let out = std::process::Command::new("bash")
        .arg(script)
        .args(flags)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| err(format!("cannot run bash: {e}")))?;
    if !out.status.success() {
        return Err(err(format!("failed with {}", out.status)));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
    let cmdline =
        std::fs::read_to_string(dir.join("cmdline")).map_err(|e| err(format!("no cmdline in {}: {e}", dir.display())))?.trim().to_string();
    let g = SampleGuest { kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.img"), disk: dir.join("disk.img"), cmdline, dir };
    for p in [&g.kernel, &g.initrd, &g.disk] {
        if !p.is_file() {
            return Err(err(format!("{} missing after the build", p.display())));
        }
    }
    Ok(g)
}

/// A held slot of the machine-wide limit on concurrently booted test guests; released on drop.
#[derive(Debug)]
pub struct BootSlot {
    _file: std::fs::File,
    pub path: PathBuf,
}

/// Blocks until one of `$VGRID_TEST_BOOT_SLOTS` (default 2) machine-wide slots is free (flock
/// on files under `${VGRID_CACHE:-$HOME/.cache/vgrid}/boot-slots`) and holds it.
pub fn boot_slot() -> Result<BootSlot, TestkitError> {
    let slots: usize = std::env::var("VGRID_TEST_BOOT_SLOTS").ok().and_then(|s| s.parse().ok()).unwrap_or(2).max(1);
    let cache = std::env::var_os("VGRID_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".cache/vgrid"));
    let dir = cache.join("boot-slots");
    std::fs::create_dir_all(&dir).map_err(|e| TestkitError::Slot { path: dir.clone(), detail: e.to_string() })?;
    let open = |i: usize| -> Result<(std::fs::File, PathBuf), TestkitError> {
        let path = dir.join(format!("slot-{i}.lock"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| TestkitError::Slot { path: path.clone(), detail: e.to_string() })?;
        Ok((f, path))
    };
    for i in 0..slots {
        let (f, path) = open(i)?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(BootSlot { _file: f, path });
        }
    }
    // All busy: wait on one chosen by our pid.
    let (f, path) = open(std::process::id() as usize % slots)?;
    // SAFETY: as above; blocking until the holder releases it.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(TestkitError::Slot { path, detail: std::io::Error::last_os_error().to_string() });
    }
    Ok(BootSlot { _file: f, path })
}

/// Runs `attempt(n)` for n = 1, then (if it failed or exceeded `timeout`) once more for n = 2.
/// The closure must clean up after itself when dropped mid-way (launch the VM with
/// `kill_on_drop`, and use a fresh runtime directory per attempt, e.g. `dir.join(n)`).
pub async fn boot_with_retry<T, E, F, Fut>(what: &str, timeout: Duration, mut attempt: F) -> Result<T, TestkitError>
where
    E: Display,
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut first = String::new();
    for n in 1..=2u32 {
        let res = match tokio::time::timeout(timeout, attempt(n)).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("timed out after {timeout:?}"),
        };
        if n == 1 {
            tracing::warn!(what, error = %res, "boot attempt 1 failed; retrying once");
            eprintln!("{what}: boot attempt 1 failed, retrying: {res}");
            first = res;
        } else {
            return Err(TestkitError::BootFailed { what: what.to_string(), first, second: res });
        }
    }
    unreachable!()
}
