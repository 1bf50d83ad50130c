//! A VM's runtime directory: its file names, preparing it for a launch, the recorded spec,
//! and whether a QEMU still runs in it (pid file and `/proc`).
//!
//! Every VM lives in a runtime directory chosen by the caller:
//!
//! | file | what |
//! | --- | --- |
//! | `spec.json` | the [`VmSpec`](crate::spec::VmSpec) as launched (accelerator resolved), for re-adoption |
//! | `pid` | QEMU's pid (written by QEMU's `-pidfile`) |
//! | `qmp.sock` | QMP server socket (one client at a time) |
//! | `console.sock` | serial console (ttyS0) socket server (one client at a time) |
//! | `console.log` | everything the guest wrote on its serial console |
//! | `vnc.sock` | the guest's display (VGA) as a VNC (RFB) server socket: never a TCP port |
//! | `overlay.qcow2` | the per-VM copy-on-write disk whose backing is the image |
//! | `seed.img` | the cloud-init NoCloud seed (`CIDATA`), when the VM has cloud-init data |
//! | `qemu.log` | QEMU's own stdout and stderr |
//! | `launch.json` | the coordinator's launch request (id, configuration, image), for re-adoption |
//! | `incoming` | present while QEMU waits for an incoming migration |
//! | `console.before-migration.log` | the guest's console before it migrated here |
//!
//! The guest disk is always a qcow2 overlay over the (read-only) backing — a local file or the
//! block proxy's NBD export — attached as virtio-blk; guest writes land in the overlay only.

use crate::spec::VmSpec;
use crate::vm::error::VmError;
use std::path::{Path, PathBuf};
use vgrid_api::host::LaunchRequest;

/// File names inside a VM's runtime directory.
pub const SPEC_FILE: &str = "spec.json";
pub const PID_FILE: &str = "pid";
pub const QMP_SOCKET: &str = "qmp.sock";
pub const CONSOLE_SOCKET: &str = "console.sock";
pub const CONSOLE_LOG: &str = "console.log";
pub const VNC_SOCKET: &str = "vnc.sock";
pub const OVERLAY_FILE: &str = "overlay.qcow2";
pub const SEED_FILE: &str = "seed.img";

/// The overlay of read-write volume `index` in a runtime directory: its writes since the
/// version it started from.
pub fn volume_overlay(dir: &std::path::Path, index: usize) -> std::path::PathBuf {
    dir.join(format!("volume{index}.qcow2"))
}
/// Whether files in `dir` can be opened with `O_DIRECT` (some file systems refuse it). The guest's
/// writable overlays bypass the host's page cache where they can (QEMU `cache.direct=on`, the
/// `cache=none` OpenStack and libvirt default): the guest caches its own disk, and host page
/// cache of a VM's writes would be charged to the VM's memory cgroup, where reclaiming it
/// (waiting for writeback inside a limit a little above guest RAM) stalled the guest's writes
/// (bench/volume: 256 MiB written in 0.65 s against 0.2 s without the limit).
pub fn direct_io_ok(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join(".direct-io-probe");
    let ok = std::fs::OpenOptions::new().write(true).create(true).truncate(true).custom_flags(libc::O_DIRECT).open(&probe).is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}
pub const QEMU_LOG: &str = "qemu.log";
/// The VM's [`LaunchRequest`] (see [`record_launch`]).
pub const LAUNCH_FILE: &str = "launch.json";
/// Marks a runtime directory whose QEMU still waits for an incoming migration: an agent that
/// restarts kills such a QEMU instead of adopting it.
pub const INCOMING_MARKER: &str = "incoming";
/// Marks the runtime directory of a VM whose live migration to another host completed: its
/// volumes' writes went with it, so this host must not commit them when the VM goes here.
pub const MIGRATED_MARKER: &str = "migrated-away";
/// What the guest printed on its console before it arrived here (the source's log, as the
/// coordinator hands it over at the end of the migration); served before `console.log`.
pub const CONSOLE_HISTORY: &str = "console.before-migration.log";

/// Records the launch request next to the VM's spec (best effort: adoption works without it,
/// only the image's cache fraction is then not advertised).
pub(crate) fn record_launch(dir: &Path, req: &LaunchRequest) {
    match serde_json::to_vec_pretty(req) {
        Ok(b) => {
            if let Err(e) = crate::qemu_user::write_file(&dir.join(LAUNCH_FILE), &b) {
                tracing::warn!(vm = %req.id, "cannot write {}: {e}", dir.join(LAUNCH_FILE).display());
            }
        }
        Err(e) => tracing::warn!(vm = %req.id, "cannot encode the launch request: {e}"),
    }
}

/// Longest path a unix socket address can hold (sun_path is 108 bytes with the NUL).
pub(crate) const MAX_SOCKET_PATH: usize = 107;

/// Whether the QEMU of runtime directory `dir` (its pid file) still runs.
pub(crate) fn qemu_runs_in(dir: &Path) -> bool {
    read_pid_file(&dir.join(PID_FILE)).is_some_and(|pid| pid_is_qemu_of(pid, dir))
}

/// True if `pid` is a live (not zombie) process whose command line mentions `dir`'s QMP socket.
pub(crate) fn pid_is_qemu_of(pid: u32, dir: &Path) -> bool {
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
pub(crate) fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z') | Some('X')),
            None => true,
        },
        Err(_) => false,
    }
}

pub(crate) fn read_pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Last `n` lines of a text file (lossy UTF-8, `\r` removed); empty if it does not exist.
pub(crate) fn tail_file(path: &Path, n: usize) -> Vec<String> {
    let Ok(bytes) = crate::qemu_user::read_file(path) else {
        return Vec::new();
    };
    let start = bytes.len().saturating_sub(64 * 1024);
    let text = String::from_utf8_lossy(&bytes[start..]).replace('\r', "");
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|s| s.to_string()).collect()
}

/// Makes `dir` ready for a new QEMU of VM `id`: created, private to the agent (and QEMU's
/// user), no QEMU running in it, no sockets, pid file or logs of an earlier run. Returns its
/// canonical path. `run_as`: QEMU runs as its own user, which an earlier launch gave the
/// directory to; the agent takes it back while it writes.
pub(crate) fn prepare(id: &str, dir: &Path, run_as: bool) -> Result<PathBuf, VmError> {
    let io_err = |path: &Path, source| VmError::RuntimeDir { id: id.to_string(), path: path.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    // The overlay (the guest's writes), the QMP and console sockets and the logs are the
    // agent's and QEMU's only: no other local user may read the guest's data or drive it.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| io_err(dir, e))?;
    }
    // Handed to QEMU's user by an earlier launch: take it back while the agent writes.
    if run_as {
        crate::qemu_user::reclaim(dir).map_err(|e| io_err(dir, e))?;
    }
    let dir = std::fs::canonicalize(dir).map_err(|e| io_err(dir, e))?;
    for sock in [QMP_SOCKET, CONSOLE_SOCKET] {
        let p = dir.join(sock);
        if p.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VmError::SocketPathTooLong { id: id.to_string(), path: p, max: MAX_SOCKET_PATH });
        }
    }
    if let Some(pid) = read_pid_file(&dir.join(PID_FILE)) {
        if pid_is_qemu_of(pid, &dir) {
            return Err(VmError::AlreadyRunning { id: id.to_string(), dir, pid });
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
    Ok(dir)
}

/// Records `spec` (as launched) in `dir`'s `spec.json`, for re-adoption.
pub(crate) fn write_spec(dir: &Path, spec: &VmSpec) -> Result<(), VmError> {
    let spec_json = serde_json::to_vec_pretty(spec).map_err(|e| VmError::InvalidSpec {
        id: spec.id.clone(),
        reason: format!("cannot record the spec as JSON (a path that is not UTF-8?): {e}"),
    })?;
    let spec_path = dir.join(SPEC_FILE);
    crate::qemu_user::write_file(&spec_path, &spec_json).map_err(|source| VmError::RuntimeDir {
        id: spec.id.clone(),
        path: spec_path,
        source,
    })
}

/// The spec a launch wrote into `dir` (`None` when absent or unreadable).
pub(crate) fn read_spec(dir: &Path) -> Option<VmSpec> {
    let b = std::fs::read(dir.join(SPEC_FILE)).ok()?;
    serde_json::from_slice(&b).ok()
}
