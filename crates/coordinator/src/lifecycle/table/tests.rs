//! The lifecycle table, cell by cell: every (state, event) pair against an expected table
//! written as data (the same table as in `docs/architecture.md`), the phase texts, and
//! [`Change::apply`]. `sites.rs` checks each former direct assignment against the table.

use super::*;

mod sites;

/// Every state, in the order of the expected table's columns.
pub(super) const STATES: [VmState; 11] = VmState::ALL;

/// The lifecycle table: one row per event (with representative data), one column per state.
/// A state name: the record is updated and has that state after the event (the same state for
/// an update of data only); `=`: nothing changes; `-`: refused (a [`TransitionError`]).
/// `docs/architecture.md` ("VM lifecycle") shows these lines verbatim.
const EXPECTED: &str = "\
| event | pending | starting | running | stopping | stopped | failed | unknown | suspending | suspended | migrating | lost |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| `queued` | pending | - | - | - | - | - | - | - | - | - | - |
| `placed` | pending | - | - | - | - | - | - | - | - | - | - |
| `queue_gave_up` | failed | = | = | = | = | = | = | = | = | = | = |
| `launch_sent` | starting | starting | - | - | - | - | - | - | - | - | - |
| `launched` | = | running | = | = | = | = | = | = | = | = | = |
| `launch_failed` | - | failed | - | failed | - | - | - | - | - | - | - |
| `resume_failed` | - | suspended | - | suspended | - | - | - | - | - | - | - |
| `killed_while_starting` | stopped | stopped | stopped | stopped | = | = | stopped | stopped | = | stopped | = |
| `coordinator_restarted` | failed | failed | - | - | - | - | - | - | - | - | - |
| `exited` (powered off) | stopped | stopped | stopped | stopped | - | - | stopped | suspending | suspended | stopped | - |
| `exited` (crashed) | failed | failed | failed | stopped | - | - | failed | suspending | suspended | failed | - |
| `vanished` | lost | lost | lost | lost | = | = | lost | lost | = | lost | = |
| `stop_requested` | stopping | stopping | stopping | = | = | = | - | - | - | - | = |
| `stop_requested` (force) | stopping | stopping | stopping | = | = | = | stopping | - | - | stopping | = |
| `stopped_while_queued` | stopped | - | - | - | - | - | - | - | - | - | - |
| `stop_timed_out` (started) | = | = | = | = | = | = | = | = | = | = | = |
| `stop_timed_out` (force) | stopped | stopped | stopped | stopped | = | = | stopped | stopped | = | stopped | = |
| `stop_timed_out` (never started) | stopped | stopped | stopped | stopped | = | = | stopped | stopped | = | stopped | = |
| `host_silent` | = | = | unknown | unknown | = | = | = | = | = | = | = |
| `host_back` | = | = | = | = | = | = | running | = | = | = | = |
| `settled_running` | - | running | - | - | - | - | running | - | - | running | - |
| `settled_stopped` | - | - | - | stopped | - | - | - | - | - | - | - |
| `settled_failed` | - | failed | - | - | - | - | - | - | - | - | - |
| `settled_lost` | - | - | lost | - | - | - | lost | - | - | lost | - |
| `suspend_requested` | - | - | suspending | - | - | - | - | - | - | - | - |
| `saved` | = | = | = | = | = | = | = | suspended | = | = | = |
| `save_failed` | = | = | = | = | = | = | = | running | = | = | = |
| `save_interrupted` | = | = | = | = | = | = | = | running | = | = | = |
| `save_lost` | = | = | = | = | = | = | = | failed | = | = | = |
| `resume_requested` | - | - | - | - | - | - | - | - | pending | - | - |
| `resume_recovered` | running | running | - | - | - | - | - | - | - | - | - |
| `resume_abandoned` | suspended | suspended | - | - | - | - | - | - | - | - | - |
| `migration_started` | - | - | migrating | - | - | - | - | - | - | - | - |
| `migration_progress` | = | = | = | = | = | = | = | = | = | migrating | = |
| `migration_ended` (completed) | pending | starting | running | stopping | stopped | failed | unknown | suspending | suspended | running | lost |
| `migration_ended` (abandoned) | pending | starting | running | stopping | stopped | failed | unknown | suspending | suspended | running | lost |
| `migration_ended` (abandoned, source silent) | pending | starting | running | stopping | stopped | failed | unknown | suspending | suspended | unknown | lost |
| `migration_ended` (interrupted) | pending | starting | running | stopping | stopped | failed | unknown | suspending | suspended | running | lost |
| `image_wait` | = | starting | running | = | = | = | = | = | = | = | = |
| `image_wait_ended` | = | starting | running | = | = | = | = | = | = | = | = |
";

/// An event with representative data for each row label of [`EXPECTED`].
pub(super) fn sample(label: &str) -> Event {
    let name = label.split_whitespace().next().unwrap_or_default().trim_matches('`');
    let qualifier = label.split_once(" (").map(|(_, q)| q.trim_end_matches(')')).unwrap_or("");
    let s = |v: &str| v.to_string();
    match (name, qualifier) {
        ("queued", "") => Event::Queued,
        ("placed", "") => Event::Placed { host: s("h1") },
        ("queue_gave_up", "") => Event::QueueGaveUp { reason: s("no host could take it within 3600 s") },
        ("launch_sent", "") => Event::LaunchSent,
        ("launched", "") => Event::Launched { pid: 42, accel: Accel::Kvm },
        ("launch_failed", "") => Event::LaunchFailed { reason: s("host h1 refused: no such image") },
        ("resume_failed", "") => Event::ResumeFailed { host: s("h1"), reason: s("restore failed") },
        ("killed_while_starting", "") => Event::KilledWhileStarting,
        ("coordinator_restarted", "") => Event::CoordinatorRestarted,
        ("exited", "powered off") => Event::Exited { exit: ExitKind::PoweredOff },
        ("exited", "crashed") => Event::Exited { exit: ExitKind::Crashed { exit: s("exit status 1"), console: vec![s("a"), s("b")] } },
        ("vanished", "") => Event::Vanished { host: s("h1") },
        ("stop_requested", "") => Event::StopRequested { force: false },
        ("stop_requested", "force") => Event::StopRequested { force: true },
        ("stopped_while_queued", "") => Event::StoppedWhileQueued,
        ("stop_timed_out", "started") => Event::StopTimedOut { force: false, ever_started: true },
        ("stop_timed_out", "force") => Event::StopTimedOut { force: true, ever_started: true },
        ("stop_timed_out", "never started") => Event::StopTimedOut { force: false, ever_started: false },
        ("host_silent", "") => Event::HostSilent { host: s("h1") },
        ("host_back", "") => Event::HostBack,
        ("settled_running", "") => Event::SettledRunning { pid: 42 },
        ("settled_stopped", "") => Event::SettledStopped,
        ("settled_failed", "") => Event::SettledFailed { reason: s("starting on host h1 took longer than 900 s") },
        ("settled_lost", "") => Event::SettledLost { reason: s("host h1 reported that it no longer runs this VM (its QEMU is gone)") },
        ("suspend_requested", "") => Event::SuspendRequested,
        ("saved", "") => Event::Saved { image: s("vm-1.saved@2") },
        ("save_failed", "") => Event::SaveFailed,
        ("save_interrupted", "") => Event::SaveInterrupted,
        ("save_lost", "") => Event::SaveLost,
        ("resume_requested", "") => Event::ResumeRequested { host: s("h2") },
        ("resume_recovered", "") => Event::ResumeRecovered { host: s("h2") },
        ("resume_abandoned", "") => Event::ResumeAbandoned { host: s("h2") },
        ("migration_started", "") => Event::MigrationStarted { from: s("h1"), to: s("h2"), downtime_limit_ms: 100, max_seconds: 300 },
        ("migration_progress", "") => Event::MigrationProgress { to: s("h2"), step: s("copying memory") },
        ("migration_ended", "completed") => Event::MigrationEnded {
            outcome: MigrationOutcome::Completed { host: s("h2"), pid: 43, accel: Some(Accel::Kvm), elapsed_ms: Some(900) },
        },
        ("migration_ended", "abandoned") => Event::MigrationEnded { outcome: abandoned(true) },
        ("migration_ended", "abandoned, source silent") => Event::MigrationEnded { outcome: abandoned(false) },
        ("migration_ended", "interrupted") => Event::MigrationEnded { outcome: MigrationOutcome::Interrupted },
        ("image_wait", "") => Event::ImageWait { servers: vec![s("https://is1:7400")] },
        ("image_wait_ended", "") => Event::ImageWaitEnded,
        _ => panic!("no sample event for row {label:?}"),
    }
}

fn abandoned(source_answers: bool) -> MigrationOutcome {
    MigrationOutcome::Abandoned {
        status: MigrationStatus::Cancelled,
        error: "did not converge within 300 s".into(),
        elapsed_ms: 300_000,
        source: "h1".into(),
        source_answers,
    }
}

/// The position of each event kind; adding an [`Event`] variant fails to compile here, and
/// [`every_event_has_a_row`] fails until the table has a row for it.
fn kind(e: &Event) -> usize {
    match e {
        Event::Queued => 0,
        Event::Placed { .. } => 1,
        Event::QueueGaveUp { .. } => 2,
        Event::LaunchSent => 3,
        Event::Launched { .. } => 4,
        Event::LaunchFailed { .. } => 5,
        Event::ResumeFailed { .. } => 6,
        Event::KilledWhileStarting => 7,
        Event::CoordinatorRestarted => 8,
        Event::Exited { .. } => 9,
        Event::Vanished { .. } => 10,
        Event::StopRequested { .. } => 11,
        Event::StoppedWhileQueued => 12,
        Event::StopTimedOut { .. } => 13,
        Event::HostSilent { .. } => 14,
        Event::HostBack => 15,
        Event::SettledRunning { .. } => 16,
        Event::SettledStopped => 17,
        Event::SettledFailed { .. } => 18,
        Event::SettledLost { .. } => 19,
        Event::SuspendRequested => 20,
        Event::Saved { .. } => 21,
        Event::SaveFailed => 22,
        Event::SaveInterrupted => 23,
        Event::SaveLost => 24,
        Event::ResumeRequested { .. } => 25,
        Event::ResumeRecovered { .. } => 26,
        Event::ResumeAbandoned { .. } => 27,
        Event::MigrationStarted { .. } => 28,
        Event::MigrationProgress { .. } => 29,
        Event::MigrationEnded { .. } => 30,
        Event::ImageWait { .. } => 31,
        Event::ImageWaitEnded => 32,
    }
}
const KINDS: usize = 33;

/// The rows of [`EXPECTED`]: label and the 11 cells.
fn rows() -> Vec<(String, Vec<String>)> {
    EXPECTED
        .lines()
        .skip(2)
        .map(|line| {
            let cells: Vec<String> = line.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect();
            assert_eq!(cells.len(), 12, "row {line:?} has {} cells", cells.len());
            (cells[0].clone(), cells[1..].to_vec())
        })
        .collect()
}

/// What the table says for `event` in state `from`, in the notation of [`EXPECTED`].
fn cell(from: VmState, event: &Event) -> String {
    match transition(from, event) {
        Ok(Change::Unchanged) => "=".into(),
        Ok(Change::Update(u)) => u.state.as_str().into(),
        Err(_) => "-".into(),
    }
}

#[test]
fn every_state_and_event_pair_is_as_expected() {
    let mut wrong = Vec::new();
    for (label, cells) in rows() {
        let event = sample(&label);
        for (from, want) in STATES.iter().zip(&cells) {
            let got = cell(*from, &event);
            if got != *want {
                wrong.push(format!("{label} in {}: expected {want}, the table says {got}", from.as_str()));
            }
            if let Err(e) = transition(*from, &event) {
                assert_eq!(e, TransitionError { from: *from, event: event.name() });
                let text = e.to_string();
                assert!(text.contains(from.as_str()) && text.contains(event.name()), "{text}");
            }
        }
    }
    assert!(wrong.is_empty(), "the table and its expected rows differ:\n{}", wrong.join("\n"));
}

#[test]
fn every_event_has_a_row() {
    let mut seen = [false; KINDS];
    for (label, _) in rows() {
        let e = sample(&label);
        assert!(label.starts_with(&format!("`{}`", e.name())), "row {label:?} is not named after its event {}", e.name());
        seen[kind(&e)] = true;
    }
    let missing: Vec<usize> = (0..KINDS).filter(|&k| !seen[k]).collect();
    assert!(missing.is_empty(), "event kinds without a row in EXPECTED: {missing:?}");
}

#[test]
fn updates_change_something() {
    for (label, _) in rows() {
        let event = sample(&label);
        for from in STATES {
            if let (Ok(Change::Update(u)), Change::Update(empty)) = (transition(from, &event), stay(from)) {
                assert_ne!(u, empty, "{label} in {}: an update that changes nothing must be `Unchanged`", from.as_str());
            }
        }
    }
}

#[test]
fn the_architecture_document_shows_the_table() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/architecture.md");
    let doc = std::fs::read_to_string(path).expect("docs/architecture.md");
    let missing: Vec<&str> = EXPECTED.lines().filter(|l| !doc.lines().any(|d| d == *l)).collect();
    assert!(missing.is_empty(), "docs/architecture.md lacks these lines of the lifecycle table:\n{}", missing.join("\n"));
}

#[test]
#[ignore = "prints the table as the code has it: cargo test -p vgrid-coordinator print_lifecycle_table -- --ignored --nocapture"]
fn print_lifecycle_table() {
    for line in EXPECTED.lines().take(2) {
        println!("{line}");
    }
    for (label, _) in rows() {
        let event = sample(&label);
        let cells: Vec<String> = STATES.iter().map(|s| cell(*s, &event)).collect();
        println!("| {label} | {} |", cells.join(" | "));
    }
}

#[test]
fn phases_show_the_texts_of_the_api() {
    let h = || "h2".to_string();
    let cases = [
        (Phase::Placed, "placed"),
        (Phase::Queued, "queued: no host can take it now"),
        (Phase::Booting, "fetching image and booting"),
        (Phase::Running, "running"),
        (Phase::Stopping, "stopping"),
        (Phase::Stopped, "stopped"),
        (Phase::Failed, "failed"),
        (Phase::Unknown, "unknown"),
        (Phase::Lost, "lost"),
        (Phase::Saving, "saving memory and disk"),
        (Phase::Suspended, "suspended"),
        (Phase::Restoring { host: h() }, "placed on h2: restoring"),
        (Phase::Migrating { to: h(), step: None }, "migrating to h2"),
        (Phase::Migrating { to: h(), step: Some("copying memory (12%)".into()) }, "migrating to h2: copying memory (12%)"),
        (Phase::WaitingForImageServer { servers: vec!["https://a:7400".into()] }, "waiting for image server https://a:7400"),
        (
            Phase::WaitingForImageServer { servers: vec!["https://a".into(), "https://b".into()] },
            "waiting for image servers https://a, https://b",
        ),
    ];
    for (phase, text) in cases {
        assert_eq!(phase.to_string(), text);
    }
}

/// A record in `state` with every field the table may touch set (a JSON literal in the
/// record's stored form, so that it does not depend on the record's other fields).
pub(super) fn record(state: VmState) -> VmRecord {
    let mut rec: VmRecord = serde_json::from_value(serde_json::json!({
        "id": "vm-1", "name": "web", "owner": "alice", "image": "sample", "image_version": 1,
        "cpus": 1, "memory_mib": 256, "forwards": [],
        "state": state, "phase": state.as_str(), "reason": "earlier reason", "host": "h1", "accel": "tcg", "pid": 7,
        "saved_image": "vm-1.saved@1", "created": 10, "started": 20, "stopped": 30, "state_since": 40,
    }))
    .expect("a record");
    rec.migration = Some(Migration::begin("h1", "h2", 100, 300, 50));
    rec
}

/// The same record with the optional fields empty.
pub(super) fn bare_record(state: VmState) -> VmRecord {
    let mut rec = record(state);
    (rec.reason, rec.host, rec.accel, rec.pid, rec.saved_image, rec.started, rec.stopped, rec.migration) =
        (None, None, None, None, None, None, None, None);
    rec
}

#[test]
fn apply_writes_the_update_and_the_time_of_a_new_state() {
    let mut rec = record(VmState::Starting);
    assert!(advance(&mut rec, &sample("`launched`"), 1000).unwrap());
    assert_eq!((rec.state, rec.phase.as_str(), rec.pid, rec.accel), (VmState::Running, "running", Some(42), Some(Accel::Kvm)));
    assert_eq!((rec.started, rec.stopped, rec.state_since), (Some(1000), Some(30), Some(1000)));
    assert_eq!(rec.reason.as_deref(), Some("earlier reason"), "a field the update does not name is kept");

    // An update of data only keeps the state, its phase and its time.
    let mut rec = record(VmState::Suspending);
    rec.phase = "saving memory and disk".into();
    assert!(advance(&mut rec, &sample("`exited` (crashed)"), 1000).unwrap());
    assert_eq!((rec.state, rec.phase.as_str(), rec.pid, rec.state_since), (VmState::Suspending, "saving memory and disk", None, Some(40)));

    // Unchanged writes nothing.
    let mut rec = record(VmState::Stopped);
    let before = serde_json::to_value(&rec).unwrap();
    assert!(!advance(&mut rec, &sample("`stop_requested`"), 1000).unwrap());
    assert_eq!(serde_json::to_value(&rec).unwrap(), before);

    // Refused: nothing is written, and the error names the state and the event.
    let e = advance(&mut rec, &sample("`suspend_requested`"), 1000).unwrap_err();
    assert_eq!(e.to_string(), "a VM that is stopped cannot take event suspend_requested");
    assert_eq!(serde_json::to_value(&rec).unwrap(), before);
}

#[test]
fn apply_writes_reasons_and_clears_fields() {
    let mut rec = record(VmState::Running);
    advance(&mut rec, &sample("`exited` (crashed)"), 1000).unwrap();
    assert_eq!(rec.reason.as_deref(), Some("QEMU exited unexpectedly (exit status 1); last console lines:\na\nb"));
    assert_eq!((rec.state, rec.phase.as_str(), rec.stopped, rec.pid), (VmState::Failed, "failed", Some(1000), None));

    let mut rec = record(VmState::Suspended);
    advance(&mut rec, &sample("`resume_requested`"), 1000).unwrap();
    assert_eq!(rec.phase, "placed on h2: restoring");
    assert_eq!((rec.host.as_deref(), rec.reason.as_deref(), rec.pid, rec.started, rec.stopped), (Some("h2"), None, None, None, None));
    assert_eq!(rec.saved_image.as_deref(), Some("vm-1.saved@1"));

    let mut rec = record(VmState::Starting);
    advance(&mut rec, &sample("`resume_abandoned`"), 1000).unwrap();
    assert_eq!((rec.state, rec.host.as_deref(), rec.pid), (VmState::Suspended, None, None));
    assert_eq!(
        rec.reason.as_deref(),
        Some("the coordinator restarted while this VM was resuming on h2, which did not run it; resume it again")
    );
}

#[test]
fn an_image_wait_is_a_phase_of_a_starting_or_running_vm() {
    let mut rec = record(VmState::Running);
    rec.phase = "running".into();
    advance(&mut rec, &sample("`image_wait`"), 1000).unwrap();
    assert_eq!((rec.state, rec.phase.as_str(), rec.state_since), (VmState::Running, "waiting for image server https://is1:7400", Some(40)));
    advance(&mut rec, &sample("`image_wait_ended`"), 1001).unwrap();
    assert_eq!((rec.state, rec.phase.as_str(), rec.state_since), (VmState::Running, "running", Some(40)));
    let mut rec = record(VmState::Starting);
    advance(&mut rec, &sample("`image_wait`"), 1000).unwrap();
    advance(&mut rec, &sample("`image_wait_ended`"), 1001).unwrap();
    assert_eq!((rec.state, rec.phase.as_str()), (VmState::Starting, "fetching image and booting"));
}

#[test]
fn apply_begins_and_ends_migrations() {
    let mut rec = bare_record(VmState::Running);
    advance(&mut rec, &sample("`migration_started`"), 1000).unwrap();
    let m = rec.migration.clone().expect("a migration");
    assert_eq!((m.from.as_str(), m.to.as_str(), m.status, m.started), ("h1", "h2", MigrationStatus::Active, 1000));
    assert_eq!((m.downtime_limit_ms, m.max_seconds, rec.phase.as_str()), (100, 300, "migrating to h2"));

    advance(&mut rec, &sample("`migration_progress`"), 1001).unwrap();
    assert_eq!(rec.phase, "migrating to h2: copying memory");

    let mut done = rec.clone();
    advance(&mut done, &sample("`migration_ended` (completed)"), 1002).unwrap();
    let m = done.migration.clone().unwrap();
    assert_eq!((done.state, done.host.as_deref(), done.pid, done.accel), (VmState::Running, Some("h2"), Some(43), Some(Accel::Kvm)));
    assert_eq!(
        (m.status, m.phase.as_str(), m.finished, m.elapsed_ms, m.error),
        (MigrationStatus::Completed, "completed", Some(1002), Some(900), None)
    );

    let mut back = rec.clone();
    advance(&mut back, &sample("`migration_ended` (abandoned, source silent)"), 1002).unwrap();
    let m = back.migration.clone().unwrap();
    assert_eq!((back.state, back.reason.as_deref()), (VmState::Unknown, Some("host h1 missed its heartbeats during a migration")));
    assert_eq!(
        (m.status, m.phase.as_str(), m.error.as_deref()),
        (MigrationStatus::Cancelled, "cancelled", Some("did not converge within 300 s"))
    );

    // Only an active migration is failed by an interruption or a settling report.
    let mut ended = done.clone();
    ended.state = VmState::Migrating;
    advance(&mut ended, &sample("`migration_ended` (interrupted)"), 2000).unwrap();
    assert_eq!(ended.migration.as_ref().map(|m| (m.status, m.finished)), Some((MigrationStatus::Completed, Some(1002))));
    let mut active = rec.clone();
    advance(&mut active, &sample("`settled_running`"), 2000).unwrap();
    let m = active.migration.unwrap();
    assert_eq!(
        (m.status, m.error.as_deref(), m.finished),
        (MigrationStatus::Failed, Some("did not finish in time; resolved from the host's report"), Some(2000))
    );
}
