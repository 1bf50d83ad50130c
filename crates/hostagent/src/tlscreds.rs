//! TLS for the streams QEMU itself opens between two hosts in a live migration: the disk
//! mirror (QEMU's NBD server on the destination, its NBD client on the source) and the memory
//! stream. Both ends use this host's grid certificate (QEMU `tls-creds-x509`, peers verified
//! against the grid CA), so only a host of the same grid can feed or read a migrating guest.
//! The credentials are copied into the VM's runtime directory (QEMU's own, mode 0700), where
//! QEMU's unprivileged user can read them.

use std::path::Path;

use serde_json::json;

use crate::vm::{Vm, VmError};

/// QOM id of the credentials object of each end.
pub const SERVER: &str = "vgrid-tls-server";
pub const CLIENT: &str = "vgrid-tls-client";

/// Writes the grid CA and this host's certificate and key in QEMU's file layout into `dir`.
fn write_creds(dir: &Path, ca: &str, cert: &str, key: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    for (name, text, mode) in [
        ("ca-cert.pem", ca, 0o644),
        ("server-cert.pem", cert, 0o644),
        ("client-cert.pem", cert, 0o644),
        ("server-key.pem", key, 0o600),
        ("client-key.pem", key, 0o600),
    ] {
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&p)?;
        f.write_all(text.as_bytes())?;
    }
    Ok(())
}

/// Adds the credentials object for `server` or client use to `vm`'s QEMU and returns its id;
/// `None` when this process has no grid certificate (in-process tests over plain HTTP), then
/// the streams stay plain.
/// `give` hands the directory to QEMU's user.
pub async fn add(vm: &Vm, server: bool, give: &(dyn Fn(&Path) -> std::io::Result<()> + Sync)) -> Result<Option<&'static str>, VmError> {
    let Some(tls) = vgrid_trust::tls::current() else { return Ok(None) };
    let Some(node) = tls.identity.as_ref() else { return Ok(None) };
    let dir = vm.runtime_dir().join("tls");
    let io = |source| VmError::Io { id: vm.id().to_string(), path: dir.clone(), source };
    write_creds(&dir, &node.ca_pem, &node.cert_pem, &node.key_pem).and_then(|_| give(&dir)).map_err(io)?;
    let id = if server { SERVER } else { CLIENT };
    // A previous migration attempt may have left it.
    let _ = vm.execute("object-del", Some(json!({"id": id}))).await;
    vm.execute(
        "object-add",
        Some(json!({"qom-type": "tls-creds-x509", "id": id, "dir": dir, "endpoint": if server { "server" } else { "client" }, "verify-peer": true})),
    )
    .await?;
    Ok(Some(id))
}
