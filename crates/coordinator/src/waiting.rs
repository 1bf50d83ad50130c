//! Guests stalled on unreachable image servers, as their hosts report them in their heartbeats
//! (`HostHeartbeat::waiting`: the host's block proxy holds their reads until a server answers,
//! up to the host's `--fetch-timeout`). A VM that waits shows it as its phase (`waiting for
//! image server URL`) while its state stays `starting` or `running`; the phase goes back when
//! the host no longer reports it. A record is written only when its phase changes.

use vgrid_api::host::VmWaiting;
use vgrid_api::vm::{VmRecord, VmState};

use crate::lifecycle::table::{Event, Phase};
use crate::Coordinator;

/// The events that bring the phases of `host`'s starting and running VMs in line with the VMs
/// it reports `waiting`: an [`Event::ImageWait`] for a VM whose phase does not say so yet (or
/// names other servers), an [`Event::ImageWaitEnded`] for one whose phase still says it waits.
pub(crate) fn plan_waits(host: &str, waiting: &[VmWaiting], records: &[VmRecord]) -> Vec<(String, Event)> {
    records
        .iter()
        .filter(|r| r.host.as_deref() == Some(host) && matches!(r.state, VmState::Starting | VmState::Running))
        .filter_map(|r| match waiting.iter().find(|w| w.vm == r.id) {
            Some(w) => {
                let phase = Phase::WaitingForImageServer { servers: w.servers.clone() };
                (r.phase != phase.to_string()).then(|| (r.id.clone(), Event::ImageWait { servers: w.servers.clone() }))
            }
            None => r.phase.starts_with(Phase::IMAGE_WAIT).then(|| (r.id.clone(), Event::ImageWaitEnded)),
        })
        .collect()
}

impl Coordinator {
    /// Shows what `host` reports waiting for image servers as its VMs' phases (see the module).
    pub(crate) async fn image_waits(&self, host: &str, waiting: &[VmWaiting], records: &[VmRecord]) {
        for (id, event) in plan_waits(host, waiting, records) {
            match &event {
                Event::ImageWait { servers } => {
                    let w = waiting.iter().find(|w| w.vm == id);
                    tracing::warn!(
                        vm = %id, host, image = w.map(|w| w.image.as_str()).unwrap_or(""), servers = %servers.join(", "),
                        "the VM's reads wait for unreachable image servers (its host reports)"
                    );
                }
                _ => tracing::info!(vm = %id, host, "the VM's reads no longer wait for image servers"),
            }
            if let Err(e) = self.apply(&id, event).await {
                tracing::warn!(vm = %id, host, "cannot record the VM's image server wait: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, host: &str, state: VmState, phase: &str) -> VmRecord {
        serde_json::from_value(serde_json::json!({
            "id": id, "name": id, "owner": "alice", "image": "sample", "image_version": 1,
            "cpus": 1, "memory_mib": 256, "forwards": [], "state": state, "phase": phase, "host": host, "created": 10,
        }))
        .expect("a record")
    }

    fn wait(vm: &str, servers: &[&str]) -> VmWaiting {
        VmWaiting {
            vm: vm.into(),
            image: "sample@1".into(),
            servers: servers.iter().map(|s| s.to_string()).collect(),
            chunks: 1,
            waiting_secs: 3,
        }
    }

    #[test]
    fn phases_follow_what_the_host_reports_and_only_change_when_they_differ() {
        let a = "waiting for image server https://a";
        let records = vec![
            rec("new", "h1", VmState::Running, "running"),
            rec("same", "h1", VmState::Running, a),
            rec("moved", "h1", VmState::Starting, a),
            rec("over", "h1", VmState::Running, a),
            rec("quiet", "h1", VmState::Running, "running"),
            rec("elsewhere", "h2", VmState::Running, "running"),
            rec("stopping", "h1", VmState::Stopping, "stopping"),
        ];
        let waiting = vec![
            wait("new", &["https://a"]),
            wait("same", &["https://a"]),
            wait("moved", &["https://a", "https://b"]),
            wait("elsewhere", &["https://a"]),
            wait("stopping", &["https://a"]),
        ];
        let plan = plan_waits("h1", &waiting, &records);
        assert_eq!(
            plan,
            vec![
                ("new".to_string(), Event::ImageWait { servers: vec!["https://a".into()] }),
                ("moved".to_string(), Event::ImageWait { servers: vec!["https://a".into(), "https://b".into()] }),
                ("over".to_string(), Event::ImageWaitEnded),
            ]
        );
        // Nothing reported, nothing waiting: nothing to write.
        assert!(plan_waits("h1", &[], &records[4..5]).is_empty());
    }
}
