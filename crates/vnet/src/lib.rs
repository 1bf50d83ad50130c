//! vgrid's virtual networks on a host: the frame path of a VM's site interface. It owns the
//! Linux links a host agent makes for its guests (a bridge per site network when the host has
//! none, a tap per interface, owned by QEMU's user), the anti-spoofing filter of each tap
//! (nftables' bridge family: a guest's frames must carry the MAC and address the coordinator
//! allocated to it), and the static DHCP responder on each bridge (it answers only the MACs of
//! this host's guests, with the leases their records hold; it has no pool of its own).
//!
//! It knows nothing of the coordinator, QEMU or the block proxy, and must never pick an
//! address: addresses come from the VM's configuration. It never touches a link it did not make
//! but the bridge it is given (an uplink stays the operator's).

pub mod dhcp;
pub mod filter;
pub mod link;

/// What went wrong with a host's network plumbing; each error names the object and the cause.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what}: `{cmd}` failed: {stderr}")]
    Command { what: String, cmd: String, stderr: String },
    #[error("{what}: cannot run `{program}` ({source}); is {package} installed (scripts/install-deps.sh)?")]
    Spawn {
        what: String,
        program: String,
        package: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("DHCP responder on bridge {bridge}: {what}: {source}")]
    Socket {
        bridge: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `program args`; its stderr in the error when it fails.
pub(crate) fn run(what: &str, program: &str, package: &'static str, args: &[&str]) -> Result<String, NetError> {
    let out = std::process::Command::new(program).args(args).output().map_err(|source| NetError::Spawn {
        what: what.to_string(),
        program: program.to_string(),
        package,
        source,
    })?;
    if !out.status.success() {
        return Err(NetError::Command {
            what: what.to_string(),
            cmd: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
