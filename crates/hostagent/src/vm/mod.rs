//! The QEMU driver: one [`Vm`] per running `qemu-system-x86_64` process, in a runtime
//! directory ([`crate::runtime`]) chosen by the caller. Starting and re-adopting QEMU is in
//! [`launch`], the serial console in [`console`]; this module holds the running VM's QMP
//! side (status, pause, power-down, kill, saving its state) and the driver's errors.
//!
//! The guest disk is always a qcow2 overlay over the (read-only) backing — a local file or the
//! block proxy's NBD export — attached as virtio-blk; guest writes land in the overlay only.

mod console;
pub(crate) mod error;
mod launch;

use crate::accel::Accel;
use crate::qmp::{QmpClient, QmpError, QmpEvent};
use crate::runtime::{pid_is_qemu_of, CONSOLE_LOG, CONSOLE_SOCKET, OVERLAY_FILE, QEMU_LOG, QMP_SOCKET};
use crate::spec::VmSpec;
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// How long [`Vm::powerdown`] waits for QEMU to exit after `quit` before killing it.
pub const QUIT_GRACE: Duration = Duration::from_secs(10);

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
    pub disk_throttle: Option<crate::qemu::args::DiskThrottle>,
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

pub use error::VmError;
pub use vgrid_api::host::ExitInfo;

/// How a child process ended.
pub(crate) fn exit_info_of(st: std::process::ExitStatus) -> ExitInfo {
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

/// A running (or exited) QEMU process and its QMP session.
pub struct Vm {
    spec: VmSpec,
    accel: Accel,
    dir: PathBuf,
    pid: u32,
    qmp: QmpClient,
    exit: watch::Receiver<Option<ExitInfo>>,
    console: tokio::sync::Mutex<Option<console::ConsoleWriter>>,
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

impl Vm {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_can_be_shared_across_tasks() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<Vm>();
        send_sync::<QmpClient>();
        send_sync::<VmError>();
    }
}
