//! Reading VM records as stored by every version: the current shape (a `config` object) and
//! the flat shape from before [`VmConfig`] (top-level `image`, `image_version`, `cpus`,
//! `memory_mib`, `forwards`, `accel`, `resources`). Records are always written in the current
//! shape.

use serde::Deserialize;

use crate::migrate::Migration;
use crate::net::Forward;
use crate::vm::{Accel, Resources, VmConfig, VmRecord, VmState};
use crate::ImageRef;

/// A VM record in either shape.
#[derive(Deserialize)]
pub(crate) struct StoredVmRecord {
    id: String,
    name: String,
    #[serde(default = "anonymous")]
    owner: String,
    #[serde(default)]
    config: Option<VmConfig>,
    #[serde(flatten)]
    flat: FlatConfig,
    state: VmState,
    #[serde(default)]
    phase: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    host: Option<String>,
    /// Current shape: the accelerator the host chose. Flat shape: the one asked for, replaced
    /// by the host's choice at launch.
    #[serde(default)]
    accel: Option<Accel>,
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    require: Option<String>,
    #[serde(default)]
    rank: Option<String>,
    #[serde(default)]
    saved_image: Option<String>,
    created: u64,
    #[serde(default)]
    started: Option<u64>,
    #[serde(default)]
    stopped: Option<u64>,
    #[serde(default)]
    state_since: Option<u64>,
    #[serde(default)]
    migration: Option<Migration>,
    #[serde(default)]
    ram_remote_bytes: Option<u64>,
}

/// The configuration fields of the flat shape.
#[derive(Deserialize)]
struct FlatConfig {
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    image_version: Option<u32>,
    #[serde(default)]
    cpus: Option<u32>,
    #[serde(default)]
    memory_mib: Option<u64>,
    #[serde(default)]
    forwards: Vec<Forward>,
    #[serde(default)]
    resources: Resources,
}

fn anonymous() -> String {
    "anonymous".into()
}

impl FlatConfig {
    fn into_config(self, accel: Option<Accel>) -> Result<VmConfig, String> {
        let (Some(image), Some(cpus), Some(memory_mib)) = (self.image, self.cpus, self.memory_mib) else {
            return Err("a VM record needs a `config` (or the `image`, `cpus` and `memory_mib` of earlier versions)".into());
        };
        let mut image_ref = image
            .parse::<ImageRef>()
            .unwrap_or_else(|_| ImageRef { name: image.split('@').next().unwrap_or_default().to_string(), version: None });
        if image_ref.version.is_none() {
            image_ref.version = self.image_version;
        }
        Ok(VmConfig::new(image_ref)
            .with_cpus(cpus)
            .with_memory_mib(memory_mib)
            .with_accel(accel)
            .with_resources(self.resources)
            .with_forwards(self.forwards))
    }
}

impl TryFrom<StoredVmRecord> for VmRecord {
    type Error = String;

    fn try_from(r: StoredVmRecord) -> Result<VmRecord, String> {
        let (config, accel) = match r.config {
            Some(c) => (c, r.accel),
            // A flat record's accelerator was the request until the VM started, then the
            // host's choice (which its later launches asked for again).
            None => (r.flat.into_config(r.accel)?, r.accel.filter(|_| r.started.is_some())),
        };
        Ok(VmRecord {
            id: r.id,
            name: r.name,
            owner: r.owner,
            config,
            state: r.state,
            phase: r.phase,
            reason: r.reason,
            host: r.host,
            accel,
            pid: r.pid,
            require: r.require,
            rank: r.rank,
            saved_image: r.saved_image,
            created: r.created,
            started: r.started,
            stopped: r.stopped,
            state_since: r.state_since,
            migration: r.migration,
            ram_remote_bytes: r.ram_remote_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::NetConfig;

    /// A record as the version before `VmConfig` stored it (state.redb), running.
    const FLAT: &str = r#"{"id":"vm-0a1b2c3d4e5f","name":"web","owner":"alice","image":"sample","image_version":3,
        "cpus":2,"memory_mib":512,"forwards":[{"host":8080,"guest":80}],"state":"running","phase":"running",
        "reason":null,"host":"h1","accel":"tcg","pid":4242,"require":"host.cpus >= 2",
        "resources":{"cpu_share":0.5,"memory_limit_mib":800},"created":1700000000,"started":1700000005,
        "stopped":null,"state_since":1700000005}"#;

    #[test]
    fn a_flat_record_of_the_previous_version_loads() {
        let r: VmRecord = serde_json::from_str(FLAT).unwrap();
        assert_eq!((r.id.as_str(), r.name.as_str(), r.owner.as_str()), ("vm-0a1b2c3d4e5f", "web", "alice"));
        assert_eq!(r.config.image(), &ImageRef { name: "sample".into(), version: Some(3) });
        assert_eq!((r.config.cpus, r.config.memory_mib), (2, 512));
        assert_eq!(r.config.net, NetConfig::user(vec![Forward { host: 8080, guest: 80 }]));
        assert_eq!(r.config.resources, Resources { cpu_share: Some(0.5), memory_limit_mib: Some(800), ..Default::default() });
        assert_eq!((r.config.accel, r.accel), (Some(Accel::Tcg), Some(Accel::Tcg)));
        assert_eq!((r.state, r.host.as_deref(), r.pid), (VmState::Running, Some("h1"), Some(4242)));
        assert_eq!(r.require.as_deref(), Some("host.cpus >= 2"));
        // Written back in the current shape, it reads the same.
        let again: VmRecord = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(again.config, r.config);
        assert_eq!(again.accel, r.accel);
    }

    #[test]
    fn a_flat_record_that_never_started_keeps_its_accelerator_as_a_request() {
        let old = r#"{"id":"vm-1","name":"q","image":"sample@1","cpus":1,"memory_mib":256,"forwards":[],
            "state":"pending","host":null,"accel":"kvm","created":5}"#;
        let r: VmRecord = serde_json::from_str(old).unwrap();
        assert_eq!(r.owner, "anonymous");
        assert_eq!(r.config.image(), &ImageRef { name: "sample".into(), version: Some(1) });
        assert_eq!((r.config.accel, r.accel), (Some(Accel::Kvm), None));
        assert_eq!(r.config.net, NetConfig::default());
    }

    #[test]
    fn a_record_without_any_configuration_is_refused() {
        let e = serde_json::from_str::<VmRecord>(r#"{"id":"x","name":"x","state":"pending","created":1}"#).unwrap_err();
        assert!(e.to_string().contains("config"), "{e}");
    }

    #[test]
    fn a_current_record_round_trips() {
        let c = VmConfig::new(ImageRef { name: "sample".into(), version: Some(1) }).with_forwards(vec![Forward { host: 1, guest: 2 }]);
        let mut r = VmRecord::new("vm-1", "n", "bob", c, 10);
        r.accel = Some(Accel::Kvm);
        let j = serde_json::to_value(&r).unwrap();
        assert!(j.get("cpus").is_none() && j["config"]["cpus"] == 1, "{j}");
        let back: VmRecord = serde_json::from_value(j).unwrap();
        assert_eq!(back.config, r.config);
        assert_eq!((back.accel, back.state, back.state_since), (Some(Accel::Kvm), VmState::Pending, Some(10)));
    }
}
