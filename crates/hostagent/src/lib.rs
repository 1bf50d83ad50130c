//! vgrid hostagent: the compute host's control of its guests. It owns the QEMU driver (spawning
//! `qemu-system-x86_64` per VM with a per-VM runtime directory, a qcow2 copy-on-write overlay
//! over the read-only image, a logged serial console, user-mode networking with port forwards),
//! its own QMP client, the choice of accelerator (KVM only where usable, TCG otherwise), and the
//! re-adoption of QEMU processes after an agent restart. QEMU's arguments derive from the VM's
//! `vgrid_api::vm::VmConfig`, and the host API's bodies are `vgrid_api::host`'s; images come
//! through the block proxy and `vgrid-storeclient`, never the image server's crate. It must
//! never write to an image's base (the backing file or the block proxy's export), never fetch
//! or cache image chunks (that is `blockproxy`), never decide where VMs run (that is the
//! coordinator), and never panic on a bad spec: every failure is a [`VmError`]/[`QmpError`]
//! naming the VM, file or socket.

pub mod accel;
pub mod adopt;
pub mod agent;
pub mod cgroup;
pub mod http;
pub mod migrate;
pub mod mobile;
pub mod predict;
pub mod qemu_user;
pub mod qmp;
pub mod ram;
pub mod resources;
pub mod testkit;
pub mod tlscreds;
pub mod vm;
mod vmspec;

pub use accel::{kvm_usable, Accel};
pub use qemu_user::{QemuUser, QemuUserError, DEFAULT_QEMU_USER};
pub use qmp::{QmpClient, QmpError, QmpEvent, QmpVersion};
pub use vm::{
    qemu_args, qemu_version, qemu_version_of, validate_spec, validate_vm_id, BootSource, DiskSource, ExitInfo, LaunchOptions, QemuStatus,
    QemuVersion, StopMethod, StopOutcome, Vm, VmError, VmSpec,
};
