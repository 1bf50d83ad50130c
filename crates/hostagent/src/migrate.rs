//! Live migration, host side: the destination prepares an incoming QEMU, the source mirrors
//! its disk overlay there and moves RAM by pre-copy over TCP.
//!
//! Destination ([`incoming`]): the image opens lazily through this host's own block
//! proxy and cache, an empty qcow2 overlay goes on top, QEMU starts with `-incoming defer`;
//! QMP `nbd-server-start` + `block-export-add` export the overlay's format node (`vda`, and
//! each read-write volume's `volN`) writable on a TCP port, and `migrate-incoming` listens on another.
//!
//! Source ([`send`], a background task polled with [`send_status`]): QMP
//! `blockdev-add` of an NBD client node on the destination's export, `blockdev-mirror`
//! `sync=top` of `vda` into it (only what the overlay holds travels; the base is the image,
//! which the destination reads from its own cache), and the same for each read-write volume's
//! overlay `volN` (exported by the destination too: a volume's uncommitted writes travel like
//! the root disk's, over the same committed version); once the mirrors are ready,
//! `migrate-set-capabilities` (`events`, `auto-converge`, `pause-before-switchover`),
//! `migrate-set-parameters` (`downtime-limit`: 10 ms first, doubled every 2 s after the first pass up to
//! the limit asked for, see [`DowntimeSteps`]; `max-bandwidth`, and `tls-creds`: both the disk
//! and the memory streams are TLS with the two hosts' grid certificates, see
//! [`crate::tlscreds`]) and `migrate` to `fd:`, a connection this agent dials and hands to QEMU
//! (see [`memory_stream`]). At
//! `pre-switchover` (the guest is paused) the mirrors are cancelled, which flushes what is left
//! without pivoting, and `migrate-continue` lets QEMU finish: the destination then owns
//! complete overlays, and the source marks its runtime directory ([`MIGRATED_MARKER`]) so that
//! its QEMU's end does not commit the volumes' writes (they run on at the destination). If the migration fails, is cancelled, or is still running after its maximum
//! duration: `migrate_cancel`, the mirror is cancelled, the NBD node removed, and the guest runs
//! on at the source (resumed if the cancel left it paused).

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vgrid_api::host::{IncomingReady, IncomingRequest, Launched, SendRequest, MAX_CONSOLE_HISTORY};
use vgrid_api::migrate::{Migration, MigrationStatus};

use crate::ctx::{HostCtx, Outgoing};
use crate::error::AgentError;
use crate::runtime::{CONSOLE_HISTORY, INCOMING_MARKER, MIGRATED_MARKER};
use crate::vm::{LaunchOptions, Vm};

/// Name of the NBD client node (source) and of the export (destination).
const TARGET_NODE: &str = "vgrid-mig-dst";
const MIRROR_JOB: &str = "vgrid-mig-disk";
const EXPORT_ID: &str = "vgrid-mig-vda";
/// The overlay's format node, as `qemu_args` names it.
const DISK_NODE: &str = "vda";

/// One disk that travels with a live migration: the root overlay, and the overlay of each
/// read-write volume (a read-only volume is the same export on both hosts).
struct MigDisk {
    /// Its overlay's format node, as `qemu_args` names it; also the export's name.
    node: String,
    /// The mirror job (source).
    job: String,
    /// The NBD client node on the destination's export (source).
    target: String,
    /// The NBD export (destination).
    export: String,
}

/// The disks of `spec` that a live migration mirrors.
fn mig_disks(spec: &crate::spec::VmSpec) -> Vec<MigDisk> {
    let mut out = vec![MigDisk { node: DISK_NODE.into(), job: MIRROR_JOB.into(), target: TARGET_NODE.into(), export: EXPORT_ID.into() }];
    for (i, _, _) in spec.volumes().filter(|(_, a, _)| !a.readonly) {
        out.push(MigDisk {
            node: format!("vol{i}"),
            job: format!("{MIRROR_JOB}-vol{i}"),
            target: format!("{TARGET_NODE}-vol{i}"),
            export: format!("vgrid-mig-vol{i}"),
        });
    }
    out
}
/// The source's status of a migration it starts sending now: the record's type, with the
/// source's phase.
fn first_status(from: &str, req: &SendRequest) -> Migration {
    Migration { phase: "starting".into(), ..Migration::begin(from, &req.to, req.downtime_ms, req.max_seconds, unix_now()) }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn mig_err(id: &str, what: impl Into<String>) -> AgentError {
    AgentError::Migration { id: id.to_string(), detail: what.into() }
}

/// A TCP port free on `host` now (QEMU binds it right after; retried on a clash).
fn free_port(host: &str) -> Result<u16, std::io::Error> {
    let l = std::net::TcpListener::bind((host, 0))?;
    Ok(l.local_addr()?.port())
}

fn u64_at(v: &Value, path: &[&str]) -> Option<u64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_u64()
}

/// Destination: starts QEMU for `req.launch` waiting for an incoming migration, with the
/// (empty) overlay exported writable over NBD. The VM is not reported as running until
/// [`incoming_finish`].
pub async fn incoming(ctx: &HostCtx, req: IncomingRequest) -> Result<IncomingReady, AgentError> {
    let id = req.launch.id.clone();
    if ctx.has_vm(&id) || ctx.migrations().incoming.lock().unwrap().contains_key(&id) {
        return Err(mig_err(&id, "this host already has a VM with this id"));
    }
    // The same admission, cgroup and limits as a VM started here.
    let accel = crate::instantiate::requested_accel(&req.launch)?.unwrap_or_else(crate::accel::detect);
    let limits = ctx.resources().admit(&id, &req.launch.config.resources, req.launch.config.memory_mib, accel)?;
    let r = incoming_admitted(ctx, req, &limits).await;
    if r.is_err() {
        ctx.resources().release(&id);
        ctx.net.unplug(&id);
    }
    r
}

async fn incoming_admitted(ctx: &HostCtx, req: IncomingRequest, limits: &crate::cgroup::Limits) -> Result<IncomingReady, AgentError> {
    let id = req.launch.id.clone();
    let (spec, dir, _) = crate::instantiate::prepare_spec(ctx, &req.launch, &|_| {}).await?;
    let cgroup = ctx.resources().create_group(&id, limits)?;
    let opts = LaunchOptions {
        defer_incoming: true,
        cgroup: cgroup.clone(),
        disk_throttle: crate::qemu::args::DiskThrottle::of(&req.launch.config.resources),
        ..ctx.launch_options()
    };
    let vm = Vm::launch_with(spec, &dir, &opts).await?;
    // Until the guest runs here: a console stalled at the source runs on only with a client
    // connected when its state loads (released in `incoming_finish`, or with the VM).
    vm.hold_console_for_load().await;
    ctx.resources().track(&vm, cgroup, limits, 0);
    let _ = crate::qemu_user::write_file(&dir.join(INCOMING_MARKER), b"waiting for an incoming migration\n");
    crate::runtime::record_launch(&dir, &req.launch);
    let vm = Arc::new(vm);
    match open_incoming(ctx, &vm, &req.listen_host).await {
        Ok((nbd_port, migration_port)) => {
            ctx.migrations().incoming.lock().unwrap().insert(id.clone(), vm.clone());
            tracing::info!(vm = %id, nbd_port, migration_port, pid = vm.pid(), "waiting for an incoming migration");
            Ok(IncomingReady { host: req.listen_host.clone(), nbd_port, migration_port, pid: vm.pid(), accel: vm.accel() })
        }
        Err(e) => {
            let _ = vm.cleanup().await;
            Err(e)
        }
    }
}

async fn open_incoming(ctx: &HostCtx, vm: &Vm, host: &str) -> Result<(u16, u16), AgentError> {
    let id = vm.id().to_string();
    let io = |e: std::io::Error| mig_err(&id, format!("no free TCP port on {host}: {e}"));
    vm.execute("migrate-set-capabilities", Some(json!({"capabilities": [{"capability": "events", "state": true}]}))).await?;
    // Both streams are TLS with this host's grid certificate; the source must show one too.
    let qemu_user = ctx.qemu_user().cloned();
    let give = move |d: &std::path::Path| qemu_user.as_ref().map_or(Ok(()), |u| u.give(d));
    let tls = crate::tlscreds::add(vm, true, &give).await?;
    let mut last = None;
    let mut nbd_port = 0;
    for _ in 0..3 {
        nbd_port = free_port(host).map_err(io)?;
        let mut args = json!({"addr": {"type": "inet", "data": {"host": host, "port": nbd_port.to_string()}}});
        if let Some(t) = tls {
            args["tls-creds"] = json!(t);
        }
        let r = vm.execute("nbd-server-start", Some(args)).await;
        match r {
            Ok(_) => {
                last = None;
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    if let Some(e) = last {
        return Err(e.into());
    }
    // The root overlay and each read-write volume's, exported under their node names.
    for d in mig_disks(vm.spec()) {
        vm.execute("block-export-add", Some(json!({"type": "nbd", "id": d.export, "node-name": d.node, "name": d.node, "writable": true})))
            .await?;
    }
    if let Some(t) = tls {
        vm.execute("migrate-set-parameters", Some(json!({"tls-creds": t}))).await?;
    }
    let mut last = None;
    let mut mig_port = 0;
    for _ in 0..3 {
        mig_port = free_port(host).map_err(io)?;
        match vm.execute("migrate-incoming", Some(json!({"uri": format!("tcp:{host}:{mig_port}")}))).await {
            Ok(_) => {
                last = None;
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    if let Some(e) = last {
        return Err(e.into());
    }
    Ok((nbd_port, mig_port))
}

/// Destination: once the source's migration completed, waits until the guest runs here,
/// closes the NBD export and takes the VM as one of this host's.
pub async fn incoming_finish(ctx: &HostCtx, id: &str, timeout: Duration, history: &str) -> Result<Launched, AgentError> {
    let vm = ctx.migrations().incoming.lock().unwrap().get(id).cloned().ok_or_else(|| AgentError::UnknownVm(id.to_string()))?;
    if !history.is_empty() {
        let tail = &history.as_bytes()[history.len().saturating_sub(MAX_CONSOLE_HISTORY)..];
        let p = vm.runtime_dir().join(CONSOLE_HISTORY);
        if let Err(e) = crate::qemu_user::write_file(&p, tail) {
            tracing::warn!(vm = %id, "cannot write {}: {e}", p.display());
        }
    }
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(exit) = vm.exit_info() {
            return Err(mig_err(id, format!("the destination QEMU exited ({exit}): {}", qemu_log_tail(ctx, id))));
        }
        let st = vm.execute("query-status", None).await?;
        let status = st.get("status").and_then(Value::as_str).unwrap_or("").to_string();
        if status == "running" {
            break;
        }
        let mig = vm.execute("query-migrate", None).await?;
        match mig.get("status").and_then(Value::as_str) {
            Some("failed") => {
                let desc = mig.get("error-desc").and_then(Value::as_str).unwrap_or("no detail");
                return Err(mig_err(id, format!("receiving the migration failed: {desc}")));
            }
            Some("completed") if status == "paused" => {
                // The source was paused when it left: run it here.
                vm.cont().await?;
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(mig_err(id, format!("the destination is still {status} after {timeout:?}")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    vm.release_console().await;
    for d in mig_disks(vm.spec()) {
        if let Err(e) = vm.execute("block-export-del", Some(json!({"id": d.export, "mode": "hard"}))).await {
            tracing::warn!(vm = %id, "removing the migration export {}: {e}", d.export);
        }
    }
    if let Err(e) = vm.execute("nbd-server-stop", None).await {
        tracing::warn!(vm = %id, "stopping the migration NBD server: {e}");
    }
    let _ = std::fs::remove_file(vm.runtime_dir().join(INCOMING_MARKER));
    ctx.migrations().incoming.lock().unwrap().remove(id);
    let launched = Launched { pid: vm.pid(), accel: vm.accel() };
    ctx.insert_vm(id, vm);
    tracing::info!(vm = %id, pid = launched.pid, "migrated VM runs here");
    Ok(launched)
}

fn qemu_log_tail(ctx: &HostCtx, id: &str) -> String {
    let p = ctx.runtime_dir(id).join(crate::runtime::QEMU_LOG);
    std::fs::read_to_string(p)
        .map(|s| s.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" / "))
        .unwrap_or_default()
}

/// Source: starts sending VM `id` to the prepared destination in the background.
pub fn send(ctx: &HostCtx, id: &str, req: SendRequest) -> Result<Migration, AgentError> {
    let vm = ctx.vm(id).ok_or_else(|| AgentError::UnknownVm(id.to_string()))?;
    if vm.exit_info().is_some() {
        return Err(mig_err(id, "its QEMU has exited"));
    }
    let (tx, rx) = tokio::sync::watch::channel(false);
    let first = first_status(ctx.name(), &req);
    let out = Arc::new(Outgoing { status: Mutex::new(first.clone()), cancel: tx, started: Instant::now() });
    {
        let mut m = ctx.migrations().outgoing.lock().unwrap();
        if let Some(o) = m.get(id) {
            if o.status.lock().unwrap().status == MigrationStatus::Active {
                return Err(mig_err(id, "a migration of this VM is already under way"));
            }
        }
        m.insert(id.to_string(), out.clone());
    }
    let id = id.to_string();
    let qemu_user = ctx.qemu_user().cloned();
    tokio::spawn(async move {
        let r = send_vm(&vm, &req, &out, rx, qemu_user).await;
        let mut st = out.status.lock().unwrap().clone();
        match r {
            Ok(()) => {
                // The guest (and its volumes' writes) belong to the destination now.
                let marker = vm.runtime_dir().join(MIGRATED_MARKER);
                if let Err(e) = crate::qemu_user::write_file(&marker, b"the VM was migrated to another host\n") {
                    tracing::warn!(vm = %id, "cannot write {}: {e}", marker.display());
                }
                st.status = MigrationStatus::Completed;
                st.phase = "completed".into();
                tracing::info!(vm = %id, downtime_ms = ?st.downtime_ms, total_ms = ?st.total_ms, "migration completed");
            }
            Err((status, msg)) => {
                tracing::warn!(vm = %id, "migration {}: {msg}", status.as_str());
                let phase = format!("{}: cleaning up", status.as_str());
                out.status.lock().unwrap().phase = phase;
                abort_source(&vm).await;
                st = out.status.lock().unwrap().clone();
                st.status = status;
                st.phase = status.as_str().into();
                st.error = Some(msg);
            }
        }
        st.elapsed_ms = Some(out.started.elapsed().as_millis() as u64);
        st.finished = Some(unix_now());
        *out.status.lock().unwrap() = st;
    });
    Ok(first)
}

/// Source: where the migration of `id` stands.
pub fn send_status(ctx: &HostCtx, id: &str) -> Result<Migration, AgentError> {
    let o = ctx.migrations().outgoing.lock().unwrap().get(id).cloned().ok_or_else(|| AgentError::UnknownVm(id.to_string()))?;
    let mut st = o.status.lock().unwrap().clone();
    if st.status == MigrationStatus::Active {
        st.elapsed_ms = Some(o.started.elapsed().as_millis() as u64);
    }
    Ok(st)
}

/// Source: cancels the migration of `id` (the guest runs on here). After a completed
/// migration whose destination then failed, resumes the (paused) source guest instead.
pub async fn send_cancel(ctx: &HostCtx, id: &str) -> Result<Migration, AgentError> {
    let o = ctx.migrations().outgoing.lock().unwrap().get(id).cloned().ok_or_else(|| AgentError::UnknownVm(id.to_string()))?;
    let done = o.status.lock().unwrap().status;
    if done == MigrationStatus::Active {
        let _ = o.cancel.send(true);
        let t0 = Instant::now();
        while o.status.lock().unwrap().status == MigrationStatus::Active && t0.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    } else if done == MigrationStatus::Completed {
        if let Some(vm) = ctx.vm(id) {
            tracing::warn!(vm = %id, "the destination did not take over; resuming the guest here");
            let _ = std::fs::remove_file(vm.runtime_dir().join(MIGRATED_MARKER));
            vm.cont().await?;
            let mut st = o.status.lock().unwrap();
            st.status = MigrationStatus::Failed;
            st.phase = "failed".into();
            st.error.get_or_insert_with(|| "the destination did not take over; the guest runs on at the source".into());
        }
    }
    send_status(ctx, id)
}

type SendErr = (MigrationStatus, String);

fn failed(e: impl std::fmt::Display) -> SendErr {
    (MigrationStatus::Failed, e.to_string())
}

/// Checks the deadline and the cancel flag.
fn check(deadline: Instant, max_seconds: u64, cancel: &tokio::sync::watch::Receiver<bool>, what: &str) -> Result<(), SendErr> {
    if *cancel.borrow() {
        return Err((MigrationStatus::Cancelled, format!("cancelled while {what}")));
    }
    if Instant::now() >= deadline {
        return Err((MigrationStatus::Cancelled, format!("not finished after {max_seconds} s (while {what}); cancelled")));
    }
    Ok(())
}

/// One outgoing migration as [`send_vm`]'s steps see it.
struct Sending<'a> {
    vm: &'a Vm,
    req: &'a SendRequest,
    out: &'a Outgoing,
    cancel: tokio::sync::watch::Receiver<bool>,
    deadline: Instant,
}

impl Sending<'_> {
    fn set_phase(&self, p: String) {
        self.out.status.lock().unwrap().phase = p;
    }

    /// Fails if the source QEMU has exited.
    fn exited(&self) -> Result<(), SendErr> {
        match self.vm.exit_info() {
            Some(e) => Err(failed(format!("the source QEMU exited ({e})"))),
            None => Ok(()),
        }
    }

    fn check(&self, what: &str) -> Result<(), SendErr> {
        check(self.deadline, self.req.max_seconds, &self.cancel, what)
    }
}

async fn send_vm(
    vm: &Vm,
    req: &SendRequest,
    out: &Outgoing,
    cancel: tokio::sync::watch::Receiver<bool>,
    qemu_user: Option<crate::qemu_user::QemuUser>,
) -> Result<(), SendErr> {
    let deadline = out.started + Duration::from_secs(req.max_seconds.max(1));
    let s = Sending { vm, req, out, cancel, deadline };
    // 1. Mirror the overlay to the destination's export.
    let tls = mirror_disk(&s, qemu_user).await?;
    // 2. Memory by pre-copy.
    copy_memory(&s, tls).await?;
    for d in mig_disks(vm.spec()) {
        if let Err(e) = vm.execute("blockdev-del", Some(json!({"node-name": d.target}))).await {
            tracing::debug!(vm = %vm.id(), "removing the NBD target node {} after migration: {e}", d.target);
        }
    }
    Ok(())
}

/// Step 1: an NBD client node on the destination's export (TLS when the grid has
/// certificates), and a `sync=top` mirror of the overlay into it, until the mirror is ready.
/// Returns the TLS credentials' object id, for the memory stream.
async fn mirror_disk(s: &Sending<'_>, qemu_user: Option<crate::qemu_user::QemuUser>) -> Result<Option<&'static str>, SendErr> {
    let (vm, d) = (s.vm, &s.req.dest);
    s.set_phase("connecting to the destination's disk".into());
    // TLS to the destination: it must show a certificate of this grid naming its address.
    let give = move |dir: &std::path::Path| qemu_user.as_ref().map_or(Ok(()), |u| u.give(dir));
    let tls = crate::tlscreds::add(vm, false, &give).await.map_err(failed)?;
    let disks = mig_disks(vm.spec());
    for disk in &disks {
        let mut target = json!({
            "driver": "nbd", "node-name": disk.target, "export": disk.node,
            "server": {"type": "inet", "host": d.host, "port": d.nbd_port.to_string()},
        });
        if let Some(t) = tls {
            target["tls-creds"] = json!(t);
            target["tls-hostname"] = json!(d.host);
        }
        vm.execute("blockdev-add", Some(target)).await.map_err(failed)?;
        vm.execute("blockdev-mirror", Some(json!({"job-id": disk.job, "device": disk.node, "target": disk.target, "sync": "top"})))
            .await
            .map_err(failed)?;
    }
    loop {
        s.exited()?;
        s.check("mirroring the disk")?;
        let jobs = vm.execute("query-block-jobs", None).await.map_err(failed)?;
        let (mut off, mut len, mut ready) = (0, 0, true);
        for disk in &disks {
            let job = jobs
                .as_array()
                .and_then(|a| a.iter().find(|j| j.get("device").and_then(Value::as_str) == Some(disk.job.as_str())).cloned());
            let Some(job) = job else {
                return Err(failed(format!("the mirror of disk {} ended before it was ready (see the source's qemu.log)", disk.node)));
            };
            off += u64_at(&job, &["offset"]).unwrap_or(0);
            len += u64_at(&job, &["len"]).unwrap_or(0);
            ready &= job.get("ready").and_then(Value::as_bool) == Some(true);
        }
        s.out.status.lock().unwrap().disk_bytes = Some(off);
        if ready {
            return Ok(tls);
        }
        let what = if disks.len() > 1 { format!("mirroring {} disks", disks.len()) } else { "mirroring disk".into() };
        s.set_phase(format!("{what} ({} of {} MiB)", off >> 20, len >> 20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Step 2: the migration's capabilities and parameters, `migrate` to the destination, and its
/// progress until QEMU completes it (switching over at `pre-switchover`).
async fn copy_memory(s: &Sending<'_>, tls: Option<&str>) -> Result<(), SendErr> {
    let (vm, req, d) = (s.vm, s.req, &s.req.dest);
    s.set_phase("copying memory".into());
    vm.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [
            {"capability": "events", "state": true},
            {"capability": "auto-converge", "state": true},
            {"capability": "pause-before-switchover", "state": true},
        ]})),
    )
    .await
    .map_err(failed)?;
    let mut limit = DowntimeSteps::new(req.downtime_ms);
    let mut params = json!({"downtime-limit": limit.current});
    if let Some(t) = tls {
        params["tls-creds"] = json!(t);
        params["tls-hostname"] = json!(d.host);
    }
    if let Some(mib) = req.max_bandwidth_mib {
        params["max-bandwidth"] = json!(mib.max(1) * 1024 * 1024);
    }
    vm.execute("migrate-set-parameters", Some(params)).await.map_err(failed)?;
    let mut events = vm.events();
    let stream = memory_stream(&d.host, d.migration_port).await.map_err(failed)?;
    vm.qmp().pass_fd(MEMORY_FD, stream.as_fd()).await.map_err(failed)?;
    drop(stream);
    vm.execute("migrate", Some(json!({"uri": format!("fd:{MEMORY_FD}")}))).await.map_err(failed)?;
    let mut switched = false;
    loop {
        s.exited()?;
        if !switched {
            s.check("copying memory")?;
        }
        let mig = vm.execute("query-migrate", None).await.map_err(failed)?;
        let status = mig.get("status").and_then(Value::as_str).unwrap_or("").to_string();
        record_progress(s.out, &mig, &status);
        if status == "active" {
            let passes = u64_at(&mig, &["ram", "dirty-sync-count"]).unwrap_or(0);
            if let Some(l) = limit.next(passes) {
                // Best effort: a limit that stays lower only makes QEMU try longer.
                if let Err(e) = vm.execute("migrate-set-parameters", Some(json!({"downtime-limit": l}))).await {
                    tracing::warn!(vm = %vm.id(), "raising the downtime limit to {l} ms: {e}");
                }
            }
        }
        match status.as_str() {
            "pre-switchover" if !switched => {
                s.set_phase("switching over".into());
                switch_over(vm).await?;
                switched = true;
                continue;
            }
            "completed" => {
                let mut st = s.out.status.lock().unwrap();
                st.downtime_ms = u64_at(&mig, &["downtime"]);
                st.total_ms = u64_at(&mig, &["total-time"]);
                st.ram_remaining_bytes = Some(0);
                return Ok(());
            }
            "failed" | "cancelled" => {
                let desc = mig.get("error-desc").and_then(Value::as_str).unwrap_or("no detail from QEMU");
                return Err(failed(format!("QEMU's migration {status}: {desc}")));
            }
            _ => {}
        }
        // Wake on the next migration event, or poll again shortly.
        let wait = if switched { Duration::from_millis(5) } else { Duration::from_millis(200) };
        next_migration_event(&mut events, wait).await;
    }
}

/// The name under which QEMU holds the memory stream's connection (`getfd`, `migrate fd:`).
const MEMORY_FD: &str = "vgrid-mig-memory";
/// `TCP_NOTSENT_LOWAT` of the memory stream, bytes: see [`memory_stream`].
const MEMORY_NOTSENT_LOWAT: u32 = 128 * 1024;
/// How long connecting the memory stream to the destination may take.
const MEMORY_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The memory stream's TCP connection to the destination's `migrate-incoming` port, dialled
/// here and handed to QEMU (`migrate fd:`) rather than dialled by QEMU (`tcp:`), for the one
/// socket option QEMU does not set: `TCP_NOTSENT_LOWAT`, which keeps the kernel from queueing
/// more than [`MEMORY_NOTSENT_LOWAT`] of the stream that the network has not taken yet. Without
/// it the send buffer grows to megabytes, and when QEMU stops the guest to switch over, the
/// flush of the disk mirror's NBD connection waits at the destination behind all of them: its
/// QEMU loads the memory stream and serves the export on the same thread, and only turns to
/// the export once the stream runs dry (on loopback ~20 ms of an idle guest's 11-27 ms
/// downtime; with the option 4-6 ms in all, see bench/README.md, `bench/migration`). Throughput is not limited: only the
/// data waiting to be sent is, not what is in flight. TLS, when the grid has certificates, is
/// QEMU's over this socket as it was over its own.
async fn memory_stream(host: &str, port: u16) -> Result<std::net::TcpStream, String> {
    let what = format!("the destination's memory port {host}:{port}");
    // An IPv6 address may come bracketed, as in a URL.
    let addr = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let stream = match tokio::time::timeout(MEMORY_CONNECT_TIMEOUT, tokio::net::TcpStream::connect((addr, port))).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("cannot connect to {what}: {e}")),
        Err(_) => return Err(format!("connecting to {what} timed out after {MEMORY_CONNECT_TIMEOUT:?}")),
    };
    socket2::SockRef::from(&stream).set_tcp_notsent_lowat(MEMORY_NOTSENT_LOWAT).map_err(|e| format!("TCP_NOTSENT_LOWAT on {what}: {e}"))?;
    let stream = stream.into_std().map_err(|e| format!("{what}: {e}"))?;
    // QEMU's migration thread writes with blocking calls, as on a socket it dials itself.
    stream.set_nonblocking(false).map_err(|e| format!("{what}: {e}"))?;
    Ok(stream)
}

/// The downtime limit QEMU is given, in steps (as OpenStack Nova's
/// `live_migration_downtime_steps`): it starts low, so that a guest whose memory converges (an
/// idle one, most) switches over with little left to send, and doubles every
/// [`DOWNTIME_STEP_EVERY`] of copying up to the limit the user asked for, so that a busy guest
/// is still allowed the pause it was promised rather than copying for ever. The steps start
/// when the first pass over memory is done (QEMU's `dirty-sync-count` reaches 2): before it
/// nothing can converge, and over a slow link that first pass alone outlasted every step (8 s
/// for an idle 512 MiB guest at 100 Mbit/s: the limit was at its maximum by the time the
/// guest could have switched over at the lowest one).
struct DowntimeSteps {
    current: u64,
    max: u64,
    /// When the current step began; `None` during the first pass.
    since: Option<Instant>,
}

/// First downtime limit given to QEMU, ms (the user's limit when that is lower).
const DOWNTIME_START_MS: u64 = 10;
/// How long each step of the downtime limit lasts.
const DOWNTIME_STEP_EVERY: Duration = Duration::from_secs(2);

impl DowntimeSteps {
    fn new(max: u64) -> DowntimeSteps {
        DowntimeSteps { current: max.min(DOWNTIME_START_MS), max, since: None }
    }

    /// The next limit, when the current one has lasted its step (counted from the end of the
    /// first pass; `passes` is QEMU's `dirty-sync-count`) and the maximum is not reached.
    fn next(&mut self, passes: u64) -> Option<u64> {
        self.next_at(passes, Instant::now())
    }

    fn next_at(&mut self, passes: u64, now: Instant) -> Option<u64> {
        if passes < 2 {
            return None;
        }
        let since = *self.since.get_or_insert(now);
        if self.current >= self.max || now.duration_since(since) < DOWNTIME_STEP_EVERY {
            return None;
        }
        self.current = (self.current * 2).min(self.max);
        self.since = Some(now);
        Some(self.current)
    }
}

/// Copies `query-migrate`'s counters into the status, and the phase while it is `active`.
fn record_progress(out: &Outgoing, mig: &Value, status: &str) {
    let mut st = out.status.lock().unwrap();
    st.ram_transferred_bytes = u64_at(mig, &["ram", "transferred"]).or(st.ram_transferred_bytes);
    st.ram_remaining_bytes = u64_at(mig, &["ram", "remaining"]).or(st.ram_remaining_bytes);
    st.dirty_sync_count = u64_at(mig, &["ram", "dirty-sync-count"]).or(st.dirty_sync_count);
    st.cpu_throttle_percentage = u64_at(mig, &["cpu-throttle-percentage"]).or(st.cpu_throttle_percentage);
    if status == "active" {
        st.phase = format!(
            "copying memory (pass {}, {} MiB sent, {} MiB left{})",
            st.dirty_sync_count.unwrap_or(0),
            st.ram_transferred_bytes.unwrap_or(0) >> 20,
            st.ram_remaining_bytes.unwrap_or(0) >> 20,
            st.cpu_throttle_percentage.filter(|&p| p > 0).map(|p| format!(", CPU throttled {p}%")).unwrap_or_default()
        );
    }
}

/// At `pre-switchover` the guest is paused: flush the rest of the disk, drop the mirror without
/// pivoting, then let QEMU send the last pages and the device state. Everything here counts in
/// the guest's downtime: the mirrors are cancelled together and their end is taken from QEMU's
/// `BLOCK_JOB_COMPLETED`/`BLOCK_JOB_CANCELLED` events (a `query-block-jobs` every 2 ms only as
/// a fallback).
async fn switch_over(vm: &Vm) -> Result<(), SendErr> {
    let t0 = Instant::now();
    let mut events = vm.events();
    let disks = mig_disks(vm.spec());
    let cancels = disks.iter().map(|d| vm.execute("block-job-cancel", Some(json!({"device": d.job}))));
    for r in futures::future::join_all(cancels).await {
        r.map_err(failed)?;
    }
    let flushed = t0.elapsed();
    while mirror_running(vm).await {
        if t0.elapsed() > Duration::from_secs(30) {
            return Err(failed("the disk mirror did not finish at switchover within 30 s"));
        }
        next_event(&mut events, &["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"], Duration::from_millis(2)).await;
    }
    vm.execute("migrate-continue", Some(json!({"state": "pre-switchover"}))).await.map_err(failed)?;
    tracing::debug!(
        vm = %vm.id(),
        cancel_ms = flushed.as_secs_f64() * 1e3,
        total_ms = t0.elapsed().as_secs_f64() * 1e3,
        disks = disks.len(),
        "switch-over: disk mirrors flushed, migration continued"
    );
    Ok(())
}

/// Waits up to `wait` for QEMU's next `MIGRATION` event.
async fn next_migration_event(events: &mut tokio::sync::broadcast::Receiver<crate::qmp::QmpEvent>, wait: Duration) {
    next_event(events, &["MIGRATION"], wait).await
}

/// Waits up to `wait` for the next QEMU event named in `names` (returns early when events were
/// lost, so the caller looks at the state again).
async fn next_event(events: &mut tokio::sync::broadcast::Receiver<crate::qmp::QmpEvent>, names: &[&str], wait: Duration) {
    let _ = tokio::time::timeout(wait, async {
        loop {
            match events.recv().await {
                Ok(ev) if names.contains(&ev.event.as_str()) => return,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                Err(_) => {
                    tokio::time::sleep(wait).await;
                    return;
                }
            }
        }
    })
    .await;
}

/// Source, after a failed or cancelled migration: stop everything it started and make sure the
/// guest runs.
async fn abort_source(vm: &Vm) {
    let id = vm.id().to_string();
    if vm.exit_info().is_some() {
        return;
    }
    let _ = vm.execute("migrate_cancel", None).await;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        match vm.execute("query-migrate", None).await {
            Ok(m) => {
                let s = m.get("status").and_then(Value::as_str).unwrap_or("");
                if !matches!(s, "active" | "cancelling" | "setup" | "pre-switchover" | "device" | "wait-unplug") {
                    break;
                }
                if s == "pre-switchover" {
                    let _ = vm.execute("migrate_cancel", None).await;
                }
            }
            Err(_) => break,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel_mirror(vm).await;
    match vm.execute("query-status", None).await {
        Ok(st) => {
            let s = st.get("status").and_then(Value::as_str).unwrap_or("");
            if s != "running" {
                tracing::info!(vm = %id, status = s, "resuming the guest at the source after the cancelled migration");
                if let Err(e) = vm.cont().await {
                    tracing::warn!(vm = %id, "cannot resume the guest: {e}");
                }
            }
        }
        Err(e) => tracing::warn!(vm = %id, "query-status after the cancelled migration: {e}"),
    }
}

/// A page of the console of a VM that arrived by migration: its history, then `console.log`,
/// as one log (offsets run across both). `None` when the VM has no history (not migrated).
pub(crate) fn console_with_history(ctx: &HostCtx, id: &str, offset: i64, page: u64) -> Option<vgrid_api::vm::ConsoleChunk> {
    use std::io::{Read, Seek};
    let dir = ctx.runtime_dir(id);
    let history = crate::qemu_user::read_file(&dir.join(CONSOLE_HISTORY)).ok()?;
    let h = history.len() as u64;
    let mut log = std::fs::File::open(dir.join(crate::runtime::CONSOLE_LOG)).ok();
    let l = log.as_ref().and_then(|f| f.metadata().ok()).map(|m| m.len()).unwrap_or(0);
    let len = h + l;
    let start = if offset < 0 { len.saturating_sub(offset.unsigned_abs()) } else { (offset as u64).min(len) };
    let mut buf = Vec::new();
    if start < h {
        let end = (start + page).min(h);
        buf.extend_from_slice(&history[start as usize..end as usize]);
    }
    let want = page.saturating_sub(buf.len() as u64);
    if want > 0 {
        if let Some(f) = log.as_mut() {
            let from = start.saturating_sub(h);
            if f.seek(std::io::SeekFrom::Start(from)).is_ok() {
                let _ = f.take(want).read_to_end(&mut buf);
            }
        }
    }
    let next = start + buf.len() as u64;
    Some(vgrid_api::vm::ConsoleChunk { offset: start, next, data: String::from_utf8_lossy(&buf).into_owned() })
}

/// After an agent restart, an adopted QEMU may still be in the middle of an outgoing migration
/// its dead predecessor drove (possibly paused at `pre-switchover`, where QEMU waits forever).
/// Nobody will finish it: cancel it, drop the mirror and its NBD node, and let the guest run.
/// A QEMU whose migration completed (`postmigrate`) is left alone: the destination may run the
/// guest now, and resuming it here too would split it in two.
pub(crate) async fn settle_after_restart(vm: &Vm) {
    let status = match vm.execute("query-migrate", None).await {
        Ok(m) => m.get("status").and_then(Value::as_str).unwrap_or("").to_string(),
        Err(_) => return,
    };
    let mirror = mirror_running(vm).await;
    if matches!(status.as_str(), "setup" | "active" | "pre-switchover" | "device" | "wait-unplug" | "cancelling") {
        tracing::warn!(vm = %vm.id(), status, "adopted in the middle of an outgoing migration; cancelling it");
        abort_source(vm).await;
    } else if mirror {
        tracing::warn!(vm = %vm.id(), "adopted with a migration disk mirror running; cancelling it");
        cancel_mirror(vm).await;
    }
}

/// Whether one of the migration's disk mirror jobs runs on `vm`.
async fn mirror_running(vm: &Vm) -> bool {
    let is_ours = |j: &Value| j.get("device").and_then(Value::as_str).is_some_and(|d| d.starts_with(MIRROR_JOB));
    vm.execute("query-block-jobs", None).await.ok().and_then(|j| j.as_array().map(|a| a.iter().any(is_ours))).unwrap_or(false)
}

/// Cancels the migration's disk mirror, waits (up to 20 s) until the job is gone, and removes
/// the NBD target node it wrote to.
async fn cancel_mirror(vm: &Vm) {
    let disks = mig_disks(vm.spec());
    for d in &disks {
        let _ = vm.execute("block-job-cancel", Some(json!({"device": d.job, "force": true}))).await;
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) && mirror_running(vm).await {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for d in &disks {
        let _ = vm.execute("blockdev-del", Some(json!({"node-name": d.target}))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_memory_stream_is_blocking_with_a_small_unsent_queue_and_a_refusal_names_the_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let s = memory_stream("127.0.0.1", port).await.unwrap();
        let sock = socket2::SockRef::from(&s);
        assert_eq!(sock.tcp_notsent_lowat().unwrap(), MEMORY_NOTSENT_LOWAT);
        assert!(!sock.nonblocking().unwrap(), "QEMU's migration thread expects a blocking socket");
        assert_eq!(s.peer_addr().unwrap().port(), port);
        // Bracketed, as an IPv6 address in a URL.
        let l6 = std::net::TcpListener::bind("[::1]:0");
        if let Ok(l6) = l6 {
            let p6 = l6.local_addr().unwrap().port();
            memory_stream("[::1]", p6).await.unwrap();
        }
        drop(l);
        let err = memory_stream("127.0.0.1", port).await.unwrap_err();
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    }

    #[test]
    fn the_downtime_limit_starts_low_and_doubles_up_to_the_one_asked_for() {
        let mut d = DowntimeSteps::new(100);
        assert_eq!(d.current, DOWNTIME_START_MS);
        let t = Instant::now();
        // The first pass over memory (dirty-sync-count 1) raises nothing, however long it takes.
        assert_eq!(d.next_at(1, t + DOWNTIME_STEP_EVERY * 5), None, "raised during the first pass");
        // From the end of the first pass, a step lasts DOWNTIME_STEP_EVERY.
        let t = t + DOWNTIME_STEP_EVERY * 5;
        assert_eq!(d.next_at(2, t), None, "the steps start at the end of the first pass");
        assert_eq!(d.next_at(3, t + Duration::from_millis(500)), None, "a step lasts DOWNTIME_STEP_EVERY");
        let mut seen = Vec::new();
        for k in 1..10 {
            if let Some(l) = d.next_at(3 + k as u64, t + DOWNTIME_STEP_EVERY * k) {
                seen.push(l);
            }
        }
        assert_eq!(seen, vec![20, 40, 80, 100]);
        // A limit below the start is used as it is, and never raised.
        let mut low = DowntimeSteps::new(5);
        assert_eq!(low.current, 5);
        assert_eq!(low.next_at(2, t), None);
        assert_eq!(low.next_at(5, t + DOWNTIME_STEP_EVERY * 3), None);
    }
}
