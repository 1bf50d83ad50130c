//! QEMU's command line for a spec: machine, memory, sandbox, serial console, QMP, pid file,
//! the disk (a qcow2 overlay over the image), the network ([`super::net`]), how it boots,
//! and how a saved or migrated state comes in.

use super::opt::qopt;
use crate::accel::Accel;
use crate::runtime::{CONSOLE_LOG, CONSOLE_SOCKET, OVERLAY_FILE, PID_FILE, QMP_SOCKET, SEED_FILE, VNC_SOCKET};
use crate::spec::{BootSource, DiskSource, VmSpec};
use serde::{Deserialize, Serialize};
use std::path::Path;
use vgrid_api::vm::Resources;

/// For a disk over the block proxy's unix socket, the overlay's backing as a node of its own
/// (the export its header names) with a reconnect delay: while the host agent restarts (its proxy
/// gone for a moment), the guest's reads of the base wait for it instead of failing.
fn nbd_backing_node(disk: &DiskSource, node: &str) -> Option<String> {
    let DiskSource::Nbd { url } = disk else { return None };
    let (export, socket) = url.strip_prefix("nbd+unix:///").and_then(|r| r.split_once("?socket="))?;
    Some(format!(
        "driver=nbd,node-name={node},read-only=on,server.type=unix,server.path={},export={},reconnect-delay={NBD_RECONNECT_DELAY_S}",
        qopt(Path::new(socket)),
        export.replace(',', ",,")
    ))
}

/// The cache option of the guest's writable overlays in `dir`: the host's page cache bypassed
/// where the file system allows it ([`crate::runtime::direct_io_ok`]).
fn overlay_cache(dir: &Path) -> &'static str {
    if crate::runtime::direct_io_ok(dir) {
        ",cache.direct=on"
    } else {
        ""
    }
}

/// Seconds a guest's disk (or RAM pager) waits for a restarting host agent's proxy.
pub const NBD_RECONNECT_DELAY_S: u32 = 300;

/// The `qemu-system-x86_64` arguments for `spec` (accelerator already resolved) in `dir`.
pub fn qemu_args(spec: &VmSpec, accel: Accel, dir: &Path) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &format!("guest={},debug-threads=on", spec.id)]);
    push(&["-machine", &format!("pc{}", spec.ram.machine_option()), "-accel", accel.as_str()]);
    if accel == Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&["-smp", &spec.config.cpus.to_string(), "-m", &format!("{}M", spec.config.memory_mib)]);
    a.extend(spec.ram.qemu_args(spec.config.memory_mib));
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    // A graphical console: a VGA card whose display is a VNC server on a unix socket in the
    // runtime directory (never a TCP port); the agent bridges it to the coordinator's WebSocket.
    push(&["-vga", "std", "-vnc", &format!("unix:{}", qopt(&dir.join(VNC_SOCKET)))]);
    // seccomp: no obsolete syscalls, no privilege elevation, no fork/exec, no scheduler or
    // affinity changes. A guest escaping into QEMU is held to these.
    push(&["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=con0,path={},server=on,wait=off,logfile={},logappend=on",
            qopt(&dir.join(CONSOLE_SOCKET)),
            qopt(&dir.join(CONSOLE_LOG))
        ),
        "-serial",
        "chardev:con0",
    ]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", qopt(&dir.join(QMP_SOCKET)))]);
    push(&["-pidfile", &dir.join(PID_FILE).display().to_string()]);
    let cache = overlay_cache(dir);
    let backing = nbd_backing_node(&spec.disk, "base");
    if let Some(b) = &backing {
        push(&["-blockdev", b]);
    }
    push(&[
        "-blockdev",
        &format!(
            "driver=qcow2,node-name=vda,discard=unmap{cache},file.driver=file,file.filename={}{}",
            qopt(&dir.join(OVERLAY_FILE)),
            if backing.is_some() { ",backing=base" } else { "" }
        ),
        "-device",
        // Direct kernel boot takes bootindex 0 for its option ROM.
        if matches!(spec.boot, BootSource::Firmware { .. }) { "virtio-blk-pci,drive=vda,bootindex=0" } else { "virtio-blk-pci,drive=vda" },
    ]);
    a.extend(volume_args(spec, dir, cache));
    if spec.config.cloud_init.is_some() {
        // The NoCloud seed, read-only, after every other disk: the image stays /dev/vda and
        // the volumes keep their letters.
        a.extend([
            "-blockdev".to_string(),
            format!("driver=raw,node-name=seed,read-only=on,file.driver=file,file.filename={}", qopt(&dir.join(SEED_FILE))),
            "-device".into(),
            "virtio-blk-pci,drive=seed,serial=cidata".into(),
        ]);
    }
    a.extend(super::net::net_args(&spec.config, dir));
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    match &spec.boot {
        BootSource::Kernel { kernel, initrd, cmdline } => {
            push(&["-kernel", &kernel.display().to_string()]);
            if let Some(i) = initrd {
                push(&["-initrd", &i.display().to_string()]);
            }
            if !cmdline.is_empty() {
                push(&["-append", cmdline]);
            }
        }
        BootSource::Firmware { bios } => {
            if let Some(b) = bios {
                push(&["-bios", &b.display().to_string()]);
            }
        }
        BootSource::Restore { option_roms } => {
            for r in option_roms {
                push(&["-option-rom", r]);
            }
            push(&["-no-reboot"]);
        }
    }
    a
}

/// The volumes' drives, after the image's: a read-only volume is its export itself; a
/// read-write one a qcow2 overlay of its own over the export (its writes until committed),
/// opened with `cache`, the overlays' cache option [`qemu_args`] probed once.
fn volume_args(spec: &VmSpec, dir: &Path, cache: &str) -> Vec<String> {
    let mut a = Vec::new();
    for (i, att, disk) in spec.volumes() {
        let base = format!("volbase{i}");
        let Some(node) = nbd_backing_node(disk, &base) else { continue };
        a.extend(["-blockdev".to_string(), node]);
        let drive = if att.readonly {
            base
        } else {
            a.extend([
                "-blockdev".to_string(),
                format!(
                    "driver=qcow2,node-name=vol{i},discard=unmap{cache},file.driver=file,file.filename={},backing={base}",
                    qopt(&crate::runtime::volume_overlay(dir, i))
                ),
            ]);
            format!("vol{i}")
        };
        let serial = att.serial.as_deref().map(|s| format!(",serial={s}")).unwrap_or_default();
        a.extend(["-device".to_string(), format!("virtio-blk-pci,drive={drive}{serial}")]);
    }
    a
}

/// The `-incoming` arguments: a saved state's file (`state`), or `defer` for a live migration
/// that QMP `migrate-incoming` opens later; none for a fresh boot.
pub(crate) fn incoming_args(state: Option<&Path>, defer: bool) -> Vec<String> {
    match state {
        Some(state) => vec!["-incoming".into(), format!("file:{}", state.display())],
        None if defer => vec!["-incoming".into(), "defer".into()],
        None => Vec::new(),
    }
}

/// Disk throttling of one VM (a QEMU throttle group on its drive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DiskThrottle {
    pub bps: Option<u64>,
    pub iops: Option<u64>,
}

impl DiskThrottle {
    pub fn of(r: &Resources) -> Option<DiskThrottle> {
        (r.disk_bps.is_some() || r.disk_iops.is_some()).then_some(DiskThrottle { bps: r.disk_bps, iops: r.disk_iops })
    }
}

/// Rewrites QEMU arguments so that the guest's drive `vda` goes through a throttle filter
/// node in throttle group `tg0`: the qcow2 node becomes `vda-qcow2`.
pub fn throttle_args(args: &mut Vec<String>, t: &DiskThrottle) {
    let Some(i) = args.iter().position(|a| a.starts_with("driver=qcow2,node-name=vda,")) else { return };
    args[i] = args[i].replacen("node-name=vda,", "node-name=vda-qcow2,", 1);
    let mut group = "throttle-group,id=tg0".to_string();
    if let Some(b) = t.bps {
        group.push_str(&format!(",x-bps-total={b}"));
    }
    if let Some(n) = t.iops {
        group.push_str(&format!(",x-iops-total={n}"));
    }
    let filter = "driver=throttle,node-name=vda,throttle-group=tg0,file=vda-qcow2".to_string();
    args.splice(i + 1..i + 1, ["-blockdev".to_string(), filter]);
    args.splice(i - 1..i - 1, ["-object".to_string(), group]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tests::spec;

    #[test]
    fn args_hold_the_runtime_files_and_forwards() {
        let t = tempfile::tempdir().unwrap();
        let s = spec(t.path());
        let dir = Path::new("/run/vg,rid/vm-1");
        let a = qemu_args(&s, Accel::Tcg, dir).join(" ");
        assert!(a.contains("-accel tcg"), "{a}");
        assert!(a.contains("path=/run/vg,,rid/vm-1/console.sock"), "{a}");
        assert!(a.contains("logfile=/run/vg,,rid/vm-1/console.log"), "{a}");
        assert!(a.contains("-qmp unix:/run/vg,,rid/vm-1/qmp.sock,server=on,wait=off"), "{a}");
        assert!(a.contains("file.filename=/run/vg,,rid/vm-1/overlay.qcow2"), "{a}");
        assert!(a.contains("hostfwd=tcp:127.0.0.1:2222-:22"), "{a}");
        assert!(a.contains("-machine pc"), "{a}");
        assert!(!a.contains("-cpu host"), "{a}");
    }

    #[test]
    fn overlays_bypass_the_host_page_cache_where_the_file_system_allows_it() {
        let t = tempfile::tempdir().unwrap();
        let s = spec(t.path());
        // A directory that cannot be probed gets no O_DIRECT (QEMU would refuse to open an
        // overlay with it on a file system without it).
        let a = qemu_args(&s, Accel::Tcg, Path::new("/nonexistent/vm-1")).join(" ");
        assert!(a.contains("node-name=vda,discard=unmap,file.driver=file"), "{a}");
        let d = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        if crate::runtime::direct_io_ok(d.path()) {
            let a = qemu_args(&s, Accel::Tcg, d.path()).join(" ");
            assert!(a.contains("node-name=vda,discard=unmap,cache.direct=on,file.driver=file"), "{a}");
        }
        assert!(std::fs::read_dir(d.path()).unwrap().next().is_none(), "the probe file is removed");
    }
}
