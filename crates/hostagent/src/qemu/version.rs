//! Which QEMU this host runs: `qemu-system-x86_64 --version`, parsed.

use crate::vm::{exit_info_of, LaunchOptions, VmError};
use std::path::Path;
use std::process::Stdio;

/// QEMU's version from `qemu-system-x86_64 --version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
    /// The whole first line, e.g. `QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2…)`.
    pub full: String,
}

/// Version of `qemu-system-x86_64` (or `$VGRID_QEMU_SYSTEM`).
pub async fn qemu_version() -> Result<QemuVersion, VmError> {
    qemu_version_of(&LaunchOptions::default().qemu_system).await
}

/// Version of the given QEMU system emulator binary.
pub async fn qemu_version_of(binary: &Path) -> Result<QemuVersion, VmError> {
    let err = |detail: String| VmError::Version { binary: binary.to_path_buf(), detail };
    let out = tokio::process::Command::new(binary).arg("--version").stdin(Stdio::null()).output().await.map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(format!("{}: {}", exit_info_of(out.status), String::from_utf8_lossy(&out.stderr).trim())));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    parse_qemu_version(&text).ok_or_else(|| err(format!("unrecognised output {:?}", text.lines().next().unwrap_or(""))))
}

fn parse_qemu_version(text: &str) -> Option<QemuVersion> {
    let line = text.lines().next()?.trim();
    let rest = line.strip_prefix("QEMU emulator version ")?;
    let ver = rest.split_whitespace().next()?;
    let mut it = ver.split('.').map(|p| p.parse::<u32>());
    let major = it.next()?.ok()?;
    let minor = it.next().unwrap_or(Ok(0)).ok()?;
    let micro = it.next().unwrap_or(Ok(0)).ok()?;
    Some(QemuVersion { major, minor, micro, full: line.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_parsing() {
        let v = parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright").unwrap();
        assert_eq!((v.major, v.minor, v.micro), (10, 0, 2));
        assert!(v.full.contains("Debian"));
        assert!(parse_qemu_version("qemu-img version 10").is_none());
    }
}
