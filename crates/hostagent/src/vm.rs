//! The QEMU driver: one [`Vm`] per running `qemu-system-x86_64` process.
//!
//! Every VM lives in a runtime directory chosen by the caller:
//!
//! | file | what |
//! | --- | --- |
//! | `spec.json` | the [`VmSpec`] as launched (accelerator resolved), for re-adoption |
//! | `pid` | QEMU's pid (written by QEMU's `-pidfile`) |
//! | `qmp.sock` | QMP server socket (one client at a time) |
//! | `console.sock` | serial console (ttyS0) socket server (one client at a time) |
//! | `console.log` | everything the guest wrote on its serial console |
//! | `overlay.qcow2` | the per-VM copy-on-write disk whose backing is the image |
//! | `qemu.log` | QEMU's own stdout and stderr |
//!
//! The guest disk is always a qcow2 overlay over the (read-only) backing — a local file or the
//! block proxy's NBD export — attached as virtio-blk; guest writes land in the overlay only.

use crate::accel::{kvm_usable, Accel};
use crate::qmp::{QmpClient, QmpError, QmpEvent};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, watch};
use vgrid_api::vm::{Nic, VmConfig};

/// File names inside a VM's runtime directory.
pub const SPEC_FILE: &str = "spec.json";
pub const PID_FILE: &str = "pid";
pub const QMP_SOCKET: &str = "qmp.sock";
pub const CONSOLE_SOCKET: &str = "console.sock";
pub const CONSOLE_LOG: &str = "console.log";
pub const OVERLAY_FILE: &str = "overlay.qcow2";
pub const QEMU_LOG: &str = "qemu.log";

/// How long [`Vm::powerdown`] waits for QEMU to exit after `quit` before killing it.
pub const QUIT_GRACE: Duration = Duration::from_secs(10);

/// Most guest memory this driver starts a VM with, in MiB (4 TiB).
pub const MAX_MEMORY_MIB: u64 = 4 * 1024 * 1024;

/// Longest path a unix socket address can hold (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The guest's disk: what the per-VM qcow2 overlay is layered on. Never written to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DiskSource {
    /// An NBD export, e.g. the block proxy's `nbd+unix:///IMAGE?socket=PATH`. Raw format.
    Nbd { url: String },
    /// A local image file.
    File {
        path: PathBuf,
        /// QEMU format name of the file (`raw`, `qcow2`); `raw` when omitted.
        #[serde(default = "default_format")]
        format: String,
    },
}

fn default_format() -> String {
    "raw".into()
}

impl DiskSource {
    /// A local raw image file.
    pub fn raw_file(path: impl Into<PathBuf>) -> DiskSource {
        DiskSource::File { path: path.into(), format: "raw".into() }
    }
    /// The NBD export `export` served on the unix socket `socket`.
    pub fn nbd_unix(socket: impl AsRef<Path>, export: &str) -> DiskSource {
        DiskSource::Nbd { url: format!("nbd+unix:///{export}?socket={}", socket.as_ref().display()) }
    }
    /// The backing file string and its format, as written into the overlay.
    fn backing(&self) -> (String, &str) {
        match self {
            DiskSource::Nbd { url } => (url.clone(), "raw"),
            DiskSource::File { path, format } => (path.display().to_string(), format.as_str()),
        }
    }
}

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum BootSource {
    /// Direct kernel boot.
    Kernel {
        kernel: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        initrd: Option<PathBuf>,
        #[serde(default)]
        cmdline: String,
    },
    /// The disk's own bootloader through firmware (SeaBIOS unless `bios` names another image).
    Firmware {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bios: Option<PathBuf>,
    },
    /// Only for loading a saved state of a direct kernel boot: the kernel is in the guest's
    /// memory already, so QEMU gets no `-kernel`, only any kernel loader option ROM the saved
    /// state holds as a RAM block (`-option-rom`; none for QEMU 10's `pc`), and `-no-reboot`:
    /// with no kernel to boot again, a guest reset ends QEMU.
    Restore { option_roms: Vec<String> },
}

/// Everything needed to start one VM: its configuration as the coordinator recorded it, and
/// the host's own means (disk, boot files, RAM backing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "crate::vmspec::StoredSpec")]
pub struct VmSpec {
    /// 1–64 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
    pub id: String,
    /// Cpus, memory, networking (TCP port forwards bound on the host's 127.0.0.1), and the
    /// accelerator (`None`: KVM when usable, else TCG; resolved at launch).
    pub config: VmConfig,
    pub disk: DiskSource,
    pub boot: BootSource,
    /// How the guest's RAM is backed ([`crate::ram`]). An anonymous spec becomes shared at
    /// launch when [`LaunchOptions::ram_dir`] is set.
    #[serde(default)]
    pub ram: crate::ram::RamBacking,
}

impl VmSpec {
    /// A spec of VM `id` with `config` on `disk`, booting by `boot`, with anonymous RAM.
    pub fn new(id: &str, config: VmConfig, disk: DiskSource, boot: BootSource) -> VmSpec {
        VmSpec { id: id.to_string(), config, disk, boot, ram: Default::default() }
    }
}

/// Where the QEMU binaries are and how long to wait for them.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Default: `$VGRID_QEMU_SYSTEM` or `qemu-system-x86_64` on PATH.
    pub qemu_system: PathBuf,
    /// Default: `$VGRID_QEMU_IMG` or `qemu-img` on PATH.
    pub qemu_img: PathBuf,
    /// How long QEMU may take to open its QMP socket. Default 30 s.
    pub startup_timeout: Duration,
    /// Kill QEMU when the [`Vm`] is dropped. Default false: QEMU outlives the agent so a
    /// restarted agent can [`Vm::adopt`] it. Tests set it.
    pub kill_on_drop: bool,
    /// Keep an existing `overlay.qcow2` in the runtime directory (restart with the guest's
    /// writes) instead of creating a fresh one. Default false.
    pub reuse_overlay: bool,
    /// Start from a state saved by [`Vm::save_state`] (`-incoming file:PATH`) instead of
    /// booting: launch returns once the state is loaded and the guest runs again. The spec
    /// must equal the saved VM's (same kernel/initrd files, memory, cpus) and the disk must be
    /// the saved VM's overlay: use the same runtime directory with `reuse_overlay`.
    pub incoming: Option<PathBuf>,
    /// Put QEMU into this cgroup right after spawn (resource control). Default none.
    pub cgroup: Option<crate::cgroup::VmCgroup>,
    /// Throttle the guest's disk (a QEMU throttle group on the drive). Default none.
    pub disk_throttle: Option<crate::resources::DiskThrottle>,
    /// Start with `-incoming defer`: QEMU waits, paused, for a live migration that QMP
    /// `migrate-incoming` opens (see `crate::migrate`). Launch returns once QMP answers.
    /// Default false.
    pub defer_incoming: bool,
    /// Run QEMU as this unprivileged user (privileges dropped before exec; the runtime
    /// directory and its files are handed to it). Default none: QEMU runs as the caller.
    pub run_as: Option<crate::qemu_user::QemuUser>,
    /// A tmpfs directory for guests' RAM files ([`crate::ram`]): a guest with anonymous RAM in
    /// its spec gets a shared RAM file there. Default [`crate::ram::default_ram_dir`].
    pub ram_dir: Option<PathBuf>,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions {
            qemu_system: std::env::var_os("VGRID_QEMU_SYSTEM").map(PathBuf::from).unwrap_or_else(|| "qemu-system-x86_64".into()),
            qemu_img: std::env::var_os("VGRID_QEMU_IMG").map(PathBuf::from).unwrap_or_else(|| "qemu-img".into()),
            startup_timeout: Duration::from_secs(30),
            kill_on_drop: false,
            reuse_overlay: false,
            incoming: None,
            cgroup: None,
            disk_throttle: None,
            defer_incoming: false,
            run_as: None,
            ram_dir: crate::ram::default_ram_dir(),
        }
    }
}

pub use vgrid_api::host::ExitInfo;

/// How a child process ended.
fn exit_info_of(st: std::process::ExitStatus) -> ExitInfo {
    use std::os::unix::process::ExitStatusExt;
    ExitInfo { code: st.code(), signal: st.signal() }
}

/// QEMU's run status: what `query-status` says, or that QEMU is gone. (Not the coordinator's
/// `vgrid_api::vm::VmState`, the VM's lifecycle state.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuStatus {
    Running,
    /// Stopped by `stop` (or a debugger, or an I/O error with `werror=stop`).
    Paused,
    /// The guest powered off and QEMU is about to exit.
    Shutdown,
    Exited(ExitInfo),
    /// Any other QEMU run state (`inmigrate`, `postmigrate`, `guest-panicked`, …).
    Other(String),
}

/// How [`Vm::powerdown`] got QEMU to exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMethod {
    /// It had already exited.
    AlreadyExited,
    /// The guest obeyed the ACPI power button.
    Acpi,
    /// QMP `quit` after the guest ignored the power button.
    Quit,
    /// SIGKILL, the last resort.
    Kill,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopOutcome {
    pub method: StopMethod,
    pub exit: ExitInfo,
}

/// QEMU's version from `qemu-system-x86_64 --version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
    /// The whole first line, e.g. `QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2…)`.
    pub full: String,
}

/// What failed, on which VM (or binary, or directory).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("VM {id}: invalid spec: {reason}")]
    InvalidSpec { id: String, reason: String },
    #[error("VM {id}: {what} {path} does not exist or is not a readable file")]
    MissingFile { id: String, what: &'static str, path: PathBuf },
    #[error("VM {id}: runtime directory {path}: {source}")]
    RuntimeDir {
        id: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {id}: socket path {path} is longer than {MAX_SOCKET_PATH} bytes; use a shorter runtime directory")]
    SocketPathTooLong { id: String, path: PathBuf },
    #[error("VM {id}: runtime directory {dir} is in use by running QEMU pid {pid}")]
    AlreadyRunning { id: String, dir: PathBuf, pid: u32 },
    #[error("VM {id}: cannot run {binary}: {source}")]
    Spawn {
        id: String,
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {id}: creating overlay {path} over {backing} failed: {detail}")]
    Overlay { id: String, path: PathBuf, backing: String, detail: String },
    #[error("VM {id}: QEMU exited during startup ({exit}); QEMU said: {stderr}{console}")]
    EarlyExit { id: String, exit: ExitInfo, stderr: String, console: String },
    #[error("VM {id}: QEMU did not open its QMP socket within {after:?}; QEMU said: {stderr}")]
    StartTimeout { id: String, after: Duration, stderr: String },
    #[error("VM {id}: {source}")]
    Qmp {
        id: String,
        #[source]
        source: QmpError,
    },
    #[error("VM {id}: {text:?} did not appear on the console within {after:?}; last console lines:\n{tail}")]
    ConsoleTimeout { id: String, text: String, after: Duration, tail: String },
    #[error("VM {id}: QEMU exited ({exit}) before {text:?} appeared on the console; last console lines:\n{tail}")]
    ConsoleExited { id: String, text: String, exit: ExitInfo, tail: String },
    #[error("VM {id}: {path}: {source}")]
    Io {
        id: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot adopt the VM in {dir}: {reason}")]
    Adopt { dir: PathBuf, reason: String },
    #[error("VM {id}: saving its state to {path} failed: {detail}")]
    SaveState { id: String, path: PathBuf, detail: String },
    #[error("VM {id}: restoring its state from {path} failed: {detail}")]
    Restore { id: String, path: PathBuf, detail: String },
    #[error("{binary} --version: {detail}")]
    Version { binary: PathBuf, detail: String },
}

/// A running (or exited) QEMU process and its QMP session.
pub struct Vm {
    spec: VmSpec,
    accel: Accel,
    dir: PathBuf,
    pid: u32,
    qmp: QmpClient,
    exit: watch::Receiver<Option<ExitInfo>>,
    console: tokio::sync::Mutex<Option<ConsoleWriter>>,
    kill_on_drop: bool,
    /// Adopted from an earlier agent: not our child, so its pid could be reused after it exits.
    adopted: bool,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm").field("id", &self.spec.id).field("pid", &self.pid).field("dir", &self.dir).finish()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.kill_on_drop && self.signallable() {
            tracing::debug!(vm = %self.spec.id, pid = self.pid, "killing QEMU on drop");
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Validates a VM id: 1–64 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn validate_vm_id(id: &str) -> Result<(), VmError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && !id.starts_with('-')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(VmError::InvalidSpec {
            id: id.to_string(),
            reason: "the id must be 1-64 characters of [A-Za-z0-9._-], not starting with '.' or '-'".into(),
        })
    }
}

fn check_file(id: &str, what: &'static str, path: &Path) -> Result<(), VmError> {
    match std::fs::File::open(path).and_then(|f| f.metadata()) {
        Ok(m) if m.is_file() => Ok(()),
        _ => Err(VmError::MissingFile { id: id.to_string(), what, path: path.to_path_buf() }),
    }
}

/// Checks a spec without touching anything: id, sizes, files that must exist, accelerator.
pub fn validate_spec(spec: &VmSpec) -> Result<(), VmError> {
    let id = spec.id.as_str();
    validate_vm_id(id)?;
    let invalid = |reason: String| VmError::InvalidSpec { id: id.to_string(), reason };
    // Cpus, memory, resources and networking: the configuration's own checks.
    spec.config.validate().map_err(|e| invalid(e.to_string()))?;
    if spec.config.memory_mib > MAX_MEMORY_MIB {
        return Err(invalid(format!("memory_mib must be at most {MAX_MEMORY_MIB}, not {}", spec.config.memory_mib)));
    }
    match &spec.disk {
        DiskSource::Nbd { url } => {
            if !(url.starts_with("nbd://") || url.starts_with("nbd+unix://") || url.starts_with("nbd+tcp://")) {
                return Err(invalid(format!("disk URL {url:?} is not an nbd://, nbd+unix:// or nbd+tcp:// URL")));
            }
        }
        DiskSource::File { path, format } => {
            check_file(id, "disk image", path)?;
            if format.is_empty() || !format.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(invalid(format!("disk format {format:?} is not a QEMU format name")));
            }
        }
    }
    match &spec.boot {
        BootSource::Kernel { kernel, initrd, .. } => {
            check_file(id, "kernel", kernel)?;
            if let Some(i) = initrd {
                check_file(id, "initrd", i)?;
            }
        }
        BootSource::Firmware { bios: Some(b) } => check_file(id, "firmware", b)?,
        BootSource::Firmware { bios: None } | BootSource::Restore { .. } => {}
    }
    if spec.config.accel == Some(Accel::Kvm) && !kvm_usable() {
        return Err(invalid(
            "accelerator kvm requested but this host has no usable KVM (no vmx/svm in /proc/cpuinfo or /dev/kvm does not open)".into(),
        ));
    }
    Ok(())
}

/// QEMU option values are comma-separated lists: a literal comma is written twice.
fn qopt(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// For a disk over the block proxy's unix socket, the overlay's backing as a node of its own
/// (the export its header names) with a reconnect delay: while the host agent restarts (its proxy
/// gone for a moment), the guest's reads of the base wait for it instead of failing.
fn nbd_backing_node(disk: &DiskSource) -> Option<String> {
    let DiskSource::Nbd { url } = disk else { return None };
    let (export, socket) = url.strip_prefix("nbd+unix:///").and_then(|r| r.split_once("?socket="))?;
    Some(format!(
        "driver=nbd,node-name=base,read-only=on,server.type=unix,server.path={},export={},reconnect-delay={NBD_RECONNECT_DELAY_S}",
        qopt(Path::new(socket)),
        export.replace(',', ",,")
    ))
}

/// Seconds a guest's disk (or RAM pager) waits for a restarting host agent's proxy.
pub const NBD_RECONNECT_DELAY_S: u32 = 300;

/// The `qemu-system-x86_64` arguments for `spec` (accelerator already resolved) in `dir`.
pub fn qemu_args(spec: &VmSpec, accel: Accel, dir: &Path) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &format!("guest={},debug-threads=on", spec.id)]);
    push(&["-machine", &format!("pc{}", spec.ram.machine_option()), "-accel", accel.as_str()]);
    if accel == Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&["-smp", &spec.config.cpus.to_string(), "-m", &format!("{}M", spec.config.memory_mib)]);
    a.extend(spec.ram.qemu_args(spec.config.memory_mib));
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    // seccomp: no obsolete syscalls, no privilege elevation, no fork/exec, no scheduler or
    // affinity changes. A guest escaping into QEMU is held to these.
    push(&["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=con0,path={},server=on,wait=off,logfile={},logappend=on",
            qopt(&dir.join(CONSOLE_SOCKET)),
            qopt(&dir.join(CONSOLE_LOG))
        ),
        "-serial",
        "chardev:con0",
    ]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", qopt(&dir.join(QMP_SOCKET)))]);
    push(&["-pidfile", &dir.join(PID_FILE).display().to_string()]);
    let backing = nbd_backing_node(&spec.disk);
    if let Some(b) = &backing {
        push(&["-blockdev", b]);
    }
    push(&[
        "-blockdev",
        &format!(
            "driver=qcow2,node-name=vda,discard=unmap,file.driver=file,file.filename={}{}",
            qopt(&dir.join(OVERLAY_FILE)),
            if backing.is_some() { ",backing=base" } else { "" }
        ),
        "-device",
        // Direct kernel boot takes bootindex 0 for its option ROM.
        if matches!(spec.boot, BootSource::Firmware { .. }) { "virtio-blk-pci,drive=vda,bootindex=0" } else { "virtio-blk-pci,drive=vda" },
    ]);
    a.extend(net_args(&spec.config));
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    match &spec.boot {
        BootSource::Kernel { kernel, initrd, cmdline } => {
            push(&["-kernel", &kernel.display().to_string()]);
            if let Some(i) = initrd {
                push(&["-initrd", &i.display().to_string()]);
            }
            if !cmdline.is_empty() {
                push(&["-append", cmdline]);
            }
        }
        BootSource::Firmware { bios } => {
            if let Some(b) = bios {
                push(&["-bios", &b.display().to_string()]);
            }
        }
        BootSource::Restore { option_roms } => {
            for r in option_roms {
                push(&["-option-rom", r]);
            }
            push(&["-no-reboot"]);
        }
    }
    a
}

/// The network devices of `config`: one virtio-net device per interface, `n0`, `n1`, ...;
/// user-mode ones with their TCP forwards bound on 127.0.0.1.
fn net_args(config: &VmConfig) -> Vec<String> {
    let mut a = Vec::new();
    for (i, nic) in config.net.nics.iter().enumerate() {
        let netdev = match nic {
            Nic::User { forwards } => {
                let mut netdev = format!("user,id=n{i}");
                for f in forwards {
                    netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{}-:{}", f.host, f.guest));
                }
                netdev
            }
        };
        a.extend(["-netdev".to_string(), netdev, "-device".into(), format!("virtio-net-pci,netdev=n{i},romfile=")]);
    }
    a
}

/// Whether the QEMU of runtime directory `dir` (its pid file) still runs.
pub(crate) fn qemu_runs_in(dir: &Path) -> bool {
    read_pid_file(&dir.join(PID_FILE)).is_some_and(|pid| pid_is_qemu_of(pid, dir))
}

/// True if `pid` is a live (not zombie) process whose command line mentions `dir`'s QMP socket.
fn pid_is_qemu_of(pid: u32, dir: &Path) -> bool {
    if !pid_alive(pid) {
        return false;
    }
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = dir.join(QMP_SOCKET).display().to_string().replace(',', ",,");
    String::from_utf8_lossy(&cmd).contains(&needle)
}

/// True if `/proc/PID` exists and is not a zombie.
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z') | Some('X')),
            None => true,
        },
        Err(_) => false,
    }
}

fn read_pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Last `n` lines of a text file (lossy UTF-8, `\r` removed); empty if it does not exist.
fn tail_file(path: &Path, n: usize) -> Vec<String> {
    let Ok(bytes) = crate::qemu_user::read_file(path) else {
        return Vec::new();
    };
    let start = bytes.len().saturating_sub(64 * 1024);
    let text = String::from_utf8_lossy(&bytes[start..]).replace('\r', "");
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|s| s.to_string()).collect()
}

impl Vm {
    /// Starts QEMU for `spec` in `runtime_dir` (created if missing) with default options, and
    /// returns once QMP is connected.
    pub async fn launch(spec: VmSpec, runtime_dir: impl AsRef<Path>) -> Result<Vm, VmError> {
        Self::launch_with(spec, runtime_dir, &LaunchOptions::default()).await
    }

    /// [`Vm::launch`] with explicit options.
    pub async fn launch_with(mut spec: VmSpec, runtime_dir: impl AsRef<Path>, opts: &LaunchOptions) -> Result<Vm, VmError> {
        validate_spec(&spec)?;
        let id = spec.id.clone();
        let incoming = match &opts.incoming {
            Some(state) => {
                check_file(&id, "saved state", state)?;
                Some(std::fs::canonicalize(state).map_err(|_| VmError::MissingFile {
                    id: id.clone(),
                    what: "saved state",
                    path: state.clone(),
                })?)
            }
            None => None,
        };
        let accel = spec.config.accel.unwrap_or_else(crate::accel::detect);
        spec.config.accel = Some(accel);
        let io_err = |path: &Path, source| VmError::RuntimeDir { id: id.clone(), path: path.to_path_buf(), source };

        let dir = runtime_dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        // The overlay (the guest's writes), the QMP and console sockets and the logs are the
        // agent's and QEMU's only: no other local user may read the guest's data or drive it.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| io_err(dir, e))?;
        }
        // Handed to QEMU's user by an earlier launch: take it back while the agent writes.
        if opts.run_as.is_some() {
            crate::qemu_user::reclaim(dir).map_err(|e| io_err(dir, e))?;
        }
        let dir = std::fs::canonicalize(dir).map_err(|e| io_err(dir, e))?;
        for sock in [QMP_SOCKET, CONSOLE_SOCKET] {
            let p = dir.join(sock);
            if p.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(VmError::SocketPathTooLong { id, path: p });
            }
        }
        if let Some(pid) = read_pid_file(&dir.join(PID_FILE)) {
            if pid_is_qemu_of(pid, &dir) {
                return Err(VmError::AlreadyRunning { id, dir, pid });
            }
        }
        for f in [QMP_SOCKET, CONSOLE_SOCKET, PID_FILE, CONSOLE_LOG, QEMU_LOG] {
            let p = dir.join(f);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p, e)),
            }
        }

        // Absolute paths: QEMU runs in the runtime directory, and the overlay records its
        // backing verbatim.
        let absolute = |what: &'static str, p: &mut PathBuf| -> Result<(), VmError> {
            *p = std::fs::canonicalize(&*p).map_err(|_| VmError::MissingFile { id: id.clone(), what, path: p.clone() })?;
            Ok(())
        };
        if let DiskSource::File { path, .. } = &mut spec.disk {
            absolute("disk image", path)?;
        }
        match &mut spec.boot {
            BootSource::Kernel { kernel, initrd, .. } => {
                absolute("kernel", kernel)?;
                if let Some(i) = initrd {
                    absolute("initrd", i)?;
                }
            }
            BootSource::Firmware { bios: Some(b) } => absolute("firmware", b)?,
            BootSource::Firmware { bios: None } | BootSource::Restore { .. } => {}
        }
        let overlay = dir.join(OVERLAY_FILE);
        if !(opts.reuse_overlay && overlay.exists()) {
            create_overlay(&id, &opts.qemu_img, &spec.disk, &overlay).await?;
        }

        let spec_json = serde_json::to_vec_pretty(&spec).map_err(|e| VmError::InvalidSpec {
            id: id.clone(),
            reason: format!("cannot record the spec as JSON (a path that is not UTF-8?): {e}"),
        })?;
        let spec_path = dir.join(SPEC_FILE);
        crate::qemu_user::write_file(&spec_path, &spec_json).map_err(|e| io_err(&spec_path, e))?;

        let log_path = dir.join(QEMU_LOG);
        let log = std::fs::File::create(&log_path).map_err(|e| io_err(&log_path, e))?;
        // QEMU starts as its own user: the directory and what is in it (overlay, kernel,
        // initrd, incoming state) become its own; the agent (root) keeps access.
        if let Some(u) = &opts.run_as {
            u.give(&dir).map_err(|e| io_err(&dir, e))?;
        }
        let log2 = log.try_clone().map_err(|e| io_err(&log_path, e))?;
        if let (crate::ram::RamBacking::Anonymous, Some(ram_dir)) = (&spec.ram, &opts.ram_dir) {
            let owner = opts.run_as.as_ref().map(|u| (u.uid, u.gid));
            let path = crate::ram::create_shared(ram_dir, &id, owner).map_err(|e| io_err(ram_dir, e))?;
            spec.ram = crate::ram::RamBacking::Shared { path };
        }
        // QEMU holds its RAM file from start-up on; the name goes once QMP answers (below), or
        // when QEMU ends first.
        let ram_file = match &spec.ram {
            crate::ram::RamBacking::Shared { path } => Some(path.clone()),
            _ => None,
        };
        let lazy_dir = matches!(spec.ram, crate::ram::RamBacking::Lazy { .. }).then(|| dir.clone());
        let mut args = qemu_args(&spec, accel, &dir);
        if let Some(state) = &incoming {
            args.push("-incoming".into());
            args.push(format!("file:{}", state.display()));
        } else if opts.defer_incoming {
            args.push("-incoming".into());
            args.push("defer".into());
        }
        if let Some(t) = &opts.disk_throttle {
            crate::resources::throttle_args(&mut args, t);
        }
        tracing::info!(vm = %id, accel = %accel, dir = %dir.display(), "starting QEMU");
        tracing::debug!(vm = %id, ?args, "QEMU command line");
        let mut cmd = tokio::process::Command::new(&opts.qemu_system);
        cmd.args(&args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(false)
            // Own process group: a terminal's ^C to the agent does not reach the guests.
            .process_group(0);
        if matches!(spec.ram, crate::ram::RamBacking::Lazy { .. }) {
            crate::ram::ignore_hugepage_advice(&mut cmd);
        }
        if let Some(u) = &opts.run_as {
            u.apply(&mut cmd);
            tracing::debug!(vm = %id, user = %u.name, uid = u.uid, "QEMU drops to its own user");
        }
        let mut child = cmd.spawn().map_err(|source| VmError::Spawn { id: id.clone(), binary: opts.qemu_system.clone(), source })?;
        let pid = child.id().unwrap_or(0);
        if let Some(cg) = &opts.cgroup {
            if let Err(e) = cg.attach(pid) {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(VmError::InvalidSpec { id: id.clone(), reason: format!("cannot put QEMU into its cgroup: {e}") });
            }
        }
        let (exit_tx, mut exit_rx) = watch::channel(None);
        let vm_id = id.clone();
        let ram_file2 = ram_file.clone();
        tokio::spawn(async move {
            let info = match child.wait().await {
                Ok(st) => exit_info_of(st),
                Err(e) => {
                    tracing::warn!(vm = %vm_id, error = %e, "waiting for QEMU failed");
                    ExitInfo::unknown()
                }
            };
            tracing::info!(vm = %vm_id, %info, "QEMU exited");
            if let Some(f) = ram_file2 {
                let _ = std::fs::remove_file(f);
            }
            if let Some(d) = lazy_dir {
                crate::ram::stop_pager(&d).await;
            }
            let _ = exit_tx.send(Some(info));
        });

        let early_exit = |exit: ExitInfo| {
            let stderr = tail_file(&log_path, 20).join("\n");
            let console = tail_file(&dir.join(CONSOLE_LOG), 10);
            let console = if console.is_empty() { String::new() } else { format!("\nlast console lines:\n{}", console.join("\n")) };
            VmError::EarlyExit { id: id.clone(), exit, stderr: stderr.trim().to_string(), console }
        };
        let kill_child = || {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        };

        let qmp_path = dir.join(QMP_SOCKET);
        let deadline = tokio::time::Instant::now() + opts.startup_timeout;
        let qmp = loop {
            if let Some(exit) = *exit_rx.borrow() {
                return Err(early_exit(exit));
            }
            if tokio::time::Instant::now() >= deadline {
                kill_child();
                return Err(VmError::StartTimeout {
                    id: id.clone(),
                    after: opts.startup_timeout,
                    stderr: tail_file(&log_path, 20).join("\n"),
                });
            }
            match QmpClient::connect(&qmp_path, Duration::from_secs(10)).await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::trace!(vm = %id, error = %e, "QMP not ready yet");
                    tokio::select! {
                        _ = exit_rx.changed() => {}
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            }
        };
        tracing::info!(vm = %id, pid, ram = spec.ram.describe(), "QEMU started, QMP connected");
        if let Some(f) = &ram_file {
            // QEMU maps it now: the memory lives as long as QEMU, not as long as a name.
            let _ = std::fs::remove_file(f);
        }
        let vm = Vm {
            spec,
            accel,
            dir,
            pid,
            qmp,
            exit: exit_rx,
            console: tokio::sync::Mutex::new(None),
            kill_on_drop: opts.kill_on_drop,
            adopted: false,
        };
        if let Some(state) = &opts.incoming {
            if let Err(e) = vm.finish_incoming(state, opts.startup_timeout).await {
                let _ = vm.kill().await;
                return Err(e);
            }
        }
        Ok(vm)
    }

    /// Waits for an `-incoming` migration to finish loading, then resumes the guest.
    async fn finish_incoming(&self, state: &Path, timeout: Duration) -> Result<(), VmError> {
        let err = |detail: String| VmError::Restore { id: self.spec.id.clone(), path: state.to_path_buf(), detail };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(exit) = self.exit_info() {
                let stderr = tail_file(&self.qemu_log_path(), 10).join("\n");
                return Err(err(format!("QEMU exited ({exit}): {stderr}")));
            }
            let st = self.execute("query-status", None).await?;
            let status = st.get("status").and_then(Value::as_str).unwrap_or("");
            if status != "inmigrate" {
                let mig = self.execute("query-migrate", None).await?;
                match mig.get("status").and_then(Value::as_str) {
                    Some("failed") => {
                        let desc = mig.get("error-desc").and_then(Value::as_str).unwrap_or("no detail");
                        return Err(err(desc.to_string()));
                    }
                    _ => {
                        if status == "paused" {
                            self.cont().await?;
                        }
                        tracing::info!(vm = %self.spec.id, state = %state.display(), "state restored, guest resumed");
                        return Ok(());
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(err(format!("still loading after {timeout:?}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Re-attaches to a QEMU started by an earlier agent from its runtime directory
    /// (`spec.json`, `pid`, `qmp.sock`). The exit status of an adopted QEMU is unknown
    /// ([`ExitInfo`] with both fields `None`); its exit is noticed by polling /proc.
    pub async fn adopt(runtime_dir: impl AsRef<Path>, opts: &LaunchOptions) -> Result<Vm, VmError> {
        let dir = std::fs::canonicalize(runtime_dir.as_ref())
            .map_err(|e| VmError::Adopt { dir: runtime_dir.as_ref().to_path_buf(), reason: e.to_string() })?;
        let adopt_err = |reason: String| VmError::Adopt { dir: dir.clone(), reason };
        let spec_bytes = std::fs::read(dir.join(SPEC_FILE)).map_err(|e| adopt_err(format!("cannot read {SPEC_FILE}: {e}")))?;
        let spec: VmSpec = serde_json::from_slice(&spec_bytes).map_err(|e| adopt_err(format!("bad {SPEC_FILE}: {e}")))?;
        let pid = read_pid_file(&dir.join(PID_FILE)).ok_or_else(|| adopt_err(format!("no readable {PID_FILE}")))?;
        if !pid_is_qemu_of(pid, &dir) {
            return Err(adopt_err(format!("pid {pid} is not a running QEMU of this directory")));
        }
        let qmp = QmpClient::connect(dir.join(QMP_SOCKET), opts.startup_timeout)
            .await
            .map_err(|source| VmError::Qmp { id: spec.id.clone(), source })?;
        let (exit_tx, exit_rx) = watch::channel(None);
        let vm_id = spec.id.clone();
        let lazy_dir = matches!(spec.ram, crate::ram::RamBacking::Lazy { .. }).then(|| dir.clone());
        tokio::spawn(async move {
            while pid_alive(pid) {
                tokio::select! {
                    _ = exit_tx.closed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            tracing::info!(vm = %vm_id, pid, "adopted QEMU exited");
            if let Some(d) = &lazy_dir {
                crate::ram::stop_pager(d).await;
            }
            let _ = exit_tx.send(Some(ExitInfo::unknown()));
        });
        let accel = spec.config.accel.unwrap_or(Accel::Tcg);
        tracing::info!(vm = %spec.id, pid, "adopted running QEMU");
        Ok(Vm {
            spec,
            accel,
            dir,
            pid,
            qmp,
            exit: exit_rx,
            console: tokio::sync::Mutex::new(None),
            kill_on_drop: opts.kill_on_drop,
            adopted: true,
        })
    }

    /// True if this QEMU may be signalled: not exited, and (when adopted) its pid still is
    /// the QEMU of this runtime directory.
    fn signallable(&self) -> bool {
        self.exit.borrow().is_none() && (!self.adopted || pid_is_qemu_of(self.pid, &self.dir))
    }

    pub fn id(&self) -> &str {
        &self.spec.id
    }
    /// The spec as launched (accelerator resolved, file backing made absolute).
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }
    pub fn accel(&self) -> Accel {
        self.accel
    }
    pub fn pid(&self) -> u32 {
        self.pid
    }
    pub fn runtime_dir(&self) -> &Path {
        &self.dir
    }
    pub fn qmp_socket_path(&self) -> PathBuf {
        self.dir.join(QMP_SOCKET)
    }
    pub fn console_socket_path(&self) -> PathBuf {
        self.dir.join(CONSOLE_SOCKET)
    }
    pub fn console_log_path(&self) -> PathBuf {
        self.dir.join(CONSOLE_LOG)
    }
    pub fn overlay_path(&self) -> PathBuf {
        self.dir.join(OVERLAY_FILE)
    }
    pub fn qemu_log_path(&self) -> PathBuf {
        self.dir.join(QEMU_LOG)
    }
    /// The QMP session, for commands this type does not wrap.
    pub fn qmp(&self) -> &QmpClient {
        &self.qmp
    }
    /// QMP events from now on (`SHUTDOWN`, `STOP`, `RESUME`, `POWERDOWN`, …).
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.qmp.subscribe()
    }
    /// Whether dropping this `Vm` kills QEMU (see [`LaunchOptions::kill_on_drop`]).
    pub fn set_kill_on_drop(&mut self, on: bool) {
        self.kill_on_drop = on;
    }
    /// `Some` once QEMU has exited.
    pub fn exit_info(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    fn qmp_err(&self, source: QmpError) -> VmError {
        VmError::Qmp { id: self.spec.id.clone(), source }
    }

    /// Runs a QMP command on this VM.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, VmError> {
        self.qmp.execute(command, arguments).await.map_err(|e| self.qmp_err(e))
    }

    /// The VM's run state (`query-status`), or `Exited` once QEMU is gone.
    pub async fn status(&self) -> Result<QemuStatus, VmError> {
        if let Some(e) = self.exit_info() {
            return Ok(QemuStatus::Exited(e));
        }
        match self.qmp.execute("query-status", None).await {
            Ok(v) => {
                let s = v.get("status").and_then(Value::as_str).unwrap_or("").to_string();
                Ok(match s.as_str() {
                    "running" => QemuStatus::Running,
                    "paused" => QemuStatus::Paused,
                    "shutdown" => QemuStatus::Shutdown,
                    _ => QemuStatus::Other(s),
                })
            }
            Err(e @ QmpError::Closed { .. }) => {
                // QEMU closed QMP: it is exiting. Give the reaper a moment to see it.
                match tokio::time::timeout(Duration::from_secs(5), self.wait_exit()).await {
                    Ok(info) => Ok(QemuStatus::Exited(info)),
                    Err(_) => Err(self.qmp_err(e)),
                }
            }
            Err(e) => Err(self.qmp_err(e)),
        }
    }

    /// Pauses the guest's vCPUs (QMP `stop`).
    pub async fn stop(&self) -> Result<(), VmError> {
        self.execute("stop", None).await.map(|_| ())
    }

    /// Resumes the guest's vCPUs (QMP `cont`).
    pub async fn cont(&self) -> Result<(), VmError> {
        self.execute("cont", None).await.map(|_| ())
    }

    /// Waits until QEMU has exited and says how.
    pub async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.exit.clone();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                return (*rx.borrow()).unwrap_or_else(ExitInfo::unknown);
            }
        }
    }

    async fn wait_exit_for(&self, d: Duration) -> Option<ExitInfo> {
        tokio::time::timeout(d, self.wait_exit()).await.ok()
    }

    /// Graceful shutdown: ACPI power button (`system_powerdown`) and up to `timeout` for the
    /// guest to power off; then QMP `quit` and up to [`QUIT_GRACE`]; then SIGKILL.
    pub async fn powerdown(&self, timeout: Duration) -> Result<StopOutcome, VmError> {
        if let Some(exit) = self.exit_info() {
            return Ok(StopOutcome { method: StopMethod::AlreadyExited, exit });
        }
        tracing::info!(vm = %self.spec.id, "powering down (ACPI)");
        match self.qmp.execute("system_powerdown", None).await {
            Ok(_) | Err(QmpError::Closed { .. }) => {}
            Err(e) => tracing::warn!(vm = %self.spec.id, error = %e, "system_powerdown failed"),
        }
        if let Some(exit) = self.wait_exit_for(timeout).await {
            return Ok(StopOutcome { method: StopMethod::Acpi, exit });
        }
        tracing::warn!(vm = %self.spec.id, ?timeout, "guest ignored the power button; sending quit");
        match self.qmp.execute_timeout("quit", None, QUIT_GRACE).await {
            Ok(_) | Err(QmpError::Closed { .. }) => {}
            Err(e) => tracing::warn!(vm = %self.spec.id, error = %e, "quit failed"),
        }
        if let Some(exit) = self.wait_exit_for(QUIT_GRACE).await {
            return Ok(StopOutcome { method: StopMethod::Quit, exit });
        }
        tracing::warn!(vm = %self.spec.id, "QEMU ignored quit; killing it");
        let exit = self.kill().await?;
        Ok(StopOutcome { method: StopMethod::Kill, exit })
    }

    /// Saves the guest's memory and device state to `path` (QMP `migrate` to `file:`), pausing
    /// the guest first. The guest stays paused afterwards: [`Vm::cont`] to go on running, or
    /// end QEMU (kill/quit) to suspend. The overlay plus this file restart the guest where it
    /// was ([`LaunchOptions::incoming`]). Returns the size of the saved state in bytes.
    pub async fn save_state(&self, path: impl AsRef<Path>, timeout: Duration) -> Result<u64, VmError> {
        self.save_state_with(path.as_ref(), timeout, false).await
    }

    /// [`Vm::save_state`] that leaves a shared RAM file out of the stream when `ram_apart`
    /// and the guest has one ([`Vm::ram_saved_apart`]): the caller saves the RAM itself
    /// ([`crate::ram`]).
    pub async fn save_state_with(&self, path: &Path, timeout: Duration, ram_apart: bool) -> Result<u64, VmError> {
        let err = |detail: String| VmError::SaveState { id: self.spec.id.clone(), path: path.to_path_buf(), detail };
        let path =
            if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir().map_err(|e| err(e.to_string()))?.join(path) };
        let _ = std::fs::remove_file(&path);
        if matches!(self.status().await?, QemuStatus::Running) {
            self.stop().await?;
        }
        tracing::info!(vm = %self.spec.id, path = %path.display(), "saving VM state");
        // A file is no TLS peer: drop the credentials a live migration into or out of this QEMU
        // set (see `crate::tlscreds`).
        self.execute("migrate-set-parameters", Some(serde_json::json!({"tls-creds": "", "tls-hostname": ""}))).await?;
        // A shared RAM file stays out of the stream: the caller saves it apart
        // ([`crate::ram`]). Only for this save: a live migration must send the RAM.
        let ram_apart = ram_apart && self.ram_saved_apart();
        self.set_ignore_shared(ram_apart).await?;
        let r = self.save_to(&path, timeout, &err).await;
        if ram_apart {
            let _ = self.set_ignore_shared(false).await;
        }
        r?;
        let size = std::fs::metadata(&path).map(|m| m.len()).map_err(|e| err(e.to_string()))?;
        tracing::info!(vm = %self.spec.id, size, ram_apart, "VM state saved");
        Ok(size)
    }

    /// Whether [`Vm::save_state_with`] can leave the RAM out of the stream (a shared RAM file).
    pub fn ram_saved_apart(&self) -> bool {
        matches!(self.spec.ram, crate::ram::RamBacking::Shared { .. })
    }

    /// Sets QEMU's `x-ignore-shared` migration capability.
    pub(crate) async fn set_ignore_shared(&self, on: bool) -> Result<(), VmError> {
        self.execute(
            "migrate-set-capabilities",
            Some(serde_json::json!({"capabilities": [{"capability": "x-ignore-shared", "state": on}]})),
        )
        .await
        .map(|_| ())
    }

    async fn save_to(&self, path: &Path, timeout: Duration, err: &(dyn Fn(String) -> VmError + Sync)) -> Result<(), VmError> {
        self.execute("migrate", Some(serde_json::json!({ "uri": format!("file:{}", path.display()) }))).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(exit) = self.exit_info() {
                return Err(err(format!("QEMU exited ({exit})")));
            }
            let mig = self.execute("query-migrate", None).await?;
            match mig.get("status").and_then(Value::as_str).unwrap_or("") {
                "completed" => break,
                "failed" | "cancelled" => {
                    let desc = mig.get("error-desc").and_then(Value::as_str).unwrap_or("no detail");
                    return Err(err(desc.to_string()));
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = self.execute("migrate_cancel", None).await;
                return Err(err(format!("not finished after {timeout:?}")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// SIGKILLs QEMU (if still running) and waits for it to exit.
    pub async fn kill(&self) -> Result<ExitInfo, VmError> {
        if let Some(e) = self.exit_info() {
            return Ok(e);
        }
        if !self.signallable() {
            return Ok(self.wait_exit().await);
        }
        tracing::info!(vm = %self.spec.id, pid = self.pid, "killing QEMU");
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => {
                return Err(VmError::Io {
                    id: self.spec.id.clone(),
                    path: PathBuf::from(format!("/proc/{}", self.pid)),
                    source: std::io::Error::from(e),
                })
            }
        }
        Ok(self.wait_exit().await)
    }

    /// Last `n` lines of the console log.
    pub fn tail_console(&self, n: usize) -> Vec<String> {
        tail_file(&self.console_log_path(), n)
    }

    /// Current length in bytes of the console log (an offset for [`Vm::wait_for_console_from`]).
    pub fn console_log_len(&self) -> u64 {
        std::fs::metadata(self.console_log_path()).map(|m| m.len()).unwrap_or(0)
    }

    /// Waits until `text` appears anywhere in the console log; returns the line holding it.
    pub async fn wait_for_console(&self, text: &str, timeout: Duration) -> Result<String, VmError> {
        self.wait_for_console_from(0, text, timeout).await
    }

    /// Waits until `text` appears in the console log after byte `offset`; returns the line
    /// holding it. Fails if QEMU exits first or `timeout` passes, with the last console lines.
    pub async fn wait_for_console_from(&self, offset: u64, text: &str, timeout: Duration) -> Result<String, VmError> {
        let path = self.console_log_path();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf: Vec<u8> = Vec::new();
        let mut pos = offset;
        let needle = text.as_bytes();
        loop {
            let exited = self.exit_info();
            // Read what is new since the last look.
            if let Ok(mut f) = tokio::fs::File::open(&path).await {
                if f.seek(std::io::SeekFrom::Start(pos)).await.is_ok() {
                    let mut chunk = Vec::new();
                    if let Ok(n) = f.read_to_end(&mut chunk).await {
                        pos += n as u64;
                        buf.extend_from_slice(&chunk);
                    }
                }
            }
            if let Some(i) = find(&buf, needle) {
                let start = buf[..i].iter().rposition(|&b| b == b'\n').map(|p| p + 1).unwrap_or(0);
                let end = buf[i..].iter().position(|&b| b == b'\n').map(|p| i + p).unwrap_or(buf.len());
                return Ok(String::from_utf8_lossy(&buf[start..end]).trim_end_matches('\r').to_string());
            }
            // Keep only a tail long enough to hold a match straddling two reads, plus its line.
            if buf.len() > 64 * 1024 + needle.len() {
                buf.drain(..buf.len() - 64 * 1024);
            }
            if let Some(exit) = exited {
                return Err(VmError::ConsoleExited {
                    id: self.spec.id.clone(),
                    text: text.to_string(),
                    exit,
                    tail: self.tail_console(20).join("\n"),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(VmError::ConsoleTimeout {
                    id: self.spec.id.clone(),
                    text: text.to_string(),
                    after: timeout,
                    tail: self.tail_console(20).join("\n"),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new connection to the serial console socket (for an interactive console). QEMU serves
    /// one console client at a time: while [`Vm::send_console`] holds its connection (until
    /// [`Vm::release_console`]), a second client connects but sees nothing. The client must
    /// keep reading: unread output fills the socket and stalls the guest's serial console.
    pub async fn console_connect(&self) -> Result<UnixStream, VmError> {
        let p = self.console_socket_path();
        UnixStream::connect(&p).await.map_err(|source| VmError::Io { id: self.spec.id.clone(), path: p, source })
    }

    /// Types `text` on the serial console, over a connection kept open for later calls.
    /// What the guest prints back on it is discarded (it is in the console log): a client
    /// that never reads would fill the socket and stall the guest's serial output.
    pub async fn send_console(&self, text: &str) -> Result<(), VmError> {
        let mut guard = self.console.lock().await;
        if guard.is_none() {
            let (mut read, write) = self.console_connect().await?.into_split();
            let drain = tokio::spawn(async move {
                let mut sink = tokio::io::sink();
                let _ = tokio::io::copy(&mut read, &mut sink).await;
            });
            *guard = Some(ConsoleWriter { write, drain });
        }
        let c = guard.as_mut().expect("console connected above");
        if let Err(source) = c.write.write_all(text.as_bytes()).await {
            *guard = None;
            return Err(VmError::Io { id: self.spec.id.clone(), path: self.console_socket_path(), source });
        }
        Ok(())
    }

    /// Closes the connection [`Vm::send_console`] keeps.
    pub async fn release_console(&self) {
        *self.console.lock().await = None;
    }

    /// Kills QEMU if it still runs, then removes the runtime directory (sockets, overlay, logs).
    pub async fn cleanup(&self) -> Result<(), VmError> {
        self.release_console().await;
        self.kill().await?;
        crate::ram::stop_pager(&self.dir).await;
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(VmError::RuntimeDir { id: self.spec.id.clone(), path: self.dir.clone(), source }),
        }
        tracing::info!(vm = %self.spec.id, dir = %self.dir.display(), "VM cleaned up");
        Ok(())
    }
}

/// The console connection [`Vm::send_console`] keeps, with the task draining its read side.
struct ConsoleWriter {
    write: tokio::net::unix::OwnedWriteHalf,
    drain: tokio::task::JoinHandle<()>,
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        self.drain.abort();
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn create_overlay(id: &str, qemu_img: &Path, disk: &DiskSource, overlay: &Path) -> Result<(), VmError> {
    let (backing, format) = disk.backing();
    let _ = std::fs::remove_file(overlay);
    let out = tokio::process::Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-b", &backing, "-F", format])
        .arg(overlay)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| VmError::Spawn { id: id.to_string(), binary: qemu_img.to_path_buf(), source })?;
    if !out.status.success() {
        let detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(VmError::Overlay {
            id: id.to_string(),
            path: overlay.to_path_buf(),
            backing,
            detail: if detail.is_empty() { exit_info_of(out.status).to_string() } else { detail },
        });
    }
    Ok(())
}

/// Version of `qemu-system-x86_64` (or `$VGRID_QEMU_SYSTEM`).
pub async fn qemu_version() -> Result<QemuVersion, VmError> {
    qemu_version_of(&LaunchOptions::default().qemu_system).await
}

/// Version of the given QEMU system emulator binary.
pub async fn qemu_version_of(binary: &Path) -> Result<QemuVersion, VmError> {
    let err = |detail: String| VmError::Version { binary: binary.to_path_buf(), detail };
    let out = tokio::process::Command::new(binary).arg("--version").stdin(Stdio::null()).output().await.map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(format!("{}: {}", exit_info_of(out.status), String::from_utf8_lossy(&out.stderr).trim())));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    parse_qemu_version(&text).ok_or_else(|| err(format!("unrecognised output {:?}", text.lines().next().unwrap_or(""))))
}

fn parse_qemu_version(text: &str) -> Option<QemuVersion> {
    let line = text.lines().next()?.trim();
    let rest = line.strip_prefix("QEMU emulator version ")?;
    let ver = rest.split_whitespace().next()?;
    let mut it = ver.split('.').map(|p| p.parse::<u32>());
    let major = it.next()?.ok()?;
    let minor = it.next().unwrap_or(Ok(0)).ok()?;
    let micro = it.next().unwrap_or(Ok(0)).ok()?;
    Some(QemuVersion { major, minor, micro, full: line.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgrid_api::vm::Forward;

    fn spec(dir: &Path) -> VmSpec {
        let k = dir.join("vmlinuz");
        let d = dir.join("disk.img");
        std::fs::write(&k, b"k").unwrap();
        std::fs::write(&d, b"d").unwrap();
        let config = VmConfig::new(vgrid_api::ImageRef { name: "sample".into(), version: Some(1) })
            .with_memory_mib(128)
            .with_forwards(vec![Forward { host: 2222, guest: 22 }])
            .with_accel(Some(Accel::Tcg));
        VmSpec::new(
            "vm-1",
            config,
            DiskSource::raw_file(d),
            BootSource::Kernel { kernel: k, initrd: None, cmdline: "console=ttyS0".into() },
        )
    }

    #[test]
    fn version_parsing() {
        let v = parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright").unwrap();
        assert_eq!((v.major, v.minor, v.micro), (10, 0, 2));
        assert!(v.full.contains("Debian"));
        assert!(parse_qemu_version("qemu-img version 10").is_none());
    }

    #[test]
    fn spec_validation_names_the_vm_and_the_cause() {
        let t = tempfile::tempdir().unwrap();
        let good = spec(t.path());
        validate_spec(&good).unwrap();

        let mut s = good.clone();
        s.boot = BootSource::Kernel { kernel: t.path().join("nope"), initrd: None, cmdline: String::new() };
        let e = validate_spec(&s).unwrap_err().to_string();
        assert!(e.contains("vm-1") && e.contains("kernel") && e.contains("nope"), "{e}");

        let mut s = good.clone();
        s.id = "bad id,x".into();
        assert!(matches!(validate_spec(&s), Err(VmError::InvalidSpec { .. })));

        let mut s = good.clone();
        s.config.cpus = 0;
        assert!(validate_spec(&s).unwrap_err().to_string().contains("cpus"));

        let mut s = good.clone();
        s.disk = DiskSource::Nbd { url: "http://x".into() };
        assert!(validate_spec(&s).unwrap_err().to_string().contains("http://x"));

        let mut s = good.clone();
        s.config = s.config.with_forwards(vec![Forward { host: 2222, guest: 22 }, Forward { host: 2222, guest: 80 }]);
        assert!(validate_spec(&s).unwrap_err().to_string().contains("2222"));
    }

    #[test]
    fn args_hold_the_runtime_files_and_forwards() {
        let t = tempfile::tempdir().unwrap();
        let s = spec(t.path());
        let dir = Path::new("/run/vg,rid/vm-1");
        let a = qemu_args(&s, Accel::Tcg, dir).join(" ");
        assert!(a.contains("-accel tcg"), "{a}");
        assert!(a.contains("path=/run/vg,,rid/vm-1/console.sock"), "{a}");
        assert!(a.contains("logfile=/run/vg,,rid/vm-1/console.log"), "{a}");
        assert!(a.contains("-qmp unix:/run/vg,,rid/vm-1/qmp.sock,server=on,wait=off"), "{a}");
        assert!(a.contains("file.filename=/run/vg,,rid/vm-1/overlay.qcow2"), "{a}");
        assert!(a.contains("hostfwd=tcp:127.0.0.1:2222-:22"), "{a}");
        assert!(a.contains("-machine pc"), "{a}");
        assert!(!a.contains("-cpu host"), "{a}");
    }

    #[test]
    fn spec_json_round_trips() {
        let t = tempfile::tempdir().unwrap();
        let s = spec(t.path());
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains("\"kind\":\"file\""), "{j}");
        let back: VmSpec = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
        let nbd = DiskSource::nbd_unix("/run/proxy.sock", "debian");
        assert_eq!(nbd, DiskSource::Nbd { url: "nbd+unix:///debian?socket=/run/proxy.sock".into() });
    }

    #[test]
    fn vm_can_be_shared_across_tasks() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<Vm>();
        send_sync::<QmpClient>();
        send_sync::<VmError>();
    }
}
