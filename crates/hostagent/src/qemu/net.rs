//! QEMU's network arguments (`-netdev`/`-device`) from a VM's `NetConfig`: the one place where
//! a networking mode adds its QEMU arguments on the host.

use std::path::Path;

use vgrid_api::vm::{Nic, VmConfig};

/// The guest port `vgrid vm ssh` reaches through the first user-mode interface.
pub const SSH_PORT: u16 = 22;

/// The name of the tap of interface `index` of the VM whose runtime directory is `dir` (site
/// mode): `vgt`, eight hex digits of the directory's FNV-1a hash, the index; 15 bytes at most,
/// as Linux allows. The directory, not the VM id: two agents on one machine (a migration
/// between them) each have their own tap for the VM.
pub fn tap_name(dir: &Path, index: usize) -> String {
    let h = dir.as_os_str().as_encoded_bytes().iter().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193));
    format!("vgt{h:08x}{index}")
}

/// The unix socket through which QEMU carries the frames of interface `index` (tunnel mode)
/// to the host agent, in the VM's runtime directory `dir`.
pub fn stream_socket(dir: &Path, index: usize) -> std::path::PathBuf {
    dir.join(format!("nic{index}.sock"))
}

/// The network devices of a VM's `config` in its runtime directory `dir`: one virtio-net device
/// per interface, `n0`, `n1`, ...; user-mode ones with their TCP forwards bound on 127.0.0.1,
/// site ones on their tap (made by the agent before QEMU starts; no vhost here), tunnel ones
/// on a stream socket the agent listens on (QEMU reconnects while the agent restarts). Site and
/// tunnel interfaces carry the MAC the coordinator allocated.
pub fn net_args(config: &VmConfig, dir: &Path) -> Vec<String> {
    let mut a = Vec::new();
    let first_user = config.net.nics.iter().position(|n| matches!(n, Nic::User { .. }));
    for (i, nic) in config.net.nics.iter().enumerate() {
        let netdev = match nic {
            Nic::User { forwards } => {
                let mut netdev = format!("user,id=n{i}");
                // The guest's ssh port on an ephemeral port of the host's loopback, for
                // `vgrid vm ssh` (the agent finds the port through QMP): the first user-mode
                // interface only.
                if Some(i) == first_user {
                    netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:0-:{SSH_PORT}"));
                }
                for f in forwards {
                    netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{}-:{}", f.host, f.guest));
                }
                netdev
            }
            Nic::Site { .. } => format!("tap,id=n{i},ifname={},script=no,downscript=no,vhost=off", tap_name(dir, i)),
            Nic::Tunnel { .. } => {
                format!("stream,id=n{i},server=off,addr.type=unix,addr.path={},reconnect-ms=1000", super::opt::qopt(&stream_socket(dir, i)))
            }
        };
        let mut device = format!("virtio-net-pci,netdev=n{i},romfile=");
        if let Some(m) = nic.mac() {
            device.push_str(&format!(",mac={m}"));
        }
        a.extend(["-netdev".to_string(), netdev, "-device".into(), device]);
    }
    a
}

/// The host port on 127.0.0.1 that QEMU forwards to `guest_port`, from HMP's `info usernet`
/// (rows `TCP[HOST_FORWARD] FD SRC-ADDR SRC-PORT DST-ADDR DST-PORT RECVQ SENDQ`).
pub fn forwarded_port(usernet: &str, guest_port: u16) -> Option<u16> {
    usernet.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let fwd = f.first()?.starts_with("TCP[HOST_FORWARD]") && f.len() >= 6;
        (fwd && f[2] == "127.0.0.1" && f[5].parse::<u16>().ok()? == guest_port).then(|| f[3].parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgrid_api::net::{MacAddr, NetConfig};

    #[test]
    fn the_forwarded_port_is_read_from_info_usernet() {
        // As QEMU 10 prints it.
        let t = "Hub -1 (n0):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n  TCP[HOST_FORWARD]  14       127.0.0.1  2222       10.0.2.15    80     0     0\r\n  TCP[HOST_FORWARD]   3       127.0.0.1 33537       10.0.2.15    22     0     0\r\n";
        assert_eq!(forwarded_port(t, 22), Some(33537));
        assert_eq!(forwarded_port(t, 80), Some(2222));
        assert_eq!(forwarded_port(t, 443), None);
        assert_eq!(forwarded_port("", 22), None);
    }

    #[test]
    fn each_mode_has_its_netdev() {
        let mac = MacAddr::for_site("farm", "10.20.0.100".parse().unwrap());
        let mut c = VmConfig::new("sample@1".parse().unwrap());
        c.net = NetConfig {
            nics: vec![
                Nic::User { forwards: vec![] },
                Nic::Site { network: "farm".into(), mac: Some(mac), address: Some("10.20.0.100".parse().unwrap()) },
                Nic::Tunnel { network: "home".into(), mac: Some(MacAddr::for_tunnel("vm-1", "home", 0)) },
            ],
        };
        let a = net_args(&c, Path::new("/run/v"));
        assert_eq!(a[1], "user,id=n0,hostfwd=tcp:127.0.0.1:0-:22", "the ssh forward on the first user-mode interface");
        let tap = tap_name(Path::new("/run/v"), 1);
        assert!(tap.len() <= 15, "{tap}");
        assert_eq!(a[5], format!("tap,id=n1,ifname={tap},script=no,downscript=no,vhost=off"));
        assert_eq!(a[7], format!("virtio-net-pci,netdev=n1,romfile=,mac={mac}"));
        assert_eq!(a[9], "stream,id=n2,server=off,addr.type=unix,addr.path=/run/v/nic2.sock,reconnect-ms=1000");
    }
}
