//! Every body of the host API survives a trip through JSON, and the shapes earlier versions
//! wrote still read.

use super::*;
use crate::migrate::{Migration, MigrationStatus};
use serde::de::DeserializeOwned;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) {
    let j = serde_json::to_string(v).unwrap();
    let back: T = serde_json::from_str(&j).unwrap_or_else(|e| panic!("{j}: {e}"));
    assert_eq!(&back, v, "{j}");
}

fn config() -> VmConfig {
    VmConfig::new(ImageRef { name: "sample".into(), version: Some(3) })
        .with_cpus(2)
        .with_memory_mib(512)
        .with_accel(Some(Accel::Kvm))
        .with_resources(Resources { cpu_share: Some(0.25), disk_iops: Some(100), ..Default::default() })
        .with_forwards(vec![Forward { host: 2222, guest: 22 }])
}

fn ready() -> IncomingReady {
    IncomingReady { host: "10.0.0.2".into(), nbd_port: 4000, migration_port: 4001, pid: 77, accel: Accel::Tcg }
}

#[test]
fn launch_bodies_round_trip() {
    let l = LaunchRequest { id: "vm-1".into(), config: config(), restore: None };
    round_trip(&l);
    let r = LaunchRequest { restore: Some(ImageRef { name: "vm-1.saved".into(), version: Some(2) }), ..l.clone() };
    round_trip(&r);
    assert_eq!(r.image().to_string(), "vm-1.saved@2");
    assert_eq!(l.image().to_string(), "sample@3");
    round_trip(&Launched { pid: 42, accel: Accel::Kvm });
    assert_eq!(serde_json::to_value(Launched { pid: 42, accel: Accel::Kvm }).unwrap(), serde_json::json!({"pid": 42, "accel": "kvm"}));
    round_trip(&IncomingRequest { launch: r, listen_host: "10.0.0.2".into() });
}

#[test]
fn a_launch_json_of_the_previous_version_reads() {
    let old = r#"{"id":"vm-9","image":{"name":"sample","version":3},"cpus":2,"memory_mib":512,
        "forwards":[[2222,22]],"accel":"kvm","resources":{"cpu_share":0.25,"disk_iops":100}}"#;
    let l: LaunchRequest = serde_json::from_str(old).unwrap();
    assert_eq!(l, LaunchRequest { id: "vm-9".into(), config: config(), restore: None });
    let bare = r#"{"id":"vm-9","image":{"name":"sample"},"cpus":1,"memory_mib":256,"forwards":[]}"#;
    let l: LaunchRequest = serde_json::from_str(bare).unwrap();
    assert_eq!(l.config, VmConfig::new(ImageRef { name: "sample".into(), version: None }));
    assert!(serde_json::from_str::<LaunchRequest>(r#"{"id":"x"}"#).is_err());
}

#[test]
fn report_bodies_round_trip() {
    round_trip(&VmExit { exit: ExitInfo { code: None, signal: Some(9) }, console_tail: vec!["a".into()], cause: None, present: true });
    round_trip(&VmExit { exit: ExitInfo::unknown(), console_tail: vec![], cause: Some("memory limit".into()), present: false });
    round_trip(&VmReport { id: "vm-1".into(), pid: 1, incoming: true });
    assert_eq!(
        serde_json::to_value(VmReport { id: "a".into(), pid: 1, incoming: false }).unwrap(),
        serde_json::json!({"id": "a", "pid": 1})
    );
    round_trip(&PullProgress {
        image: Some("s@1".into()),
        done: 5,
        total: 10,
        fetched_bytes: 3,
        seconds: 0.5,
        finished: true,
        error: None,
    });
    round_trip(&HostUsage {
        vms: vec![Default::default()],
        load_now: 0.5,
        load_predicted: 0.25,
        cpu_cap: 2.0,
        free_cpu_share: 1.0,
        cgroups: "v2".into(),
    });
    let waiting = VmWaiting { vm: "a".into(), image: "s@1".into(), servers: vec!["https://is:7400".into()], chunks: 2, waiting_secs: 7 };
    let hb = HostHeartbeat {
        ad: crate::grid::tests::ad("h1"),
        vms: vec![VmReport { id: "a".into(), pid: 2, incoming: false }],
        usage: vec![],
        waiting: vec![waiting.clone()],
    };
    let j = serde_json::to_string(&hb).unwrap();
    let back: HostHeartbeat = serde_json::from_str(&j).unwrap();
    assert_eq!((back.ad, back.vms, back.waiting), (hb.ad.clone(), hb.vms.clone(), vec![waiting]));
    // An agent that predates `waiting` sends none; none is not sent.
    let mut old: serde_json::Value = serde_json::from_str(&j).unwrap();
    old.as_object_mut().unwrap().remove("waiting");
    assert!(serde_json::from_value::<HostHeartbeat>(old).unwrap().waiting.is_empty());
    let quiet = serde_json::to_value(HostHeartbeat { waiting: vec![], ..hb }).unwrap();
    assert!(quiet.get("waiting").is_none(), "{quiet}");
    round_trip(&HeartbeatReply { interval_secs: 5, image_servers: vec!["https://s".into()], networks: vec![] });
    assert_eq!(
        serde_json::from_str::<HeartbeatReply>("{}").unwrap(),
        HeartbeatReply { interval_secs: 5, image_servers: vec![], networks: vec![] }
    );
}

#[test]
fn save_and_migration_bodies_round_trip() {
    round_trip(&SaveRequest { name: "warm".into() });
    round_trip(&VmPresence { saving: true, running: true, known: true, exited: false });
    round_trip(&VmPresence { saving: false, running: false, known: true, exited: true });
    // An agent that predates `known` knows a VM it runs.
    let p: VmPresence = serde_json::from_str(r#"{"saving":false,"running":true}"#).unwrap();
    assert!(p.known);
    round_trip(&ready());
    round_trip(&SendRequest { dest: ready(), to: "h2".into(), downtime_ms: 100, max_seconds: 300, max_bandwidth_mib: Some(64) });
    round_trip(&FinishRequest { console_history: "boot\n".into() });
    let mut m = Migration::begin("h1", "h2", 100, 300, 1000);
    m.status = MigrationStatus::Completed;
    m.downtime_ms = Some(20);
    m.elapsed_ms = Some(1500);
    round_trip(&m);
}

#[test]
fn exit_info_says_how_qemu_ended() {
    assert_eq!(ExitInfo { code: None, signal: Some(9) }.to_string(), "killed by signal 9 (SIGKILL)");
    assert_eq!(ExitInfo { code: None, signal: Some(15) }.to_string(), "killed by signal 15 (SIGTERM)");
    assert_eq!(ExitInfo { code: None, signal: Some(64) }.to_string(), "killed by signal 64 (?)");
    assert_eq!(ExitInfo { code: Some(1), signal: None }.to_string(), "exit code 1");
    assert_eq!(ExitInfo::unknown().to_string(), "exit status unknown");
    assert!(ExitInfo { code: Some(0), signal: None }.success() && !ExitInfo::unknown().success());
}
