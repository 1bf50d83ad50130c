//! QEMU's network arguments (`-netdev`/`-device`) from a VM's `NetConfig`: the one place where
//! a new networking mode adds its QEMU arguments on the host.

use vgrid_api::vm::{Nic, VmConfig};

/// The network devices of `config`: one virtio-net device per interface, `n0`, `n1`, ...;
/// user-mode ones with their TCP forwards bound on 127.0.0.1.
pub fn net_args(config: &VmConfig) -> Vec<String> {
    let mut a = Vec::new();
    for (i, nic) in config.net.nics.iter().enumerate() {
        let netdev = match nic {
            Nic::User { forwards } => {
                let mut netdev = format!("user,id=n{i}");
                for f in forwards {
                    netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{}-:{}", f.host, f.guest));
                }
                netdev
            }
        };
        a.extend(["-netdev".to_string(), netdev, "-device".into(), format!("virtio-net-pci,netdev=n{i},romfile=")]);
    }
    a
}
