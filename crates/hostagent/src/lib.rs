//! vgrid hostagent: the compute host's control of its guests. It owns the QEMU driver (spawning
//! `qemu-system-x86_64` per VM with a per-VM runtime directory, a qcow2 copy-on-write overlay
//! over the read-only image, a logged serial console, user-mode networking with port forwards),
//! its own QMP client, the choice of accelerator (KVM only where usable, TCG otherwise), the
//! host API (`/host/v1`), saving guests as warm images and restoring them, live migration, and
//! the re-adoption of QEMU processes after an agent restart. QEMU's arguments derive from the
//! VM's `vgrid_api::vm::VmConfig`, and the host API's bodies are `vgrid_api::host`'s; images
//! come through the block proxy and `vgrid-storeclient`, never the image server's crate. It must
//! never write to an image's base (the backing file or the block proxy's export), never fetch
//! or cache image chunks (that is `blockproxy`), never decide where VMs run (that is the
//! coordinator), and never panic on a bad spec: every failure is a [`VmError`]/[`QmpError`]
//! naming the VM, file or socket.
//!
//! Modules by layer, each using only those above it or beside it:
//!
//! - **QEMU** (one guest, no agent): [`spec`] (what a VM is: [`VmSpec`], validation),
//!   [`runtime`] (the runtime directory's files and pid), [`qemu`] (QEMU's arguments, network
//!   arguments and version), [`qmp`], [`vm`] (the running [`Vm`]: launch, adopt, QMP, console,
//!   power-down, save state), [`accel`], [`ram`] (RAM backings and the lazy pager),
//!   [`cgroup`], [`qemu_user`], [`tlscreds`], [`cloudinit`] (a cloud image's NoCloud seed).
//! - **Host**: [`ctx`] (the [`ctx::HostCtx`] every feature works on: image servers, block
//!   proxy, resources, the QEMU user, the one table of guests running, arriving and leaving;
//!   stop/release/remove), [`error`] (the host layer's errors), [`resources`] and [`predict`]
//!   (admission, accounting, load), [`networks`] (site interfaces: taps, filters, leases) and
//!   [`tunnel`] (tunnel interfaces: their stream sockets and the one connection to the relay).
//! - **Features**, each a set of functions over a `HostCtx` that call none above them:
//!   [`restore`] (starting from a warm image), [`instantiate`] (launching a VM: admission,
//!   image, boot files, QEMU), [`save`] (snapshot/suspend as a warm image) and [`volume`]
//!   (commits of attached volumes), both over [`overlay`] (a VM's overlay as chunks: the map,
//!   composing, encoding, uploading; one save per VM at a time), [`migrate`] (live migration,
//!   both ends), [`adopt`] (guests of an earlier agent), [`waits`] (guests stalled on
//!   unreachable image servers, for the heartbeat).
//! - **Agent**: [`agent`] (the [`agent::Agent`]: starts the context, the NBD server, usage
//!   sampling, re-adoption and the heartbeat; shuts them down).
//! - **HTTP**: [`http`], every `/host/v1` handler and the mapping of errors to status codes;
//!   nothing below it knows axum.
//! - [`testkit`]: the sample guest for tests.

pub mod accel;
pub mod adopt;
pub mod agent;
pub mod cgroup;
pub mod cloudinit;
pub mod ctx;
pub mod error;
pub mod http;
pub mod instantiate;
pub mod migrate;
pub mod networks;
pub mod overlay;
pub mod predict;
pub mod qemu;
pub mod qemu_user;
pub mod qmp;
pub mod ram;
pub mod resources;
pub mod restore;
pub mod runtime;
pub mod save;
pub mod spec;
pub mod testkit;
pub mod tlscreds;
pub mod tunnel;
pub mod vm;
mod vmspec;
pub mod volume;
pub mod waits;

pub use accel::{kvm_usable, Accel};
pub use qemu::{qemu_args, qemu_version, qemu_version_of, QemuVersion};
pub use qemu_user::{QemuUser, QemuUserError, DEFAULT_QEMU_USER};
pub use qmp::{QmpClient, QmpError, QmpEvent, QmpVersion};
pub use spec::{validate_spec, validate_vm_id, BootSource, DiskSource, VmSpec};
pub use vm::{ExitInfo, LaunchOptions, QemuStatus, StopMethod, StopOutcome, Vm, VmError};
