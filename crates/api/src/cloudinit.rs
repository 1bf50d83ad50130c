//! A VM's cloud-init data, as the NoCloud data source takes it: the ssh keys, hostname and
//! user-data a stock cloud image (Debian's or Ubuntu's genericcloud) picks up at its first
//! boot. The shape and its checks only: the host agent writes the seed disk (`CIDATA`) from it
//! on every host the VM runs on, so the seed follows the VM through suspend, resume and
//! migration; its `instance-id` is the VM's id, so a VM cloned from a shared image gets its own
//! ssh host keys and a resumed or migrated one does not run its first boot again.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Most bytes of user-data (cloud-init's own limit on most clouds is 16-64 KiB).
pub const MAX_USER_DATA: usize = 64 * 1024;
/// Most ssh keys one VM is given.
pub const MAX_SSH_KEYS: usize = 16;
/// Longest ssh public key line.
pub const MAX_SSH_KEY_LEN: usize = 16 * 1024;

/// The key types OpenSSH's `authorized_keys` takes.
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ssh-dss",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// What a cloud image learns at its first boot (`vgrid vm run --ssh-key`, `--user-data`,
/// `--hostname`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudInit {
    /// OpenSSH public key lines (`ssh-ed25519 AAAA... comment`) the guest's default user
    /// accepts (and root, under vgrid's default user-data).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    /// The guest's hostname (`local-hostname`); the coordinator sets the VM's name, made a
    /// valid hostname, when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 253)]
    pub hostname: Option<String>,
    /// User-data as given (`#cloud-config` YAML, a shell script, a MIME multipart), at most
    /// [`MAX_USER_DATA`] bytes. Absent: vgrid's default (root may log in with the keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
}

/// Why cloud-init data is not valid; each error names the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudInitError {
    #[error("ssh key {index}: {reason}; expected one OpenSSH public key line such as \"ssh-ed25519 AAAA... user@host\"")]
    SshKey { index: usize, reason: String },
    #[error("{count} ssh keys: at most {MAX_SSH_KEYS}")]
    TooManyKeys { count: usize },
    #[error(
        "invalid hostname {value:?}: dot-separated labels of 1-63 characters a-z, 0-9 and '-' (not first or last), at most 253 characters"
    )]
    Hostname { value: String },
    #[error("user-data is {len} bytes: at most {MAX_USER_DATA}")]
    UserDataTooLarge { len: usize },
}

impl CloudInit {
    /// Every static check: key lines, their count, the hostname, the user-data's size.
    pub fn validate(&self) -> Result<(), CloudInitError> {
        if self.ssh_keys.len() > MAX_SSH_KEYS {
            return Err(CloudInitError::TooManyKeys { count: self.ssh_keys.len() });
        }
        for (index, k) in self.ssh_keys.iter().enumerate() {
            check_ssh_key(k).map_err(|reason| CloudInitError::SshKey { index: index + 1, reason })?;
        }
        if let Some(h) = &self.hostname {
            if !valid_hostname(h) {
                return Err(CloudInitError::Hostname { value: h.clone() });
            }
        }
        if let Some(u) = &self.user_data {
            if u.len() > MAX_USER_DATA {
                return Err(CloudInitError::UserDataTooLarge { len: u.len() });
            }
        }
        Ok(())
    }
}

/// One OpenSSH public key line: a known type, base64 key data, an optional comment.
fn check_ssh_key(line: &str) -> Result<(), String> {
    if line.len() > MAX_SSH_KEY_LEN {
        return Err(format!("{} bytes, at most {MAX_SSH_KEY_LEN}", line.len()));
    }
    if line.contains(['\n', '\r', '\0']) {
        return Err("holds a line break".into());
    }
    let mut fields = line.split_whitespace();
    let kind = fields.next().ok_or("is empty")?;
    if !KEY_TYPES.contains(&kind) {
        return Err(format!("unknown key type {kind:?} (a private key, or options before the type?)"));
    }
    let data = fields.next().ok_or("has no key data after its type")?;
    let b64 = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=');
    if data.len() < 16 || !data.chars().all(b64) {
        return Err("its key data is not base64".into());
    }
    Ok(())
}

/// RFC 1123 host names, lower case.
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

/// A VM name made a host name: lower case, other characters than a-z, 0-9 and '-' become '-',
/// no '-' at either end, at most 63 characters; `vm` when nothing is left.
pub fn hostname_of(name: &str) -> String {
    let mapped: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).take(63).collect();
    let h = mapped.trim_matches('-');
    if h.is_empty() {
        "vm".to_string()
    } else {
        h.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq8KqZQ0f0GJ7gHCxRZ2m6Bf0cPZ9x5q2w3e4r5t6y7 alice@laptop";

    #[test]
    fn keys_hostnames_and_user_data_are_checked() {
        let ok =
            CloudInit { ssh_keys: vec![KEY.into()], hostname: Some("web-1.example".into()), user_data: Some("#cloud-config\n".into()) };
        ok.validate().unwrap();
        let bad = |c: CloudInit| c.validate().unwrap_err().to_string();
        let key = |k: &str| CloudInit { ssh_keys: vec![k.into()], ..Default::default() };
        assert!(bad(key("-----BEGIN OPENSSH PRIVATE KEY-----")).contains("ssh key 1: unknown key type"), "{}", bad(key("x")));
        assert!(bad(key("ssh-ed25519")).contains("no key data"));
        assert!(bad(key("ssh-ed25519 not*base64*at*all!!")).contains("not base64"));
        assert!(bad(key(&format!("{KEY}\nssh-rsa AAAA"))).contains("line break"));
        let many = CloudInit { ssh_keys: vec![KEY.into(); MAX_SSH_KEYS + 1], ..Default::default() };
        assert_eq!(bad(many), "17 ssh keys: at most 16");
        for h in ["", "Web", "-a", "a-", "a..b", "a_b", &"a".repeat(64)] {
            let c = CloudInit { hostname: Some(h.into()), ..Default::default() };
            assert!(bad(c).starts_with("invalid hostname"), "{h:?}");
        }
        let big = CloudInit { user_data: Some("x".repeat(MAX_USER_DATA + 1)), ..Default::default() };
        assert_eq!(bad(big), format!("user-data is {} bytes: at most {MAX_USER_DATA}", MAX_USER_DATA + 1));
    }

    #[test]
    fn vm_names_become_host_names() {
        assert_eq!(hostname_of("My_VM.2"), "my-vm-2");
        assert_eq!(hostname_of("__"), "vm");
        assert_eq!(hostname_of(&"a".repeat(80)).len(), 63);
        assert!(valid_hostname(&hostname_of("sample-1a2b3c")));
    }
}
