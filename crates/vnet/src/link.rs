//! Bridges and taps, made with iproute2's `ip`.

use crate::{run, NetError};

fn ip(what: &str, args: &[&str]) -> Result<String, NetError> {
    run(what, "ip", "iproute2", args)
}

/// Whether a link named `name` exists.
pub fn exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Makes bridge `name` (up) when there is no link of that name; `true` when it made it. A link
/// of that name that is not a bridge is an error (it is never changed).
pub fn ensure_bridge(name: &str) -> Result<bool, NetError> {
    if exists(name) {
        if !std::path::Path::new("/sys/class/net").join(name).join("bridge").exists() {
            return Err(NetError::Command {
                what: format!("bridge {name}"),
                cmd: String::new(),
                stderr: format!("{name} exists and is not a bridge; name a bridge (or a free name for vgrid to make one)"),
            });
        }
        return Ok(false);
    }
    ip(&format!("making bridge {name}"), &["link", "add", name, "type", "bridge"])?;
    ip(&format!("bringing bridge {name} up"), &["link", "set", name, "up"])?;
    Ok(true)
}

/// Makes tap `tap` for QEMU running as `uid` (it opens the tap by name), attached to `bridge`
/// and up. A tap left by an earlier agent is made again.
pub fn add_tap(tap: &str, uid: Option<u32>, bridge: &str) -> Result<(), NetError> {
    if exists(tap) {
        delete(tap)?;
    }
    let what = format!("tap {tap} on bridge {bridge}");
    let uid = uid.map(|u| u.to_string());
    let mut args = vec!["tuntap", "add", "dev", tap, "mode", "tap"];
    if let Some(u) = &uid {
        args.extend(["user", u.as_str()]);
    }
    ip(&what, &args)?;
    ip(&what, &["link", "set", tap, "master", bridge])?;
    ip(&what, &["link", "set", tap, "up"])?;
    Ok(())
}

/// Removes link `name` if it exists.
pub fn delete(name: &str) -> Result<(), NetError> {
    if !exists(name) {
        return Ok(());
    }
    ip(&format!("removing {name}"), &["link", "del", name]).map(|_| ())
}

/// The interface index of `name`.
pub fn index(name: &str) -> Result<u32, NetError> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex")).map_err(|source| NetError::Socket {
        bridge: name.to_string(),
        what: "reading its interface index",
        source,
    })?;
    text.trim().parse().map_err(|_| NetError::Command {
        what: format!("link {name}"),
        cmd: String::new(),
        stderr: format!("bad ifindex {text:?}"),
    })
}

/// The MAC address of `name`.
pub fn mac(name: &str) -> Result<[u8; 6], NetError> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/address")).map_err(|source| NetError::Socket {
        bridge: name.to_string(),
        what: "reading its MAC address",
        source,
    })?;
    let m: vgrid_api::net::MacAddr = text.trim().parse().map_err(|_| NetError::Command {
        what: format!("link {name}"),
        cmd: String::new(),
        stderr: format!("bad MAC {text:?}"),
    })?;
    Ok(m.0)
}

/// Makes `/dev/net/tun` usable by QEMU's unprivileged user (mode 0666, what udev sets on a
/// stock Debian: the kernel still lets a user attach only to a tap made for it). A machine
/// without udev leaves it 0600. `true` when the mode was changed.
pub fn open_tun_device() -> Result<bool, NetError> {
    use std::os::unix::fs::PermissionsExt;
    let path = "/dev/net/tun";
    let err = |source| NetError::Socket { bridge: path.to_string(), what: "making /dev/net/tun usable by QEMU's user", source };
    let mode = std::fs::metadata(path).map_err(err)?.permissions().mode();
    if mode & 0o666 == 0o666 {
        return Ok(false);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode((mode & !0o777) | 0o666)).map_err(err)?;
    Ok(true)
}
