//! Starting QEMU for a spec ([`Vm::launch_with`], a few named steps: the saved state, the
//! runtime directory, absolute paths, the overlays and the cloud-init seed, the command, the spawn, QMP) and
//! re-attaching to one an earlier agent started ([`Vm::adopt`]).

use super::{exit_info_of, ExitInfo, LaunchOptions, Vm, VmError};
use crate::accel::Accel;
use crate::qmp::QmpClient;
use crate::ram::RamBacking;
use crate::runtime::{
    self, pid_alive, pid_is_qemu_of, read_pid_file, tail_file, CONSOLE_LOG, OVERLAY_FILE, PID_FILE, QEMU_LOG, QMP_SOCKET, SPEC_FILE,
};
use crate::spec::{check_file, validate_spec, BootSource, DiskSource, VmSpec};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::sync::watch;

impl Vm {
    /// Starts QEMU for `spec` in `runtime_dir` (created if missing) with default options, and
    /// returns once QMP is connected.
    pub async fn launch(spec: VmSpec, runtime_dir: impl AsRef<Path>) -> Result<Vm, VmError> {
        Self::launch_with(spec, runtime_dir, &LaunchOptions::default()).await
    }

    /// [`Vm::launch`] with explicit options.
    pub async fn launch_with(mut spec: VmSpec, runtime_dir: impl AsRef<Path>, opts: &LaunchOptions) -> Result<Vm, VmError> {
        validate_spec(&spec)?;
        let incoming = saved_state(&spec.id, opts)?;
        let accel = spec.config.accel.unwrap_or_else(crate::accel::detect);
        spec.config.accel = Some(accel);
        let dir = runtime::prepare(&spec.id, runtime_dir.as_ref(), opts.run_as.is_some())?;
        make_paths_absolute(&mut spec)?;
        create_overlays(&spec, &dir, opts.reuse_overlay, &opts.qemu_img).await?;
        if let Some(c) = &spec.config.cloud_init {
            let seed = dir.join(runtime::SEED_FILE);
            crate::cloudinit::write_seed(&seed, &spec.id, c, crate::cloudinit::has_staging(&spec))
                .map_err(|source| VmError::RuntimeDir { id: spec.id.clone(), path: seed.clone(), source })?;
        }
        runtime::write_spec(&dir, &spec)?;
        let cmd = qemu_command(&mut spec, accel, &dir, incoming.as_deref(), opts)?;
        // QEMU holds its RAM file from start-up on; the name goes once QMP answers (below), or
        // when QEMU ends first.
        let ram_file = match &spec.ram {
            RamBacking::Shared { path } => Some(path.clone()),
            _ => None,
        };
        let (pid, exit_rx) = spawn_qemu(&spec, &dir, cmd, ram_file.clone(), opts).await?;
        let qmp = connect_qmp(&spec.id, &dir, pid, exit_rx.clone(), opts).await?;
        tracing::info!(vm = %spec.id, pid, ram = spec.ram.describe(), "QEMU started, QMP connected");
        if let Some(f) = &ram_file {
            // QEMU maps it now: the memory lives as long as QEMU, not as long as a name.
            let _ = std::fs::remove_file(f);
        }
        let vm = Vm::running(spec, accel, dir, pid, qmp, exit_rx, opts, false);
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
        let lazy_dir = matches!(spec.ram, RamBacking::Lazy { .. }).then(|| dir.clone());
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
        Ok(Vm::running(spec, accel, dir, pid, qmp, exit_rx, opts, true))
    }

    /// Creates `spec`'s qcow2 overlays in the runtime directory `dir` (which exists) ahead of
    /// [`Vm::launch_with`], which then keeps them (`reuse_overlay`): a restore makes them while
    /// its RAM pager starts, two processes that need nothing of each other.
    pub(crate) async fn create_overlays_ahead(spec: &VmSpec, dir: &Path, opts: &LaunchOptions) -> Result<(), VmError> {
        let mut spec = spec.clone();
        make_paths_absolute(&mut spec)?;
        create_overlays(&spec, dir, false, &opts.qemu_img).await
    }

    /// The `Vm` of a QEMU that runs with QMP connected (launched here, or `adopted`).
    #[allow(clippy::too_many_arguments)]
    fn running(
        spec: VmSpec,
        accel: Accel,
        dir: PathBuf,
        pid: u32,
        qmp: QmpClient,
        exit: watch::Receiver<Option<ExitInfo>>,
        opts: &LaunchOptions,
        adopted: bool,
    ) -> Vm {
        Vm { spec, accel, dir, pid, qmp, exit, console: tokio::sync::Mutex::new(None), kill_on_drop: opts.kill_on_drop, adopted }
    }
}

/// The disk's overlay and each read-write volume's (existing ones kept when `reuse`).
async fn create_overlays(spec: &VmSpec, dir: &Path, reuse: bool, qemu_img: &Path) -> Result<(), VmError> {
    let overlay = dir.join(OVERLAY_FILE);
    if !(reuse && overlay.exists()) {
        create_overlay(&spec.id, qemu_img, &spec.disk, &overlay).await?;
    }
    for (i, att, disk) in spec.volumes() {
        let o = runtime::volume_overlay(dir, i);
        let kept = reuse && o.exists();
        if !att.readonly && !kept {
            create_overlay(&spec.id, qemu_img, disk, &o).await?;
        }
    }
    Ok(())
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

/// The saved state a launch starts from ([`LaunchOptions::incoming`]), as an absolute path.
fn saved_state(id: &str, opts: &LaunchOptions) -> Result<Option<PathBuf>, VmError> {
    let Some(state) = &opts.incoming else { return Ok(None) };
    check_file(id, "saved state", state)?;
    let state =
        std::fs::canonicalize(state).map_err(|_| VmError::MissingFile { id: id.to_string(), what: "saved state", path: state.clone() })?;
    Ok(Some(state))
}

/// Absolute paths: QEMU runs in the runtime directory, and the overlay records its backing
/// verbatim.
fn make_paths_absolute(spec: &mut VmSpec) -> Result<(), VmError> {
    let id = spec.id.clone();
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
    Ok(())
}

/// The only environment QEMU gets besides `LC_ALL=C` (see [`qemu_command`]'s `env_clear`).
const QEMU_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The QEMU command for `spec` in `dir`: its log file, the directory handed to QEMU's user,
/// a shared RAM file for anonymous RAM (recorded in `spec.ram`), and the arguments.
fn qemu_command(
    spec: &mut VmSpec,
    accel: Accel,
    dir: &Path,
    incoming: Option<&Path>,
    opts: &LaunchOptions,
) -> Result<tokio::process::Command, VmError> {
    let id = spec.id.clone();
    let io_err = |path: &Path, source| VmError::RuntimeDir { id: id.clone(), path: path.to_path_buf(), source };
    let log_path = dir.join(QEMU_LOG);
    let log = std::fs::File::create(&log_path).map_err(|e| io_err(&log_path, e))?;
    // QEMU starts as its own user: the directory and what is in it (overlay, kernel,
    // initrd, incoming state) become its own; the agent (root) keeps access.
    if let Some(u) = &opts.run_as {
        u.give(dir).map_err(|e| io_err(dir, e))?;
    }
    let log2 = log.try_clone().map_err(|e| io_err(&log_path, e))?;
    if let (RamBacking::Anonymous, Some(ram_dir)) = (&spec.ram, &opts.ram_dir) {
        let owner = opts.run_as.as_ref().map(|u| (u.uid, u.gid));
        let path = crate::ram::create_shared(ram_dir, &id, owner).map_err(|e| io_err(ram_dir, e))?;
        spec.ram = RamBacking::Shared { path };
    }
    let mut args = crate::qemu::qemu_args(spec, accel, dir);
    args.extend(crate::qemu::args::incoming_args(incoming, opts.defer_incoming));
    if let Some(t) = &opts.disk_throttle {
        crate::qemu::args::throttle_args(&mut args, t);
    }
    tracing::info!(vm = %id, accel = %accel, dir = %dir.display(), "starting QEMU");
    tracing::debug!(vm = %id, ?args, "QEMU command line");
    let mut cmd = tokio::process::Command::new(&opts.qemu_system);
    cmd.args(&args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .kill_on_drop(false)
        // A clean environment, as libvirt gives QEMU: nothing of the agent's (credentials,
        // LD_PRELOAD, proxies) reaches the guest's process.
        .env_clear()
        .env("PATH", QEMU_PATH)
        .env("LC_ALL", "C")
        // Own process group: a terminal's ^C to the agent does not reach the guests.
        .process_group(0);
    if matches!(spec.ram, RamBacking::Lazy { .. }) {
        crate::ram::ignore_hugepage_advice(&mut cmd);
    }
    if let Some(u) = &opts.run_as {
        u.apply(&mut cmd);
        tracing::debug!(vm = %id, user = %u.name, uid = u.uid, "QEMU drops to its own user");
    }
    Ok(cmd)
}

/// Spawns QEMU, puts it into its cgroup, and starts the task that reaps it: it removes the
/// RAM file's name and stops a lazy-RAM pager when QEMU ends, and sends the exit on the
/// returned channel.
async fn spawn_qemu(
    spec: &VmSpec,
    dir: &Path,
    mut cmd: tokio::process::Command,
    ram_file: Option<PathBuf>,
    opts: &LaunchOptions,
) -> Result<(u32, watch::Receiver<Option<ExitInfo>>), VmError> {
    let id = spec.id.clone();
    let mut child = cmd.spawn().map_err(|source| VmError::Spawn { id: id.clone(), binary: opts.qemu_system.clone(), source })?;
    let pid = child.id().unwrap_or(0);
    if let Some(cg) = &opts.cgroup {
        if let Err(e) = cg.attach(pid) {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(VmError::InvalidSpec { id, reason: format!("cannot put QEMU into its cgroup: {e}") });
        }
    }
    let lazy_dir = matches!(spec.ram, RamBacking::Lazy { .. }).then(|| dir.to_path_buf());
    let (exit_tx, exit_rx) = watch::channel(None);
    tokio::spawn(async move {
        let info = match child.wait().await {
            Ok(st) => exit_info_of(st),
            Err(e) => {
                tracing::warn!(vm = %id, error = %e, "waiting for QEMU failed");
                ExitInfo::unknown()
            }
        };
        tracing::info!(vm = %id, %info, "QEMU exited");
        if let Some(f) = ram_file {
            let _ = std::fs::remove_file(f);
        }
        if let Some(d) = lazy_dir {
            crate::ram::stop_pager(&d).await;
        }
        let _ = exit_tx.send(Some(info));
    });
    Ok((pid, exit_rx))
}

/// How long [`connect_qmp`] tries every 2 ms.
const QMP_FAST_POLL_FOR: Duration = Duration::from_secs(2);

/// Waits for QEMU's QMP socket and connects to it; fails if QEMU exits first (with what QEMU
/// and the console said) or does not open it within the start-up timeout (killing it).
async fn connect_qmp(
    id: &str,
    dir: &Path,
    pid: u32,
    mut exit_rx: watch::Receiver<Option<ExitInfo>>,
    opts: &LaunchOptions,
) -> Result<QmpClient, VmError> {
    let log_path = dir.join(QEMU_LOG);
    let early_exit = |exit: ExitInfo| {
        let stderr = tail_file(&log_path, 20).join("\n");
        let console = tail_file(&dir.join(CONSOLE_LOG), 10);
        let console = if console.is_empty() { String::new() } else { format!("\nlast console lines:\n{}", console.join("\n")) };
        VmError::EarlyExit { id: id.to_string(), exit, stderr: stderr.trim().to_string(), console }
    };
    let qmp_path = dir.join(QMP_SOCKET);
    let started = tokio::time::Instant::now();
    let deadline = started + opts.startup_timeout;
    loop {
        if let Some(exit) = *exit_rx.borrow() {
            return Err(early_exit(exit));
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            return Err(VmError::StartTimeout {
                id: id.to_string(),
                after: opts.startup_timeout,
                stderr: tail_file(&log_path, 20).join("\n"),
            });
        }
        match QmpClient::connect(&qmp_path, Duration::from_secs(10)).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::trace!(vm = %id, error = %e, "QMP not ready yet");
                // QEMU opens its socket 20-60 ms after it starts: a try every 2 ms then (a
                // failed connect costs microseconds; every start waited for the next try of
                // 50 ms before), every 50 ms after the first seconds.
                let pause = if started.elapsed() < QMP_FAST_POLL_FOR { Duration::from_millis(2) } else { Duration::from_millis(50) };
                tokio::select! {
                    _ = exit_rx.changed() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}
