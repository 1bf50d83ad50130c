//! The VM lifecycle as one transition table: what each [`Event`] does to a VM in each
//! [`VmState`], as a pure function ([`transition`]) with no I/O and no clock.
//!
//! The states are the API's [`VmState`] (the wire and record type). An event is something that
//! happens to one VM (a request, a host's answer or report, a timeout, a coordinator restart),
//! with the data its transition needs. [`transition`] answers a [`Change`]: nothing to do
//! ([`Change::Unchanged`]: the event is expected in that state and means nothing there), or an
//! [`Update`] of the record as data (the new state and [`Phase`], and what happens to `reason`,
//! `host`, `pid`, the start and stop times, the saved image and the migration); an event that
//! must not happen in a state is a [`TransitionError`] naming both. [`Change::apply`] is the only
//! code meant to write a record's `state`, `phase` and `state_since`.
//!
//! How the cells were chosen (from the code that assigned states directly before this table):
//! where that code checked the state itself (`if v.state == X`, `if v.state.is_active()`), the
//! table follows the check exactly and the other states are explicit `Unchanged` cells; where it
//! assigned unconditionally after its caller's checks, the table allows the states its caller
//! lets through and refuses the others. Events about a whole host ([`Event::HostSilent`],
//! [`Event::HostBack`]) are defined in every state.
//!
//! A new state or event goes here and in `table/tests.rs` (whose expected table is also the
//! one in `docs/architecture.md`, "VM lifecycle"): add the variant, its arms in [`transition`],
//! its row in the test, and the test fails until the three agree.

use vgrid_api::config::Accel;
use vgrid_api::migrate::{Migration, MigrationStatus};
use vgrid_api::vm::{VmRecord, VmState};
// Every state in which a VM holds host resources, and every other, as patterns: the same lists
// as `VmState::is_active`, which is defined by them.
use vgrid_api::{active_states as active, inactive_states as inactive};

/// What a VM is doing now, as shown by the API (`VmRecord::phase`) and the CLI. The record keeps
/// it as text (the same JSON as ever); this type is the only source of that text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Placed on a host; its launch is about to go out.
    Placed,
    /// Waiting in the queue for a host.
    Queued,
    /// The host is fetching the image and booting QEMU.
    Booting,
    Running,
    Stopping,
    Stopped,
    Failed,
    Unknown,
    Lost,
    /// Suspending: the host saves its memory and disk.
    Saving,
    Suspended,
    /// Resumed: placed on `host`, which restores its saved state.
    Restoring {
        host: String,
    },
    /// Migrating live to `to`; `step` is the migration's own phase once the source reports it.
    Migrating {
        to: String,
        step: Option<String>,
    },
    /// Starting or running, its guest's reads wait for unreachable image servers (its host
    /// reports it); the state stays.
    WaitingForImageServer {
        servers: Vec<String>,
    },
}

impl Phase {
    /// How the text of [`Phase::WaitingForImageServer`] begins.
    pub const IMAGE_WAIT: &'static str = "waiting for image server";
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self {
            Phase::Placed => "placed",
            Phase::Queued => "queued: no host can take it now",
            Phase::Booting => "fetching image and booting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
            Phase::Unknown => "unknown",
            Phase::Lost => "lost",
            Phase::Saving => "saving memory and disk",
            Phase::Suspended => "suspended",
            Phase::Restoring { host } => return write!(f, "placed on {host}: restoring"),
            Phase::Migrating { to, step: None } => return write!(f, "migrating to {to}"),
            Phase::Migrating { to, step: Some(step) } => return write!(f, "migrating to {to}: {step}"),
            Phase::WaitingForImageServer { servers } => {
                let s = if servers.len() == 1 { "" } else { "s" };
                return write!(f, "{}{s} {}", Phase::IMAGE_WAIT, servers.join(", "));
            }
        };
        f.write_str(text)
    }
}

/// How a VM's QEMU ended, as its host reported it. (A stop the coordinator asked for is told by
/// the state: `stopping`.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitKind {
    /// QEMU exited with status 0: the guest powered itself off.
    PoweredOff,
    /// Anything else: QEMU's exit status (as its `ExitInfo` displays it) and the last console
    /// lines.
    Crashed { exit: String, console: Vec<String> },
}

/// How a live migration ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationOutcome {
    /// The destination `host` runs the VM (QEMU `pid`, and the accelerator it chose when the
    /// destination said; `elapsed_ms`: the whole operation, when the driver measured it).
    Completed { host: String, pid: u32, accel: Option<Accel>, elapsed_ms: Option<u64> },
    /// Cancelled or failed (`status`, `error`): the VM stays at its source; `source_answers`
    /// says whether that host is ready now (if not, the VM is `unknown`).
    Abandoned { status: MigrationStatus, error: String, elapsed_ms: u64, source: String, source_answers: bool },
    /// The coordinator restarted during the migration and the destination did not take over:
    /// cancelled, the VM stays at its source.
    Interrupted,
}

/// One thing that happens to a VM. The comment of each names who sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    // Admission and the queue.
    /// `create`: no host can take it now; it waits in the queue.
    Queued,
    /// `create` or the queue: the scheduler placed it on `host`.
    Placed { host: String },
    /// The queue gave up (`QUEUE_TIMEOUT`, or its image vanished across a restart).
    QueueGaveUp { reason: String },
    // Launch.
    /// `run`: the launch goes out to its host.
    LaunchSent,
    /// The host started its QEMU.
    Launched { pid: u32, accel: Accel },
    /// The launch failed (`reason`: the host's error); not a resume.
    LaunchFailed { reason: String },
    /// The launch of a resume failed on `host`: its saved image is intact.
    ResumeFailed { host: String, reason: String },
    /// A VM stopped while it was starting: what its host launched has been killed.
    KilledWhileStarting,
    /// The coordinator restarted while this VM was placed or starting (not a resume).
    CoordinatorRestarted,
    // Running, exit and stop.
    /// Its host reported that its QEMU ended.
    Exited { exit: ExitKind },
    /// Its host answers but no longer has it.
    Vanished { host: String },
    /// `stop` (`force`: kill instead of an ACPI power-down).
    StopRequested { force: bool },
    /// `stop` of a VM that was queued, never placed: nothing runs anywhere.
    StoppedWhileQueued,
    /// `stop` waited for the exit in vain; the VM is recorded stopped when the stop was forced
    /// or it never started.
    StopTimedOut { force: bool, ever_started: bool },
    // Hosts.
    /// `host` missed its heartbeats.
    HostSilent { host: String },
    /// Its host is back and reports it running.
    HostBack,
    // Reconciliation with a host's report (`plan_reconcile`'s actions).
    /// The report shows it running (QEMU `pid`): an unknown host's VM, or one stuck starting or
    /// migrating past its bound.
    SettledRunning { pid: u32 },
    /// A stopping VM is missing from the report: it stopped.
    SettledStopped,
    /// Stuck starting past its bound and not in the report.
    SettledFailed { reason: String },
    /// Missing from the report (or stuck migrating and missing).
    SettledLost { reason: String },
    // Suspend and resume.
    /// `suspend`: the host saves it.
    SuspendRequested,
    /// The save of a suspend is stored as `image` (`NAME@VERSION`); its QEMU ended.
    Saved { image: String },
    /// The save failed; the VM keeps running.
    SaveFailed,
    /// After a coordinator restart: the suspend did not complete and the guest runs on.
    SaveInterrupted,
    /// After a coordinator restart: QEMU is gone and no saved state was found.
    SaveLost,
    /// `resume`: placed on `host`, which restores it.
    ResumeRequested { host: String },
    /// After a coordinator restart: `host` finished the resume.
    ResumeRecovered { host: String },
    /// After a coordinator restart: `host` did not run the resumed VM in time.
    ResumeAbandoned { host: String },
    // Live migration.
    /// `migrate`: the destination is reserved; the migration begins.
    MigrationStarted { from: String, to: String, downtime_limit_ms: u64, max_seconds: u64 },
    /// The source reports the migration's `step` (the migration's own figures are data the
    /// caller writes beside the event).
    MigrationProgress { to: String, step: String },
    /// The migration ended.
    MigrationEnded { outcome: MigrationOutcome },
    // Image servers.
    /// Its host reports that its guest's reads wait for the unreachable image `servers`.
    ImageWait { servers: Vec<String> },
    /// Its host no longer reports it waiting for image servers.
    ImageWaitEnded,
}

impl Event {
    /// The event's name in errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Queued => "queued",
            Event::Placed { .. } => "placed",
            Event::QueueGaveUp { .. } => "queue_gave_up",
            Event::LaunchSent => "launch_sent",
            Event::Launched { .. } => "launched",
            Event::LaunchFailed { .. } => "launch_failed",
            Event::ResumeFailed { .. } => "resume_failed",
            Event::KilledWhileStarting => "killed_while_starting",
            Event::CoordinatorRestarted => "coordinator_restarted",
            Event::Exited { .. } => "exited",
            Event::Vanished { .. } => "vanished",
            Event::StopRequested { .. } => "stop_requested",
            Event::StoppedWhileQueued => "stopped_while_queued",
            Event::StopTimedOut { .. } => "stop_timed_out",
            Event::HostSilent { .. } => "host_silent",
            Event::HostBack => "host_back",
            Event::SettledRunning { .. } => "settled_running",
            Event::SettledStopped => "settled_stopped",
            Event::SettledFailed { .. } => "settled_failed",
            Event::SettledLost { .. } => "settled_lost",
            Event::SuspendRequested => "suspend_requested",
            Event::Saved { .. } => "saved",
            Event::SaveFailed => "save_failed",
            Event::SaveInterrupted => "save_interrupted",
            Event::SaveLost => "save_lost",
            Event::ResumeRequested { .. } => "resume_requested",
            Event::ResumeRecovered { .. } => "resume_recovered",
            Event::ResumeAbandoned { .. } => "resume_abandoned",
            Event::MigrationStarted { .. } => "migration_started",
            Event::MigrationProgress { .. } => "migration_progress",
            Event::MigrationEnded { .. } => "migration_ended",
            Event::ImageWait { .. } => "image_wait",
            Event::ImageWaitEnded => "image_wait_ended",
        }
    }
}

/// An event that must not happen to a VM in state `from`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a VM that is {} cannot take event {event}", .from.as_str())]
pub struct TransitionError {
    pub from: VmState,
    pub event: &'static str,
}

/// What an event does to a record.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Nothing: the event is expected in this state and changes nothing (nothing is written).
    Unchanged,
    /// Write this (boxed: an update is large, `Unchanged` nothing).
    Update(Box<Update>),
}

/// A field's fate in an [`Update`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Set<T> {
    Keep,
    To(T),
    Clear,
}

/// The time at which [`Change::apply`] runs (it is given the clock; the table has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now;

/// What to do to the record's `migration`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationEffect {
    Keep,
    /// A new migration (`Migration::begin`, started now).
    Begin {
        from: String,
        to: String,
        downtime_limit_ms: u64,
        max_seconds: u64,
    },
    /// The recorded migration ends now with `status` (its phase becomes the status' name); the
    /// error and elapsed time are written when given. With `only_if_active`, a migration that
    /// already ended is left alone.
    End {
        status: MigrationStatus,
        error: Option<String>,
        elapsed_ms: Option<u64>,
        only_if_active: bool,
    },
}

/// A change of a record: its state (the same one for an update of data only), its phase
/// (`None`: kept), and the other fields'.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub state: VmState,
    pub phase: Option<Phase>,
    pub reason: Set<String>,
    pub host: Set<String>,
    pub pid: Set<u32>,
    /// The accelerator its host chose (the record's runtime `accel`).
    pub accel: Set<Accel>,
    pub started: Set<Now>,
    pub stopped: Set<Now>,
    pub saved_image: Set<String>,
    pub migration: MigrationEffect,
}

/// What `event` does to a VM in state `from`: the lifecycle table, one arm per allowed cell.
pub fn transition(from: VmState, event: &Event) -> Result<Change, TransitionError> {
    use Change::Unchanged;
    use Event as E;
    use VmState::*;
    Ok(match (from, event) {
        // Admission: a new record is `pending` (its constructor); the first event says whether a host took it.
        (Pending, E::Queued) => to(Pending, Phase::Queued),
        (Pending, E::Placed { host }) => to(Pending, Phase::Placed).host(host),
        (Pending, E::QueueGaveUp { reason }) => to(Failed, Phase::Failed).reason(reason).stopped_now(),
        (Starting | Running | Stopping | Unknown | Suspending | Migrating | inactive!(), E::QueueGaveUp { .. }) => Unchanged,

        // Launch. A resume relaunched after a coordinator restart is `starting` already.
        (Pending | Starting, E::LaunchSent) => to(Starting, Phase::Booting),
        (Starting, E::Launched { pid, accel }) => to(Running, Phase::Running).pid(*pid).accel(*accel).started_now(),
        // Stopped, settled or gone while its launch was under way: the caller kills what it launched unless it runs.
        (Pending | Running | Stopping | Unknown | Suspending | Migrating | inactive!(), E::Launched { .. }) => Unchanged,
        (Starting | Stopping, E::LaunchFailed { reason }) => to(Failed, Phase::Failed).reason(reason).stopped_now(),
        (Starting | Stopping, E::ResumeFailed { host, reason }) => {
            to(Suspended, Phase::Suspended).reason(format!("resuming on host {host} failed: {reason}")).clear_pid()
        }
        (active!(), E::KilledWhileStarting) => to(Stopped, Phase::Stopped).stopped_now(),
        (inactive!(), E::KilledWhileStarting) => Unchanged,
        (Pending | Starting, E::CoordinatorRestarted) => {
            to(Failed, Phase::Failed).reason("the coordinator restarted while this VM was starting").stopped_now()
        }

        // QEMU's end. A stop asked for ends `stopped` whatever the exit; a save ends QEMU too (suspend).
        (Stopping, E::Exited { .. }) => to(Stopped, Phase::Stopped).stopped_now().clear_pid(),
        (Pending | Starting | Running | Unknown | Migrating, E::Exited { exit: ExitKind::PoweredOff }) => {
            to(Stopped, Phase::Stopped).reason("the guest powered off").stopped_now().clear_pid()
        }
        (Pending | Starting | Running | Unknown | Migrating, E::Exited { exit: ExitKind::Crashed { exit, console } }) => {
            let why = format!("QEMU exited unexpectedly ({exit}); last console lines:\n{}", console.join("\n"));
            to(Failed, Phase::Failed).reason(why).stopped_now().clear_pid()
        }
        (Suspending | Suspended, E::Exited { .. }) => stay(from).clear_pid(),
        (active!(), E::Vanished { host }) => to(Lost, Phase::Lost).reason(format!("host {host} no longer runs this VM")).stopped_now(),
        (inactive!(), E::Vanished { .. }) => Unchanged,

        // Stop. Unknown and migrating VMs stop only by force; suspended ones are resumed or removed instead.
        (Pending | Starting | Running, E::StopRequested { .. }) | (Unknown | Migrating, E::StopRequested { force: true }) => {
            to(Stopping, Phase::Stopping)
        }
        (Stopping | Stopped | Failed | Lost, E::StopRequested { .. }) => Unchanged,
        (Pending, E::StoppedWhileQueued) => to(Stopped, Phase::Stopped).reason("stopped while queued").stopped_now(),
        (active!(), E::StopTimedOut { force, ever_started }) if *force || !*ever_started => to(Stopped, Phase::Stopped).stopped_now(),
        (active!() | inactive!(), E::StopTimedOut { .. }) => Unchanged,

        // A host's coming and going: only running and stopping VMs follow it (a migration decides its own end).
        (Running | Stopping, E::HostSilent { host }) => to(Unknown, Phase::Unknown).reason(format!("host {host} missed its heartbeats")),
        (Pending | Starting | Unknown | Suspending | Migrating | inactive!(), E::HostSilent { .. }) => Unchanged,
        (Unknown, E::HostBack) => to(Running, Phase::Running).clear_reason(),
        (Pending | Starting | Running | Stopping | Suspending | Migrating | inactive!(), E::HostBack) => Unchanged,

        // A host's report settles what the records could not (`plan_reconcile`).
        (Unknown | Starting | Migrating, E::SettledRunning { pid }) => to(Running, Phase::Running)
            .clear_reason()
            .pid(*pid)
            .migration(fail_active("did not finish in time; resolved from the host's report")),
        (Stopping, E::SettledStopped) => to(Stopped, Phase::Stopped).stopped_now().clear_pid(),
        (Starting, E::SettledFailed { reason }) => to(Failed, Phase::Failed).reason(reason).stopped_now(),
        (Running | Unknown | Migrating, E::SettledLost { reason }) => to(Lost, Phase::Lost).reason(reason).stopped_now().clear_pid(),

        // Suspend: only a running VM; a save that fails leaves it running.
        (Running, E::SuspendRequested) => to(Suspending, Phase::Saving),
        (Suspending, E::Saved { image }) => to(Suspended, Phase::Suspended).saved_image(image).clear_pid().clear_reason(),
        (Suspending, E::SaveFailed) => to(Running, Phase::Running),
        (Suspending, E::SaveInterrupted) => to(Running, Phase::Running)
            .reason("a suspend interrupted by a restart (of the coordinator or of the host agent) did not complete; the VM runs on"),
        (Suspending, E::SaveLost) => to(Failed, Phase::Failed)
            .clear_pid()
            .reason("the suspend was interrupted (the coordinator or the host agent restarted) and no saved state was found"),
        // A save's end means nothing once the VM has left `suspending`.
        (
            Pending | Starting | Running | Stopping | Unknown | Migrating | inactive!(),
            E::Saved { .. } | E::SaveFailed | E::SaveInterrupted | E::SaveLost,
        ) => Unchanged,

        // Resume: a suspended VM is placed again; it runs once restored (or is suspended again).
        (Suspended, E::ResumeRequested { host }) => {
            to(Pending, Phase::Restoring { host: host.clone() }).host(host).clear_reason().clear_pid().clear_started().clear_stopped()
        }
        (Pending | Starting, E::ResumeRecovered { host }) => {
            to(Running, Phase::Running).started_now().reason(format!("resumed on {host} while the coordinator restarted"))
        }
        (Pending | Starting, E::ResumeAbandoned { host }) => to(Suspended, Phase::Suspended)
            .clear_host()
            .clear_pid()
            .reason(format!("the coordinator restarted while this VM was resuming on {host}, which did not run it; resume it again")),

        // Live migration: only a running VM; it runs again (at the source, or at the destination) when it ends.
        (Running, E::MigrationStarted { from: source, to: dest, downtime_limit_ms: limit, max_seconds: max }) => {
            let begin = MigrationEffect::Begin { from: source.clone(), to: dest.clone(), downtime_limit_ms: *limit, max_seconds: *max };
            to(Migrating, Phase::Migrating { to: dest.clone(), step: None }).migration(begin)
        }
        (Migrating, E::MigrationProgress { to: dest, step }) => {
            stay(Migrating).phase(Phase::Migrating { to: dest.clone(), step: Some(step.clone()) })
        }
        (Pending | Starting | Running | Stopping | Unknown | Suspending | inactive!(), E::MigrationProgress { .. }) => Unchanged,
        (Migrating, E::MigrationEnded { outcome: o @ MigrationOutcome::Abandoned { source, source_answers: false, .. } }) => {
            to(Unknown, Phase::Unknown).reason(format!("host {source} missed its heartbeats during a migration")).ended(o)
        }
        (Migrating, E::MigrationEnded { outcome }) => to(Running, Phase::Running).ended(outcome),
        // Stopped, settled or lost meanwhile: the state stays; the migration's record, and where the VM runs, follow.
        (Pending | Starting | Running | Stopping | Unknown | Suspending | inactive!(), E::MigrationEnded { outcome }) => {
            stay(from).ended(outcome)
        }

        // A guest stalled on its image servers: its phase says so while it starts or runs.
        (Starting | Running, E::ImageWait { servers }) => stay(from).phase(Phase::WaitingForImageServer { servers: servers.clone() }),
        (Starting, E::ImageWaitEnded) => stay(Starting).phase(Phase::Booting),
        (Running, E::ImageWaitEnded) => stay(Running).phase(Phase::Running),
        (Pending | Stopping | Unknown | Suspending | Migrating | inactive!(), E::ImageWait { .. } | E::ImageWaitEnded) => Unchanged,

        _ => return Err(TransitionError { from, event: event.name() }),
    })
}

/// Moves `rec` by `event` at time `now`: [`transition`] then [`Change::apply`]. `Ok(false)`:
/// [`Change::Unchanged`], nothing was written.
pub fn advance(rec: &mut VmRecord, event: &Event, now: u64) -> Result<bool, TransitionError> {
    Ok(transition(rec.state, event)?.apply(rec, now))
}

/// An update to `state`, shown as `phase`.
fn to(state: VmState, phase: Phase) -> Change {
    update(state, Some(phase))
}

/// An update of data only: the state and phase stay.
fn stay(state: VmState) -> Change {
    update(state, None)
}

fn update(state: VmState, phase: Option<Phase>) -> Change {
    Change::Update(Box::new(Update {
        state,
        phase,
        reason: Set::Keep,
        host: Set::Keep,
        pid: Set::Keep,
        accel: Set::Keep,
        started: Set::Keep,
        stopped: Set::Keep,
        saved_image: Set::Keep,
        migration: MigrationEffect::Keep,
    }))
}

impl Change {
    /// Writes the change into `rec` at time `now` (seconds since the Unix epoch); `state_since`
    /// becomes `now` when the state changes. Returns whether anything was to be written.
    pub fn apply(&self, rec: &mut VmRecord, now: u64) -> bool {
        let Change::Update(u) = self else { return false };
        if rec.state != u.state {
            rec.state = u.state;
            rec.state_since = Some(now);
        }
        if let Some(p) = &u.phase {
            rec.phase = p.to_string();
        }
        u.reason.write(&mut rec.reason, Clone::clone);
        u.host.write(&mut rec.host, Clone::clone);
        u.pid.write(&mut rec.pid, |p| *p);
        u.accel.write(&mut rec.accel, Clone::clone);
        u.started.write(&mut rec.started, |_| now);
        u.stopped.write(&mut rec.stopped, |_| now);
        u.saved_image.write(&mut rec.saved_image, Clone::clone);
        match &u.migration {
            MigrationEffect::Keep => {}
            MigrationEffect::Begin { from, to, downtime_limit_ms, max_seconds } => {
                rec.migration = Some(Migration::begin(from, to, *downtime_limit_ms, *max_seconds, now));
            }
            MigrationEffect::End { status, error, elapsed_ms, only_if_active } => {
                if let Some(m) = rec.migration.as_mut().filter(|m| !only_if_active || m.status == MigrationStatus::Active) {
                    m.status = *status;
                    m.phase = status.as_str().into();
                    if let Some(e) = error {
                        m.error = Some(e.clone());
                    }
                    m.finished = Some(now);
                    if let Some(ms) = elapsed_ms {
                        m.elapsed_ms = Some(*ms);
                    }
                }
            }
        }
        true
    }

    /// The state after the change, given the state before.
    pub fn state(&self, from: VmState) -> VmState {
        match self {
            Change::Unchanged => from,
            Change::Update(u) => u.state,
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Update)) -> Self {
        if let Change::Update(u) = &mut self {
            f(u);
        }
        self
    }

    fn phase(self, p: Phase) -> Self {
        self.with(|u| u.phase = Some(p))
    }
    fn reason(self, r: impl Into<String>) -> Self {
        self.with(|u| u.reason = Set::To(r.into()))
    }
    fn clear_reason(self) -> Self {
        self.with(|u| u.reason = Set::Clear)
    }
    fn host(self, h: &str) -> Self {
        self.with(|u| u.host = Set::To(h.to_string()))
    }
    fn clear_host(self) -> Self {
        self.with(|u| u.host = Set::Clear)
    }
    fn pid(self, p: u32) -> Self {
        self.with(|u| u.pid = Set::To(p))
    }
    fn clear_pid(self) -> Self {
        self.with(|u| u.pid = Set::Clear)
    }
    fn accel(self, a: Accel) -> Self {
        self.with(|u| u.accel = Set::To(a))
    }
    fn started_now(self) -> Self {
        self.with(|u| u.started = Set::To(Now))
    }
    fn clear_started(self) -> Self {
        self.with(|u| u.started = Set::Clear)
    }
    fn stopped_now(self) -> Self {
        self.with(|u| u.stopped = Set::To(Now))
    }
    fn clear_stopped(self) -> Self {
        self.with(|u| u.stopped = Set::Clear)
    }
    fn saved_image(self, image: &str) -> Self {
        self.with(|u| u.saved_image = Set::To(image.to_string()))
    }
    fn migration(self, m: MigrationEffect) -> Self {
        self.with(|u| u.migration = m)
    }

    /// The record effects of a migration's end, whatever the state does: a completed one moves
    /// the VM to its destination.
    fn ended(self, outcome: &MigrationOutcome) -> Self {
        match outcome {
            MigrationOutcome::Completed { host, pid, accel, elapsed_ms } => {
                let c = self.host(host).pid(*pid);
                let c = match accel {
                    Some(a) => c.accel(*a),
                    None => c,
                };
                c.migration(MigrationEffect::End {
                    status: MigrationStatus::Completed,
                    error: None,
                    elapsed_ms: *elapsed_ms,
                    only_if_active: false,
                })
            }
            MigrationOutcome::Abandoned { status, error, elapsed_ms, .. } => self.migration(MigrationEffect::End {
                status: *status,
                error: Some(error.clone()),
                elapsed_ms: Some(*elapsed_ms),
                only_if_active: false,
            }),
            MigrationOutcome::Interrupted => self.migration(fail_active("the coordinator restarted during the migration")),
        }
    }
}

/// A migration still under way fails now with `error`.
fn fail_active(error: &str) -> MigrationEffect {
    MigrationEffect::End { status: MigrationStatus::Failed, error: Some(error.into()), elapsed_ms: None, only_if_active: true }
}

impl<T> Set<T> {
    fn write<U>(&self, field: &mut Option<U>, value: impl FnOnce(&T) -> U) {
        match self {
            Set::Keep => {}
            Set::To(v) => *field = Some(value(v)),
            Set::Clear => *field = None,
        }
    }
}

#[cfg(test)]
mod tests;
