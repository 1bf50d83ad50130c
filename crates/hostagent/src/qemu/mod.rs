//! What the host tells QEMU: its command line from a [`VmSpec`](crate::spec::VmSpec)
//! ([`args`], with the network part in [`net`], both quoting values as [`opt`] says) and which
//! QEMU this host has ([`version`]).
//! Pure functions of the spec and the runtime directory: nothing here starts a process
//! (except `--version`) or touches a guest.

pub mod args;
pub mod net;
pub mod opt;
pub mod version;

pub use args::{qemu_args, NBD_RECONNECT_DELAY_S};
pub use version::{qemu_version, qemu_version_of, QemuVersion};
