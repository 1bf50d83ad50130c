//! A VM's networking: the single home of everything about its network interfaces. Today every
//! guest has user-mode networking (QEMU's slirp) with TCP port forwards from the host's
//! 127.0.0.1; other modes (a site network, tunnels between hosts) become new [`Nic`] variants.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What is wrong with a VM's networking; each error names the value and what is allowed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NetError {
    #[error("invalid forward {value:?}: expected HOSTPORT:GUESTPORT")]
    ForwardSyntax { value: String },
    #[error("invalid port {port:?} in forward {value:?}: expected 1-65535")]
    ForwardPortText { port: String, value: String },
    #[error("port forward {host}->{guest}: ports must be 1-65535")]
    ForwardPort { host: u16, guest: u16 },
    #[error("host port {port} is forwarded twice")]
    ForwardTwice { port: u16 },
}

/// The network interfaces of a VM, in guest order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetConfig {
    pub nics: Vec<Nic>,
}

impl Default for NetConfig {
    /// One user-mode interface without forwards (what every VM had before networks were
    /// configurable).
    fn default() -> Self {
        NetConfig::user(Vec::new())
    }
}

impl NetConfig {
    /// One user-mode interface with these port forwards.
    pub fn user(forwards: Vec<Forward>) -> NetConfig {
        NetConfig { nics: vec![Nic::User { forwards }] }
    }

    /// The port forwards of all interfaces.
    pub fn forwards(&self) -> impl Iterator<Item = &Forward> {
        self.nics.iter().flat_map(|n| match n {
            Nic::User { forwards } => forwards.iter(),
        })
    }

    /// Whether any interface forwards host port `port`.
    pub fn forwards_host_port(&self, port: u16) -> bool {
        self.forwards().any(|f| f.host == port)
    }

    /// Static checks: every port in 1-65535, no host port forwarded twice.
    pub fn validate(&self) -> Result<(), NetError> {
        let mut seen = std::collections::HashSet::new();
        for f in self.forwards() {
            if f.host == 0 || f.guest == 0 {
                return Err(NetError::ForwardPort { host: f.host, guest: f.guest });
            }
            if !seen.insert(f.host) {
                return Err(NetError::ForwardTwice { port: f.host });
            }
        }
        Ok(())
    }
}

/// One network interface of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Nic {
    /// User-mode networking (QEMU's slirp): outbound connections through the host, and TCP
    /// port forwards from the host's 127.0.0.1.
    User {
        #[serde(default)]
        forwards: Vec<Forward>,
    },
}

/// A host port forwarded to a guest port over user-mode networking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Forward {
    #[schema(minimum = 1, maximum = 65535)]
    pub host: u16,
    #[schema(minimum = 1, maximum = 65535)]
    pub guest: u16,
}

impl std::str::FromStr for Forward {
    type Err = NetError;
    /// `HOSTPORT:GUESTPORT`, both 1-65535.
    fn from_str(s: &str) -> Result<Self, NetError> {
        let (h, g) = s.split_once(':').ok_or_else(|| NetError::ForwardSyntax { value: s.to_string() })?;
        let port = |p: &str| {
            p.parse::<u16>().ok().filter(|&v| v != 0).ok_or_else(|| NetError::ForwardPortText { port: p.to_string(), value: s.to_string() })
        };
        Ok(Forward { host: port(h)?, guest: port(g)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_parse_with_clear_errors() {
        assert_eq!("2222:22".parse::<Forward>().unwrap(), Forward { host: 2222, guest: 22 });
        let e = "2222".parse::<Forward>().unwrap_err().to_string();
        assert_eq!(e, "invalid forward \"2222\": expected HOSTPORT:GUESTPORT");
        let e = "0:22".parse::<Forward>().unwrap_err().to_string();
        assert_eq!(e, "invalid port \"0\" in forward \"0:22\": expected 1-65535");
        let e = "22:x".parse::<Forward>().unwrap_err().to_string();
        assert!(e.contains("\"x\""), "{e}");
    }

    #[test]
    fn net_validation_names_the_port() {
        NetConfig::user(vec![Forward { host: 2222, guest: 22 }, Forward { host: 8080, guest: 80 }]).validate().unwrap();
        let e = NetConfig::user(vec![Forward { host: 0, guest: 22 }]).validate().unwrap_err();
        assert_eq!(e.to_string(), "port forward 0->22: ports must be 1-65535");
        let e = NetConfig::user(vec![Forward { host: 2222, guest: 22 }, Forward { host: 2222, guest: 80 }]).validate().unwrap_err();
        assert_eq!(e.to_string(), "host port 2222 is forwarded twice");
    }

    #[test]
    fn nics_are_tagged_by_mode() {
        let n = NetConfig::user(vec![Forward { host: 2222, guest: 22 }]);
        let j = serde_json::to_value(&n).unwrap();
        assert_eq!(j, serde_json::json!({"nics": [{"mode": "user", "forwards": [{"host": 2222, "guest": 22}]}]}));
        assert_eq!(serde_json::from_value::<NetConfig>(j).unwrap(), n);
        assert!(n.forwards_host_port(2222) && !n.forwards_host_port(22));
    }
}
